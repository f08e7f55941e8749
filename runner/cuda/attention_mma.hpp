// The tensor-core attention of the CUDA backend (attention_mma.cu): flash-attention 2's forward on
// mma.sync (m16n8k16, bf16 or f16 operands, float32 accumulation), for the layouts of AttnArgs.
// launch_attention (forward_kernels.cu) takes it whenever attention_mma_supported says so and the
// CUDA-core kernel (launch_attention_simt) otherwise.
//
// What it computes, per sample, head and query row t (kv head = head / (heads / kv_heads)):
//   s_u = (q·k_u)·scale [+ bias] [+ mask_value if key u is dropped], u visible (u < kv_len, and
//   u <= t when causal), with q·k_u summed by the tensor cores in float32;
//   the online softmax in float32 over tiles of 64 keys (running maximum m and sum l, exp taken as
//   2^((s − m)·log2 e)); the weights p rounded to the dtype (bf16 or f16) before the product with
//   V (as flash attention does), l summed from the unrounded p;
//   out = ⟦(Σ p·v) / l⟧, rounded once to the dtype.
// A NaN score makes its row NaN, a row with no finite score is 0/0 = NaN, a fully masked row
// (finfo.min added to every score) gets uniform weights: as the CPU backend. One difference: under
// causal masking a non-finite V at key u reaches the rows < u of its block (0·Inf), where the CPU
// backend's sums stop at u = t; the CUDA-core kernel has the same property.
#pragma once

#include <cuda_runtime.h>

#include "forward_kernels.hpp"

namespace qtool::runner::cuda::fwd {

// Covered: head_dim 64 or 128; q, k, v and out all bf16 or all f16; every view's data 16-byte
// aligned and its row stride a multiple of 8 elements (16-byte rows); q_len, kv_len >= 1;
// heads % kv_heads == 0; heads and batch <= 65535. Causal or not, bias and key mask optional.
bool attention_mma_supported(const AttnArgs& a);
// A view whose data is 16-byte aligned and whose rows are whole 16-byte chunks (ld a multiple of 8
// elements, ld >= cols): what the tensor-core kernel and cuDNN's fused attention load rows from.
bool aligned_rows(const View& v);

// Tile of 16·warps query rows per block (warps 4 or 8; 0: the default, 8) against tiles of 64
// keys. Requires attention_mma_supported(a) (QTOOL_ASSERT).
void launch_attention_mma(const AttnArgs& a, cudaStream_t stream, int warps = 0);

}  // namespace qtool::runner::cuda::fwd
