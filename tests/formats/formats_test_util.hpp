// Helpers for the formats tests: temporary folders, raw safetensors bytes built in memory (for the
// malformed-input cases), a printed random seed, and error checks.
#pragma once

#include <doctest/doctest.h>
#include <stdlib.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <initializer_list>
#include <optional>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "qtool/formats/error.hpp"

namespace qtool::test {

// A fresh folder under the system temp dir, removed with everything in it at scope exit.
class TempDir {
 public:
  TempDir() {
    std::string tmpl = (std::filesystem::temp_directory_path() / "qtool-test-XXXXXX").string();
    if (!::mkdtemp(tmpl.data())) throw std::runtime_error("mkdtemp failed");
    path_ = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::filesystem::path& path() const { return path_; }
  std::filesystem::path operator/(const std::string& name) const { return path_ / name; }

 private:
  std::filesystem::path path_;
};

// The seed of a test's random data: QTOOL_TEST_SEED if set, else from the clock; always printed
// so that a failure can be replayed.
inline uint64_t test_seed(const char* what) {
  uint64_t seed;
  if (const char* env = std::getenv("QTOOL_TEST_SEED"))
    seed = std::strtoull(env, nullptr, 10);
  else
    seed = static_cast<uint64_t>(std::random_device{}()) ^ (static_cast<uint64_t>(::getpid()) << 20);
  std::fprintf(stderr, "[%s] QTOOL_TEST_SEED=%llu\n", what, static_cast<unsigned long long>(seed));
  return seed;
}

// One header entry: "name":{"dtype":...,"shape":[...],"data_offsets":[b,e]}.
inline std::string st_entry(std::string_view name, std::string_view dtype, std::string_view shape,
                            uint64_t begin, uint64_t end) {
  return "\"" + std::string(name) + "\":{\"dtype\":\"" + std::string(dtype) +
         "\",\"shape\":" + std::string(shape) + ",\"data_offsets\":[" + std::to_string(begin) + "," +
         std::to_string(end) + "]}";
}

// "{" + entries joined by "," + "}".
inline std::string st_header(std::initializer_list<std::string> entries) {
  std::string h = "{";
  bool first = true;
  for (const auto& e : entries) {
    h += (first ? "" : ",") + e;
    first = false;
  }
  return h + "}";
}

// A raw file: the 8-byte little-endian length (the header's, unless `length_field` overrides it),
// the header text, then `data_bytes` bytes of a counting pattern.
inline std::vector<uint8_t> st_bytes(std::string_view header, uint64_t data_bytes,
                                     std::optional<uint64_t> length_field = std::nullopt) {
  const uint64_t n = length_field ? *length_field : header.size();
  std::vector<uint8_t> out;
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<uint8_t>(n >> (8 * i)));
  out.insert(out.end(), header.begin(), header.end());
  for (uint64_t i = 0; i < data_bytes; ++i) out.push_back(static_cast<uint8_t>(i * 7 + 1));
  return out;
}

inline void write_file(const std::filesystem::path& path, const void* data, size_t n) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(static_cast<const char*>(data), static_cast<std::streamsize>(n));
  REQUIRE(out.good());
}
inline void write_file(const std::filesystem::path& path, const std::vector<uint8_t>& bytes) {
  write_file(path, bytes.data(), bytes.size());
}
inline void write_file(const std::filesystem::path& path, std::string_view text) {
  write_file(path, text.data(), text.size());
}

inline std::vector<uint8_t> read_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(in), {});
}

// Runs `fn`, which must throw qtool::Error of `kind` whose message contains every needle.
inline void check_error(const std::function<void()>& fn, ErrorKind kind,
                        std::initializer_list<std::string> needles) {
  bool threw = false;
  try {
    fn();
  } catch (const Error& e) {
    threw = true;
    const std::string msg = e.what();
    INFO("message: ", msg);
    CHECK_MESSAGE(e.kind() == kind, "kind was ", error_kind_name(e.kind()), ", expected ",
                  error_kind_name(kind));
    for (const auto& needle : needles)
      CHECK_MESSAGE(msg.find(needle) != std::string::npos, "missing '", needle, "'");
  }
  CHECK_MESSAGE(threw, "no qtool::Error was thrown");
}

}  // namespace qtool::test
