// Contiguous partitions of units over GPUs (the device-map strategies).
#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <numeric>
#include <unordered_map>

#include "planner_impl.hpp"
#include "qtool/formats/checked.hpp"
#include "qtool/formats/error.hpp"
#include "qtool/formats/size.hpp"
#include "qtool/libquant/config.hpp"
#include "qtool/libquant/quant.hpp"

namespace qtool::planner {

// ---- Contiguous partitions ---------------------------------------------------------------------

size_t greedy_fill(const std::vector<uint32_t>& seq, size_t from, const std::vector<uint64_t>& size,
                   const std::vector<size_t>& order, const std::vector<uint64_t>& limit,
                   std::vector<uint64_t>& load, std::vector<int32_t>& gpu_of) {
  size_t i = from;
  for (size_t pos : order) {
    while (i < seq.size() && load[pos] + size[seq[i]] <= limit[pos]) {
      load[pos] += size[seq[i]];
      gpu_of[seq[i]] = static_cast<int32_t>(pos);
      ++i;
    }
    if (i == seq.size()) break;
  }
  return i;
}

namespace {

// Leftover units seq[from..] go first fit to the GPUs in `order`: a GPU skipped by the
// contiguous fill is revisited.
bool revisit(const std::vector<uint32_t>& seq, size_t from, const std::vector<uint64_t>& size,
             const std::vector<size_t>& order, const std::vector<uint64_t>& cap, std::vector<uint64_t>& load,
             std::vector<int32_t>& gpu_of) {
  for (size_t i = from; i < seq.size(); ++i) {
    bool placed = false;
    for (size_t pos : order) {
      if (load[pos] + size[seq[i]] <= cap[pos]) {
        load[pos] += size[seq[i]];
        gpu_of[seq[i]] = static_cast<int32_t>(pos);
        placed = true;
        break;
      }
    }
    if (!placed) return false;
  }
  return true;
}

}  // namespace

bool partition(Strategy strategy, const std::vector<uint32_t>& seq, const std::vector<uint64_t>& size,
               const std::vector<uint64_t>& cap, std::vector<int32_t>& gpu_of) {
  const size_t k = cap.size();
  if (seq.empty()) return true;
  if (k == 0) return false;
  std::vector<size_t> all(k);
  std::iota(all.begin(), all.end(), 0);
  auto run_sequential = [&](const std::vector<size_t>& order) {
    std::vector<uint64_t> load(k, 0);
    const size_t stop = greedy_fill(seq, 0, size, order, cap, load, gpu_of);
    return stop == seq.size() || revisit(seq, stop, size, order, cap, load, gpu_of);
  };
  // The smallest largest-load L for which a contiguous fill of seq[from..] over `order` with
  // limits min(L, cap) covers everything (greedy is optimal for a fixed device order).
  auto balance = [&](const std::vector<size_t>& order, size_t from) -> bool {
    uint64_t rest = 0, big = 0, hi = 0;
    for (size_t i = from; i < seq.size(); ++i) {
      rest += size[seq[i]];
      big = std::max(big, size[seq[i]]);
    }
    if (from == seq.size()) return true;
    for (size_t pos : order) hi = std::max(hi, cap[pos]);
    uint64_t lo = std::max<uint64_t>(big, order.empty() ? 0 : rest / order.size());
    if (lo > hi) return false;
    std::vector<uint64_t> limit(k), load(k);
    std::vector<int32_t> scratch = gpu_of;
    auto fits = [&](uint64_t L) {
      for (size_t pos = 0; pos < k; ++pos) limit[pos] = std::min(L, cap[pos]);
      std::fill(load.begin(), load.end(), 0);
      return greedy_fill(seq, from, size, order, limit, load, scratch) == seq.size();
    };
    if (!fits(hi)) return false;
    while (lo < hi) {
      const uint64_t mid = lo + (hi - lo) / 2;
      if (fits(mid))
        hi = mid;
      else
        lo = mid + 1;
    }
    fits(lo);
    for (size_t i = from; i < seq.size(); ++i) gpu_of[seq[i]] = scratch[seq[i]];
    return true;
  };
  switch (strategy) {
    case Strategy::Sequential: return run_sequential(all);
    case Strategy::Balanced:
    case Strategy::Auto:
      if (balance(all, 0)) return true;
      return run_sequential(all);
    case Strategy::BalancedLow0: {
      if (k == 1) return run_sequential(all);
      const std::vector<size_t> rest(all.begin() + 1, all.end());
      // Shortest prefix for GPU 0 such that the suffix fits contiguously on GPUs 1..k-1
      // (monotone in the prefix length), then the suffix balanced over them.
      auto suffix_fits = [&](size_t p) {
        std::vector<uint64_t> load(k, 0);
        std::vector<int32_t> scratch = gpu_of;
        return greedy_fill(seq, p, size, rest, cap, load, scratch) == seq.size();
      };
      size_t lo = 0, hi = seq.size();
      while (lo < hi) {
        const size_t mid = (lo + hi) / 2;
        if (suffix_fits(mid))
          hi = mid;
        else
          lo = mid + 1;
      }
      uint64_t prefix = 0;
      for (size_t i = 0; i < lo; ++i) prefix += size[seq[i]];
      if (prefix <= cap[0]) {
        for (size_t i = 0; i < lo; ++i) gpu_of[seq[i]] = 0;
        if (balance(rest, lo)) return true;
      }
      std::vector<size_t> order = rest;
      order.push_back(0);
      return run_sequential(order);
    }
  }
  return false;
}

}  // namespace qtool::planner
