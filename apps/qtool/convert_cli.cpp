#include "convert_cli.hpp"

#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>

#include "qtool/formats/checkpoint.hpp"
#include "qtool/formats/error.hpp"
#include "qtool/formats/size.hpp"
#include "qtool/formats/thread_pool.hpp"

#ifndef QTOOL_VERSION
#define QTOOL_VERSION "0.0.0"
#endif

namespace qtool::cli {

void add_convert_options(CLI::App* cmd, ConvertCliOptions& o, const std::string& report_help) {
  cmd->add_option("CKPT", o.input,
                  "Input: a .safetensors file, a model folder or a diffusers pipeline folder")
      ->required();
  cmd->add_option("-o,--output", o.output, "Output file or folder (appears only when complete)")->required();
  add_threads_option(cmd, o.threads, "Worker threads (default: every core)");
  cmd->add_option("--max-shard-size", o.max_shard_size,
                  "Largest output shard, e.g. 5GB or 2GiB (default: as the input: one file stays one file, "
                  "shards stay at most the size of the largest input shard)");
  cmd->add_option("--report", o.report, report_help);
  cmd->add_flag("--json", o.json, "Print the report as JSON on stdout");
  cmd->add_flag("--force,-f", o.force, "Replace an existing output");
}

quant::ConvertOptions make_convert_options(const ConvertCliOptions& o) {
  quant::ConvertOptions options;
  options.n_threads = o.threads;
  if (!o.max_shard_size.empty()) {
    options.max_shard_size = parse_size(o.max_shard_size, "--max-shard-size");
    if (options.max_shard_size == 0) fail(ErrorKind::Usage, "--max-shard-size: must be more than 0 bytes");
  }
  options.force = o.force;
  options.tool_version = QTOOL_VERSION;
  options.on_warning = [](std::string_view w) { warn(w); };
  return options;
}

void emit_convert_report(const quant::ConvertReport& report, const ConvertCliOptions& o,
                         const GlobalOptions& global) {
  if (!global.quiet) std::fputs(quant::summary_text(report, global.verbose).c_str(), stderr);
  const nlohmann::json j = quant::report_to_json(report);
  if (!o.report.empty()) write_json_file(o.report, j);
  if (o.json) std::printf("%s\n", dump_json(j, 2).c_str());
}

namespace {

// --report is written after the output is committed: whatever can be known about it is checked
// before the conversion starts, so that a successful conversion does not end in a report error.
void check_report_path(const std::string& report) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::path p(report);
  if (fs::is_directory(p, ec)) fail(ErrorKind::Usage, "--report: ", report, " is a folder");
  if (fs::exists(fs::symlink_status(p, ec)) && !fs::is_regular_file(p, ec))
    fail(ErrorKind::Usage, "--report: ", report, " exists and is not a regular file");
  const fs::path dir = p.has_parent_path() ? p.parent_path() : fs::path(".");
  if (!fs::is_directory(dir, ec))
    fail(ErrorKind::Usage, "--report: the folder ", dir.string(), " does not exist");
  if (::access(dir.c_str(), W_OK) != 0)
    fail(ErrorKind::Usage, "--report: cannot write into ", dir.string(), ": ", std::strerror(errno));
}

}  // namespace

int run_conversion(const ConvertCliOptions& o, const GlobalOptions& global, const char* label,
                   const std::function<quant::ConvertReport(const quant::ConvertOptions&)>& convert) {
  if (!o.report.empty()) check_report_path(o.report);
  quant::ConvertOptions options = make_convert_options(o);
  ProgressBar bar(global, label);
  options.progress = bar.callback();
  const quant::ConvertReport report = convert(options);
  bar.finish();
  emit_convert_report(report, o, global);
  return 0;
}

}  // namespace qtool::cli
