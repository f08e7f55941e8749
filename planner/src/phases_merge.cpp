// The phased plan from the phases' own plans: components, groups and steps concatenated in phase
// order, each component's mode and reason, per phase and GPU the memory, the job's time.
#include <algorithm>
#include <map>
#include <set>

#include "phases_internal.hpp"
#include "qtool/formats/error.hpp"
#include "qtool/formats/size.hpp"

namespace qtool::planner::detail {

namespace {

std::string gpu_list(const GpuBytes& b) {
  std::string s;
  for (const auto& [gpu, bytes] : b) s += str_cat(s.empty() ? "" : ", ", format_size(bytes), " on GPU ", gpu);
  return s.empty() ? std::string("nothing") : s;
}

}  // namespace

std::string PhasedPlanner::mode_reason(const PhaseChoice& ch, size_t c, PhaseMode mode) const {
  const size_t p = phase_of_[c];
  const Plan& sub = ch.plans[p];
  if (mode == PhaseMode::Resident) {
    return str_cat("kept on the GPUs for the whole job (", gpu_list(ch.placed.at(c)),
                   "): beside it every other phase still fits its budget and streams no more, so it loads "
                   "once, at the job's start, and is never moved");
  }
  if (mode == PhaseMode::Loaded) {
    auto it = not_resident_.find(c);
    return str_cat("loaded at the start of phase '", phases_[p].name, "' and released after it: ",
                   it == not_resident_.end() ? std::string("not resident") : it->second);
  }
  uint64_t streamed = 0;
  size_t groups = 0;
  for (const OffloadGroup& g : sub.groups) {
    if (comp_index(sub, g.component) != c) continue;
    streamed += g.bytes;
    ++groups;
  }
  std::string budgets;
  for (const DevicePlan& d : sub.devices) {
    if (d.location.is_gpu())
      budgets += str_cat(budgets.empty() ? "" : "; ", d.device, " peak ", format_size(d.predicted_peak));
  }
  return str_cat("phase '", phases_[p].name,
                 "' does not fit with all of it on the GPUs: ", format_size(streamed), " streams in ", groups,
                 " group(s) (", sub.settings.offload_mode, ", ", sub.settings.prefetch,
                 " slot(s)) every run, the other ", format_size(resident_weights(sub, c)),
                 " loads at the phase's start (", budgets, ")");
}

// Per GPU of the budget: the job's resident arenas, the phase's own arena and reserve; the reserve's
// page tables are the whole job's (`page_tables`).
std::vector<PhaseDevice> PhasedPlanner::phase_devices(const PhaseChoice& ch, size_t p,
                                                      uint64_t page_tables) const {
  const Plan& sub = ch.plans[p];
  const std::set<size_t> resident(ch.resident.begin(), ch.resident.end());
  const GpuBytes own = arenas(sub, [&](size_t c) { return !resident.count(c); });
  std::vector<PhaseDevice> out;
  for (const DevicePlan& sd : sub.devices) {
    if (!sd.location.is_gpu()) continue;
    PhaseDevice d;
    d.location = sd.location;
    for (size_t r : ch.resident) {
      auto it = ch.placed.at(r).find(sd.location.gpu);
      if (it != ch.placed.at(r).end()) d.resident_bytes += it->second;
    }
    auto it = own.find(sd.location.gpu);
    d.arena_bytes = it == own.end() ? 0 : it->second;
    for (const ReserveItem& r : sd.reserve)
      if (r.name != "pinned_page_tables") d.reserve.push_back(r);
    if (d.reserve.empty() && d.resident_bytes > 0)
      d.reserve.push_back(
          {"cuda_context", opt_.profile.context_bytes, "held for the job's resident weights"});
    if (!d.reserve.empty() && page_tables > 0) {
      d.reserve.push_back(
          {"pinned_page_tables", page_tables,
           "the GPU's mapping of the job's pinned host memory (every phase's groups and pinned "
           "host copies)"});
    }
    d.n_slots = sd.n_slots;
    d.slot_bytes = sd.slot_bytes;
    d.predicted_peak = d.resident_bytes + d.arena_bytes + sum_bytes(d.reserve);
    out.push_back(std::move(d));
  }
  return out;
}

// Phase p's components, groups and steps appended to `plan` (indices renumbered), its loads timed.
void PhasedPlanner::merge_phase(const PhaseChoice& ch, size_t p, Plan& plan) const {
  const Plan& sub = ch.plans[p];
  const uint32_t comp_base = static_cast<uint32_t>(plan.components.size());
  const int32_t group_base = static_cast<int32_t>(plan.groups.size());
  const std::set<size_t> resident(ch.resident.begin(), ch.resident.end());
  PhasePlan ph;
  ph.name = phases_[p].name;
  ph.note = phases_[p].note;
  ph.repeat = phases_[p].repeat;
  ph.offload_mode = sub.settings.offload_mode;
  ph.blocks_per_group = sub.settings.blocks_per_group;
  ph.prefetch = sub.settings.prefetch;
  for (uint32_t k = 0; k < sub.components.size(); ++k) {
    const size_t c = comp_index(sub, k);
    plan.components.push_back(sub.components[k]);
    PhaseComponent pc;
    pc.component = comp_base + k;
    pc.mode =
        streams(sub, c) ? PhaseMode::Streamed : (resident.count(c) ? PhaseMode::Resident : PhaseMode::Loaded);
    pc.reason = mode_reason(ch, c, pc.mode);
    pc.load_bytes = resident_weights(sub, c);
    pc.load_pinned = load_pinned_[c];
    if (pc.load_bytes > 0) {
      const double gbps = pc.load_pinned ? opt_.profile.h2d_pinned_gbps : opt_.profile.h2d_pageable_gbps;
      pc.load_s = static_cast<double>(pc.load_bytes) / (gbps * 1e9) + opt_.profile.copy_latency_us * 1e-6;
    }
    if (pc.mode == PhaseMode::Resident)
      plan.job_load_s += pc.load_s;
    else
      ph.load_s += pc.load_s;
    ph.components.push_back(std::move(pc));
  }
  for (OffloadGroup g : sub.groups) {
    g.id += static_cast<uint32_t>(group_base);
    g.component += comp_base;
    plan.groups.push_back(std::move(g));
  }
  ph.schedule_begin = static_cast<uint32_t>(plan.schedule.size());
  for (ScheduleStep s : sub.schedule) {
    s.component += comp_base;
    if (s.group >= 0) s.group += group_base;
    plan.schedule.push_back(std::move(s));
  }
  ph.schedule_end = static_cast<uint32_t>(plan.schedule.size());
  ph.step_s = sub.predicted_step_s;
  ph.transfer_s = sub.transfer_s;
  ph.compute_s = sub.compute_s;
  ph.time_s = ph.load_s + static_cast<double>(ph.repeat) * ph.step_s;
  for (const std::string& n : sub.notes) {
    if (std::find(plan.notes.begin(), plan.notes.end(), n) == plan.notes.end()) plan.notes.push_back(n);
  }
  plan.phases.push_back(std::move(ph));
}

// The plan's devices: per GPU its largest phase; cpu: every phase's pinned arenas and staging and
// the pinned host copies of the loaded components; disk: what any phase reads from it.
void PhasedPlanner::merge_devices(const PhaseChoice& ch, Plan& plan) const {
  DevicePlan cpu{"cpu", Location::cpu(), host_budget_, host_source_, 0, 0, {}, 0, 0, 0};
  uint64_t disk = 0, staging = 0, pinned_loads = 0;
  for (const Plan& sub : ch.plans) {
    for (const DevicePlan& d : sub.devices) {
      if (d.location.kind == Location::Kind::Cpu) {
        cpu.weights_bytes += d.weights_bytes;
        cpu.arena_bytes += d.arena_bytes;
        staging += sum_bytes(d.reserve);
      } else if (d.location.kind == Location::Kind::Disk) {
        disk += d.weights_bytes;
      }
    }
  }
  for (const PhasePlan& ph : plan.phases)
    for (const PhaseComponent& pc : ph.components)
      if (pc.load_pinned) pinned_loads += round_up(pc.load_bytes, opt_.profile.host_alloc_granularity_bytes);
  if (staging)
    cpu.reserve.push_back({"disk_staging", staging, "pinned staging buffers of the phases' disk groups"});
  if (pinned_loads)
    cpu.reserve.push_back(
        {"pinned_loads", pinned_loads, "pinned host copies of the components loaded to the GPUs"});
  cpu.predicted_peak = cpu.arena_bytes + sum_bytes(cpu.reserve);
  for (const DevicePlan& sd : ch.plans.front().devices) {
    if (!sd.location.is_gpu()) continue;
    DevicePlan d = sd;
    d.weights_bytes = 0;
    d.budget = opt_.budget.gpus.at(sd.location.gpu);  // the sub-plans' budgets are what residents left
    const PhaseDevice* peak = nullptr;
    for (const PhasePlan& ph : plan.phases) {
      for (const PhaseDevice& pd : ph.devices) {
        if (!(pd.location == sd.location)) continue;
        if (!peak || pd.predicted_peak > peak->predicted_peak) peak = &pd;
        d.n_slots = std::max(d.n_slots, pd.n_slots);
        d.slot_bytes = std::max(d.slot_bytes, pd.slot_bytes);
      }
    }
    for (const Plan& sub : ch.plans)
      if (const DevicePlan* x = sub.find_device(sd.location)) d.weights_bytes += x->weights_bytes;
    d.arena_bytes = peak->resident_bytes + peak->arena_bytes;
    d.reserve = peak->reserve;
    d.predicted_peak = d.arena_bytes + sum_bytes(d.reserve);
    plan.devices.push_back(std::move(d));
  }
  plan.devices.push_back(std::move(cpu));
  if (disk)
    plan.devices.push_back(
        {"disk", Location::disk(), kUnlimited, "the checkpoint files (read in place)", disk, 0, {}, 0, 0, 0});
}

Plan PhasedPlanner::merge(const PhaseChoice& ch) const {
  // Host copies of the components that load, pinned while the cpu budget left by the groups lasts
  // (the job's resident components first, they load first).
  uint64_t host = host_budget_;
  for (const Plan& sub : ch.plans)
    if (const DevicePlan* cpu = sub.find_device(Location::cpu()); cpu && host != kUnlimited)
      host -= std::min(host, cpu->predicted_peak);
  load_pinned_.assign(in_.components.size(), false);
  std::vector<size_t> order(ch.resident.begin(), ch.resident.end());
  for (const PhaseSpec& ps : phases_)
    for (size_t c : ps.comps)
      if (std::find(order.begin(), order.end(), c) == order.end()) order.push_back(c);
  uint64_t pinned = 0;
  for (size_t c : order) {
    const uint64_t b =
        round_up(resident_weights(ch.plans[phase_of_[c]], c), opt_.profile.host_alloc_granularity_bytes);
    if (b > 0 && (host == kUnlimited || b <= host)) {
      load_pinned_[c] = true;
      if (host != kUnlimited) host -= b;
      pinned += b;
    }
  }
  Plan plan;
  const Plan& first = ch.plans.front();
  plan.checkpoint = first.checkpoint;
  plan.fingerprint = first.fingerprint;
  plan.qtool_version = first.qtool_version;
  plan.settings = first.settings;
  plan.settings.budget_note = opt_.budget.note;
  plan.settings.offload_mode = "none";
  plan.settings.blocks_per_group = plan.settings.prefetch = 0;
  plan.profile = first.profile;
  plan.denoise_steps = opt_.denoise_steps;
  plan.notes.push_back(
      str_cat("planned by phase (pipeline template '", tmpl_.name, "', ", opt_.denoise_steps,
              " denoising step(s)): in each phase only its components need GPU memory, besides "
              "the components resident for the job"));
  for (size_t p = 0; p < phases_.size(); ++p) merge_phase(ch, p, plan);
  uint32_t best_repeat = 0;
  for (size_t p = 0; p < phases_.size(); ++p) {
    const Plan& sub = ch.plans[p];
    if (sub.groups.empty() || phases_[p].repeat <= best_repeat) continue;
    best_repeat = phases_[p].repeat;
    plan.settings.offload_mode = sub.settings.offload_mode;
    plan.settings.blocks_per_group = sub.settings.blocks_per_group;
    plan.settings.prefetch = sub.settings.prefetch;
  }
  uint64_t host_pinned = pinned;
  for (const Plan& sub : ch.plans)
    if (const DevicePlan* cpu = sub.find_device(Location::cpu())) host_pinned += cpu->predicted_peak;
  const uint64_t page_tables = host_pinned ? pinned_page_table_bytes(opt_.profile, host_pinned) : 0;
  plan.predicted_job_s = plan.job_load_s;
  for (size_t p = 0; p < phases_.size(); ++p) {
    PhasePlan& ph = plan.phases[p];
    ph.devices = phase_devices(ch, p, page_tables);
    plan.predicted_step_s += ph.step_s;
    plan.transfer_s += ph.transfer_s;
    plan.compute_s += ph.compute_s;
    plan.predicted_job_s += ph.time_s;
  }
  merge_devices(ch, plan);
  return plan;
}

}  // namespace qtool::planner::detail
