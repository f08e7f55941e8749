// qtool verify CKPT --plan plan.json [--reference ORIGINAL] [--inputs IN] [--outputs OUT] ...: runs
// the plan on its checkpoint (the real forward of Llama and Flux components on the CPU backend; a
// FluxPipeline folder as the pipeline, --denoise-steps N; the
// CUDA backend, or components without a forward, run their linears) and checks it; exit 0 when
// every check passes, 1 when one fails (named), 2 for bad input such as a plan made for another
// checkpoint or a missing, misnamed or mis-shaped input.
#include <cstdio>
#include <memory>
#include <optional>
#include <string>

#include "cli.hpp"
#include "qtool/formats/error.hpp"
#include "qtool/formats/json.hpp"
#include "qtool/formats/thread_pool.hpp"
#include "qtool/planner/plan.hpp"
#include "qtool/runner/pipeline.hpp"
#include "qtool/runner/verify.hpp"

namespace qtool::cli {
namespace {

// The options runner::verify takes are parsed into `verify` directly; the three whose default is
// "not given" have a sentinel here.
struct VerifyCliOptions {
  runner::VerifyOptions verify;
  uint64_t tokens = 0;         // 0: the plan's
  uint32_t denoise_steps = 0;  // 0: runner::kDefaultDenoiseSteps
  double time_tolerance = -1;  // < 0: report the step time only
  bool json = false;
};

int run_verify(const VerifyCliOptions& o, const GlobalOptions& global) {
  runner::VerifyOptions v = o.verify;
  if (o.tokens) v.tokens = o.tokens;
  if (o.denoise_steps) v.denoise_steps = o.denoise_steps;
  if (o.time_tolerance >= 0) v.time_tolerance = o.time_tolerance;
  v.log = [&global](std::string_view line) { info(global, line); };
  const runner::VerifyReport report = runner::verify(v);
  if (o.json) std::printf("%s\n", dump_json(report.json, 2).c_str());
  if (report.passed()) {
    info(global, "verify: every check passed");
    return 0;
  }
  std::string names;
  for (const std::string& n : report.failed_names()) names += (names.empty() ? "" : ", ") + n;
  std::fprintf(stderr, "qtool: verify failed: %s\n", names.c_str());
  return 1;
}

void declare_verify(CLI::App* cmd, VerifyCliOptions& o) {
  cmd->add_option("CKPT", o.verify.checkpoint, "The checkpoint the plan was made for")->required();
  cmd->add_option("--plan", o.verify.plan, "The plan (qtool plan -o plan.json)")->required();
  cmd->add_option(
      "--reference", o.verify.reference,
      "The original (unquantized) checkpoint: each linear's output is compared with the original's");
  add_backend_option(cmd, o.verify.backend);
  cmd->add_option("--tokens", o.tokens, "Activation rows per linear (default: the plan's)")
      ->check(count_range(1, static_cast<int64_t>(planner::kMaxTokens)));
  cmd->add_option("--steps", o.verify.steps, "Steps to run; the first is a warm-up for timing (default 3)")
      ->check(CLI::Range(1u, 100000u));
  cmd->add_option("--denoise-steps", o.denoise_steps,
                  str_cat("A FluxPipeline folder: denoising steps of the transformer (default ",
                          runner::kDefaultDenoiseSteps, "); each run step runs the whole pipeline"))
      ->check(CLI::Range(1u, runner::kMaxDenoiseSteps));
  cmd->add_option("--seed", o.verify.seed, "Seed of the activations (step s uses seed + s)");
  cmd->add_flag(
      "--poison", o.verify.poison,
      "Also run once with every host arena overwritten right after its copy: outputs must not change");
  cmd->add_option("--time-tolerance", o.time_tolerance,
                  "Fail when the measured step time is off the plan's prediction by more than this fraction "
                  "(e.g. 0.2); without it the step time is reported only")
      ->check(CLI::Range(0.0, 100.0));
  cmd->add_option(
      "--inputs", o.verify.inputs,
      "The forward's inputs (safetensors) under the framework's argument names: input_ids [B, T] "
      "(Llama); hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, "
      "guidance (Flux); prefixed by the component in a pipeline (transformer.hidden_states). A "
      "FluxPipeline folder takes the pipeline's: text_encoder.input_ids, text_encoder_2.input_ids and "
      "latents [B, image tokens, in_channels] (packed, as FluxPipeline's latents=). Default: drawn from "
      "--seed at the plan's tokens");
  cmd->add_option(
      "--outputs", o.verify.outputs,
      "Write the forward's output (logits / sample, F32, prefixed in a pipeline) to this safetensors "
      "file, with the inputs when they were drawn from the seed; a FluxPipeline run writes its final "
      "latents as `images` (FluxPipeline(output_type=\"latent\").images) and the encoders' outputs");
  cmd->add_option("--report", o.verify.report, "Write the report as JSON to this file");
  cmd->add_option(
      "--trace", o.verify.trace,
      "Write a Chrome trace-event JSON of the copy and compute streams (Perfetto, chrome://tracing)");
  add_threads_option(cmd, o.verify.threads, "CPU threads (CPU backend and host checks; default: every core)");
  cmd->add_flag("--json", o.json, "Print the report as JSON on stdout");
}

const CommandRegistrar kRegistrar(
    50, "verify",
    "Run a plan on its checkpoint (the model's real forward where qtool has it) and check it: fingerprint, "
    "finite outputs, streamed == all-resident bit for bit, error against the original model, peak memory "
    "and step time against the plan",
    declare_verify, run_verify);

}  // namespace
}  // namespace qtool::cli
