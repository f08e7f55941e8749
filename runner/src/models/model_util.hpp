// What the architectures' forwards share: the host-side tables MODELS.md computes outside the
// graph (RoPE, the timestep sinusoid), input lookup and conversion, a seeded generator for
// random_inputs, and fetching a unit's weights in the plan's order with their shapes checked.
#pragma once

#include <array>
#include <cstdint>
#include <deque>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "models.hpp"
#include "qtool/formats/error.hpp"
#include "qtool/planner/arch.hpp"
#include "qtool/runner/forward.hpp"

namespace qtool::runner::models {

// --- host tables (MODELS.md §1.4, §1.5, §2.4) ------------------------------------------------------

// Llama's inv_freq [hd / 2] in float32 as transformers computes it: 1 / θ^(fp32(2i)/hd), then the
// llama3 scaling in float32 in the order of _compute_llama3_parameters.
std::vector<float> llama_inv_freq(const planner::LlamaArch& arch);
// cos and sin [rows, hd] in `dtype` for one position per row: angle = fp32(pos) · inv_i (fp32),
// halves layout [ang | ang], cos/sin in float32, each rounded once to `dtype`.
void llama_rope_tables(const std::vector<float>& inv_freq, const std::vector<int64_t>& positions, DType dtype,
                       std::vector<uint8_t>& cos, std::vector<uint8_t>& sin);
// Flux's cos and sin [rows, hd] float32 for ids [rows, n_axes] (float32 values): per axis of width
// d, ω_m = 1 / 10000^(2m/d) and θ = id·ω in float64, cos/sin in float64, then float32, each value
// twice (adjacent pairs).
void flux_rope_tables(const std::vector<float>& ids, const std::vector<int64_t>& axes_dims,
                      std::vector<float>& cos, std::vector<float>& sin);
// Flux's timestep sinusoid φ(s) [256] in float32 (get_timestep_embedding: 256 channels, cos first,
// frequencies exp(fp32(−ln 10000)·k / 128)).
std::vector<float> timestep_sinusoid(float s);

// --- values ------------------------------------------------------------------------------------------

float round_to(DType dtype, float v);  // v rounded once (RNE) to dtype (BF16, F16, F32) and back
// Float values to `dtype` bytes, each rounded once.
std::vector<uint8_t> encode(const std::vector<float>& v, DType dtype);
// A float input as float32 values; an integer input as int64.
std::vector<float> floats_of(const HostTensor& t);
std::vector<int64_t> ints_of(const HostTensor& t);
// The bytes of `t` in `dtype` (float inputs rounded once, as torch's .to(dtype)).
std::vector<uint8_t> float_input_as(const HostTensor& t, DType dtype);

// The input named `name`, or null.
const HostTensor* find_input(const std::vector<HostTensor>& inputs, std::string_view name);
// Checks `inputs` against `specs` (names known, required present, dtypes accepted, shapes; a spec
// dimension < 0 matches any size): Error(InvalidInput) naming the input.
void check_against(const std::vector<HostTensor>& inputs, const std::vector<InputSpec>& specs);
std::string shape_str(const std::vector<int64_t>& shape);

// A seeded generator (splitmix64) for random_inputs.
class Rng {
 public:
  explicit Rng(uint64_t seed) : state_(seed) {}
  uint64_t next();
  double uniform();  // [0, 1)
  double normal();   // N(0, 1), Box-Muller
 private:
  uint64_t state_;
};

// --- token inputs (Llama, T5, CLIP) ------------------------------------------------------------------

// An I64 input [batch, tokens] named `name` holding `values`.
HostTensor int64_input(std::string name, int64_t batch, int64_t tokens, const std::vector<int64_t>& values);
// input_ids [batch, tokens] drawn uniformly from [0, vocab).
HostTensor random_token_ids(Rng& rng, int64_t batch, int64_t tokens, int64_t vocab);
// input_ids: at most `max_tokens` tokens per sample (what the plan was made for).
void check_token_count(const HostTensor& ids, int64_t max_tokens);
// input_ids: every id inside the vocabulary [0, vocab).
void check_token_range(const HostTensor& ids, int64_t vocab);
// A per-token input (attention_mask, position_ids) has the shape of input_ids.
void check_shaped_as_ids(const HostTensor& t, const HostTensor& ids);
// attention_mask, when given: the shape of input_ids, every value 0 or 1.
void check_attention_mask(const std::vector<HostTensor>& inputs, const HostTensor& ids);
// position_ids when given, else each sample's 0 .. seq - 1.
std::vector<int64_t> positions_of(const std::vector<HostTensor>& inputs, int64_t batch, int64_t seq);
// attention_mask uploaded as I64 [batch, seq] (all ones when none is given), and whether one was.
struct KeyMask {
  Mat mat;
  bool given = false;
  const Mat* get() const { return given ? &mat : nullptr; }  // AttentionShape::key_mask
};
KeyMask upload_key_mask(Ops& ops, const std::vector<HostTensor>& inputs, int64_t batch, int64_t seq);

// --- weights -----------------------------------------------------------------------------------------

// A linear's weight and optional bias.
struct Linear {
  const DequantParams* weight = nullptr;
  const DequantParams* bias = nullptr;
};

// The tensors one unit reads: declared with the shapes the config implies, fetched from the
// WeightSource in the plan's order (the module tree's: a module's own tensors by name, then its
// children, numbered children by value first, then names), then checked.
class UnitWeights {
 public:
  explicit UnitWeights(std::string config_file) : config_file_(std::move(config_file)) {}
  // A 1-D tensor of n elements (norm weights, biases).
  const DequantParams& vec(std::string name, int64_t n);
  // A 2-D tensor [rows, cols] (embedding tables; linear weights [out, in]).
  const DequantParams& mat(std::string name, int64_t rows, int64_t cols);
  // `<module>.weight` [out, in] and, when `bias`, `<module>.bias` [out].
  Linear linear(const std::string& module, int64_t in, int64_t out, bool bias);
  // linear(prefix + name, in, out, bias) for each of `names` (an attention's q, k, v ...).
  template <size_t N>
  std::array<Linear, N> linears(const std::string& prefix, const char* const (&names)[N], int64_t in,
                                int64_t out, bool bias) {
    std::array<Linear, N> l;
    for (size_t i = 0; i < N; ++i) l[i] = linear(prefix + names[i], in, out, bias);
    return l;
  }
  // Fetches the tensors declared since the last fetch, in the plan's order, and checks their
  // shapes. (A unit that spans several of the planner's units, like Flux's time_text_embed,
  // fetches once per planner unit, in their order.)
  void fetch(WeightSource& source);

