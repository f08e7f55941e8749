// Kernels of the CUDA backend of ops.hpp (kernel -> launcher; the entries are forward_ops.cpp).
// Bit-exactness with the CPU backend (cpu_ops.cpp): the runner's CUDA flags (--fmad=false,
// -prec-div=true, -ftz=false) keep every float32 product and sum a separate IEEE operation, and
// the roundings to bf16/f16 are the CPU's functions (kernel_math.hpp) or a copy of them here.
// Transcendentals: expf and tanhf are CUDA's precise functions (max 2 ulp from the true value per
// the CUDA programming guide), where the CPU's glibc expf/tanhf are correctly rounded in practice;
// a result can therefore differ by an ulp of float32, which changes a bf16/f16 output only when
// it lands on a rounding boundary (the gpu test measures that rate for Silu, GeluTanh, GeluNew,
// QuickGelu). sqrtf and the division are IEEE-exact on both. NaNs: the products, sums and
// quotients go through kmath's x86_* functions, which give x86's NaN results (the GPU's own are
// canonical), so NaN inputs give the CPU's bits too, except in the norms, where a NaN reaches the
// whole row through double sums (the NaNs agree, their payloads may not).
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>

#include "attention_mma.hpp"
#include "forward_kernels.hpp"
#include "qtool/formats/error.hpp"
#include "qtool/runner/cuda_resources.hpp"
#include "qtool/runner/dequant.hpp"
#include "qtool/runner/kernel_math.hpp"
#include "view_access.cuh"

namespace qtool::runner::cuda::fwd {

namespace {

constexpr int kThreads = 256;

unsigned grid_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > 65535 * 8 ? 65535 * 8 : blocks));
}

// A launch over a rows x cols grid of cells: threads along x take columns (a warp-multiple no wider
// than the row), along y rows, so that a kernel finds (row, column) without dividing a flat index
// by the row length (a 64-bit division costs more than the memory access it indexes).
struct Launch2 {
  dim3 grid, block;
};
Launch2 launch2(int64_t rows, int64_t cols) {
  const int64_t tx = std::min<int64_t>(kThreads, std::max<int64_t>(32, (cols + 31) / 32 * 32));
  const int64_t ty = kThreads / tx;
  const int64_t bx = std::min<int64_t>((cols + tx - 1) / tx, 65535);
  const int64_t by = std::min<int64_t>((rows + ty - 1) / ty, 65535);
  return {
      dim3(static_cast<unsigned>(std::max<int64_t>(bx, 1)), static_cast<unsigned>(std::max<int64_t>(by, 1))),
      dim3(static_cast<unsigned>(tx), static_cast<unsigned>(ty))};
}
// The first row / column of this thread under launch2, and the strides to its next ones.
__device__ __forceinline__ int64_t row0() { return blockIdx.y * int64_t{blockDim.y} + threadIdx.y; }
__device__ __forceinline__ int64_t row_step() { return int64_t{gridDim.y} * blockDim.y; }
__device__ __forceinline__ int64_t col0() { return blockIdx.x * int64_t{blockDim.x} + threadIdx.x; }
__device__ __forceinline__ int64_t col_step() { return int64_t{gridDim.x} * blockDim.x; }

// float32 -> f16 bits exactly as cpu_ops::f32_to_f16_bits.
__device__ __forceinline__ uint16_t f16_bits(float f) {
  const uint32_t u = kmath::float_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return static_cast<uint16_t>(sign | 0x7E00u);
  if (a >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);
  if (a < 0x38800000u) {
    const float scaled = __fmul_rn(kmath::bits_float(a), 16777216.0f);
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(rintf(scaled)));
  }
  const uint32_t r = a - 0x38000000u + 0xFFFu + ((a >> 13) & 1u);
  return static_cast<uint16_t>(sign | (r >> 13));
}

__device__ __forceinline__ float rnd(int dt, float v) {
  if (dt == kBf16) return kmath::bf16_bits_to_f32(kmath::f32_to_bf16_bits(v));
  if (dt == kF16) return dq::f16_to_f32(f16_bits(v));
  return v;
}

