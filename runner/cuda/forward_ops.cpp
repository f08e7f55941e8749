// The CUDA backend of ops.hpp (the entries; kernels and launchers in forward_kernels.cu): checks
// of the views, the activation stack (activation_stack.hpp) in one device allocation, and linear
// through the runner's dequant kernels and cuBLASLt (matmul_lt.hpp; cuBLAS where it has no
// algorithm).
#include <algorithm>
#include <cstdlib>
#include <string>

#include "attention_cudnn.hpp"
#include "forward_args.hpp"
#include "forward_kernels.hpp"
#include "matmul_lt.hpp"
#include "op_times.hpp"
#include "qtool/formats/error.hpp"
#include "qtool/runner/activation_stack.hpp"
#include "qtool/runner/cuda_forward_ops.hpp"
#include "qtool/runner/cuda_ops.hpp"
#include "qtool/runner/cuda_resources.hpp"

namespace qtool::runner {

namespace {

namespace fwd = cuda::fwd;
using fwd::view;

int dt_code(DType dt) {
  switch (dt) {
    case DType::BF16: return fwd::kBf16;
    case DType::F16: return fwd::kF16;
    default: return fwd::kF32;
  }
}

float finfo_min(DType dt) {
  switch (dt) {
    case DType::BF16: return kmath::bf16_bits_to_f32(0xFF7Fu);
    case DType::F16: return -65504.0f;
    default: return -3.4028234663852886e38f;
  }
}

cudaDataType cuda_type(DType dt) {
  switch (dt) {
    case DType::BF16: return CUDA_R_16BF;
    case DType::F16: return CUDA_R_16F;
    default: return CUDA_R_32F;
  }
}

}  // namespace

fwd::View fwd::view(const Mat& m) {
  check_view(m);
  return {m.data, dt_code(m.dtype), m.rows, m.cols, m.ld};
}

fwd::AttnArgs fwd::attention_args(const Mat& q, const Mat& k, const Mat& v, const AttentionShape& s,
                                  const Mat& out) {
  AttnArgs a;
  a.q = view(q);
  a.k = view(k);
  a.v = view(v);
  a.out = view(out);
  a.batch = s.batch;
  a.q_len = s.q_len;
  a.kv_len = s.kv_len;
  a.heads = s.heads;
  a.kv_heads = s.kv_heads;
  a.head_dim = s.head_dim;
  a.scale = s.scale;
  a.causal = s.causal;
  if (s.bias) a.bias = view(*s.bias);
  if (s.key_mask) {
    a.mask = s.key_mask->data;
    a.mask_i64 = s.key_mask->dtype == DType::I64;
    a.mask_ld = s.key_mask->ld;
    a.mask_value = finfo_min(q.dtype);
  }
  return a;
}

namespace {

class CudaOps final : public StackOps<cuda::DeviceBuffer> {
 public:
  CudaOps(int device, cudaStream_t stream, const CudaOpsConfig& config)
      : StackOps(cuda::DeviceBuffer(device, std::max<uint64_t>(config.activation_bytes, 1)),
                 config.activation_bytes, str_cat("GPU ", device, " activation memory")),
        device_(device),
        stream_(stream),
        config_(config),
        tables_mem_(device, cuda::kDeviceTablesBytes + kDigestBytes),
        cudnn_attention_(device, stream) {
    if (config.dequant_scratch_bytes) scratch_ = cuda::DeviceBuffer(device, config.dequant_scratch_bytes);
    if (const char* e = std::getenv("QTOOL_GEMM")) {
      const std::string v = e;
      if (v != "cublaslt" && v != "cublas")
        fail(ErrorKind::InvalidInput, "environment variable QTOOL_GEMM=", v, ": expected cublaslt or cublas");
      if (v == "cublas") config_.cublaslt = false;
    }
    cuda::DeviceScope scope(device_);
    tables_ = cuda::upload_tables(tables_mem_.data(), stream_);
    max_norm_cols_ = fwd::max_norm_cols(device_);
  }

