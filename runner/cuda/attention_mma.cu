// Flash-attention 2's forward on the tensor cores (what it computes: attention_mma.hpp).
//
// Design. A block serves kBr = 16·W query rows of one (sample, head) with W warps, each warp 16
// rows; grid (query blocks, heads, batch), causal blocks launched longest first. Shared memory
// holds the block's Q tile [kBr][HD] and two buffers of K and V tiles [64][HD] (bf16/f16, rows of
// HD/8 16-byte chunks, chunk c of row r stored at c ^ (r & 7): ldmatrix's eight row addresses of a
// phase then fall in eight distinct bank groups). Tiles arrive by cp.async (16 bytes a thread,
// rows past the end zero-filled); tile j + 1 is copied while tile j is computed (double buffer).
// Per tile each warp: S [16][64] = Q·Kᵀ (Q fragments kept in registers from the first tile, K
// fragments by ldmatrix, mma.sync m16n8k16 with float32 accumulation); scale, bias, key mask,
// causal and end-of-sequence masking in float32; the online softmax (row maximum over the four
// lanes sharing a row by shuffles, the running sum kept per lane and reduced at the end); P
// rounded to the dtype and reused in registers as the A operand of O [16][HD] += P·V (V fragments
// by ldmatrix.trans). Causal: a warp skips a tile whose first key follows its last row.
// Registers: O 4·HD/8 floats, S 32 floats, Q 2·HD/16·4 words per lane (hd 128: about 170).
#include <cuda_runtime.h>

#include <cstdint>

#include "attention_mma.hpp"
#include "qtool/formats/error.hpp"
#include "qtool/runner/cuda_resources.hpp"
#include "qtool/runner/dequant.hpp"
#include "qtool/runner/kernel_math.hpp"
#include "view_access.cuh"

