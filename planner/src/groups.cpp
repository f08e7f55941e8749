// Offload groups and steps, and where each group lives (pinned host memory or disk).
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

// The page tables of the most pinned host memory any plan can use: every unit's leaves pinned
// (each rounded to host pages) plus a staging ring, but no more than the cpu budget.
uint64_t Planner::page_tables_bound() const {
  uint64_t pinned = 0, largest = 0;
  for (size_t i = 0; i < units_.size(); ++i) {
    pinned += std::max(leaf_pinned_[i], round_up(arena_[i], opt_.profile.host_alloc_granularity_bytes));
    largest = std::max(largest, arena_[i]);
  }
  uint32_t max_k = 8;
  if (opt_.prefetch) max_k = *opt_.prefetch;
  uint32_t max_n = 4;  // the largest blocks-per-group candidate
  if (opt_.blocks_per_group) max_n = *opt_.blocks_per_group;
  const uint64_t ring = checked_mul(max_k, max_n, largest).value_or(UINT64_MAX);
  return pinned_page_table_bytes(opt_.profile,
                                 std::min(checked_add(pinned, ring).value_or(UINT64_MAX), host_budget_));
}

GpuWork Planner::base_work() const {
  GpuWork w;
  w.tokens = opt_.tokens;
  for (const UnitInfo& u : units_) {
    w.max_in = std::max(w.max_in, u.max_in);
    w.max_out = std::max(w.max_out, u.max_out);
    w.max_dequant_numel = std::max(w.max_dequant_numel, u.max_dq);
  }
  for (const CompData& cd : comps_) {
    uint64_t have = 0;
    for (const ReserveItem& it : w.forward_activations) have += it.bytes;
    if (cd.activation_bytes > have) w.forward_activations = cd.activations;
  }
  w.used = true;
  return w;
}

void Planner::make_groups(Outcome& o) const {
  const Candidate& c = o.cand;
  o.groups.clear();
  o.unit_group.assign(units_.size(), -1);
  GroupDraft cur;
  int32_t last = -2;  // the previous unit id in order that was offloaded into cur
  auto flush = [&]() {
    if (cur.units.empty()) return;
    // Tensors laid out back to back at 256-byte boundaries: the group's arena is the sum of its
    // units' arenas.
    for (uint32_t u : cur.units) {
      cur.bytes += units_[u].bytes;
      cur.arena += arena_[u];
    }
    for (uint32_t u : cur.units) {
      if (o.unit_group[u] < 0) o.unit_group[u] = static_cast<int32_t>(o.groups.size());
    }
    o.groups.push_back(std::move(cur));
    cur = GroupDraft();
  };
  for (uint32_t id = 0; id < units_.size(); ++id) {
    if (o.gpu_of[id] >= 0 || units_[id].follow >= 0) continue;
    if (c.mode == OffloadMode::Leaf) {
      flush();
      const UnitInfo& u = units_[id];
      for (size_t l = 0; l < u.leaves.size(); ++l) {
        GroupDraft g;
        g.units = {id};
        g.leaf = static_cast<int32_t>(l);
        g.exec = o.exec_of[id];
        g.arena = u.leaves[l].arena;
        g.bytes = u.leaves[l].bytes;
        if (o.unit_group[id] < 0) o.unit_group[id] = static_cast<int32_t>(o.groups.size());
        o.groups.push_back(std::move(g));
      }
      if (u.leaves.empty()) {
        // A unit without stored tensors (should not happen for an offloaded unit): nothing to move.
        o.gpu_of[id] = o.exec_of[id];
      }
      continue;
    }
    const bool extend = !cur.units.empty() && last == static_cast<int32_t>(id) - 1 &&
                        units_[cur.units.back()].comp == units_[id].comp && cur.exec == o.exec_of[id] &&
                        cur.units.size() < c.n;
    if (!extend) {
      flush();
      cur.exec = o.exec_of[id];
    }
    cur.units.push_back(id);
    last = static_cast<int32_t>(id);
  }
  flush();
}

