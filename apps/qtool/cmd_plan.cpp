// qtool plan: decides where every module lives (GPUs, pinned host memory, disk) and how offloaded
// weights are streamed, from the checkpoint's headers, a memory budget and a device profile
// (planner/include/qtool/planner/planner.hpp). Writes the plan file with -o, prints a table on
// stderr, the plan as JSON with --json, and an SVG of each device's memory with --svg.
#include <cstdio>
#include <iostream>
#include <memory>
#include <optional>
#include <string>

#include "cli.hpp"
#include "qtool/formats/checkpoint.hpp"
#include "qtool/formats/error.hpp"
#include "qtool/formats/json.hpp"
#include "qtool/formats/size.hpp"
#include "qtool/planner/plan_request.hpp"
#include "qtool/planner/planner.hpp"
#include "qtool/planner/profile_choice.hpp"
#include "qtool/planner/templates.hpp"
#include "qtool/runner/profile.hpp"

#ifndef QTOOL_VERSION
#define QTOOL_VERSION "0.0.0"
#endif

namespace qtool::cli {
namespace {

struct PlanCliOptions {
  std::string checkpoint;
  std::string device_map = "auto";
  std::string max_memory;
  uint64_t tokens = 4096;
  std::string offload = "auto";
  std::optional<uint32_t> blocks_per_group;
  std::optional<uint32_t> prefetch;
  uint32_t denoise_steps = planner::kDefaultDenoiseSteps;
  bool no_phases = false;
  std::string device_profile;
  std::string models_dir;
  std::string output;
  std::string svg;
  bool json = false;
};

// The default device profile's inputs: the GPU's name and a measurement (`qtool profile`'s code),
// which need the runner (planner/profile_choice.hpp says how the profile is chosen).
planner::ProfileChoiceInputs profile_choice_inputs(const GlobalOptions& global) {
  planner::ProfileChoiceInputs in;
  in.device_name = runner::gpu_device_name(0);  // loads CUDA only now, and only with CUDA support
  in.devices_dir = planner::find_data_subdir("devices");
  in.cache_dir = planner::profile_cache_dir();
  in.measure = [&global] {
    runner::ProfileOptions p;
    p.backend = "cuda";
    p.log = [&global](std::string_view line) { verbose(global, std::string(line)); };
    return runner::measure_profile(p);
  };
  in.warn = [](std::string_view line) { warn(std::string(line)); };
  in.info = [&global](std::string_view line) { info(global, std::string(line)); };
  return in;
}

int run_plan(const PlanCliOptions& o, const GlobalOptions& global) {
  planner::PlanRequest r;
  r.checkpoint = o.checkpoint;
  r.options.strategy = planner::parse_strategy(o.device_map);
  r.options.offload = planner::parse_offload_mode(o.offload);
  r.options.tokens = o.tokens;
  r.options.blocks_per_group = o.blocks_per_group;
  r.options.prefetch = o.prefetch;
  r.options.denoise_steps = o.denoise_steps;
  r.options.by_phase = !o.no_phases;
  r.options.qtool_version = QTOOL_VERSION;
  if (o.device_profile.empty())
    r.choice = profile_choice_inputs(global);
  else
    r.profile = with_option("--device-profile", [&] {
      return planner::named_device_profile(o.device_profile, "--device-profile");
    });
  r.models_dir = o.models_dir;
  r.max_memory = o.max_memory;
  r.info = [&global](std::string_view line) { info(global, std::string(line)); };
  r.warn = [](std::string_view line) { warn(std::string(line)); };
  const planner::Plan plan = planner::plan_checkpoint(r);
  if (!o.output.empty()) write_plan(o.output, plan);
  if (!o.svg.empty()) write_text_file(o.svg, planner::plan_svg(plan));
  if (!global.quiet) std::fputs(planner::plan_table(plan).c_str(), stderr);
  if (!o.output.empty()) info(global, "wrote " + o.output);
  if (o.json) std::cout << dump_json(planner::plan_to_json(plan), 2) << "\n";
  return 0;
}

void declare_plan(CLI::App* cmd, PlanCliOptions& o) {
  cmd->add_option("checkpoint", o.checkpoint,
                  "A .safetensors file, a model folder or a diffusers pipeline folder")
      ->required();
  cmd->add_option("--device-map", o.device_map,
                  "sequential (fill GPU 0, then 1, ...), balanced (even load), balanced_low_0 (GPU 0 light), "
                  "auto (balanced with several GPUs)")
      ->default_val("auto");
  cmd->add_option(
      "--max-memory", o.max_memory,
      "Budget per device: 0=20GiB,1=20GiB,cpu=64GiB, accelerate's JSON dict {\"0\": \"20GiB\", "
      "\"cpu\": \"64GiB\"}, or a file holding either. Default: the GPUs' free memory and the host's "
      "available memory");
  cmd->add_option("--tokens", o.tokens, "Activation rows per linear layer (sizes the activation buffers)")
      ->default_val(4096)
      ->check(count_range(1, static_cast<int64_t>(planner::kMaxTokens)));
  cmd->add_option("--offload", o.offload,
                  "Offload groups: block (N consecutive blocks), leaf (single layers), auto")
      ->default_val("auto");
  cmd->add_option("--blocks-per-group", o.blocks_per_group,
                  "Blocks per offload group (block mode); default: chosen")
      ->check(count_range(1, planner::kMaxBlocksPerGroup));
  cmd->add_option("--prefetch", o.prefetch,
                  "Device slots per streaming GPU (prefetch depth); default: chosen")
      ->check(count_range(1, planner::kMaxPrefetch));
  cmd->add_option(
         "--denoise-steps", o.denoise_steps,
         "Denoising steps of a pipeline planned by phase (FluxPipeline: the transformer's phase runs "
         "this many times); other checkpoints ignore it")
      ->default_val(planner::kDefaultDenoiseSteps)
      ->check(count_range(1, planner::kMaxDenoiseSteps));
  cmd->add_flag("--no-phases", o.no_phases,
                "Plan a pipeline with phases as one sequence, every component present together (qtool verify "
                "does not yet load or release components between phases)");
  cmd->add_option(
      "--device-profile", o.device_profile,
      "Device profile JSON (or a name in sample_configs/devices/); default: the GPU's (built in by "
      "name, or measured once and cached under $XDG_CACHE_HOME/qtool/profiles), h100-pcie-gen5 "
      "without a GPU");
  cmd->add_option("--models-dir", o.models_dir, "Folder of model templates (default sample_configs/models/)");
  cmd->add_option("-o,--output", o.output, "Write the plan file here");
  cmd->add_option("--svg", o.svg, "Draw each device's memory as an SVG bar chart");
  cmd->add_flag("--json", o.json, "Print the plan as JSON on stdout");
}

const CommandRegistrar kRegistrar(
    40, "plan",
    "Place every module of a checkpoint on GPUs, pinned host memory or disk within a memory budget, "
    "with offloaded weights streamed in groups through device slots; predict each device's peak memory "
    "and the time of one step (a pipeline with phases, e.g. FluxPipeline: per phase, and the whole "
    "job's time). Reads only the checkpoint's headers.",
    declare_plan, run_plan);

}  // namespace
}  // namespace qtool::cli
