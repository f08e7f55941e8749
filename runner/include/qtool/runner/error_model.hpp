// The error a quantized linear is allowed against its original, predicted from the quantized
// weight alone (its codes and scales), so that `verify --reference` can tell quantization error
// from a fault.
//
// Model. Rounding to a grid of spacing u leaves an error uniform in [-u/2, u/2]: variance u^2/12.
// Per element of the weight, the spacing of the grid its value was rounded to is known from the
// stored representation:
//   int8         u = SCB[row] / 127
//   fp8          u = scale * ulp(q), ulp(q) = 2^(exponent(q) - bias - mantissa_bits)
//                (e4m3: 3 mantissa bits, subnormal ulp 2^-9; e5m2: 2 bits, 2^-16)
//   nf4 / fp4    u = absmax * width(q), width(q) = the interval of [-1, 1] that rounds to code q
//                (between the midpoints to its neighbours); double quant adds the absmax's own
//                rounding: code_value(q)^2 * (nested_absmax * width_dyn(qa))^2 / 12
// plus, for every kind, the rounding of the dequantized weight to bf16 (relative spacing <= 2^-7).
// Errors of different elements are independent and zero-mean, so for an output y = x W^T
//   E ||y_q - y_ref||^2 = sum_t sum_j x[t,j]^2 * sum_i var[i,j]
// (exact for the activations used), plus the bf16 rounding of both outputs (<= y^2 4^-7 / 12 each).
// The prediction is the square root of that over ||y_ref||^2. verify passes a layer when its
// measured relative error is at most kErrorBoundFactor times the prediction (plus kErrorFloor):
// the factor covers the sampling spread of a few thousand outputs and the model's approximation
// of the error as uniform inside each interval. A corrupted byte of weight or scale moves the
// error by orders of magnitude past it.
#pragma once

#include <cstdint>
#include <vector>

#include "qtool/formats/thread_pool.hpp"
#include "qtool/runner/dequant.hpp"

namespace qtool::runner {

inline constexpr double kErrorBoundFactor = 1.5;
inline constexpr double kErrorFloor = 1e-6;

// sum over rows i of the error variance of element (i, j), for every column j ([cols]), of the
// weight `params` (host pointers) against the value it was quantized from. `ref_kind` is the
// reference weight's storage (a non-bf16 reference is rounded to bf16 before its GEMM too).
std::vector<double> column_error_variance(const DequantParams& params, WeightKind ref_kind, ThreadPool& pool);

struct ErrorPrediction {
  double sum_sq_ref = 0;      // ||y_ref||^2
  double sum_sq_err = 0;      // ||y_q - y_ref||^2 (measured)
  double predicted_sq = 0;    // E ||y_q - y_ref||^2 (model)
  double rel_error() const;   // sqrt(sum_sq_err / sum_sq_ref), 0 when both are 0
  double predicted_rel() const;
  double bound() const;       // kErrorBoundFactor * predicted_rel + kErrorFloor
  bool within() const { return rel_error() <= bound(); }
};

// Compares the two outputs (bf16 bits, [tokens, out]) of one layer: x is the activation it ran
// on (bf16 bits, [tokens, ldx], first `in` columns used), `col_var` from column_error_variance.
ErrorPrediction predict_and_measure(const std::vector<uint16_t>& y_q, const std::vector<uint16_t>& y_ref,
                                    const std::vector<uint16_t>& x, uint64_t ldx, uint64_t tokens, uint64_t in,
                                    const std::vector<double>& col_var);

}  // namespace qtool::runner
