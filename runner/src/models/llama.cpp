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

class LlamaForward final : public TokenForward {
 public:
  LlamaForward(const LlamaArch& arch, DType dtype, std::string config_file)
      : TokenForward(arch, dtype, std::move(config_file),
                     {.architecture = "LlamaForCausalLM",
                      .vocab = arch.vocab_size,
                      .width = arch.hidden_size,
                      .output_name = "logits",
                      .optional_inputs = {"position_ids"}}),
        a_(arch) {
    // h = embed_tokens[input_ids]
    add_unit("model.embed_tokens",
             [this](Ops& ops, WeightSource& w) { embed_tokens(ops, w, "model.embed_tokens.weight"); });
    add_blocks("model.layers.", a_.n_layers, &LlamaForward::layer);
    add_unit("model.norm", [this](Ops& ops, WeightSource& w) {
      final_rms_norm(ops, w, "model.norm.weight", a_.rms_norm_eps, h_);
    });
    add_unit("lm_head", [this](Ops& ops, WeightSource& w) { head(ops, w); });
    inv_freq_ = llama_inv_freq(a_);
  }

  void check_inputs(const std::vector<HostTensor>& inputs, int64_t max_tokens) const override {
    const HostTensor& ids = checked_ids(inputs, max_tokens);
    check_token_range(ids, a_.vocab_size);
    if (const HostTensor* pos = find_input(inputs, "position_ids")) {
      check_shaped_as_ids(*pos, ids);
      for (int64_t v : ints_of(*pos))
        if (v < 0 || v > (int64_t{1} << 24))
          fail(ErrorKind::InvalidInput, "input 'position_ids' holds position ", v, ", outside [0, 2^24]");
    }
  }

  void begin(Ops& ops, const std::vector<HostTensor>& inputs) override {
    begin_stream(ops, inputs, dtype_);
    const int64_t n = rows();
    std::vector<uint8_t> cos, sin;
    llama_rope_tables(inv_freq_, positions_of(inputs, batch_, seq_), dtype_, cos, sin);
    cos_ = ops.alloc(n, a_.head_dim, dtype_);
    sin_ = ops.alloc(n, a_.head_dim, dtype_);
    ops.upload(cos.data(), cos_);
    ops.upload(sin.data(), sin_);
  }
  std::vector<Mat*> shared_state() override { return {&h_, &out_, &cos_, &sin_}; }

 private:
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
    const auto [q, k, v] = project_qkv(ops, z, q_proj, k_proj, v_proj, q_cols, kv_cols, dtype_);
    ops.rope(RopeStyle::Halves, q, a_.head_dim, cos_, sin_, q);
    ops.rope(RopeStyle::Halves, k, a_.head_dim, cos_, sin_, k);
    const Mat att = ops.alloc(n, q_cols, dtype_);
    AttentionShape shape =
        self_attention(batch_, seq_, a_.n_heads, a_.n_kv_heads, a_.head_dim, head_dim_scale(a_.head_dim));
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

  // logits = Lin(h; lm_head) (the output), held until output(). A tied head reads model.embed_tokens.weight
  // through the WeightSource's alias.
  void head(Ops& ops, WeightSource& weights) {
    UnitWeights w(config_file_);
    const Linear lm_head = w.linear("lm_head", a_.hidden_size, a_.vocab_size, false);
    w.fetch(weights);
    out_ = ops.alloc(rows(), a_.vocab_size, dtype_);
    ops.linear(h_, *lm_head.weight, nullptr, out_);
  }

  LlamaArch a_;
  std::vector<float> inv_freq_;
  Mat cos_, sin_;
};

}  // namespace

std::unique_ptr<Forward> make_llama(const LlamaArch& arch, DType dtype, std::string config_file) {
  return std::make_unique<LlamaForward>(arch, dtype, std::move(config_file));
}

}  // namespace qtool::runner::models
