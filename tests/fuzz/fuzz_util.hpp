// What the file-reading fuzz targets share: a scratch folder on tmpfs (one per process, removed at
// exit) that inputs are written into, the split of one fuzz input into several files, and the
// rule every target checks: bad input ends in a qtool::Error of a bad-input kind (exit 2) whose
// message names the file or folder it was read from; anything else (another exception, a crash,
// a sanitizer report, an Internal error, a hang) is a bug.
#pragma once

#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "qtool/formats/error.hpp"

namespace qtool::fuzz {

// The folder the inputs are written into: /dev/shm (tmpfs) when it exists, else the temp folder;
// unique per process, so that parallel fuzzer jobs do not share files.
inline const std::filesystem::path& scratch_root() {
  static const std::filesystem::path root = [] {
    std::error_code ec;
    std::filesystem::path base = "/dev/shm";
    if (!std::filesystem::is_directory(base, ec)) base = std::filesystem::temp_directory_path();
    std::filesystem::path p = base / ("qtool-fuzz-" + std::to_string(::getpid()));
    std::filesystem::remove_all(p, ec);
    std::filesystem::create_directories(p);
    std::atexit([] {
      std::error_code ec2;
      std::filesystem::remove_all(scratch_root(), ec2);
    });
    return p;
  }();
  return root;
}

// An empty folder `name` inside the scratch root (what an earlier input left there is removed).
inline std::filesystem::path fresh_dir(const std::string& name) {
  const std::filesystem::path dir = scratch_root() / name;
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
  std::filesystem::create_directories(dir);
  return dir;
}

inline void write_file(const std::filesystem::path& path, std::span<const uint8_t> bytes) {
  std::filesystem::create_directories(path.parent_path());
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  QTOOL_ASSERT_MSG(static_cast<bool>(out), "cannot write the fuzz input to ", path.string());
}

// The separator between the files of one multi-file fuzz input (also in the dictionaries).
inline constexpr std::string_view kFileSeparator = "\n@@file@@\n";

// Splits `data` at every kFileSeparator: section i is the bytes between separator i - 1 and i.
inline std::vector<std::span<const uint8_t>> split_sections(std::span<const uint8_t> data) {
  std::vector<std::span<const uint8_t>> out;
  const std::string_view text(reinterpret_cast<const char*>(data.data()), data.size());
  size_t begin = 0;
  for (;;) {
    const size_t pos = text.find(kFileSeparator, begin);
    if (pos == std::string_view::npos) break;
    out.push_back(data.subspan(begin, pos - begin));
    begin = pos + kFileSeparator.size();
  }
  out.push_back(data.subspan(begin));
  return out;
}

// The rule for a qtool::Error thrown while reading fuzzed files: a bad-input kind (exit 2, not
// Internal and not a failed check) and a message that names one of `named` (the file, the folder
// holding the files, or the option or item it came from), so that the user knows what is wrong.
inline void check_bad_input_error(const Error& e, std::initializer_list<std::string_view> named) {
  const std::string msg = e.what();
  QTOOL_ASSERT_MSG(e.kind() == ErrorKind::InvalidInput || e.kind() == ErrorKind::Unsupported ||
                       e.kind() == ErrorKind::Io || e.kind() == ErrorKind::Usage,
                   "unexpected error kind ", error_kind_name(e.kind()), ": ", msg);
  bool names = false;
  for (std::string_view n : named) names = names || msg.find(n) != std::string::npos;
  QTOOL_ASSERT_MSG(names, "the message does not name ", *named.begin(), ": ", msg);
}

}  // namespace qtool::fuzz
