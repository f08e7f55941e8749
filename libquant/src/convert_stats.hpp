// The error of a quantized weight against the original, computed in one pass from the quantized
// bytes (decoded here, as dequantize_rows_f32 decodes them) and the original bytes, without
// materialising either in float32. AVX-512 and AVX2 paths beside a scalar one; all are checked against
// dequantize_rows_f32 in tests/libquant/test_convert_stats.cpp.
#pragma once

#include <cstddef>
#include <cstdint>

#include "qtool/formats/dtype.hpp"
#include "qtool/libquant/quant.hpp"
#include "scheme.hpp"

namespace qtool::quant::detail {

// Adds rows [row_begin, row_end) of `linear` (whose tensors are `parts`) against the original
// weight `original` (row-major [out, in] of `dtype`: BF16, F16 or F32) to `sums`.
// `impl`: Fast uses the AVX-512 or AVX2 path when the CPU has it, FastAvx2 the AVX2 path, Reference
// the scalar one.
void accumulate_error(const QuantizedLinear& linear, const TensorBytes& parts, DType dtype,
                      const uint8_t* original, size_t row_begin, size_t row_end, ErrorSums& sums,
                      Impl impl = Impl::Fast);
// The same over elements [begin, end) of the flattened weight (whole rows for int8 and fp8).
void accumulate_error_elements(const QuantizedLinear& linear, const TensorBytes& parts, DType dtype,
                               const uint8_t* original, uint64_t begin, uint64_t end, ErrorSums& sums,
                               Impl impl = Impl::Fast);

}  // namespace qtool::quant::detail
