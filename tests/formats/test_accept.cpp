// Headers the reference reader refuses must not be accepted: anything but whitespace after the
// JSON object (nlohmann takes a NUL for the end of its input, so `{...}\0 garbage` used to
// parse), and tensor names with control characters (a NUL cut error messages short). Every byte
// value after the object and every control character in a name is swept.
#include <doctest/doctest.h>

#include <string>

#include "formats_test_util.hpp"
#include "qtool/formats/safetensors.hpp"

namespace qtool {
namespace {

using test::st_bytes;
using test::st_entry;
using test::st_header;

constexpr const char* kLabel = "model-00001-of-00002.safetensors";

SafetensorsHeader parse(const std::string& header, uint64_t data_bytes) {
  const auto bytes = st_bytes(header, data_bytes);
  return parse_safetensors_header(bytes, bytes.size(), kLabel);
}

const std::string kGood = st_header({st_entry("a.weight", "F32", "[2,2]", 0, 16)});

TEST_CASE("accept: a NUL after the header object is refused, naming the file and the offset") {
  const uint64_t at = 8 + kGood.size();
  for (const std::string& tail :
       {std::string("\0", 1), std::string("\0garbage", 8), std::string("\0      ", 7),
        std::string("   \0", 4), std::string("\0{\"b\":1}", 8)}) {
    const uint64_t nul = at + tail.find('\0');
    INFO("tail of ", tail.size(), " bytes, NUL at file offset ", nul);
    test::check_error([&] { parse(kGood + tail, 16); }, ErrorKind::InvalidInput,
                      {kLabel, "NUL byte after its JSON object", "file offset " + std::to_string(nul) + ")"});
  }
}

TEST_CASE("accept: a NUL inside the header object is still invalid JSON") {
  std::string h = kGood;
  h.insert(h.find("\"shape\""), std::string("\0", 1));
  test::check_error([&] { parse(h, 16); }, ErrorKind::InvalidInput, {kLabel, "not valid JSON"});
}

TEST_CASE("accept: whitespace padding after the object is accepted, any other byte is not") {
  for (const char* pad : {"", " ", "        ", "\n", "\t \r\n"}) {
    INFO("padding '", pad, "'");
    CHECK(parse(kGood + pad, 16).tensors.size() == 1);
  }
  for (int b = 0; b < 256; ++b) {
    if (b == ' ' || b == '\t' || b == '\n' || b == '\r' || b >= 0x80) continue;  // >= 0x80: not UTF-8 alone
    INFO("byte ", b, " after the object");
    CHECK_THROWS_AS(parse(kGood + std::string(1, static_cast<char>(b)) + "   ", 16), Error);
  }
}

TEST_CASE("accept: a control character in a tensor name is refused, the name escaped in a whole message") {
  for (int c = 0; c < 0x20; ++c) {
    char esc[8];
    std::snprintf(esc, sizeof esc, "\\u%04x", c);
    char shown[8];
    std::snprintf(shown, sizeof shown, "\\x%02x", c);
    const std::string h =
        st_header({st_entry(std::string("model.norm") + esc + "x.weight", "F32", "[2,2]", 0, 16)});
    INFO("U+", c);
    test::check_error([&] { parse(h, 16); }, ErrorKind::InvalidInput,
                      {kLabel, "tensor name 'model.norm" + std::string(shown) + "x.weight'",
                       "must be printable", "(header, file offset"});
  }
  const std::string del = st_header({st_entry("a\\u007fb", "F32", "[2,2]", 0, 16)});
  test::check_error([&] { parse(del, 16); }, ErrorKind::InvalidInput, {"tensor name 'a\\x7fb'"});
  // Printable non-ASCII names stay valid.
  CHECK(parse(st_header({st_entry("caf\\u00e9.weight", "F32", "[2,2]", 0, 16)}), 16).tensors.at(0).name ==
        "caf\xc3\xa9.weight");
}

TEST_CASE("accept: escape_controls writes every control character as \\xNN and keeps the rest") {
  std::string all;
  for (int c = 0; c < 128; ++c) all += static_cast<char>(c);
  const std::string e = escape_controls(all);
  CHECK(e.find('\0') == std::string::npos);
  CHECK(e.substr(0, 8) == "\\x00\\x01");
  CHECK(e.find("\\x1f !\"#") != std::string::npos);
  CHECK(e.substr(e.size() - 4) == "\\x7f");
  CHECK(has_control_char(all));
  CHECK(!has_control_char("model.layers.0.weight \xc3\xa9"));
  CHECK(escape_controls("plain") == "plain");
}

}  // namespace
}  // namespace qtool
