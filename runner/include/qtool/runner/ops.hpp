// The op vocabulary of the real forward passes (MODELS.md), which every backend implements: the
// CPU backend (the reference, what CI runs) and the CUDA backend. An architecture's forward
// (forward.hpp) is written once over these ops, like llama.cpp's graph builders over ggml's ops.
//
// Notation as in MODELS.md: ⟦e⟧ = e evaluated in float32 and rounded once (round to nearest even)
// to the output's dtype. Unless an op says otherwise it reads its inputs, widens them to float32,
// computes in float32 and rounds once. Ops that the frameworks compute op by op (each step rounded
// to the model dtype) say so; the CPU backend reproduces those roundings bit for bit, and so must
// every backend, GEMMs and attention aside (their summation order differs between libraries).
//
// Activations are 2-D views (Mat): rows are tokens (batch folded in: row b * seq + t), columns
// are features, row stride `ld` >= cols, so that column slices (one head, one chunk of a
// modulation vector, [a | u] concatenations) are views, not copies. Per-sample vectors (a
// modulation chunk, a gate) are [batch, D] views broadcast over the `seq = rows / batch` rows of
// their sample. Weights are DequantParams bound to the backend's memory (a linear in any scheme,
// or a plain bf16/f16/f32 tensor viewed as [1, n] or [rows, cols]).
#pragma once

#include <cstddef>
#include <cstdint>

#include "qtool/formats/dtype.hpp"
#include "qtool/formats/error.hpp"
#include "qtool/runner/dequant.hpp"

namespace qtool::runner {

// A dense row-major view in the backend's memory. dtype: BF16, F16 or F32 for activations; I64 or
// I32 for token ids.
struct Mat {
  void* data = nullptr;
  DType dtype = DType::BF16;
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t ld = 0;  // elements between the starts of consecutive rows (>= cols)

