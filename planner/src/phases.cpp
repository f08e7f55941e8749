// Planning a pipeline by phase (planner.hpp make_phased_plan): one plan per phase made by the
// sequence planner on the budget the job's resident components leave, the resident set chosen
// greedily, then the phases merged into one plan (plan.hpp PhasePlan).
#include <algorithm>
#include <cmath>
#include <map>
#include <set>
#include <unordered_map>

#include "phases_internal.hpp"
#include "qtool/formats/error.hpp"
#include "qtool/formats/size.hpp"

namespace qtool::planner {
namespace detail {

PhasedPlanner::PhasedPlanner(const PipelineInput& in, const PlanOptions& opt, const ModelTemplate& t)
    : in_(in), opt_(opt), tmpl_(t) {
  if (opt.denoise_steps < 1 || opt.denoise_steps > kMaxDenoiseSteps)
    fail(ErrorKind::Usage, "--denoise-steps: ", opt.denoise_steps, " is not from 1 to ", kMaxDenoiseSteps);
  std::vector<bool> taken(in.components.size(), false);
  for (const TemplatePhase& tp : t.phases) {
    PhaseSpec ps{tp.name, tp.note, tp.repeat_denoise_steps ? opt.denoise_steps : tp.repeat, {}};
    for (const std::string& name : tp.components) {
      for (size_t c = 0; c < in.components.size(); ++c) {
        if (in.components[c].name == name && !taken[c]) {
          ps.comps.push_back(c);
          taken[c] = true;
        }
      }
    }
    if (!ps.comps.empty()) phases_.push_back(std::move(ps));
  }
  // Components the template's phases do not name run after them, one phase each.
  for (size_t c = 0; c < in.components.size(); ++c) {
    if (!taken[c])
      phases_.push_back({in.components[c].name,
                         str_cat("component '", in.components[c].name, "' is in no phase of template '",
                                 t.name, "': planned as a phase of its own after the others"),
                         1,
                         {c}});
  }
  phase_of_.assign(in.components.size(), 0);
  for (size_t p = 0; p < phases_.size(); ++p)
    for (size_t c : phases_[p].comps) phase_of_[c] = p;
  sizes_.resize(in.components.size());
  uint64_t total = 0;
  for (size_t c = 0; c < in.components.size(); ++c) {
    for (const TensorDesc& td : in.components[c].tensors) {
      sizes_[c][td.name] = td.nbytes;
      total += td.nbytes + kArenaAlignment;
    }
  }
  host_budget_ = opt.budget.cpu ? *opt.budget.cpu : host_available_memory();
  if (host_budget_ == 0) host_budget_ = kUnlimited;
  host_source_ = opt.budget.cpu ? opt.budget.cpu_source : std::string("/proc/meminfo MemAvailable");
  // Every phase's reserve is charged the page tables of the job's pinned host memory, which is
  // at most the cpu budget, at most every weight pinned when nothing is staged from disk, and at
  // most every weight pinned plus the largest staging rings otherwise (run()).
  all_pinned_margin_ = pinned_page_table_bytes(opt.profile, std::min<uint64_t>(host_budget_, total));
  any_job_margin_ = pinned_page_table_bytes(
      opt.profile,
      std::min<uint64_t>(host_budget_,
                         total > kUnlimited / (kMaxPrefetch + 2) ? kUnlimited : total * (kMaxPrefetch + 2)));
}

size_t PhasedPlanner::comp_index(const Plan& sub, uint32_t sub_comp) const {
  const std::string& name = sub.components[sub_comp].name;
  for (size_t c = 0; c < in_.components.size(); ++c)
    if (in_.components[c].name == name) return c;
  QTOOL_ASSERT(false);
  return 0;
}

// The arena (rounded) per GPU index of the resident steps of sub-plan components for which
// `pick(input component)` holds, laid out in schedule order as the runner does.
GpuBytes PhasedPlanner::arenas(const Plan& sub, const std::function<bool(size_t)>& pick) const {
  std::map<int32_t, std::vector<uint64_t>> sizes;
  for (const ScheduleStep& s : sub.schedule) {
    if (s.group >= 0) continue;
    const size_t c = comp_index(sub, s.component);
    if (!pick(c)) continue;
    for (const std::string& t : s.tensors) sizes[s.gpu].push_back(sizes_[c].at(t));
  }
  GpuBytes out;
  for (const auto& [gpu, v] : sizes)
    out[gpu] = round_up(layout_arena(v).total, opt_.profile.alloc_granularity_bytes);
  return out;
}

uint64_t PhasedPlanner::resident_weights(const Plan& sub, size_t c) const {
  uint64_t bytes = 0;
  for (const ScheduleStep& s : sub.schedule) {
    if (s.group >= 0 || comp_index(sub, s.component) != c) continue;
    for (const std::string& t : s.tensors) bytes += sizes_[c].at(t);
  }
  return bytes;
}

// The sub-plan of phase p: its components alone, on the GPU budget minus the arenas of the
// components of other phases in `resident` (as placed by `placed`) and the page-table margin.
std::optional<Plan> PhasedPlanner::plan_phase(size_t p, const std::set<size_t>& resident,
                                              const std::map<size_t, GpuBytes>& placed, uint64_t host,
                                              bool explain) const {
  PipelineInput sub;
  sub.path = in_.path;
  sub.fingerprint = in_.fingerprint;
  sub.model_index = in_.model_index;
  for (size_t c : phases_[p].comps) sub.components.push_back(in_.components[c]);
  PlanOptions o = opt_;
  o.explain_infeasible = explain;
  o.reported_budget_offset =
      page_margin_ + (phases_[p].comps.size() > 1 ? opt_.profile.alloc_granularity_bytes : 0);
  o.budget.cpu = host;
  o.budget.cpu_source = host_source_;
  for (auto& [gpu, bytes] : o.budget.gpus) {
    // A phase holding a resident and a loaded component lays them out in two arenas.
    uint64_t held = page_margin_ + (phases_[p].comps.size() > 1 ? opt_.profile.alloc_granularity_bytes : 0);
    for (size_t r : resident) {
      if (phase_of_[r] == p) continue;
      auto it = placed.find(r);
      if (it == placed.end()) continue;
      auto g = it->second.find(gpu);
      if (g != it->second.end()) held += g->second;
    }
    if (held >= bytes && !explain) return std::nullopt;
    bytes -= std::min(bytes, held);  // none left: the planner says what would fit
  }
  try {
    return detail::Planner(sub, o).run();
  } catch (const Error& e) {
    if (explain || e.kind() != ErrorKind::InvalidInput) throw;
    return std::nullopt;
  }
}

bool PhasedPlanner::streams(const Plan& sub, size_t c) const {
  return std::any_of(sub.groups.begin(), sub.groups.end(),
                     [&](const OffloadGroup& g) { return comp_index(sub, g.component) == c; });
}

double PhasedPlanner::trial_time(size_t p, const Plan& sub) const {
  double t = static_cast<double>(phases_[p].repeat) * sub.predicted_step_s;
  for (size_t c : phases_[p].comps)
    t += static_cast<double>(resident_weights(sub, c)) / (opt_.profile.h2d_pinned_gbps * 1e9);
  return t;
}

// Each phase alone on the whole budget. Phases are tried largest first so that an infeasible
// budget is reported for the phase needing the most.
std::vector<Plan> PhasedPlanner::alone_plans() const {
  std::vector<size_t> order(phases_.size());
  std::vector<uint64_t> bytes(phases_.size(), 0);
  for (size_t p = 0; p < phases_.size(); ++p) {
    order[p] = p;
    for (size_t c : phases_[p].comps)
      for (const auto& [name, b] : sizes_[c]) bytes[p] += b;
  }
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return bytes[a] > bytes[b]; });
  std::vector<Plan> out(phases_.size());
  // A phase that does not fit: the error of the one needing the largest budget is reported.
  std::optional<Error> worst;
  uint64_t worst_need = 0;
  const std::string key = "Smallest budget that fits: --max-memory ";
  for (size_t p : order) {
    try {
      out[p] = *plan_phase(p, {}, {}, host_budget_, true);
    } catch (const Error& e) {
      const std::string msg = str_cat("phase '", phases_[p].name, "' (planned alone): ", e.what());
      const size_t at = msg.find(key);
      const size_t eq = at == std::string::npos ? at : msg.find('=', at + key.size());
      if (e.kind() != ErrorKind::InvalidInput || eq == std::string::npos) throw Error(e.kind(), msg);
      const uint64_t need = std::stoull(msg.substr(eq + 1));
      if (!worst || need > worst_need) {
        worst = Error(e.kind(), msg);
        worst_need = need;
      }
    }
  }
  if (worst) throw *worst;
  return out;
}

