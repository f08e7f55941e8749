// CLIPTextModel (transformers), MODELS.md §4: token and position embeddings, pre-LN encoder
// layers (causal attention, quick_gelu MLP), the final LayerNorm, and the pooled output: the
// final hidden state at each sample's EOS position (argmax of the ids for the legacy
// eos_token_id 2, else the first position holding eos_token_id).
#include <cmath>
#include <cstring>

#include "model_util.hpp"
#include "models.hpp"
#include "qtool/formats/error.hpp"

namespace qtool::runner::models {

std::vector<int64_t> clip_eos_positions(const std::vector<int64_t>& ids, int64_t batch, int64_t tokens,
                                        int64_t eos_token_id) {
  std::vector<int64_t> at(static_cast<size_t>(batch), 0);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t* row = ids.data() + b * tokens;
    int64_t best = 0;
    for (int64_t t = 0; t < tokens; ++t) {
      if (eos_token_id == 2) {
        if (row[t] > row[best]) best = t;  // the first maximum
      } else if (row[t] == eos_token_id) {
        best = t;
        break;
      }
    }
    at[static_cast<size_t>(b)] = best;  // no EOS: position 0, as argmax over all-zero flags
  }
  return at;
}

namespace {

using planner::ClipTextArch;

class ClipForward final : public TokenForward {
 public:
  ClipForward(const ClipTextArch& arch, DType dtype, std::string config_file)
      : TokenForward(arch, dtype, std::move(config_file),
                     {.architecture = "CLIPTextModel",
                      .vocab = arch.vocab_size,
                      .width = arch.hidden_size,
                      .output_name = "last_hidden_state",
                      .optional_inputs = {"attention_mask", "position_ids"}}),
        a_(arch),
        act_(activation_of(a_.act)) {
    add_unit(a_.prefix + "embeddings", [this](Ops& ops, WeightSource& w) { embed(ops, w); });
    add_blocks(a_.prefix + "encoder.layers.", a_.n_layers, &ClipForward::layer);
    add_unit(a_.prefix + "final_layer_norm", [this](Ops& ops, WeightSource& w) { final_norm(ops, w); });
  }

  // Random ids with an EOS in every sample (at a random position, the tail padded with EOS as
  // the CLIP tokenizer pads), so that the pooled output reads a real position.
  std::vector<HostTensor> random_inputs(int64_t batch, int64_t tokens, uint64_t seed) const override {
    Rng rng(seed);
    const int64_t eos =
        a_.eos_token_id == 2 || a_.eos_token_id >= a_.vocab_size ? a_.vocab_size - 1 : a_.eos_token_id;
    std::vector<int64_t> ids(static_cast<size_t>(batch * tokens));
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t end = static_cast<int64_t>(rng.next() % static_cast<uint64_t>(tokens));
      for (int64_t t = 0; t < tokens; ++t)
        ids[static_cast<size_t>(b * tokens + t)] =
            t >= end ? eos : static_cast<int64_t>(rng.next() % static_cast<uint64_t>(eos));
    }
    return {int64_input("input_ids", batch, tokens, ids)};
  }

  void check_inputs(const std::vector<HostTensor>& inputs, int64_t max_tokens) const override {
    const HostTensor& ids = checked_ids(inputs, max_tokens);
    const HostTensor* pos = find_input(inputs, "position_ids");
    if (!pos && ids.shape[1] > a_.max_positions)
      fail(ErrorKind::InvalidInput, "input 'input_ids' has ", ids.shape[1],
           " tokens; max_position_embeddings is ", a_.max_positions);
    check_token_range(ids, a_.vocab_size);
    check_attention_mask(inputs, ids);
    if (pos) {
      check_shaped_as_ids(*pos, ids);
      for (int64_t v : ints_of(*pos))
        if (v < 0 || v >= a_.max_positions)
          fail(ErrorKind::InvalidInput, "input 'position_ids' holds position ", v, ", outside [0, ",
               a_.max_positions, ")");
    }
  }

  void begin(Ops& ops, const std::vector<HostTensor>& inputs) override {
    begin_stream(ops, inputs, dtype_);
    positions_ = positions_of(inputs, batch_, seq_);
    mask_ = upload_key_mask(ops, inputs, batch_, seq_);
  }
  std::vector<Mat*> shared_state() override { return {&h_, &out_, &mask_.mat}; }

  // The stream after every unit (the last one's normalised in place).
  std::vector<HostTensor> stages(Ops& ops, size_t unit) override { return {stream_stage(ops, unit)}; }

  std::vector<std::string> output_names() const override { return {"last_hidden_state", "pooler_output"}; }

  std::vector<HostTensor> outputs(Ops& ops) override {
    std::vector<HostTensor> out;
    out.push_back(output(ops));
    HostTensor pooled{"pooler_output", DType::F32, {batch_, a_.hidden_size}, {}};
    for (int64_t b = 0; b < batch_; ++b) {
      const auto row = download_f32(ops, h_, b * seq_ + eos_[static_cast<size_t>(b)], 1);
      pooled.bytes.insert(pooled.bytes.end(), row.begin(), row.end());
    }
    out.push_back(std::move(pooled));
    return out;
  }

