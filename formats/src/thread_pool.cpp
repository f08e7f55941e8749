#include "qtool/formats/thread_pool.hpp"

#include <algorithm>
#include <exception>

namespace qtool {

ThreadPool::ThreadPool(size_t n_threads) {
  n_threads_ = n_threads ? n_threads : std::max(1u, std::thread::hardware_concurrency());
  // The calling thread is one of the workers.
  for (size_t i = 1; i < n_threads_; ++i) workers_.emplace_back([this] { worker_loop(); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_work_.notify_all();
  for (auto& t : workers_) t.join();
}

void ThreadPool::worker_loop() {
  for (;;) {
    std::function<void()> job;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_work_.wait(lock, [&] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;
      job = std::move(queue_.back());
      queue_.pop_back();
    }
    job();
    {
      std::lock_guard<std::mutex> lock(mu_);
      --pending_;
    }
    cv_done_.notify_all();
  }
}

void ThreadPool::parallel_for(size_t n, size_t min_chunk, const std::function<void(size_t, size_t)>& fn) {
  if (n == 0) return;
  min_chunk = std::max<size_t>(1, min_chunk);
  const size_t n_chunks = std::min(n_threads_, (n + min_chunk - 1) / min_chunk);
  if (n_chunks <= 1) {
    fn(0, n);
    return;
  }
  std::exception_ptr first_error;
  std::mutex err_mu;
  auto run = [&](size_t c) {
    const size_t begin = n * c / n_chunks, end = n * (c + 1) / n_chunks;
    try {
      fn(begin, end);
    } catch (...) {
      std::lock_guard<std::mutex> lock(err_mu);
      if (!first_error) first_error = std::current_exception();
    }
  };
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (size_t c = 1; c < n_chunks; ++c) queue_.emplace_back([&run, c] { run(c); });
    pending_ += n_chunks - 1;
  }
  cv_work_.notify_all();
  run(0);
  // Help drain the queue (nested use from a worker must not deadlock), then wait.
  for (;;) {
    std::function<void()> job;
    {
      std::unique_lock<std::mutex> lock(mu_);
      if (queue_.empty()) {
        cv_done_.wait(lock, [&] { return pending_ == 0 || !queue_.empty(); });
        if (pending_ == 0) break;
        if (queue_.empty()) continue;
      }
      job = std::move(queue_.back());
      queue_.pop_back();
    }
    job();
    {
      std::lock_guard<std::mutex> lock(mu_);
      --pending_;
    }
    cv_done_.notify_all();
  }
  if (first_error) std::rethrow_exception(first_error);
}

}  // namespace qtool