namespace qtool::runner::cuda::fwd {

namespace {

constexpr int kBc = 64;  // keys per tile
constexpr float kLog2e = 1.4426950408889634f;

template <int HD, int W>
struct Tiles {
  static constexpr int kBr = 16 * W;
  static constexpr int kThreads = 32 * W;
  static constexpr size_t kSmem = static_cast<size_t>(kBr + 4 * kBc) * HD * sizeof(uint16_t);
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, or 16 zero bytes when !valid (src then is not read).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(n)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

// c += a·b: A 16x16 row-major (4 words), B 16x8 column-major (2 words), C 16x8 float32.
template <bool F16>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (F16) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Two floats rounded to nearest-even in the dtype, `lo` in the low half (the lower column).
template <bool F16>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  uint32_t r;
  if constexpr (F16)
    asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  else
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

__device__ __forceinline__ float exp2_approx(float x) {  // 2^x; -inf -> 0, NaN -> NaN
  float y;
  asm("ex2.approx.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ bool key_dropped(const AttnArgs& a, int64_t b, int64_t u) {
  return a.mask_i64 ? static_cast<const int64_t*>(a.mask)[b * a.mask_ld + u] == 0
                    : static_cast<const int32_t*>(a.mask)[b * a.mask_ld + u] == 0;
}

// x (a scaled score of row t, key u) plus the bias and the key mask, in the CPU backend's order.
__device__ __forceinline__ float bias_and_mask(const AttnArgs& a, float x, int64_t b, int64_t h, int64_t t,
                                               int64_t u) {
  if (a.bias.data && t < a.q_len) x = x + ld_el(a.bias, h * a.q_len + t, u);
  if (a.mask && key_dropped(a, b, u)) x = x + a.mask_value;
  return x;
}

// Rows [r0, r0 + ROWS) of a [*, HD] slice (row stride ld elements) into a swizzled tile; rows at or
// past r_end become zeros. Thread i copies chunk i % (HD/8) of rows i / (HD/8) + n·kStep: its
// swizzle (row & 7) is the same for all of them, kStep being a multiple of 8.
template <int HD, int THREADS, int ROWS>
__device__ __forceinline__ void load_tile(uint16_t* tile, const uint16_t* g, int64_t ld, int64_t r0,
                                          int64_t r_end) {
  constexpr int kChunks = HD / 8;
  constexpr int kStep = THREADS / kChunks;
  static_assert(THREADS % kChunks == 0 && kStep % 8 == 0 && ROWS % kStep == 0, "tile copies split evenly");
  const int c = static_cast<int>(threadIdx.x) % kChunks;
  const int rb = static_cast<int>(threadIdx.x) / kChunks;
  const int64_t left = r_end - r0 - rb;  // rows rb + n·kStep < left are in range
  const uint16_t* src = g + (r0 + rb) * ld + c * 8;
  uint16_t* dst = tile + rb * HD + ((c ^ (rb & 7)) << 3);
#pragma unroll
  for (int n = 0; n < ROWS / kStep; ++n) {
    const bool ok = n * kStep < left;
    cp_async16(dst + n * kStep * HD, ok ? src + n * kStep * ld : g, ok);
  }
}

// The shared address of 16-byte chunk `chunk` of row `row` of a swizzled tile.
template <int HD>
__device__ __forceinline__ uint32_t tile_addr(const uint16_t* tile, int row, int chunk) {
  return smem_addr(tile + row * HD + ((chunk ^ (row & 7)) << 3));
}

constexpr int kNb = kBc / 8;  // 8-key column blocks of S

// S = Q·Kᵀ for the warp's 16 rows and the tile's kBc keys (K fragments by ldmatrix from `kt`).
template <int HD, bool F16>
__device__ __forceinline__ void tile_scores(float (&s)[kNb][4], const uint32_t (&qf)[HD / 16][4],
                                            const uint16_t* kt, int lane) {
#pragma unroll
  for (int i = 0; i < kNb; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.0f;
#pragma unroll
  for (int kk = 0; kk < HD / 16; ++kk) {
#pragma unroll
    for (int np = 0; np < kNb / 2; ++np) {
      uint32_t r[4];
      ldsm_x4(r, tile_addr<HD>(kt, np * 16 + (lane & 7) + ((lane >> 4) << 3), 2 * kk + ((lane >> 3) & 1)));
      mma16816<F16>(s[2 * np], qf[kk], r[0], r[1]);
      mma16816<F16>(s[2 * np + 1], qf[kk], r[2], r[3]);
    }
  }
}

// Where a lane's scores sit: sample b, head h, the lane's first row (the other is row0 + 8), the
// tile's first key kv0 and the lane's column pair tq.
struct LanePos {
  int64_t b, h, row0, kv0;
  int tq;
};

// Scale, bias, masks (in the CPU backend's order) of the tile's scores, and their row maxima
// folded into mx. Key kv0 + c (c = nb·8 + 2·tq + e % 2) is visible to row row0 + 8·(e / 2) iff
// c < n_keys and, causal, c <= diag + 8·(e / 2); `edge` says whether any key can be hidden or
// biased (else only the scale applies), `biased` whether there is a bias or a key mask.
__device__ __forceinline__ void mask_scores(const AttnArgs& a, const LanePos& p, bool edge, bool biased,
                                            float (&s)[kNb][4], float (&mx)[2]) {
  const int n_keys = static_cast<int>(a.kv_len - p.kv0 < kBc ? a.kv_len - p.kv0 : kBc);
  const int diag = a.causal ? static_cast<int>(p.row0 - p.kv0 < kBc ? p.row0 - p.kv0 : kBc) : kBc;
#pragma unroll
  for (int nb = 0; nb < kNb; ++nb) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      float x = s[nb][e] * a.scale;
      if (edge) {
        const int c = nb * 8 + 2 * p.tq + (e & 1);
        if (c >= n_keys || c > diag + (e >> 1) * 8) {
          x = -INFINITY;
        } else if (biased) {
          x = bias_and_mask(a, x, p.b, p.h, p.row0 + (e >> 1) * 8, p.kv0 + c);
        }
      }
      s[nb][e] = x;
      mx[e >> 1] = fmaxf(mx[e >> 1], x);
    }
  }
}

// The online softmax's step: the rows' new maxima (over the four lanes sharing a row), S turned
// into P = exp(S - m), the running sums l and the accumulator O rescaled to the new maxima.
template <int HD>
__device__ __forceinline__ void softmax_step(float (&s)[kNb][4], float (&mx)[2], float (&m)[2], float (&l)[2],
                                             float (&o)[HD / 8][4]) {
  float mu[2], corr[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xFFFFFFFFu, mx[i], 1));
    mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xFFFFFFFFu, mx[i], 2));
    mu[i] = mx[i] == -INFINITY ? 0.0f : mx[i];  // no visible score yet: exp(-inf - 0) = 0
    corr[i] = exp2_approx((m[i] - mu[i]) * kLog2e);
    m[i] = mx[i];
  }
  float rs[2] = {0.0f, 0.0f};
#pragma unroll
  for (int nb = 0; nb < kNb; ++nb) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float p = exp2_approx((s[nb][e] - mu[e >> 1]) * kLog2e);
      s[nb][e] = p;
      rs[e >> 1] += p;
    }
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) l[i] = l[i] * corr[i] + rs[i];
#pragma unroll
  for (int db = 0; db < HD / 8; ++db) {
    o[db][0] *= corr[0];
    o[db][1] *= corr[0];
    o[db][2] *= corr[1];
    o[db][3] *= corr[1];
  }
}

