// T5EncoderModel (transformers), MODELS.md §3: the shared embedding, encoder blocks (T5LayerNorm,
// attention without 1/sqrt(d) and with the relative position bias of block 0 shared by every
// block, the (gated) feed-forward), the final norm. fp16 models: the framework keeps `wo` in
// float32, so the residual stream becomes float32 after block 0's feed-forward, and clamps the
// stream while it is fp16 (§3.5).
#include <cmath>
#include <cstring>

#include "model_util.hpp"
#include "models.hpp"
#include "qtool/formats/error.hpp"

namespace qtool::runner::models {

int64_t t5_relative_bucket(int64_t rel, int64_t num_buckets, int64_t max_distance) {
  const int64_t n = num_buckets / 2, e = n / 2;
  const int64_t base = rel > 0 ? n : 0;
  const int64_t a = rel < 0 ? -rel : rel;
  if (a < e) return base + a;
  // fp32 ops as torch computes them; ln(MD / e) is a double constant entering as a float scalar.
  const float ratio = static_cast<float>(a) / static_cast<float>(e);
  float v = std::log(ratio);
  v = v / static_cast<float>(std::log(static_cast<double>(max_distance) / static_cast<double>(e)));
  v = v * static_cast<float>(n - e);
  const int64_t large = e + static_cast<int64_t>(v);
  return base + std::min(n - 1, large);
}

namespace {

using planner::T5EncoderArch;

class T5Forward final : public TokenForward {
 public:
  T5Forward(const T5EncoderArch& arch, DType dtype, std::string config_file)
      : TokenForward(arch, dtype, std::move(config_file),
                     {.architecture = "T5EncoderModel",
                      .vocab = arch.vocab_size,
                      .width = arch.d_model,
                      .output_name = "last_hidden_state",
                      .optional_inputs = {"attention_mask"}}),
        a_(arch),
        act_(activation_of(a_.act)) {
    // h = shared[input_ids] (no scaling; fp16 values, exactly, in an F32 stream)
    add_unit("shared", [this](Ops& ops, WeightSource& w) { embed_tokens(ops, w, "shared.weight"); });
    add_blocks("encoder.block.", a_.n_layers, &T5Forward::block);
    add_unit("encoder.final_layer_norm", [this](Ops& ops, WeightSource& w) {
      out_ = ops.alloc(rows(), a_.d_model, dtype_);
      final_rms_norm(ops, w, "encoder.final_layer_norm.weight", a_.eps, out_);
    });
  }

  void check_inputs(const std::vector<HostTensor>& inputs, int64_t max_tokens) const override {
    const HostTensor& ids = checked_ids(inputs, max_tokens);
    check_token_range(ids, a_.vocab_size);
    check_attention_mask(inputs, ids);
  }

  void begin(Ops& ops, const std::vector<HostTensor>& inputs) override {
    begin_stream(ops, inputs, stream_dtype());
    bias_ = ops.alloc(a_.n_heads * seq_, seq_, dtype_);
    mask_ = upload_key_mask(ops, inputs, batch_, seq_);
  }
  std::vector<Mat*> shared_state() override { return {&h_, &out_, &bias_, &mask_.mat}; }

 private:
  bool f16() const { return dtype_ == DType::F16; }
  // fp16: float32 from block 0's feed-forward on (until then it holds fp16 values exactly).
  DType stream_dtype() const { return f16() ? DType::F32 : dtype_; }

  // Bias[h·T + t, s] = relative_attention_bias.weight[bucket(s − t), h]: a lookup of the bucket
  // ids [T·T] in the [NB, H] table, then each head's column copied into its rows.
  void position_bias(Ops& ops, const DequantParams& table) {
    const size_t m = ops.mark();
    std::vector<int64_t> buckets(static_cast<size_t>(seq_ * seq_));
    for (int64_t t = 0; t < seq_; ++t)
      for (int64_t s = 0; s < seq_; ++s)
        buckets[static_cast<size_t>(t * seq_ + s)] =
            t5_relative_bucket(s - t, a_.num_buckets, a_.max_distance);
    const Mat ids = ops.alloc(seq_ * seq_, 1, DType::I64);
    ops.upload(buckets.data(), ids);
    const Mat looked = ops.alloc(seq_ * seq_, a_.n_heads, dtype_);
    ops.embedding(ids, table, looked);
    for (int64_t h = 0; h < a_.n_heads; ++h) {
      const Mat dst{
          static_cast<uint8_t*>(bias_.data) + static_cast<size_t>(h * seq_ * seq_) * dtype_size(dtype_),
          dtype_, seq_ * seq_, 1, 1};
      ops.copy(looked.cols_view(h, 1), dst);
    }
    ops.release(m);
  }

