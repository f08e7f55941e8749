// The cost model: rows, FLOPs and seconds of a linear, seconds of a copy.
#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <numeric>
#include <unordered_map>

#include "planner_impl.hpp"
#include "qtool/formats/checked.hpp"
#include "qtool/formats/error.hpp"
#include "qtool/formats/size.hpp"
#include "qtool/libquant/config.hpp"
#include "qtool/libquant/quant.hpp"

namespace qtool::planner {

std::string dtype_kind(DType dt) {
  switch (dt) {
    case DType::BF16: return "bf16";
    case DType::F16: return "f16";
    case DType::F32: return "f32";
    default: return "";
  }
}

uint64_t linear_rows(const Arch& arch, std::string_view module, uint64_t tokens) {
  const auto* flux = std::get_if<FluxArch>(&arch);
  if (!flux) return tokens;  // Llama: every linear on every token
  const auto ends = [&](std::string_view suffix) { return module.ends_with(suffix); };
  const uint64_t text = static_cast<uint64_t>(flux->text_tokens);
  if (module.starts_with("time_text_embed.") || ends("norm1.linear") || ends("norm1_context.linear") ||
      ends(".norm.linear") || module == "norm_out.linear")
    return 1;  // per sample: timestep / text embeddings and modulation vectors
  if (module.starts_with("single_transformer_blocks.")) return tokens + text;
  if (module == "context_embedder" || module.find(".add_") != std::string_view::npos || ends(".to_add_out") ||
      module.find(".ff_context.") != std::string_view::npos)
    return text;
  return tokens;
}

double copy_seconds(uint64_t bytes, const Location& target, const DeviceProfile& p) {
  double s = static_cast<double>(bytes) / (p.h2d_pinned_gbps * 1e9) + p.copy_latency_us * 1e-6;
  if (target.kind == Location::Kind::Disk) s += static_cast<double>(bytes) / (p.disk_read_gbps * 1e9);
  return s;
}

uint64_t linear_flops(uint64_t tokens, const LinearOp& op) {
  const auto f = checked_mul(2 * tokens, static_cast<uint64_t>(op.out), static_cast<uint64_t>(op.in));
  if (!f) {
    fail(ErrorKind::InvalidInput, "linear '", op.module, "' [", op.out, ", ", op.in, "] at ", tokens,
         " tokens: its FLOP count overflows 64 bits (lower --tokens)");
  }
  return *f;
}

double linear_seconds(const LinearOp& l, uint64_t tokens, const DeviceProfile& p) {
  const double numel = static_cast<double>(l.out) * static_cast<double>(l.in);
  double s = 2.0 * static_cast<double>(tokens) * numel / (p.bf16_tflops * 1e12) + p.kernel_launch_us * 1e-6;
  if (l.kind != "bf16") s += numel / p.dequant_rate(l.kind) + p.kernel_launch_us * 1e-6;
  return s;
}

}  // namespace qtool::planner
