// Page hints, output sinks, scratch buffers and the write queue of a conversion (convert_io.hpp).
#include "convert_io.hpp"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>

#include "qtool/formats/error.hpp"

namespace qtool::quant::detail {
namespace {

constexpr uint64_t kCopyChunk = 32ull << 20;            // copied tensors go out in pieces of this size
constexpr uint64_t kPrefetchLimit = 256ull << 20;       // read-ahead hint for the next tensor
constexpr uint64_t kReleaseMargin = uint64_t{1} << 20;  // released around a tensor (fault-around)

uintptr_t page_size() {
  static const uintptr_t size = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  return size;
}

// madvise over the whole pages that `bytes` touches.
void advise_pages(std::span<const uint8_t> bytes, int advice) {
  if (bytes.empty()) return;
  const uintptr_t ps = page_size();
  const uintptr_t begin = reinterpret_cast<uintptr_t>(bytes.data()) & ~(ps - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(bytes.data()) + bytes.size() + ps - 1) & ~(ps - 1);
  ::madvise(reinterpret_cast<void*>(begin), end - begin, advice);
}

// Copies `data` in pieces, releasing each piece once written.
void copy_tensor(Sink& sink, const std::string& name, std::span<const uint8_t> data,
                 const std::function<void(uint64_t)>& advance) {
  for (uint64_t off = 0; off < data.size(); off += kCopyChunk) {
    const uint64_t n = std::min<uint64_t>(kCopyChunk, data.size() - off);
    sink.write(name, data.subspan(off, n), off);
    release_pages(data.subspan(off, n));
    advance(n);
  }
  if (data.empty()) sink.write(name, data, 0);
}

}  // namespace

void release_pages(std::span<const uint8_t> bytes) { advise_pages(bytes, MADV_DONTNEED); }

void release_tensor_pages(const Component& component, const Component::Entry& e) {
  const auto bytes = component.data(e);
  const SafetensorsFile& file = component.shard_of(e);
  const uint8_t* base = bytes.data() - file.file_offset(component.info(e));
  const uint8_t* begin =
      bytes.data() - std::min<uint64_t>(kReleaseMargin, static_cast<uint64_t>(bytes.data() - base));
  const uint8_t* end = bytes.data() + bytes.size();
  end += std::min<uint64_t>(kReleaseMargin, static_cast<uint64_t>(base + file.file_size() - end));
  release_pages(std::span<const uint8_t>(begin, static_cast<size_t>(end - begin)));
}

void prefetch_pages(std::span<const uint8_t> bytes) {
  advise_pages(bytes.subspan(0, std::min<uint64_t>(bytes.size(), kPrefetchLimit)), MADV_WILLNEED);
}

uint8_t* Scratch::get(size_t n) {
  if (n > cap_) {
    buf_.reset();
    buf_.reset(new uint8_t[n]);
    cap_ = n;
  }
  return buf_.get();
}

Sink::Sink(const std::filesystem::path& dir, const std::string& base,
           std::vector<std::vector<TensorDecl>> groups, uint64_t max_shard_size,
           const std::map<std::string, std::string>& metadata) {
  component_ = std::make_unique<ComponentWriter>(dir, base, std::move(groups), max_shard_size, metadata);
}

Sink::Sink(const std::filesystem::path& file, std::vector<std::vector<TensorDecl>> groups,
           const std::map<std::string, std::string>& metadata) {
  std::vector<TensorDecl> decls;
  for (auto& g : groups) {
    for (auto& d : g) decls.push_back(std::move(d));
  }
  file_ = std::make_unique<SafetensorsWriter>(file, std::move(decls), metadata);
}

void Sink::write(std::string_view name, std::span<const uint8_t> bytes, uint64_t offset) {
  if (component_)
    component_->write(name, bytes, offset);
  else
    file_->write(name, bytes, offset);
}

void Sink::commit() {
  if (component_)
    component_->commit();
  else
    file_->commit();
}

size_t Sink::n_shards() const { return component_ ? component_->n_shards() : 1; }

void copy_input_tensor(const Component& component, Component::Entry e, Sink& sink, const std::string& name,
                       std::span<const uint8_t> data, const std::function<void(uint64_t)>& advance) {
  try {
    copy_tensor(sink, name, data, advance);
  } catch (const Error&) {
    component.shard_of(e).check_intact();
    throw;
  }
}

WriteQueue::WriteQueue(size_t max_pending) : max_pending_(max_pending), thread_([this] { loop(); }) {}

WriteQueue::~WriteQueue() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
    jobs_.clear();
  }
  cv_.notify_all();
  thread_.join();
}

void WriteQueue::submit(Batch& batch, std::function<void()> job) {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [&] { return error_ || jobs_.size() < max_pending_; });
  rethrow_locked();
  ++batch.pending;
  ++running_;
  jobs_.push_back({std::move(job), &batch});
  cv_.notify_all();
}

void WriteQueue::wait(const Batch& batch) {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [&] { return error_ || batch.pending == 0; });
  rethrow_locked();
}

void WriteQueue::finish() {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [&] { return error_ || running_ == 0; });
  rethrow_locked();
}

void WriteQueue::rethrow_locked() {
  if (error_) std::rethrow_exception(error_);
}

void WriteQueue::loop() {
  for (;;) {
    Job job;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stop_ || !jobs_.empty(); });
      if (stop_) return;
      job = std::move(jobs_.front());
      jobs_.pop_front();
    }
    std::exception_ptr err;
    try {
      job.fn();
    } catch (...) {
      err = std::current_exception();
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (err && !error_) error_ = err;
      --job.batch->pending;
      --running_;
    }
    cv_.notify_all();
  }
}

}  // namespace qtool::quant::detail