// Components made resident for the job one by one (the phase repeated most first, then the
// largest), each kept only when every other phase still fits and gets no slower.
PhaseChoice PhasedPlanner::choose_resident(const std::vector<Plan>& alone) {
  PhaseChoice ch;
  ch.plans = alone;
  std::vector<double> time(phases_.size());
  for (size_t p = 0; p < phases_.size(); ++p) time[p] = trial_time(p, alone[p]);
  std::vector<size_t> cands;
  for (size_t c = 0; c < in_.components.size(); ++c) cands.push_back(c);
  auto weight = [&](size_t c) {
    uint64_t b = 0;
    for (const auto& [name, v] : sizes_[c]) b += v;
    return b;
  };
  std::stable_sort(cands.begin(), cands.end(), [&](size_t a, size_t b) {
    const uint32_t ra = phases_[phase_of_[a]].repeat, rb = phases_[phase_of_[b]].repeat;
    return ra != rb ? ra > rb : weight(a) > weight(b);
  });
  for (size_t c : cands) {
    const size_t pc = phase_of_[c];
    if (streams(ch.plans[pc], c)) {
      not_resident_[c] = "its phase does not fit with all of it on the GPUs, so it streams";
      continue;
    }
    std::set<size_t> r2(ch.resident.begin(), ch.resident.end());
    r2.insert(c);
    std::map<size_t, GpuBytes> placed = ch.placed;
    placed[c] = arenas(ch.plans[pc], [&](size_t k) { return k == c; });
    std::vector<std::optional<Plan>> trial(phases_.size());
    std::string why;
    for (size_t q = 0; q < phases_.size() && why.empty(); ++q) {
      if (q == pc) continue;
      trial[q] = plan_phase(q, r2, placed, host_budget_, false);
      if (!trial[q]) {
        why = str_cat("keeping it on the GPUs for the job would leave phase '", phases_[q].name,
                      "' no plan within the budget");
      } else if (const double t = trial_time(q, *trial[q]); t > time[q] * (1 + 1e-6) + 1e-12) {
        why = str_cat("keeping it on the GPUs for the job would leave phase '", phases_[q].name,
                      "' less room: it would stream more, its predicted time growing from ", time[q],
                      " s to ", t, " s");
      }
    }
    if (!why.empty()) {
      not_resident_[c] = why;
      continue;
    }
    ch.resident.push_back(c);
    for (size_t q = 0; q < phases_.size(); ++q) {
      if (!trial[q]) continue;
      ch.plans[q] = std::move(*trial[q]);
      time[q] = trial_time(q, ch.plans[q]);
      for (size_t r : ch.resident)
        if (phase_of_[r] == q) placed[r] = arenas(ch.plans[q], [&](size_t k) { return k == r; });
    }
    ch.placed = std::move(placed);
  }
  return ch;
}

