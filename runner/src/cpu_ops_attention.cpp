// attention on the CPU: SDPA per (sample, head, query row) with one row of float32 scores per
// query row, four query rows of a head at a time (they share the K and V loads), never a
// [q_len, kv_len] matrix. For query t of head j (kv head j / (heads / kv_heads)):
//   s_u = (q·k_u)·scale [+ bias[j·q_len + t, u]] [+ finfo(dtype).min if key u is dropped]
// over the visible keys u (all, or u <= t when causal), each dot product summed in order of the
// features; then m = max s_u, p_u = expf(s_u − m), l = Σ p_u (in key order), and
// out = ⟦(Σ_u p_u·v_u) / l⟧ with the weighted sum accumulated per feature in key order.
// A NaN score makes its whole row NaN (as softmax does); a fully masked row gives uniform
// weights in bf16 and f32, whose finfo.min swallows every score (f16's -65504 shifts them all). Threads split
// (sample, head, query block) items; each keeps the float32 K and V of the (sample, kv head) it works on.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "cpu_ops_impl.hpp"

namespace qtool::runner::cpu_ops {

namespace {

// 8 float32 lanes (two SSE registers in the baseline build, one AVX register in the AVX2 clone).
// Everything using it is inlined into this file's functions, so the vector ABI warning is moot.
#pragma GCC diagnostic ignored "-Wpsabi"
using v8f = float __attribute__((vector_size(32)));

constexpr int64_t kQueryBlock = 32;

[[gnu::always_inline]] inline v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

[[gnu::always_inline]] inline void store8(float* p, const v8f& v) { std::memcpy(p, &v, sizeof(v)); }

// A vector times a float scalar: GCC broadcasts the scalar (one vbroadcastss; a {x, x, ...}
// initialiser would be built lane by lane).
[[gnu::always_inline]] inline v8f scaled(const v8f& v, float x) { return v * x; }

// The float32 K and V of one (sample, kv head).
struct Head {
  const float* kt;  // K transposed, [hd, kvp] (keys padded with 0 up to kvp = round_up8(kv_len))
  const float* vf;  // V, [kv_len, hdp] (features padded with 0 up to hdp = round_up8(hd))
  int64_t hd;
  int64_t kvp;
  int64_t hdp;
};

constexpr int kRows = 4;  // query rows of one head that share each K and V load

// a_r += (x0, x1)·c(r) for the R rows (sixteen lanes): one load of x serves every row.
template <int R, class Coef>
[[gnu::always_inline]] inline void axpy16_rows(v8f (&a)[R][2], v8f x0, v8f x1, Coef c) {
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    const float cr = c(r);
    a[r][0] += scaled(x0, cr);
    a[r][1] += scaled(x1, cr);
  }
}

// s_r[u] = (Σ_d q_r[d]·k_{u,d}, summed in order of d)·scale for rows r < R and u < n8 (a multiple
// of 8): two vectors of eight keys per pass, each K load used by the R rows.
template <int R>
[[gnu::always_inline]] inline void scores_tile(const float* const* q, const Head& h, int64_t n8, float sv,
                                               float* const* s) {
  int64_t u = 0;
  for (; u + 16 <= n8; u += 16) {
    v8f a[R][2] = {};
    for (int64_t d = 0; d < h.hd; ++d) {
      const float* k = h.kt + d * h.kvp + u;
      axpy16_rows<R>(a, load8(k), load8(k + 8), [&](int r) { return q[r][d]; });
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      store8(s[r] + u, scaled(a[r][0], sv));
      store8(s[r] + u + 8, scaled(a[r][1], sv));
    }
  }
  if (u < n8) {
    v8f a[R] = {};
    for (int64_t d = 0; d < h.hd; ++d) {
      const v8f k0 = load8(h.kt + d * h.kvp + u);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) a[r] += scaled(k0, q[r][d]);
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) store8(s[r] + u, scaled(a[r], sv));
  }
}

// acc_r ([hdp]) += Σ_{u0 <= u < u1} p_r[u]·v_u for rows r < R, in key order: sixteen features per
// pass, each V load used by the R rows.
template <int R>
[[gnu::always_inline]] inline void weighted_tile(const float* const* p, const Head& h, int64_t u0, int64_t u1,
                                                 float* const* acc) {
  int64_t d = 0;
  for (; d + 16 <= h.hdp; d += 16) {
    v8f a[R][2];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) a[r][0] = load8(acc[r] + d), a[r][1] = load8(acc[r] + d + 8);
    for (int64_t u = u0; u < u1; ++u) {
      const float* v = h.vf + u * h.hdp + d;
      axpy16_rows<R>(a, load8(v), load8(v + 8), [&](int r) { return p[r][u]; });
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) store8(acc[r] + d, a[r][0]), store8(acc[r] + d + 8, a[r][1]);
  }
  if (d < h.hdp) {
    v8f a[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) a[r] = load8(acc[r] + d);
    for (int64_t u = u0; u < u1; ++u) {
      const v8f v0 = load8(h.vf + u * h.hdp + d);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) a[r] += scaled(v0, p[r][u]);
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) store8(acc[r] + d, a[r]);
  }
}

