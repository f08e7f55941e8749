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

// A profile file, a profile name from sample_configs/devices/, or the built-in H100 PCIe default.
planner::DeviceProfile load_profile(const GlobalOptions& global, const std::string& spec) {
  namespace fs = std::filesystem;
  if (!spec.empty()) {
    std::error_code ec;
    if (fs::is_regular_file(spec, ec)) return planner::load_device_profile(spec);
    if (auto dir = planner::find_data_subdir("devices")) {
      const fs::path p = *dir / (spec + ".json");
      if (fs::is_regular_file(p, ec)) return planner::load_device_profile(p);
    }
    fail(ErrorKind::Usage, "--device-profile: '", spec, "' is neither a file nor a profile in sample_configs/devices/");
  }
  if (auto dir = planner::find_data_subdir("devices")) {
    const fs::path p = *dir / "h100-pcie-gen5.json";
    std::error_code ec;
    if (fs::is_regular_file(p, ec)) {
      verbose(global, "device profile: " + p.string());
      return planner::load_device_profile(p);
    }
  }
  warn("no sample_configs/devices found: using the built-in h100-pcie-gen5 profile");
  return planner::DeviceProfile{};
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
  cmd->add_option("--device-profile", o->device_profile,
                  "Device profile JSON (or a name in sample_configs/devices/); default h100-pcie-gen5");
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
      opt.profile = load_profile(global, o->device_profile);
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
