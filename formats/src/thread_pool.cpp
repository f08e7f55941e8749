#include "qtool/formats/thread_pool.hpp"

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <exception>
#include <system_error>

#include "qtool/formats/error.hpp"

namespace qtool {

ThreadPool::ThreadPool(size_t n_threads) {
  if (n_threads > kMaxThreads)
    fail(ErrorKind::Usage, "a pool of ", n_threads, " threads is more than the ", kMaxThreads, " allowed");
  n_threads_ =
      n_threads ? n_threads : std::clamp<size_t>(std::thread::hardware_concurrency(), 1, kMaxThreads);
  // The calling thread is one of the workers.
  workers_.reserve(n_threads_ - 1);
  for (size_t i = 1; i < n_threads_; ++i) {
    try {
      if (i == test_fail_thread()) throw std::system_error(EAGAIN, std::generic_category(), "test hook");
      workers_.emplace_back([this] { worker_loop(); });
    } catch (const std::system_error& e) {
      // The workers started wait on cv_work_: stop and join them before the members go.
      stop_and_join();
      fail(ErrorKind::Io, "cannot start worker thread ", i + 1, " of ", n_threads_, ": ", e.what(),
           " (use fewer threads, e.g. --threads ", i, ")");
    } catch (...) {
      stop_and_join();
      throw;
    }
  }
}

ThreadPool::~ThreadPool() { stop_and_join(); }

void ThreadPool::stop_and_join() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_work_.notify_all();
  for (auto& t : workers_) t.join();
  workers_.clear();
}

size_t ThreadPool::test_fail_thread() {
  // QTOOL_TEST_FAIL_THREAD=N: creating worker N (1-based, the caller being 0) fails as when the
  // system is out of threads, so that tests reach the cleanup path without exhausting the machine.
  const char* v = std::getenv("QTOOL_TEST_FAIL_THREAD");
  return v && *v ? static_cast<size_t>(std::strtoull(v, nullptr, 10)) : size_t{0};
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
    job();  // the job itself reports completion to its batch
  }
}

void ThreadPool::parallel_for(size_t n, size_t min_chunk, const std::function<void(size_t, size_t)>& fn) {
  if (n == 0) return;
  min_chunk = std::max<size_t>(1, min_chunk);
  // Every chunk gets at least min_chunk items (the header's promise), so n / min_chunk at most.
  const size_t n_chunks = std::min(n_threads_, std::max<size_t>(1, n / min_chunk));
  if (n_chunks <= 1) {
    fn(0, n);
    return;
  }
  // Each call counts its own chunks: a caller waits for its batch only, so that a parallel_for
  // nested inside a job, or calls from several threads at once, cannot wait on each other.
  std::exception_ptr first_error;
  size_t remaining = n_chunks - 1;  // chunks handed to the queue; guarded by mu_
  auto run = [&](size_t c) {
    const size_t begin = n * c / n_chunks, end = n * (c + 1) / n_chunks;
    try {
      fn(begin, end);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mu_);
      if (!first_error) first_error = std::current_exception();
    }
  };
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (size_t c = 1; c < n_chunks; ++c) {
      queue_.emplace_back([this, &run, &remaining, c] {
        run(c);
        {
          std::lock_guard<std::mutex> lock(mu_);
          --remaining;
          --pending_;
        }
        cv_done_.notify_all();
      });
    }
    pending_ += n_chunks - 1;
  }
  cv_work_.notify_all();
  cv_done_.notify_all();  // callers waiting for their own chunks may help with these
  run(0);
  // Help with queued work (ours or anyone's) until our chunks are done.
  for (;;) {
    std::function<void()> job;
    {
      std::unique_lock<std::mutex> lock(mu_);
      if (remaining == 0) break;
      if (queue_.empty()) {
        cv_done_.wait(lock, [&] { return remaining == 0 || !queue_.empty(); });
        continue;
      }
      job = std::move(queue_.back());
      queue_.pop_back();
    }
    job();
  }
  if (first_error) std::rethrow_exception(first_error);
}

}  // namespace qtool
