// The CUDA half of `qtool profile`: every rate measured with CUDA events, median of repeats after
// a warm-up, with the runner's own kernels and cuBLAS call.
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <ctime>
#include <initializer_list>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "attention_cudnn.hpp"
#include "forward_args.hpp"
#include "qtool/formats/error.hpp"
#include "qtool/formats/size.hpp"
#include "qtool/runner/cuda_forward_ops.hpp"
#include "qtool/runner/cuda_ops.hpp"
#include "qtool/runner/cuda_resources.hpp"
#include "qtool/runner/profile.hpp"

namespace qtool::runner {
namespace {

using cuda::DeviceBuffer;
using cuda::Event;
using cuda::PinnedBuffer;
using cuda::Stream;

uint64_t used_bytes() {
  size_t free_b = 0, total_b = 0;
  QTOOL_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
  return static_cast<uint64_t>(total_b - free_b);
}

// Median milliseconds of `fn` enqueued on `stream`, between two events, after one warm-up call.
template <typename Fn>
double median_ms(const Stream& stream, uint32_t repeats, Fn&& fn) {
  Event a(stream.device(), Event::Timing::On), b(stream.device(), Event::Timing::On);
  fn();
  stream.synchronize();
  std::vector<double> t;
  for (uint32_t i = 0; i < std::max<uint32_t>(1, repeats); ++i) {
    a.record(stream.get());
    fn();
    b.record(stream.get());
    b.synchronize();
    t.push_back(b.elapsed_ms_since(a));
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

std::string today() {
  const std::time_t now = std::time(nullptr);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%d", std::gmtime(&now));
  return buf;
}

}  // namespace

std::optional<std::string> cuda_device_name(int device) {
  if (device < 0 || device >= cuda::device_count()) return std::nullopt;
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, device) != cudaSuccess) {
    (void)cudaGetLastError();
    return std::nullopt;
  }
  return std::string(prop.name);
}

// Every other kernel of the forward ops, once on small views: the CUDA module loader brings a
// kernel's code onto the device at its first launch, and the context measured below is to hold
// what a run loads (a run of the full-size Flux transformer measured 248 KiB more than its plan,
// whose context came from a profile that had not run RoPE, embedding or the view digest).
static void touch_forward_ops(Ops& ops, const Stream& stream) {
  const int64_t n = 8, d = 256;
  const Mat x = ops.alloc(n, d, DType::BF16), y = ops.alloc(n, d, DType::BF16),
            w = ops.alloc(d, d, DType::BF16), b32 = ops.alloc(1, d, DType::F32),
            ids = ops.alloc(n, 1, DType::I64);
  for (const Mat* m : {&x, &w})
    cuda::generate_activation(31, static_cast<uint64_t>(m->rows), static_cast<uint64_t>(m->cols), 0,
                              static_cast<uint64_t>(m->cols), static_cast<uint16_t*>(m->data), stream.get());
  QTOOL_CUDA_CHECK(cudaMemsetAsync(b32.data, 0, static_cast<size_t>(d) * 4, stream.get()));
  const std::vector<int64_t> host_ids = {0, 1, 2, 3, 4, 5, 6, 7};
  ops.upload(host_ids.data(), ids);
  DequantParams weight;
  weight.kind = WeightKind::Bf16;
  weight.rows = weight.cols = static_cast<uint64_t>(d);
  weight.weight = static_cast<const uint8_t*>(w.data);
  DequantParams bias;
  bias.kind = WeightKind::F32;
  bias.rows = 1;
  bias.cols = static_cast<uint64_t>(d);
  bias.weight = static_cast<const uint8_t*>(b32.data);
  ops.linear(x, weight, &bias, y);  // a float32 bias: the bias + rounding kernel
  ops.embedding(ids, weight, y);
  ops.rope(RopeStyle::Adjacent, x, 64, w.rows_view(0, n).cols_view(0, 64), w.rows_view(n, n).cols_view(0, 64),
           y);
  uint64_t hash = 0, nonfinite = 0;
  ops.digest(x.cols_view(1, d - 1), &hash, &nonfinite);  // a strided view: the view digest kernel
  stream.synchronize();
}

namespace {

void log_line(const ProfileOptions& o, const std::string& s) {
  if (o.log) o.log(s);
}

// The name, the memory, and the names `qtool plan` looks profiles up by.
void read_device_properties(int dev, planner::DeviceProfile& p) {
  QTOOL_CUDA_CHECK(cudaFree(nullptr));
  cudaDeviceProp prop{};
  QTOOL_CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
  p.name = prop.name;
  p.device_names = {prop.name};  // so that `qtool plan` finds this profile on such a GPU
  p.memory_bytes = prop.totalGlobalMem;
}

// cudaMalloc's rounding: the change in free memory for a buffer of just over 1 MiB.
uint64_t measure_alloc_granularity(int dev) {
  const uint64_t before = used_bytes();
  DeviceBuffer probe(dev, (1 << 20) + 1);
  const uint64_t after = used_bytes();
  uint64_t g = after > before ? after - before : (2ull << 20);
  uint64_t pow2 = 1;
  while (pow2 < g) pow2 <<= 1;
  return std::max<uint64_t>(pow2, 4096);
}

// The bandwidth measurements' buffers, `bytes` each. The copy latency reuses them, and they stay
// allocated until the context is measured, which subtracts the device ones.
struct CopyBuffers {
  CopyBuffers(int dev, uint64_t n) : bytes(n), pinned(n), pageable(n, 2), d_a(dev, n), d_b(dev, n) {
    std::memset(pinned.data(), 1, n);
  }
  uint64_t bytes;
  PinnedBuffer pinned;
  std::vector<uint8_t> pageable;
  DeviceBuffer d_a, d_b;
};

// Host-to-device from pinned and from pageable memory, and device-to-device.
void measure_copies(const ProfileOptions& o, const Stream& stream, const CopyBuffers& c,
                    planner::DeviceProfile& p) {
  const uint64_t n = c.bytes;
  const double pinned_ms = median_ms(stream, o.repeats, [&] {
    QTOOL_CUDA_CHECK(cudaMemcpyAsync(c.d_a.data(), c.pinned.data(), n, cudaMemcpyHostToDevice, stream.get()));
  });
  p.h2d_pinned_gbps = static_cast<double>(n) / (pinned_ms * 1e6);
  const double pageable_ms = median_ms(stream, std::max<uint32_t>(1, o.repeats / 2), [&] {
    QTOOL_CUDA_CHECK(
        cudaMemcpyAsync(c.d_a.data(), c.pageable.data(), n, cudaMemcpyHostToDevice, stream.get()));
  });
  p.h2d_pageable_gbps = static_cast<double>(n) / (pageable_ms * 1e6);
  const double d2d_ms = median_ms(stream, o.repeats, [&] {
    QTOOL_CUDA_CHECK(cudaMemcpyAsync(c.d_b.data(), c.d_a.data(), n, cudaMemcpyDeviceToDevice, stream.get()));
  });
  p.device_bandwidth_gbps = 2.0 * static_cast<double>(n) / (d2d_ms * 1e6);  // read + write
  log_line(o, str_cat("  h2d pinned ", p.h2d_pinned_gbps, " GB/s, pageable ", p.h2d_pageable_gbps,
                      " GB/s, d2d ", p.device_bandwidth_gbps, " GB/s (read + write)"));
}

// The copy rate from the other GPU (the first, or the second when `dev` is the first) into `dev`,
// with peer access where the pair has it, in GB/s.
double measure_peer_copy(const ProfileOptions& o, int dev, const Stream& stream, const CopyBuffers& c) {
  const uint64_t n = c.bytes;
  const int peer = dev == 0 ? 1 : 0;
  int can = 0;
  QTOOL_CUDA_CHECK(cudaDeviceCanAccessPeer(&can, dev, peer));
  if (can) {
    const cudaError_t err = cudaDeviceEnablePeerAccess(peer, 0);
    if (err == cudaErrorPeerAccessAlreadyEnabled)
      (void)cudaGetLastError();
    else
      QTOOL_CUDA_CHECK(err);
  }
  DeviceBuffer d_peer(peer, n);
  const double p2p_ms = median_ms(stream, o.repeats, [&] {
    QTOOL_CUDA_CHECK(cudaMemcpyPeerAsync(c.d_a.data(), dev, d_peer.data(), peer, n, stream.get()));
  });
  const double gbps = static_cast<double>(n) / (p2p_ms * 1e6);
  log_line(o, str_cat("  peer copy gpu", peer, " -> gpu", dev, " ", gbps, " GB/s",
                      can ? "" : " (no direct peer access)"));
  return gbps;
}

// GEMM: the runner's call (bf16 in, fp32 accumulate, bf16 out) over a mix of the linear shapes
// of the models qtool plans (FLUX widths 3072/12288 and half of them, Llama's 4096/14336), each
// [tokens, in] x [in, out]: the rate is the mix's total FLOPs over its total time, which is what
// a step of such layers sees (small GEMMs run well below the large-square peak). In TFLOP/s.
double measure_gemm(const ProfileOptions& o, int dev, const Stream& stream,
                    const cuda::CublasHandle& cublas) {
  const uint64_t t = std::max<uint64_t>(1, o.gemm_tokens);
  const std::pair<uint64_t, uint64_t> shapes[] = {{1536, 1536}, {1536, 6144},  {6144, 1536},
                                                  {3072, 3072}, {3072, 12288}, {12288, 3072},
                                                  {4096, 4096}, {4096, 14336}, {14336, 4096}};
  uint64_t max_in = 0, max_w = 0, max_out = 0;
  for (const auto& [in, out] : shapes) {
    max_in = std::max(max_in, in);
    max_out = std::max(max_out, out);
    max_w = std::max(max_w, in * out);
  }
  DeviceBuffer x(dev, t * max_in * 2), w(dev, max_w * 2), y(dev, t * max_out * 2);
  // Random bf16 data (never time on zeros), made on the device.
  cuda::generate_activation(11, t, max_in, 0, max_in, x.as<uint16_t>(), stream.get());
  cuda::generate_activation(12, max_w / 4096, 4096, 0, 4096, w.as<uint16_t>(), stream.get());
  double flops = 0, ms = 0;
  for (const auto& [in, out] : shapes) {
    ms += median_ms(stream, o.repeats, [&] {
      cuda::gemm_bf16(cublas, x.as<uint16_t>(), in, w.as<uint16_t>(), y.as<uint16_t>(), t, in, out);
    });
    flops += 2.0 * static_cast<double>(t * in * out);
  }
  const double tflops = flops / (ms * 1e9);
  log_line(o, str_cat("  bf16 GEMM, mix of 9 shapes at ", t, " tokens: ", tflops, " TFLOP/s"));
  // Other token counts load other cuBLAS kernels: run them once, so that the context measured
  // below holds what a run of the runner loads.
  for (uint64_t tt : {16ull, 64ull, 256ull, 1024ull})
    for (const auto& [in, out] : shapes)
      cuda::gemm_bf16(cublas, x.as<uint16_t>(), in, w.as<uint16_t>(), y.as<uint16_t>(), std::min(tt, t), in,
                      out);
  DeviceBuffer digest(dev, 16);
  QTOOL_CUDA_CHECK(cudaMemsetAsync(digest.data(), 0, 16, stream.get()));
  cuda::accumulate_digest(y.as<uint16_t>(), t * 1536, digest.as<unsigned long long>(), stream.get());
  stream.synchronize();
  return tflops;
}

// Non-causal attention of `t` tokens over themselves, `heads` heads of `hd`, softmax scale 1/sqrt(hd).
AttentionShape self_attention(int64_t t, int64_t heads, int64_t hd) {
  AttentionShape shape;
  shape.q_len = shape.kv_len = t;
  shape.heads = shape.kv_heads = heads;
  shape.head_dim = hd;
  shape.scale = 1.0f / std::sqrt(static_cast<float>(hd));
  return shape;
}

// The runner's forward ops through its CUDA backend at Flux's shape (FLUX.1-dev: 24 heads of
// 128, 4096 image + 512 text tokens): attention, and the memory-bound ops a block runs most (a
// modulation, GELU over the MLP's hidden state, a gated residual), on random bf16 values. Fills
// p.attention_tflops and p.activation_gbps.
void measure_forward_ops(const ProfileOptions& o, int dev, const Stream& stream, planner::DeviceProfile& p) {
  const int64_t t = 4608, heads = 24, hd = 128, d = heads * hd;
  const auto elems = static_cast<uint64_t>(4 * t * d + 4 * t * d + 2 * d);
  auto ops = make_cuda_ops(dev, stream.get(), elems * 2 + (16u << 20));
  const Mat q = ops->alloc(t, d, DType::BF16), k = ops->alloc(t, d, DType::BF16),
            v = ops->alloc(t, d, DType::BF16), out = ops->alloc(t, d, DType::BF16),
            hidden = ops->alloc(t, 4 * d, DType::BF16), mod = ops->alloc(1, 2 * d, DType::BF16);
  uint64_t seed = 21;
  for (const Mat* m : {&q, &k, &v, &hidden, &mod})
    cuda::generate_activation(seed++, static_cast<uint64_t>(m->rows), static_cast<uint64_t>(m->cols), 0,
                              static_cast<uint64_t>(m->cols), static_cast<uint16_t*>(m->data), stream.get());
  const AttentionShape shape = self_attention(t, heads, hd);
  const double att_ms = median_ms(stream, o.repeats, [&] { ops->attention(q, k, v, shape, out); });
  p.attention_tflops =
      4.0 * static_cast<double>(t) * static_cast<double>(t) * static_cast<double>(d) / (att_ms * 1e9);
  const Mat shift = mod.cols_view(0, d), scale = mod.cols_view(d, d);
  const double act_ms = median_ms(stream, o.repeats, [&] {
    ops->modulate(q, shift, scale, 1, 1e-6f, out);
    ops->activation(Activation::GeluTanh, hidden, hidden);
    ops->residual(k, &shift, v, 1, k);
  });
  // Bytes read plus written: the modulation 2 x [t, d], GELU 2 x [t, 4d], the residual 3 x [t, d].
  p.activation_gbps = static_cast<double>((2 + 8 + 3) * t * d * 2) / (act_ms * 1e6);
  log_line(o, str_cat("  forward ops at Flux's shape: attention ", p.attention_tflops,
                      " TFLOP/s; modulation, GELU, residual ", p.activation_gbps, " GB/s"));
  touch_forward_ops(*ops, stream);
}

// cuDNN's handle with one attention plan built and run, as every run whose attention cuDNN serves
// holds them (the runner's default): kept until the context is measured, which leaves out the
// buffers (q, k, v, out; the plan's workspace). Empty when the attention is qtool's own
// (QTOOL_ATTENTION=own) or cuDNN cannot be loaded or refuses the shape (logged).
struct CudnnContext {
  std::unique_ptr<cuda::CudnnAttention> cudnn;
  DeviceBuffer io, workspace;
};

CudnnContext hold_cudnn(const ProfileOptions& o, int dev, const Stream& stream) {
  CudnnContext c;
  std::string why;
  if (cuda::attention_impl() == cuda::AttentionImpl::Own) return c;
  if (!cuda::cudnn_available(&why)) {
    log_line(o, "  cuDNN not loaded (" + why + "): the context leaves it out");
    return c;
  }
  const int64_t t = 256, heads = 2, hd = 128, d = heads * hd;
  const auto bytes = static_cast<size_t>(t * d) * 2;
  c.io = DeviceBuffer(dev, 4 * bytes);
  QTOOL_CUDA_CHECK(cudaMemsetAsync(c.io.data(), 0, 4 * bytes, stream.get()));
  const auto mat = [&](int i) { return Mat{c.io.as<uint8_t>() + i * bytes, DType::BF16, t, d, d}; };
  const AttentionShape shape = self_attention(t, heads, hd);
  c.cudnn = std::make_unique<cuda::CudnnAttention>(dev, stream.get());
  const auto workspace = [&](uint64_t n) -> void* {
    c.workspace = DeviceBuffer(dev, static_cast<size_t>(n));
    return c.workspace.data();
  };
  const bool ran =
      c.cudnn->run(cuda::fwd::attention_args(mat(0), mat(1), mat(2), shape, mat(3)), workspace, &why);
  stream.synchronize();
  if (!ran) log_line(o, "  cuDNN attention not run (" + why + "): the context leaves its plan out");
  return c;
}

// The dequant measurements' buffers: an 8192 x 8192 weight of random (finite) codes, its scales,
// the bf16 output and the lookup tables. They stay allocated until the context is measured, which
// subtracts them.
struct DequantBuffers {
  static constexpr uint64_t kRows = 8192, kCols = 8192, kNumel = kRows * kCols;
  DequantBuffers(int dev, const Stream& stream)
      : q(dev, kNumel * 4),
        scales(dev, (kNumel / 64 + kRows) * 4),
        out(dev, kNumel * 2),
        tables_mem(dev, cuda::kDeviceTablesBytes),
        tables(cuda::upload_tables(tables_mem.data(), stream.get())) {
    const std::vector<uint8_t> host = random_finite_codes(kNumel * 4, 3);
    QTOOL_CUDA_CHECK(cudaMemcpy(q.data(), host.data(), host.size(), cudaMemcpyHostToDevice));
    std::vector<float> s(kNumel / 64 + kRows, 0.01f);
    QTOOL_CUDA_CHECK(cudaMemcpy(scales.data(), s.data(), s.size() * 4, cudaMemcpyHostToDevice));
  }
  DeviceBuffer q, scales, out, tables_mem;
  cuda::DeviceTables tables;
};

// Dequant kernels: the 8192 x 8192 weight per scheme, into p.dequant_gelems_per_s.
void measure_dequant(const ProfileOptions& o, const Stream& stream, const DequantBuffers& b,
                     planner::DeviceProfile& p) {
  const uint64_t rows = DequantBuffers::kRows, cols = DequantBuffers::kCols, numel = DequantBuffers::kNumel;
  for (const auto& [key, kind] : kProfiledDequantKinds) {
    const DequantParams dp = timing_weight(kind, rows, cols, b.q.as<uint8_t>(), b.scales.as<uint8_t>());
    const double ms = median_ms(stream, o.repeats, [&] {
      cuda::dequantize_to_bf16(dp, b.tables, b.out.as<uint16_t>(), stream.get());
    });
    p.dequant_gelems_per_s[key] = static_cast<double>(numel) / (ms * 1e6);
    log_line(o, str_cat("  dequant ", key, ": ", p.dequant_gelems_per_s[key], " G weights/s"));
  }
}

// The scalar paths (odd widths, 4-bit tails) and nf4's double quant load their own kernels: run
// each once, so that the context measured below holds them.
void touch_dequant_tails(const Stream& stream, const DequantBuffers& b) {
  for (const auto& [key, kind] : kProfiledDequantKinds) {
    const DequantParams odd = timing_weight(kind, 3, 17, b.q.as<uint8_t>(), b.scales.as<uint8_t>());
    cuda::dequantize_to_bf16(odd, b.tables, b.out.as<uint16_t>(), stream.get());
  }
  DequantParams dq;
  dq.kind = WeightKind::Nf4;
  dq.rows = 64;
  dq.cols = 64;
  dq.double_quant = true;
  dq.weight = b.q.as<uint8_t>();
  dq.scale = b.q.as<uint8_t>();
  dq.nested_absmax = b.scales.as<uint8_t>();
  cuda::dequantize_to_bf16(dq, b.tables, b.out.as<uint16_t>(), stream.get());
}

// A second stream pair and events, as the runner makes, used once; held until the context is
// measured.
struct RunnerStreams {
  explicit RunnerStreams(int dev)
      : copy_stream(dev), compute_stream(dev), e1(dev), e2(dev, Event::Timing::On) {
    e1.record(copy_stream.get());
    compute_stream.wait(e1.get());
    e2.record(compute_stream.get());
    e2.synchronize();
  }
  Stream copy_stream, compute_stream;
  Event e1, e2;
};

// Fixed costs: a launch of the smallest dequant, a 4 KiB pinned copy. Fills p.kernel_launch_us and
// p.copy_latency_us.
void measure_fixed_costs(const Stream& stream, const DequantBuffers& b, const CopyBuffers& c,
                         planner::DeviceProfile& p) {
  DequantParams tiny;
  tiny.kind = WeightKind::Int8;
  tiny.rows = 1;
  tiny.cols = 16;
  tiny.weight = b.q.as<uint8_t>();
  tiny.scale = b.scales.as<uint8_t>();
  constexpr int kLaunches = 1000;
  const double launch_ms = median_ms(stream, 3, [&] {
    for (int i = 0; i < kLaunches; ++i)
      cuda::dequantize_to_bf16(tiny, b.tables, b.out.as<uint16_t>(), stream.get());
  });
  p.kernel_launch_us = 1000.0 * launch_ms / kLaunches;
  const double copy_ms = median_ms(stream, 3, [&] {
    for (int i = 0; i < kLaunches; ++i)
      QTOOL_CUDA_CHECK(
          cudaMemcpyAsync(c.d_a.data(), c.pinned.data(), 4096, cudaMemcpyHostToDevice, stream.get()));
  });
  p.copy_latency_us = 1000.0 * copy_ms / kLaunches;
}

// Everything is loaded now: what is in use beyond `buffers` (each rounded up to the allocation
// granularity) is the context's.
uint64_t measure_context(std::initializer_list<uint64_t> buffers, uint64_t granularity) {
  const uint64_t used = used_bytes();
  uint64_t rounded = 0;
  for (uint64_t b : buffers) rounded += (b + granularity - 1) / granularity * granularity;
  return used > rounded ? used - rounded : used;
}

// Pinned host memory is mapped into the GPU's address space: its page tables take device memory
// (the plan's pinned_page_tables item), per started GiB pinned.
uint64_t measure_pinned_page_tables(const ProfileOptions& o) {
  const uint64_t before = used_bytes();
  std::vector<PinnedBuffer> pins;
  constexpr int kGiB = 3;
  for (int gib = 1; gib <= kGiB; ++gib) {
    pins.emplace_back(1ull << 30);
    log_line(o, str_cat("  device memory in use after pinning ", gib, " GiB more host memory: +",
                        format_size(used_bytes() - before)));
  }
  const uint64_t delta = used_bytes() - before;
  return (delta + kGiB - 1) / kGiB;
}

std::string describe_profile(const ProfileOptions& o, int dev, uint64_t n) {
  return "measured by qtool profile on " + today() + " on " + cuda::describe_device(dev) +
         ": medians of CUDA-event timings; h2d of " + format_size(n) +
         " buffers; device bandwidth counts bytes read plus written; bf16 GEMM rate over 9 linear shapes "
         "(1536..14336 wide) at " +
         std::to_string(o.gemm_tokens) +
         " tokens; dequant on 8192 x 8192 weights; "
         "context_bytes = (total - free) with cuBLAS, cuDNN's handle (unless QTOOL_ATTENTION=own) and every "
         "kernel loaded, minus this run's buffers and "
         "without pinned host memory; pinned_page_table_bytes_per_gib from pinning 3 GiB";
}

}  // namespace

planner::DeviceProfile measure_cuda_profile(const ProfileOptions& o) {
  const int dev = o.device;
  if (dev < 0 || dev >= cuda::device_count())
    fail(ErrorKind::Usage, "--device ", dev, ": there are ", cuda::device_count(), " CUDA devices");
  cuda::DeviceScope scope(dev);
  planner::DeviceProfile p;
  read_device_properties(dev, p);
  log_line(o, "profiling " + cuda::describe_device(dev));
  p.alloc_granularity_bytes = measure_alloc_granularity(dev);
  p.host_alloc_granularity_bytes = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));

  Stream stream(dev);
  const uint64_t n = std::max<uint64_t>(o.copy_bytes, 1 << 20);

  // The context with cuBLAS and every kernel loaded, without this function's own buffers.
  cuda::CublasHandle cublas(dev);
  DeviceBuffer workspace(dev, p.cublas_workspace_bytes);
  cublas.set_workspace(workspace.data(), workspace.size());
  cublas.set_stream(stream.get());

  CopyBuffers copies(dev, n);
  measure_copies(o, stream, copies, p);
  if (cuda::device_count() > 1) p.p2p_gbps = measure_peer_copy(o, dev, stream, copies);
  p.disk_read_gbps = measure_disk_read_gbps(o.tmp_dir, n, copies.pinned.data());
  log_line(o, str_cat("  checkpoint file reads ", p.disk_read_gbps, " GB/s"));

  p.bf16_tflops = measure_gemm(o, dev, stream, cublas);
  measure_forward_ops(o, dev, stream, p);
  {
    const DequantBuffers weights(dev, stream);
    measure_dequant(o, stream, weights, p);
    touch_dequant_tails(stream, weights);
    const RunnerStreams runner_streams(dev);
    measure_fixed_costs(stream, weights, copies, p);
    const CudnnContext cudnn = hold_cudnn(o, dev, stream);
    stream.synchronize();
    // The pinned buffer's page tables are the plan's pinned_page_tables item, not the context's.
    copies.pinned.reset();
    p.context_bytes = measure_context(
        {workspace.size(), copies.d_a.size(), copies.d_b.size(), weights.q.size(), weights.scales.size(),
         weights.out.size(), weights.tables_mem.size(), cudnn.io.size(), cudnn.workspace.size()},
        p.alloc_granularity_bytes);
    log_line(o, str_cat("  context with cuBLAS", cudnn.cudnn ? ", cuDNN" : "",
                        " and kernels: ", format_size(p.context_bytes), "; allocation granularity ",
                        format_size(p.alloc_granularity_bytes), "; launch ", p.kernel_launch_us, " us; copy ",
                        p.copy_latency_us, " us"));
  }
  p.pinned_page_table_bytes_per_gib = measure_pinned_page_tables(o);
  p.description = describe_profile(o, dev, n);
  return p;
}

}  // namespace qtool::runner