__device__ __forceinline__ void st_el(const View& m, int64_t r, int64_t c, float v) {
  const int64_t i = r * m.ld + c;
  if (m.dt == kBf16)
    static_cast<uint16_t*>(m.data)[i] = kmath::f32_to_bf16_bits(v);
  else if (m.dt == kF16)
    static_cast<uint16_t*>(m.data)[i] = f16_bits(v);
  else
    static_cast<float*>(m.data)[i] = v;
}

constexpr float kGeluBeta = 0.7978845608028654f;
constexpr float kGeluKappa = 0.044715f;

// The ops.hpp Activation values.
enum : int { kIdentity = 0, kSilu, kGeluTanh, kGeluNew, kQuickGelu, kRelu };

// The CPU's float32 operations with x86's NaN results (a NaN operand's payload, quieted; a new
// NaN is 0xFFC00000), so that NaN inputs give the CPU's bits as well.
__device__ __forceinline__ float mul(float a, float b) { return kmath::x86_mul(a, b); }
__device__ __forceinline__ float add(float a, float b) { return kmath::x86_add(a, b); }
__device__ __forceinline__ float dvd(float a, float b) { return kmath::x86_div(a, b); }

// act(x) rounded to dt as cpu_ops.cpp's activate (same operations in the same order).
__device__ float activate(int act, float x, int dt) {
  switch (act) {
    case kIdentity: return rnd(dt, x);
    case kSilu: return rnd(dt, dvd(x, add(1.0f, expf(-x))));
    case kGeluTanh: {
      const float cube = mul(mul(x, x), x);
      const float inner = mul(kGeluBeta, add(x, mul(kGeluKappa, cube)));
      return rnd(dt, mul(mul(0.5f, x), add(1.0f, tanhf(inner))));
    }
    case kRelu: return x <= 0.0f ? 0.0f : rnd(dt, x);
    case kGeluNew: {
      const float a = rnd(dt, mul(0.5f, x));
      const float b = rnd(dt, mul(mul(x, x), x));
      const float c = rnd(dt, mul(kGeluKappa, b));
      const float d = rnd(dt, add(x, c));
      const float e = rnd(dt, mul(kGeluBeta, d));
      const float f = rnd(dt, tanhf(e));
      const float g = rnd(dt, add(1.0f, f));
      return rnd(dt, mul(a, g));
    }
    case kQuickGelu: {
      const float a = rnd(dt, mul(1.702f, x));
      const float s = rnd(dt, dvd(1.0f, add(1.0f, expf(-a))));
      return rnd(dt, mul(x, s));
    }
    default: break;
  }
  return x;
}

// Whether op reads b, and g (a gate row per sample).
__host__ __device__ constexpr bool ew_reads_b(Ew op) {
  return op == Ew::Gated || op == Ew::Add || op == Ew::Residual || op == Ew::ResidualGated;
}
__host__ __device__ constexpr bool ew_reads_g(Ew op) { return op == Ew::ResidualGated; }

// One element of an element-wise op, before the rounding to dt: x from a, bv from b, gv from g.
__device__ __forceinline__ float ew_value(Ew op, int act, float x, float bv, float gv, float bound, int dt) {
  switch (op) {
    case Ew::Activation: return activate(act, x, dt);
    case Ew::Gated: return mul(activate(act, x, dt), bv);
    case Ew::Add:
    case Ew::Residual: return add(x, bv);
    case Ew::ResidualGated: return add(x, rnd(dt, mul(gv, bv)));
    case Ew::Copy: return x;
    case Ew::Clamp: return x < -bound ? -bound : (x > bound ? bound : x);
    default: return x;
  }
}