// The final plan of every phase for the chosen resident set, host memory given to the phases
// repeated most first; false when a phase no longer fits (the caller drops a resident).
bool PhasedPlanner::finalize(PhaseChoice& ch) const {
  std::vector<size_t> order(phases_.size());
  for (size_t p = 0; p < order.size(); ++p) order[p] = p;
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return phases_[a].repeat > phases_[b].repeat; });
  const std::set<size_t> resident(ch.resident.begin(), ch.resident.end());
  uint64_t host = host_budget_;
  for (size_t p : order) {
    std::optional<Plan> sub = plan_phase(p, resident, ch.placed, host, resident.empty());
    if (!sub) return false;
    const DevicePlan* cpu = sub->find_device(Location::cpu());
    if (cpu && host != kUnlimited) host -= std::min(host, cpu->predicted_peak);
    ch.plans[p] = std::move(*sub);
  }
  for (size_t r : ch.resident)
    ch.placed[r] = arenas(ch.plans[phase_of_[r]], [&](size_t k) { return k == r; });
  return true;
}

// The page tables are known only once every phase is planned (merge). Planned first with the margin
// of every weight pinned: the merged plan, which charges every phase its real page tables, is
// taken when it fits as it is, and else (groups staged through pinned memory from disk) the job is
// planned again with the margin of any job. That second margin alone, which follows the host
// budget, made the full-size Flux bf16 plan at 2.5 GiB stream with one slot instead of two (a 1 TiB
// host budget charged 800 MiB).
Plan PhasedPlanner::run() {
  if (all_pinned_margin_ < any_job_margin_) {
    page_margin_ = all_pinned_margin_;
    if (std::optional<Plan> plan = plan_job(false)) return std::move(*plan);
    not_resident_.clear();
  }
  page_margin_ = any_job_margin_;
  return *plan_job(true);
}

// The job at the current page-table margin; nullopt when the merged plan exceeds a budget and
// `drop_residents` is false (else components resident for the job are dropped until it fits).
std::optional<Plan> PhasedPlanner::plan_job(bool drop_residents) {
  const std::vector<Plan> alone = alone_plans();
  PhaseChoice ch = choose_resident(alone);
  for (;;) {
    if (finalize(ch)) {
      Plan plan = merge(ch);
      bool fits = true;
      for (const PhasePlan& ph : plan.phases)
        for (const PhaseDevice& d : ph.devices)
          fits = fits && d.predicted_peak <= opt_.budget.gpus.at(d.location.gpu);
      if (fits) return plan;
    }
    if (!drop_residents) return std::nullopt;
    if (ch.resident.empty()) fail(ErrorKind::Internal, "phased plan: no phase plan fits after the merge");
    not_resident_[ch.resident.back()] =
        "keeping it on the GPUs for the job leaves the phases' plans over the budget";
    ch.placed.erase(ch.resident.back());
    ch.resident.pop_back();
  }
}

}  // namespace detail

Plan make_phased_plan(const PipelineInput& input, const PlanOptions& options, const ModelTemplate& pipeline) {
  return detail::PhasedPlanner(input, options, pipeline).run();
}

}  // namespace qtool::planner
