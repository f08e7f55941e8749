// The CPU backend of ops.hpp: activation memory, and the ops other than linear
// (cpu_ops_linear.cpp) and attention (cpu_ops_attention.cpp). Each op loads a row into float32,
// computes MODELS.md's float32 operations in their order, rounding to the output dtype where the
// framework rounds (op by op: ⟦⟧ after every step), and stores the row: in place is safe because
// a row is read whole before it is written.
#include "qtool/runner/cpu_ops.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <new>

#include "cpu_ops_impl.hpp"
#include "qtool/formats/error.hpp"
#include "qtool/runner/activation_stack.hpp"

namespace qtool::runner {

namespace cpu_ops {

void load_row(const Mat& m, int64_t r, float* dst) {
  const uint8_t* p = row_ptr(m, r);
  switch (m.dtype) {
    case DType::BF16:
      for (int64_t c = 0; c < m.cols; ++c) dst[c] = kmath::bf16_bits_to_f32(dq::load_u16(p, c));
      return;
    case DType::F32: std::memcpy(dst, p, static_cast<size_t>(m.cols) * 4); return;
    default:
      for (int64_t c = 0; c < m.cols; ++c) dst[c] = load(m.dtype, p, c);
  }
}

void store_row(const float* src, const Mat& m, int64_t r) {
  uint8_t* p = row_ptr(m, r);
  switch (m.dtype) {
    case DType::BF16:
      for (int64_t c = 0; c < m.cols; ++c) {
        const uint16_t h = kmath::f32_to_bf16_bits(src[c]);
        std::memcpy(p + 2 * c, &h, 2);
      }
      return;
    case DType::F32: std::memcpy(p, src, static_cast<size_t>(m.cols) * 4); return;
    default:
      for (int64_t c = 0; c < m.cols; ++c) store(m.dtype, p, c, src[c]);
  }
}

void for_slots(ThreadPool& pool, size_t n, size_t min_items,
               const std::function<void(size_t, size_t, size_t)>& fn) {
  if (n == 0) return;
  const size_t n_slots = std::max<size_t>(1, std::min(pool.size(), n / std::max<size_t>(1, min_items)));
  if (n_slots == 1) {
    fn(0, 0, n);
    return;
  }
  pool.parallel_for(n_slots, 1, [&](size_t s0, size_t s1) {
    for (size_t s = s0; s < s1; ++s) fn(s, n * s / n_slots, n * (s + 1) / n_slots);
  });
}

}  // namespace cpu_ops

namespace {

using namespace cpu_ops;

constexpr uint64_t kAlign = 256;

// sqrt(2/pi) and GELU's cubic coefficient as float32 (torch's kBeta, kKappa; transformers'
// gelu_new constants enter as the same float32 scalars).
constexpr float kGeluBeta = 0.7978845608028654f;
constexpr float kGeluKappa = 0.044715f;

float silu(float x) { return x / (1.0f + std::exp(-x)); }
float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

float gelu_tanh(float x) {
  const float cube = (x * x) * x;
  const float inner = kGeluBeta * (x + kGeluKappa * cube);
  return (0.5f * x) * (1.0f + std::tanh(inner));
}

// act(x) rounded as the framework rounds it, to dtype dt (one rounding, or op by op).
float activate(Activation act, float x, DType dt) {
  switch (act) {
    case Activation::Identity: return round_to(dt, x);
    case Activation::Silu: return round_to(dt, silu(x));
    case Activation::GeluTanh: return round_to(dt, gelu_tanh(x));
    case Activation::Relu: return x <= 0.0f ? 0.0f : round_to(dt, x);
    case Activation::GeluNew: {
      const float a = round_to(dt, 0.5f * x);
      const float b = round_to(dt, (x * x) * x);
      const float c = round_to(dt, kGeluKappa * b);
      const float d = round_to(dt, x + c);
      const float e = round_to(dt, kGeluBeta * d);
      const float f = round_to(dt, std::tanh(e));
      const float g = round_to(dt, 1.0f + f);
      return round_to(dt, a * g);
    }
    case Activation::QuickGelu: {
      const float a = round_to(dt, 1.702f * x);
      const float s = round_to(dt, sigmoid(a));
      return round_to(dt, x * s);
    }
  }
  return x;
}

// The sum of term(i) over [0, n) in double, in kmath's lane order (the CUDA norm kernel's).
template <typename Term>
double lane_order_sum(int64_t n, const Term& term) {
  double p[kmath::kSumLanes] = {};
  for (int64_t i = 0; i < n; ++i) p[i % kmath::kSumLanes] += term(i);
  for (int off = kmath::kSumLanes / 2; off > 0; off /= 2)
    for (int j = 0; j < off; ++j) p[j] += p[j + off];
  return p[0];
}

// Mean of the squares (float32 squares, summed in double, rounded once).
float mean_square(const float* x, int64_t n) {
  const double s = lane_order_sum(n, [&](int64_t i) { return static_cast<double>(x[i] * x[i]); });
  return static_cast<float>(s / static_cast<double>(n));
}

// Biased mean and variance over n values (double sums, each rounded once to float32).
void mean_var(const float* x, int64_t n, float* mean, float* var) {
  const double mu =
      lane_order_sum(n, [&](int64_t i) { return static_cast<double>(x[i]); }) / static_cast<double>(n);
  const double v = lane_order_sum(n, [&](int64_t i) { return (x[i] - mu) * (x[i] - mu); });
  *mean = static_cast<float>(mu);
  *var = static_cast<float>(v / static_cast<double>(n));
}

float rsqrt(float v) { return 1.0f / std::sqrt(v); }

// The CPU's activation memory: `bytes` (at least 1) aligned to kAlign.
class HostBlock {
 public:
  explicit HostBlock(uint64_t bytes)
      : p_(static_cast<uint8_t*>(::operator new(std::max<uint64_t>(bytes, 1), std::align_val_t(kAlign)))) {}
  void* data() const { return p_.get(); }

