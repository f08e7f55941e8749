// Attention through cuDNN's fused flash-attention forward (cuDNN >= 9, its graph "backend" API,
// no cudnn_frontend), with qtool's own kernels (launch_attention) as the fallback.
//
// cuDNN is loaded on first use with dlopen (libcudnn.so.9, as cuBLAS is loaded): no link-time
// dependency, and a build whose toolkit has no cuDNN headers compiles this path out (it then reports
// cuDNN as unavailable). The graph built per shape is the SDPA inference graph cuDNN's runtime-fusion
// flash engine recognises, with Q [b, h, s_q, d], Kᵀ [b, h_kv, d, s_kv], V [b, h_kv, s_kv, d] and
// O [b, h, s_q, d] given by strides over qtool's token-major views (row stride ld: b = len·ld,
// h = d, s = ld, d = 1):
//   S = Q·Kᵀ (float32) → S·scale (scale passed by value at execution) → [causal: row >= col kept,
//   others −inf, through gen_index / cmp_ge / binary_select] → softmax as max / sub / exp / sum / div
//   (float32, P in the io dtype), with the row statistics max + log(sum) as a virtual output (the
//   fused engines match the softmax only with it) → O = P·V.
// The finalized execution plan is cached per shape (dtype, b, h, h_kv, s_q, s_kv, d, the four row
// strides, causal): building one can take long (cuDNN compiles the fused kernel), so it happens once
// per shape and CudnnAttention. A shape cuDNN cannot take (no engine, finalize fails, workspace over
// kMaxWorkspaceBytes) is remembered and served by qtool's kernel; QTOOL_CUDNN_DEBUG=1 prints one
// line per such shape, per plan built, and at load.
//
// Which implementation serves CudaOps::attention: QTOOL_ATTENTION=auto (the default: cuDNN where it
// takes the case, else ours), own (always ours), cudnn (cuDNN for every covered case; a covered case
// cuDNN cannot run is then Error(Unsupported) naming the reason, so that a fallback cannot pass as
// cuDNN). Bias and key-mask cases (T5, CLIP) always take qtool's kernel.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "forward_kernels.hpp"

namespace qtool::runner::cuda {

enum class AttentionImpl : uint8_t { Auto, Own, Cudnn };
// The process-wide choice: QTOOL_ATTENTION (auto|own|cudnn; unset: auto) read at the first call
// (another value is Error(InvalidInput) naming it), unless set_attention_impl chose first.
AttentionImpl attention_impl();
void set_attention_impl(AttentionImpl impl);  // tests and benchmarks
const char* attention_impl_name(AttentionImpl impl);

// How many attention calls each implementation served, process-wide, since the start.
struct AttentionCounts {
  uint64_t own = 0;
  uint64_t cudnn = 0;
};
AttentionCounts attention_counts();

// Whether cuDNN >= 9.0 is loaded (tried once per process: libcudnn.so.9 and its backend functions);
// when it is not, `why` (if given) says why. Never throws.
bool cudnn_available(std::string* why = nullptr);
// cudnnGetVersion() of the loaded library (91900 for 9.19.0), 0 when it is not loaded.
size_t cudnn_version();
// "cuDNN 9.19.0 (/usr/local/cuda/lib/libcudnn.so.9; built against 9.19.0)", or why it is not available.
std::string cudnn_description();
// Builds and finalizes `a`'s attention graph up to the operation graph, without a handle or a
// device (cuDNN 9.19 finalizes an operation graph without a handle; the heuristics and the plan need
// the device): "" when cuDNN accepts every tensor, operation and the graph, else the first failure
// (or why cuDNN is not available). For tests on machines without a GPU.
std::string cudnn_check_graph(const fwd::AttnArgs& a);

// cuDNN's fused attention forward on one device and stream, with its plans cached per shape. Cheap
// to make: the library, the handle and a plan come at the first run that needs them.
class CudnnAttention {
 public:
  // Workspace for a plan: `bytes` of device memory valid until the work launched on the stream is
  // done (CudaOps: the activation stack), or nullptr when it cannot be had.
  using Workspace = std::function<void*(uint64_t bytes)>;
  static constexpr uint64_t kMaxWorkspaceBytes = uint64_t{256} << 20;

  CudnnAttention(int device, cudaStream_t stream);
  ~CudnnAttention();
  CudnnAttention(const CudnnAttention&) = delete;
  CudnnAttention& operator=(const CudnnAttention&) = delete;

  // The cases handed to cuDNN at all: no bias, no key mask; q, k, v, out all bf16 or all f16;
  // head_dim 64 or 128 (the ones tested against the CPU backend on the GPU); every view's data
  // 16-byte aligned and its row stride a multiple of 8 elements; out overlapping none of q, k, v;
  // lengths >= 1; heads % kv_heads == 0; causal only with q_len == kv_len.
  static bool covers(const fwd::AttnArgs& a);

  // Launches `a` (covers(a) required) on the stream through cuDNN and returns true, or returns
  // false with nothing launched and `why` set when cuDNN cannot take this shape (remembered: the
  // next call of the shape returns false at once) or the workspace is not available. A failure
  // of cuDNN while executing a plan it accepted is Error(Internal) naming the call.
  bool run(const fwd::AttnArgs& a, const Workspace& workspace, std::string* why);

  // Plans built (and shapes refused) by this object so far.
  size_t plans_built() const;
  size_t shapes_refused() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// CudaOps::attention's dispatch: cuDNN when attention_impl() is not Own, CudnnAttention::covers(a)
// and cuDNN runs it; else fwd::launch_attention. Counts which one served the call. With the choice
// Cudnn, a covered case cuDNN does not run is Error(Unsupported) with cuDNN's reason. True when
// cuDNN ran it.
bool run_attention(CudnnAttention& cudnn, const fwd::AttnArgs& a, cudaStream_t stream,
                   const CudnnAttention::Workspace& workspace);

}  // namespace qtool::runner::cuda
