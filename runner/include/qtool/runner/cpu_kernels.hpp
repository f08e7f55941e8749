// The CPU backend's kernels: the same operations as the CUDA ones (runner/cuda/), with the same
// inputs and rounding, so a CPU run has the GPU run's semantics. Kernels take row ranges; the
// caller's ThreadPool splits them (STYLE.md).
#pragma once

#include <cstdint>

#include "qtool/formats/thread_pool.hpp"

namespace qtool::runner::cpu {

// Columns [col_begin, col_end) of rows [row_begin, row_end) of the hidden state H (bf16 bits) of
// `stream_seed`, stored [tokens, ld]: kmath::activation_bf16 of each element.
void generate_activation_rows(uint64_t stream_seed, uint64_t ld, uint64_t col_begin, uint64_t col_end,
                              uint16_t* out, uint64_t row_begin, uint64_t row_end);
void generate_activation(uint64_t stream_seed, uint64_t tokens, uint64_t ld, uint64_t col_begin,
                         uint64_t col_end, uint16_t* out, ThreadPool& pool);

// Output rows [o_begin, o_end) of y[tokens, out] (bf16 bits) = x[tokens, in] * w[out, in]^T, where
// `xf` is x widened to float32 ([tokens, in], dense) and w is bf16 bits. Products are exact in
// float32; sums run in float32 over 8 interleaved partial sums combined in a fixed order and are
// rounded to bf16 once, so the result is deterministic (it differs from cuBLAS's only in the
// order of the additions).
void gemm_rows(const float* xf, const uint16_t* w, uint16_t* y, uint64_t tokens, uint64_t in, uint64_t out,
               uint64_t o_begin, uint64_t o_end);
// x is [tokens, in] with row stride ldx (>= in); y is [tokens, out], dense.
void gemm_bf16(const uint16_t* x, uint64_t ldx, const uint16_t* w, uint16_t* y, uint64_t tokens, uint64_t in,
               uint64_t out, ThreadPool& pool);

struct Digest {
  uint64_t hash = 0;       // wrapping sum of kmath::digest_term over the elements
  uint64_t nonfinite = 0;  // elements that are NaN or +-inf
};
// The digest of y[0, n) (bf16 bits): equal to the CUDA accumulate_digest of the same values.
Digest digest(const uint16_t* y, uint64_t n);

}  // namespace qtool::runner::cpu