__global__ void elementwise_kernel(Ew op, int act, View a, View b, View g, int64_t seq, float bound,
                                   View out) {
  for (int64_t r = row0(); r < out.rows; r += row_step()) {
    const int64_t rg = r / seq;  // the row of g (per sample)
    for (int64_t c = col0(); c < out.cols; c += col_step()) {
      const float bv = ew_reads_b(op) ? ld_el(b, r, c) : 0.0f;
      const float gv = ew_reads_g(op) ? ld_el(g, rg, c) : 0.0f;
      st_el(out, r, c, ew_value(op, act, ld_el(a, r, c), bv, gv, bound, out.dt));
    }
  }
}

// Eight bf16 elements [r, c..c+7] of m (16-byte aligned) as float32, and back (rounded as st_el).
__device__ __forceinline__ void ld_bf16x8(const View& m, int64_t r, int64_t c, float (&v)[8]) {
  const uint4 w = *reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(m.data) + r * m.ld + c);
  const uint32_t u[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    v[2 * k] = kmath::bf16_bits_to_f32(static_cast<uint16_t>(u[k] & 0xFFFFu));
    v[2 * k + 1] = kmath::bf16_bits_to_f32(static_cast<uint16_t>(u[k] >> 16));
  }
}
__device__ __forceinline__ void st_bf16x8(const View& m, int64_t r, int64_t c, const float (&v)[8]) {
  uint32_t u[4];
#pragma unroll
  for (int k = 0; k < 4; ++k)
    u[k] = static_cast<uint32_t>(kmath::f32_to_bf16_bits(v[2 * k])) |
           (static_cast<uint32_t>(kmath::f32_to_bf16_bits(v[2 * k + 1])) << 16);
  *reinterpret_cast<uint4*>(static_cast<uint16_t*>(m.data) + r * m.ld + c) =
      make_uint4(u[0], u[1], u[2], u[3]);
}

// elementwise_kernel for bf16 views whose rows are 16-byte aligned and whose width is a multiple
// of 8: each thread takes 8 elements with one 16-byte load per operand and one store, and computes
// each with ew_value, so the bits are the generic kernel's.
__global__ void elementwise_bf16x8_kernel(Ew op, int act, View a, View b, View g, int64_t seq, float bound,
                                          View out) {
  const int64_t vcols = out.cols / 8;
  for (int64_t r = row0(); r < out.rows; r += row_step()) {
    const int64_t rg = r / seq;
    for (int64_t vc = col0(); vc < vcols; vc += col_step()) {
      const int64_t c = vc * 8;
      float x[8], bv[8] = {}, gv[8] = {}, y[8];
      ld_bf16x8(a, r, c, x);
      if (ew_reads_b(op)) ld_bf16x8(b, r, c, bv);
      if (ew_reads_g(op)) ld_bf16x8(g, rg, c, gv);
#pragma unroll
      for (int k = 0; k < 8; ++k) y[k] = ew_value(op, act, x[k], bv[k], gv[k], bound, kBf16);
      st_bf16x8(out, r, c, y);
    }
  }
}

__global__ void embedding_kernel(const void* ids, bool i64, int64_t ids_ld, DequantParams table, View out) {
  for (int64_t r = row0(); r < out.rows; r += row_step()) {
    const int64_t id = i64 ? static_cast<const int64_t*>(ids)[r * ids_ld]
                           : static_cast<int64_t>(static_cast<const int32_t*>(ids)[r * ids_ld]);
    for (int64_t c = col0(); c < out.cols; c += col_step())
      st_el(out, r, c, dq::plain_value(table, static_cast<uint64_t>(id) * table.cols + c));
  }
}

