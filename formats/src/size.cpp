#include "qtool/formats/size.hpp"

#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "qtool/formats/error.hpp"

namespace qtool {

uint64_t parse_size(std::string_view text, std::string_view option) {
  auto bad = [&]() -> uint64_t {
    fail(ErrorKind::Usage, option, ": '", text,
         "' is not a size (use bytes, or a number with KB, MB, GB, TB, KiB, MiB, GiB, TiB)");
  };
  size_t i = 0;
  while (i < text.size() && (std::isdigit(static_cast<unsigned char>(text[i])) || text[i] == '.')) ++i;
  const std::string number(text.substr(0, i));
  if (number.find_first_of("0123456789") == std::string::npos) return bad();
  if (number.find('.') != number.rfind('.')) return bad();
  std::string unit(text.substr(i));
  while (!unit.empty() && unit.front() == ' ') unit.erase(unit.begin());
  for (char& c : unit) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  double mult = 0;
  if (unit.empty() || unit == "b")
    mult = 1;
  else if (unit == "k" || unit == "kb")
    mult = 1e3;
  else if (unit == "m" || unit == "mb")
    mult = 1e6;
  else if (unit == "g" || unit == "gb")
    mult = 1e9;
  else if (unit == "t" || unit == "tb")
    mult = 1e12;
  else if (unit == "kib")
    mult = 1024.0;
  else if (unit == "mib")
    mult = 1024.0 * 1024;
  else if (unit == "gib")
    mult = 1024.0 * 1024 * 1024;
  else if (unit == "tib")
    mult = 1024.0 * 1024 * 1024 * 1024;
  else
    return bad();
  // strtod, not std::stod: a number too large (or too small) for a double is an answer here
  // (infinity, refused below; or 0), not an exception.
  char* end = nullptr;
  const double value = std::strtod(number.c_str(), &end) * mult;
  if (end != number.c_str() + number.size()) return bad();
  if (!std::isfinite(value) || value >= 1.8e19) {
    fail(ErrorKind::Usage, option, ": '", text, "' is more than the 16 EiB that a size can be");
  }
  return static_cast<uint64_t>(std::round(value));
}

std::string format_size(uint64_t bytes) {
  static const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
  double v = static_cast<double>(bytes);
  int u = 0;
  while (v >= 1024.0 && u < 5) {
    v /= 1024.0;
    ++u;
  }
  char buf[32];
  if (u == 0)
    std::snprintf(buf, sizeof buf, "%llu B", static_cast<unsigned long long>(bytes));
  else
    std::snprintf(buf, sizeof buf, "%.2f %s", v, kUnits[u]);
  return buf;
}

std::string format_count(uint64_t n, int billion_digits) {
  char buf[48];
  const double v = static_cast<double>(n);
  if (n >= 1'000'000'000)
    std::snprintf(buf, sizeof buf, "%.*fB", billion_digits, v / 1e9);
  else if (n >= 1'000'000)
    std::snprintf(buf, sizeof buf, "%.2fM", v / 1e6);
  else if (n >= 1'000)
    std::snprintf(buf, sizeof buf, "%.2fK", v / 1e3);
  else
    std::snprintf(buf, sizeof buf, "%llu", static_cast<unsigned long long>(n));
  return buf;
}

}  // namespace qtool
