// The search over candidates, and the errors when none fits.
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

using namespace detail;

[[noreturn]] void Planner::infeasible_gpu() {
  // The smallest budget for the GPU with the largest budget (the others as given) that admits a
  // plan, by binary search over the planner itself (host memory taken as unlimited here).
  size_t best = 0;
  for (size_t pos = 1; pos < gpu_budget_.size(); ++pos) {
    if (gpu_budget_[pos] > gpu_budget_[best]) best = pos;
  }
  const uint64_t have = gpu_budget_[best];
  const uint64_t saved_host = host_budget_;
  host_budget_ = kUnlimited;
  uint64_t lo = have, hi = std::max<uint64_t>(have, 1);
  bool found = false;
  for (int i = 0; i < 48 && !found; ++i) {
    hi = hi > kUnlimited / 2 ? kUnlimited : hi * 2;
    gpu_budget_[best] = hi;
    found = search().best.ok;
  }
  if (!found) {
    fail(ErrorKind::InvalidInput, "--max-memory: no GPU budget admits a plan for this checkpoint");
  }
  while (lo + 1 < hi) {
    const uint64_t mid = lo + (hi - lo) / 2;
    gpu_budget_[best] = mid;
    if (search().best.ok)
      hi = mid;
    else
      lo = mid;
  }
  gpu_budget_[best] = hi;
  const Outcome o = search().best;
  host_budget_ = saved_host;
  std::string parts;
  const std::vector<ReserveItem> items = gpu_reserve(opt_.profile, o.work[best]);
  for (const ReserveItem& r : items) parts += str_cat(", ", r.name, " ", r.bytes);
  uint64_t resident = 0;
  for (uint32_t id = 0; id < units_.size(); ++id) {
    if (o.gpu_of[id] == static_cast<int32_t>(best) && units_[id].follow < 0) resident += arena_[id];
  }
  const uint64_t off = opt_.reported_budget_offset;
  if (off) parts += str_cat(", held back for the other phases ", off);
  fail(ErrorKind::InvalidInput, "--max-memory: GPU ", gpu_index_[best], " has ", have + off, " bytes (",
       format_size(have + off), "), too little for any plan: the smallest plan needs ", hi + off, " bytes (",
       format_size(hi + off), ": resident weights ", round_up(resident, opt_.profile.alloc_granularity_bytes),
       parts, "): short by ", hi - have, " bytes. Smallest budget that fits: --max-memory ", gpu_index_[best],
       "=", hi + off);
}

[[noreturn]] void Planner::infeasible_host(uint64_t needed) const {
  fail(ErrorKind::InvalidInput, "--max-memory: the cpu budget (", host_budget_, " bytes, ", host_source_,
       ") is too small: even with every offloaded group read from disk, the pinned staging ring needs ",
       needed, " bytes: short by ", needed - std::min(needed, host_budget_),
       " bytes. Smallest budget that fits: cpu=", needed);
}

Plan Planner::run() {
  if (opt_.tokens == 0 || opt_.tokens > kMaxTokens)
    fail(ErrorKind::Usage, "--tokens: ", opt_.tokens, " is not from 1 to ", kMaxTokens);
  if (opt_.prefetch && (*opt_.prefetch == 0 || *opt_.prefetch > kMaxPrefetch))
    fail(ErrorKind::Usage, "--prefetch: ", *opt_.prefetch, " is not from 1 to ", kMaxPrefetch);
  if (opt_.blocks_per_group && (*opt_.blocks_per_group == 0 || *opt_.blocks_per_group > kMaxBlocksPerGroup))
    fail(ErrorKind::Usage, "--blocks-per-group: ", *opt_.blocks_per_group, " is not from 1 to ",
         kMaxBlocksPerGroup);
  if (opt_.budget.gpus.empty()) {
    fail(ErrorKind::InvalidInput,
         "no GPU to plan for: ", opt_.budget.note.empty() ? "the budget names none" : opt_.budget.note,
         "; give one with --max-memory (e.g. 0=20GiB,cpu=64GiB)");
  }
  if (in_.components.empty()) fail(ErrorKind::InvalidInput, in_.path, ": the checkpoint holds no weights");
  for (const auto& [idx, bytes] : opt_.budget.gpus) {
    gpu_index_.push_back(idx);
    gpu_budget_.push_back(bytes);
    auto it = opt_.budget.gpu_sources.find(idx);
    gpu_source_.push_back(it == opt_.budget.gpu_sources.end() ? std::string() : it->second);
  }
  if (opt_.budget.cpu) {
    host_budget_ = *opt_.budget.cpu;
    host_source_ = opt_.budget.cpu_source;
  } else if (const uint64_t avail = host_available_memory(); avail > 0) {
    host_budget_ = avail;
    host_source_ = "/proc/meminfo MemAvailable";
  } else {
    host_source_ = "unlimited (no cpu budget and /proc/meminfo unreadable)";
  }
  build_units();
  const uint64_t fixed = sum_bytes(gpu_reserve(opt_.profile, base_work()));
  fixed_.assign(gpu_budget_.size(), fixed);
  page_tables_bound_ = page_tables_bound();

  SearchResult r = search();
  if (!r.best.ok) {
    if (!opt_.explain_infeasible) fail(ErrorKind::InvalidInput, "--max-memory: the budget admits no plan");
    if (r.host_short) infeasible_host(r.host_needed);
    infeasible_gpu();
  }
  return assemble(r.best);
}