// One thread per rotation pair j of a row, for every head of it (both elements read before either
// is written: in place is safe); cos and sin are read once for all heads.
__global__ void rope_kernel(bool adjacent, View x, int64_t hd, View cs, View sn, View out) {
  const int64_t half = hd / 2;
  const int dt = out.dt;
  for (int64_t r = row0(); r < x.rows; r += row_step()) {
    for (int64_t j = col0(); j < half; j += col_step()) {
      if (adjacent) {
        const int64_t m = 2 * j;
        const float c0 = ld_el(cs, r, m), c1 = ld_el(cs, r, m + 1);
        const float s0 = ld_el(sn, r, m), s1 = ld_el(sn, r, m + 1);
        for (int64_t h0 = 0; h0 < x.cols; h0 += hd) {
          const float x0 = ld_el(x, r, h0 + m), x1 = ld_el(x, r, h0 + m + 1);
          st_el(out, r, h0 + m, add(mul(x0, c0), mul(-x1, s0)));
          st_el(out, r, h0 + m + 1, add(mul(x1, c1), mul(x0, s1)));
        }
      } else {
        const int64_t m = j, m2 = j + half;
        const float ca = ld_el(cs, r, m), sa = ld_el(sn, r, m), cb = ld_el(cs, r, m2), sb = ld_el(sn, r, m2);
        for (int64_t h0 = 0; h0 < x.cols; h0 += hd) {
          const float xa = ld_el(x, r, h0 + m), xb = ld_el(x, r, h0 + m2);
          st_el(out, r, h0 + m, add(rnd(dt, mul(xa, ca)), rnd(dt, mul(-xb, sa))));
          st_el(out, r, h0 + m2, add(rnd(dt, mul(xb, cb)), rnd(dt, mul(xa, sb))));
        }
      }
    }
  }
}

// The warp's sum of its lanes' partials, folded as kmath::kSumLanes says (every lane gets it).
__device__ __forceinline__ double warp_lane_sum(double v) {
  for (int off = kmath::kSumLanes / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xFFFFFFFFu, v, off);
  return v;
}

// Output element c (in group g, index i in it) of a norm, before the rounding to dt: the CPU's
// operations in its order. st: the group's (mean, inv); sh, sc: the modulation's shift and scale.
__device__ __forceinline__ float norm_value(int mode, float v, const float* st, const DequantParams& w,
                                            bool has_w, const DequantParams& b, bool has_b, int64_t i,
                                            float sh, float sc, int dt) {
  const float inv = st[1];
  if (mode == 0) return mul(mul(v, inv), dq::plain_value(w, static_cast<uint64_t>(i)));
  if (mode == 1) return mul(dq::plain_value(w, static_cast<uint64_t>(i)), rnd(dt, mul(v, inv)));
  if (mode == 2) {
    float y = mul(add(v, -st[0]), inv);
    if (has_w) y = mul(y, dq::plain_value(w, static_cast<uint64_t>(i)));
    if (has_b) y = add(y, dq::plain_value(b, static_cast<uint64_t>(i)));
    return y;
  }
  const float n = rnd(dt, mul(add(v, -st[0]), inv));
  const float s1 = rnd(dt, add(1.0f, sc));
  return add(rnd(dt, mul(n, s1)), sh);
}

