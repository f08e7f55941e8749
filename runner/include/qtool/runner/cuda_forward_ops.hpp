// The CUDA backend of the op vocabulary (ops.hpp): every op launched on one stream, no host
// synchronisation except in upload/download. Only available when the CUDA backend is built
// (QTOOL_HAVE_CUDA). The element-wise and norm ops give the CPU backend's bits (up to the
// transcendentals' last ulp, see forward_kernels.cu); linear (dequant + cuBLAS, fp32 accumulation,
// bias added in fp32 before the one rounding) and attention (a fused kernel of our own) match it
// within a tolerance.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <memory>

#include "qtool/runner/ops.hpp"

namespace qtool::runner {

// Activation memory: one cudaMalloc of `capacity_bytes` on `device`, used as a stack (256-byte
// aligned buffers, mark/release, peak); an allocation beyond it is Error(InvalidInput). linear's
// dequantization buffer and fp32 accumulator are taken from the same stack for the duration of
// the call (so the peak includes them). cuBLAS is loaded lazily at the first linear.
std::unique_ptr<Ops> make_cuda_ops(int device, cudaStream_t stream, uint64_t capacity_bytes);

}  // namespace qtool::runner
