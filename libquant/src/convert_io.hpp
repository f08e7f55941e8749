// The I/O pieces of a conversion: page-cache hints for the mapped input, the output sink of one
// component, reusable scratch buffers and the queue that writes while the next tensor converts.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "qtool/formats/checkpoint.hpp"
#include "qtool/formats/safetensors.hpp"

namespace qtool::quant::detail {

// Drops the pages of a read range of the (read-only, shared) input mapping from this process:
// the page cache keeps them, only our resident set shrinks. A page shared with a neighbouring
// tensor is simply faulted in again if it is read later.
void release_pages(std::span<const uint8_t> bytes);

// After a whole tensor: its pages and those within a margin around it, clamped to its file's
// mapping. A page fault maps neighbouring pages too (fault-around), so reading one tensor maps a
// little of the tensors beside it, which may already have been released.
void release_tensor_pages(const Component& component, const Component::Entry& e);

// Asks the kernel to start reading a range we will need soon (cold page cache).
void prefetch_pages(std::span<const uint8_t> bytes);

// A reusable scratch buffer: grown when needed, never shrunk, so that the pages of one tensor's
// output are reused by the next instead of being mapped and zeroed again.
class Scratch {
 public:
  uint8_t* get(size_t n);

 private:
  std::unique_ptr<uint8_t[]> buf_;
  size_t cap_ = 0;
};

// Writes one component: a sharded folder (ComponentWriter) or a single file.
class Sink {
 public:
  Sink(const std::filesystem::path& dir, const std::string& base, std::vector<std::vector<TensorDecl>> groups,
       uint64_t max_shard_size, const std::map<std::string, std::string>& metadata);
  Sink(const std::filesystem::path& file, std::vector<std::vector<TensorDecl>> groups,
       const std::map<std::string, std::string>& metadata);
  void write(std::string_view name, std::span<const uint8_t> bytes, uint64_t offset = 0);
  void commit();
  size_t n_shards() const;

 private:
  std::unique_ptr<ComponentWriter> component_;
  std::unique_ptr<SafetensorsWriter> file_;
};

// Copies an input tensor from the mapping in pieces, releasing each piece once written; `advance`
// gets each piece's size. The kernel reads mapped pages past a truncated file's end as EFAULT (the
// write fails naming the output): the input shrinking under us is then the error reported.
void copy_input_tensor(const Component& component, Component::Entry e, Sink& sink, const std::string& name,
                       std::span<const uint8_t> data, const std::function<void(uint64_t)>& advance);

// Write jobs run on a thread of their own, so that the next tensor is converted while earlier ones
// are written. One thread: writes into one file serialise on its inode lock, and a second writer
// only spun on it (10% of the cycles of an int8 run). A Batch counts its unfinished jobs. At most
// `max_pending` jobs wait; a failed job's error is rethrown to the caller.
class WriteQueue {
 public:
  struct Batch {
    size_t pending = 0;  // guarded by the queue's mutex
  };

  explicit WriteQueue(size_t max_pending);
  ~WriteQueue();
  WriteQueue(const WriteQueue&) = delete;
  WriteQueue& operator=(const WriteQueue&) = delete;

  void submit(Batch& batch, std::function<void()> job);
  void wait(const Batch& batch);  // until the batch's jobs are done
  void finish();                  // until every job is done

 private:
  struct Job {
    std::function<void()> fn;
    Batch* batch;
  };
  void rethrow_locked();
  void loop();

  size_t max_pending_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Job> jobs_;
  size_t running_ = 0;  // submitted and not finished
  std::exception_ptr error_;
  bool stop_ = false;
  std::thread thread_;  // last: starts once the members it uses exist
};

}  // namespace qtool::quant::detail