 private:
  struct Slot {
    std::string name;
    int64_t rows = 0, cols = 0;  // rows 0: a vector of `cols` elements
    DequantParams params;
  };
  std::string config_file_;
  std::deque<Slot> slots_;
  size_t fetched_ = 0;
};

// Whether tensor `a` comes before tensor `b` in a unit's plan order (see UnitWeights).
bool plan_order_less(std::string_view a, std::string_view b);

// --- layers ------------------------------------------------------------------------------------------

// The activation a config's `hidden_act` / `dense_act_fn` names (the arch parsers accept only these).
Activation activation_of(const std::string& act);
// hd^-0.5 as transformers computes `head_dim**-0.5` (a double), in float32.
float head_dim_scale(int64_t head_dim);
// Self-attention over `seq` tokens per sample (no mask, no bias, not causal).
AttentionShape self_attention(int64_t batch, int64_t seq, int64_t heads, int64_t kv_heads, int64_t head_dim,
                              float scale);
// The projections of one attention: q [rows, q_cols], k and v [rows, kv_cols] in `dtype`,
// allocated in that order on `ops`, then q = Lin(x; q), k = Lin(x; k), v = Lin(x; v).
struct Qkv {
  Mat q, k, v;
};
Qkv project_qkv(Ops& ops, const Mat& x, const Linear& q, const Linear& k, const Linear& v, int64_t q_cols,
                int64_t kv_cols, DType dtype);

// --- outputs -----------------------------------------------------------------------------------------

// `m` (dense) to the host as a tensor `name` [shape] of its dtype (a stage).
HostTensor download_tensor(Ops& ops, const Mat& m, std::string name, std::vector<int64_t> shape);
// Rows [row, row + n) of `m` (dense) as float32 bytes.
std::vector<uint8_t> download_f32(Ops& ops, const Mat& m, int64_t row, int64_t n);
// `m` (dense) to the host as an F32 tensor `name` [shape] (an output).
HostTensor download_f32_tensor(Ops& ops, const Mat& m, std::string name, std::vector<int64_t> shape);

// --- the forwards' frame ------------------------------------------------------------------------

// What every architecture's forward holds: its config, the class it implements, the model dtype,
// the config file named in messages, and its units in order, each with the step that runs it
// (added by the subclass).
class ModelForward : public StagedForward {
 public:
  ModelForward(planner::Arch arch, std::string architecture, DType dtype, std::string config_file)
      : arch_(std::move(arch)),
        architecture_(std::move(architecture)),
        dtype_(dtype),
        config_file_(std::move(config_file)) {}
  std::string architecture() const override { return architecture_; }
  const std::vector<std::string>& units() const override { return units_; }
  const planner::Arch& arch() const override { return arch_; }
  void run_unit(size_t unit, Ops& ops, WeightSource& weights) final {
    QTOOL_ASSERT(unit < steps_.size());
    steps_[unit](ops, weights);
  }