  void upload(const void* host, const Mat& dst) override {
    const size_t row_bytes = static_cast<size_t>(dst.cols) * dst.elem_bytes();
    if (dst.rows == 0 || row_bytes == 0) return;
    cuda::DeviceScope scope(device_);
    QTOOL_CUDA_CHECK(cudaMemcpy2DAsync(dst.data, static_cast<size_t>(dst.ld) * dst.elem_bytes(), host,
                                       row_bytes, row_bytes, static_cast<size_t>(dst.rows),
                                       cudaMemcpyHostToDevice, stream_));
    QTOOL_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }
  void download(const Mat& src, void* host) override {
    const size_t row_bytes = static_cast<size_t>(src.cols) * src.elem_bytes();
    if (src.rows == 0 || row_bytes == 0) return;
    cuda::DeviceScope scope(device_);
    QTOOL_CUDA_CHECK(cudaMemcpy2DAsync(host, row_bytes, src.data,
                                       static_cast<size_t>(src.ld) * src.elem_bytes(), row_bytes,
                                       static_cast<size_t>(src.rows), cudaMemcpyDeviceToHost, stream_));
    QTOOL_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }

  bool digest(const Mat& m, uint64_t* hash, uint64_t* nonfinite) override {
    if (m.dtype != DType::BF16 && m.dtype != DType::F16 && m.dtype != DType::F32) return false;
    cuda::DeviceScope scope(device_);
    // Two sums after the code tables, in their allocation (kDeviceTablesBytes is a multiple of 16).
    auto* sums = reinterpret_cast<unsigned long long*>(static_cast<uint8_t*>(tables_mem_.data()) +
                                                       cuda::kDeviceTablesBytes);
    QTOOL_CUDA_CHECK(cudaMemsetAsync(sums, 0, 2 * sizeof(unsigned long long), stream_));
    const bool dense_bf16 =
        m.dtype == DType::BF16 && m.ld == m.cols && (reinterpret_cast<uintptr_t>(m.data) & 15u) == 0;
    if (dense_bf16)
      cuda::accumulate_digest(static_cast<const uint16_t*>(m.data), static_cast<uint64_t>(m.rows * m.cols),
                              sums, stream_);
    else
      cuda::accumulate_digest_view(m.data, m.dtype == DType::F32 ? 32 : 16, m.dtype == DType::F16, m.rows,
                                   m.cols, m.ld, sums, stream_);
    unsigned long long host[2] = {0, 0};
    QTOOL_CUDA_CHECK(cudaMemcpyAsync(host, sums, sizeof(host), cudaMemcpyDeviceToHost, stream_));
    QTOOL_CUDA_CHECK(cudaStreamSynchronize(stream_));
    *hash = host[0];
    *nonfinite = host[1];
    return true;
  }

  void embedding(const Mat& ids, const DequantParams& table, const Mat& out) override {
    QTOOL_ASSERT(ids.dtype == DType::I64 || ids.dtype == DType::I32);
    QTOOL_ASSERT(ids.rows == out.rows && ids.cols == 1 && is_plain(table) &&
                 table.cols == static_cast<uint64_t>(out.cols));
    cuda::DeviceScope scope(device_);
    cuda::OpTimes::Span span(times_, "embedding", stream_);
    fwd::launch_embedding(ids.data, ids.dtype == DType::I64, ids.ld, table, view(out), stream_);
  }

  void linear(const Mat& x, const DequantParams& weight, const DequantParams* bias, const Mat& out) override {
    linear_act(Activation::Identity, x, weight, bias, out);
  }
  void linear_act(Activation act, const Mat& x, const DequantParams& weight, const DequantParams* bias,
                  const Mat& out) override;

