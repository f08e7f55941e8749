// qtool dequantize CKPT -o OUT [--dtype bf16|f16|f32]: back to plain weights.
#include <cstdio>
#include <memory>
#include <optional>
#include <string>

#include "cli.hpp"
#include "qtool/formats/checkpoint.hpp"
#include "qtool/formats/dtype.hpp"
#include "qtool/formats/error.hpp"
#include "qtool/formats/size.hpp"
#include "qtool/libquant/convert.hpp"

#ifndef QTOOL_VERSION
#define QTOOL_VERSION "0.0.0"
#endif

namespace qtool::cli {
namespace {

struct DequantizeOptions {
  std::string input;
  std::string output;
  std::string dtype;
  size_t threads = 0;
  std::string max_shard_size;
  std::string report;
  bool json = false;
  bool force = false;
};

int run_dequantize(const DequantizeOptions& o, const GlobalOptions& global) {
  std::optional<DType> dtype;
  if (!o.dtype.empty()) {
    dtype = parse_dtype_cli(o.dtype);
    if (!dtype || !quant::is_quantizable_dtype(*dtype)) {
      fail(ErrorKind::Usage, "--dtype: '", o.dtype, "' is not bf16, f16 or f32");
    }
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
  ProgressBar bar(global, "dequantize");
  options.progress = bar.callback();
  const quant::ConvertReport report = quant::dequantize_checkpoint(o.input, o.output, dtype, options);
  bar.finish();
  if (!global.quiet) std::fputs(quant::summary_text(report, global.verbose).c_str(), stderr);
  const nlohmann::json j = quant::report_to_json(report);
  if (!o.report.empty()) write_json_file(o.report, j);
  if (o.json) std::printf("%s\n", j.dump(2).c_str());
  return 0;
}

void add_dequantize_command(CLI::App& app, const GlobalOptions& global, CommandFn& run) {
  auto o = std::make_shared<DequantizeOptions>();
  CLI::App* cmd = app.add_subcommand(
      "dequantize",
      "Turn a quantized checkpoint (qtool's, or any bitsandbytes int8/4-bit or compressed-tensors fp8 one) back "
      "into plain weights; quant state and quantization_config are removed");
  cmd->add_option("CKPT", o->input, "Input: a .safetensors file, a model folder or a diffusers pipeline folder")
      ->required();
  cmd->add_option("-o,--output", o->output, "Output file or folder (appears only when complete)")->required();
  cmd->add_option("--dtype", o->dtype,
                  "dtype of the dequantized weights: bf16, f16 or f32 (default: the dtype they had before "
                  "quantization; other tensors keep theirs)");
  cmd->add_option("--threads,-j", o->threads, "Worker threads (default: every core)");
  cmd->add_option("--max-shard-size", o->max_shard_size,
                  "Largest output shard, e.g. 5GB (default: as the input's largest shard)");
  cmd->add_option("--report", o->report, "Write the report as JSON to this file");
  cmd->add_flag("--json", o->json, "Print the report as JSON on stdout");
  cmd->add_flag("--force,-f", o->force, "Replace an existing output");
  cmd->callback([o, &global, &run] { run = [o, &global] { return run_dequantize(*o, global); }; });
}

const CommandRegistrar kRegistrar(35, add_dequantize_command);

}  // namespace
}  // namespace qtool::cli
