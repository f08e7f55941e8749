// Activations, output digests and the cuBLAS GEMM: kernel -> launcher(stream) -> entry.
#include <algorithm>

#include "qtool/formats/error.hpp"
#include "qtool/runner/cuda_ops.hpp"
#include "qtool/runner/kernel_math.hpp"

namespace qtool::runner::cuda {

int grid_for(uint64_t work_items, int threads) {
  static int max_blocks = [] {
    int device = 0;
    cudaGetDevice(&device);
    int sms = 0;
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    return std::max(1, sms) * 8;
  }();
  const uint64_t per = static_cast<uint64_t>(threads);
  const uint64_t need = (work_items + per - 1) / per;
  return static_cast<int>(std::max<uint64_t>(1, std::min<uint64_t>(need, static_cast<uint64_t>(max_blocks))));
}

namespace {

constexpr int kThreads = 256;

int grid_for(uint64_t work_items) { return cuda::grid_for(work_items, kThreads); }

__global__ void activation_kernel(uint64_t stream_seed, uint64_t tokens, uint64_t ld, uint64_t col_begin,
                                  uint64_t width, uint16_t* out) {
  const uint64_t n = tokens * width;
  const uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x;
  for (uint64_t i = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const uint64_t t = i / width;
    const uint64_t c = col_begin + (i - t * width);
    out[t * ld + c] = kmath::activation_bf16(stream_seed, t, c);
  }
}

// A thread's digest sums into digest[0] and [1], a warp at a time. Integer sums commute: the
// result does not depend on the order of the atomics.
__device__ void add_to_digest(uint64_t sum, unsigned long long bad, unsigned long long* digest) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    sum += __shfl_down_sync(0xFFFFFFFFu, sum, offset);
    bad += __shfl_down_sync(0xFFFFFFFFu, bad, offset);
  }
  if ((threadIdx.x & 31) == 0) {
    atomicAdd(digest, static_cast<unsigned long long>(sum));
    if (bad) atomicAdd(digest + 1, bad);
  }
}

// Sums the digest terms of y's words: eight elements (one 16-byte load) per thread and iteration,
// then the odd words and the last odd element.
__global__ void digest_kernel(const uint16_t* y, uint64_t n, unsigned long long* digest) {
  uint64_t sum = 0;
  unsigned long long bad = 0;
  const uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x;
  const uint64_t tid = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const uint64_t n_vec = n / 8;
  const uint4* v = reinterpret_cast<const uint4*>(y);
  for (uint64_t i = tid; i < n_vec; i += stride) {
    const uint4 q = v[i];
    const uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      sum += kmath::digest_term(4 * i + j, w[j]);
      bad += kmath::nonfinite_in_word(w[j]);
    }
  }
  const uint64_t n_words = (n + 1) / 2;
  for (uint64_t k = 4 * n_vec + tid; k < n_words; k += stride) {
    const uint32_t word =
        static_cast<uint32_t>(y[2 * k]) | (2 * k + 1 < n ? static_cast<uint32_t>(y[2 * k + 1]) << 16 : 0u);
    sum += kmath::digest_term(k, word);
    bad += kmath::nonfinite_in_word(word);
  }
  add_to_digest(sum, bad, digest);
}

// Word k of a view's dense bytes (elements 2k, 2k + 1 of a 16-bit view, element k of a float32
// one): its digest term and non-finite elements, one word per thread and iteration.
__global__ void digest_view_kernel(const void* data, int elem_bits, bool f16, int64_t rows, int64_t cols,
                                   int64_t ld, unsigned long long* digest) {
  const int64_t n = rows * cols;
  const int per_word = elem_bits == 32 ? 1 : 2;
  const uint32_t exp_mask = elem_bits == 32 ? 0x7F800000u : (f16 ? 0x7C00u : 0x7F80u);
  uint64_t sum = 0;
  unsigned long long bad = 0;
  for (int64_t k = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; k * per_word < n;
       k += int64_t{gridDim.x} * blockDim.x) {
    uint32_t word = 0;
    for (int j = 0; j < per_word && k * per_word + j < n; ++j) {
      const int64_t e = k * per_word + j, r = e / cols, i = e - r * cols + r * ld;
      const uint32_t v =
          elem_bits == 32 ? static_cast<const uint32_t*>(data)[i] : static_cast<const uint16_t*>(data)[i];
      word |= v << (16 * j);
      bad += (v & exp_mask) == exp_mask;
    }
    sum += kmath::digest_term(static_cast<uint64_t>(k), word);
  }
  add_to_digest(sum, bad, digest);
}

}  // namespace

void generate_activation(uint64_t stream_seed, uint64_t tokens, uint64_t ld, uint64_t col_begin,
                         uint64_t col_end, uint16_t* out, cudaStream_t stream) {
  if (col_end <= col_begin || tokens == 0) return;
  const uint64_t width = col_end - col_begin;
  activation_kernel<<<grid_for(tokens * width), kThreads, 0, stream>>>(stream_seed, tokens, ld, col_begin,
                                                                       width, out);
  QTOOL_CUDA_CHECK_LAUNCH();
}

void accumulate_digest(const uint16_t* y, uint64_t n, unsigned long long* digest, cudaStream_t stream) {
  if (n == 0) return;
  QTOOL_ASSERT((reinterpret_cast<uintptr_t>(y) & 15u) == 0);  // 16-byte loads
  digest_kernel<<<grid_for(n / 8 + 1), kThreads, 0, stream>>>(y, n, digest);
  QTOOL_CUDA_CHECK_LAUNCH();
}

void accumulate_digest_view(const void* data, int elem_bits, bool f16, int64_t rows, int64_t cols, int64_t ld,
                            unsigned long long* digest, cudaStream_t stream) {
  const int64_t n = rows * cols;
  if (n == 0) return;
  QTOOL_ASSERT(elem_bits == 16 || elem_bits == 32);
  digest_view_kernel<<<grid_for(static_cast<uint64_t>(elem_bits == 32 ? n : (n + 1) / 2)), kThreads, 0,
                       stream>>>(data, elem_bits, f16, rows, cols, ld, digest);
  QTOOL_CUDA_CHECK_LAUNCH();
}

void gemm_bf16(const CublasHandle& handle, const uint16_t* x, uint64_t ldx, const uint16_t* w, uint16_t* y,
               uint64_t tokens, uint64_t in, uint64_t out) {
  if (tokens == 0 || out == 0) return;
  if (in == 0) {  // an empty sum: cuBLAS rejects lda 0
    cudaStream_t stream = nullptr;
    QTOOL_CUBLAS_CHECK(cublas().get_stream(handle.get(), &stream));
    QTOOL_CUDA_CHECK(cudaMemsetAsync(y, 0, tokens * out * sizeof(uint16_t), stream));
    return;
  }
  // Column-major view: Y^T [out, tokens] = W [out, in] (stored as col-major [in, out], op T)
  //                                       * X^T [in, tokens] (stored as col-major [ldx, tokens]).
  const float alpha = 1.0f;
  const float beta = 0.0f;
  QTOOL_CUBLAS_CHECK(cublas().gemm_ex(handle.get(), CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(out),
                                      static_cast<int>(tokens), static_cast<int>(in), &alpha, w, CUDA_R_16BF,
                                      static_cast<int>(in), x, CUDA_R_16BF, static_cast<int>(ldx), &beta, y,
                                      CUDA_R_16BF, static_cast<int>(out), CUBLAS_COMPUTE_32F,
                                      CUBLAS_GEMM_DEFAULT));
}

}  // namespace qtool::runner::cuda
