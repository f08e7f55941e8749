// Device-side reads of a View (forward_kernels.hpp) that the CUDA backend's kernels share
// (forward_kernels.cu, attention_mma.cu); for nvcc only.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "forward_kernels.hpp"
#include "qtool/runner/dequant.hpp"
#include "qtool/runner/kernel_math.hpp"

namespace qtool::runner::cuda::fwd {

// Element [r, c] of `m` (any activation dtype) as float32, exactly.
__device__ __forceinline__ float ld_el(const View& m, int64_t r, int64_t c) {
  const int64_t i = r * m.ld + c;
  if (m.dt == kBf16) return kmath::bf16_bits_to_f32(static_cast<const uint16_t*>(m.data)[i]);
  if (m.dt == kF16) return dq::f16_to_f32(static_cast<const uint16_t*>(m.data)[i]);
  return static_cast<const float*>(m.data)[i];
}

}  // namespace qtool::runner::cuda::fwd
