// verify's measured sections (verify_checks.hpp): peak memory per GPU against the plan, what each
// phase found, the step time against the plan's prediction, and the report's tail.
#include <algorithm>
#include <cmath>
#include <map>
#include <utility>

#include "qtool/formats/error.hpp"
#include "qtool/formats/json.hpp"
#include "qtool/formats/size.hpp"
#include "verify_checks.hpp"
#include "verify_forward.hpp"

namespace qtool::runner::verify_detail {

using nlohmann::json;

namespace {

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// The plan's bytes for a buffer class: its reserve item of that name; the resident arena; the
// forwards' activations are the reserve items named "activations: ...".
uint64_t planned_item_bytes(const planner::DevicePlan& dp, MemoryKind kind) {
  if (kind == MemoryKind::ResidentArena) return dp.arena_bytes;
  uint64_t bytes = 0;
  for (const planner::ReserveItem& ri : dp.reserve) {
    if (kind == MemoryKind::ForwardActivations ? ri.name.rfind(planner::kForwardActivationPrefix, 0) == 0
                                               : ri.name == memory_kind_name(kind))
      bytes += ri.bytes;
  }
  return bytes;
}

// One GPU's memory against its plan: the report's entry and the check's words for it.
struct DeviceMemoryCheck {
  json entry;
  bool ok = true;
  std::string detail;
};

// `by_phase`: the plan is by phase, its forwards' activations are checked per phase instead
// (check_phase_activations).
DeviceMemoryCheck check_device_memory(const DeviceMemory& m, const planner::DevicePlan* dp, bool on_gpu,
                                      bool by_phase) {
  DeviceMemoryCheck r;
  r.entry = {{"gpu", m.device},
             {"allocated_bytes", m.allocated_bytes},
             {"measured_peak_bytes", m.measured_peak_bytes},
             {"baseline_bytes", m.baseline_bytes},
             {"pinned_host_bytes", m.pinned_host_bytes},
             {"how", m.how}};
  json items = json::array();
  uint64_t modelled = 0;  // plan items the CPU backend has no counterpart for
  std::string item_over;
  for (const MemoryItem& it : m.items) {
    const uint64_t planned_bytes = dp ? planned_item_bytes(*dp, it.kind) : 0;
    items.push_back(
        {{"name", memory_kind_name(it.kind)}, {"allocated", it.bytes}, {"planned", planned_bytes}});
    // The forwards' activations are a model of the plan's own: each must hold on its own.
    if (dp && !by_phase && it.kind == MemoryKind::ForwardActivations && it.bytes > planned_bytes)
      item_over = str_cat(", forward activations ", format_size(it.bytes), " over the plan's ",
                          format_size(planned_bytes), " OVER");
  }
  if (dp)
    for (const planner::ReserveItem& ri : dp->reserve)
      if (ri.name == "cuda_context" || ri.name == "cublas_workspace") modelled += ri.bytes;
  r.entry["items"] = std::move(items);
  if (!dp) {
    r.detail = str_cat("gpu ", m.device, ": not in the plan");
    r.ok = false;
    return r;
  }
  const uint64_t measured = on_gpu ? m.measured_peak_bytes : m.measured_peak_bytes + modelled;
  r.entry["predicted_peak_bytes"] = dp->predicted_peak;
  r.entry["compared_bytes"] = measured;
  r.ok = measured <= dp->predicted_peak && item_over.empty();
  r.detail =
      str_cat("gpu ", m.device, " ", format_size(measured),
              on_gpu ? " measured" : " (buffers, the ops' activation peak, the plan's context and workspace)",
              " vs ", format_size(dp->predicted_peak), " predicted",
              measured <= dp->predicted_peak ? "" : " OVER", item_over);
  return r;
}

// The step times' medians (the first step left out: it warms caches and loads kernels) against
// the plan's prediction.
struct StepTimes {
  double measured = 0;  // ms, median
  double predicted = 0;
  double ratio = 0;
  double resident = 0;  // all-resident median, 0 when none ran
  double gbps = 0;      // host-to-device bytes per step over the measured time
  double peer_ms = 0;   // median time of a step's hand-overs between GPUs
  double peer_gbps = 0;
  double profile_p2p_gbps = 0;  // the plan's device profile's peer copy bandwidth
};

StepTimes step_times(const Setup& s, const RunResult& planned, const std::vector<double>& planned_ms,
                     const std::vector<double>& resident_ms) {
  // The median of the steps after the first (which warms caches and loads kernels), when any.
  const auto steady = [](std::vector<double> ms) {
    if (ms.size() >= 2) ms.erase(ms.begin());
    return median(std::move(ms));
  };
  StepTimes t;
  t.measured = steady(planned_ms);
  t.predicted = s.plan.predicted_step_s * 1000.0;
  t.ratio = t.predicted > 0 ? t.measured / t.predicted : 0.0;
  t.resident = steady(resident_ms);
  t.gbps = t.measured > 0 ? static_cast<double>(planned.h2d_bytes_per_step) / (t.measured * 1e6) : 0.0;
  t.peer_ms = steady(planned.peer_ms);
  t.peer_gbps = t.peer_ms > 0 ? static_cast<double>(planned.peer_bytes_per_step) / (t.peer_ms * 1e6) : 0.0;
  t.profile_p2p_gbps = s.plan.profile.p2p_gbps;
  return t;
}

std::string step_time_detail(const StepTimes& t, const RunResult& planned) {
  std::string detail = str_cat(fmt("%.3f", t.measured), " ms measured (median), ", fmt("%.3f", t.predicted),
                               " ms predicted, ratio ", fmt("%.2f", t.ratio));
  if (t.resident > 0) detail += str_cat("; all-resident ", fmt("%.3f", t.resident), " ms");
  if (planned.h2d_bytes_per_step)
    detail += str_cat("; ", format_size(planned.h2d_bytes_per_step), " streamed per step (",
                      fmt("%.1f", t.gbps), " GB/s)");
  if (planned.peer_bytes_per_step)
    detail += str_cat("; ", format_size(planned.peer_bytes_per_step),
                      " of forward state handed between GPUs per step in ", fmt("%.3f", t.peer_ms), " ms (",
                      fmt("%.1f", t.peer_gbps), " GB/s; the profile's peer copy ",
                      fmt("%.1f", t.profile_p2p_gbps), " GB/s)");
  if (planned.pipeline.ran)
    detail +=
        str_cat("; a run step is the whole pipeline (the encoders once, the transformer ",
                planned.pipeline.denoise_steps, " times), the plan's prediction one pass of each component");
  return detail;
}

// A plan by phase, one phase: each forward's activation peak against the activation items of the
// phase on the GPUs it ran on (the plan reserves a phase's own forward only). Returns the words of
// the check; `over` counts what is over; `act` is, per GPU, the phase's largest activation peak there.
std::string check_phase_activations(const Setup& s, const planner::PhasePlan& ph, const RunResult& planned,
                                    size_t& over, std::map<int, uint64_t>& act, json& one) {
  std::string detail;
  for (const planner::PhaseComponent& pc : ph.components) {
    const std::string& name = s.plan.components[pc.component].name;
    for (const ComponentRun& c : planned.components) {
      if (c.component != name) continue;
      for (const auto& [gpu, bytes] : c.activation_peak_by_gpu) act[gpu] = std::max(act[gpu], bytes);
      if (!c.forward) continue;
      uint64_t plan_bytes = 0;
      for (const planner::PhaseDevice& d : ph.devices) {
        uint64_t b = 0;
        for (const planner::ReserveItem& ri : d.reserve)
          if (ri.name.rfind(planner::kForwardActivationPrefix, 0) == 0) b += ri.bytes;
        plan_bytes = std::max(plan_bytes, b);
      }
      const bool ok = c.activation_peak_bytes() <= plan_bytes;
      if (!ok) ++over;
      one["activation_peak_bytes"] = c.activation_peak_bytes();
      one["planned_activation_bytes"] = plan_bytes;
      detail += str_cat(", ", ph.name, " activations ", format_size(c.activation_peak_bytes()), " of ",
                        format_size(plan_bytes), ok ? "" : " OVER");
    }
  }
  return detail;
}

// A phase's measured times: its loads at its start, one run of its schedule (its passes' time over
// their number), the job's time of it as the plan predicts it (load + repeat x step).
void phase_times(const planner::PhasePlan& ph, const RunResult::PhaseRun& run, json& one) {
  if (!run.passes) return;
  const double step_s = run.run_ms / 1000.0 / run.passes;
  one["measured_load_s"] = run.load_ms / 1000.0;
  one["measured_step_s"] = step_s;
  one["measured_passes"] = run.passes;
  one["measured_load_bytes"] = run.load_bytes;
  one["measured_time_s"] = run.load_ms / 1000.0 + ph.repeat * step_s;
}

// A plan by phase: per phase and GPU the memory held during the phase (the driver's per-phase
// peak; on the CPU backend with the phase's activation peak and the plan's context and workspace,
// as for the whole run) against the phase's predicted peak, and its measured times beside the
// predicted ones (step: one run of the phase's schedule; time: load + the plan's repeat x step).
// Per GPU, the most memory measured in any phase and the most predicted for any.
using LargestPhase = std::map<int, std::pair<uint64_t, uint64_t>>;

std::string check_phases(const Setup& s, const RunResult& planned, size_t& over, json& report,
                         LargestPhase& largest) {
  std::string detail;
  for (size_t pi = 0; pi < s.plan.phases.size(); ++pi) {
    const planner::PhasePlan& ph = s.plan.phases[pi];
    const RunResult::PhaseRun* run = pi < planned.phases.size() ? &planned.phases[pi] : nullptr;
    json one = {{"phase", ph.name},
                {"repeat", ph.repeat},
                {"predicted_time_s", ph.time_s},
                {"predicted_load_s", ph.load_s},
                {"predicted_step_s", ph.step_s}};
    std::map<int, uint64_t> act;
    detail += check_phase_activations(s, ph, planned, over, act, one);
    if (run) phase_times(ph, *run, one);
    json devs = json::array();
    for (const planner::PhaseDevice& d : ph.devices) {
      json dj = {{"gpu", d.location.gpu}, {"predicted_peak_bytes", d.predicted_peak}};
      const auto it = run ? run->peak_bytes.find(d.location.gpu) : decltype(run->peak_bytes.end()){};
      if (run && it != run->peak_bytes.end()) {
        uint64_t measured = it->second;
        if (!s.on_gpu) {
          measured += act[d.location.gpu];
          for (const planner::ReserveItem& ri : d.reserve)
            if (ri.name == "cuda_context" || ri.name == "cublas_workspace") measured += ri.bytes;
        }
        auto& [most_measured, most_predicted] = largest[d.location.gpu];
        most_measured = std::max(most_measured, measured);
        most_predicted = std::max(most_predicted, d.predicted_peak);
        const bool ok = measured <= d.predicted_peak;
        if (!ok) ++over;
        dj["measured_peak_bytes"] = measured;
        dj["held_bytes"] = it->second;
        dj["ok"] = ok;
        detail += str_cat(", ", ph.name, " gpu ", d.location.gpu, " ", format_size(measured), " of ",
                          format_size(d.predicted_peak), ok ? "" : " OVER");
      }
      devs.push_back(std::move(dj));
    }
    one["devices"] = std::move(devs);
    report.push_back(std::move(one));
  }
  return detail.empty() ? detail : "; by phase:" + detail.substr(1);
}

}  // namespace

void check_peak_memory(const Setup& s, const RunResult& planned, const std::vector<Phase>& phases,
                       Checks& checks) {
  json memory = json::array();
  size_t over = 0;
  std::string detail;
  const bool by_phase = !s.plan.phases.empty();
  for (const DeviceMemory& m : planned.memory) {
    DeviceMemoryCheck d =
        check_device_memory(m, s.plan.find_device(planner::Location::on_gpu(m.device)), s.on_gpu, by_phase);
    // A plan by phase is held to each phase's peak (check_phases, below), not to the whole run's:
    // the whole run's samples mix one phase's memory with another's ops.
    if (!d.ok && !by_phase) ++over;
    if (!by_phase) detail += str_cat(detail.empty() ? "" : "; ", d.detail);
    memory.push_back(std::move(d.entry));
  }
  std::string phase_peaks;
  if (phases.size() > 1)
    for (const ComponentRun& c : planned.components)
      if (c.forward)
        phase_peaks += str_cat(phase_peaks.empty() ? "; forward activations per phase: " : ", ", c.component,
                               " ", format_size(c.activation_peak_bytes()));
  detail += phase_peaks;
  if (by_phase) {
    json plan_phases = json::array();
    LargestPhase largest;
    detail += check_phases(s, planned, over, plan_phases, largest);
    std::string lead;  // per GPU its largest phase
    for (const auto& [gpu, mp] : largest)
      lead += str_cat(lead.empty() ? "" : "; ", "gpu ", gpu, " ", format_size(mp.first), " measured vs ",
                      format_size(mp.second), " predicted (the largest phase's)");
    detail = lead + detail;
    checks.json()["plan_phases"] = std::move(plan_phases);
  }
  if (!s.plan_tokens)
    checks.add("peak memory", CheckResult::Status::Skip,
               str_cat("the plan was made for ", s.plan.settings.tokens, " tokens, this run used ", s.tokens,
                       ": ", detail));
  else
    checks.add("peak memory", over ? CheckResult::Status::Fail : CheckResult::Status::Pass, detail);
  checks.json()["memory"] = std::move(memory);
}

// Per phase, what the checks found.
void report_phases(const RunResult& planned, const std::vector<Phase>& phases, Checks& checks) {
  json& j = checks.json();
  json pj = json::array();
  for (const Phase& p : phases) {
    const ComponentRun* c = nullptr;
    for (const ComponentRun& r : planned.components)
      if (r.component == p.component) c = &r;
    json one = {{"component", p.component},
                {"ran", c && c->forward ? "forward" : "linears only"},
                {"passes", c ? c->passes : 0},
                {"outputs_checked", p.outputs},
                {"nonfinite", p.nonfinite},
                {"streamed_vs_resident_mismatches", p.mismatches},
                {"unread_tensors", c ? c->unread_tensors.size() : 0},
                {"activation_peak_bytes", c ? c->activation_peak_bytes() : 0}};
    if (j.contains("forward_reference"))
      for (const json& fr : j["forward_reference"])
        if (fr["component"] == p.component) one["reference"] = fr;
    pj.push_back(std::move(one));
  }
  j["phases"] = std::move(pj);
}

// Step time. On a GPU, timed in runs of their own without digests: a step then does only a
// model's work.
void check_step_time(const Setup& s, const RunResult& planned, std::vector<double> resident_ms,
                     Checks& checks) {
  std::vector<double> planned_ms = planned.step_ms;
  if (s.on_gpu) {
    RunOptions t = s.run_opts;
    t.digests = false;
    t.outputs = false;
    t.trace = false;
    const RunResult timed = s.backend->run(s.checkpoint, s.schedule, t);
    planned_ms = timed.step_ms;
    // A plan by phase: its phases' times from this run too (no digests), replacing the checked run's.
    json& j = checks.json();
    if (j.contains("plan_phases"))
      for (size_t i = 0; i < s.plan.phases.size() && i < timed.phases.size() && i < j["plan_phases"].size();
           ++i)
        phase_times(s.plan.phases[i], timed.phases[i], j["plan_phases"][i]);
    if (!resident_ms.empty()) {
      t.mode = Mode::AllResident;
      resident_ms = s.backend->run(s.checkpoint, s.schedule, t).step_ms;
    }
  }
  const StepTimes st = step_times(s, planned, planned_ms, resident_ms);
  checks.json()["timing"] = {{"step_ms", planned_ms},
                             {"timed_without_digests", s.on_gpu},
                             {"median_step_ms", st.measured},
                             {"predicted_step_ms", st.predicted},
                             {"ratio", st.ratio},
                             {"all_resident_step_ms", resident_ms},
                             {"all_resident_median_ms", st.resident},
                             {"h2d_bytes_per_step", planned.h2d_bytes_per_step},
                             {"peer_bytes_per_step", planned.peer_bytes_per_step},
                             {"peer_ms", planned.peer_ms},
                             {"peer_median_ms", st.peer_ms},
                             {"peer_gbps", st.peer_gbps},
                             {"profile_p2p_gbps", st.profile_p2p_gbps},
                             {"effective_h2d_gbps", st.gbps}};
  const std::string detail = step_time_detail(st, planned);
  if (!s.on_gpu) {
    checks.add("step time", CheckResult::Status::Info, detail + " (CPU backend: the plan predicts a GPU)");
  } else if (!s.plan_tokens) {
    checks.add("step time", CheckResult::Status::Skip,
               detail + str_cat(" (the plan was made for ", s.plan.settings.tokens, " tokens)"));
  } else if (s.options.time_tolerance) {
    const bool ok = std::fabs(st.ratio - 1.0) <= *s.options.time_tolerance;
    checks.add("step time", ok ? CheckResult::Status::Pass : CheckResult::Status::Fail,
               detail + str_cat(" (tolerance ", fmt("%.0f", *s.options.time_tolerance * 100), "%)"));
  } else {
    checks.add("step time", CheckResult::Status::Info, detail);
  }
}

// The checks, the notes and --outputs in the report, and the report written (--report).
void finish_report(const Setup& s, const RunResult& planned, Checks& checks) {
  const VerifyOptions& o = s.options;
  json& j = checks.json();
  json list = json::array();
  for (const CheckResult& c : checks.report().checks)
    list.push_back({{"name", c.name}, {"status", check_status_name(c.status)}, {"detail", c.detail}});
  j["checks"] = std::move(list);
  j["passed"] = checks.report().passed();
  j["notes"] = planned.notes;
  if (!o.outputs.empty()) {
    write_outputs(o.outputs, s.checkpoint, planned, o.inputs.empty());
    j["outputs"] = o.outputs.string();
    checks.log(str_cat("  outputs: ", o.outputs.string(),
                       o.inputs.empty() ? " (with the inputs drawn from the seed, to replay the run)" : ""));
  }
  if (!o.report.empty()) write_json_file(o.report, j);
}

}  // namespace qtool::runner::verify_detail