 private:
  // h = ⟦token_embedding[input_ids] + position_embedding[position_ids]⟧. The two embeddings are
  // the planner's units before "embeddings" itself: fetched one after the other.
  void embed(Ops& ops, WeightSource& weights) {
    const std::string p = a_.prefix + "embeddings.";
    UnitWeights w(config_file_);
    const DequantParams& tok = w.mat(p + "token_embedding.weight", a_.vocab_size, a_.hidden_size);
    w.fetch(weights);
    const DequantParams& pos = w.mat(p + "position_embedding.weight", a_.max_positions, a_.hidden_size);
    w.fetch(weights);
    const size_t m = ops.mark();
    const Mat ids = ops.alloc(rows(), 1, DType::I64);
    const Mat pids = ops.alloc(rows(), 1, DType::I64);
    const Mat pe = ops.alloc(rows(), a_.hidden_size, dtype_);
    ops.upload(ints_of(ids_).data(), ids);
    ops.upload(positions_.data(), pids);
    ops.embedding(ids, tok, h_);
    ops.embedding(pids, pos, pe);
    ops.add(h_, pe, h_);
    ops.release(m);
  }

  void layer(int64_t i, Ops& ops, WeightSource& weights) {
    const std::string p = a_.prefix + "encoder.layers." + std::to_string(i) + ".";
    const int64_t d = a_.hidden_size, n = rows();
    UnitWeights w(config_file_);
    const DequantParams& ln1_w = w.vec(p + "layer_norm1.weight", d);
    const DequantParams& ln1_b = w.vec(p + "layer_norm1.bias", d);
    const auto [q, k, v, o] =
        w.linears(p + "self_attn.", {"q_proj", "k_proj", "v_proj", "out_proj"}, d, d, true);
    const DequantParams& ln2_w = w.vec(p + "layer_norm2.weight", d);
    const DequantParams& ln2_b = w.vec(p + "layer_norm2.bias", d);
    const Linear fc1 = w.linear(p + "mlp.fc1", d, a_.intermediate_size, true);
    const Linear fc2 = w.linear(p + "mlp.fc2", a_.intermediate_size, d, true);
    w.fetch(weights);
    const float eps = static_cast<float>(a_.eps);

    // h = ⟦h + Lin(SDPA(q, k, v; hd^-0.5, causal, padding mask); out_proj)⟧, z = LN1(h)
    const size_t m = ops.mark();
    const Mat z = ops.alloc(n, d, dtype_);
    const size_t m_attn = ops.mark();
    ops.layer_norm(h_, &ln1_w, &ln1_b, eps, z);
    const Qkv qkv = project_qkv(ops, z, q, k, v, d, d, dtype_);
    const Mat att = ops.alloc(n, d, dtype_);
    AttentionShape shape =
        self_attention(batch_, seq_, a_.n_heads, a_.n_heads, a_.head_dim(), head_dim_scale(a_.head_dim()));
    shape.causal = true;
    shape.key_mask = mask_.get();
    ops.attention(qkv.q, qkv.k, qkv.v, shape, att);
    ops.linear(att, *o.weight, o.bias, z);
    ops.residual(h_, nullptr, z, batch_, h_);
    ops.release(m_attn);

    // h = ⟦h + Lin(act(Lin(LN2(h); fc1)); fc2)⟧
    ops.layer_norm(h_, &ln2_w, &ln2_b, eps, z);
    const Mat f = ops.alloc(n, a_.intermediate_size, dtype_);
    ops.linear(z, *fc1.weight, fc1.bias, f);
    ops.activation(act_, f, f);
    ops.linear(f, *fc2.weight, fc2.bias, z);
    ops.residual(h_, nullptr, z, batch_, h_);
    ops.release(m);
  }

  // last_hidden_state = LN(h), in place (the output); the EOS positions for the pooled output.
  void final_norm(Ops& ops, WeightSource& weights) {
    UnitWeights w(config_file_);
    const DequantParams& nw = w.vec(a_.prefix + "final_layer_norm.weight", a_.hidden_size);
    const DequantParams& nb = w.vec(a_.prefix + "final_layer_norm.bias", a_.hidden_size);
    w.fetch(weights);
    ops.layer_norm(h_, &nw, &nb, static_cast<float>(a_.eps), h_);
    out_ = h_;
    eos_ = clip_eos_positions(ints_of(ids_), batch_, seq_, a_.eos_token_id);
  }

  ClipTextArch a_;
  Activation act_;

  std::vector<int64_t> positions_, eos_;
  KeyMask mask_;
};

}  // namespace

std::unique_ptr<Forward> make_clip(const ClipTextArch& arch, DType dtype, std::string config_file) {
  return std::make_unique<ClipForward>(arch, dtype, std::move(config_file));
}

}  // namespace qtool::runner::models
