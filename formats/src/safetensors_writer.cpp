// The safetensors writer: the header is laid out first from the declarations, then tensor bytes
// arrive in any order and in pieces (pwrite), from any thread. The file lives under a temporary
// sibling name until commit() has checked that every byte was written, fsynced it and renamed it.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <nlohmann/json.hpp>
#include <numeric>
#include <string>
#include <unordered_set>

#include "qtool/formats/error.hpp"
#include "qtool/formats/safetensors.hpp"

namespace qtool {
namespace {

// pwrite() all of `n` bytes at `offset`, retrying short writes and EINTR.
void pwrite_all(int fd, const uint8_t* p, uint64_t n, uint64_t offset, const std::filesystem::path& path) {
  while (n > 0) {
    const size_t chunk = static_cast<size_t>(std::min<uint64_t>(n, 1ull << 30));
    const ssize_t w = ::pwrite(fd, p, chunk, static_cast<off_t>(offset));
    if (w < 0) {
      if (errno == EINTR) continue;
      fail(ErrorKind::Io, path.string(), ": cannot write ", chunk, " bytes at file offset ", offset, ": ",
           std::strerror(errno));
    }
    if (w == 0) fail(ErrorKind::Io, path.string(), ": write returned 0 at file offset ", offset);
    p += w;
    n -= static_cast<uint64_t>(w);
    offset += static_cast<uint64_t>(w);
  }
}

// Makes a rename inside `dir` durable.
void fsync_dir(const std::filesystem::path& dir) {
  const int fd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return;  // best effort: some file systems do not allow opening directories
  ::fsync(fd);
  ::close(fd);
}

std::string json_string(const std::string& s) { return nlohmann::json(s).dump(); }

}  // namespace

uint64_t TensorDecl::nbytes() const {
  uint64_t n = dtype_size(dtype);
  for (int64_t d : shape) {
    QTOOL_ASSERT_MSG(d >= 0, "tensor '", name, "': negative dimension ", d);
    n *= static_cast<uint64_t>(d);
  }
  return n;
}

SafetensorsWriter::SafetensorsWriter(std::filesystem::path path, std::vector<TensorDecl> decls,
                                     std::map<std::string, std::string> metadata)
    : path_(std::move(path)), mu_(std::make_unique<std::mutex>()) {
  tmp_path_ = path_;
  tmp_path_ += ".tmp-" + std::to_string(::getpid());

  std::unordered_set<std::string_view> seen;
  for (const TensorDecl& d : decls) {
    if (d.name == "__metadata__")
      fail(ErrorKind::InvalidInput, path_.string(), ": tensor name '__metadata__' is reserved");
    if (!seen.insert(d.name).second)
      fail(ErrorKind::InvalidInput, path_.string(), ": tensor '", d.name, "' declared twice");
    for (int64_t dim : d.shape)
      if (dim < 0)
        fail(ErrorKind::InvalidInput, path_.string(), ": tensor '", d.name, "': negative dimension ", dim);
  }

  for (const TensorDecl& d : decls)
    QTOOL_ASSERT_MSG(!d.variable_length || (d.dtype == DType::U8 && d.shape.size() == 1), "tensor '", d.name,
                     "': a variable-length tensor is 1-D U8");

  // Larger elements first, so that every tensor starts at a multiple of its element size;
  // variable-length tensors last, so that their lengths move nothing else.
  std::vector<size_t> order(decls.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    if (decls[a].variable_length != decls[b].variable_length) return !decls[a].variable_length;
    return dtype_size(decls[a].dtype) > dtype_size(decls[b].dtype);
  });

  metadata["format"] = "pt";
  metadata_json_ = "{\"__metadata__\":{";
  bool first = true;
  for (const auto& [k, v] : metadata) {
    metadata_json_ += (first ? "" : ",") + json_string(k) + ":" + json_string(v);
    first = false;
  }
  metadata_json_ += "}";
  std::vector<uint64_t> nbytes;
  for (size_t i : order) {
    file_order_.push_back(decls[i]);
    nbytes.push_back(decls[i].nbytes());
  }
  // The header at the declared lengths: at commit() the written ones are no longer, so the header
  // then fits in this space.
  std::string header = render_header(nbytes);
  header.append((8 - header.size() % 8) % 8, ' ');
  if (header.size() > kMaxHeaderSize)
    fail(ErrorKind::InvalidInput, path_.string(), ": header of ", header.size(), " bytes for ", decls.size(),
         " tensors exceeds the safetensors limit of ", kMaxHeaderSize);
  header_size_ = header.size();

  const uint64_t data_offset = 8 + header.size();
  uint64_t offset = 0;
  slots_.reserve(decls.size());
  for (size_t k = 0; k < file_order_.size(); ++k) {
    Slot slot;
    slot.file_offset = data_offset + offset;
    slot.nbytes = nbytes[k];
    slot.variable = file_order_[k].variable_length;
    slots_.emplace(file_order_[k].name, std::move(slot));
    offset += nbytes[k];
  }
  file_size_ = data_offset + offset;

  fd_ = ::open(tmp_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd_ < 0) fail(ErrorKind::Io, tmp_path_.string(), ": cannot create: ", std::strerror(errno));
  try {
    if (::ftruncate(fd_, static_cast<off_t>(file_size_)) != 0)
      fail(ErrorKind::Io, tmp_path_.string(), ": cannot size to ", file_size_,
           " bytes: ", std::strerror(errno));
    uint8_t len[8];
    for (int i = 0; i < 8; ++i)
      len[i] = static_cast<uint8_t>(static_cast<uint64_t>(header.size()) >> (8 * i));
    pwrite_all(fd_, len, 8, 0, tmp_path_);
    pwrite_all(fd_, reinterpret_cast<const uint8_t*>(header.data()), header.size(), 8, tmp_path_);
  } catch (...) {
    ::close(fd_);
    ::unlink(tmp_path_.c_str());
    throw;
  }
}