  // fp16 stream: clamp to ±(65504 − 1000) when it holds an inf, else ±65504 (T5Block).
  void clamp_f16(Ops& ops, const Mat& x) {
    std::vector<uint16_t> raw(static_cast<size_t>(x.rows * x.cols));
    ops.download(x, raw.data());
    bool inf = false;
    for (uint16_t v : raw) inf = inf || (v & 0x7fffu) == 0x7c00u;
    ops.clamp(x, inf ? 65504.0f - 1000.0f : 65504.0f, x);
  }

  void block(int64_t i, Ops& ops, WeightSource& weights) {
    const std::string p = "encoder.block." + std::to_string(i) + ".layer.";
    const int64_t d = a_.d_model, in = a_.inner(), n = rows();
    UnitWeights w(config_file_);
    const DequantParams& ln0 = w.vec(p + "0.layer_norm.weight", d);
    const auto [q, k, v] = w.linears(p + "0.SelfAttention.", {"q", "k", "v"}, d, in, false);
    const Linear o = w.linear(p + "0.SelfAttention.o", in, d, false);
    const DequantParams* rel =
        i == 0 ? &w.mat(p + "0.SelfAttention.relative_attention_bias.weight", a_.num_buckets, a_.n_heads)
               : nullptr;
    const DequantParams& ln1 = w.vec(p + "1.layer_norm.weight", d);
    const std::string ff = p + "1.DenseReluDense.";
    const Linear wi0 = w.linear(ff + (a_.gated ? "wi_0" : "wi"), d, a_.d_ff, false);
    const Linear wi1 = a_.gated ? w.linear(ff + "wi_1", d, a_.d_ff, false) : Linear{};
    const Linear wo = w.linear(ff + "wo", a_.d_ff, d, false);
    w.fetch(weights);
    if (rel) position_bias(ops, *rel);
    const float eps = static_cast<float>(a_.eps);
    // The stream is fp16 (values) until block 0's feed-forward adds the float32 wo output.
    const bool stream16 = f16() && i == 0;

    // Attention: z = RMSh(h); a = SDPA(q, k, v; scale 1, + Bias); h = ⟦h + Lin(a; o)⟧.
    const size_t m = ops.mark();
    const Mat z = ops.alloc(n, d, dtype_);
    const Mat sum16 = stream16 ? ops.alloc(n, d, dtype_) : Mat{};
    const size_t m_attn = ops.mark();
    ops.rms_norm(h_, ln0, eps, RmsRounding::Twice, 0, z);
    const Qkv qkv = project_qkv(ops, z, q, k, v, in, in, dtype_);
    const Mat att = ops.alloc(n, in, dtype_);
    AttentionShape shape = self_attention(batch_, seq_, a_.n_heads, a_.n_heads, a_.d_kv, 1.0f);
    shape.bias = &bias_;
    shape.key_mask = mask_.get();
    ops.attention(qkv.q, qkv.k, qkv.v, shape, att);
    ops.linear(att, *o.weight, nullptr, z);
    if (stream16) {
      ops.residual(h_, nullptr, z, batch_, sum16);
      clamp_f16(ops, sum16);
      ops.copy(sum16, h_);
    } else {
      ops.residual(h_, nullptr, z, batch_, h_);  // fp16: a float32 stream, not clamped
    }
    ops.release(m_attn);

    // FF: z = RMSh(h); u = ⟦act(Lin(z; wi_0)) · Lin(z; wi_1)⟧ (or ⟦act(Lin(z; wi))⟧);
    // h = ⟦h + Lin(u; wo)⟧ (fp16 models: u and wo in float32, the sum in float32).
    ops.rms_norm(h_, ln1, eps, RmsRounding::Twice, 0, z);
    const Mat g = ops.alloc(n, a_.d_ff, dtype_);
    ops.linear(z, *wi0.weight, nullptr, g);
    if (a_.gated) {
      const Mat up = ops.alloc(n, a_.d_ff, dtype_);
      ops.linear(z, *wi1.weight, nullptr, up);
      ops.gated(act_, g, up, g);
    } else {
      ops.activation(act_, g, g);
    }
    if (f16()) {
      const Mat g32 = ops.alloc(n, a_.d_ff, DType::F32);
      const Mat y32 = ops.alloc(n, d, DType::F32);
      ops.copy(g, g32);
      ops.linear(g32, *wo.weight, nullptr, y32);
      ops.residual(h_, nullptr, y32, batch_, h_);
    } else {
      ops.linear(g, *wo.weight, nullptr, z);
      ops.residual(h_, nullptr, z, batch_, h_);
    }
    ops.release(m);
  }

  T5EncoderArch a_;
  Activation act_;
  KeyMask mask_;
  Mat bias_;
};

}  // namespace

std::unique_ptr<Forward> make_t5(const T5EncoderArch& arch, DType dtype, std::string config_file) {
  return std::make_unique<T5Forward>(arch, dtype, std::move(config_file));
}

}  // namespace qtool::runner::models