// O += P·V, P rounded to the dtype (the A fragments are S's accumulator layout; V fragments by
// ldmatrix.trans from `vt`).
template <int HD, bool F16>
__device__ __forceinline__ void accumulate_pv(float (&o)[HD / 8][4], const float (&s)[kNb][4],
                                              const uint16_t* vt, int lane) {
#pragma unroll
  for (int kk = 0; kk < kBc / 16; ++kk) {
    const uint32_t pa[4] = {pack2<F16>(s[2 * kk][0], s[2 * kk][1]), pack2<F16>(s[2 * kk][2], s[2 * kk][3]),
                            pack2<F16>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                            pack2<F16>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
    for (int dp = 0; dp < HD / 16; ++dp) {
      uint32_t r[4];
      ldsm_x4_trans(r,
                    tile_addr<HD>(vt, kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3), 2 * dp + (lane >> 4)));
      mma16816<F16>(o[2 * dp], pa, r[0], r[1]);
      mma16816<F16>(o[2 * dp + 1], pa, r[2], r[3]);
    }
  }
}

// out = O / l for the lane's two rows, l summed over the four lanes of a row.
template <int HD, bool F16>
__device__ __forceinline__ void store_rows(const AttnArgs& a, const LanePos& p, const float (&o)[HD / 8][4],
                                           float (&l)[2]) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l[i] += __shfl_xor_sync(0xFFFFFFFFu, l[i], 1);
    l[i] += __shfl_xor_sync(0xFFFFFFFFu, l[i], 2);
  }
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int64_t t = p.row0 + half * 8;
    if (t >= a.q_len) continue;
    uint16_t* og = static_cast<uint16_t*>(a.out.data) + (p.b * a.q_len + t) * a.out.ld + p.h * HD + 2 * p.tq;
#pragma unroll
    for (int db = 0; db < HD / 8; ++db)
      *reinterpret_cast<uint32_t*>(og + db * 8) =
          pack2<F16>(o[db][2 * half] / l[half], o[db][2 * half + 1] / l[half]);
  }
}

template <int HD, int W, bool F16>
// hd 64: at most 128 registers (two 8-warp or four 4-warp blocks an SM); hd 128: up to 255.
__global__ void __launch_bounds__(32 * W, (HD == 64 ? 16 : 8) / W) attention_mma_kernel(AttnArgs a) {
  using T = Tiles<HD, W>;
  constexpr int kBr = T::kBr;
  constexpr int kThreads = T::kThreads;
  constexpr int kDb = HD / 8;  // 8-wide column blocks of O
  extern __shared__ __align__(128) unsigned char attn_smem[];
  uint16_t* qs = reinterpret_cast<uint16_t*>(attn_smem);  // [kBr][HD]
  uint16_t* ks = qs + kBr * HD;                           // [2][kBc][HD]
  uint16_t* vs = ks + 2 * kBc * HD;                       // [2][kBc][HD]

  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  LanePos p;
  p.b = blockIdx.z;
  p.h = blockIdx.y;
  const int64_t hkv = p.h / (a.heads / a.kv_heads);
  // Causal blocks differ in length: the longest (last query rows) go first.
  const int64_t qb = a.causal ? int64_t{gridDim.x} - 1 - blockIdx.x : int64_t{blockIdx.x};
  const int64_t q0 = qb * kBr;
  int64_t kv_end = a.kv_len;
  if (a.causal && q0 + kBr < kv_end) kv_end = q0 + kBr;
  const int n_tiles = static_cast<int>((kv_end + kBc - 1) / kBc);

  const uint16_t* qg = static_cast<const uint16_t*>(a.q.data) + p.b * a.q_len * a.q.ld + p.h * HD;
  const uint16_t* kg = static_cast<const uint16_t*>(a.k.data) + p.b * a.kv_len * a.k.ld + hkv * HD;
  const uint16_t* vg = static_cast<const uint16_t*>(a.v.data) + p.b * a.kv_len * a.v.ld + hkv * HD;

  load_tile<HD, kThreads, kBr>(qs, qg, a.q.ld, q0, a.q_len);
  load_tile<HD, kThreads, kBc>(ks, kg, a.k.ld, 0, a.kv_len);
  load_tile<HD, kThreads, kBc>(vs, vg, a.v.ld, 0, a.kv_len);
  cp_async_commit();

  p.tq = lane & 3;                        // the fragment column pair of this lane
  p.row0 = q0 + warp * 16 + (lane >> 2);  // the fragment row (and row + 8) of this lane
  const int64_t warp_first = q0 + warp * 16;
  const int64_t warp_last = warp_first + 15;
  const bool has_bias = a.bias.data != nullptr;
  const bool has_mask = a.mask != nullptr;

  float o[kDb][4];
#pragma unroll
  for (int i = 0; i < kDb; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY};
  float l[2] = {0.0f, 0.0f};
  uint32_t qf[HD / 16][4];

  for (int j = 0; j < n_tiles; ++j) {
    const int buf = j & 1;
    if (j + 1 < n_tiles) {
      load_tile<HD, kThreads, kBc>(ks + (buf ^ 1) * kBc * HD, kg, a.k.ld, int64_t{j + 1} * kBc, a.kv_len);
      load_tile<HD, kThreads, kBc>(vs + (buf ^ 1) * kBc * HD, vg, a.v.ld, int64_t{j + 1} * kBc, a.kv_len);
    }
    cp_async_commit();  // (empty on the last tile: the wait below then still means "tile j is in")
    cp_async_wait<1>();
    __syncthreads();
    if (j == 0) {
#pragma unroll
      for (int kk = 0; kk < HD / 16; ++kk)
        ldsm_x4(qf[kk],
                tile_addr<HD>(qs, warp * 16 + (lane & 7) + (((lane >> 3) & 1) << 3), 2 * kk + (lane >> 4)));
    }
    p.kv0 = int64_t{j} * kBc;
    if (!(a.causal && p.kv0 > warp_last)) {
      float s[kNb][4];
      tile_scores<HD, F16>(s, qf, ks + buf * kBc * HD, lane);
      const bool edge =
          p.kv0 + kBc > a.kv_len || (a.causal && p.kv0 + kBc - 1 > warp_first) || has_bias || has_mask;
      float mx[2] = {m[0], m[1]};
      mask_scores(a, p, edge, has_bias || has_mask, s, mx);
      softmax_step<HD>(s, mx, m, l, o);
      accumulate_pv<HD, F16>(o, s, vs + buf * kBc * HD, lane);
    }
    __syncthreads();  // every warp is done with buffer `buf` before tile j + 2 is copied into it
  }
  cp_async_wait<0>();
  store_rows<HD, F16>(a, p, o, l);
}

