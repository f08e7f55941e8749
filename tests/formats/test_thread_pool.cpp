#include <doctest/doctest.h>

#include <atomic>
#include <stdexcept>
#include <thread>
#include <vector>

#include "qtool/formats/error.hpp"
#include "qtool/formats/thread_pool.hpp"

namespace qtool {
namespace {

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

}  // namespace
}  // namespace qtool