void Planner::make_steps(Outcome& o) const {
  o.steps.clear();
  std::vector<uint8_t> done(o.groups.size(), 0);
  for (uint32_t id = 0; id < units_.size(); ++id) {
    const UnitInfo& u = units_[id];
    if (u.follow >= 0) {
      // A tied alias runs where its primary is: resident there, or from the primary's group.
      // Right after its primary's step (T5's encoder.embed_tokens after `shared`) it joins that
      // step: the bytes are on the GPU already, a second copy of the group would be waste.
      const uint32_t p = static_cast<uint32_t>(u.follow);
      StepDraft s;
      s.units = {id};
      s.exec = o.exec_of[id];
      if (o.gpu_of[p] < 0) s.group = o.unit_group[p];
      if (!o.steps.empty()) {
        StepDraft& prev = o.steps.back();
        if (prev.group == s.group && prev.exec == s.exec && prev.leaf < 0 &&
            std::find(prev.units.begin(), prev.units.end(), p) != prev.units.end()) {
          prev.units.push_back(id);
          continue;
        }
      }
      o.steps.push_back(std::move(s));
      continue;
    }
    if (o.gpu_of[id] >= 0) {
      o.steps.push_back({{id}, -1, -1, o.gpu_of[id]});
      continue;
    }
    // Offloaded: one step per group at its first unit.
    for (int32_t g = o.unit_group[id]; g >= 0 && g < static_cast<int32_t>(o.groups.size()); ++g) {
      const GroupDraft& gd = o.groups[static_cast<size_t>(g)];
      if (std::find(gd.units.begin(), gd.units.end(), id) == gd.units.end()) break;
      if (done[static_cast<size_t>(g)]) break;
      done[static_cast<size_t>(g)] = 1;
      o.steps.push_back({gd.units, gd.leaf, g, gd.exec});
    }
  }
}

// cpu (pinned) while the host budget lasts, in execution order, the rest to disk; all groups of
// one unit share a target.
void Planner::assign_targets(Outcome& o) const {
  const uint64_t hg = opt_.profile.host_alloc_granularity_bytes;
  // Bundles: runs of groups sharing a unit.
  std::vector<std::pair<size_t, size_t>> bundles;
  for (size_t g = 0; g < o.groups.size();) {
    size_t e = g + 1;
    while (e < o.groups.size() && o.groups[e].units.front() == o.groups[g].units.back()) ++e;
    bundles.push_back({g, e});
    g = e;
  }
  std::vector<uint64_t> bundle_pinned(bundles.size(), 0), bundle_max(bundles.size(), 0);
  for (size_t b = 0; b < bundles.size(); ++b) {
    for (size_t g = bundles[b].first; g < bundles[b].second; ++g) {
      bundle_pinned[b] += round_up(o.groups[g].arena, hg);
      bundle_max[b] = std::max(bundle_max[b], o.groups[g].arena);
    }
  }
  const size_t n_cpu = decide_targets(o, bundle_pinned, bundle_max);
  for (size_t b = 0; b < bundles.size(); ++b) {
    for (size_t g = bundles[b].first; g < bundles[b].second; ++g) {
      o.groups[g].target = b < n_cpu ? Location::cpu() : Location::disk();
    }
  }
}

// The first bundles (in execution order) pinned in host memory while the cpu budget lasts, the
// rest read from disk through a staging ring of K buffers of the largest of them. Returns the
// number of pinned bundles and sets the outcome's host figures.
size_t Planner::decide_targets(Outcome& o, const std::vector<uint64_t>& bundle_pinned,
                               const std::vector<uint64_t>& bundle_max) const {
  const uint64_t hg = opt_.profile.host_alloc_granularity_bytes;
  const size_t n_bundles = bundle_pinned.size();
  uint64_t total_pinned = 0;
  for (uint64_t b : bundle_pinned) total_pinned += b;
  const uint64_t k = std::max<uint32_t>(o.cand.k, 1);
  // The largest arena among the bundles from b on, for the staging ring.
  std::vector<uint64_t> suffix_max(n_bundles + 1, 0);
  for (size_t b = n_bundles; b-- > 0;) suffix_max[b] = std::max(suffix_max[b + 1], bundle_max[b]);
  size_t n_cpu = n_bundles;
  uint64_t pinned = total_pinned;
  auto need = [&](size_t ncpu, uint64_t pin) {
    const uint64_t staging = ncpu < n_bundles ? round_up(k * suffix_max[ncpu], hg) : 0;
    return pin + staging;
  };
  while (need(n_cpu, pinned) > host_budget_ && n_cpu > 0) {
    --n_cpu;
    pinned -= bundle_pinned[n_cpu];
  }
  o.host_pinned = pinned;
  o.host_staging = n_cpu < n_bundles ? round_up(k * suffix_max[n_cpu], hg) : 0;
  o.host_needed = need(n_cpu, pinned);
  o.host_ok = o.host_needed <= host_budget_;
  return n_cpu;
}

}  // namespace qtool::planner