// One block per row. The row is staged in shared memory; each group's statistics are summed by
// one warp in double, in kmath's lane order (the CPU's order and precision: the same bits). With
// vec8 (bf16 views, 16-byte aligned rows, widths and the group multiples of 8: launch_norm), the
// row is read and written 8 elements a thread with 16-byte loads and stores. Columns fit in an int
// (max_norm_cols), so the group of a column is a 32-bit division, and a row's sample (r / seq) is
// found once.
__global__ void norm_kernel(int mode, View x, DequantParams w, bool has_w, DequantParams b, bool has_b,
                            int64_t group, float eps, View shift, View scale, int64_t seq, View out,
                            bool vec8) {
  extern __shared__ float sm[];
  float* v = sm;  // [cols]
  const int cols = static_cast<int>(x.cols);
  const int grp = static_cast<int>(group);
  const int n_groups = cols / grp;
  float* stats = sm + cols;  // [2 * n_groups]: mean (or mean square), inv
  const int64_t r = blockIdx.x;
  if (vec8) {
    for (int c = 8 * static_cast<int>(threadIdx.x); c < cols; c += 8 * static_cast<int>(blockDim.x)) {
      float e[8];
      ld_bf16x8(x, r, c, e);
#pragma unroll
      for (int k = 0; k < 8; ++k) v[c + k] = e[k];
    }
  } else {
    for (int c = threadIdx.x; c < cols; c += blockDim.x) v[c] = ld_el(x, r, c);
  }
  __syncthreads();
  const int lane = static_cast<int>(threadIdx.x) % kmath::kSumLanes;
  const int warps = static_cast<int>(blockDim.x) / kmath::kSumLanes;
  for (int g = static_cast<int>(threadIdx.x) / kmath::kSumLanes; g < n_groups; g += warps) {
    const float* vg = v + g * grp;
    if (mode <= 1) {
      double s = 0.0;
      for (int i = lane; i < grp; i += kmath::kSumLanes) s += static_cast<double>(vg[i] * vg[i]);
      s = warp_lane_sum(s);
      const float ms = static_cast<float>(s / static_cast<double>(grp));
      if (lane == 0) stats[2 * g + 1] = 1.0f / sqrtf(ms + eps);
    } else {
      double s = 0.0;
      for (int i = lane; i < grp; i += kmath::kSumLanes) s += vg[i];
      const double mu = warp_lane_sum(s) / static_cast<double>(grp);
      double q = 0.0;
      for (int i = lane; i < grp; i += kmath::kSumLanes) q += (vg[i] - mu) * (vg[i] - mu);
      q = warp_lane_sum(q);
      const float var = static_cast<float>(q / static_cast<double>(grp));
      if (lane == 0) {
        stats[2 * g] = static_cast<float>(mu);
        stats[2 * g + 1] = 1.0f / sqrtf(var + eps);
      }
    }
  }
  __syncthreads();
  const int dt = out.dt;
  const int64_t rs = mode == 3 ? r / seq : 0;  // the row of shift and scale
  if (vec8) {
    for (int c = 8 * static_cast<int>(threadIdx.x); c < cols; c += 8 * static_cast<int>(blockDim.x)) {
      const int g = static_cast<int>(static_cast<unsigned>(c) / static_cast<unsigned>(grp));
      const int i0 = c - g * grp;
      float sh[8] = {}, sc[8] = {}, y[8];
      if (mode == 3) {
        ld_bf16x8(shift, rs, c, sh);
        ld_bf16x8(scale, rs, c, sc);
      }
#pragma unroll
      for (int k = 0; k < 8; ++k)
        y[k] = norm_value(mode, v[c + k], stats + 2 * g, w, has_w, b, has_b, i0 + k, sh[k], sc[k], kBf16);
      st_bf16x8(out, r, c, y);
    }
    return;
  }
  for (int c = threadIdx.x; c < cols; c += blockDim.x) {
    const int g = static_cast<int>(static_cast<unsigned>(c) / static_cast<unsigned>(grp));
    const float sh = mode == 3 ? ld_el(shift, rs, c) : 0.0f, sc = mode == 3 ? ld_el(scale, rs, c) : 0.0f;
    st_el(out, r, c, norm_value(mode, v[c], stats + 2 * g, w, has_w, b, has_b, c - g * grp, sh, sc, dt));
  }
}

__global__ void dequant_generic_kernel(DequantParams p, const float* code_table, const float* nested_map,
                                       int dt, void* out) {
  const uint64_t n = p.rows * p.cols;
  for (uint64_t i = blockIdx.x * uint64_t{blockDim.x} + threadIdx.x; i < n;
       i += uint64_t{gridDim.x} * blockDim.x) {
    const float v = dq::element_f32(p, i, code_table, nested_map);
    if (dt == kF16)
      static_cast<uint16_t*>(out)[i] = f16_bits(v);
    else if (dt == kBf16)
      static_cast<uint16_t*>(out)[i] = kmath::f32_to_bf16_bits(v);
    else
      static_cast<float*>(out)[i] = v;
  }
}