// The scores of `rows` (1..kRows) query rows against keys [0, n) (and up to round_up8(n)).
__attribute__((target_clones("avx2", "default"))) void scores_rows(const float* const* q, int rows,
                                                                   const Head& h, int64_t n, float scale,
                                                                   float* const* s) {
  const int64_t n8 = round_up8(n);
  switch (rows) {
    case 1: scores_tile<1>(q, h, n8, scale, s); break;
    case 2: scores_tile<2>(q, h, n8, scale, s); break;
    case 3: scores_tile<3>(q, h, n8, scale, s); break;
    default: scores_tile<kRows>(q, h, n8, scale, s); break;
  }
}

__attribute__((target_clones("avx2", "default"))) void weighted_rows(const float* const* p, int rows,
                                                                     const Head& h, int64_t u0, int64_t u1,
                                                                     float* const* acc) {
  switch (rows) {
    case 1: weighted_tile<1>(p, h, u0, u1, acc); break;
    case 2: weighted_tile<2>(p, h, u0, u1, acc); break;
    case 3: weighted_tile<3>(p, h, u0, u1, acc); break;
    default: weighted_tile<kRows>(p, h, u0, u1, acc); break;
  }
}

bool key_dropped(const Mat& mask, int64_t b, int64_t u) {
  const uint8_t* p = row_ptr(mask, b) + u * static_cast<int64_t>(mask.elem_bytes());
  if (mask.dtype == DType::I64) {
    int64_t v;
    std::memcpy(&v, p, 8);
    return v == 0;
  }
  int32_t v;
  std::memcpy(&v, p, 4);
  return v == 0;
}

// Softmax of s[0, n) in place (unnormalised weights), returning their sum.
float softmax_weights(float* s, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  bool nan = false;
  for (int64_t u = 0; u < n; ++u) {
    nan = nan || std::isnan(s[u]);
    m = std::max(m, s[u]);
  }
  if (nan) m = std::numeric_limits<float>::quiet_NaN();  // every weight becomes NaN
  float l = 0.0f;
  for (int64_t u = 0; u < n; ++u) {
    s[u] = std::exp(s[u] - m);
    l += s[u];
  }
  return l;
}

// K (transposed) and V of sample b, kv head kvh, as float32 (the layouts of Head).
void load_head(const Mat& k, const Mat& v, int64_t b, int64_t kvh, int64_t kv_len, const Head& h, float* kt,
               float* vf) {
  for (int64_t u = 0; u < kv_len; ++u) {
    const int64_t r = b * kv_len + u;
    float* vrow = vf + u * h.hdp;
    load_row(k.rows_view(r, 1).cols_view(kvh * h.hd, h.hd), 0, vrow);  // K's row, staged in V's
    for (int64_t d = 0; d < h.hd; ++d) kt[d * h.kvp + u] = vrow[d];
    load_row(v.rows_view(r, 1).cols_view(kvh * h.hd, h.hd), 0, vrow);
    std::fill(vrow + h.hd, vrow + h.hdp, 0.0f);
  }
  for (int64_t d = 0; d < h.hd; ++d) std::fill(kt + d * h.kvp + kv_len, kt + (d + 1) * h.kvp, 0.0f);
}

void check_shape(const Mat& q, const Mat& k, const Mat& v, const AttentionShape& a, const Mat& out) {
  QTOOL_ASSERT_MSG(a.batch > 0 && a.q_len > 0 && a.kv_len > 0 && a.heads > 0 && a.kv_heads > 0 &&
                       a.head_dim > 0 && a.heads % a.kv_heads == 0,
                   "attention shape: batch ", a.batch, " q_len ", a.q_len, " kv_len ", a.kv_len, " heads ",
                   a.heads, " kv_heads ", a.kv_heads, " head_dim ", a.head_dim);
  QTOOL_ASSERT(q.rows == a.batch * a.q_len && q.cols == a.heads * a.head_dim);
  QTOOL_ASSERT(out.rows == q.rows && out.cols == q.cols);
  QTOOL_ASSERT(k.rows == a.batch * a.kv_len && k.cols == a.kv_heads * a.head_dim);
  QTOOL_ASSERT(v.rows == k.rows && v.cols == k.cols);
  QTOOL_ASSERT(!a.bias || (a.bias->rows == a.heads * a.q_len && a.bias->cols == a.kv_len));
  QTOOL_ASSERT(!a.key_mask || ((a.key_mask->dtype == DType::I64 || a.key_mask->dtype == DType::I32) &&
                               a.key_mask->rows == a.batch && a.key_mask->cols == a.kv_len));
  for (const Mat* m : {&q, &k, &v, &out}) QTOOL_ASSERT(is_activation_dtype(m->dtype) && m->ld >= m->cols);
}

}  // namespace

