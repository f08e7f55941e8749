// LlamaForCausalLM (transformers), MODELS.md §2: embeddings, decoder layers (RMSNorm, GQA
// attention with halves RoPE and a causal mask, SwiGLU MLP), the final norm and the head.
#include <cmath>
#include <cstring>

#include "model_util.hpp"
#include "models.hpp"
#include "qtool/formats/error.hpp"

namespace qtool::runner::models {
namespace {

using planner::LlamaArch;

class LlamaForward final : public StagedForward {
 public:
  LlamaForward(const LlamaArch& arch, DType dtype, std::string config_file)
      : arch_(arch), a_(arch), dtype_(dtype), config_file_(std::move(config_file)) {
    units_.push_back("model.embed_tokens");
    for (int64_t i = 0; i < a_.n_layers; ++i) units_.push_back("model.layers." + std::to_string(i));
    units_.push_back("model.norm");
    units_.push_back("lm_head");
    inv_freq_ = llama_inv_freq(a_);
  }

  std::string architecture() const override { return "LlamaForCausalLM"; }
  const std::vector<std::string>& units() const override { return units_; }
  const planner::Arch& arch() const override { return arch_; }

  std::vector<InputSpec> input_specs(int64_t batch, int64_t tokens) const override {
    return {{"input_ids", {DType::I64, DType::I32}, {batch, tokens}, false},
            {"position_ids", {DType::I64, DType::I32}, {batch, tokens}, true}};
  }

  std::vector<HostTensor> random_inputs(int64_t batch, int64_t tokens, uint64_t seed) const override {
    Rng rng(seed);
    std::vector<int64_t> ids(static_cast<size_t>(batch * tokens));
    for (int64_t& v : ids) v = static_cast<int64_t>(rng.next() % static_cast<uint64_t>(a_.vocab_size));
    HostTensor t{"input_ids", DType::I64, {batch, tokens}, std::vector<uint8_t>(ids.size() * 8)};
    std::memcpy(t.bytes.data(), ids.data(), t.bytes.size());
    return {std::move(t)};
  }

  void check_inputs(const std::vector<HostTensor>& inputs, int64_t max_tokens) const override {
    check_against(inputs, input_specs(-1, -1));
    const HostTensor& ids = *find_input(inputs, "input_ids");
    if (ids.shape[1] > max_tokens)
      fail(ErrorKind::InvalidInput, "input 'input_ids' has ", ids.shape[1], " tokens; the plan was made for ",
           max_tokens);
    for (int64_t v : ints_of(ids))
      if (v < 0 || v >= a_.vocab_size)
        fail(ErrorKind::InvalidInput, "input 'input_ids' holds token id ", v, ", outside the vocabulary [0, ",
             a_.vocab_size, ")");
    if (const HostTensor* pos = find_input(inputs, "position_ids")) {
      if (pos->shape != ids.shape)
        fail(ErrorKind::InvalidInput, "input 'position_ids' has shape ", shape_str(pos->shape),
             "; 'input_ids' has ", shape_str(ids.shape));
      for (int64_t v : ints_of(*pos))
        if (v < 0 || v > (int64_t{1} << 24))
          fail(ErrorKind::InvalidInput, "input 'position_ids' holds position ", v, ", outside [0, 2^24]");
    }
  }

  void begin(Ops& ops, const std::vector<HostTensor>& inputs) override {
    const HostTensor& ids = *find_input(inputs, "input_ids");
    batch_ = ids.shape[0];
    seq_ = ids.shape[1];
    ids_ = ids;
    const int64_t n = batch_ * seq_;
    std::vector<int64_t> positions(static_cast<size_t>(n));
    if (const HostTensor* pos = find_input(inputs, "position_ids")) {
      positions = ints_of(*pos);
    } else {
      for (int64_t r = 0; r < n; ++r) positions[static_cast<size_t>(r)] = r % seq_;
    }
    std::vector<uint8_t> cos, sin;
    llama_rope_tables(inv_freq_, positions, dtype_, cos, sin);
    h_ = ops.alloc(n, a_.hidden_size, dtype_);
    cos_ = ops.alloc(n, a_.head_dim, dtype_);
    sin_ = ops.alloc(n, a_.head_dim, dtype_);
    ops.upload(cos.data(), cos_);
    ops.upload(sin.data(), sin_);
  }