__global__ void bias_round_kernel(const float* acc, DequantParams bias, bool has_bias, View out) {
  for (int64_t r = row0(); r < out.rows; r += row_step()) {
    for (int64_t c = col0(); c < out.cols; c += col_step()) {
      const float s = acc[r * out.cols + c];
      st_el(out, r, c, has_bias ? add(s, dq::plain_value(bias, static_cast<uint64_t>(c))) : s);
    }
  }
}

// --- attention ---------------------------------------------------------------------------------
// launch_attention takes the tensor-core kernel (attention_mma.cu) where it covers the case; this
// one is the fallback for every other head_dim (<= 256), float32, and unaligned views.
// Flash-attention style on CUDA cores: a block of kRowsPerBlock warps serves that many query rows
// of one (sample, head); tiles of 32 keys and values are staged in shared memory as float32. Lane
// u of a warp scores key u of the tile (q·k summed in order of d), the warp keeps the running
// maximum and sum of the online softmax, and lane l accumulates output dims l, l + 32, ... with
// the tile's probabilities broadcast by shuffles. Scores, softmax and accumulation in float32;
// the [T, T] matrix never exists. FMA is used here on purpose (attention is compared within a
// tolerance, not bit for bit).
constexpr int kRowsPerBlock = 8;
constexpr int kTile = 32;
constexpr int kMaxDimsPerLane = 8;  // head_dim <= 256

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
  return v;
}

__global__ void attention_kernel(AttnArgs a) {
  extern __shared__ float sm[];
  const int64_t hd = a.head_dim;
  const int64_t kstride = hd + 1;    // padded: lanes read different keys at one d without bank conflicts
  float* ks = sm;                    // [kTile][hd + 1]
  float* vs = ks + kTile * kstride;  // [kTile][hd]
  float* qs = vs + kTile * hd;       // [kRowsPerBlock][hd]
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t b = blockIdx.z;
  const int64_t h = blockIdx.y;
  const int64_t hkv = h / (a.heads / a.kv_heads);
  const int64_t t0 = int64_t{blockIdx.x} * kRowsPerBlock;
  const int64_t t = t0 + warp;
  const bool row_ok = t < a.q_len;
  const int64_t qrow = b * a.q_len + t;
  for (int64_t d = lane; d < hd; d += 32) qs[warp * hd + d] = row_ok ? ld_el(a.q, qrow, h * hd + d) : 0.0f;
  float m = -INFINITY, l = 0.0f;
  float acc[kMaxDimsPerLane];
#pragma unroll
  for (int j = 0; j < kMaxDimsPerLane; ++j) acc[j] = 0.0f;
  int64_t kv_end = a.kv_len;
  if (a.causal) {
    const int64_t last = t0 + kRowsPerBlock - 1 < a.q_len - 1 ? t0 + kRowsPerBlock - 1 : a.q_len - 1;
    kv_end = last + 1 < kv_end ? last + 1 : kv_end;
  }
  for (int64_t u0 = 0; u0 < kv_end; u0 += kTile) {
    __syncthreads();  // the previous tile is consumed (and qs is written, the first time)
    const int64_t n_tile = kv_end - u0 < kTile ? kv_end - u0 : kTile;
    for (int64_t e = threadIdx.x; e < kTile * hd; e += blockDim.x) {
      const int64_t uu = e / hd, d = e - uu * hd;
      const bool in = uu < n_tile;
      const int64_t krow = b * a.kv_len + u0 + uu;
      ks[uu * kstride + d] = in ? ld_el(a.k, krow, hkv * hd + d) : 0.0f;
      vs[uu * hd + d] = in ? ld_el(a.v, krow, hkv * hd + d) : 0.0f;
    }
    __syncthreads();
    const int64_t u = u0 + lane;
    bool valid = row_ok && lane < n_tile && (!a.causal || u <= t);
    float s = -INFINITY;
    if (valid) {
      const float* qv = qs + warp * hd;
      const float* kv = ks + lane * kstride;
      float dot = 0.0f;
      for (int64_t d = 0; d < hd; ++d) dot = __fmaf_rn(qv[d], kv[d], dot);
      s = dot * a.scale;
      if (a.bias.data) s = s + ld_el(a.bias, h * a.q_len + t, u);
      if (a.mask) {
        const int64_t keep = a.mask_i64 ? static_cast<const int64_t*>(a.mask)[b * a.mask_ld + u]
                                        : static_cast<const int32_t*>(a.mask)[b * a.mask_ld + u];
        if (keep == 0) s = s + a.mask_value;
      }
    }
    const float mt = warp_max(s);
    if (mt == -INFINITY) continue;  // nothing visible in this tile for this row (warp-uniform)
    const float m_new = fmaxf(m, mt);
    const float corr = expf(m - m_new);  // m == -inf: 0
    const float p = valid ? expf(s - m_new) : 0.0f;
    l = l * corr + warp_sum(p);
    m = m_new;
#pragma unroll
    for (int j = 0; j < kMaxDimsPerLane; ++j) acc[j] *= corr;
    for (int uu = 0; uu < n_tile; ++uu) {
      const float pu = __shfl_sync(0xFFFFFFFFu, p, uu);
#pragma unroll
      for (int j = 0; j < kMaxDimsPerLane; ++j) {
        const int64_t d = lane + 32 * j;
        if (d < hd) acc[j] = __fmaf_rn(pu, vs[uu * hd + d], acc[j]);
      }
    }
  }
  if (!row_ok) return;
#pragma unroll
  for (int j = 0; j < kMaxDimsPerLane; ++j) {
    const int64_t d = lane + 32 * j;
    if (d < hd) st_el(a.out, qrow, h * hd + d, acc[j] / l);
  }
}