 private:
  struct Free {
    void operator()(uint8_t* p) const { ::operator delete(p, std::align_val_t(kAlign)); }
  };
  std::unique_ptr<uint8_t, Free> p_;
};

class CpuOps final : public StackOps<HostBlock> {
 public:
  CpuOps(ThreadPool& pool, uint64_t capacity)
      : StackOps(HostBlock(capacity), capacity, "CPU activation memory"), pool_(pool) {
    const size_t slots = pool.size();
    scratch_.weight_rows.resize(slots);
    scratch_.kv.resize(slots);
    scratch_.scores.resize(slots);
  }

  void upload(const void* host, const Mat& dst) override {
    check_mine(dst);
    const size_t row_bytes = static_cast<size_t>(dst.cols) * dst.elem_bytes();
    for (int64_t r = 0; r < dst.rows; ++r)
      std::memcpy(row_ptr(dst, r), static_cast<const uint8_t*>(host) + r * row_bytes, row_bytes);
  }
  void download(const Mat& src, void* host) override {
    check_mine(src);
    const size_t row_bytes = static_cast<size_t>(src.cols) * src.elem_bytes();
    for (int64_t r = 0; r < src.rows; ++r)
      std::memcpy(static_cast<uint8_t*>(host) + r * row_bytes, row_ptr(src, r), row_bytes);
  }

  void embedding(const Mat& ids, const DequantParams& table, const Mat& out) override;
  void linear(const Mat& x, const DequantParams& weight, const DequantParams* bias, const Mat& out) override {
    check_view(x);
    check_view(out);
    cpu_ops::linear(pool_, scratch_, x, weight, bias, out);
  }
  void rms_norm(const Mat& x, const DequantParams& weight, float eps, RmsRounding rounding, int64_t head_dim,
                const Mat& out) override;
  void layer_norm(const Mat& x, const DequantParams* weight, const DequantParams* bias, float eps,
                  const Mat& out) override;
  void modulate(const Mat& x, const Mat& shift, const Mat& scale, int64_t batch, float eps,
                const Mat& out) override;
  void activation(Activation act, const Mat& x, const Mat& out) override;
  void gated(Activation act, const Mat& gate, const Mat& up, const Mat& out) override;
  void add(const Mat& a, const Mat& b, const Mat& out) override;
  void residual(const Mat& h, const Mat* gate, const Mat& y, int64_t batch, const Mat& out) override;
  void rope(RopeStyle style, const Mat& x, int64_t head_dim, const Mat& cos, const Mat& sin,
            const Mat& out) override;
  void attention(const Mat& q, const Mat& k, const Mat& v, const AttentionShape& shape,
                 const Mat& out) override {
    for (const Mat* m : {&q, &k, &v, &out}) check_view(*m);
    if (shape.bias) check_view(*shape.bias);
    if (shape.key_mask) check_mine(*shape.key_mask);
    cpu_ops::attention(pool_, scratch_, q, k, v, shape, out);
  }
  void copy(const Mat& src, const Mat& dst) override;
  void clamp(const Mat& x, float bound, const Mat& out) override;

