#include "qtool/runner/dequant.hpp"

#include <cstring>

#include "qtool/formats/error.hpp"
#include "qtool/libquant/quant.hpp"

namespace qtool::runner {

bool is_4bit(WeightKind kind) { return kind == WeightKind::Nf4 || kind == WeightKind::Fp4; }

const char* weight_kind_name(WeightKind kind) {
  switch (kind) {
    case WeightKind::Bf16: return "bf16";
    case WeightKind::F16: return "f16";
    case WeightKind::F32: return "f32";
    case WeightKind::Int8: return "int8";
    case WeightKind::Fp8E4M3: return "fp8_e4m3";
    case WeightKind::Fp8E5M2: return "fp8_e5m2";
    case WeightKind::Nf4: return "nf4";
    case WeightKind::Fp4: return "fp4";
  }
  return "?";
}

void resolve_tables(const DequantParams& params, float code_table[16], float nested_map[256]) {
  if (params.quant_map)
    std::memcpy(code_table, params.quant_map, 16 * sizeof(float));
  else {
    const auto table =
        quant::code_table(params.kind == WeightKind::Fp4 ? quant::Scheme::Fp4 : quant::Scheme::Nf4);
    std::memcpy(code_table, table.data(), 16 * sizeof(float));
  }
  if (params.nested_quant_map)
    std::memcpy(nested_map, params.nested_quant_map, 256 * sizeof(float));
  else
    std::memcpy(nested_map, quant::dynamic_map().data(), 256 * sizeof(float));
}

void dequantize_to_bf16_cpu(const DequantParams& params, uint16_t* out, uint64_t begin, uint64_t end) {
  QTOOL_ASSERT(begin <= end && end <= params.numel());
  float code_table[16];
  float nested_map[256];
  if (is_4bit(params.kind)) resolve_tables(params, code_table, nested_map);
  for (uint64_t i = begin; i < end; ++i)
    out[i - begin] = kmath::f32_to_bf16_bits(dq::element_f32(params, i, code_table, nested_map));
}

}  // namespace qtool::runner
