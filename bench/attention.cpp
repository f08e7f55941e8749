// bench_attention: the CUDA backend's attention kernels at Flux's and Llama's shapes (and a head-dim
// 64 one), bf16, random N(0, 1) q/k/v in the frameworks' [tokens, heads * head_dim] layout: the
// tensor-core kernel (attention_mma.cu; 8 warps, the default, and 4 warps), the CUDA-core one
// (forward_kernels.cu) and cuDNN's fused flash attention as the CUDA backend runs it
// (attention_cudnn.cpp: `qtool_cudnn`, its plan built before the warm-ups and the build time
// printed; the row is left out, with cuDNN's reason, where cuDNN does not run the shape). Each timed
// by CUDA events around single launches, 3 warm-ups, the median of --reps (20; the CUDA-core kernel
// 5). FLOP = 4 * T * T * head_dim * heads, halved for causal.
// Prints a table and, with --json PATH, writes the rows as a JSON array; bench/attention_torch.py
// prints the same fields for torch's scaled_dot_product_attention, and with --qtool-json the ratios.
// Also prints max |tensor-core - CUDA-core| and max |cuDNN - CUDA-core| per shape as a sanity check
// (the tests are the check).
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "attention_cudnn.hpp"
#include "attention_mma.hpp"
#include "qtool/runner/cuda_resources.hpp"
#include "qtool/runner/kernel_math.hpp"

