#include "qtool/runner/dequant.hpp"

#include <cctype>
#include <cstring>
#include <optional>
#include <span>
#include <utility>
#include <vector>

#include "qtool/formats/dtype.hpp"
#include "qtool/formats/error.hpp"
#include "qtool/libquant/quant.hpp"
#include "qtool/runner/schedule.hpp"

namespace qtool::runner {

namespace {

// The schemes the element functions of dequant.hpp decode; every other one is Host. The one
// place a quantized WeightKind meets its scheme.
constexpr std::pair<quant::Scheme, WeightKind> kDeviceKinds[] = {
    {quant::Scheme::Int8, WeightKind::Int8},
    {quant::Scheme::Fp8E4M3, WeightKind::Fp8E4M3},
    {quant::Scheme::Fp8E5M2, WeightKind::Fp8E5M2},
    {quant::Scheme::Nf4, WeightKind::Nf4},
    {quant::Scheme::Fp4, WeightKind::Fp4}};

// The plain dtypes a linear weight may have unquantized.
constexpr std::pair<DType, WeightKind> kPlainKinds[] = {
    {DType::BF16, WeightKind::Bf16}, {DType::F16, WeightKind::F16}, {DType::F32, WeightKind::F32}};

// The scheme of a quantized kind the element functions decode; nullopt for plain kinds and Host.
std::optional<quant::Scheme> scheme_of_kind(WeightKind kind) {
  for (const auto& [s, k] : kDeviceKinds)
    if (k == kind) return s;
  return std::nullopt;
}

}  // namespace

bool is_4bit(WeightKind kind) {
  const auto scheme = scheme_of_kind(kind);
  return scheme && quant::is_4bit(*scheme);
}

std::string weight_kind_name(WeightKind kind) {
  if (const auto scheme = scheme_of_kind(kind)) return std::string(quant::scheme_name(*scheme));
  for (const auto& [dtype, k] : kPlainKinds) {
    if (k != kind) continue;
    std::string name(dtype_name(dtype));  // "BF16" -> "bf16", as the planner's kinds
    for (char& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    return name;
  }
  return "host";
}

std::optional<WeightKind> weight_kind_of(DType dtype) {
  for (const auto& [d, kind] : kPlainKinds)
    if (d == dtype) return kind;
  return std::nullopt;
}

std::string weight_name(const DequantParams& params) {
  if (params.kind == WeightKind::Host)
    return std::string(quant::scheme_name(static_cast<quant::Scheme>(params.scheme)));
  return weight_kind_name(params.kind);
}

namespace {

// The libquant view of a Host weight: its linear (shape, options, original dtype) and part spans
// of the sizes its layout gives.
quant::QuantizedLinear host_linear(const DequantParams& p) {
  QTOOL_ASSERT(p.kind == WeightKind::Host);
  quant::QuantizedLinear l;
  l.options.scheme = static_cast<quant::Scheme>(p.scheme);
  l.options.blocksize = p.blocksize;
  l.options.double_quant = p.double_quant;
  l.options.per_tensor = p.per_tensor;
  l.orig_dtype = static_cast<DType>(p.orig_dtype);
  l.shape = {static_cast<int64_t>(p.rows), static_cast<int64_t>(p.cols)};
  l.nested_offset = p.nested_offset;
  l.tensor_parts = quant::scheme_parts(l.options);
  return l;
}

}  // namespace

void require_device_kind(const DequantParams& params) {
  if (params.kind == WeightKind::Host)
    fail(ErrorKind::InvalidInput, "scheme '", weight_name(params),
         "' has no device dequantizer (the CUDA backend cannot run it; use --backend cpu)");
}

WeightKind weight_kind_of(quant::Scheme scheme) {
  for (const auto& [s, kind] : kDeviceKinds)
    if (s == scheme) return kind;
  return WeightKind::Host;
}

void host_part_sizes(const DequantParams& params, uint64_t* sizes) {
  const quant::QuantizedLinear l = host_linear(params);
  const auto decls = quant::quantized_decls("m", l.orig_dtype, l.shape, l.options);
  for (int k = 0; k < kNumParts; ++k) sizes[k] = 0;
  for (size_t i = 0; i < decls.size(); ++i)
    if (const int k = part_slot(l.tensor_parts[i]); k >= 0) sizes[k] = decls[i].nbytes();
}

void dequantize_host_rows_f32(const DequantParams& params, float* out, uint64_t row_begin, uint64_t row_end) {
  const quant::QuantizedLinear l = host_linear(params);
  uint64_t sizes[kNumParts];
  host_part_sizes(params, sizes);
  const uint8_t* const ptr[kNumParts] = {params.weight, params.scale, params.quant_map, params.nested_absmax,
                                         params.nested_quant_map};
  auto span = [&](int k) {
    return ptr[k] ? std::span<const uint8_t>(ptr[k], sizes[k]) : std::span<const uint8_t>();
  };
  quant::TensorBytes parts;
  parts.weight = span(kPartWeight);
  parts.scale = span(kPartScale);
  parts.quant_map = span(kPartQuantMap);
  parts.nested_absmax = span(kPartNestedAbsmax);
  parts.nested_quant_map = span(kPartNestedQuantMap);
  quant::dequantize_rows_f32(l, parts, out, row_begin, row_end);
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
  if (params.kind == WeightKind::Host) {
    if (begin == end) return;
    const uint64_t r0 = begin / params.cols, r1 = (end - 1) / params.cols + 1;
    std::vector<float> rows((r1 - r0) * params.cols);
    dequantize_host_rows_f32(params, rows.data(), r0, r1);
    for (uint64_t i = begin; i < end; ++i)
      out[i - begin] = kmath::f32_to_bf16_bits(rows[i - r0 * params.cols]);
    return;
  }
  for (uint64_t i = begin; i < end; ++i)
    out[i - begin] = kmath::f32_to_bf16_bits(dq::element_f32(params, i, code_table, nested_map));
}

}  // namespace qtool::runner
