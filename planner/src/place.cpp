// Placing one candidate: partition, groups, targets, and the simulated step.
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

void Planner::simulate(Outcome& o) const {
  const DeviceProfile& p = opt_.profile;
  const size_t ngpu = gpu_budget_.size();
  std::vector<double> copy_free(ngpu, 0.0);
  std::vector<std::vector<double>> slot_free(ngpu);  // per GPU: release time of each copy's slot
  const size_t k = std::max<uint32_t>(o.cand.k, 1);
  double t = 0;
  int32_t prev_exec = -1;
  int64_t prev_comp = -1;
  o.transfer_s = 0;
  o.compute_s = 0;
  for (const StepDraft& s : o.steps) {
    double compute = 0;
    uint64_t first_in = 0, handover = 0;
    int64_t comp = -1;
    for (uint32_t id : s.units) {
      const UnitInfo& u = units_[id];
      if (comp < 0) {
        comp = u.comp;
        handover = comps_[u.comp].handover_bytes;
      }
      if (s.leaf >= 0) {
        const Leaf& l = u.leaves[static_cast<size_t>(s.leaf)];
        compute += l.compute_s;
        if (!first_in) first_in = l.first_in;
      } else {
        compute += u.compute_s;
        if (!first_in && !u.linears.empty()) first_in = static_cast<uint64_t>(u.linears.front().in);
      }
    }
    double start = t;
    // A new GPU inside a component: its forward's state crosses (handover_bytes), or a linears-only
    // component's input (a component starts from its inputs, on its first GPU).
    if (prev_exec >= 0 && s.exec != prev_exec && comp == prev_comp && (handover || first_in)) {
      const double bytes = handover ? static_cast<double>(handover)
                                    : static_cast<double>(opt_.tokens) * static_cast<double>(first_in) * 2.0;
      start += bytes / (p.p2p_gbps * 1e9);
    }
    if (s.group >= 0) {
      const GroupDraft& g = o.groups[static_cast<size_t>(s.group)];
      const size_t e = static_cast<size_t>(s.exec);
      std::vector<double>& ring = slot_free[e];
      double copy_start = copy_free[e];
      if (ring.size() >= k) copy_start = std::max(copy_start, ring[ring.size() - k]);
      const double dur = copy_seconds(g.arena, g.target, p);
      const double copy_end = copy_start + dur;
      copy_free[e] = copy_end;
      o.transfer_s += dur;
      start = std::max(start, copy_end);
      ring.push_back(start + compute);
    }
    t = start + compute;
    o.compute_s += compute;
    prev_exec = s.exec;
    prev_comp = comp;
  }
  o.step_s = t;
}

