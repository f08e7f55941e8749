// Helpers for the config and conversion tests: temporary folders, printed seeds, synthetic and
// hand-built checkpoints, and checks on errors.
#pragma once

#include <doctest/doctest.h>
#include <stdlib.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "qtool/formats/checkpoint.hpp"
#include "qtool/formats/dtype.hpp"
#include "qtool/formats/error.hpp"
#include "qtool/formats/synth.hpp"

namespace qtool::test {

// A fresh folder under the system temp dir, removed with everything in it at scope exit.
class ScratchDir {
 public:
  ScratchDir() {
    std::string tmpl = (std::filesystem::temp_directory_path() / "qtool-qtest-XXXXXX").string();
    if (!::mkdtemp(tmpl.data())) throw std::runtime_error("mkdtemp failed");
    path_ = tmpl;
  }
  ~ScratchDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  ScratchDir(const ScratchDir&) = delete;
  ScratchDir& operator=(const ScratchDir&) = delete;
  const std::filesystem::path& path() const { return path_; }
  std::filesystem::path operator/(const std::string& name) const { return path_ / name; }

 private:
  std::filesystem::path path_;
};

// QTOOL_TEST_SEED if set, else from the clock; always printed so that a failure can be replayed.
inline uint64_t printed_seed(const char* what) {
  uint64_t seed;
  if (const char* env = std::getenv("QTOOL_TEST_SEED"))
    seed = std::strtoull(env, nullptr, 10);
  else
    seed = static_cast<uint64_t>(std::random_device{}()) ^ (static_cast<uint64_t>(::getpid()) << 20);
  std::fprintf(stderr, "[%s] QTOOL_TEST_SEED=%llu\n", what, static_cast<unsigned long long>(seed));
  return seed;
}

// Writes a synthetic preset (formats/synth.hpp) to `out`.
inline void write_preset(const std::string& preset, const std::filesystem::path& out, uint64_t seed,
                         DType dtype = DType::BF16, double scale = 1.0,
                         std::optional<uint64_t> max_shard = {}) {
  SynthSpec spec;
  spec.preset = preset;
  spec.dtype = dtype;
  spec.scale = scale;
  SynthWriteOptions options;
  options.seed = seed;
  options.threads = 2;
  options.max_shard_size = max_shard;
  write_synth_model(make_synth_model(spec), out, options);
}

inline std::string read_file_bytes(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Every regular file under `root` (relative path -> bytes).
inline std::map<std::string, std::string> snapshot_tree(const std::filesystem::path& root) {
  std::map<std::string, std::string> files;
  for (const auto& e : std::filesystem::recursive_directory_iterator(root)) {
    if (e.is_regular_file()) files[e.path().lexically_relative(root).string()] = read_file_bytes(e.path());
  }
  return files;
}

// Nothing named `name` or `name.tmp-*` is left in `dir`.
inline bool nothing_left(const std::filesystem::path& dir, const std::string& name) {
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    const std::string f = e.path().filename().string();
    if (f == name || f.rfind(name + ".tmp-", 0) == 0) return false;
  }
  return true;
}

// Float values of a tensor.
inline std::vector<float> tensor_f32(const Component& c, std::string_view name) {
  const auto e = c.find(name);
  REQUIRE_MESSAGE(e.has_value(), "missing tensor ", std::string(name));
  const TensorInfo& t = c.info(*e);
  std::vector<float> out(t.numel());
  convert_to_f32(t.dtype, c.data(*e).data(), out.data(), out.size());
  return out;
}

inline std::string error_message(const std::function<void()>& fn, ErrorKind* kind = nullptr) {
  try {
    fn();
  } catch (const Error& e) {
    if (kind) *kind = e.kind();
    return e.what();
  }
  return "";
}

}  // namespace qtool::test
