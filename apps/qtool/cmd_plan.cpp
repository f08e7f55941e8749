// qtool plan: decides where every module lives (GPUs, pinned host memory, disk) and how offloaded
// weights are streamed, from the checkpoint's headers, a memory budget and a device profile
// (planner/include/qtool/planner/planner.hpp). Writes the plan file with -o, prints a table on
// stderr, the plan as JSON with --json, and an SVG of each device's memory with --svg.
#include <cstdio>
#include <fstream>
#include <iostream>
#include <memory>
#include <optional>
#include <string>

#include "cli.hpp"
#include "qtool/formats/checkpoint.hpp"
#include "qtool/formats/error.hpp"
#include "qtool/formats/json.hpp"
#include "qtool/formats/size.hpp"
#include "qtool/planner/planner.hpp"
#include "qtool/planner/profile_choice.hpp"
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
  std::string device_profile;
  std::string models_dir;
  std::string output;
  std::string svg;
  bool json = false;
};

// --device-profile: a profile file or a name from sample_configs/devices/. Without it, the profile
// of the GPU found (built in by name, cached, or measured once and cached), or the default H100
// profile without a GPU (planner/profile_choice.hpp). Returns the profile and a sentence saying
// which it is.
planner::ProfileChoice load_profile(const GlobalOptions& global, const std::string& spec) {
  namespace fs = std::filesystem;
  if (!spec.empty()) {
    std::error_code ec;
    if (fs::is_regular_file(spec, ec))
      return {planner::load_device_profile(spec), "device profile " + spec + " (--device-profile)"};
    if (auto dir = planner::find_data_subdir("devices")) {
      const fs::path p = *dir / (spec + ".json");
      if (fs::is_regular_file(p, ec))
        return {planner::load_device_profile(p),
                "device profile " + spec + " (" + p.string() + ", --device-profile)"};
    }
    fail(ErrorKind::Usage, "--device-profile: '", spec, "' is neither a file nor a profile in sample_configs/devices/");
  }
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
  return planner::choose_device_profile(in);
}

void add_plan(CLI::App& app, const GlobalOptions& global, CommandFn& run) {
  auto o = std::make_shared<PlanCliOptions>();
  CLI::App* cmd = app.add_subcommand(
      "plan",
      "Place every module of a checkpoint on GPUs, pinned host memory or disk within a memory budget, "
      "with offloaded weights streamed in groups through device slots; predict each device's peak memory "
      "and the time of one step. Reads only the checkpoint's headers.");
  cmd->add_option("checkpoint", o->checkpoint, "A .safetensors file, a model folder or a diffusers pipeline folder")
      ->required();
  cmd->add_option("--device-map", o->device_map,
                  "sequential (fill GPU 0, then 1, ...), balanced (even load), balanced_low_0 (GPU 0 light), "
                  "auto (balanced with several GPUs)")
      ->default_val("auto");
  cmd->add_option("--max-memory", o->max_memory,
                  "Budget per device: 0=20GiB,1=20GiB,cpu=64GiB, accelerate's JSON dict {\"0\": \"20GiB\", "
                  "\"cpu\": \"64GiB\"}, or a file holding either. Default: the GPUs' free memory and the host's "
                  "available memory");
  cmd->add_option("--tokens", o->tokens, "Activation rows per linear layer (sizes the activation buffers)")
      ->default_val(4096)
      ->check(count_range(1, static_cast<int64_t>(planner::kMaxTokens)));
  cmd->add_option("--offload", o->offload, "Offload groups: block (N consecutive blocks), leaf (single layers), auto")
      ->default_val("auto");
  cmd->add_option("--blocks-per-group", o->blocks_per_group,
                  "Blocks per offload group (block mode); default: chosen")
      ->check(count_range(1, planner::kMaxBlocksPerGroup));
  cmd->add_option("--prefetch", o->prefetch,
                  "Device slots per streaming GPU (prefetch depth); default: chosen")
      ->check(count_range(1, planner::kMaxPrefetch));
  cmd->add_option(
      "--device-profile", o->device_profile,
      "Device profile JSON (or a name in sample_configs/devices/); default: the GPU's (built in by "
      "name, or measured once and cached under $XDG_CACHE_HOME/qtool/profiles), h100-pcie-gen5 "
      "without a GPU");
  cmd->add_option("--models-dir", o->models_dir, "Folder of model templates (default sample_configs/models/)");
  cmd->add_option("-o,--output", o->output, "Write the plan file here");
  cmd->add_option("--svg", o->svg, "Draw each device's memory as an SVG bar chart");
  cmd->add_flag("--json", o->json, "Print the plan as JSON on stdout");
  cmd->callback([&global, &run, o] {
    run = [&global, o]() -> int {
      planner::PlanOptions opt;
      opt.strategy = planner::parse_strategy(o->device_map);
      opt.offload = planner::parse_offload_mode(o->offload);
      opt.tokens = o->tokens;
      if (o->tokens == 0) fail(ErrorKind::Usage, "--tokens must be positive");
      opt.blocks_per_group = o->blocks_per_group;
      opt.prefetch = o->prefetch;
      opt.qtool_version = QTOOL_VERSION;
      const planner::ProfileChoice profile = load_profile(global, o->device_profile);
      opt.profile = profile.profile;
      info(global, "using " + profile.source);
      planner::TemplateLibrary templates;
      if (!o->models_dir.empty()) {
        templates.load_dir(o->models_dir);
      } else if (auto dir = planner::find_data_subdir("models")) {
        templates.load_dir(*dir);
      } else {
        warn("no sample_configs/models found (set QTOOL_DATA_DIR or --models-dir): heuristic execution order");
      }
      opt.templates = &templates;
      if (!o->max_memory.empty()) {
        opt.budget = planner::parse_max_memory(o->max_memory);
      } else {
        opt.budget = planner::machine_budget();
        info(global, opt.budget.note);
      }
      const Checkpoint ck = Checkpoint::open(o->checkpoint);
      const planner::PipelineInput input = planner::plan_input_of(ck);
      planner::Plan plan = planner::make_plan(input, opt);
      plan.checkpoint = o->checkpoint;
      plan.notes.insert(plan.notes.begin(), "using " + profile.source);
      const std::vector<std::string> problems = planner::check_plan(plan, input);
      if (!problems.empty()) {
        fail(ErrorKind::Internal, "the plan failed its own check: ", problems.front(), " (", problems.size(), " problem(s))");
      }
      if (!o->output.empty()) write_plan(o->output, plan);
      if (!o->svg.empty()) {
        const std::string svg = planner::plan_svg(plan);
        const std::string tmp = o->svg + ".tmp";
        {
          std::ofstream out(tmp, std::ios::binary);
          out << svg;
          if (!out) fail(ErrorKind::Io, o->svg, ": cannot write");
        }
        std::error_code ec;
        std::filesystem::rename(tmp, o->svg, ec);
        if (ec) fail(ErrorKind::Io, o->svg, ": cannot rename into place: ", ec.message());
      }
      if (!global.quiet) std::fputs(planner::plan_table(plan).c_str(), stderr);
      if (!o->output.empty()) info(global, "wrote " + o->output);
      if (o->json) std::cout << dump_json(planner::plan_to_json(plan), 2) << "\n";
      return 0;
    };
  });
}

const CommandRegistrar kRegistrar(40, add_plan);

}  // namespace
}  // namespace qtool::cli