Outcome Planner::place(const Candidate& c, size_t m, bool full) const {
  Outcome o;
  o.cand = c;
  o.m = m;
  const size_t ngpu = gpu_budget_.size();
  const uint64_t gran = opt_.profile.alloc_granularity_bytes;
  const std::vector<uint8_t> off =
      m ? offload_set(m, c.mode == OffloadMode::Block ? c.n : 1) : std::vector<uint8_t>(units_.size(), 0);
  const uint64_t slot = m ? slot_estimate(c, off) : 0;
  // A real forward holds every tensor of a unit while it runs: in leaf mode all the leaves of an
  // offloaded unit of such a component must fit the ring at once.
  if (m && c.mode == OffloadMode::Leaf) {
    for (uint32_t id = 0; id < units_.size(); ++id)
      if (off[id] && comps_[units_[id].comp].arch && units_[id].leaves.size() > c.k) return o;
  }
  const uint64_t slots = m ? round_up(static_cast<uint64_t>(c.k) * slot, gran) : 0;
  auto slots_on = [&](size_t pos) {
    return c.stream < 0 || static_cast<size_t>(c.stream) == pos ? slots : 0;
  };
  // Page tables of the pinned host memory, at most what the host budget or the model allow.
  const uint64_t page_tables = m ? page_tables_bound_ : 0;
  std::vector<uint64_t> cap(ngpu, 0);
  for (size_t pos = 0; pos < ngpu; ++pos) {
    const uint64_t need = fixed_[pos] + slots_on(pos) + page_tables;
    cap[pos] = gpu_budget_[pos] > need ? (gpu_budget_[pos] - need) / gran * gran : 0;
  }
  if (m && c.stream >= 0 &&
      gpu_budget_[static_cast<size_t>(c.stream)] <
          fixed_[static_cast<size_t>(c.stream)] + slots + page_tables) {
    return o;
  }
  std::vector<uint32_t> seq;
  for (uint32_t id = 0; id < units_.size(); ++id) {
    if (!off[id] && units_[id].follow < 0) seq.push_back(id);
  }
  o.gpu_of.assign(units_.size(), -1);
  Strategy strategy = opt_.strategy;
  if (strategy == Strategy::Auto) strategy = ngpu > 1 ? Strategy::Balanced : Strategy::Sequential;
  if (!partition(strategy, seq, arena_, cap, o.gpu_of)) return o;
  if (!assign_exec(o, c, seq, slots + page_tables)) return o;
  if (!full) {
    std::vector<uint64_t> pinned, largest;
    host_bundles(o, pinned, largest);
    decide_targets(o, pinned, largest);
    o.ok = o.host_ok;
    return o;
  }
  make_groups(o);
  for (uint32_t id = 0; id < units_.size(); ++id) {
    const UnitInfo& u = units_[id];
    if (u.follow < 0) continue;
    const uint32_t p = static_cast<uint32_t>(u.follow);
    o.gpu_of[id] = o.gpu_of[p];
    o.exec_of[id] = o.gpu_of[p] >= 0 ? o.gpu_of[p] : o.groups[static_cast<size_t>(o.unit_group[p])].exec;
  }
  assign_targets(o);
  make_steps(o);
  if (!reserve_fits(o)) return o;  // cannot happen with the conservative caps
  if (!o.host_ok) return o;
  simulate(o);
  o.ok = true;
  return o;
}

// Slot size estimate: the largest group the offloaded units `off` can form (a GPU boundary only
// splits groups).
uint64_t Planner::slot_estimate(const Candidate& c, const std::vector<uint8_t>& off) const {
  uint64_t slot = 0;
  if (c.mode == OffloadMode::Leaf) {
    for (uint32_t id = 0; id < units_.size(); ++id) {
      if (off[id]) slot = std::max(slot, leaf_max_[id]);
    }
  } else {
    uint64_t run_arena = 0;
    uint32_t run = 0;
    uint32_t prev = 0;
    auto close = [&]() {
      slot = std::max(slot, run_arena);
      run_arena = 0;
      run = 0;
    };
    for (uint32_t id = 0; id < units_.size(); ++id) {
      if (!off[id]) continue;
      if (run > 0 && (prev + 1 != id || run == c.n || units_[prev].comp != units_[id].comp)) close();
      run_arena += arena_[id];
      ++run;
      prev = id;
    }
    if (run) close();
  }
  return slot;
}

// Where each unit runs (exec_of); false when no GPU can run the offloaded units.
bool Planner::assign_exec(Outcome& o, const Candidate& c, const std::vector<uint32_t>& seq,
                          uint64_t stream_bytes) const {
  const size_t ngpu = gpu_budget_.size();
  // Offloaded units run on the GPU of the previous resident unit (else the next one, else the
  // first GPU that can hold the reserve and the slots).
  o.exec_of.assign(units_.size(), -1);
  int32_t fallback = c.stream;
  for (size_t pos = 0; pos < ngpu && fallback < 0; ++pos) {
    if (gpu_budget_[pos] >= fixed_[pos] + stream_bytes) fallback = static_cast<int32_t>(pos);
  }
  int32_t first_resident = -1;
  for (uint32_t id : seq) {
    if (o.gpu_of[id] >= 0) {
      first_resident = o.gpu_of[id];
      break;
    }
  }
  int32_t cur = first_resident >= 0 ? first_resident : fallback;
  if (cur < 0) return false;
  for (uint32_t id = 0; id < units_.size(); ++id) {
    if (units_[id].follow >= 0) continue;
    if (o.gpu_of[id] >= 0) cur = o.gpu_of[id];
    o.exec_of[id] = o.gpu_of[id] < 0 && c.stream >= 0 ? c.stream : cur;
  }
  return true;
}

