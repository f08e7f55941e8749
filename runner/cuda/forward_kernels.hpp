// Internal interface between the CUDA backend of ops.hpp (forward_ops.cpp, C++20) and its kernels
// (forward_kernels.cu, compiled by nvcc as C++17): plain views and launchers, each launching on
// the stream it is given and never synchronising.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "qtool/runner/dequant.hpp"

namespace qtool::runner::cuda::fwd {

// Activation dtype codes of a View.
enum : int { kBf16 = 0, kF16 = 1, kF32 = 2 };

struct View {
  void* data = nullptr;
  int dt = kBf16;
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t ld = 0;
};

// Element-wise ops (op codes below); act: the ops.hpp Activation value.
enum class Ew : int { Activation, Gated, Add, Residual, ResidualGated, Copy, Clamp };
// bf16 views with 16-byte aligned rows and a width that is a multiple of 8 take a kernel that
// moves 8 elements a thread (16-byte loads and stores), with the same operations per element.
void launch_elementwise(Ew op, int act, const View& a, const View& b, const View& g, int64_t seq, float bound,
                        const View& out, cudaStream_t stream);
// Off: every element-wise op takes the generic kernel and every norm its element-at-a-time loads
// and stores (the GPU tests compare the two; on is the default).
void set_elementwise_bf16x8(bool on);
// How many element-wise and norm launches took the 8-wide path, process-wide.
uint64_t elementwise_bf16x8_launches();
void launch_embedding(const void* ids, bool ids_i64, int64_t ids_ld, const DequantParams& table,
                      const View& out, cudaStream_t stream);
void launch_rope(bool adjacent, const View& x, int64_t head_dim, const View& cos, const View& sin,
                 const View& out, cudaStream_t stream);
// Norms: one block per row, the row staged in shared memory (cols floats); the sums run
// sequentially in double as the CPU backend's do. mode 0: rms Once, 1: rms Twice, 2: layer norm,
// 3: modulate. The largest row that fits: max_norm_cols().
void launch_norm(int mode, const View& x, const DequantParams* w, const DequantParams* b, int64_t group,
                 float eps, const View& shift, const View& scale, int64_t seq, const View& out,
                 cudaStream_t stream);
int64_t max_norm_cols(int device);
// Weight [rows, cols] of any kind to dtype dt (F16 or F32: element_f32 rounded once) in `out`.
void launch_dequant_generic(const DequantParams& p, const float* code_table, const float* nested_map, int dt,
                            void* out, cudaStream_t stream);
// out = ⟦acc + bias⟧ with acc [rows, cols] dense F32; bias plain or null.
void launch_bias_round(const float* acc, const DequantParams* bias, const View& out, cudaStream_t stream);

struct AttnArgs {
  View q, k, v, out;
  int64_t batch = 1, q_len = 0, kv_len = 0, heads = 0, kv_heads = 0, head_dim = 0;
  float scale = 1.0f;
  bool causal = false;
  View bias;                   // data null: none
  const void* mask = nullptr;  // null: none
  bool mask_i64 = true;
  int64_t mask_ld = 0;
  float mask_value = 0.0f;  // finfo(dtype).min
};
// The tensor-core kernel (attention_mma.hpp) where it covers `a`, else the CUDA-core one.
void launch_attention(const AttnArgs& a, cudaStream_t stream);
// The CUDA-core kernel (float32 FMA): any head_dim <= 256, dtype and stride.
void launch_attention_simt(const AttnArgs& a, cudaStream_t stream);

}  // namespace qtool::runner::cuda::fwd
