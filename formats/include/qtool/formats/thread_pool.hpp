// One pool of worker threads; kernels take row ranges and the pool splits them (STYLE.md).
#pragma once

#include <condition_variable>
#include <cstddef>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace qtool {

// The most threads a pool (and --threads) may have.
inline constexpr size_t kMaxThreads = 1024;

class ThreadPool {
 public:
  // n_threads == 0 means std::thread::hardware_concurrency() (at most kMaxThreads). More than
  // kMaxThreads: Error(Usage). A thread the system cannot start: the ones started are joined and
  // Error(Io) says how many could start.
  explicit ThreadPool(size_t n_threads = 0);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  size_t size() const { return n_threads_; }

  // Splits [0, n) into contiguous ranges of at least `min_chunk` items and calls
  // fn(begin, end) on the workers (the calling thread takes part). Returns when all are done;
  // rethrows the first exception thrown by fn.
  void parallel_for(size_t n, size_t min_chunk, const std::function<void(size_t, size_t)>& fn);

 private:
  void worker_loop();
  void stop_and_join();
  static size_t test_fail_thread();

  size_t n_threads_;
  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable cv_work_;
  std::condition_variable cv_done_;
  std::vector<std::function<void()>> queue_;
  size_t pending_ = 0;
  bool stop_ = false;
};

}  // namespace qtool
