// --max-memory parsing and the machine's own budget.
#include <cctype>
#include <cstdio>
#include <string>
#include <system_error>

#include "qtool/formats/error.hpp"
#include "qtool/formats/json.hpp"
#include "qtool/formats/size.hpp"
#include "qtool/planner/planner.hpp"

#ifdef QTOOL_HAVE_CUDA
#include <cuda_runtime_api.h>
#endif

namespace qtool::planner {
namespace {

constexpr std::string_view kOption = "--max-memory";

std::string trim(std::string_view s) {
  size_t b = 0, e = s.size();
  while (b < e && std::isspace(static_cast<unsigned char>(s[b]))) ++b;
  while (e > b && std::isspace(static_cast<unsigned char>(s[e - 1]))) --e;
  return std::string(s.substr(b, e - b));
}

void set_entry(Budget& b, const std::string& key_in, uint64_t bytes, std::string_view source) {
  std::string key = trim(key_in);
  for (char& c : key) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (key.starts_with("cuda:")) key = key.substr(5);
  if (key == "cpu") {
    if (b.cpu) fail(ErrorKind::Usage, kOption, ": 'cpu' given twice");
    b.cpu = bytes;
    b.cpu_source = std::string(source);
    return;
  }
  if (key == "disk") {
    fail(ErrorKind::Usage, kOption,
         ": 'disk' takes no budget: offloaded groups on disk are read from the checkpoint files");
  }
  if (key.empty() || key.size() > 4 || key.find_first_not_of("0123456789") != std::string::npos) {
    fail(ErrorKind::Usage, kOption, ": key '", key_in, "' is not a GPU index, 'cuda:N' or 'cpu'");
  }
  const int32_t gpu = std::stoi(key);
  if (b.gpus.count(gpu)) fail(ErrorKind::Usage, kOption, ": GPU ", gpu, " given twice");
  b.gpus[gpu] = bytes;
  b.gpu_sources[gpu] = std::string(source);
}

uint64_t json_size(const nlohmann::json& v, const std::string& key) {
  if (v.is_number_unsigned()) return v.get<uint64_t>();
  if (v.is_number_integer()) {
    if (v.get<int64_t>() < 0) fail(ErrorKind::Usage, kOption, ": '", key, "': negative size");
    return static_cast<uint64_t>(v.get<int64_t>());
  }
  if (v.is_number_float()) {
    const double d = v.get<double>();
    if (!(d >= 0) || d > 1.8e19) fail(ErrorKind::Usage, kOption, ": '", key, "': bad size ", v.dump());
    return static_cast<uint64_t>(d);
  }
  if (v.is_string()) return parse_size(v.get<std::string>(), std::string(kOption) + " '" + key + "'");
  fail(ErrorKind::Usage, kOption, ": '", key,
       "': a size is a number of bytes or a string like \"20GiB\" (got ", v.dump(), ")");
}

Budget from_json(const nlohmann::json& j, std::string_view source) {
  if (!j.is_object())
    fail(ErrorKind::Usage, kOption,
         ": a JSON budget must be an object like {\"0\": \"20GiB\", \"cpu\": \"64GiB\"}");
  Budget b;
  for (const auto& [key, v] : j.items()) set_entry(b, key, json_size(v, key), source);
  return b;
}

}  // namespace

Budget parse_max_memory(std::string_view text_in) {
  const std::string text = trim(text_in);
  if (text.empty()) fail(ErrorKind::Usage, kOption, ": empty budget");
  Budget b;
  if (text.front() == '{') {
    b = from_json(parse_json(text, kOption, ErrorKind::Usage), kOption);
    b.note = "budget from --max-memory (JSON)";
  } else if (text.find('=') == std::string::npos) {
    // A file holding either form.
    std::error_code ec;
    if (!std::filesystem::is_regular_file(text, ec)) {
      fail(ErrorKind::Usage, kOption, ": '", text,
           "' is neither a budget (0=20GiB,cpu=64GiB or a JSON dict) nor a file");
    }
    const std::string body = trim(read_text_file(text));
    if (!body.empty() && body.front() == '{') {
      b = from_json(parse_json(body, str_cat(kOption, " file ", text)), text);
    } else if (body.empty() || body.find('=') != std::string::npos) {
      b = parse_max_memory(body.empty() ? std::string("{}") : body);
    } else {
      // Not a file name again: a file naming itself would never end.
      fail(ErrorKind::Usage, kOption, ": file ", text, " holds neither KEY=SIZE items nor a JSON dict");
    }
    b.note = "budget from --max-memory file " + text;
    for (auto& [g, s] : b.gpu_sources) s = text;
    if (b.cpu) b.cpu_source = text;
  } else {
    size_t pos = 0;
    while (pos <= text.size()) {
      size_t comma = text.find(',', pos);
      if (comma == std::string::npos) comma = text.size();
      const std::string item = trim(std::string_view(text).substr(pos, comma - pos));
      pos = comma + 1;
      if (item.empty()) continue;
      const size_t eq = item.find('=');
      if (eq == std::string::npos) fail(ErrorKind::Usage, kOption, ": '", item, "' is not KEY=SIZE");
      const std::string key = item.substr(0, eq);
      set_entry(b, key, parse_size(trim(item.substr(eq + 1)), std::string(kOption) + " '" + trim(key) + "'"),
                kOption);
    }
    b.note = "budget from --max-memory";
  }
  if (b.gpus.empty()) fail(ErrorKind::Usage, kOption, ": no GPU budget given (e.g. 0=20GiB)");
  return b;
}

uint64_t host_available_memory() {
  std::FILE* f = std::fopen("/proc/meminfo", "r");
  if (!f) return 0;
  char line[256];
  uint64_t kb = 0;
  while (std::fgets(line, sizeof line, f)) {
    unsigned long long v = 0;
    if (std::sscanf(line, "MemAvailable: %llu kB", &v) == 1) {
      kb = v;
      break;
    }
  }
  std::fclose(f);
  return kb * 1024;
}

Budget machine_budget() {
  Budget b;
#ifdef QTOOL_HAVE_CUDA
  int n = 0;
  if (cudaGetDeviceCount(&n) == cudaSuccess) {
    for (int i = 0; i < n; ++i) {
      size_t free_b = 0, total_b = 0;
      if (cudaSetDevice(i) != cudaSuccess || cudaMemGetInfo(&free_b, &total_b) != cudaSuccess) continue;
      // The planner's own context is released when it exits; what is free now plus that context is
      // what the runner will find. The reserve model charges the runner's context separately.
      b.gpus[i] = free_b;
      b.gpu_sources[i] = "cudaMemGetInfo free";
    }
  } else {
    (void)cudaGetLastError();
  }
#endif
  const uint64_t host = host_available_memory();
  if (host > 0) {
    b.cpu = host;
    b.cpu_source = "/proc/meminfo MemAvailable";
  }
  b.note = b.gpus.empty() ? "no --max-memory and no CUDA device found"
                          : str_cat("no --max-memory: budget from the machine (", b.gpus.size(),
                                    " GPU(s): free memory from cudaMemGetInfo; cpu: MemAvailable)");
  return b;
}

}  // namespace qtool::planner
