// qtool quantize CKPT --config FILE -o OUT: quantizes a checkpoint as a quant-mapping config says.
#include <cstdio>
#include <memory>
#include <optional>
#include <string>

#include "cli.hpp"
#include "qtool/formats/checkpoint.hpp"
#include "qtool/formats/error.hpp"
#include "qtool/formats/size.hpp"
#include "qtool/libquant/config.hpp"
#include "qtool/libquant/convert.hpp"

#ifndef QTOOL_VERSION
#define QTOOL_VERSION "0.0.0"
#endif

namespace qtool::cli {
namespace {

struct QuantizeOptions {
  std::string input;
  std::string config;
  std::string scheme;
  std::string output;
  size_t threads = 0;
  std::string max_shard_size;
  std::string report;
  bool json = false;
  bool force = false;
};

int run_quantize(const QuantizeOptions& o, const GlobalOptions& global) {
  if (o.config.empty() && o.scheme.empty()) {
    fail(ErrorKind::Usage, "quantize: give --config FILE (see sample_configs/) or --scheme NAME");
  }
  quant::QuantConfig config;
  if (!o.config.empty()) {
    config = quant::read_quant_config(o.config);
  } else {
    const auto scheme = quant::parse_scheme(o.scheme);
    if (!scheme) {
      fail(ErrorKind::Usage, "--scheme: unknown scheme '", o.scheme, "' (expected one of ", quant::scheme_names_list(),
           ")");
    }
    quant::SchemeOptions so;
    so.scheme = *scheme;
    config = quant::config_for_scheme(so);
  }
  quant::ConvertOptions options;
  options.n_threads = o.threads;
  if (!o.max_shard_size.empty()) {
    options.max_shard_size = parse_size(o.max_shard_size, "--max-shard-size");
    if (options.max_shard_size == 0) fail(ErrorKind::Usage, "--max-shard-size: must be more than 0 bytes");
  }
  options.force = o.force;
  options.tool_version = QTOOL_VERSION;
  options.on_warning = [](std::string_view w) { warn(w); };
  ProgressBar bar(global, "quantize");
  options.progress = bar.callback();
  const quant::ConvertReport report = quant::quantize_checkpoint(o.input, config, o.output, options);
  bar.finish();
  if (!global.quiet) std::fputs(quant::summary_text(report, global.verbose).c_str(), stderr);
  const nlohmann::json j = quant::report_to_json(report);
  if (!o.report.empty()) write_json_file(o.report, j);
  if (o.json) std::printf("%s\n", j.dump(2).c_str());
  return 0;
}

void add_quantize_command(CLI::App& app, const GlobalOptions& global, CommandFn& run) {
  auto o = std::make_shared<QuantizeOptions>();
  CLI::App* cmd = app.add_subcommand(
      "quantize",
      "Quantize a checkpoint (int8, fp8, nf4/fp4) as a quant-mapping config says, in the layouts that "
      "bitsandbytes and compressed-tensors loaders read");
  cmd->add_option("CKPT", o->input, "Input: a .safetensors file, a model folder or a diffusers pipeline folder")
      ->required();
  auto* config = cmd->add_option("--config,-c", o->config,
                                 "Quant-mapping config (JSON; see sample_configs/): quant_backend, quant_kwargs, "
                                 "components_to_quantize, quant_mapping, modules_to_not_convert");
  auto* scheme = cmd->add_option("--scheme", o->scheme,
                                 "Instead of --config: quantize every component with this scheme and its default "
                                 "options (int8, fp8_e4m3, fp8_e5m2, nf4, fp4)");
  config->excludes(scheme);
  scheme->excludes(config);
  cmd->add_option("-o,--output", o->output, "Output file or folder (appears only when complete)")->required();
  cmd->add_option("--threads,-j", o->threads, "Worker threads (default: every core)");
  cmd->add_option("--max-shard-size", o->max_shard_size,
                  "Largest output shard, e.g. 5GB or 2GiB (default: as the input: one file stays one file, "
                  "shards stay at most the size of the largest input shard)");
  cmd->add_option("--report", o->report, "Write the report (bytes, time, per-tensor error) as JSON to this file");
  cmd->add_flag("--json", o->json, "Print the report as JSON on stdout");
  cmd->add_flag("--force,-f", o->force, "Replace an existing output");
  cmd->callback([o, &global, &run] { run = [o, &global] { return run_quantize(*o, global); }; });
}

const CommandRegistrar kRegistrar(30, add_quantize_command);

}  // namespace
}  // namespace qtool::cli
