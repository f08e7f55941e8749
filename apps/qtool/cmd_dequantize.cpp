// qtool dequantize CKPT -o OUT [--dtype bf16|f16|f32]: back to plain weights.
#include <cstdio>
#include <memory>
#include <optional>
#include <string>

#include "cli.hpp"
#include "convert_cli.hpp"
#include "qtool/formats/checkpoint.hpp"
#include "qtool/formats/dtype.hpp"
#include "qtool/formats/error.hpp"
#include "qtool/formats/size.hpp"
#include "qtool/libquant/convert.hpp"

namespace qtool::cli {
namespace {

struct DequantizeOptions : ConvertCliOptions {
  std::string dtype;
};

int run_dequantize(const DequantizeOptions& o, const GlobalOptions& global) {
  std::optional<DType> dtype;
  if (!o.dtype.empty()) {
    dtype = parse_dtype_cli(o.dtype);
    if (!dtype || !quant::is_quantizable_dtype(*dtype)) {
      fail(ErrorKind::Usage, "--dtype: '", o.dtype, "' is not bf16, f16 or f32");
    }
  }
  return run_conversion(o, global, "dequantize", [&](const quant::ConvertOptions& options) {
    return quant::dequantize_checkpoint(o.input, o.output, dtype, options);
  });
}

void declare_dequantize(CLI::App* cmd, DequantizeOptions& o) {
  add_convert_options(cmd, o, "Write the report as JSON to this file");
  cmd->add_option("--dtype", o.dtype,
                  "dtype of the dequantized weights: bf16, f16 or f32 (default: the dtype they had before "
                  "quantization; other tensors keep theirs)");
}

const CommandRegistrar kRegistrar(
    35, "dequantize",
    "Turn a quantized checkpoint (qtool's, or any bitsandbytes int8/4-bit or compressed-tensors fp8 one) "
    "back into plain weights; quant state and quantization_config are removed",
    declare_dequantize, run_dequantize);

}  // namespace
}  // namespace qtool::cli
