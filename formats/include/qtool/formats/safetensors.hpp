// safetensors files: a validating reader on mmap and a writer that never leaves a half-written
// file under its final name. Format facts: ../../../../shared/FORMATS.md (safetensors).
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "qtool/formats/dtype.hpp"
#include "qtool/formats/mapped_file.hpp"

namespace qtool {

inline constexpr uint64_t kMaxHeaderSize = 100'000'000;

struct TensorInfo {
  std::string name;
  DType dtype = DType::U8;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // [begin, end) relative to the data buffer (file offset data_offset())
  uint64_t end = 0;

  uint64_t numel() const;
  uint64_t nbytes() const { return end - begin; }
};

// The parsed, validated header of one file.
struct SafetensorsHeader {
  uint64_t header_size = 0;         // N: the JSON length
  std::vector<TensorInfo> tensors;  // in data order (ascending begin)
  std::map<std::string, std::string> metadata;
  uint64_t data_offset() const { return 8 + header_size; }
  uint64_t data_size() const;  // sum of tensor sizes == file size - data_offset()
};

// Validates and parses a header. `head` holds at least the first min(file_size, 8 + N) bytes of
// the file; `file_size` is the whole file's size; `label` names the file in error messages.
// Performs every check of FORMATS.md before any tensor data is looked at; throws
// Error(InvalidInput) naming the file, the tensor and the byte offset, or Error(Unsupported)
// for a known dtype qtool does not handle.
SafetensorsHeader parse_safetensors_header(std::span<const uint8_t> head, uint64_t file_size,
                                           std::string_view label);

class SafetensorsFile {
 public:
  // Maps and validates the file. Reads only the header's pages.
  static SafetensorsFile open(const std::filesystem::path& path);

  const std::filesystem::path& path() const { return file_.path(); }
  uint64_t file_size() const { return file_.size(); }
  const SafetensorsHeader& header() const { return header_; }
  const std::vector<TensorInfo>& tensors() const { return header_.tensors; }
  const std::map<std::string, std::string>& metadata() const { return header_.metadata; }
  const TensorInfo* find(std::string_view name) const;  // nullptr when absent
  const TensorInfo& at(std::string_view name) const;    // throws Error(InvalidInput)

  // The tensor's bytes inside the map (touching them faults the pages in).
  std::span<const uint8_t> data(const TensorInfo& t) const;
  uint64_t file_offset(const TensorInfo& t) const { return header_.data_offset() + t.begin; }
  // Error(Io) when the file was truncated while its data was being read (MappedFile::check_intact).
  void check_intact() const { file_.check_intact(); }

 private:
  MappedFile file_;
  SafetensorsHeader header_;
  std::unordered_map<std::string_view, size_t> by_name_;
};

// One tensor to be written: name, dtype, shape. Its byte size follows from them.
// `variable_length`: a 1-D U8 tensor (a JSON blob) whose length is known only when it is written:
// shape[0] is the most bytes it may take; it is written once, whole, and the file records the
// length written (see SafetensorsWriter).
struct TensorDecl {
  std::string name;
  DType dtype = DType::U8;
  std::vector<int64_t> shape;
  bool variable_length = false;
  uint64_t nbytes() const;
};

// Writes one safetensors file. The header is computed first from all declarations (tensors in
// descending dtype size, then declaration order; header padded with spaces to a multiple of 8;
// `__metadata__` with "format": "pt" plus `metadata`). Data goes to a temporary sibling
// `<path>.tmp-<pid>`; commit() makes it durable and renames it into place. Without commit()
// the temporary file is removed. Tensors may be written in any order and in pieces.
// Variable-length tensors go after all others, in declaration order; each is written once, whole
// (offset 0, at most its declared bytes), and kept in memory until commit(), which lays them out
// at their written lengths, rewrites the header in the space reserved for the declared lengths
// (padded with spaces, which the format allows) and truncates the file.
class SafetensorsWriter {
 public:
  SafetensorsWriter(std::filesystem::path path, std::vector<TensorDecl> decls,
                    std::map<std::string, std::string> metadata = {});
  ~SafetensorsWriter();
  SafetensorsWriter(const SafetensorsWriter&) = delete;
  SafetensorsWriter& operator=(const SafetensorsWriter&) = delete;

  // Writes `bytes` at byte `offset` within tensor `name`. Thread-safe (pwrite).
  void write(std::string_view name, std::span<const uint8_t> bytes, uint64_t offset = 0);
  void commit();  // checks every byte of every tensor was written once, fsyncs, renames

  const std::filesystem::path& path() const { return path_; }
  // The file's size; before commit() with variable-length tensors at their declared lengths.
  uint64_t file_size() const { return file_size_; }
  // Bytes of tensor data (file size less header), likewise.
  uint64_t data_bytes() const { return file_size_ - 8 - header_size_; }

 private:
  struct Slot {
    uint64_t file_offset = 0;
    uint64_t nbytes = 0;
    uint64_t written = 0;
    bool variable = false;
    std::vector<uint8_t> data;  // variable-length: the bytes written, laid out at commit()
  };
  std::string render_header(const std::vector<uint64_t>& nbytes) const;
  void lay_out_variable_tensors();
  std::filesystem::path path_;
  std::filesystem::path tmp_path_;
  int fd_ = -1;
  uint64_t file_size_ = 0;
  uint64_t header_size_ = 0;            // reserved header bytes after the length (a multiple of 8)
  std::string metadata_json_;           // "__metadata__" object
  std::vector<TensorDecl> file_order_;  // declarations in file order (variable-length ones last)
  std::unordered_map<std::string, Slot> slots_;
  std::unique_ptr<std::mutex> mu_;
  bool committed_ = false;
};

}  // namespace qtool