  void rms_norm(const Mat& x, const DequantParams& weight, float eps, RmsRounding rounding, int64_t head_dim,
                const Mat& out) override {
    check_same_shape(x, out);
    const int64_t group = head_dim > 0 ? head_dim : x.cols;
    QTOOL_ASSERT_MSG(group > 0 && x.cols % group == 0 && is_plain(weight) &&
                         weight.numel() == static_cast<uint64_t>(group),
                     "rms_norm weight of ", weight.numel(), " for groups of ", group);
    norm(rounding == RmsRounding::Once ? 0 : 1, x, &weight, nullptr, group, eps, nullptr, nullptr, 1, out);
  }
  void layer_norm(const Mat& x, const DequantParams* weight, const DequantParams* bias, float eps,
                  const Mat& out) override {
    check_same_shape(x, out);
    const uint64_t n = static_cast<uint64_t>(x.cols);
    QTOOL_ASSERT(!weight || (is_plain(*weight) && weight->numel() == n));
    QTOOL_ASSERT(!bias || (is_plain(*bias) && bias->numel() == n));
    norm(2, x, weight, bias, x.cols, eps, nullptr, nullptr, 1, out);
  }
  void modulate(const Mat& x, const Mat& shift, const Mat& scale, int64_t batch, float eps,
                const Mat& out) override {
    check_same_shape(x, out);
    check_per_sample(x, shift, batch);
    check_per_sample(x, scale, batch);
    norm(3, x, nullptr, nullptr, x.cols, eps, &shift, &scale, x.rows / batch, out);
  }
  void activation(Activation act, const Mat& x, const Mat& out) override {
    check_same_shape(x, out);
    elementwise(fwd::Ew::Activation, static_cast<int>(act), x, nullptr, nullptr, 1, 0.0f, out);
  }
  void gated(Activation act, const Mat& gate, const Mat& up, const Mat& out) override {
    check_same_shape(gate, out);
    check_same_shape(up, out);
    elementwise(fwd::Ew::Gated, static_cast<int>(act), gate, &up, nullptr, 1, 0.0f, out);
  }
  void add(const Mat& a, const Mat& b, const Mat& out) override {
    check_same_shape(a, out);
    check_same_shape(b, out);
    elementwise(fwd::Ew::Add, 0, a, &b, nullptr, 1, 0.0f, out);
  }
  void residual(const Mat& h, const Mat* gate, const Mat& y, int64_t batch, const Mat& out) override {
    check_same_shape(h, out);
    check_same_shape(y, out);
    if (gate) check_per_sample(h, *gate, batch);
    elementwise(gate ? fwd::Ew::ResidualGated : fwd::Ew::Residual, 0, h, &y, gate, gate ? h.rows / batch : 1,
                0.0f, out);
  }
  void rope(RopeStyle style, const Mat& x, int64_t head_dim, const Mat& cos, const Mat& sin,
            const Mat& out) override {
    check_same_shape(x, out);
    QTOOL_ASSERT_MSG(head_dim > 0 && head_dim % 2 == 0 && x.cols % head_dim == 0, "rope head_dim ", head_dim,
                     " for width ", x.cols);
    QTOOL_ASSERT(cos.rows == x.rows && sin.rows == x.rows && cos.cols == head_dim && sin.cols == head_dim);
    cuda::DeviceScope scope(device_);
    cuda::OpTimes::Span span(times_, "rope", stream_);
    fwd::launch_rope(style == RopeStyle::Adjacent, view(x), head_dim, view(cos), view(sin), view(out),
                     stream_);
  }
  void attention(const Mat& q, const Mat& k, const Mat& v, const AttentionShape& shape,
                 const Mat& out) override;
  void copy(const Mat& src, const Mat& dst) override {
    check_same_shape(src, dst);
    elementwise(fwd::Ew::Copy, 0, src, nullptr, nullptr, 1, 0.0f, dst);
  }
  void clamp(const Mat& x, float bound, const Mat& out) override {
    check_same_shape(x, out);
    elementwise(fwd::Ew::Clamp, 0, x, nullptr, nullptr, 1, bound, out);
  }