Planner::SearchResult Planner::search() const {
  SearchResult r;
  // Everything resident, if it fits: no slots, nothing held back for streaming.
  r.best = place(Candidate{OffloadMode::Block, 0, 0}, 0);
  if (r.best.ok) return r;
  std::vector<Candidate> cands;
  const bool block = opt_.offload != OffloadMode::Leaf;
  const bool leaf = opt_.offload != OffloadMode::Block;
  const std::vector<uint32_t> ns =
      opt_.blocks_per_group ? std::vector<uint32_t>{*opt_.blocks_per_group} : std::vector<uint32_t>{1, 2, 4};
  const std::vector<uint32_t> ks_block =
      opt_.prefetch ? std::vector<uint32_t>{*opt_.prefetch} : std::vector<uint32_t>{1, 2, 3, 4};
  const std::vector<uint32_t> ks_leaf =
      opt_.prefetch ? std::vector<uint32_t>{*opt_.prefetch} : std::vector<uint32_t>{1, 2, 4, 8};
  // With several GPUs, streaming through every GPU's slots or through one GPU only (the others
  // then hold no slots at all).
  std::vector<int32_t> streams = {-1};
  if (gpu_budget_.size() > 1) {
    for (size_t pos = 0; pos < gpu_budget_.size(); ++pos) streams.push_back(static_cast<int32_t>(pos));
  }
  for (int32_t st : streams) {
    if (block) {
      for (uint32_t n : ns) {
        for (uint32_t k : ks_block) cands.push_back({OffloadMode::Block, n, k, st});
      }
    }
    if (leaf) {
      for (uint32_t k : ks_leaf) cands.push_back({OffloadMode::Leaf, 1, k, st});
    }
  }
  auto better = [](const Outcome& a, const Outcome& b) {
    if (!b.ok) return true;
    const double tol = 1e-3 * std::max(a.step_s, b.step_s);
    if (std::abs(a.step_s - b.step_s) > tol) return a.step_s < b.step_s;
    if (a.offloaded != b.offloaded) return a.offloaded < b.offloaded;
    return a.peak_sum < b.peak_sum;
  };
  for (const Candidate& c : cands) {
    const size_t M = n_offloadable_;
    const Outcome all = place(c, M, false);
    if (!all.ok) {
      if (!all.host_ok && all.host_needed > 0) {
        r.host_short = true;
        r.host_needed = std::min(r.host_needed, all.host_needed);
      }
      continue;
    }
    // The fewest offloaded units that fit (binary search; the count is nearly monotone, as slot
    // sizes change with the set, so a few counts below are tried as well).
    size_t lo = 1, hi = M;
    while (lo < hi) {
      const size_t mid = lo + (hi - lo) / 2;
      if (place(c, mid, false).ok)
        hi = mid;
      else
        lo = mid + 1;
    }
    size_t chosen = lo;
    for (size_t m = lo; m-- > 1 && m + 4 > lo;) {
      if (place(c, m, false).ok) chosen = m;
    }
    Outcome o = place(c, chosen);
    if (!o.ok) o = place(c, M);
    if (better(o, r.best)) r.best = std::move(o);
  }
  if (r.best.ok) r.host_short = false;
  return r;
}

}  // namespace qtool::planner
