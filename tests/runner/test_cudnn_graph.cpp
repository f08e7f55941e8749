// The cuDNN attention path's host side (runner/cuda/attention_cudnn.cpp), on any machine with the
// CUDA backend built, GPU or not: which cases it takes (CudnnAttention::covers), and that cuDNN
// accepts every tensor, operation and the operation graph of the SDPA graph qtool builds, at the
// shapes the GPU tests run (and rejects a malformed one with a message that names the operation).
// cuDNN is loaded with dlopen; where it cannot be, the graph cases print why and check nothing more.
// The engine, the plan and the numbers need the device: runner_cuda_ops_test (label gpu).
#include <doctest/doctest.h>

#include <cstdint>
#include <cstdio>
#include <string>

#include "attention_cudnn.hpp"

namespace rc = qtool::runner::cuda;
namespace fwd = qtool::runner::cuda::fwd;

namespace {

// A dense token-major case at fake, 256-byte aligned, non-overlapping addresses (never dereferenced).
fwd::AttnArgs make_case(int dt, int64_t batch, int64_t q_len, int64_t kv_len, int64_t heads, int64_t kv_heads,
                        int64_t hd, bool causal, int64_t pad = 0) {
  fwd::AttnArgs a;
  const int64_t qc = heads * hd, kc = kv_heads * hd;
  const int64_t eb = dt == fwd::kF32 ? 4 : 2;
  uintptr_t next = uintptr_t{1} << 32;
  auto view = [&](int64_t rows, int64_t cols) {
    fwd::View v{reinterpret_cast<void*>(next), dt, rows, cols, cols + pad};
    next += static_cast<uintptr_t>((rows * (cols + pad) * eb + 255) / 256 * 256 + 256);
    return v;
  };
  a.q = view(batch * q_len, qc);
  a.k = view(batch * kv_len, kc);
  a.v = view(batch * kv_len, kc);
  a.out = view(batch * q_len, qc);
  a.batch = batch;
  a.q_len = q_len;
  a.kv_len = kv_len;
  a.heads = heads;
  a.kv_heads = kv_heads;
  a.head_dim = hd;
  a.scale = 0.125f;
  a.causal = causal;
  return a;
}

}  // namespace

TEST_CASE("cuDNN attention: the cases the path takes") {
  const fwd::AttnArgs base = make_case(fwd::kBf16, 2, 77, 77, 8, 2, 128, true);
  CHECK(rc::CudnnAttention::covers(base));
  CHECK(rc::CudnnAttention::covers(make_case(fwd::kF16, 1, 1, 333, 4, 1, 64, false)));
  // head_dim 80: qtool's kernel (cuDNN takes it, but only 64 and 128 are tested on the GPU)
  CHECK_FALSE(rc::CudnnAttention::covers(make_case(fwd::kBf16, 1, 40, 40, 2, 2, 80, false)));
  CHECK(rc::CudnnAttention::covers(make_case(fwd::kBf16, 1, 40, 40, 2, 2, 64, false, 16)));  // strided rows
  CHECK_FALSE(rc::CudnnAttention::covers(make_case(fwd::kF32, 1, 40, 40, 2, 2, 64, false)));
  CHECK_FALSE(rc::CudnnAttention::covers(make_case(fwd::kBf16, 1, 40, 40, 2, 2, 264, false)));
  CHECK_FALSE(rc::CudnnAttention::covers(make_case(fwd::kBf16, 1, 40, 40, 2, 2, 60, false)));
  CHECK_FALSE(rc::CudnnAttention::covers(make_case(fwd::kBf16, 1, 40, 40, 2, 2, 64, false, 3)));  // ld % 8
  CHECK_FALSE(
      rc::CudnnAttention::covers(make_case(fwd::kBf16, 1, 40, 41, 2, 2, 64, true)));  // causal q != kv
  CHECK_FALSE(rc::CudnnAttention::covers(make_case(fwd::kBf16, 1, 40, 40, 6, 4, 64, false)));  // 6 % 4
  fwd::AttnArgs a = base;
  a.bias = a.q;  // T5's bias: qtool's kernel
  CHECK_FALSE(rc::CudnnAttention::covers(a));
  a = base;
  int64_t keep = 1;
  a.mask = &keep;  // a key mask: qtool's kernel
  CHECK_FALSE(rc::CudnnAttention::covers(a));
  a = base;
  a.q.data = static_cast<char*>(a.q.data) + 2;  // not 16-byte aligned
  CHECK_FALSE(rc::CudnnAttention::covers(a));
  a = base;
  a.out = a.q;  // in place of q
  CHECK_FALSE(rc::CudnnAttention::covers(a));
  a = base;
  a.v.dt = fwd::kF16;  // mixed dtypes
  CHECK_FALSE(rc::CudnnAttention::covers(a));
}

TEST_CASE("cuDNN attention: cuDNN accepts the graph's tensors, operations and operation graph") {
  std::string why;
  if (!rc::cudnn_available(&why)) {
    std::printf("cuDNN not available (%s): graph checks skipped\n", why.c_str());
    return;
  }
  std::printf("%s\n", rc::cudnn_description().c_str());
  const struct {
    const char* name;
    fwd::AttnArgs a;
  } cases[] = {
      {"flux bf16", make_case(fwd::kBf16, 1, 4608, 4608, 24, 24, 128, false)},
      {"llama bf16 causal GQA 4", make_case(fwd::kBf16, 1, 4096, 4096, 32, 8, 128, true)},
      {"f16 hd 64 causal", make_case(fwd::kF16, 2, 77, 77, 8, 2, 64, true)},
      {"q 1 kv 333", make_case(fwd::kBf16, 2, 1, 333, 4, 1, 128, false)},
      {"T 1 causal", make_case(fwd::kF16, 1, 1, 1, 2, 2, 128, true)},
      {"strided rows", make_case(fwd::kBf16, 1, 333, 333, 8, 2, 128, true, 16)},
  };
  for (const auto& c : cases) {
    CAPTURE(c.name);
    const std::string r = rc::cudnn_check_graph(c.a);
    INFO(r);
    CHECK(r.empty());
  }
  // A malformed graph (8 query heads over 3 kv heads) fails at the first matmul, and says so.
  const std::string bad = rc::cudnn_check_graph(make_case(fwd::kBf16, 1, 40, 40, 8, 3, 64, false));
  INFO(bad);
  CHECK(bad.find("bmm1") != std::string::npos);
  CHECK(bad.find("CUDNN_STATUS_BAD_PARAM") != std::string::npos);
}
