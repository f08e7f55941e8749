// qtool synth: writes a synthetic checkpoint of a preset (formats/include/qtool/formats/synth.hpp).
#include <cstdio>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "cli.hpp"
#include "qtool/formats/dtype.hpp"
#include "qtool/formats/error.hpp"
#include "qtool/formats/json.hpp"
#include "qtool/formats/size.hpp"
#include "qtool/formats/synth.hpp"
#include "qtool/formats/thread_pool.hpp"

namespace qtool::cli {
namespace {

struct SynthCliOptions {
  std::string preset;
  double scale = 1.0;
  std::string dtype = "bf16";
  std::string max_shard_size;
  uint64_t seed = 0;
  std::vector<std::string> components;
  size_t threads = 0;
  bool force = false;
  bool dry_run = false;
  bool json = false;
  std::string output;
};

nlohmann::json summary_json(const SynthModel& model, const SynthResult& r, const SynthCliOptions& o) {
  nlohmann::json components = nlohmann::json::array();
  for (size_t i = 0; i < r.components.size(); ++i) {
    const auto& c = r.components[i];
    const auto& mc = model.components[i];
    nlohmann::json j = {
        {"name", c.name},
        {"library", mc.library},
        {"class", c.class_name},
        {"params", c.n_params},
        {"published_params",
         c.published_params ? nlohmann::json(c.published_params) : nlohmann::json(nullptr)},
        {"bytes", c.n_bytes},
        {"max_shard_size", c.max_shard_size},
        {"shards", c.n_shards},
    };
    if (o.dry_run) {
      nlohmann::json tensors = nlohmann::json::array();
      for (const auto& t : mc.tensors)
        tensors.push_back(
            {{"name", t.decl.name}, {"dtype", dtype_name(t.decl.dtype)}, {"shape", t.decl.shape}});
      j["tensors"] = std::move(tensors);
      nlohmann::json files = nlohmann::json::object();
      for (const auto& [name, value] : mc.json_files) files[name] = value;
      j["json_files"] = std::move(files);
    }
    components.push_back(std::move(j));
  }
  return {
      {"preset", model.preset},
      {"scale", model.scale},
      {"dtype", dtype_name(model.dtype)},
      {"seed", o.seed},
      {"output", o.dry_run ? nlohmann::json(nullptr) : nlohmann::json(r.output.string())},
      {"dry_run", o.dry_run},
      {"pipeline", model.is_pipeline},
      {"params", r.n_params},
      {"bytes", r.n_bytes},
      {"seconds", r.seconds},
      {"components", std::move(components)},
  };
}

void print_summary(const GlobalOptions& global, const SynthModel& model, const SynthResult& r,
                   const SynthCliOptions& o) {
  if (global.quiet) return;
  char line[256];
  std::snprintf(line, sizeof line, "%-16s %-32s %12s %22s %6s %12s", "component", "class", "params",
                "published", "shards", "size");
  info(global, line);
  for (const auto& c : r.components) {
    std::string published = "-";
    if (c.published_params) {
      char p[64];
      const double dev =
          100.0 * (static_cast<double>(c.n_params) / static_cast<double>(c.published_params) - 1.0);
      std::snprintf(p, sizeof p, "%s (%+.2f%%)", format_count(c.published_params, 3).c_str(), dev);
      published = p;
    }
    std::snprintf(line, sizeof line, "%-16s %-32s %12s %22s %6zu %12s",
                  c.name.empty() ? "(model)" : c.name.c_str(), c.class_name.c_str(),
                  c.n_params ? format_count(c.n_params, 3).c_str() : "-", published.c_str(), c.n_shards,
                  c.n_bytes ? format_size(c.n_bytes).c_str() : "-");
    info(global, line);
  }
  if (o.dry_run) {
    info(global, str_cat("dry run: ", model.preset, " would have ", format_count(r.n_params, 3),
                         " parameters, ", format_size(r.n_bytes), "; nothing written"));
    return;
  }
  const double rate = r.seconds > 0 ? static_cast<double>(r.n_bytes) / r.seconds : 0.0;
  char secs[32];
  std::snprintf(secs, sizeof secs, "%.1f s", r.seconds);
  info(global,
       str_cat("wrote ", r.output.string(), ": ", format_count(r.n_params, 3), " parameters, ",
               format_size(r.n_bytes), " in ", secs, " (", format_size(static_cast<uint64_t>(rate)), "/s)"));
}

int run_synth(const SynthCliOptions& o, const GlobalOptions& global) {
  SynthSpec spec;
  spec.preset = o.preset;
  spec.scale = o.scale;
  const auto dt = parse_dtype_cli(o.dtype);
  if (!dt || (*dt != DType::BF16 && *dt != DType::F16 && *dt != DType::F32))
    fail(ErrorKind::Usage, "--dtype: '", o.dtype, "' is not one of bf16, f16, f32");
  spec.dtype = *dt;
  spec.components = o.components;
  const SynthModel model = make_synth_model(spec);

  SynthWriteOptions wo;
  wo.seed = o.seed;
  if (!o.max_shard_size.empty()) wo.max_shard_size = parse_size(o.max_shard_size, "--max-shard-size");
  wo.threads = o.threads;
  wo.force = o.force;

  SynthResult result;
  if (o.dry_run) {
    result = synth_summary(model, wo);
  } else {
    if (o.output.empty()) fail(ErrorKind::Usage, "-o/--output: an output folder is required");
    ProgressBar bar(global, "synth " + model.preset);
    wo.progress = bar.callback();
    result = write_synth_model(model, o.output, wo);
    bar.finish();
  }
  print_summary(global, model, result, o);
  if (o.json) std::cout << dump_json(summary_json(model, result, o), 2) << std::endl;
  return 0;
}

// The description lists the presets, which come from the formats library at run time.
void declare_synth(CLI::App* cmd, SynthCliOptions& o) {
  std::string presets;
  for (const auto& p : synth_presets()) presets += "\n  " + p.name + ": " + p.description;
  cmd->description(
      "Write a synthetic checkpoint with a real architecture's tensor names, shapes, configs and folder "
      "layout, and deterministic weights that look trained (normal, per-row scales, rare outliers).\n"
      "Presets:" +
      presets +
      "\n"
      "--scale S shrinks widths (head counts, FFN sizes, channels, vocabularies) and depths (blocks, "
      "at least 2 per list) by S, keeping head dims and every config consistent with the shapes.");
  cmd->add_option("--preset", o.preset, "Preset name")->required();
  cmd->add_option("--scale", o.scale, "Shrink factor, 0 < S <= 1")->default_val(1.0);
  cmd->add_option("--dtype", o.dtype, "bf16, f16 or f32")->default_val("bf16");
  cmd->add_option("--max-shard-size", o.max_shard_size,
                  "Largest shard (e.g. 5GB, 512MiB; 0: never shard). Default: the real model's sharding "
                  "(10GB diffusers, 5GB transformers), shrunk with --scale");
  cmd->add_option("--seed", o.seed, "Seed of the values")->default_val(0);
  cmd->add_option("--components", o.components, "Pipeline components to write (comma separated); default all")
      ->delimiter(',');
  cmd->add_option("--threads", o.threads, "Worker threads (0: all cores)")
      ->default_val(0)
      ->check(count_range(0, static_cast<int64_t>(kMaxThreads)));
  cmd->add_flag("--force", o.force, "Replace an existing output");
  cmd->add_flag("--dry-run", o.dry_run,
                "Describe the checkpoint (with --json: every tensor and config) without writing");
  cmd->add_flag("--json", o.json, "Print a JSON summary on stdout");
  cmd->add_option("-o,--output", o.output, "Output folder");
}

const CommandRegistrar kRegistrar(20, "synth", "", declare_synth, run_synth);

}  // namespace
}  // namespace qtool::cli
