// The CUDA backend of the op vocabulary (ops.hpp): every op launched on one stream, no host
// synchronisation except in upload/download. Only available when the CUDA backend is built
// (QTOOL_HAVE_CUDA). The element-wise and norm ops give the CPU backend's bits (up to the
// transcendentals' last ulp, see forward_kernels.cu); linear (dequant + cuBLASLt, fp32
// accumulation, the bias and linear_act's GELU-tanh applied in fp32 before the one rounding) and
// attention (cuDNN's fused flash attention where it takes the case, else a fused kernel of our
// own: runner/cuda/attention_cudnn.hpp) match it within a tolerance.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <memory>

#include "qtool/runner/ops.hpp"

namespace qtool::runner {

// Memory of the ops on one device, each a cudaMalloc made when the ops are made.
struct CudaOpsConfig {
  // The activation stack (activation_stack.hpp): 256-byte aligned buffers, mark/release, peak; an
  // allocation beyond it is Error(InvalidInput).
  uint64_t activation_bytes = 0;
  // linear's dequantized weight (the plan's dequant_scratch item). A weight larger than this is
  // dequantized onto the activation stack for the duration of the call (so the peak includes it).
  uint64_t dequant_scratch_bytes = 0;
  // cuBLAS's workspace (the plan's cublas_workspace item); cuBLAS is loaded at the first linear.
  uint64_t cublas_workspace_bytes = uint64_t{32} << 20;
  // linear through cuBLASLt, which adds a bias of the output's dtype in the GEMM's epilogue and
  // applies linear_act's GeluTanh there too (one write of the output). false, or QTOOL_GEMM=cublas
  // in the environment: cuBLAS's GEMM, as below, and the activation as a kernel of its own.
  bool cublaslt = true;
};
// linear writes its output with cuBLASLt (above) or cuBLAS (fp32 accumulation, one rounding): with
// cuBLAS, the bias broadcast into the output first and added by the GEMM (beta = 1) when it has
// the output's dtype. A bias of another dtype goes through an fp32 accumulator [tokens, out] on
// the activation stack and a kernel of ours.
std::unique_ptr<Ops> make_cuda_ops(int device, cudaStream_t stream, const CudaOpsConfig& config);
// The same with `capacity_bytes` of activation memory, no dequant scratch, a 32 MiB workspace.
std::unique_ptr<Ops> make_cuda_ops(int device, cudaStream_t stream, uint64_t capacity_bytes);

}  // namespace qtool::runner
