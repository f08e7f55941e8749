// A read-only memory map of a whole file. Pages are touched only when read.
//
// A file truncated after it was mapped (a download still writing it, another program replacing
// it) makes reading the pages past its new end raise SIGBUS. MappedFile installs a SIGBUS handler
// that maps zeros over such a page of one of its mappings and records the offset, so that the
// reader carries on; check_intact() then turns it into Error(Io) naming the file and the offset.
// Code that reads a mapping calls check_intact() before it trusts (or writes out) what it read.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>

namespace qtool {

class MappedFile {
 public:
  MappedFile() = default;
  // Refuses a file that is not a regular file (Error(InvalidInput)) without blocking on it;
  // Error(Io) naming the path when it cannot be opened or mapped.
  explicit MappedFile(const std::filesystem::path& path);
  ~MappedFile();
  MappedFile(MappedFile&& other) noexcept;
  MappedFile& operator=(MappedFile&& other) noexcept;
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const uint8_t* data() const { return data_; }
  uint64_t size() const { return size_; }
  const std::filesystem::path& path() const { return path_; }

  // Throws Error(Io) "<path>: truncated while being read ..." when the file is now shorter than
  // when it was mapped, or a read past its end was caught (the bytes read there were zeros).
  void check_intact() const;

 private:
  void release() noexcept;

  std::filesystem::path path_;
  const uint8_t* data_ = nullptr;
  uint64_t size_ = 0;
  int fd_ = -1;     // kept open: fstat tells whether the file shrank
  int guard_ = -1;  // this mapping's slot in the SIGBUS handler's table, or -1
};

}  // namespace qtool