size_t attention_smem(int64_t hd) {
  return static_cast<size_t>(kTile * (hd + 1) + kTile * hd + kRowsPerBlock * hd) * sizeof(float);
}

// On: its GPU test (test_cuda_ops.cpp) finds it equal to the generic kernel and the CPU.
std::atomic<bool> g_elementwise_bf16x8{true};
std::atomic<uint64_t> g_bf16x8_launches{0};

// A view the 8-wide paths read or write: bf16 with 16-byte aligned rows, while they are on.
bool wide_view(const View& m) {
  return g_elementwise_bf16x8.load(std::memory_order_relaxed) && m.dt == kBf16 && aligned_rows(m);
}

// The 8-wide kernel takes the op when every view it touches is one.
bool bf16x8_fits(Ew op, const View& a, const View& b, const View& g, const View& out) {
  return out.cols % 8 == 0 && wide_view(out) && wide_view(a) && (!ew_reads_b(op) || wide_view(b)) &&
         (!ew_reads_g(op) || wide_view(g));
}

}  // namespace

void set_elementwise_bf16x8(bool on) { g_elementwise_bf16x8.store(on); }
uint64_t elementwise_bf16x8_launches() { return g_bf16x8_launches.load(); }

void launch_elementwise(Ew op, int act, const View& a, const View& b, const View& g, int64_t seq, float bound,
                        const View& out, cudaStream_t stream) {
  if (out.rows * out.cols == 0) return;
  if (bf16x8_fits(op, a, b, g, out)) {
    const Launch2 l = launch2(out.rows, out.cols / 8);
    elementwise_bf16x8_kernel<<<l.grid, l.block, 0, stream>>>(op, act, a, b, g, seq, bound, out);
    g_bf16x8_launches.fetch_add(1, std::memory_order_relaxed);
  } else {
    const Launch2 l = launch2(out.rows, out.cols);
    elementwise_kernel<<<l.grid, l.block, 0, stream>>>(op, act, a, b, g, seq, bound, out);
  }
  QTOOL_CUDA_CHECK_LAUNCH();
}

void launch_embedding(const void* ids, bool ids_i64, int64_t ids_ld, const DequantParams& table,
                      const View& out, cudaStream_t stream) {
  if (out.rows * out.cols == 0) return;
  const Launch2 l = launch2(out.rows, out.cols);
  embedding_kernel<<<l.grid, l.block, 0, stream>>>(ids, ids_i64, ids_ld, table, out);
  QTOOL_CUDA_CHECK_LAUNCH();
}