  size_t elem_bytes() const { return dtype_size(dtype); }
  bool dense() const { return ld == cols; }
  // Columns [c0, c0 + n) of every row, and rows [r0, r0 + n) of every column: views.
  Mat cols_view(int64_t c0, int64_t n) const {
    return {static_cast<uint8_t*>(data) + c0 * elem_bytes(), dtype, rows, n, ld};
  }
  Mat rows_view(int64_t r0, int64_t n) const {
    return {static_cast<uint8_t*>(data) + r0 * ld * elem_bytes(), dtype, n, cols, ld};
  }
};

// The checks every backend's ops make of their arguments (our own invariants: a forward passing
// a bad view is a bug, not bad input).
inline bool is_activation_dtype(DType dt) {
  return dt == DType::BF16 || dt == DType::F16 || dt == DType::F32;
}

inline void check_view(const Mat& m) {
  QTOOL_ASSERT_MSG(is_activation_dtype(m.dtype) && m.rows >= 0 && m.cols >= 0 && m.ld >= m.cols,
                   "activation view [", m.rows, ", ", m.cols, "] ld ", m.ld, " ", dtype_name(m.dtype));
}

inline void check_same_shape(const Mat& a, const Mat& b) {
  QTOOL_ASSERT_MSG(a.rows == b.rows && a.cols == b.cols, "shapes [", a.rows, ", ", a.cols, "] and [", b.rows,
                   ", ", b.cols, "] differ");
}

// A per-sample vector view [batch, cols] for x's rows: row r of x reads row r / (rows / batch).
inline void check_per_sample(const Mat& x, const Mat& vec, int64_t batch) {
  check_view(vec);
  QTOOL_ASSERT_MSG(batch > 0 && x.rows % batch == 0 && vec.rows == batch && vec.cols == x.cols,
                   "per-sample vector [", vec.rows, ", ", vec.cols, "] for [", x.rows, ", ", x.cols,
                   "] batch ", batch);
}

// A plain (unquantized) float tensor: the kinds norms, embeddings and biases accept.
inline bool is_plain(const DequantParams& w) {
  return w.kind == WeightKind::Bf16 || w.kind == WeightKind::F16 || w.kind == WeightKind::F32;
}

// The two RMSNorm roundings of MODELS.md: torch.nn.RMSNorm / F.rms_norm (Flux q/k norms) round
// once, ⟦x·rsqrt(mean(x²)+ε)·w⟧; LlamaRMSNorm and T5LayerNorm round twice, ⟦w·⟦x·rsqrt(mean(x²)+ε)⟧⟧.
enum class RmsRounding : uint8_t { Once, Twice };

// Element-wise activations. Silu and GeluTanh round once; GeluNew (T5's gelu_new) and QuickGelu
// (CLIP) are computed op by op as MODELS.md §0 lists, each step rounded to the output dtype.
enum class Activation : uint8_t { Identity, Silu, GeluTanh, GeluNew, QuickGelu, Relu };

// RoPE pairings (MODELS.md §1.5, §2.4). The tables are [rows, head_dim], one row per row of x.
//   Adjacent (Flux): pairs (2m, 2m+1), tables F32; out = ⟦x·c + (∓x')·s⟧ in float32, one rounding.
//   Halves (Llama): pairs (m, m + hd/2), tables in the model dtype; out = ⟦⟦x·c⟧ + ⟦rot(x)·s⟧⟧.
enum class RopeStyle : uint8_t { Adjacent, Halves };

struct AttentionShape {
  int64_t batch = 1;
  int64_t q_len = 0;   // query tokens per sample (q rows = batch * q_len)
  int64_t kv_len = 0;  // key tokens per sample
  int64_t heads = 0;
  int64_t kv_heads = 0;  // GQA: query head j reads kv head j / (heads / kv_heads)
  int64_t head_dim = 0;
  float scale = 1.0f;   // applied to q·k before the bias and the mask
  bool causal = false;  // key s visible to query t iff s <= t (top-left, q_len == kv_len)
  // Optional additive bias [heads * q_len, kv_len] (T5's relative position bias), shared by the
  // samples, added in float32 after the scale.
  const Mat* bias = nullptr;
  // Optional key padding mask [batch, kv_len] (I64 or I32, 1 keep, 0 drop): a dropped key gets
  // the additive minimum of the model dtype (finfo.min), as transformers does.
  const Mat* key_mask = nullptr;
};

// The ops. Every output is a view the caller allocated (alloc); an op may write its output in
// place of an input of the same shape and dtype where it says so.
class Ops {
 public:
  virtual ~Ops() = default;

  // --- memory: a stack of activation buffers -------------------------------------------------------
  // A dense [rows, cols] buffer from the backend's activation memory (its contents undefined).
  virtual Mat alloc(int64_t rows, int64_t cols, DType dtype) = 0;
  // release(mark()) frees every buffer allocated after the mark.
  virtual size_t mark() const = 0;
  virtual void release(size_t mark) = 0;
  // The most activation bytes held at once since the last reset_peak (what the plan reserves).
  virtual uint64_t peak_bytes() const = 0;
  virtual void reset_peak() = 0;
  // Host <-> backend copies of a whole view (host side dense, rows * cols elements of its dtype).
  virtual void upload(const void* host, const Mat& dst) = 0;
  virtual void download(const Mat& src, void* host) = 0;
  // The digest of a view's elements (driver.hpp's host_digest of its dense bytes: hash and
  // non-finite count) computed where the view is, when the backend can: true and the two values
  // set; false: the caller downloads the view and digests it on the host.
  virtual bool digest(const Mat& m, uint64_t* hash, uint64_t* nonfinite) {
    (void)m, (void)hash, (void)nonfinite;
    return false;
  }

