// attention on the CPU: SDPA per (sample, head, query row) with one row of float32 scores at a
// time, never a [q_len, kv_len] matrix. For query t of head j (kv head j / (heads / kv_heads)):
//   s_u = (q·k_u)·scale [+ bias[j·q_len + t, u]] [+ finfo(dtype).min if key u is dropped]
// over the visible keys u (all, or u <= t when causal), each dot product summed in order of the
// features; then m = max s_u, p_u = expf(s_u − m), l = Σ p_u (in key order), and
// out = ⟦(Σ_u p_u·v_u) / l⟧ with the weighted sum accumulated per feature in key order.
// A NaN score makes its whole row NaN (as softmax does); a fully masked row gives uniform
// weights (every score is finfo.min). Threads split (sample, head, query block) items; each
// keeps the float32 K and V of the (sample, kv head) it works on.
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

[[gnu::always_inline]] inline v8f splat(float x) { return v8f{x, x, x, x, x, x, x, x}; }

// The float32 K and V of one (sample, kv head).
struct Head {
  const float* kt;  // K transposed, [hd, kvp] (keys padded with 0 up to kvp = round_up8(kv_len))
  const float* vf;  // V, [kv_len, hdp] (features padded with 0 up to hdp = round_up8(hd))
  int64_t hd;
  int64_t kvp;
  int64_t hdp;
};

constexpr int kVecs = 8;  // vectors in flight per pass: 8 accumulators hide the add latency

// s[u] = (Σ_d q_d·k_{u,d}, summed in order of d)·scale for u < round_up8(n): eight keys per
// vector, kVecs vectors per pass.
__attribute__((target_clones("avx2", "default"))) void scores_row(const float* q, const Head& h, int64_t n,
                                                                  float scale, float* s) {
  const int64_t n8 = round_up8(n);
  const v8f sv = splat(scale);
  int64_t u = 0;
  for (; u + 8 * kVecs <= n8; u += 8 * kVecs) {
    v8f a[kVecs] = {};
    for (int64_t d = 0; d < h.hd; ++d) {
      const float* k = h.kt + d * h.kvp + u;
      const v8f qd = splat(q[d]);
#pragma GCC unroll 8
      for (int j = 0; j < kVecs; ++j) a[j] += qd * load8(k + 8 * j);
    }
#pragma GCC unroll 8
    for (int j = 0; j < kVecs; ++j) store8(s + u + 8 * j, a[j] * sv);
  }
  for (; u < n8; u += 8) {
    v8f a = {};
    for (int64_t d = 0; d < h.hd; ++d) a += splat(q[d]) * load8(h.kt + d * h.kvp + u);
    store8(s + u, a * sv);
  }
}

// acc ([hdp]) = Σ_{u < n} p[u]·v_u, accumulated in key order; 8·kVecs features per pass in
// registers.
__attribute__((target_clones("avx2", "default"))) void weighted_sum(const float* p, const Head& h, int64_t n,
                                                                    float* acc) {
  int64_t d = 0;
  for (; d + 8 * kVecs <= h.hdp; d += 8 * kVecs) {
    v8f a[kVecs] = {};
    for (int64_t u = 0; u < n; ++u) {
      const float* v = h.vf + u * h.hdp + d;
      const v8f pu = splat(p[u]);
#pragma GCC unroll 8
      for (int j = 0; j < kVecs; ++j) a[j] += pu * load8(v + 8 * j);
    }
#pragma GCC unroll 8
    for (int j = 0; j < kVecs; ++j) store8(acc + d + 8 * j, a[j]);
  }
  for (; d < h.hdp; d += 8) {
    v8f a = {};
    for (int64_t u = 0; u < n; ++u) a += splat(p[u]) * load8(h.vf + u * h.hdp + d);
    store8(acc + d, a);
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
    std::vector<float>& row = scratch.scores[slot];
    kv.resize(static_cast<size_t>(hd * kvp + a.kv_len * hdp));
    row.resize(static_cast<size_t>(kvp + 2 * hdp));
    float* s = row.data();
    float* qf = s + kvp;
    float* acc = qf + hdp;
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
      for (int64_t t = qb * kQueryBlock; t < t1; ++t) {
        const int64_t r = b * a.q_len + t;
        load_row(q.rows_view(r, 1).cols_view(j * hd, hd), 0, qf);
        const int64_t n = a.causal ? std::min(t + 1, a.kv_len) : a.kv_len;
        scores_row(qf, head, n, a.scale, s);
        if (a.bias) {
          const Mat brow = a.bias->rows_view(j * a.q_len + t, 1);
          for (int64_t u = 0; u < n; ++u) s[u] += load(brow.dtype, row_ptr(brow, 0), u);
        }
        if (a.key_mask)
          for (int64_t u = 0; u < n; ++u)
            if (key_dropped(*a.key_mask, b, u)) s[u] += mask_min;
        const float l = softmax_weights(s, n);
        weighted_sum(s, head, n, acc);
        for (int64_t d = 0; d < hd; ++d) acc[d] = acc[d] / l;
        store_row(acc, out.rows_view(r, 1).cols_view(j * hd, hd), 0);
      }
    }
  });
}

}  // namespace qtool::runner::cpu_ops
