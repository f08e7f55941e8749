#include <doctest/doctest.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "formats_test_util.hpp"
#include "qtool/formats/error.hpp"
#include "qtool/formats/thread_pool.hpp"

namespace qtool {
namespace {

// Runs `body` in a child process (its own threads and limits), killed after `seconds`: returns the
// child's exit code, or 128 + the signal that ended it (SIGALRM: it hung).
int in_child(unsigned seconds, const std::function<int()>& body) {
  std::fflush(nullptr);
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    ::alarm(seconds);
    int rc = 99;
    try {
      rc = body();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "child: %s\n", e.what());
      rc = 98;
    } catch (...) {
      rc = 98;
    }
    std::_Exit(rc);
  }
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

// 0 when constructing a pool of `n` threads throws Error(Io) naming the thread it could not start.
int pool_fails_cleanly(size_t n) {
  try {
    ThreadPool pool(n);
    return 1;  // every thread started: the failure was not reached
  } catch (const Error& e) {
    const std::string msg = e.what();
    if (e.kind() != ErrorKind::Io || msg.find("cannot start worker thread") == std::string::npos) return 2;
  }
  // The pool's failure left the process usable: another pool works.
  ::unsetenv("QTOOL_TEST_FAIL_THREAD");
  ThreadPool again(2);
  std::atomic<int> sum{0};
  again.parallel_for(100, 1, [&](size_t b, size_t e) { sum += static_cast<int>(e - b); });
  return sum == 100 ? 0 : 3;
}

TEST_CASE("parallel_for covers every index exactly once") {
  for (size_t threads : {1u, 2u, 3u, 8u}) {
    ThreadPool pool(threads);
    CHECK(pool.size() == threads);
    for (size_t n : {0u, 1u, 2u, 7u, 100u, 1001u}) {
      for (size_t min_chunk : {1u, 3u, 64u, 5000u}) {
        std::vector<std::atomic<int>> hits(n);
        pool.parallel_for(n, min_chunk, [&](size_t b, size_t e) {
          CHECK(b < e);
          for (size_t i = b; i < e; ++i) hits[i].fetch_add(1);
        });
        for (size_t i = 0; i < n; ++i) REQUIRE(hits[i].load() == 1);
      }
    }
  }
}

TEST_CASE("parallel_for uses several threads and respects min_chunk") {
  ThreadPool pool(4);
  std::atomic<int> calls{0};
  pool.parallel_for(100, 30, [&](size_t b, size_t e) {
    calls.fetch_add(1);
    CHECK(e - b >= 30);  // 100 items, chunks of at least 30: 3 chunks
  });
  CHECK(calls.load() == 3);
  calls = 0;
  pool.parallel_for(1000, 1, [&](size_t, size_t) { calls.fetch_add(1); });
  CHECK(calls.load() == 4);  // one chunk per thread
  calls = 0;
  pool.parallel_for(10, 100, [&](size_t b, size_t e) {
    calls.fetch_add(1);
    CHECK(b == 0);
    CHECK(e == 10);
  });
  CHECK(calls.load() == 1);
}

TEST_CASE("parallel_for rethrows the exception of a chunk and stays usable") {
  ThreadPool pool(3);
  CHECK_THROWS_AS(pool.parallel_for(90, 1,
                                    [&](size_t b, size_t) {
                                      if (b > 0) throw Error(ErrorKind::InvalidInput, "bad chunk");
                                    }),
                  Error);
  std::atomic<size_t> sum{0};
  pool.parallel_for(90, 1, [&](size_t b, size_t e) { sum.fetch_add(e - b); });
  CHECK(sum.load() == 90);
}

TEST_CASE("nested parallel_for and calls from several threads do not deadlock") {
  ThreadPool pool(3);
  std::atomic<size_t> total{0};
  pool.parallel_for(6, 1, [&](size_t b, size_t e) {
    for (size_t i = b; i < e; ++i)
      pool.parallel_for(50, 1, [&](size_t b2, size_t e2) { total.fetch_add(e2 - b2); });
  });
  CHECK(total.load() == 300);

  total = 0;
  std::vector<std::thread> callers;
  for (int t = 0; t < 4; ++t)
    callers.emplace_back([&] {
      for (int k = 0; k < 50; ++k)
        pool.parallel_for(64, 1, [&](size_t b, size_t e) { total.fetch_add(e - b); });
    });
  for (auto& t : callers) t.join();
  CHECK(total.load() == 4 * 50 * 64);
}

TEST_CASE("ThreadPool: a thread that cannot be created is a clean error, not a deadlock") {
  // The hook fails the creation of worker k as pthread_create does when the system is out of
  // threads; the workers already started wait on the pool's condition variable. Before, the
  // constructor threw past them: the child hung or aborted.
  for (const char* k : {"1", "2", "5"}) {
    INFO("failing worker ", k);
    const int rc = in_child(20, [&] {
      ::setenv("QTOOL_TEST_FAIL_THREAD", k, 1);
      return pool_fails_cleanly(8);
    });
    CHECK(rc == 0);
  }
#if !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__)
  // The real failure: an address-space limit that leaves room for a few thread stacks only.
  const int rc = in_child(20, [] {
    struct rlimit rl {};
    std::FILE* f = std::fopen("/proc/self/statm", "r");
    unsigned long pages = 0;
    if (!f || std::fscanf(f, "%lu", &pages) != 1) return 97;
    std::fclose(f);
    const rlim_t used = static_cast<rlim_t>(pages) * static_cast<rlim_t>(::sysconf(_SC_PAGESIZE));
    rl.rlim_cur = rl.rlim_max = used + (64u << 20);  // default stacks are 8 MiB: a few fit
    if (::setrlimit(RLIMIT_AS, &rl) != 0) return 96;
    return pool_fails_cleanly(kMaxThreads);
  });
  CHECK(rc == 0);
#endif
}

TEST_CASE("ThreadPool: more than kMaxThreads threads is refused before any starts") {
  test::check_error([] { ThreadPool pool(kMaxThreads + 1); }, ErrorKind::Usage, {"1025", "1024"});
  test::check_error([] { ThreadPool pool(size_t{1} << 40); }, ErrorKind::Usage, {"1024"});
}

}  // namespace
}  // namespace qtool