  void run_unit(size_t unit, Ops& ops, WeightSource& weights) override {
    QTOOL_ASSERT(unit < units_.size());
    if (unit == 0) return embed(ops, weights);
    if (unit == units_.size() - 2) return final_norm(ops, weights);
    if (unit == units_.size() - 1) return head(ops, weights);
    layer(static_cast<int64_t>(unit - 1), ops, weights);
  }

  std::vector<HostTensor> stages(Ops& ops, size_t unit) override {
    if (unit == 0 || unit == units_.size() - 1) return {};
    HostTensor t{units_[unit], dtype_, {batch_, seq_, a_.hidden_size}, {}};
    download_rows(ops, h_, 0, rows(), t);
    return {std::move(t)};
  }

  std::vector<std::string> output_names() const override { return {"logits"}; }

  HostTensor output(Ops& ops) override {
    std::vector<uint8_t> raw(static_cast<size_t>(logits_.rows * logits_.cols) * dtype_size(dtype_));
    ops.download(logits_, raw.data());
    HostTensor out{"logits", DType::F32, {batch_, seq_, a_.vocab_size}, {}};
    out.bytes.resize(static_cast<size_t>(logits_.rows * logits_.cols) * 4);
    convert_to_f32(dtype_, raw.data(), reinterpret_cast<float*>(out.bytes.data()),
                   static_cast<size_t>(logits_.rows * logits_.cols));
    return out;
  }

 private:
  int64_t rows() const { return batch_ * seq_; }

  // h = embed_tokens[input_ids]
  void embed(Ops& ops, WeightSource& weights) {
    UnitWeights w(config_file_);
    const DequantParams& table = w.mat("model.embed_tokens.weight", a_.vocab_size, a_.hidden_size);
    w.fetch(weights);
    const size_t m = ops.mark();
    const Mat ids = ops.alloc(rows(), 1, ids_.dtype);
    ops.upload(ids_.bytes.data(), ids);
    ops.embedding(ids, table, h_);
    ops.release(m);
  }

  void layer(int64_t i, Ops& ops, WeightSource& weights) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    const int64_t d = a_.hidden_size, q_cols = a_.n_heads * a_.head_dim,
                  kv_cols = a_.n_kv_heads * a_.head_dim;
    UnitWeights w(config_file_);
    const DequantParams& in_norm = w.vec(p + "input_layernorm.weight", d);
    const Linear q_proj = w.linear(p + "self_attn.q_proj", d, q_cols, a_.attention_bias);
    const Linear k_proj = w.linear(p + "self_attn.k_proj", d, kv_cols, a_.attention_bias);
    const Linear v_proj = w.linear(p + "self_attn.v_proj", d, kv_cols, a_.attention_bias);
    const Linear o_proj = w.linear(p + "self_attn.o_proj", q_cols, d, a_.attention_bias);
    const DequantParams& post_norm = w.vec(p + "post_attention_layernorm.weight", d);
    const Linear gate_proj = w.linear(p + "mlp.gate_proj", d, a_.intermediate_size, a_.mlp_bias);
    const Linear up_proj = w.linear(p + "mlp.up_proj", d, a_.intermediate_size, a_.mlp_bias);
    const Linear down_proj = w.linear(p + "mlp.down_proj", a_.intermediate_size, d, a_.mlp_bias);
    w.fetch(weights);
    const float eps = static_cast<float>(a_.rms_norm_eps);
    const int64_t n = rows();