 private:
  void elementwise(fwd::Ew op, int act, const Mat& a, const Mat* b, const Mat* g, int64_t seq, float bound,
                   const Mat& out) {
    cuda::DeviceScope scope(device_);
    cuda::OpTimes::Span span(times_, "elementwise", stream_);
    const fwd::View none{};
    fwd::launch_elementwise(op, act, view(a), b ? view(*b) : none, g ? view(*g) : none, seq, bound, view(out),
                            stream_);
  }
  void norm(int mode, const Mat& x, const DequantParams* w, const DequantParams* b, int64_t group, float eps,
            const Mat* shift, const Mat* scale, int64_t seq, const Mat& out) {
    if (x.cols + 2 * (x.cols / std::max<int64_t>(group, 1)) > 3 * max_norm_cols_)
      fail(ErrorKind::InvalidInput, "GPU norm: rows of ", x.cols, " columns exceed the ", max_norm_cols_,
           " a block's shared memory holds on device ", device_);
    cuda::DeviceScope scope(device_);
    cuda::OpTimes::Span span(times_, "norm", stream_);
    const fwd::View none{};
    fwd::launch_norm(mode, view(x), w, b, group, eps, shift ? view(*shift) : none,
                     scale ? view(*scale) : none, seq, view(out), stream_);
  }
  // The GEMMs' workspace, shared by cuBLAS and cuBLASLt (one stream: never used concurrently).
  void* workspace() {
    if (!workspace_.data()) workspace_ = cuda::DeviceBuffer(device_, config_.cublas_workspace_bytes);
    return workspace_.data();
  }
  const cuda::CublasHandle& cublas() {
    if (!cublas_.get()) {
      cublas_ = cuda::CublasHandle(device_);
      cublas_.set_stream(stream_);
      cublas_.set_workspace(workspace(), workspace_.size());
    }
    return cublas_;
  }
  cuda::LtMatmul& lt() {
    if (!lt_) lt_ = std::make_unique<cuda::LtMatmul>(device_, stream_, workspace(), workspace_.size());
    return *lt_;
  }
  // The old path of linear: cuBLAS's GEMM, the bias broadcast into the output first (beta = 1) or
  // added to an fp32 accumulator by our kernel.
  void linear_cublas(const Mat& x, const void* w, const DequantParams* bias, const Mat& out);