template <int HD, int W, bool F16>
void launch_tiles(const AttnArgs& a, cudaStream_t stream) {
  using T = Tiles<HD, W>;
  auto* kernel = attention_mma_kernel<HD, W, F16>;
  QTOOL_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(T::kSmem)));
  const dim3 grid(static_cast<unsigned>((a.q_len + T::kBr - 1) / T::kBr), static_cast<unsigned>(a.heads),
                  static_cast<unsigned>(a.batch));
  kernel<<<grid, T::kThreads, T::kSmem, stream>>>(a);
  QTOOL_CUDA_CHECK_LAUNCH();
}

template <int HD, bool F16>
void launch_dim(const AttnArgs& a, cudaStream_t stream, int warps) {
  if (warps == 4)
    launch_tiles<HD, 4, F16>(a, stream);
  else
    launch_tiles<HD, 8, F16>(a, stream);
}

}  // namespace

bool aligned_rows(const View& v) {
  return reinterpret_cast<uintptr_t>(v.data) % 16 == 0 && v.ld % 8 == 0 && v.ld >= v.cols;
}

bool attention_mma_supported(const AttnArgs& a) {
  const int dt = a.q.dt;
  return (a.head_dim == 64 || a.head_dim == 128) && (dt == kBf16 || dt == kF16) && a.k.dt == dt &&
         a.v.dt == dt && a.out.dt == dt && aligned_rows(a.q) && aligned_rows(a.k) && aligned_rows(a.v) &&
         aligned_rows(a.out) && a.q_len >= 1 && a.kv_len >= 1 && a.batch >= 1 && a.batch <= 65535 &&
         a.heads >= 1 && a.heads <= 65535 && a.kv_heads >= 1 && a.heads % a.kv_heads == 0 &&
         (!a.causal || a.q_len == a.kv_len);
}

void launch_attention_mma(const AttnArgs& a, cudaStream_t stream, int warps) {
  QTOOL_ASSERT_MSG(attention_mma_supported(a) && (warps == 0 || warps == 4 || warps == 8),
                   "tensor-core attention: head_dim ", a.head_dim, ", dtype ", a.q.dt, ", warps ", warps);
  const bool f16 = a.q.dt == kF16;
  if (a.head_dim == 64 && f16)
    launch_dim<64, true>(a, stream, warps);
  else if (a.head_dim == 64)
    launch_dim<64, false>(a, stream, warps);
  else if (f16)
    launch_dim<128, true>(a, stream, warps);
  else
    launch_dim<128, false>(a, stream, warps);
}

}  // namespace qtool::runner::cuda::fwd
