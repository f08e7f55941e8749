// The CPU backend of the op vocabulary (ops.hpp): the reference the CUDA ops are tested against
// and what CI runs. Every op reproduces MODELS.md's roundings: element-wise ops, norms, RoPE and
// modulation bit for bit (the frameworks' float32 operations in their order, each rounded where
// they round); linear and attention accumulate in float32 in a fixed, documented order.
//
// Memory: one host block of `capacity_bytes` used as a stack (alloc / mark / release); each
// allocation starts at a 256-byte boundary, so it holds round_up(bytes, 256). An allocation that
// would pass the capacity throws Error(InvalidInput) naming the bytes asked and held: the plan
// reserves this memory, so an overflow means its activation reserve was wrong.
//
// Scratch outside that block (the backend's own buffers, reused between calls):
//   linear    x widened to float32, [rows, round_up(in, 8)], plus per thread a block of
//             dequantized weight rows, linear_weight_rows(in) x round_up(in, 8) floats;
//   attention per thread the K (transposed) and V of one (sample, kv head) in float32,
//             about 2 x kv_len x round_up(head_dim, 8) floats, and four rows of scores.
// cpu_scratch_bytes gives the total for the largest shapes a forward uses.
//
// Transcendentals are the float functions of the C library, as the frameworks' kernels call
// them: expf (softmax, SiLU as x / (1 + expf(-x)), sigmoid as 1 / (1 + expf(-x))), tanhf (GELU),
// 1 / sqrtf for rsqrt. Means and variances of the norms are summed in double and rounded to float
// once (the value a careful float32 reduction approximates; any fixed float order would differ
// from torch's in rare last bits).
#pragma once

#include <cstdint>
#include <memory>

#include "qtool/formats/thread_pool.hpp"
#include "qtool/runner/ops.hpp"

namespace qtool::runner {

// `pool` runs every op's row ranges (it must outlive the ops). One caller at a time: the ops
// share their scratch.
std::unique_ptr<Ops> make_cpu_ops(ThreadPool& pool, uint64_t capacity_bytes);

// The CPU backend's scratch for a linear [out, in] on `rows` tokens and an attention over
// `kv_len` keys of width `head_dim`, with `threads` threads (bytes, as documented above).
uint64_t cpu_scratch_bytes(uint64_t rows, uint64_t in, uint64_t kv_len, uint64_t head_dim, uint64_t threads);

// Dequantized weight rows a linear thread holds at once for `in` inputs.
uint64_t linear_weight_rows(uint64_t in);

}  // namespace qtool::runner
