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
// measured relative error is at most error_bound_factor(kind) times the prediction (plus
// kErrorFloor): 1.5 covers the sampling spread of a few thousand outputs and the model's
// approximation of the error as uniform inside each interval, which is close for int8, fp8 and
// nf4 (measured/predicted 0.9-1.1 on synthetic weights); fp4's intervals are wide and its values
// crowd their inner ends (measured/predicted up to 1.35), so it gets 2. A corrupted byte of
// weight or scale moves the error far past either.
#pragma once

#include <cstdint>
#include <vector>

#include "qtool/formats/thread_pool.hpp"
#include "qtool/runner/dequant.hpp"

namespace qtool::runner {

inline constexpr double kErrorBoundFactor = 1.5;
inline constexpr double kErrorBoundFactorFp4 = 2.0;
inline constexpr double kErrorFloor = 1e-6;

inline double error_bound_factor(WeightKind kind) {
  return kind == WeightKind::Fp4 ? kErrorBoundFactorFp4 : kErrorBoundFactor;
}

// sum over rows i of the error variance of element (i, j), for every column j ([cols]), of the
// weight `params` (host pointers) against the value it was quantized from. `ref_kind` is the
// reference weight's storage (a non-bf16 reference is rounded to bf16 before its GEMM too).
std::vector<double> column_error_variance(const DequantParams& params, WeightKind ref_kind, ThreadPool& pool);

struct ErrorPrediction {
  double sum_sq_ref = 0;     // ||y_ref||^2
  double sum_sq_err = 0;     // ||y_q - y_ref||^2 (measured)
  double predicted_sq = 0;   // E ||y_q - y_ref||^2 (model)
  double rel_error() const;  // sqrt(sum_sq_err / sum_sq_ref), 0 when both are 0
  double predicted_rel() const;
  double factor = kErrorBoundFactor;
  double bound() const;  // factor * predicted_rel + kErrorFloor
  bool within() const { return rel_error() <= bound(); }
};

// Compares the two outputs (bf16 bits, [tokens, out]) of one layer: x is the activation it ran
// on (bf16 bits, [tokens, ldx], first `in` columns used), `col_var` from column_error_variance.
// `kind` is the quantized weight's (it sets the bound's factor).
ErrorPrediction predict_and_measure(const std::vector<uint16_t>& y_q, const std::vector<uint16_t>& y_ref,
                                    const std::vector<uint16_t>& x, uint64_t ldx, uint64_t tokens,
                                    uint64_t in, const std::vector<double>& col_var, WeightKind kind);

}  // namespace qtool::runner
