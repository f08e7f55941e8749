// What `quantize` and `dequantize` share: their common options and how a conversion report is shown.
#pragma once

#include <cstddef>
#include <functional>
#include <string>

#include "cli.hpp"
#include "qtool/libquant/convert.hpp"

namespace qtool::cli {

struct ConvertCliOptions {
  std::string input;
  std::string output;
  size_t threads = 0;
  std::string max_shard_size;
  std::string report;
  bool json = false;
  bool force = false;
};

// Adds CKPT, -o, --threads, --max-shard-size, --report, --json and --force to `cmd`.
void add_convert_options(CLI::App* cmd, ConvertCliOptions& o, const std::string& report_help);
// The library options they give (Error(Usage) naming --max-shard-size when it is not a size > 0).
quant::ConvertOptions make_convert_options(const ConvertCliOptions& o);
// The summary on stderr, --report FILE and --json on stdout.
void emit_convert_report(const quant::ConvertReport& report, const ConvertCliOptions& o,
                         const GlobalOptions& global);
// Runs `convert` with the options `o` gives and a progress bar named `label`, then emits its
// report. Returns the exit code (0).
int run_conversion(const ConvertCliOptions& o, const GlobalOptions& global, const char* label,
                   const std::function<quant::ConvertReport(const quant::ConvertOptions&)>& convert);

}  // namespace qtool::cli