void attention(ThreadPool& pool, Scratch& scratch, const Mat& q, const Mat& k, const Mat& v,
               const AttentionShape& a, const Mat& out) {
  check_shape(q, k, v, a, out);
  const int64_t hd = a.head_dim;
  const int64_t hdp = round_up8(hd);
  const int64_t group = a.heads / a.kv_heads;
  const int64_t n_qb = (a.q_len + kQueryBlock - 1) / kQueryBlock;
  const float mask_min = finfo_min(q.dtype);
  // Items ordered (sample, head, query block): consecutive heads share a kv head.
  const size_t n_items = static_cast<size_t>(a.batch * a.heads * n_qb);
  const int64_t kvp = round_up8(a.kv_len);
  for_slots(pool, n_items, 1, [&](size_t slot, size_t i0, size_t i1) {
    std::vector<float>& kv = scratch.kv[slot];
    std::vector<float>& rows = scratch.scores[slot];
    kv.resize(static_cast<size_t>(hd * kvp + a.kv_len * hdp));
    rows.resize(static_cast<size_t>(kRows * (kvp + 2 * hdp)));
    float* s[kRows];
    float* qf[kRows];
    float* acc[kRows];
    for (int r = 0; r < kRows; ++r) {
      s[r] = rows.data() + r * kvp;
      qf[r] = rows.data() + kRows * kvp + r * hdp;
      acc[r] = rows.data() + kRows * (kvp + hdp) + r * hdp;
    }
    const Head head{kv.data(), kv.data() + hd * kvp, hd, kvp, hdp};
    int64_t loaded = -1;
    for (size_t i = i0; i < i1; ++i) {
      const int64_t qb = static_cast<int64_t>(i) % n_qb;
      const int64_t j = static_cast<int64_t>(i) / n_qb % a.heads;
      const int64_t b = static_cast<int64_t>(i) / n_qb / a.heads;
      const int64_t key = b * a.kv_heads + j / group;
      if (key != loaded) {
        load_head(k, v, b, j / group, a.kv_len, head, kv.data(), kv.data() + hd * kvp);
        loaded = key;
      }
      const int64_t t1 = std::min(a.q_len, (qb + 1) * kQueryBlock);
      for (int64_t t = qb * kQueryBlock; t < t1; t += kRows) {
        const int n_rows = static_cast<int>(std::min<int64_t>(kRows, t1 - t));
        int64_t n[kRows];
        for (int r = 0; r < n_rows; ++r) {
          load_row(q.rows_view(b * a.q_len + t + r, 1).cols_view(j * hd, hd), 0, qf[r]);
          n[r] = a.causal ? std::min(t + r + 1, a.kv_len) : a.kv_len;  // non-decreasing in r
        }
        scores_rows(qf, n_rows, head, n[n_rows - 1], a.scale, s);
        float l[kRows];
        for (int r = 0; r < n_rows; ++r) {
          if (a.bias) {
            const Mat brow = a.bias->rows_view(j * a.q_len + t + r, 1);
            for (int64_t u = 0; u < n[r]; ++u) s[r][u] += load(brow.dtype, row_ptr(brow, 0), u);
          }
          if (a.key_mask)
            for (int64_t u = 0; u < n[r]; ++u)
              if (key_dropped(*a.key_mask, b, u)) s[r][u] += mask_min;
          l[r] = softmax_weights(s[r], n[r]);
          std::fill(acc[r], acc[r] + hdp, 0.0f);
        }
        // Rows r >= k see keys [n[k-1], n[k]) as well: each row sums its own keys in order.
        weighted_rows(s, n_rows, head, 0, n[0], acc);
        for (int k = 1; k < n_rows; ++k) weighted_rows(s + k, n_rows - k, head, n[k - 1], n[k], acc + k);
        for (int r = 0; r < n_rows; ++r) {
          for (int64_t d = 0; d < hd; ++d) acc[r][d] = acc[r][d] / l[r];
          store_row(acc[r], out.rows_view(b * a.q_len + t + r, 1).cols_view(j * hd, hd), 0);
        }
      }
    }
  });
}

}  // namespace qtool::runner::cpu_ops
