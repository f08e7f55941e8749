// qtool quantize CKPT --config FILE -o OUT: quantizes a checkpoint as a quant-mapping config says.
#include <cstdio>
#include <memory>
#include <optional>
#include <string>

#include "cli.hpp"
#include "convert_cli.hpp"
#include "qtool/formats/checkpoint.hpp"
#include "qtool/formats/error.hpp"
#include "qtool/formats/size.hpp"
#include "qtool/libquant/config.hpp"
#include "qtool/libquant/convert.hpp"

namespace qtool::cli {
namespace {

struct QuantizeOptions : ConvertCliOptions {
  std::string config;
  std::string scheme;
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
      fail(ErrorKind::Usage, "--scheme: unknown scheme '", o.scheme, "' (expected one of ",
           quant::scheme_names_list(), ")");
    }
    quant::SchemeOptions so;
    so.scheme = *scheme;
    config = quant::config_for_scheme(so);
  }
  return run_conversion(o, global, "quantize", [&](const quant::ConvertOptions& options) {
    return quant::quantize_checkpoint(o.input, config, o.output, options);
  });
}

void declare_quantize(CLI::App* cmd, QuantizeOptions& o) {
  add_convert_options(cmd, o, "Write the report (bytes, time, per-tensor error) as JSON to this file");
  auto* config =
      cmd->add_option("--config,-c", o.config,
                      "Quant-mapping config (JSON; see sample_configs/): quant_backend, quant_kwargs, "
                      "components_to_quantize, quant_mapping, modules_to_not_convert");
  auto* scheme =
      cmd->add_option("--scheme", o.scheme,
                      "Instead of --config: quantize every component with this scheme and its default "
                      "options (int8, fp8_e4m3, fp8_e5m2, nf4, fp4)");
  config->excludes(scheme);
  scheme->excludes(config);
}

const CommandRegistrar kRegistrar(
    30, "quantize",
    "Quantize a checkpoint (int8, fp8, nf4/fp4) as a quant-mapping config says, in the layouts that "
    "bitsandbytes and compressed-tensors loaders read",
    declare_quantize, run_quantize);

}  // namespace
}  // namespace qtool::cli