  int device_;
  cudaStream_t stream_;
  CudaOpsConfig config_;
  cuda::DeviceBuffer scratch_;  // linear's dequantized weight (a larger one takes the stack)
  static constexpr size_t kDigestBytes = 2 * sizeof(unsigned long long);
  cuda::DeviceBuffer tables_mem_;
  cuda::DeviceTables tables_;
  cuda::DeviceBuffer workspace_;
  cuda::CublasHandle cublas_;
  std::unique_ptr<cuda::LtMatmul> lt_;
  int64_t max_norm_cols_ = 0;
  // cuDNN's attention plans per shape (attention_cudnn.hpp).
  cuda::CudnnAttention cudnn_attention_;
  cuda::OpTimes times_;  // declared last: destroyed first, while the stream still exists
};

// The dtype of a plain weight (a bias), or I8 (not plain).
DType plain_dtype(const DequantParams& w) {
  switch (w.kind) {
    case WeightKind::Bf16: return DType::BF16;
    case WeightKind::F16: return DType::F16;
    case WeightKind::F32: return DType::F32;
    default: return DType::I8;
  }
}

void CudaOps::linear_act(Activation act, const Mat& x, const DequantParams& weight, const DequantParams* bias,
                         const Mat& out) {
  check_view(x);
  check_view(out);
  QTOOL_ASSERT_MSG(x.dtype == out.dtype && x.rows == out.rows &&
                       weight.cols == static_cast<uint64_t>(x.cols) &&
                       weight.rows == static_cast<uint64_t>(out.cols),
                   "linear: x [", x.rows, ", ", x.cols, "] ", dtype_name(x.dtype), ", weight [", weight.rows,
                   ", ", weight.cols, "], out [", out.rows, ", ", out.cols, "] ", dtype_name(out.dtype));
  QTOOL_ASSERT_MSG(!bias || (is_plain(*bias) && bias->numel() == weight.rows), "linear: bias of ",
                   bias ? bias->numel() : 0, " for ", weight.rows, " outputs");
  if (out.rows == 0 || out.cols == 0) return;
  cuda::DeviceScope scope(device_);
  const size_t m = mark();
  const int64_t in = x.cols, n_out = out.cols, tokens = x.rows;
  // W in the activation dtype, exactly as the runner's dequant kernels give it: in the dequant
  // scratch (the plan's dequant_scratch item) when it fits, else on the activation stack.
  const void* w = weight.weight;
  if (weight.kind != (x.dtype == DType::BF16  ? WeightKind::Bf16
                      : x.dtype == DType::F16 ? WeightKind::F16
                                              : WeightKind::F32)) {
    const uint64_t w_bytes = static_cast<uint64_t>(n_out) * static_cast<uint64_t>(in) * dtype_size(x.dtype);
    void* wbuf = w_bytes <= scratch_.size() ? scratch_.data() : alloc(n_out, in, x.dtype).data;
    cuda::OpTimes::Span span(times_, "linear: dequant", stream_);
    if (x.dtype == DType::BF16) {
      cuda::dequantize_to_bf16(weight, tables_, static_cast<uint16_t*>(wbuf), stream_);
    } else {
      const cuda::CodeTables t = cuda::code_tables(weight, tables_);
      fwd::launch_dequant_generic(weight, t.code, t.nested, dt_code(x.dtype), wbuf, stream_);
    }
    w = wbuf;
  }
  // cuBLASLt writes the output once: the bias (in the output's dtype) and GELU-tanh in its
  // epilogue, on the float32 sums before their one rounding. A bias of another dtype, or a case
  // cuBLASLt has no algorithm for, takes cuBLAS's GEMM and the activation kernel.
  bool done = false, activated = act == Activation::Identity;
  if (config_.cublaslt && in > 0 && (!bias || plain_dtype(*bias) == out.dtype)) {
    cuda::OpTimes::Span span(
        times_, act == Activation::GeluTanh ? "linear: gemm + bias + gelu" : "linear: gemm + bias", stream_);
    cuda::LtGemm g;
    g.m = n_out;
    g.n = tokens;
    g.k = in;
    g.ab = g.d = cuda_type(x.dtype);
    g.a = w;
    g.lda = in;
    g.b = x.data;
    g.ldb = x.ld;
    g.out = out.data;
    g.ldd = out.ld;
    g.bias = bias ? bias->weight : nullptr;
    // Not for float32 models: cuBLASLt's GELU (fast intrinsics, up to about 2^-9 relative) would
    // be far outside a float32 rounding of the CPU's.
    if (act == Activation::GeluTanh && x.dtype != DType::F32) {
      g.act = cuda::LtActivation::GeluTanh;
      done = activated = lt().run(g);
      g.act = cuda::LtActivation::None;
    }
    if (!done) done = lt().run(g);
  }
  if (!done) linear_cublas(x, w, bias, out);
  release(m);
  if (!activated) activation(act, out, out);
}

void CudaOps::linear_cublas(const Mat& x, const void* w, const DequantParams* bias, const Mat& out) {
  const int64_t in = x.cols, n_out = out.cols, tokens = x.rows;
  const size_t m = mark();
  // Without a bias, or with one in the output's dtype (exact there), cuBLAS writes the output
  // itself: the bias broadcast into it first and added by the GEMM's epilogue (beta = 1) to the
  // float32 sums before their one rounding. Otherwise an fp32 accumulator on the stack, and the
  // bias added before the rounding by a kernel of our own.
  cuda::OpTimes::Span span(times_, "linear: gemm + bias (cuBLAS)", stream_);
  const bool direct = !bias || plain_dtype(*bias) == out.dtype;
  Mat acc = out;
  if (!direct) acc = alloc(tokens, n_out, DType::F32);
  const float alpha = 1.0f;
  float beta = 0.0f;
  if (direct && bias) {
    const fwd::View none{};
    const fwd::View row{const_cast<uint8_t*>(bias->weight), dt_code(out.dtype), out.rows, out.cols, 0};
    fwd::launch_elementwise(fwd::Ew::Copy, 0, row, none, none, 1, 0.0f, view(out), stream_);
    beta = 1.0f;
  }
  if (in == 0) {
    if (!(direct && bias))
      QTOOL_CUDA_CHECK(cudaMemset2DAsync(acc.data, static_cast<size_t>(acc.ld) * acc.elem_bytes(), 0,
                                         static_cast<size_t>(n_out) * acc.elem_bytes(),
                                         static_cast<size_t>(tokens), stream_));
  } else {
    // Column-major: ACC^T [out, tokens] = W [out, in] (col-major [in, out], op T) * X^T [in, tokens] (ld
    // x.ld). F32 activations use plain fp32 GEMM (CUBLAS_COMPUTE_32F, no TF32).
    const cuda::CublasHandle& h = cublas();
    QTOOL_CUBLAS_CHECK(cuda::cublas().gemm_ex(
        h.get(), CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n_out), static_cast<int>(tokens),
        static_cast<int>(in), &alpha, w, cuda_type(x.dtype), static_cast<int>(in), x.data, cuda_type(x.dtype),
        static_cast<int>(x.ld), &beta, acc.data, cuda_type(acc.dtype), static_cast<int>(acc.ld),
        CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  }
  if (!direct) fwd::launch_bias_round(static_cast<const float*>(acc.data), bias, view(out), stream_);
  release(m);
}

void CudaOps::attention(const Mat& q, const Mat& k, const Mat& v, const AttentionShape& s, const Mat& out) {
  check_same_shape(q, out);
  QTOOL_ASSERT_MSG(s.batch > 0 && s.heads > 0 && s.kv_heads > 0 && s.heads % s.kv_heads == 0 &&
                       s.head_dim > 0 && s.head_dim <= 256 && q.rows == s.batch * s.q_len &&
                       q.cols == s.heads * s.head_dim && k.rows == s.batch * s.kv_len &&
                       k.cols == s.kv_heads * s.head_dim && v.rows == k.rows && v.cols == k.cols &&
                       q.dtype == k.dtype && q.dtype == v.dtype && (!s.causal || s.q_len == s.kv_len),
                   "attention: q [", q.rows, ", ", q.cols, "] k [", k.rows, ", ", k.cols, "] heads ", s.heads,
                   "/", s.kv_heads, " head_dim ", s.head_dim, " (at most 256)");
  QTOOL_ASSERT(!s.bias || (s.bias->rows == s.heads * s.q_len && s.bias->cols == s.kv_len));
  QTOOL_ASSERT(!s.key_mask || ((s.key_mask->dtype == DType::I64 || s.key_mask->dtype == DType::I32) &&
                               s.key_mask->rows == s.batch && s.key_mask->cols == s.kv_len));
  const fwd::AttnArgs a = fwd::attention_args(q, k, v, s, out);
  cuda::DeviceScope scope(device_);
  cuda::OpTimes::Span span(times_, "attention", stream_);
  // cuDNN's fused kernel where it takes the case (its workspace, if any, on the activation stack),
  // else ours.
  const size_t m = mark();
  const bool by_cudnn = cuda::run_attention(cudnn_attention_, a, stream_, [this](uint64_t bytes) -> void* {
    try {
      return alloc(1, static_cast<int64_t>(bytes), DType::U8).data;
    } catch (const Error& e) {
      if (e.kind() != ErrorKind::InvalidInput) throw;
      return nullptr;  // the stack cannot give it: our kernel serves the call
    }
  });
  span.rename(!by_cudnn                                                ? "attention: own kernel"
              : a.out.ld == a.heads * a.head_dim && a.q.ld == a.out.ld ? "attention: cuDNN"
                                                                       : "attention: cuDNN, strided");
  release(m);
}

}  // namespace

std::unique_ptr<Ops> make_cuda_ops(int device, cudaStream_t stream, const CudaOpsConfig& config) {
  return std::make_unique<CudaOps>(device, stream, config);
}

std::unique_ptr<Ops> make_cuda_ops(int device, cudaStream_t stream, uint64_t capacity_bytes) {
  CudaOpsConfig config;
  config.activation_bytes = capacity_bytes;
  return make_cuda_ops(device, stream, config);
}

}  // namespace qtool::runner