namespace {

namespace fwd = qtool::runner::cuda::fwd;
namespace rc = qtool::runner::cuda;

struct Shape {
  const char* name;
  int64_t heads, kv_heads, tokens, hd;
  bool causal;
};

const Shape kShapes[] = {
    {"flux", 24, 24, 4608, 128, false},  // 4096 image + 512 text tokens, joint attention
    {"llama", 32, 8, 4096, 128, true},   // Llama-3-8B prefill, GQA 4
    {"hd64", 24, 24, 4608, 64, false},   // the head-dim 64 kernel at Flux's token count
};

struct Row {
  std::string impl, shape;
  const Shape* s;
  double ms, tflops;
};

// max |x - ref| over the elements where neither is NaN, and the NaN count of either.
std::pair<double, size_t> max_diff(const rc::DeviceBuffer& x, const rc::DeviceBuffer& ref, size_t n) {
  std::vector<uint16_t> hx(n), hr(n);
  QTOOL_CUDA_CHECK(cudaMemcpy(hx.data(), x.data(), n * 2, cudaMemcpyDeviceToHost));
  QTOOL_CUDA_CHECK(cudaMemcpy(hr.data(), ref.data(), n * 2, cudaMemcpyDeviceToHost));
  double max_d = 0.0;
  size_t nan = 0;
  for (size_t i = 0; i < n; ++i) {
    const float a = qtool::runner::kmath::bf16_bits_to_f32(hx[i]),
                b = qtool::runner::kmath::bf16_bits_to_f32(hr[i]);
    if (std::isnan(a) || std::isnan(b)) {
      ++nan;
      continue;
    }
    max_d = std::max(max_d, static_cast<double>(std::fabs(a - b)));
  }
  return {max_d, nan};
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

std::vector<uint16_t> random_bf16(size_t n, std::mt19937_64& rng) {
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<uint16_t> v(n);
  for (auto& x : v) x = qtool::runner::kmath::f32_to_bf16_bits(nd(rng));
  return v;
}

void usage() {
  std::fprintf(stderr, "usage: bench_attention [--json PATH] [--reps N] [--shape flux|llama|hd64|all]\n");
}

}  // namespace

int main(int argc, char** argv) {
  std::string json_path, only = "all";
  int reps = 20;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--json" && i + 1 < argc) {
      json_path = argv[++i];
    } else if (a == "--reps" && i + 1 < argc) {
      reps = std::atoi(argv[++i]);
    } else if (a == "--shape" && i + 1 < argc) {
      only = argv[++i];
    } else {
      usage();
      return 2;
    }
  }
  if (reps < 1) {
    usage();
    return 2;
  }
  if (rc::device_count() == 0) {
    std::fprintf(stderr, "bench_attention: no CUDA device\n");
    return 1;
  }
  const std::string device = rc::describe_device(0);
  std::printf("bench_attention on %s\n", device.c_str());
  rc::DeviceScope scope(0);
  rc::Stream stream(0);
  rc::Event e0(0, rc::Event::Timing::On), e1(0, rc::Event::Timing::On);
  std::mt19937_64 rng(1234);
  std::vector<Row> rows;
  // cuDNN's attention as the CUDA backend runs it; its workspace (if a plan wants one) from here.
  rc::CudnnAttention dnn(0, stream.get());
  rc::DeviceBuffer dnn_ws;
  const rc::CudnnAttention::Workspace dnn_workspace = [&](uint64_t bytes) -> void* {
    if (dnn_ws.size() < bytes) dnn_ws = rc::DeviceBuffer(0, bytes);
    return dnn_ws.data();
  };
  std::printf("%s\n", rc::cudnn_description().c_str());
  for (const Shape& s : kShapes) {
    if (only != "all" && only != s.name) continue;
    const size_t nq = static_cast<size_t>(s.tokens * s.heads * s.hd);
    const size_t nkv = static_cast<size_t>(s.tokens * s.kv_heads * s.hd);
    rc::DeviceBuffer q(0, nq * 2), k(0, nkv * 2), v(0, nkv * 2), o(0, nq * 2), o_ref(0, nq * 2),
        o_dnn(0, nq * 2);
    for (auto [buf, n] : {std::pair{&q, nq}, std::pair{&k, nkv}, std::pair{&v, nkv}}) {
      const auto host = random_bf16(n, rng);
      QTOOL_CUDA_CHECK(cudaMemcpy(buf->data(), host.data(), n * 2, cudaMemcpyHostToDevice));
    }
    fwd::AttnArgs a;
    a.q = {q.data(), fwd::kBf16, s.tokens, s.heads * s.hd, s.heads * s.hd};
    a.k = {k.data(), fwd::kBf16, s.tokens, s.kv_heads * s.hd, s.kv_heads * s.hd};
    a.v = {v.data(), fwd::kBf16, s.tokens, s.kv_heads * s.hd, s.kv_heads * s.hd};
    a.out = {o.data(), fwd::kBf16, s.tokens, s.heads * s.hd, s.heads * s.hd};
    a.batch = 1;
    a.q_len = a.kv_len = s.tokens;
    a.heads = s.heads;
    a.kv_heads = s.kv_heads;
    a.head_dim = s.hd;
    a.scale = 1.0f / std::sqrt(static_cast<float>(s.hd));
    a.causal = s.causal;
    const double flop =
        4.0 * static_cast<double>(s.tokens) * s.tokens * s.hd * s.heads * (s.causal ? 0.5 : 1.0);
    struct Impl {
      const char* name;
      int warps;  // 0, 4, 8: tensor-core; -1: CUDA-core; -2: cuDNN
      int reps;
    } impls[] = {{"qtool_mma", 0, reps},
                 {"qtool_mma_w4", 4, reps},
                 {"qtool_simt", -1, std::min(reps, 5)},
                 {"qtool_cudnn", -2, reps}};
    bool cudnn_ran = false;
    for (const Impl& im : impls) {
      fwd::AttnArgs ai = a;
      if (im.warps == -1) ai.out.data = o_ref.data();
      if (im.warps == -2) {
        ai.out.data = o_dnn.data();
        if (!rc::CudnnAttention::covers(ai)) {
          std::printf("  %-6s qtool_cudnn: not a case the cuDNN path takes\n", s.name);
          continue;
        }
        std::string why;
        const auto t_build = std::chrono::steady_clock::now();
        if (!dnn.run(ai, dnn_workspace, &why)) {
          std::printf("  %-6s qtool_cudnn: cuDNN does not run this shape: %s\n", s.name, why.c_str());
          continue;
        }
        stream.synchronize();
        std::printf(
            "  %-6s qtool_cudnn: plan built and first run in %.1f ms\n", s.name,
            std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t_build).count());
        cudnn_ran = true;
      }
      std::string run_error;
      const auto launch = [&] {
        if (im.warps == -1)
          fwd::launch_attention_simt(ai, stream.get());
        else if (im.warps == -2)
          (void)dnn.run(ai, dnn_workspace, &run_error);
        else
          fwd::launch_attention_mma(ai, stream.get(), im.warps);
      };
      for (int i = 0; i < 3; ++i) launch();
      std::vector<double> ms;
      for (int i = 0; i < im.reps; ++i) {
        e0.record(stream.get());
        launch();
        e1.record(stream.get());
        e1.synchronize();
        ms.push_back(e1.elapsed_ms_since(e0));
      }
      const double m = median(ms);
      rows.push_back({im.name, s.name, &s, m, flop / m / 1e9});
      std::printf("  %-6s H %2lld/%-2lld T %lld hd %lld %-9s %-13s %9.3f ms %7.1f TFLOP/s\n", s.name,
                  static_cast<long long>(s.heads), static_cast<long long>(s.kv_heads),
                  static_cast<long long>(s.tokens), static_cast<long long>(s.hd),
                  s.causal ? "causal" : "non-causal", im.name, m, rows.back().tflops);
    }
    const auto [max_d, nan] = max_diff(o, o_ref, nq);
    std::printf("  %-6s max |mma - simt| %.3g, %zu NaN\n", s.name, max_d, nan);
    if (cudnn_ran) {
      const auto [max_dnn, nan_dnn] = max_diff(o_dnn, o_ref, nq);
      std::printf("  %-6s max |cudnn - simt| %.3g, %zu NaN\n", s.name, max_dnn, nan_dnn);
    }
  }
  if (!json_path.empty()) {
    FILE* f = std::fopen(json_path.c_str(), "w");
    if (!f) {
      std::fprintf(stderr, "bench_attention: cannot write %s\n", json_path.c_str());
      return 1;
    }
    std::fprintf(f, "[\n");
    for (size_t i = 0; i < rows.size(); ++i) {
      const Row& r = rows[i];
      std::fprintf(
          f,
          "  {\"impl\": \"%s\", \"shape\": \"%s\", \"batch\": 1, \"heads\": %lld, \"kv_heads\": %lld, "
          "\"tokens\": %lld, \"head_dim\": %lld, \"causal\": %s, \"dtype\": \"bf16\", \"ms\": %.4f, "
          "\"tflops\": %.2f, \"device\": \"%s\"}%s\n",
          r.impl.c_str(), r.shape.c_str(), static_cast<long long>(r.s->heads),
          static_cast<long long>(r.s->kv_heads), static_cast<long long>(r.s->tokens),
          static_cast<long long>(r.s->hd), r.s->causal ? "true" : "false", r.ms, r.tflops, device.c_str(),
          i + 1 < rows.size() ? "," : "");
    }
    std::fprintf(f, "]\n");
    std::fclose(f);
    std::printf("wrote %s\n", json_path.c_str());
  }
  return 0;
}
