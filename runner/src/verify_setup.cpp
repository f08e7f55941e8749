// verify's set-up (verify_checks.hpp): the checkpoint and its plan, the backend, the run's sizes
// and inputs, each checked before anything runs or is written.
#include <algorithm>
#include <map>

#include "qtool/formats/checked.hpp"
#include "qtool/formats/error.hpp"
#include "qtool/runner/pipeline.hpp"
#include "verify_checks.hpp"
#include "verify_forward.hpp"

namespace qtool::runner::verify_detail {
namespace {

// The plan's schedule on the checkpoint, once the plan is known to be this checkpoint's.
Schedule schedule_for(const Checkpoint& checkpoint, const planner::Plan& plan, const std::string& fingerprint,
                      const VerifyOptions& options) {
  if (plan.fingerprint != fingerprint)
    fail(ErrorKind::InvalidInput, options.plan.string(),
         ": the plan was made for a checkpoint with fingerprint ", plan.fingerprint, " (", plan.checkpoint,
         ") but ", options.checkpoint.string(), " has fingerprint ", fingerprint, ": plan it again");
  return build_schedule(checkpoint, plan);
}

std::unique_ptr<Backend> make_backend(const VerifyOptions& options, const Checks& checks) {
  if (options.backend == "cpu") return make_cpu_backend(options.threads);
  if (options.backend == "cuda") return make_cuda_backend();
  if (options.backend == "auto") {
    if (cuda_backend_available()) return make_cuda_backend();
    checks.log("no CUDA device: using the CPU backend");
    return make_cpu_backend(options.threads);
  }
  fail(ErrorKind::Usage, "--backend: '", options.backend, "' is not auto, cuda or cpu");
}

// --tokens, or the plan's (16 when it has none), within what every buffer can hold.
uint64_t checked_tokens(const VerifyOptions& options, const planner::Plan& plan, const Schedule& schedule) {
  const uint64_t tokens = options.tokens.value_or(plan.settings.tokens ? plan.settings.tokens : 16);
  if (tokens == 0 || tokens > planner::kMaxTokens)
    fail(ErrorKind::Usage, "--tokens: ", tokens, " is not from 1 to ", planner::kMaxTokens);
  // Every buffer the backends size from tokens (activations [tokens, in or out], 2 or 4 bytes an
  // element) stays below this product, so none of their multiplications wraps.
  for (int dev : schedule.devices) {
    if (!checked_mul(tokens, std::max(schedule.max_in(dev), schedule.max_out(dev)), 8))
      fail(ErrorKind::Usage, "--tokens: ", tokens, " rows of ",
           std::max(schedule.max_in(dev), schedule.max_out(dev)), " values overflow 64 bits");
  }
  return tokens;
}

// The denoising steps of a FluxPipeline run (0 for any other checkpoint, and for a FluxPipeline
// folder without its encoders: its components run on their own inputs).
uint32_t checked_denoise_steps(const VerifyOptions& options, const Checkpoint& checkpoint) {
  const bool named = is_flux_pipeline(checkpoint);
  const std::string missing = named ? missing_pipeline_components(checkpoint) : std::string();
  const bool flux_pipeline = named && missing.empty();
  if (options.denoise_steps && !named)
    fail(ErrorKind::Usage, "--denoise-steps: ", options.checkpoint.string(),
         " is not a pipeline folder whose model_index.json names FluxPipeline");
  if (options.denoise_steps && !flux_pipeline)
    fail(ErrorKind::Usage, "--denoise-steps: ", options.checkpoint.string(),
         " is a FluxPipeline folder without its ", missing, ": it cannot run the pipeline");
  const uint32_t denoise_steps = options.denoise_steps.value_or(kDefaultDenoiseSteps);
  if (denoise_steps < 1 || denoise_steps > kMaxDenoiseSteps)
    fail(ErrorKind::Usage, "--denoise-steps: ", denoise_steps, " is not from 1 to ", kMaxDenoiseSteps);
  return flux_pipeline ? denoise_steps : 0;
}

}  // namespace

Setup::Setup(const VerifyOptions& o, const Checks& checks)
    : options(o),
      checkpoint(Checkpoint::open(o.checkpoint)),
      plan(planner::read_plan(o.plan)),
      fingerprint(checkpoint.fingerprint()),
      schedule(schedule_for(checkpoint, plan, fingerprint, o)),
      backend(make_backend(o, checks)) {
  on_gpu = backend->name() == "cuda";
  tokens = checked_tokens(options, plan, schedule);
  if (options.steps == 0) fail(ErrorKind::Usage, "--steps must be at least 1");
  plan_tokens = tokens == plan.settings.tokens;
  run_denoise = checked_denoise_steps(options, checkpoint);
  // Bad inputs stop here (exit 2), before anything runs or is written.
  std::map<std::string, std::vector<HostTensor>> inputs;
  if (!options.inputs.empty())
    inputs =
        read_inputs(options.inputs, checkpoint,
                    static_cast<int64_t>(plan.settings.tokens ? plan.settings.tokens : tokens), run_denoise);
  for (const ExecStep& st : schedule.steps) {
    if (!st.streamed) continue;
    ++n_streamed;
    if (schedule.arenas[st.arena].placement == Placement::Disk) ++n_disk;
  }
  run_opts.tokens = tokens;
  run_opts.steps = options.steps;
  run_opts.seed = options.seed;
  run_opts.trace = !options.trace.empty();
  run_opts.sizing.cublas_workspace_bytes = plan.profile.cublas_workspace_bytes;
  run_opts.sizing.alloc_granularity_bytes = plan.profile.alloc_granularity_bytes;
  run_opts.sizing.staging_buffers = schedule.n_slots;  // the planner's staging ring: K buffers
  run_opts.inputs = std::move(inputs);
  run_opts.denoise_steps = run_denoise;
  // A plan by phase runs as planned: components loaded and rings allocated per phase.
  for (const planner::PhasePlan& ph : plan.phases) {
    RunOptions::Phase& rp = run_opts.phases.emplace_back();
    rp.name = ph.name;
    for (const planner::PhaseComponent& c : ph.components) {
      rp.components.push_back(plan.components[c.component].name);
      if (c.mode != planner::PhaseMode::Resident) rp.load.push_back(plan.components[c.component].name);
    }
    for (const planner::PhaseDevice& d : ph.devices)
      if (d.location.is_gpu() && d.n_slots) rp.slots[d.location.gpu] = d.n_slots;
  }
}

void report_setup(const Setup& s, Checks& checks) {
  const VerifyOptions& o = s.options;
  checks.log(str_cat("verify ", o.checkpoint.string(), " with ", o.plan.string(), " on ",
                     s.backend->device_names()));
  checks.log(str_cat("  ", s.schedule.steps.size(), " steps (", s.n_streamed, " streamed, ", s.n_disk,
                     " from disk), ", s.schedule.linears.size(), " linears, ", s.schedule.devices.size(),
                     " GPU(s), ", s.schedule.n_slots, " slots, tokens ", s.tokens, ", ", o.steps,
                     " run steps"));
  nlohmann::json& j = checks.json();
  j["checkpoint"] = o.checkpoint.string();
  j["plan"] = o.plan.string();
  j["fingerprint"] = s.fingerprint;
  j["backend"] = s.backend->name();
  j["devices"] = s.backend->device_names();
  j["tokens"] = s.tokens;
  j["steps"] = o.steps;
  j["seed"] = o.seed;
  checks.add(
      "plan matches checkpoint", CheckResult::Status::Pass,
      str_cat("fingerprint ", s.fingerprint,
              "; device map, groups, schedule, linears and tied aliases agree with it (plan_checks.hpp)"));
}

}  // namespace qtool::runner::verify_detail
