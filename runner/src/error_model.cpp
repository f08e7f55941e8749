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

// Widths of the intervals of [-1, 1] that round to each entry of an n-entry table (a 4-bit code
// table, or double quant's 256-entry dynamic map): between the midpoints to the neighbouring
// values in sorted order, the outermost ending at -1 and 1.
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

// The variance of the error of each element of a weight against the value it was quantized
// from (the model above), a row at a time.
class ElementVariance {
 public:
  ElementVariance(const DequantParams& p, WeightKind ref_kind)
      : p_(p), ref_rounds_(ref_kind != WeightKind::Bf16) {
    if (!is_4bit(p.kind)) return;
    resolve_tables(p, code_table_, nested_map_);
    code_widths(code_table_, 16, width_);
    code_widths(nested_map_, 256, nested_width_);  // the absmax's dynamic map, likewise
  }

  // Row r's variances into v[cols]; a non-finite one (a garbage scale) counts as 0.
  void row(uint64_t r, double* out) const {
    const DequantParams& p = p_;
    const uint64_t cols = p.cols;
    const double row_scale =
        (p.kind == WeightKind::Int8 || p.kind == WeightKind::Fp8E4M3 || p.kind == WeightKind::Fp8E5M2)
            ? static_cast<double>(dq::row_scale(p, r))
            : 0.0;
    for (uint64_t c = 0; c < cols; ++c) {
      const uint64_t i = r * cols + c;
      const double w = dq::element_f32(p, i, code_table_, nested_map_);
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
          const double absmax = dq::block_absmax(p, b, nested_map_);
          const uint32_t q = dq::code_of(p.weight, i);
          const double u = absmax * width_[q];
          v = u * u / 12.0;
          if (p.double_quant) {
            const double nested = dq::load_f32(p.nested_absmax, b / dq::kNestedBlocksize);
            const double ua = nested * nested_width_[p.scale[b]];
            v += static_cast<double>(code_table_[q]) * code_table_[q] * ua * ua / 12.0;
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
      if (ref_rounds_) v += w * w * kBf16RelVar;
      out[c] = std::isfinite(v) ? v : 0.0;
    }
  }

 private:
  const DequantParams& p_;
  bool ref_rounds_;
  float code_table_[16] = {};
  float nested_map_[256] = {};
  double width_[16] = {};
  double nested_width_[256] = {};
};

}  // namespace

ErrorVariance error_variance(const DequantParams& p, WeightKind ref_kind, const std::vector<uint16_t>& x,
                             uint64_t ldx, uint64_t tokens, ThreadPool& pool) {
  const uint64_t rows = p.rows, cols = p.cols;
  ErrorVariance out;
  out.col.assign(cols, 0.0);
  if (rows == 0 || cols == 0) return out;
  QTOOL_ASSERT(tokens == 0 || x.size() >= (tokens - 1) * ldx + cols);
  // s_j = sum_t x[t,j]^2, q_j = sum_t x[t,j]^4, g_t = sum_j x[t,j]^2.
  std::vector<double> s(cols, 0.0), q(cols, 0.0);
  double trace = 0, sum_g_sq = 0;
  for (uint64_t t = 0; t < tokens; ++t) {
    double g = 0;
    for (uint64_t j = 0; j < cols; ++j) {
      const double xv = kmath::bf16_bits_to_f32(x[t * ldx + j]);
      const double x2 = xv * xv;
      s[j] += x2;
      q[j] += x2 * x2;
      g += x2;
    }
    trace += g;
    sum_g_sq += g * g;
  }
  const ElementVariance var(p, ref_kind);
  std::mutex mu;
  double sum_m_sq = 0, sum_n = 0;
  pool.parallel_for(rows, std::max<uint64_t>(1, 4096 / cols), [&](size_t r0, size_t r1) {
    std::vector<double> v(cols), local(cols, 0.0);
    double local_m_sq = 0, local_n = 0;
    for (uint64_t r = r0; r < r1; ++r) {
      var.row(r, v.data());
      double m = 0, n = 0;
      for (uint64_t j = 0; j < cols; ++j) {
        local[j] += v[j];
        m += v[j] * s[j];
        n += v[j] * v[j] * (s[j] * s[j] - q[j]);
      }
      local_m_sq += m * m;
      local_n += n;
    }
    std::lock_guard<std::mutex> lock(mu);
    for (uint64_t j = 0; j < cols; ++j) out.col[j] += local[j];
    sum_m_sq += local_m_sq;
    sum_n += local_n;
  });
  if (trace > 0 && std::isfinite(trace))
    out.spread_sq = std::sqrt(2.0 * (sum_m_sq * sum_g_sq / (trace * trace) + sum_n));
  return out;
}

std::vector<double> column_error_variance(const DequantParams& p, WeightKind ref_kind, ThreadPool& pool) {
  return error_variance(p, ref_kind, {}, 0, 0, pool).col;
}

double ErrorPrediction::rel_error() const {
  if (sum_sq_ref <= 0) return sum_sq_err > 0 ? INFINITY : 0.0;
  return std::sqrt(sum_sq_err / sum_sq_ref);
}

double ErrorPrediction::predicted_rel() const {
  if (sum_sq_ref <= 0) return predicted_sq > 0 ? INFINITY : 0.0;
  return std::sqrt(predicted_sq / sum_sq_ref);
}

double ErrorPrediction::bound() const {
  if (sum_sq_ref <= 0) return predicted_sq + spread_sq > 0 ? INFINITY : kErrorFloor;
  return factor * std::sqrt((predicted_sq + kErrorSpreadSigmas * spread_sq) / sum_sq_ref) + kErrorFloor;
}

ErrorPrediction predict_and_measure(const std::vector<uint16_t>& y_q, const std::vector<uint16_t>& y_ref,
                                    const std::vector<uint16_t>& x, uint64_t ldx, uint64_t tokens,
                                    uint64_t in, const std::vector<double>& col_var, double spread_sq,
                                    WeightKind kind) {
  QTOOL_ASSERT(y_q.size() == y_ref.size());
  QTOOL_ASSERT(col_var.size() == in);
  ErrorPrediction e;
  e.factor = error_bound_factor(kind);
  e.spread_sq = spread_sq;
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
