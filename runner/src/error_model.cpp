#include "qtool/runner/error_model.hpp"

#include <algorithm>
#include <cmath>
#include <mutex>
#include <utility>

#include "qtool/formats/error.hpp"

namespace qtool::runner {
namespace {

// The bf16 rounding of a value v: variance <= v^2 * 4^-7 / 12 (relative spacing at most 2^-7).
constexpr double kBf16RelVar = 1.0 / (16384.0 * 12.0);

// Widths of the intervals of [-1, 1] that round to each code of a 16-entry table: between the
// midpoints to the neighbouring values in sorted order, the outermost ending at -1 and 1.
void code_widths(const float* table, size_t n, double* width) {
  std::vector<std::pair<double, size_t>> sorted;
  for (size_t i = 0; i < n; ++i) sorted.emplace_back(table[i], i);
  std::sort(sorted.begin(), sorted.end());
  for (size_t k = 0; k < n; ++k) {
    const double lo =
        k == 0 ? std::min(-1.0, sorted[0].first) : 0.5 * (sorted[k - 1].first + sorted[k].first);
    const double hi =
        k + 1 == n ? std::max(1.0, sorted[k].first) : 0.5 * (sorted[k].first + sorted[k + 1].first);
    width[sorted[k].second] = std::max(0.0, hi - lo);
  }
}

// The spacing of the fp8 grid at code q, in units of the scale.
double fp8_ulp(uint8_t q, bool e4m3) {
  const int man_bits = e4m3 ? 3 : 2;
  const int bias = e4m3 ? 7 : 15;
  const int exp = e4m3 ? (q >> 3) & 0xF : (q >> 2) & 0x1F;
  const int e = exp == 0 ? 1 - bias : exp - bias;
  return std::ldexp(1.0, e - man_bits);
}

}  // namespace

std::vector<double> column_error_variance(const DequantParams& p, WeightKind ref_kind, ThreadPool& pool) {
  const uint64_t rows = p.rows, cols = p.cols;
  std::vector<double> total(cols, 0.0);
  if (rows == 0 || cols == 0) return total;
  float code_table[16] = {};
  float nested_map[256] = {};
  double width[16] = {};
  double nested_width[256] = {};
  if (is_4bit(p.kind)) {
    resolve_tables(p, code_table, nested_map);
    code_widths(code_table, 16, width);
    // The dynamic map is ascending; half-gaps to its neighbours, the ends at +-1.
    std::vector<std::pair<double, size_t>> sorted;
    for (size_t i = 0; i < 256; ++i) sorted.emplace_back(nested_map[i], i);
    std::sort(sorted.begin(), sorted.end());
    for (size_t k = 0; k < 256; ++k) {
      const double lo =
          k == 0 ? std::min(-1.0, sorted[0].first) : 0.5 * (sorted[k - 1].first + sorted[k].first);
      const double hi =
          k + 1 == 256 ? std::max(1.0, sorted[k].first) : 0.5 * (sorted[k].first + sorted[k + 1].first);
      nested_width[sorted[k].second] = std::max(0.0, hi - lo);
    }
  }
  const bool ref_rounds = ref_kind != WeightKind::Bf16;
  std::mutex mu;
  pool.parallel_for(rows, std::max<uint64_t>(1, 4096 / cols), [&](size_t r0, size_t r1) {
    std::vector<double> local(cols, 0.0);
    for (uint64_t r = r0; r < r1; ++r) {
      const double row_scale =
          (p.kind == WeightKind::Int8 || p.kind == WeightKind::Fp8E4M3 || p.kind == WeightKind::Fp8E5M2)
              ? static_cast<double>(dq::row_scale(p, r))
              : 0.0;
      for (uint64_t c = 0; c < cols; ++c) {
        const uint64_t i = r * cols + c;
        const double w = dq::element_f32(p, i, code_table, nested_map);
        double v = 0;
        switch (p.kind) {
          case WeightKind::Int8: {
            const double u = row_scale / 127.0;
            v = u * u / 12.0;
            break;
          }
          case WeightKind::Fp8E4M3:
          case WeightKind::Fp8E5M2: {
            const double u = row_scale * fp8_ulp(p.weight[i], p.kind == WeightKind::Fp8E4M3);
            v = u * u / 12.0;
            break;
          }
          case WeightKind::Nf4:
          case WeightKind::Fp4: {
            const uint64_t b = i / p.blocksize;
            const double absmax = dq::block_absmax(p, b, nested_map);
            const uint32_t q = dq::code_of(p.weight, i);
            const double u = absmax * width[q];
            v = u * u / 12.0;
            if (p.double_quant) {
              const double nested = dq::load_f32(p.nested_absmax, b / dq::kNestedBlocksize);
              const double ua = nested * nested_width[p.scale[b]];
              v += static_cast<double>(code_table[q]) * code_table[q] * ua * ua / 12.0;
            }
            break;
          }
          case WeightKind::Host:
            fail(ErrorKind::Unsupported, "the error model has no rule for scheme ", weight_name(p),
                 " (a comparison with the original needs one)");
          case WeightKind::Bf16:
          case WeightKind::F16:
          case WeightKind::F32:
            // Unquantized: only conversions to bf16 differ (this side's when not bf16, the
            // reference's when not bf16).
            v = 0;
            if (p.kind != WeightKind::Bf16) v += w * w * kBf16RelVar;
            break;
        }
        if (p.kind != WeightKind::Bf16 && p.kind != WeightKind::F16 && p.kind != WeightKind::F32)
          v += w * w * kBf16RelVar;  // the dequantized value rounded to bf16
        if (ref_rounds) v += w * w * kBf16RelVar;
        if (std::isfinite(v)) local[c] += v;
      }
    }
    std::lock_guard<std::mutex> lock(mu);
    for (uint64_t c = 0; c < cols; ++c) total[c] += local[c];
  });
  return total;
}

double ErrorPrediction::rel_error() const {
  if (sum_sq_ref <= 0) return sum_sq_err > 0 ? INFINITY : 0.0;
  return std::sqrt(sum_sq_err / sum_sq_ref);
}

double ErrorPrediction::predicted_rel() const {
  if (sum_sq_ref <= 0) return predicted_sq > 0 ? INFINITY : 0.0;
  return std::sqrt(predicted_sq / sum_sq_ref);
}

double ErrorPrediction::bound() const { return factor * predicted_rel() + kErrorFloor; }

ErrorPrediction predict_and_measure(const std::vector<uint16_t>& y_q, const std::vector<uint16_t>& y_ref,
                                    const std::vector<uint16_t>& x, uint64_t ldx, uint64_t tokens,
                                    uint64_t in, const std::vector<double>& col_var, WeightKind kind) {
  QTOOL_ASSERT(y_q.size() == y_ref.size());
  QTOOL_ASSERT(col_var.size() == in);
  ErrorPrediction e;
  e.factor = error_bound_factor(kind);
  for (size_t k = 0; k < y_q.size(); ++k) {
    const double a = kmath::bf16_bits_to_f32(y_q[k]);
    const double b = kmath::bf16_bits_to_f32(y_ref[k]);
    const double d = a - b;
    e.sum_sq_ref += b * b;
    e.sum_sq_err += std::isfinite(d) ? d * d : INFINITY;
    e.predicted_sq += 2.0 * b * b * kBf16RelVar;  // both outputs rounded to bf16
  }
  for (uint64_t t = 0; t < tokens; ++t) {
    for (uint64_t j = 0; j < in; ++j) {
      const double v = kmath::bf16_bits_to_f32(x[t * ldx + j]);
      e.predicted_sq += v * v * col_var[j];
    }
  }
  return e;
}

}  // namespace qtool::runner
