// The scheme table: the one place the rest of libquant looks schemes up in.
#include "scheme.hpp"

namespace qtool::quant::detail {

bool have_simd() { return cpu_features().avx2; }

namespace {

constexpr SchemeEntry kSchemes[] = {
    {Scheme::Int8, "int8", int8_quantize, int8_dequantize_linear},
    {Scheme::Fp8E4M3, "fp8_e4m3", fp8_quantize, fp8_dequantize_linear},
    {Scheme::Fp8E5M2, "fp8_e5m2", fp8_quantize, fp8_dequantize_linear},
    {Scheme::Nf4, "nf4", bnb4_quantize, bnb4_dequantize_linear},
    {Scheme::Fp4, "fp4", bnb4_quantize, bnb4_dequantize_linear},
};

}  // namespace

const SchemeEntry& scheme_entry(Scheme scheme) {
  for (const auto& e : kSchemes)
    if (e.scheme == scheme) return e;
  QTOOL_ASSERT_MSG(false, "unknown scheme ", static_cast<int>(scheme));
  return kSchemes[0];
}

}  // namespace qtool::quant::detail
