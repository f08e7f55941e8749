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
// The prediction is the square root of that over ||y_ref||^2.
//
// Spread. The measured error is one draw: when a few rows carry most of the error (a row with an
// outlier has a coarse grid) and the tokens are few, it scatters widely around its expectation.
// Row i's error over the tokens, X e_i, has covariance C_i = X diag(var[i,:]) X^T, and its squared
// norm a variance of about 2 tr(C_i^2). With the tokens' activations uncorrelated (verify's are
// generated independently), C_i's diagonal is a_t = sum_j var[i,j] x[t,j]^2, taken as
// m_i g_t / tr(X X^T) with m_i = sum_j var[i,j] s_j, s_j = sum_t x[t,j]^2, g_t = sum_j x[t,j]^2,
// and an off-diagonal entry has expected square sum_j var[i,j]^2 x[t,j]^2 x[u,j]^2, so
//   spread^2 = 2 sum_i (m_i^2 sum_t g_t^2 / tr(X X^T)^2 + sum_j var[i,j]^2 (s_j^2 - sum_t x[t,j]^4))
// is the variance of the squared error. Relative to the prediction it is about
// sqrt(2 (1/tokens + 1/in) / rows) for a layer whose rows err alike, and approaches
// sqrt(2 / tokens) for one whose error sits in one row.
//
// verify passes a layer when its measured relative error is at most
//   error_bound_factor(kind) * sqrt((predicted + 3 spread) / ||y_ref||^2) + kErrorFloor:
// the factor, 1.5, covers the model's approximation of the error as uniform inside each interval,
// which is close for int8, fp8 and nf4 (measured/predicted 0.9-1.1 on synthetic weights); fp4's
// intervals are wide and its values crowd their inner ends (measured/predicted up to 1.35), so it
// gets 2. Three spreads cover the draw: an int8 tiny-flux proj_out (64 x 320, 16 tokens, one row's
// absmax 60 x the others') measured 1.503 x its prediction, outside the factor alone. A corrupted
// byte of weight or scale moves the error far past either.
#pragma once

#include <cstdint>
#include <vector>

#include "qtool/formats/thread_pool.hpp"
#include "qtool/runner/dequant.hpp"

namespace qtool::runner {

inline constexpr double kErrorBoundFactor = 1.5;
inline constexpr double kErrorBoundFactorFp4 = 2.0;
inline constexpr double kErrorFloor = 1e-6;
inline constexpr double kErrorSpreadSigmas = 3.0;

inline double error_bound_factor(WeightKind kind) {
  return kind == WeightKind::Fp4 ? kErrorBoundFactorFp4 : kErrorBoundFactor;
}

// sum over rows i of the error variance of element (i, j), for every column j ([cols]), of the
// weight `params` (host pointers) against the value it was quantized from. `ref_kind` is the
// reference weight's storage (a non-bf16 reference is rounded to bf16 before its GEMM too).
std::vector<double> column_error_variance(const DequantParams& params, WeightKind ref_kind, ThreadPool& pool);

// column_error_variance and, for the weight run on x (bf16 bits, [tokens, ldx], first params.cols
// columns used), the standard deviation of ||y_q - y_ref||^2 under the model (the spread above),
// in one pass over the weight.
struct ErrorVariance {
  std::vector<double> col;  // [cols], as column_error_variance
  double spread_sq = 0;
};
ErrorVariance error_variance(const DequantParams& params, WeightKind ref_kind, const std::vector<uint16_t>& x,
                             uint64_t ldx, uint64_t tokens, ThreadPool& pool);

struct ErrorPrediction {
  double sum_sq_ref = 0;     // ||y_ref||^2
  double sum_sq_err = 0;     // ||y_q - y_ref||^2 (measured)
  double predicted_sq = 0;   // E ||y_q - y_ref||^2 (model)
  double spread_sq = 0;      // its standard deviation (model), ErrorVariance::spread_sq
  double rel_error() const;  // sqrt(sum_sq_err / sum_sq_ref), 0 when both are 0
  double predicted_rel() const;
  double factor = kErrorBoundFactor;
  double bound() const;  // factor * sqrt((predicted_sq + 3 spread_sq) / sum_sq_ref) + kErrorFloor
  bool within() const { return rel_error() <= bound(); }
};

// Compares the two outputs (bf16 bits, [tokens, out]) of one layer: x is the activation it ran
// on (bf16 bits, [tokens, ldx], first `in` columns used), `col_var` and `spread_sq` from
// error_variance (a spread of 0 leaves the draw's spread out). `kind` is the quantized weight's
// (it sets the bound's factor).
ErrorPrediction predict_and_measure(const std::vector<uint16_t>& y_q, const std::vector<uint16_t>& y_ref,
                                    const std::vector<uint16_t>& x, uint64_t ldx, uint64_t tokens,
                                    uint64_t in, const std::vector<double>& col_var, double spread_sq,
                                    WeightKind kind);

}  // namespace qtool::runner