void launch_rope(bool adjacent, const View& x, int64_t head_dim, const View& cos, const View& sin,
                 const View& out, cudaStream_t stream) {
  if (x.rows == 0 || head_dim < 2 || x.cols < head_dim) return;
  const Launch2 l = launch2(x.rows, head_dim / 2);
  rope_kernel<<<l.grid, l.block, 0, stream>>>(adjacent, x, head_dim, cos, sin, out);
  QTOOL_CUDA_CHECK_LAUNCH();
}

int64_t max_norm_cols(int device) {
  int optin = 0;
  QTOOL_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  // cols floats of the row and up to 2 * cols floats of statistics (groups of one column).
  return static_cast<int64_t>(optin) / (3 * static_cast<int64_t>(sizeof(float)));
}

void launch_norm(int mode, const View& x, const DequantParams* w, const DequantParams* b, int64_t group,
                 float eps, const View& shift, const View& scale, int64_t seq, const View& out,
                 cudaStream_t stream) {
  if (x.rows == 0 || x.cols == 0) return;
  const size_t smem = static_cast<size_t>(x.cols + 2 * (x.cols / group)) * sizeof(float);
  QTOOL_CUDA_CHECK(
      cudaFuncSetAttribute(norm_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  const DequantParams none{};
  const bool vec8 = x.cols % 8 == 0 && group % 8 == 0 && wide_view(x) && wide_view(out) &&
                    (mode != 3 || (wide_view(shift) && wide_view(scale)));
  norm_kernel<<<static_cast<unsigned>(x.rows), kThreads, smem, stream>>>(mode, x, w ? *w : none, w != nullptr,
                                                                         b ? *b : none, b != nullptr, group,
                                                                         eps, shift, scale, seq, out, vec8);
  if (vec8) g_bf16x8_launches.fetch_add(1, std::memory_order_relaxed);
  QTOOL_CUDA_CHECK_LAUNCH();
}

void launch_dequant_generic(const DequantParams& p, const float* code_table, const float* nested_map, int dt,
                            void* out, cudaStream_t stream) {
  require_device_kind(p);
  if (p.numel() == 0) return;
  dequant_generic_kernel<<<grid_for(static_cast<int64_t>(p.numel())), kThreads, 0, stream>>>(
      p, code_table, nested_map, dt, out);
  QTOOL_CUDA_CHECK_LAUNCH();
}

void launch_bias_round(const float* acc, const DequantParams* bias, const View& out, cudaStream_t stream) {
  if (out.rows * out.cols == 0) return;
  const DequantParams none{};
  const Launch2 l = launch2(out.rows, out.cols);
  bias_round_kernel<<<l.grid, l.block, 0, stream>>>(acc, bias ? *bias : none, bias != nullptr, out);
  QTOOL_CUDA_CHECK_LAUNCH();
}

void launch_attention(const AttnArgs& a, cudaStream_t stream) {
  if (a.batch * a.q_len * a.heads == 0) return;
  if (attention_mma_supported(a))
    launch_attention_mma(a, stream);
  else
    launch_attention_simt(a, stream);
}

void launch_attention_simt(const AttnArgs& a, cudaStream_t stream) {
  if (a.batch * a.q_len * a.heads == 0) return;
  const size_t smem = attention_smem(a.head_dim);
  QTOOL_CUDA_CHECK(cudaFuncSetAttribute(attention_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
  const dim3 grid(static_cast<unsigned>((a.q_len + kRowsPerBlock - 1) / kRowsPerBlock),
                  static_cast<unsigned>(a.heads), static_cast<unsigned>(a.batch));
  attention_kernel<<<grid, kRowsPerBlock * 32, smem, stream>>>(a);
  QTOOL_CUDA_CHECK_LAUNCH();
}

}  // namespace qtool::runner::cuda::fwd