// `{"__metadata__":{...},"name":{"dtype":..,"shape":[..],"data_offsets":[b,e]},...}` for the
// tensors in file order with `nbytes` each (a variable-length tensor's shape is its length).
std::string SafetensorsWriter::render_header(const std::vector<uint64_t>& nbytes) const {
  std::string header = metadata_json_;
  uint64_t offset = 0;
  for (size_t k = 0; k < file_order_.size(); ++k) {
    const TensorDecl& d = file_order_[k];
    header +=
        "," + json_string(d.name) + ":{\"dtype\":\"" + std::string(dtype_name(d.dtype)) + "\",\"shape\":[";
    if (d.variable_length) {
      header += std::to_string(nbytes[k]);
    } else {
      for (size_t i = 0; i < d.shape.size(); ++i) header += (i ? "," : "") + std::to_string(d.shape[i]);
    }
    header +=
        "],\"data_offsets\":[" + std::to_string(offset) + "," + std::to_string(offset + nbytes[k]) + "]}";
    offset += nbytes[k];
  }
  return header + "}";
}

SafetensorsWriter::~SafetensorsWriter() {
  if (fd_ >= 0) ::close(fd_);
  if (!committed_) ::unlink(tmp_path_.c_str());
}

void SafetensorsWriter::write(std::string_view name, std::span<const uint8_t> bytes, uint64_t offset) {
  const auto it = slots_.find(std::string(name));
  if (it == slots_.end()) fail(ErrorKind::Internal, path_.string(), ": tensor '", name, "' was not declared");
  Slot& slot = it->second;
  if (offset > slot.nbytes || bytes.size() > slot.nbytes - offset)
    fail(ErrorKind::Internal, path_.string(), ": tensor '", name, "': write of ", bytes.size(),
         " bytes at offset ", offset, " exceeds its ", slot.nbytes, " bytes");
  if (slot.variable) {
    std::lock_guard<std::mutex> lock(*mu_);
    if (committed_ || fd_ < 0) fail(ErrorKind::Internal, path_.string(), ": write after commit");
    if (offset != 0 || slot.written != 0)
      fail(ErrorKind::Internal, path_.string(), ": variable-length tensor '", name,
           "' is written once, whole");
    slot.data.assign(bytes.begin(), bytes.end());
    slot.written = slot.nbytes;
    return;
  }
  {
    std::lock_guard<std::mutex> lock(*mu_);
    if (committed_ || fd_ < 0) fail(ErrorKind::Internal, path_.string(), ": write after commit");
    if (slot.written + bytes.size() > slot.nbytes)
      fail(ErrorKind::Internal, path_.string(), ": tensor '", name, "': more than its ", slot.nbytes,
           " bytes written");
    slot.written += bytes.size();
  }
  pwrite_all(fd_, bytes.data(), bytes.size(), slot.file_offset + offset, tmp_path_);
}

// Variable-length tensors at their written lengths: their data after the fixed tensors, the
// header rewritten (padded with spaces to the reserved size) and the file cut to its new end.
void SafetensorsWriter::lay_out_variable_tensors() {
  bool any = false;
  std::vector<uint64_t> nbytes;
  for (const TensorDecl& d : file_order_) {
    const Slot& slot = slots_.at(d.name);
    nbytes.push_back(slot.variable ? slot.data.size() : slot.nbytes);
    any = any || slot.variable;
  }
  if (!any) return;
  std::string header = render_header(nbytes);
  QTOOL_ASSERT(header.size() <= header_size_);
  header.append(header_size_ - header.size(), ' ');
  pwrite_all(fd_, reinterpret_cast<const uint8_t*>(header.data()), header.size(), 8, tmp_path_);
  uint64_t offset = 8 + header_size_;
  for (size_t k = 0; k < file_order_.size(); ++k) {
    Slot& slot = slots_.at(file_order_[k].name);
    if (slot.variable) {
      slot.file_offset = offset;
      pwrite_all(fd_, slot.data.data(), slot.data.size(), offset, tmp_path_);
    }
    offset += nbytes[k];
  }
  if (::ftruncate(fd_, static_cast<off_t>(offset)) != 0)
    fail(ErrorKind::Io, tmp_path_.string(), ": cannot cut to ", offset, " bytes: ", std::strerror(errno));
  file_size_ = offset;
}

void SafetensorsWriter::commit() {
  std::lock_guard<std::mutex> lock(*mu_);
  if (committed_) return;
  for (const auto& [name, slot] : slots_)
    if (slot.written != slot.nbytes)
      fail(ErrorKind::Internal, path_.string(), ": tensor '", name, "': only ", slot.written, " of ",
           slot.nbytes, " bytes written (file offset ", slot.file_offset, ")");
  lay_out_variable_tensors();
  if (::fsync(fd_) != 0) fail(ErrorKind::Io, tmp_path_.string(), ": fsync failed: ", std::strerror(errno));
  if (::close(fd_) != 0) {
    fd_ = -1;
    fail(ErrorKind::Io, tmp_path_.string(), ": close failed: ", std::strerror(errno));
  }
  fd_ = -1;
  if (::rename(tmp_path_.c_str(), path_.c_str()) != 0)
    fail(ErrorKind::Io, tmp_path_.string(), ": cannot rename to ", path_.string(), ": ",
         std::strerror(errno));
  committed_ = true;
  fsync_dir(path_.parent_path());
}

}  // namespace qtool