    // Attention: z = RMSh(h); q, k, v; RoPE on q and k; causal GQA; h = ⟦h + o_proj(a)⟧.
    const size_t m = ops.mark();
    const Mat z = ops.alloc(n, d, dtype_);
    const size_t m_attn = ops.mark();
    ops.rms_norm(h_, in_norm, eps, RmsRounding::Twice, 0, z);
    const Mat q = ops.alloc(n, q_cols, dtype_);
    const Mat k = ops.alloc(n, kv_cols, dtype_);
    const Mat v = ops.alloc(n, kv_cols, dtype_);
    ops.linear(z, *q_proj.weight, q_proj.bias, q);
    ops.linear(z, *k_proj.weight, k_proj.bias, k);
    ops.linear(z, *v_proj.weight, v_proj.bias, v);
    ops.rope(RopeStyle::Halves, q, a_.head_dim, cos_, sin_, q);
    ops.rope(RopeStyle::Halves, k, a_.head_dim, cos_, sin_, k);
    const Mat att = ops.alloc(n, q_cols, dtype_);
    AttentionShape shape;
    shape.batch = batch_;
    shape.q_len = shape.kv_len = seq_;
    shape.heads = a_.n_heads;
    shape.kv_heads = a_.n_kv_heads;
    shape.head_dim = a_.head_dim;
    shape.scale = static_cast<float>(std::pow(static_cast<double>(a_.head_dim), -0.5));
    shape.causal = true;
    ops.attention(q, k, v, shape, att);
    ops.linear(att, *o_proj.weight, o_proj.bias, z);
    ops.residual(h_, nullptr, z, batch_, h_);
    ops.release(m_attn);

    // MLP: z = RMSh(h); h = ⟦h + down(⟦SiLU(gate(z)) · up(z)⟧)⟧.
    ops.rms_norm(h_, post_norm, eps, RmsRounding::Twice, 0, z);
    const Mat g = ops.alloc(n, a_.intermediate_size, dtype_);
    const Mat u = ops.alloc(n, a_.intermediate_size, dtype_);
    ops.linear(z, *gate_proj.weight, gate_proj.bias, g);
    ops.linear(z, *up_proj.weight, up_proj.bias, u);
    ops.gated(Activation::Silu, g, u, g);
    ops.linear(g, *down_proj.weight, down_proj.bias, z);
    ops.residual(h_, nullptr, z, batch_, h_);
    ops.release(m);
  }

  void final_norm(Ops& ops, WeightSource& weights) {
    UnitWeights w(config_file_);
    const DequantParams& norm = w.vec("model.norm.weight", a_.hidden_size);
    w.fetch(weights);
    ops.rms_norm(h_, norm, static_cast<float>(a_.rms_norm_eps), RmsRounding::Twice, 0, h_);
  }

  // logits = Lin(h; lm_head), held until output(). A tied head reads model.embed_tokens.weight
  // through the WeightSource's alias.
  void head(Ops& ops, WeightSource& weights) {
    UnitWeights w(config_file_);
    const Linear lm_head = w.linear("lm_head", a_.hidden_size, a_.vocab_size, false);
    w.fetch(weights);
    logits_ = ops.alloc(rows(), a_.vocab_size, dtype_);
    ops.linear(h_, *lm_head.weight, nullptr, logits_);
  }

  planner::Arch arch_;
  LlamaArch a_;
  DType dtype_;
  std::string config_file_;
  std::vector<std::string> units_;
  std::vector<float> inv_freq_;

  int64_t batch_ = 0, seq_ = 0;
  HostTensor ids_;
  Mat h_, cos_, sin_, logits_;
};

}  // namespace

std::unique_ptr<Forward> make_llama(const LlamaArch& arch, DType dtype, std::string config_file) {
  return std::make_unique<LlamaForward>(arch, dtype, std::move(config_file));
}

}  // namespace qtool::runner::models
