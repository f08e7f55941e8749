// verify's checks on the planned run itself and against the runs it is compared with
// (verify_checks.hpp): finite outputs, every tensor read, streamed == resident, no state left behind.
#include <algorithm>
#include <cstring>
#include <random>

#include "qtool/formats/error.hpp"
#include "qtool/formats/size.hpp"
#include "qtool/runner/driver.hpp"
#include "verify_checks.hpp"

namespace qtool::runner::verify_detail {

using nlohmann::json;

namespace {

size_t count_linears_only(const Schedule& schedule, const RunResult& run) {
  const std::vector<bool> mask = linears_only_mask(schedule, run);
  return static_cast<size_t>(std::count(mask.begin(), mask.end(), true));
}

// The component of a digest name ("transformer[denoise 3]/x_embedder" -> "transformer").
std::string component_of_unit(const std::string& unit_name) {
  const size_t slash = unit_name.find('/');
  if (slash == std::string::npos) return "";
  return unit_name.substr(0, std::min(slash, unit_name.find('[')));
}

Phase& phase_of(std::vector<Phase>& phases, const std::string& component) {
  for (Phase& p : phases)
    if (p.component == component) return p;
  QTOOL_ASSERT(false);
  return phases.front();
}

// "text_encoder 14, text_encoder_2 12, ...": one figure per phase.
std::string per_phase(const std::vector<Phase>& phases,
                      const std::function<std::string(const Phase&)>& what) {
  if (phases.size() < 2) return "";
  std::string s;
  for (const Phase& p : phases) s += str_cat(s.empty() ? "" : ", ", p.component, " ", what(p));
  return " (per phase: " + s + ")";
}

// Non-finite values found so far, and where the first was.
struct NonFinite {
  uint64_t count = 0;
  std::string first;
  void add(uint64_t n, Phase& phase, const std::function<std::string()>& where) {
    if (!n) return;
    count += n;
    phase.nonfinite += n;
    if (first.empty()) first = where();
  }
};

// Outputs that differ from the resident run's, and where the first was.
struct Mismatches {
  size_t count = 0;
  std::string first;
  void add(Phase& phase, const std::function<std::string()>& where) {
    if (!count) first = where();
    ++count;
    ++phase.mismatches;
  }
};

}  // namespace

void check_finite_outputs(const Setup& s, const RunResult& planned, std::vector<Phase>& phases,
                          Checks& checks) {
  const Schedule& schedule = s.schedule;
  const std::vector<bool> linears_only = linears_only_mask(schedule, planned);
  NonFinite bad;
  for (uint32_t st = 0; st < planned.digests.size(); ++st)
    for (size_t li = 0; li < schedule.linears.size(); ++li) {
      if (!linears_only[li]) continue;
      const LinearTask& l = schedule.linears[li];
      Phase& ph = phase_of(phases, l.component);
      ++ph.outputs;
      bad.add(planned.digests[st][li].nonfinite, ph, [&] {
        return str_cat(l.component.empty() ? "" : l.component + "/", l.module, " (step ", st, ")");
      });
    }
  for (uint32_t st = 0; st < planned.unit_digests.size(); ++st)
    for (size_t u = 0; u < planned.unit_names.size(); ++u) {
      Phase& ph = phase_of(phases, component_of_unit(planned.unit_names[u]));
      ++ph.outputs;
      bad.add(planned.unit_digests[st][u].nonfinite, ph,
              [&] { return str_cat(planned.unit_names[u], " (step ", st, ")"); });
    }
  // The final latents are not a unit's output: checked on their own.
  if (planned.pipeline.ran) {
    const HostTensor& img = planned.pipeline.images;
    bad.add(host_digest(img.bytes.data(), img.bytes.size() / 4, DType::F32).nonfinite,
            phase_of(phases, "transformer"), [] { return std::string("the final latents"); });
  }
  const std::string phase_detail = per_phase(phases, [](const Phase& p) {
    return p.nonfinite ? str_cat(p.nonfinite, " non-finite") : std::string("finite");
  });
  checks.add("finite outputs", bad.count ? CheckResult::Status::Fail : CheckResult::Status::Pass,
             bad.count
                 ? str_cat(bad.count, " non-finite output values, first in ", bad.first, phase_detail)
                 : str_cat(count_linears_only(schedule, planned), " linears and ", planned.unit_names.size(),
                           " forward unit outputs", planned.pipeline.ran ? " and the final latents" : "",
                           " x ", s.options.steps, " steps, every value finite", phase_detail));
}

void report_pipeline(const RunResult& planned, Checks& checks) {
  if (!planned.pipeline.ran) return;
  const PipelineRun& pr = planned.pipeline;
  checks.json()["pipeline"] = {{"class", "FluxPipeline"},
                               {"denoise_steps", pr.denoise_steps},
                               {"mu", pr.schedule.mu},
                               {"sigmas", pr.schedule.sigmas},
                               {"timesteps", pr.schedule.timesteps},
                               {"timestep_inputs", pr.timestep_inputs},
                               {"guidance", pr.guidance},
                               {"latent_grid", {pr.grid_rows, pr.grid_cols}},
                               {"latents_shape", pr.latents.shape},
                               {"phases",
                                {"text_encoder (CLIP): pooler_output -> pooled_projections",
                                 "text_encoder_2 (T5): last_hidden_state -> encoder_hidden_states",
                                 str_cat("transformer x ", pr.denoise_steps, " (flow-matching Euler)"),
                                 "vae: linears only (its convolutions are not executed)"}}};
  checks.log(str_cat(
      "  FluxPipeline: text_encoder -> text_encoder_2 -> transformer x ", pr.denoise_steps,
      " denoising steps (sigmas ", fmt("%.4f", pr.schedule.sigmas.front()), " .. ",
      fmt("%.4f", pr.schedule.sigmas[pr.schedule.sigmas.size() - 2]), ", mu ", fmt("%.4f", pr.schedule.mu),
      pr.guidance > 0 ? str_cat(", guidance ", fmt("%.2f", pr.guidance)) : std::string(), ", latents [",
      pr.latents.shape[0], ", ", pr.latents.shape[1], ", ", pr.latents.shape[2], "] on a ", pr.grid_rows, "x",
      pr.grid_cols, " grid) -> vae (linears only: its convolutions are not executed)"));
}

// What each component ran, on stderr and in the report.
void report_components(const RunResult& run, Checks& checks) {
  json comps = json::array();
  for (const ComponentRun& c : run.components) {
    const std::string name = c.component.empty() ? "model" : c.component;
    json cj = {{"component", c.component}, {"ran", c.forward ? "forward" : "linears only"}};
    if (c.forward) {
      cj["architecture"] = c.architecture;
      cj["units"] = c.units;
      cj["output"] = {{"name", c.output.name}, {"shape", c.output.shape}, {"dtype", "F32"}};
      cj["activation_peak_bytes"] = c.activation_peak_bytes();
      std::string shape;
      for (int64_t d : c.output.shape) shape += (shape.empty() ? "" : ", ") + std::to_string(d);
      cj["passes"] = c.passes;
      checks.log(str_cat("  ", name, ": ", c.architecture, " forward, ", c.units.size(), " units",
                         c.passes > 1 ? str_cat(" x ", c.passes, " passes") : std::string(), ", output ",
                         c.output.name, " [", shape, "], activations ",
                         format_size(c.activation_peak_bytes())));
    } else {
      checks.log(str_cat("  ", name, ": linears only (no forward for its architecture yet)"));
    }
    comps.push_back(std::move(cj));
  }
  checks.json()["components"] = std::move(comps);
}

// Every tensor of a component that ran its forward must have been read by it.
void check_weights_read(const RunResult& run, Checks& checks) {
  size_t n_forwards = 0, unread = 0;
  std::string first;
  for (const ComponentRun& c : run.components) {
    if (!c.forward) continue;
    ++n_forwards;
    unread += c.unread_tensors.size();
    for (size_t i = 0; i < c.unread_tensors.size() && i < 3; ++i)
      first +=
          (first.empty() ? "" : ", ") + (c.component.empty() ? "" : c.component + "/") + c.unread_tensors[i];
  }
  if (n_forwards == 0)
    checks.add("every tensor read", CheckResult::Status::Skip, "no component ran a forward");
  else if (unread)
    checks.add("every tensor read", CheckResult::Status::Fail,
               str_cat(unread, " tensors never read by the forward: ", first));
  else
    checks.add("every tensor read", CheckResult::Status::Pass,
               str_cat("the forward of ", n_forwards, " component(s) read every tensor"));
}

ResidentRun run_all_resident(const Setup& s, const Checks& checks) {
  ResidentRun res;
  RunOptions r = s.run_opts;
  r.mode = Mode::AllResident;
  r.trace = false;
  try {
    RunResult run = s.backend->run(s.checkpoint, s.schedule, r);
    res.digests = std::move(run.digests);
    res.units = std::move(run.unit_digests);
    res.step_ms = std::move(run.step_ms);
    res.images = std::move(run.pipeline.images);
    res.how = "an all-resident run";
  } catch (const Error& e) {
    if (e.kind() != ErrorKind::InvalidInput) throw;
    checks.log(
        str_cat("  all-resident run impossible (", e.what(), "); comparing each layer run alone instead"));
    res.how = "each layer run alone from the mapped checkpoint (all-resident does not fit)";
    const Schedule& schedule = s.schedule;
    res.digests.assign(1, std::vector<LayerDigest>(schedule.linears.size()));
    for (size_t li = 0; li < schedule.linears.size(); ++li) {
      const LinearTask& l = schedule.linears[li];
      const int dev = schedule.steps[l.step].device;
      res.digests[0][li] = s.backend
                               ->run_layer(schedule.bind_mapped(l, s.checkpoint), s.tokens,
                                           linears_only_ld(schedule, l), s.options.seed, dev)
                               .digest;
    }
  }
  return res;
}

void check_streamed_vs_resident(const Setup& s, const RunResult& planned, const ResidentRun& resident,
                                std::vector<Phase>& phases, Checks& checks) {
  const Schedule& schedule = s.schedule;
  const std::vector<bool> compared = linears_only_mask(schedule, planned);
  Mismatches diff;
  size_t n_outputs = 0;
  const size_t n_cmp = std::min(resident.digests.size(), planned.digests.size());
  for (size_t st = 0; st < n_cmp; ++st)
    for (size_t li = 0; li < schedule.linears.size(); ++li) {
      if (!compared[li]) continue;
      ++n_outputs;
      if (!(resident.digests[st][li] == planned.digests[st][li]))
        diff.add(phase_of(phases, schedule.linears[li].component),
                 [&] { return str_cat(schedule.linears[li].module, " (step ", st, ")"); });
    }
  const size_t n_units = std::min(resident.units.size(), planned.unit_digests.size());
  for (size_t st = 0; st < n_units; ++st)
    for (size_t u = 0; u < planned.unit_names.size(); ++u) {
      ++n_outputs;
      if (!(resident.units[st][u] == planned.unit_digests[st][u]))
        diff.add(phase_of(phases, component_of_unit(planned.unit_names[u])),
                 [&] { return str_cat(planned.unit_names[u], " (step ", st, ")"); });
    }
  // A pipeline's final latents: the last run step's, bit for bit.
  if (planned.pipeline.ran && !resident.images.bytes.empty()) {
    ++n_outputs;
    if (resident.images.bytes != planned.pipeline.images.bytes)
      diff.add(phase_of(phases, "transformer"), [] { return std::string("the final latents"); });
  }
  const std::string phase_detail = per_phase(phases, [](const Phase& p) {
    return p.mismatches ? str_cat(p.mismatches, " differ") : std::string("identical");
  });
  checks.add(
      "streamed == resident", diff.count ? CheckResult::Status::Fail : CheckResult::Status::Pass,
      diff.count
          ? str_cat(diff.count, " outputs differ from ", resident.how, ", first ", diff.first, phase_detail)
          : str_cat(n_outputs, " outputs (linears, forward units: every op's output",
                    planned.pipeline.ran ? "; the final latents" : "", ") bitwise identical to ",
                    resident.how, s.n_streamed ? "" : " (nothing is streamed in this plan)", phase_detail));
}

// No quant state left behind: each host arena poisoned right after its (last) copy.
void check_no_state_left_behind(const Setup& s, const RunResult& planned, Checks& checks) {
  if (s.n_streamed == 0) {
    checks.add("no state left behind", CheckResult::Status::Skip, "nothing is streamed");
    return;
  }
  const Schedule& schedule = s.schedule;
  std::vector<size_t> last_use(schedule.arenas.size(), SIZE_MAX);
  for (size_t si = 0; si < schedule.steps.size(); ++si)
    if (schedule.steps[si].streamed) last_use[schedule.steps[si].arena] = si;
  RunOptions r = s.run_opts;
  r.steps = 1;
  r.trace = false;
  size_t poisoned = 0;
  std::mt19937_64 rng(s.options.seed ^ 0xBADC0FFEEull);
  // A pinned (cpu) arena is copied again by a later pass (a pipeline's next denoising step):
  // poisoned after its last copy of the run step only.
  std::vector<uint32_t> copied(schedule.steps.size(), 0);
  r.after_copy = [&](size_t step, std::span<uint8_t> host) {
    const ExecStep& st = schedule.steps[step];
    ++copied[step];
    if (schedule.arenas[st.arena].placement == Placement::Cpu &&
        (last_use[st.arena] != step ||
         (step < planned.copies_per_step.size() && copied[step] < planned.copies_per_step[step])))
      return;
    for (size_t i = 0; i + 8 <= host.size(); i += 8) {
      const uint64_t v = rng();
      std::memcpy(host.data() + i, &v, 8);
    }
    ++poisoned;
  };
  const RunResult res = s.backend->run(s.checkpoint, schedule, r);
  const size_t n_linears = schedule.linears.size();
  size_t mismatches = 0;
  for (size_t li = 0; li < n_linears; ++li)
    mismatches += res.digests[0][li] == planned.digests[0][li] ? 0 : 1;
  for (size_t u = 0; u < planned.unit_names.size(); ++u)
    mismatches += res.unit_digests[0][u] == planned.unit_digests[0][u] ? 0 : 1;
  if (planned.pipeline.ran && res.pipeline.images.bytes != planned.pipeline.images.bytes) ++mismatches;
  checks.add("no state left behind", mismatches ? CheckResult::Status::Fail : CheckResult::Status::Pass,
             mismatches
                 ? str_cat(mismatches, " outputs changed after host arenas were overwritten post-copy")
                 : str_cat(poisoned, " host arenas overwritten with random bytes right after their copy; ",
                           n_linears + planned.unit_names.size(), " outputs unchanged"));
}

}  // namespace qtool::runner::verify_detail