// The host budget's bundles from per-unit sums, without building the groups: per bundle its pinned
// bytes and its largest arena.
void Planner::host_bundles(const Outcome& o, std::vector<uint64_t>& pinned,
                           std::vector<uint64_t>& largest) const {
  const Candidate& c = o.cand;
  const uint64_t hg = opt_.profile.host_alloc_granularity_bytes;
  uint64_t run_arena = 0;
  uint32_t run = 0, prev = 0;
  auto close = [&]() {
    if (run) {
      pinned.push_back(round_up(run_arena, hg));
      largest.push_back(run_arena);
    }
    run = 0;
    run_arena = 0;
  };
  for (uint32_t id = 0; id < units_.size(); ++id) {
    if (o.gpu_of[id] >= 0 || units_[id].follow >= 0 || units_[id].leaves.empty()) continue;
    if (c.mode == OffloadMode::Leaf) {
      pinned.push_back(leaf_pinned_[id]);
      largest.push_back(leaf_max_[id]);
      continue;
    }
    if (run > 0 && (prev + 1 != id || run == c.n || units_[prev].comp != units_[id].comp ||
                    o.exec_of[prev] != o.exec_of[id])) {
      close();
    }
    run_arena += arena_[id];
    ++run;
    prev = id;
  }
  close();
}

// The exact reserve per GPU (o.work), the offloaded bytes, and whether each GPU's peak fits its budget.
bool Planner::reserve_fits(Outcome& o) const {
  const Candidate& c = o.cand;
  const size_t ngpu = gpu_budget_.size();
  const uint64_t gran = opt_.profile.alloc_granularity_bytes;
  o.work.assign(ngpu, GpuWork{});
  std::vector<uint64_t> resident(ngpu, 0);
  for (size_t pos = 0; pos < ngpu; ++pos) o.work[pos].tokens = opt_.tokens;
  for (uint32_t id = 0; id < units_.size(); ++id) {
    const int32_t e = o.exec_of[id];
    if (e < 0) continue;
    GpuWork& w = o.work[static_cast<size_t>(e)];
    const UnitInfo& u = units_[id];
    w.used = true;
    w.max_in = std::max(w.max_in, u.max_in);
    w.max_out = std::max(w.max_out, u.max_out);
    w.max_dequant_numel = std::max(w.max_dequant_numel, u.max_dq);
    const CompData& cd = comps_[u.comp];
    uint64_t have = 0;
    for (const ReserveItem& it : w.forward_activations) have += it.bytes;
    if (cd.activation_bytes > have) w.forward_activations = cd.activations;
    if (o.gpu_of[id] >= 0 && u.follow < 0) resident[static_cast<size_t>(o.gpu_of[id])] += arena_[id];
    if (o.gpu_of[id] < 0 && u.follow < 0) o.offloaded += u.bytes;
  }
  for (const GroupDraft& g : o.groups) {
    GpuWork& w = o.work[static_cast<size_t>(g.exec)];
    w.n_slots = c.k;
    w.slot_bytes = std::max(w.slot_bytes, g.arena);
  }
  for (GpuWork& w : o.work) w.pinned_host_bytes = o.host_pinned + o.host_staging;
  for (size_t pos = 0; pos < ngpu; ++pos) {
    const uint64_t peak = round_up(resident[pos], gran) + sum_bytes(gpu_reserve(opt_.profile, o.work[pos]));
    if (peak > gpu_budget_[pos]) return false;
    o.peak_sum += peak;
  }
  return true;
}

}  // namespace qtool::planner
