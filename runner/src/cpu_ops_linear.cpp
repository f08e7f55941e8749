// linear on the CPU: out = ⟦x·Wᵀ + b⟧. x is widened to float32 once per call; each thread
// dequantizes blocks of weight rows (to the activation dtype, exactly as the runner's dequant
// kernels do: for bf16 activations the values of dequantize_to_bf16_cpu) into float32 and
// multiplies them with every token. The sum of an output element runs over 8 partial sums, lane l taking the
// products of inputs k ≡ l (mod 8) in order, combined as ((s0+s1)+(s2+s3))+((s4+s5)+(s6+s7)) — the order of
// cpu::gemm_rows — then the bias is added in float32 and the result rounded once. Products and sums are
// separate float32 operations (no FMA), so the result does not depend on the ISA the kernel was compiled for
// (an AVX2 clone and the baseline one give the same bits).
#include <algorithm>
#include <cstring>

#include "cpu_ops_impl.hpp"
#include "qtool/runner/cpu_ops.hpp"

namespace qtool::runner::cpu_ops {

namespace {

// 8 float32 lanes (two SSE registers in the baseline build, one AVX register in the AVX2 clone).
// Everything using it is inlined into this file's functions, so the vector ABI warning is moot.
#pragma GCC diagnostic ignored "-Wpsabi"
using v8f = float __attribute__((vector_size(32)));

[[gnu::always_inline]] inline v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

[[gnu::always_inline]] inline float sum8(const v8f& a) {
  return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

// sums[t * TO + o] = Σ_k x[t, k] · w[o, k] over kp (a multiple of 8) inputs.
template <int TT, int TO>
[[gnu::always_inline]] inline void dot_tile(const float* x, int64_t kp, const float* w, float* sums) {
  // The tile loops are unrolled so that the accumulators live in registers.
  v8f acc[TT][TO] = {};
  for (int64_t k = 0; k < kp; k += 8) {
    v8f wv[TO];
#pragma GCC unroll 8
    for (int o = 0; o < TO; ++o) wv[o] = load8(w + o * kp + k);
#pragma GCC unroll 8
    for (int t = 0; t < TT; ++t) {
      const v8f xv = load8(x + t * kp + k);
#pragma GCC unroll 8
      for (int o = 0; o < TO; ++o) acc[t][o] += xv * wv[o];
    }
  }
#pragma GCC unroll 8
  for (int t = 0; t < TT; ++t)
#pragma GCC unroll 8
    for (int o = 0; o < TO; ++o) sums[t * TO + o] = sum8(acc[t][o]);
}

template <int TT, int TO>
[[gnu::always_inline]] inline void tile_store(const float* xf, int64_t kp, const float* wf, int64_t t0,
                                              int64_t o0, int64_t col0, const float* bias, const Mat& out) {
  float sums[TT * TO];
  dot_tile<TT, TO>(xf + t0 * kp, kp, wf + o0 * kp, sums);
  for (int t = 0; t < TT; ++t) {
    uint8_t* row = row_ptr(out, t0 + t);
    for (int o = 0; o < TO; ++o) {
      const int64_t col = col0 + o0 + o;
      const float s = sums[t * TO + o];
      store(out.dtype, row, col, bias ? s + bias[col] : s);
    }
  }
}

// out[:, col0 + o] for the n_rows weight rows in wf ([n_rows, kp]) and every token of xf.
__attribute__((target_clones("avx2", "default"))) void gemm_block(const float* xf, int64_t tokens, int64_t kp,
                                                                  const float* wf, int64_t n_rows,
                                                                  int64_t col0, const float* bias,
                                                                  const Mat& out) {
  int64_t t = 0;
  for (; t + 4 <= tokens; t += 4) {
    int64_t o = 0;
    for (; o + 2 <= n_rows; o += 2) tile_store<4, 2>(xf, kp, wf, t, o, col0, bias, out);
    if (o < n_rows) tile_store<4, 1>(xf, kp, wf, t, o, col0, bias, out);
  }
  for (; t < tokens; ++t) {
    int64_t o = 0;
    for (; o + 2 <= n_rows; o += 2) tile_store<1, 2>(xf, kp, wf, t, o, col0, bias, out);
    if (o < n_rows) tile_store<1, 1>(xf, kp, wf, t, o, col0, bias, out);
  }
}

// One row's elements [c0, c1) of a 4-bit weight: the 16 possible values of each absmax block
// (code · absmax, rounded to the activation dtype) looked up by code.
void dequant_4bit_row(const DequantParams& w, DType act, uint64_t row, const float* code_table,
                      const float* nested_map, float* dst) {
  const uint64_t base = row * w.cols;
  uint64_t c = 0;
  while (c < w.cols) {
    const uint64_t block = (base + c) / w.blocksize;
    const uint64_t end = std::min<uint64_t>(w.cols, (block + 1) * w.blocksize - base);
    const float absmax = dq::block_absmax(w, block, nested_map);
    float values[16];
    for (int q = 0; q < 16; ++q) values[q] = round_to(act, kmath::x86_mul(code_table[q], absmax));
    for (; c < end; ++c) dst[c] = values[dq::code_of(w.weight, base + c)];
  }
}

// Weight rows [row0, row0 + n) as float32 values of the activation dtype, [n, kp], each row
// padded with -0 (x is padded with +0: the padding adds -0, which changes no sum). Element for
// element the value dq::element_f32 gives (the same float32 operations: what
// dequantize_to_bf16_cpu rounds to bf16), rounded to the activation dtype, with the scales of a
// row or a block computed once.
void dequant_rows(const DequantParams& w, DType act, uint64_t row0, uint64_t n, int64_t kp, float* dst) {
  const uint64_t cols = w.cols;
  float code_table[16];
  float nested_map[256];
  if (is_4bit(w.kind)) {
    QTOOL_ASSERT(w.blocksize > 0);
    resolve_tables(w, code_table, nested_map);
  }
  std::vector<float> host_row;
  for (uint64_t r = 0; r < n; ++r) {
    const uint64_t row = row0 + r;
    float* out = dst + r * kp;
    switch (w.kind) {
      case WeightKind::Host:  // through libquant's dequantizer of the scheme
        host_row.resize(cols);
        dequantize_host_rows_f32(w, host_row.data(), row, row + 1);
        for (uint64_t c = 0; c < cols; ++c) out[c] = round_to(act, host_row[c]);
        break;
      case WeightKind::Nf4:
      case WeightKind::Fp4: dequant_4bit_row(w, act, row, code_table, nested_map, out); break;
      case WeightKind::Int8:
      case WeightKind::Fp8E4M3:
      case WeightKind::Fp8E5M2: {
        const float scale = dq::row_scale(w, row);
        for (uint64_t c = 0; c < cols; ++c)
          out[c] = round_to(act, dq::rowwise_value(w.kind, w.weight[row * cols + c], scale));
        break;
      }
      case WeightKind::Bf16:
        if (act != DType::F16) {  // a bf16 value is one of bf16 and f32 (no rounding)
          for (uint64_t c = 0; c < cols; ++c)
            out[c] = kmath::bf16_bits_to_f32(dq::load_u16(w.weight, row * cols + c));
          break;
        }
        [[fallthrough]];
      case WeightKind::F16:
      case WeightKind::F32:
        for (uint64_t c = 0; c < cols; ++c) out[c] = round_to(act, dq::plain_value(w, row * cols + c));
        break;
    }
    std::fill(out + cols, out + kp, -0.0f);
  }
}

}  // namespace

void linear(ThreadPool& pool, Scratch& scratch, const Mat& x, const DequantParams& weight,
            const DequantParams* bias, const Mat& out) {
  QTOOL_ASSERT_MSG(weight.cols == static_cast<uint64_t>(x.cols) &&
                       weight.rows == static_cast<uint64_t>(out.cols) && x.rows == out.rows,
                   "linear: weight [", weight.rows, ", ", weight.cols, "] for x [", x.rows, ", ", x.cols,
                   "] out [", out.rows, ", ", out.cols, "]");
  QTOOL_ASSERT_MSG(!bias || bias->numel() == weight.rows, "linear: bias of ", bias ? bias->numel() : 0,
                   " for ", weight.rows, " outputs");
  const int64_t tokens = x.rows;
  const int64_t kp = round_up8(x.cols);
  if (tokens == 0 || out.cols == 0) return;
  scratch.xf.resize(static_cast<size_t>(tokens * kp));
  float* xf = scratch.xf.data();
  pool.parallel_for(static_cast<size_t>(tokens), rows_per_chunk(kp), [&](size_t r0, size_t r1) {
    for (size_t r = r0; r < r1; ++r) {
      load_row(x, static_cast<int64_t>(r), xf + r * kp);
      std::fill(xf + r * kp + x.cols, xf + (r + 1) * kp, 0.0f);
    }
  });
  std::vector<float> bias_f;
  if (bias) {
    bias_f.resize(weight.rows);
    for (uint64_t o = 0; o < weight.rows; ++o) bias_f[o] = dq::plain_value(*bias, o);
  }
  // Blocks of at most linear_weight_rows, and small enough that every thread gets one (an output
  // element's sum does not depend on the blocks, so neither does the result).
  const uint64_t per_thread = (weight.rows + pool.size() - 1) / pool.size();
  const uint64_t block =
      std::min<uint64_t>(linear_weight_rows(weight.cols), std::max<uint64_t>(2, per_thread));
  const size_t n_blocks = static_cast<size_t>((weight.rows + block - 1) / block);
  for_slots(pool, n_blocks, 1, [&](size_t slot, size_t b0, size_t b1) {
    std::vector<float>& wf = scratch.weight_rows[slot];
    wf.resize(static_cast<size_t>(block * kp));
    for (size_t b = b0; b < b1; ++b) {
      const uint64_t row0 = b * block;
      const uint64_t n = std::min<uint64_t>(block, weight.rows - row0);
      dequant_rows(weight, out.dtype, row0, n, kp, wf.data());
      gemm_block(xf, tokens, kp, wf.data(), static_cast<int64_t>(n), static_cast<int64_t>(row0),
                 bias ? bias_f.data() : nullptr, out);
    }
  });
}

}  // namespace qtool::runner::cpu_ops