 private:
  // Every view an op is given is this ops' memory: on a plan over several "GPUs" each has its own
  // CpuOps, and a forward that kept a view of another's (state the driver did not hand over) is a
  // bug that the CUDA backend would turn into a wrong device's read.
  void check_mine(const Mat& m) const {
    QTOOL_ASSERT_MSG(stack().holds(m), "a view [", m.rows, ", ", m.cols,
                     "] outside this device's ops memory");
  }
  void check_view(const Mat& m) const {
    runner::check_view(m);
    check_mine(m);
  }
  // fn(row, buffers...) over the rows of `rows` in parallel chunks; `n_bufs` float buffers of
  // `width` values each per chunk.
  void for_rows(int64_t rows, int64_t width, int n_bufs,
                const std::function<void(int64_t, float* const*)>& fn);

  ThreadPool& pool_;
  Scratch scratch_;
};

void CpuOps::for_rows(int64_t rows, int64_t width, int n_bufs,
                      const std::function<void(int64_t, float* const*)>& fn) {
  if (rows <= 0) return;
  pool_.parallel_for(static_cast<size_t>(rows), rows_per_chunk(width), [&](size_t r0, size_t r1) {
    std::vector<float> storage(static_cast<size_t>(width) * n_bufs);
    float* bufs[4] = {};
    for (int i = 0; i < n_bufs; ++i) bufs[i] = storage.data() + static_cast<size_t>(width) * i;
    for (size_t r = r0; r < r1; ++r) fn(static_cast<int64_t>(r), bufs);
  });
}

void CpuOps::embedding(const Mat& ids, const DequantParams& table, const Mat& out) {
  check_view(out);
  check_mine(ids);
  QTOOL_ASSERT(ids.dtype == DType::I64 || ids.dtype == DType::I32);
  QTOOL_ASSERT(ids.rows == out.rows && ids.cols == 1 && is_plain(table) &&
               table.cols == static_cast<uint64_t>(out.cols));
  for_rows(out.rows, out.cols, 1, [&](int64_t r, float* const* buf) {
    const uint8_t* p = row_ptr(ids, r);
    int64_t id;
    if (ids.dtype == DType::I64) {
      std::memcpy(&id, p, 8);
    } else {
      int32_t v;
      std::memcpy(&v, p, 4);
      id = v;
    }
    QTOOL_ASSERT_MSG(id >= 0 && static_cast<uint64_t>(id) < table.rows, "token id ", id, " outside [0, ",
                     table.rows, ")");
    const uint64_t base = static_cast<uint64_t>(id) * table.cols;
    for (int64_t c = 0; c < out.cols; ++c) buf[0][c] = weight_value(table, base + c);
    store_row(buf[0], out, r);
  });
}

void CpuOps::rms_norm(const Mat& x, const DequantParams& weight, float eps, RmsRounding rounding,
                      int64_t head_dim, const Mat& out) {
  check_view(x);
  check_view(out);
  check_same_shape(x, out);
  const int64_t group = head_dim > 0 ? head_dim : x.cols;
  QTOOL_ASSERT_MSG(
      group > 0 && x.cols % group == 0 && is_plain(weight) && weight.numel() == static_cast<uint64_t>(group),
      "rms_norm weight of ", weight.numel(), " for groups of ", group);
  const DType dt = out.dtype;
  for_rows(x.rows, x.cols, 1, [&](int64_t r, float* const* buf) {
    float* v = buf[0];
    load_row(x, r, v);
    for (int64_t g0 = 0; g0 < x.cols; g0 += group) {
      const float inv = rsqrt(mean_square(v + g0, group) + eps);
      for (int64_t i = 0; i < group; ++i) {
        const float w = weight_value(weight, static_cast<uint64_t>(i));
        v[g0 + i] = rounding == RmsRounding::Once ? (v[g0 + i] * inv) * w : w * round_to(dt, v[g0 + i] * inv);
      }
    }
    store_row(v, out, r);
  });
}

void CpuOps::layer_norm(const Mat& x, const DequantParams* weight, const DequantParams* bias, float eps,
                        const Mat& out) {
  check_view(x);
  check_view(out);
  check_same_shape(x, out);
  const uint64_t n = static_cast<uint64_t>(x.cols);
  QTOOL_ASSERT(!weight || (is_plain(*weight) && weight->numel() == n));
  QTOOL_ASSERT(!bias || (is_plain(*bias) && bias->numel() == n));
  for_rows(x.rows, x.cols, 1, [&](int64_t r, float* const* buf) {
    float* v = buf[0];
    load_row(x, r, v);
    float mu, var;
    mean_var(v, x.cols, &mu, &var);
    const float inv = rsqrt(var + eps);
    for (uint64_t i = 0; i < n; ++i) {
      float y = (v[i] - mu) * inv;
      if (weight) y = y * weight_value(*weight, i);
      if (bias) y = y + weight_value(*bias, i);
      v[i] = y;
    }
    store_row(v, out, r);
  });
}

void CpuOps::modulate(const Mat& x, const Mat& shift, const Mat& scale, int64_t batch, float eps,
                      const Mat& out) {
  check_view(x);
  check_view(out);
  check_same_shape(x, out);
  check_per_sample(x, shift, batch);
  check_per_sample(x, scale, batch);
  check_mine(shift);
  check_mine(scale);
  const int64_t seq = x.rows / batch;
  const DType dt = out.dtype;
  for_rows(x.rows, x.cols, 3, [&](int64_t r, float* const* buf) {
    float* v = buf[0];
    float* sh = buf[1];
    float* sc = buf[2];
    load_row(x, r, v);
    load_row(shift, r / seq, sh);
    load_row(scale, r / seq, sc);
    float mu, var;
    mean_var(v, x.cols, &mu, &var);
    const float inv = rsqrt(var + eps);
    for (int64_t i = 0; i < x.cols; ++i) {
      const float n = round_to(dt, (v[i] - mu) * inv);
      const float s1 = round_to(dt, 1.0f + sc[i]);
      v[i] = round_to(dt, n * s1) + sh[i];
    }
    store_row(v, out, r);
  });
}

void CpuOps::activation(Activation act, const Mat& x, const Mat& out) {
  check_view(x);
  check_view(out);
  check_same_shape(x, out);
  const DType dt = out.dtype;
  for_rows(x.rows, x.cols, 1, [&](int64_t r, float* const* buf) {
    load_row(x, r, buf[0]);
    for (int64_t i = 0; i < x.cols; ++i) buf[0][i] = activate(act, buf[0][i], dt);
    store_row(buf[0], out, r);
  });
}

void CpuOps::gated(Activation act, const Mat& gate, const Mat& up, const Mat& out) {
  check_view(gate);
  check_view(up);
  check_view(out);
  check_same_shape(gate, out);
  check_same_shape(up, out);
  const DType dt = out.dtype;
  for_rows(out.rows, out.cols, 2, [&](int64_t r, float* const* buf) {
    load_row(gate, r, buf[0]);
    load_row(up, r, buf[1]);
    for (int64_t i = 0; i < out.cols; ++i) buf[0][i] = activate(act, buf[0][i], dt) * buf[1][i];
    store_row(buf[0], out, r);
  });
}

void CpuOps::add(const Mat& a, const Mat& b, const Mat& out) {
  check_view(a);
  check_view(b);
  check_view(out);
  check_same_shape(a, out);
  check_same_shape(b, out);
  for_rows(out.rows, out.cols, 2, [&](int64_t r, float* const* buf) {
    load_row(a, r, buf[0]);
    load_row(b, r, buf[1]);
    for (int64_t i = 0; i < out.cols; ++i) buf[0][i] = buf[0][i] + buf[1][i];
    store_row(buf[0], out, r);
  });
}

void CpuOps::residual(const Mat& h, const Mat* gate, const Mat& y, int64_t batch, const Mat& out) {
  check_view(h);
  check_view(y);
  check_view(out);
  check_same_shape(h, out);
  check_same_shape(y, out);
  if (gate) {
    check_per_sample(h, *gate, batch);
    check_mine(*gate);
  }
  const int64_t seq = gate ? h.rows / batch : 1;
  const DType dt = out.dtype;
  for_rows(out.rows, out.cols, 3, [&](int64_t r, float* const* buf) {
    load_row(h, r, buf[0]);
    load_row(y, r, buf[1]);
    if (gate) {
      load_row(*gate, r / seq, buf[2]);
      for (int64_t i = 0; i < out.cols; ++i) buf[0][i] = buf[0][i] + round_to(dt, buf[2][i] * buf[1][i]);
    } else {
      for (int64_t i = 0; i < out.cols; ++i) buf[0][i] = buf[0][i] + buf[1][i];
    }
    store_row(buf[0], out, r);
  });
}

void CpuOps::rope(RopeStyle style, const Mat& x, int64_t head_dim, const Mat& cos, const Mat& sin,
                  const Mat& out) {
  check_view(x);
  check_view(out);
  check_view(cos);
  check_view(sin);
  check_same_shape(x, out);
  QTOOL_ASSERT_MSG(head_dim > 0 && head_dim % 2 == 0 && x.cols % head_dim == 0, "rope head_dim ", head_dim,
                   " for width ", x.cols);
  QTOOL_ASSERT(cos.rows == x.rows && sin.rows == x.rows && cos.cols == head_dim && sin.cols == head_dim);
  const DType dt = out.dtype;
  const int64_t half = head_dim / 2;
  for_rows(x.rows, std::max(x.cols, head_dim), 4, [&](int64_t r, float* const* buf) {
    float* v = buf[0];
    float* o = buf[1];
    float* c = buf[2];
    float* s = buf[3];
    load_row(x, r, v);
    load_row(cos, r, c);
    load_row(sin, r, s);
    for (int64_t h0 = 0; h0 < x.cols; h0 += head_dim) {
      const float* xh = v + h0;
      float* oh = o + h0;
      if (style == RopeStyle::Adjacent) {
        for (int64_t m = 0; m < head_dim; m += 2) {
          const float a = xh[m] * c[m];
          const float b = (-xh[m + 1]) * s[m];
          oh[m] = a + b;
          const float a1 = xh[m + 1] * c[m + 1];
          const float b1 = xh[m] * s[m + 1];
          oh[m + 1] = a1 + b1;
        }
      } else {
        for (int64_t m = 0; m < head_dim; ++m) {
          const float rot = m < half ? -xh[m + half] : xh[m - half];
          oh[m] = round_to(dt, xh[m] * c[m]) + round_to(dt, rot * s[m]);
        }
      }
    }
    store_row(o, out, r);
  });
}

void CpuOps::copy(const Mat& src, const Mat& dst) {
  check_view(src);
  check_view(dst);
  check_same_shape(src, dst);
  for_rows(src.rows, src.cols, 1, [&](int64_t r, float* const* buf) {
    load_row(src, r, buf[0]);
    store_row(buf[0], dst, r);
  });
}

void CpuOps::clamp(const Mat& x, float bound, const Mat& out) {
  check_view(x);
  check_view(out);
  check_same_shape(x, out);
  for_rows(x.rows, x.cols, 1, [&](int64_t r, float* const* buf) {
    load_row(x, r, buf[0]);
    for (int64_t i = 0; i < x.cols; ++i) {
      const float v = buf[0][i];
      buf[0][i] = v < -bound ? -bound : (v > bound ? bound : v);  // NaN passes through
    }
    store_row(buf[0], out, r);
  });
}

}  // namespace

std::unique_ptr<Ops> make_cpu_ops(ThreadPool& pool, uint64_t capacity_bytes) {
  return std::make_unique<CpuOps>(pool, capacity_bytes);
}

uint64_t linear_weight_rows(uint64_t in) {
  const uint64_t padded = std::max<uint64_t>(8, (in + 7) / 8 * 8);
  return std::clamp<uint64_t>((uint64_t{256} << 10) / (padded * 4), 4, 64) / 2 * 2;
}

uint64_t cpu_scratch_bytes(uint64_t rows, uint64_t in, uint64_t kv_len, uint64_t head_dim, uint64_t threads) {
  const uint64_t in_p = (in + 7) / 8 * 8;
  const uint64_t hd_p = (head_dim + 7) / 8 * 8;
  const uint64_t lin = rows * in_p * 4 + threads * linear_weight_rows(in) * in_p * 4;
  const uint64_t kv_p = (kv_len + 7) / 8 * 8;
  const uint64_t att = threads * (head_dim * kv_p + kv_len * hd_p + 4 * (kv_p + 2 * hd_p)) * 4;
  return lin + att;
}

}  // namespace qtool::runner