  // --- ops -----------------------------------------------------------------------------------------
  // out[i, :] = table[ids[i], :] (table [vocab, D], plain dtype, converted to out's dtype). ids
  // [n, 1] I64 or I32, each in [0, vocab) (the caller validates them).
  virtual void embedding(const Mat& ids, const DequantParams& table, const Mat& out) = 0;
  // out = ⟦x·Wᵀ + b⟧: W [out, in] dequantized to the activation dtype exactly as the runner's
  // dequant kernels do, products accumulated in float32, bias (plain [out], may be null) added
  // in float32 before the one rounding.
  virtual void linear(const Mat& x, const DequantParams& weight, const DequantParams* bias,
                      const Mat& out) = 0;
  // out = act(linear(x)): the frameworks' two ops, the linear rounded, then `activation`. A backend
  // may apply the activation in the GEMM's epilogue to the float32 sums plus bias, rounding once
  // (the CUDA backend does for GeluTanh through cuBLASLt): the result is then within one rounding
  // of the two ops', the linear's own tolerance.
  virtual void linear_act(Activation act, const Mat& x, const DequantParams& weight,
                          const DequantParams* bias, const Mat& out) {
    linear(x, weight, bias, out);
    if (act != Activation::Identity) activation(act, out, out);
  }
  // RMSNorm over the last dim of every row; `weight` [cols] (or, with head_dim > 0, [head_dim]
  // applied to each head of width head_dim separately: Flux's per-head q/k norms). In place allowed.
  virtual void rms_norm(const Mat& x, const DequantParams& weight, float eps, RmsRounding rounding,
                        int64_t head_dim, const Mat& out) = 0;
  // LayerNorm over the last dim, biased variance, in float32: ⟦(x−μ)·rsqrt(σ²+ε)·γ + β⟧, γ and β
  // optional (null: no affine, LN0 of MODELS.md). In place allowed.
  virtual void layer_norm(const Mat& x, const DequantParams* weight, const DequantParams* bias, float eps,
                          const Mat& out) = 0;
  // Flux's modulated norm: out = ⟦⟦LN0_ε(x) · ⟦1 + scale⟧⟧ + shift⟧ (four roundings, as diffusers
  // computes it), shift and scale per-sample [batch, cols] views.
  virtual void modulate(const Mat& x, const Mat& shift, const Mat& scale, int64_t batch, float eps,
                        const Mat& out) = 0;
  // out = act(x). In place allowed.
  virtual void activation(Activation act, const Mat& x, const Mat& out) = 0;
  // out = ⟦act(gate) · up⟧ (SwiGLU, T5's gated GELU): act rounded as `activation`, then the product
  // rounded once. In place of gate allowed.
  virtual void gated(Activation act, const Mat& gate, const Mat& up, const Mat& out) = 0;
  // out = ⟦a + b⟧ (same shapes). In place allowed.
  virtual void add(const Mat& a, const Mat& b, const Mat& out) = 0;
  // Residual: out = ⟦h + ⟦gate · y⟧⟧ with gate a per-sample [batch, cols] view, or ⟦h + y⟧ when
  // gate is null. In place of h allowed.
  virtual void residual(const Mat& h, const Mat* gate, const Mat& y, int64_t batch, const Mat& out) = 0;
  // RoPE over every head of width head_dim of x (cols = heads * head_dim). In place allowed.
  virtual void rope(RopeStyle style, const Mat& x, int64_t head_dim, const Mat& cos, const Mat& sin,
                    const Mat& out) = 0;
  // out = SDPA(q, k, v): per sample and head, softmax(scale·q·kᵀ + bias + mask)·v with float32
  // scores, softmax and accumulation, rounded once; never materialises more than a few rows of
  // scores per thread. q [batch*q_len, heads*hd], k and v [batch*kv_len, kv_heads*hd], out like q.
  virtual void attention(const Mat& q, const Mat& k, const Mat& v, const AttentionShape& shape,
                         const Mat& out) = 0;
  // dst = src converted to dst's dtype (rounded once); same shape, any strides. Concatenation and
  // splitting of token or feature ranges are copies between views.
  virtual void copy(const Mat& src, const Mat& dst) = 0;
  // out = clamp(x, -bound, bound) (fp16 models: Flux's ±65504 clip, T5's clamp). In place allowed.
  virtual void clamp(const Mat& x, float bound, const Mat& out) = 0;
};

}  // namespace qtool::runner
