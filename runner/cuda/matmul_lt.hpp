// cuBLASLt's matmul for the CUDA backend's linears (forward_ops.cpp): D = act(op(A)·B + bias) with
// the bias and the activation applied by the GEMM's epilogue in float32, before D's one rounding,
// so that a linear with a bias writes its output once instead of a broadcast of the bias, a GEMM
// that reads it back (beta = 1) and, for Flux's MLP, a GELU pass over the [T, 4D] hidden state.
//
// cuBLASLt is loaded on first use with dlopen (libcublasLt.so.<major> of the toolkit qtool was
// built with), as cuBLAS is (cuda_resources.hpp). Each shape's algorithm comes from cuBLASLt's
// heuristic once and is kept (a Flux step runs a few dozen shapes thousands of times).
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <memory>
#include <tuple>

namespace qtool::runner::cuda {

// The epilogue's point-wise transform after the bias.
enum class LtActivation : uint8_t { None, GeluTanh };

// One GEMM, column-major as cuBLAS sees the runner's row-major views: D [m, n] (ld ldd) =
// Aᵀ·B with A stored [k, m] (ld lda: the weight [out, in] row-major) and B [k, n] (ld ldb: the
// activations [tokens, in] row-major). A and B have type ab, D has type d; the bias (null: none)
// is [m] of type d. Float32 accumulation (CUBLAS_COMPUTE_32F: no TF32 for float32 inputs).
struct LtGemm {
  int64_t m = 0, n = 0, k = 0;
  cudaDataType ab = CUDA_R_16BF, d = CUDA_R_16BF;
  const void* a = nullptr;
  int64_t lda = 0;
  const void* b = nullptr;
  int64_t ldb = 0;
  void* out = nullptr;
  int64_t ldd = 0;
  const void* bias = nullptr;
  LtActivation act = LtActivation::None;
};

class LtMatmul {
 public:
  // `workspace` (device memory of `device`, may be null with 0 bytes) is the GEMMs' scratch; the
  // caller keeps it alive and does not use it concurrently on another stream.
  LtMatmul(int device, cudaStream_t stream, void* workspace, size_t workspace_bytes);
  ~LtMatmul();
  LtMatmul(const LtMatmul&) = delete;
  LtMatmul& operator=(const LtMatmul&) = delete;

  // Launches g on the stream; false (nothing launched) when cuBLASLt has no algorithm for it
  // (the caller takes another path). Throws Error on a cuBLASLt failure.
  bool run(const LtGemm& g);

  // How many GEMMs ran through cuBLASLt, and how many of them applied an epilogue activation.
  uint64_t runs() const { return runs_; }
  uint64_t fused_activations() const { return fused_; }

 private:
  struct Plan;
  // Shape, types, epilogue and the pointers' alignments (cuBLASLt picks kernels by them).
  using Key =
      std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int, int, int, int, int, int, int>;
  Plan* plan(const LtGemm& g);

  int device_;
  cudaStream_t stream_;
  void* workspace_;
  size_t workspace_bytes_;
  cublasLtHandle_t handle_ = nullptr;
  std::map<Key, std::unique_ptr<Plan>> plans_;
  uint64_t runs_ = 0, fused_ = 0;
};

// Process-wide: GEMMs that applied an epilogue activation (the GPU tests check the fused path ran).
uint64_t lt_fused_activations();

}  // namespace qtool::runner::cuda