 protected:
  // Appends unit `name` (the planner's module name), run by `step`.
  void add_unit(std::string name, std::function<void(Ops&, WeightSource&)> step) {
    units_.push_back(std::move(name));
    steps_.push_back(std::move(step));
  }
  // Appends a block list: units `prefix`0 ... `prefix`<n - 1>, unit i run by (self->*step)(i, ...),
  // `self` being this forward as its class Self.
  template <class Self>
  void add_blocks(const std::string& prefix, int64_t n, void (Self::*step)(int64_t, Ops&, WeightSource&)) {
    Self* self = static_cast<Self*>(this);
    for (int64_t i = 0; i < n; ++i)
      add_unit(prefix + std::to_string(i),
               [self, step, i](Ops& ops, WeightSource& w) { (self->*step)(i, ops, w); });
  }

  planner::Arch arch_;
  std::string architecture_;
  DType dtype_;
  std::string config_file_;
  std::vector<std::string> units_;

 private:
  std::vector<std::function<void(Ops&, WeightSource&)>> steps_;
};

// What a forward whose input is token ids is, beside its weights and its arch.
struct TokenModel {
  std::string architecture;                  // the class it implements: "CLIPTextModel"
  int64_t vocab = 0;                         // ids in [0, vocab)
  int64_t width = 0;                         // of the residual stream
  std::string output_name;                   // "last_hidden_state", "logits"
  std::vector<std::string> optional_inputs;  // beside input_ids, of its shape: "attention_mask"
};

// The forwards whose input is token ids (Llama, T5, CLIP): input_ids [batch, tokens], each id in
// [0, model.vocab), with `model.optional_inputs` of its shape (attention_mask, position_ids); a
// residual stream [batch * tokens, model.width]; an output [batch, tokens, *] named
// `model.output_name`.
class TokenForward : public ModelForward {
 public:
  TokenForward(planner::Arch arch, DType dtype, std::string config_file, TokenModel model)
      : ModelForward(std::move(arch), model.architecture, dtype, std::move(config_file)),
        model_(std::move(model)) {}
  std::vector<InputSpec> input_specs(int64_t batch, int64_t tokens) const override;
  // Ids drawn uniformly from the vocabulary.
  std::vector<HostTensor> random_inputs(int64_t batch, int64_t tokens, uint64_t seed) const override;
  int64_t batch_of(const std::vector<HostTensor>& inputs) const override {
    return find_input(inputs, "input_ids")->shape.at(0);
  }
  // The stream after each unit but the first (the embedding) and the last.
  std::vector<HostTensor> stages(Ops& ops, size_t unit) override {
    if (unit == 0 || unit == units_.size() - 1) return {};
    return {stream_stage(ops, unit)};
  }
  std::vector<std::string> output_names() const override { return {model_.output_name}; }
  HostTensor output(Ops& ops) override {
    return download_f32_tensor(ops, out_, model_.output_name, {batch_, seq_, out_.cols});
  }

 protected:
  // input_ids after the checks every token forward makes first: the inputs match input_specs,
  // at most `max_tokens` tokens.
  const HostTensor& checked_ids(const std::vector<HostTensor>& inputs, int64_t max_tokens) const;
  // begin(): batch_, seq_ and ids_ from input_ids, and the stream allocated in `stream_dtype`.
  void begin_stream(Ops& ops, const std::vector<HostTensor>& inputs, DType stream_dtype);
  // h = table[input_ids], the table [vocab, width] named `table` (Llama's and T5's embedding).
  void embed_tokens(Ops& ops, WeightSource& weights, const std::string& table);
  // out = RMSh(h) (rounded twice) with the [width] weight `weight`: Llama's and T5's final norm.
  void final_rms_norm(Ops& ops, WeightSource& weights, const std::string& weight, double eps, const Mat& out);
  // The stream after `unit`, named after it, [batch, tokens, width].
  HostTensor stream_stage(Ops& ops, size_t unit) {
    return download_tensor(ops, h_, units_[unit], {batch_, seq_, model_.width});
  }
  int64_t rows() const { return batch_ * seq_; }

  TokenModel model_;
  int64_t batch_ = 0, seq_ = 0;
  HostTensor ids_;  // input_ids
  Mat h_;           // the residual stream [rows, width]
  Mat out_;         // the output [rows, *], set by the last unit
};

}  // namespace qtool::runner::models
