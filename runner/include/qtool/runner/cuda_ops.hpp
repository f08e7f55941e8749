// The GPU operations of the runner. Each is an entry that launches on the stream it is given and
// never synchronises; pointers are device pointers on the stream's device. Only available when
// the CUDA backend is built (QTOOL_HAVE_CUDA).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "qtool/runner/cuda_resources.hpp"
#include "qtool/runner/dequant.hpp"

namespace qtool::runner::cuda {

// The built-in 4-bit tables in device memory (used when a checkpoint lacks quant_map tensors).
struct DeviceTables {
  const float* nf4 = nullptr;          // [16]
  const float* fp4 = nullptr;          // [16]
  const float* dynamic_map = nullptr;  // [256]
};
// Bytes of device memory DeviceTables needs, and filling them (a synchronous upload at start-up).
inline constexpr size_t kDeviceTablesBytes = (16 + 16 + 256) * sizeof(float);
DeviceTables upload_tables(void* device_memory, cudaStream_t stream);

// The code table and the nested (double quant) map a weight dequantizes with: the checkpoint's
// own quant_map tensors where it has them, else the built-in tables (code: 4-bit kinds only).
struct CodeTables {
  const float* code = nullptr;
  const float* nested = nullptr;
};
CodeTables code_tables(const DequantParams& params, const DeviceTables& tables);

// Blocks of `threads` for a grid-stride loop over `work_items` items: enough to cover them, at
// most 8 per multiprocessor of the first device asked about.
int grid_for(uint64_t work_items, int threads);

// Dequantizes a whole weight ([rows, cols], `params` pointing into device memory) to bf16 bits in
// `out` ([rows, cols], 16-byte aligned). Bit-identical with dequantize_to_bf16_cpu. Kinds Bf16
// are copied unchanged.
void dequantize_to_bf16(const DequantParams& params, const DeviceTables& tables, uint16_t* out,
                        cudaStream_t stream);

// Columns [col_begin, col_end) of the hidden state H [tokens, ld] (bf16 bits) of a step:
// kmath::activation_bf16 of every element.
void generate_activation(uint64_t stream_seed, uint64_t tokens, uint64_t ld, uint64_t col_begin,
                         uint64_t col_end, uint16_t* out, cudaStream_t stream);

// Adds the digest of y[0, n) (bf16 bits) to digest[0] (wrapping sum of kmath::digest_term) and the
// count of non-finite elements to digest[1]. The caller zeroes `digest` first.
void accumulate_digest(const uint16_t* y, uint64_t n, unsigned long long* digest, cudaStream_t stream);
// The same for a [rows, cols] view with row stride ld (elements) of bf16, f16 or float32
// (`elem_bits` 16 with `f16` false or true, or 32): the digest of its dense bytes, as driver.hpp's
// host_digest gives it, and its non-finite elements of that dtype.
void accumulate_digest_view(const void* data, int elem_bits, bool f16, int64_t rows, int64_t cols, int64_t ld,
                            unsigned long long* digest, cudaStream_t stream);

// y[tokens, out] (bf16, dense) = x[tokens, in] (bf16, row stride ldx) * w[out, in]^T (bf16), fp32
// accumulation rounded once to bf16, on the handle's stream (the caller set it). Deterministic
// for a given device, shape and workspace.
void gemm_bf16(const CublasHandle& handle, const uint16_t* x, uint64_t ldx, const uint16_t* w, uint16_t* y,
               uint64_t tokens, uint64_t in, uint64_t out);

}  // namespace qtool::runner::cuda
