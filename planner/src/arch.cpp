#include "qtool/planner/arch.hpp"

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <limits>

#include "qtool/formats/error.hpp"
#include "qtool/planner/templates.hpp"

namespace qtool::planner {
using nlohmann::json;

namespace {

// Reads keys of one config.json; every error names the file and the key.
class ConfigReader {
 public:
  ConfigReader(const json& j, std::string file) : j_(j), file_(std::move(file)) {}

  const std::string& file() const { return file_; }
  const json* find(const json& obj, std::string_view key) const {
    auto it = obj.find(std::string(key));
    return it == obj.end() || it->is_null() ? nullptr : &*it;
  }
  bool has(std::string_view key) const { return find(j_, key) != nullptr; }

  // The value at `key`, or null when it is absent and there is a fallback; without one,
  // Error(InvalidInput) naming the key (`where` is its path prefix).
  const json* required(const json& obj, std::string_view key, bool has_fallback,
                       std::string_view where) const {
    const json* v = find(obj, key);
    if (!v && !has_fallback) fail(ErrorKind::InvalidInput, file_, ": missing key '", where, key, "'");
    return v;
  }

  // A positive integer (JSON integers, or floats with an integral value as some writers emit).
  int64_t positive(const json& obj, std::string_view key, std::optional<int64_t> fallback,
                   std::string_view where = {}) const {
    const json* v = required(obj, key, fallback.has_value(), where);
    if (!v) return *fallback;
    int64_t n = 0;
    if (v->is_number_integer()) {
      n = v->get<int64_t>();
    } else if (v->is_number_float() && std::isfinite(v->get<double>()) &&
               v->get<double>() == std::floor(v->get<double>()) && std::fabs(v->get<double>()) < 9.0e15) {
      n = static_cast<int64_t>(v->get<double>());
    } else {
      fail(ErrorKind::InvalidInput, file_, ": key '", where, key, "' must be an integer, not ", v->dump());
    }
    if (n <= 0 || n > (int64_t{1} << 40))
      fail(ErrorKind::InvalidInput, file_, ": key '", where, key, "' must be a positive size, not ", n);
    return n;
  }
  int64_t positive(std::string_view key, std::optional<int64_t> fallback = std::nullopt) const {
    return positive(j_, key, fallback);
  }

  double positive_real(const json& obj, std::string_view key, std::optional<double> fallback,
                       std::string_view where = {}) const {
    const json* v = required(obj, key, fallback.has_value(), where);
    if (!v) return *fallback;
    if (!v->is_number() || !std::isfinite(v->get<double>()) || v->get<double>() <= 0.0)
      fail(ErrorKind::InvalidInput, file_, ": key '", where, key, "' must be a positive number, not ",
           v->dump());
    return v->get<double>();
  }

  bool boolean(std::string_view key, bool fallback) const {
    const json* v = find(j_, key);
    if (!v) return fallback;
    if (!v->is_boolean())
      fail(ErrorKind::InvalidInput, file_, ": key '", key, "' must be true or false, not ", v->dump());
    return v->get<bool>();
  }

  const json& root() const { return j_; }

 private:
  const json& j_;
  std::string file_;
};

std::string config_file(const Component& component) {
  const std::string dir = component.dir().string();
  return dir.empty() ? std::string("config.json") : (component.dir() / "config.json").string();
}

// A size key of a config and the field of the arch struct it sets.
template <class A>
struct SizeKey {
  std::string_view key;
  int64_t A::*field;
};

// Reads `keys` of `obj` into `a`, in order. A key the config lacks leaves its field at the struct's
// default, the framework's (FluxTransformer2DModel's, T5Config's ...), or, when `required`, is an
// error.
template <class A>
void read_sizes(const ConfigReader& r, const json& obj, A& a, std::initializer_list<SizeKey<A>> keys,
                bool required = false, std::string_view where = {}) {
  for (const SizeKey<A>& k : keys)
    a.*k.field = r.positive(obj, k.key, required ? std::nullopt : std::optional<int64_t>(a.*k.field), where);
}

// The sizes that transformers' text configs (LlamaConfig, CLIPTextConfig) name alike.
template <class A>
void read_text_sizes(const ConfigReader& r, const json& obj, A& a, bool required,
                     std::string_view where = {}) {
  read_sizes<A>(r, obj, a,
                {{"vocab_size", &A::vocab_size},
                 {"hidden_size", &A::hidden_size},
                 {"intermediate_size", &A::intermediate_size},
                 {"num_hidden_layers", &A::n_layers},
                 {"num_attention_heads", &A::n_heads}},
                required, where);
}

// rope_theta and rope_scaling (transformers 4.x: top-level rope_theta, rope_scaling with `rope_type`
// or the older `type`) or rope_parameters (5.x: one dict holding rope_theta and the type's fields).
void read_llama_rope(const ConfigReader& r, LlamaArch& a) {
  const json* params = r.find(r.root(), "rope_parameters");
  const json* scaling = r.find(r.root(), "rope_scaling");
  std::string where = "rope_parameters.";
  if (params && !params->is_object())
    fail(ErrorKind::InvalidInput, r.file(), ": key 'rope_parameters' must be an object, not ",
         params->dump());
  if (scaling && !scaling->is_object())
    fail(ErrorKind::InvalidInput, r.file(), ": key 'rope_scaling' must be an object or null, not ",
         scaling->dump());
  const json* rope = params;
  if (!rope) {
    rope = scaling;
    where = "rope_scaling.";
  }
  a.rope_theta = 10000.0;
  if (params && r.find(*params, "rope_theta")) {
    a.rope_theta = r.positive_real(*params, "rope_theta", std::nullopt, "rope_parameters.");
  } else if (r.has("rope_theta")) {
    a.rope_theta = r.positive_real(r.root(), "rope_theta", std::nullopt);
  }
  if (!rope) return;
  std::string type = "default";
  const json* t = r.find(*rope, "rope_type");
  std::string type_key = "rope_type";
  if (!t) {
    t = r.find(*rope, "type");
    type_key = "type";
  }
  if (t) {
    if (!t->is_string())
      fail(ErrorKind::InvalidInput, r.file(), ": key '", where, type_key, "' must be a string, not ",
           t->dump());
    type = t->get<std::string>();
  }
  if (const json* p = r.find(*rope, "partial_rotary_factor");
      p && !(p->is_number() && p->get<double>() == 1.0))
    fail(ErrorKind::Unsupported, r.file(), ": key '", where, "partial_rotary_factor' ", p->dump(),
         " is not supported (LlamaForCausalLM rotates whole heads)");
  if (type == "default") return;
  if (type != "llama3")
    fail(ErrorKind::Unsupported, r.file(), ": key '", where, type_key, "' is '", type,
         "'; the runner implements the default and llama3 RoPE only");
  LlamaArch::Llama3Scaling s;
  s.factor = r.positive_real(*rope, "factor", std::nullopt, where);
  s.low_freq_factor = r.positive_real(*rope, "low_freq_factor", std::nullopt, where);
  s.high_freq_factor = r.positive_real(*rope, "high_freq_factor", std::nullopt, where);
  s.original_max_position_embeddings =
      r.positive(*rope, "original_max_position_embeddings", std::nullopt, where);
  if (!(s.high_freq_factor > s.low_freq_factor))
    fail(ErrorKind::InvalidInput, r.file(), ": key '", where, "high_freq_factor' (", s.high_freq_factor,
         ") must exceed '", where, "low_freq_factor' (", s.low_freq_factor, ")");
  a.llama3 = s;
}

LlamaArch read_llama(const ConfigReader& r) {
  LlamaArch a;
  read_text_sizes(r, r.root(), a, true);
  a.n_kv_heads = r.positive("num_key_value_heads", a.n_heads);
  if (a.n_heads % a.n_kv_heads != 0)
    fail(ErrorKind::InvalidInput, r.file(), ": key 'num_key_value_heads' (", a.n_kv_heads,
         ") must divide 'num_attention_heads' (", a.n_heads, ")");
  if (!r.has("head_dim") && a.hidden_size % a.n_heads != 0)
    fail(ErrorKind::InvalidInput, r.file(), ": key 'num_attention_heads' (", a.n_heads,
         ") must divide 'hidden_size' (", a.hidden_size, ") when the config has no 'head_dim'");
  a.head_dim = r.positive("head_dim", a.hidden_size / a.n_heads);
  if (a.head_dim % 2 != 0)
    fail(ErrorKind::InvalidInput, r.file(), ": key 'head_dim' (", a.head_dim, ") must be even for RoPE");
  a.rms_norm_eps = r.positive_real(r.root(), "rms_norm_eps", 1e-6);
  read_llama_rope(r, a);
  a.tie_word_embeddings = r.boolean("tie_word_embeddings", false);
  a.attention_bias = r.boolean("attention_bias", false);
  a.mlp_bias = r.boolean("mlp_bias", false);
  if (const json* act = r.find(r.root(), "hidden_act");
      act && !(act->is_string() && act->get<std::string>() == "silu"))
    fail(ErrorKind::Unsupported, r.file(), ": key 'hidden_act' is ", act->dump(),
         "; LlamaForCausalLM runs with silu");
  return a;
}

// diffusers fills keys a config lacks with FluxTransformer2DModel's defaults; so does this.
FluxArch read_flux(const ConfigReader& r) {
  FluxArch a;
  read_sizes(r, r.root(), a,
             {{"patch_size", &FluxArch::patch_size}, {"in_channels", &FluxArch::in_channels}});
  a.out_channels = r.positive("out_channels", a.in_channels);
  read_sizes(r, r.root(), a,
             {{"num_layers", &FluxArch::n_double},
              {"num_single_layers", &FluxArch::n_single},
              {"attention_head_dim", &FluxArch::head_dim},
              {"num_attention_heads", &FluxArch::n_heads},
              {"joint_attention_dim", &FluxArch::joint_attention_dim},
              {"pooled_projection_dim", &FluxArch::pooled_projection_dim}});
  a.guidance_embeds = r.boolean("guidance_embeds", false);
  if (const json* axes = r.find(r.root(), "axes_dims_rope")) {
    if (!axes->is_array() || axes->empty())
      fail(ErrorKind::InvalidInput, r.file(), ": key 'axes_dims_rope' must be a list of sizes, not ",
           axes->dump());
    a.axes_dims_rope.clear();
    for (size_t i = 0; i < axes->size(); ++i) {
      const json& v = (*axes)[i];
      if (!v.is_number_integer() || v.get<int64_t>() <= 0 || v.get<int64_t>() % 2 != 0)
        fail(ErrorKind::InvalidInput, r.file(), ": key 'axes_dims_rope[", i,
             "]' must be a positive even size, not ", v.dump());
      a.axes_dims_rope.push_back(v.get<int64_t>());
    }
  }
  int64_t sum = 0;
  for (int64_t d : a.axes_dims_rope) sum += d;
  if (sum != a.head_dim)
    fail(ErrorKind::InvalidInput, r.file(), ": key 'axes_dims_rope' sums to ", sum,
         ", not 'attention_head_dim' (", a.head_dim, ")");
  return a;
}

std::string string_key(const ConfigReader& r, const json& obj, std::string_view key, std::string fallback,
                       std::string_view where = {}) {
  const json* v = r.find(obj, key);
  if (!v) return fallback;
  if (!v->is_string())
    fail(ErrorKind::InvalidInput, r.file(), ": key '", where, key, "' must be a string, not ", v->dump());
  return v->get<std::string>();
}

// The activations the forwards run op by op as the frameworks do (ACT2FN names).
bool known_act(const std::string& a) {
  return a == "gelu_new" || a == "relu" || a == "quick_gelu" || a == "silu" || a == "gelu_pytorch_tanh";
}

// transformers fills keys a config lacks with T5Config's defaults; so does this.
T5EncoderArch read_t5(const ConfigReader& r) {
  T5EncoderArch a;
  read_sizes(r, r.root(), a,
             {{"vocab_size", &T5EncoderArch::vocab_size},
              {"d_model", &T5EncoderArch::d_model},
              {"d_kv", &T5EncoderArch::d_kv},
              {"num_heads", &T5EncoderArch::n_heads},
              {"d_ff", &T5EncoderArch::d_ff},
              {"num_layers", &T5EncoderArch::n_layers},
              {"relative_attention_num_buckets", &T5EncoderArch::num_buckets},
              {"relative_attention_max_distance", &T5EncoderArch::max_distance}});
  if (a.num_buckets < 4 || a.num_buckets % 4 != 0)
    fail(ErrorKind::InvalidInput, r.file(), ": key 'relative_attention_num_buckets' (", a.num_buckets,
         ") must be a multiple of 4");
  if (a.max_distance <= a.num_buckets / 4)
    fail(ErrorKind::InvalidInput, r.file(), ": key 'relative_attention_max_distance' (", a.max_distance,
         ") must exceed relative_attention_num_buckets / 4 (", a.num_buckets / 4, ")");
  a.eps = r.positive_real(r.root(), "layer_norm_epsilon", 1e-6);
  const std::string proj = string_key(r, r.root(), "feed_forward_proj", "relu");
  std::string act = proj;
  if (proj.starts_with("gated-")) {
    a.gated = true;
    act = proj.substr(6);
  }
  if (act == "gelu" && a.gated) act = "gelu_new";  // T5Config: "gated-gelu" means gelu_new
  if (!known_act(act))
    fail(ErrorKind::Unsupported, r.file(), ": key 'feed_forward_proj' is '", proj,
         "'; the runner implements relu, gelu_new, gelu_pytorch_tanh, silu and quick_gelu (plain or gated-)");
  a.act = act;
  return a;
}

// A CLIP text config: the file itself (CLIPTextConfig) or its `text_config` (CLIPConfig).
ClipTextArch read_clip(const ConfigReader& r, const Component& component) {
  ClipTextArch a;
  const json* tc = r.find(r.root(), "text_config");
  if (tc && !tc->is_object())
    fail(ErrorKind::InvalidInput, r.file(), ": key 'text_config' must be an object, not ", tc->dump());
  const json& c = tc ? *tc : r.root();
  const std::string where = tc ? "text_config." : "";
  read_text_sizes(r, c, a, false, where);
  a.max_positions = r.positive(c, "max_position_embeddings", a.max_positions, where);
  if (a.hidden_size % a.n_heads != 0)
    fail(ErrorKind::InvalidInput, r.file(), ": key '", where, "num_attention_heads' (", a.n_heads,
         ") must divide '", where, "hidden_size' (", a.hidden_size, ")");
  a.eps = r.positive_real(c, "layer_norm_eps", 1e-5, where);
  a.act = string_key(r, c, "hidden_act", "quick_gelu", where);
  if (!known_act(a.act))
    fail(ErrorKind::Unsupported, r.file(), ": key '", where, "hidden_act' is '", a.act,
         "'; the runner implements quick_gelu, gelu_new, gelu_pytorch_tanh, relu and silu");
  if (const json* e = r.find(c, "eos_token_id")) {
    if (!e->is_number_integer() || e->get<int64_t>() < 0)
      fail(ErrorKind::InvalidInput, r.file(), ": key '", where, "eos_token_id' must be a token id, not ",
           e->dump());
    a.eos_token_id = e->get<int64_t>();
  }
  // transformers 5 saves CLIPTextModel without the text_model. prefix (MODELS.md §4.3).
  if (!component.find("text_model.final_layer_norm.weight") && component.find("final_layer_norm.weight"))
    a.prefix = "";
  return a;
}

uint64_t u(int64_t v) { return static_cast<uint64_t>(v); }

// One phase of the forward: the buffers it holds at once on top of the state.
struct Phase {
  std::vector<ActivationItem> items;
  uint64_t bytes() const {
    uint64_t s = 0;
    for (const ActivationItem& i : items) s += i.bytes;
    return s;
  }
};

ActivationItem item(std::string name, int64_t rows, int64_t cols, DType dt, std::string_view rows_what) {
  const uint64_t bytes = u(rows) * u(cols) * dtype_size(dt);
  return {std::move(name), (bytes + kActivationAlignment - 1) / kActivationAlignment * kActivationAlignment,
          str_cat(rows_what, " ", rows, " x ", cols, " x ", dtype_name(dt))};
}

// The state plus the largest phase (the first of equals).
std::vector<ActivationItem> peak_of(std::vector<ActivationItem> state, const std::vector<Phase>& phases) {
  const Phase* best = nullptr;
  for (const Phase& p : phases)
    if (!best || p.bytes() > best->bytes()) best = &p;
  if (best) state.insert(state.end(), best->items.begin(), best->items.end());
  return state;
}

// What runner/src/models/llama.cpp allocates, unit by unit (N = batch * tokens rows):
//   state (begin): h [N, D]; RoPE cos, sin [N, hd] in the model dtype
//   model.embed_tokens: ids [N, 1] (I64 counted: the wider of the id dtypes)
//   layer, attention: z [N, D]; q [N, H hd]; k, v [N, Hkv hd]; attention output [N, H hd]
//   layer, MLP: z [N, D]; gate, up [N, I]
//   lm_head: logits [N, V] (held until the output is read)
std::vector<ActivationItem> llama_items(const LlamaArch& a, int64_t batch, int64_t tokens, DType dt) {
  const int64_t n = batch * tokens;
  const int64_t q_cols = a.n_heads * a.head_dim, kv_cols = a.n_kv_heads * a.head_dim;
  const std::vector<ActivationItem> state = {item("residual stream", n, a.hidden_size, dt, "tokens"),
                                             item("rope cos", n, a.head_dim, dt, "tokens"),
                                             item("rope sin", n, a.head_dim, dt, "tokens")};
  std::vector<Phase> phases(4);
  phases[0].items = {item("input ids", n, 1, DType::I64, "tokens")};
  phases[1].items = {item("normalised input", n, a.hidden_size, dt, "tokens"),
                     item("q", n, q_cols, dt, "tokens"), item("k", n, kv_cols, dt, "tokens"),
                     item("v", n, kv_cols, dt, "tokens"), item("attention output", n, q_cols, dt, "tokens")};
  phases[2].items = {item("normalised input", n, a.hidden_size, dt, "tokens"),
                     item("mlp gate", n, a.intermediate_size, dt, "tokens"),
                     item("mlp up", n, a.intermediate_size, dt, "tokens")};
  phases[3].items = {item("logits", n, a.vocab_size, dt, "tokens")};
  return peak_of(state, phases);
}

// What runner/src/models/flux.cpp allocates (N = batch * (Tt + Ti) rows, text and image tokens of
// each sample together; F = 4D):
//   state (begin): stream [N, D]; temb c and SiLU(c) [B, D]; RoPE cos, sin [Tt + Ti, hd] F32;
//     sample [B Ti, p^2 out]
//   x_embedder: input [B Ti, in]; context_embedder: input [B Tt, joint]
//   time_text_embed: sinusoid [B, 256], two [B, D], pooled input [B, pooled]
//   double block: modulation 2 x [B, 6D]; then norm/attention output, q, k, v [N, D] (attention),
//     or norm, projection [N, D] + FF hidden [N, F] (MLP)
//   single block: modulation [B, 3D]; norm [N, D]; [attention | MLP] [N, D + F]; q, k, v [N, D]
//   norm_out: normalised image tokens [B Ti, D] + modulation [B, 2D]; proj_out: the former
std::vector<ActivationItem> flux_items(const FluxArch& a, int64_t batch, int64_t tokens, DType dt) {
  const int64_t tt = a.text_tokens, t = tt + tokens, n = batch * t, d = a.dim(), f = 4 * d;
  const int64_t c = a.patch_size * a.patch_size * a.out_channels;
  const std::vector<ActivationItem> state = {item("residual stream (text + image)", n, d, dt, "tokens"),
                                             item("temb", batch, d, dt, "samples"),
                                             item("silu(temb)", batch, d, dt, "samples"),
                                             item("rope cos", t, a.head_dim, DType::F32, "tokens"),
                                             item("rope sin", t, a.head_dim, DType::F32, "tokens"),
                                             item("output sample", batch * tokens, c, dt, "tokens")};
  std::vector<Phase> phases(7);
  phases[0].items = {item("image input", batch * tokens, a.in_channels, dt, "tokens")};
  phases[1].items = {item("timestep sinusoid", batch, 256, dt, "samples"),
                     item("embedder hidden", batch, d, dt, "samples"),
                     item("embedding", batch, d, dt, "samples"),
                     item("pooled input", batch, a.pooled_projection_dim, dt, "samples")};
  phases[2].items = {item("text input", batch * tt, a.joint_attention_dim, dt, "tokens")};
  phases[3].items = {item("modulation (image)", batch, 6 * d, dt, "samples"),
                     item("modulation (text)", batch, 6 * d, dt, "samples"),
                     item("normalised input / attention output", n, d, dt, "tokens"),
                     item("q / projection", n, d, dt, "tokens")};
  phases[4] = phases[3];
  phases[3].items.push_back(item("k", n, d, dt, "tokens"));
  phases[3].items.push_back(item("v", n, d, dt, "tokens"));
  phases[4].items.push_back(item("ff hidden", n, f, dt, "tokens"));
  phases[5].items = {item("modulation (single)", batch, 3 * d, dt, "samples"),
                     item("normalised input / projection", n, d, dt, "tokens"),
                     item("[attention output | mlp hidden]", n, d + f, dt, "tokens"),
                     item("q", n, d, dt, "tokens"),
                     item("k", n, d, dt, "tokens"),
                     item("v", n, d, dt, "tokens")};
  phases[6].items = {item("normalised image tokens", batch * tokens, d, dt, "tokens"),
                     item("modulation (norm_out)", batch, 2 * d, dt, "samples")};
  if (a.n_double == 0) {
    phases[3].items.clear();
    phases[4].items.clear();
  }
  if (a.n_single == 0) phases[5].items.clear();
  return peak_of(state, phases);
}

// What runner/src/models/t5.cpp allocates (N = batch * tokens rows, inner = H d_kv):
//   state (begin): h [N, D] (F32 for fp16 models: the fp32 `wo` makes the stream fp32); position
//     bias [H T, T]; the attention mask [B, T] I64 (ones when none is given)
//   shared: ids [N, 1]
//   block 0, before the attention: bucket ids [T T, 1] I64, bias lookup [T T, H]
//   block, attention: z [N, D] (+ an fp16 sum [N, D] for fp16 models); q, k, v, attention
//     output [N, inner]
//   block, FF: z [N, D]; wi_0 (and wi_1 when gated) [N, d_ff] (F32 copy [N, d_ff] and the F32
//     wo output [N, D] for fp16 models)
//   final_layer_norm: the output [N, D]
std::vector<ActivationItem> t5_items(const T5EncoderArch& a, int64_t batch, int64_t tokens, DType dt) {
  const int64_t n = batch * tokens, d = a.d_model, in = a.inner();
  const bool f16 = dt == DType::F16;
  const std::vector<ActivationItem> state = {
      item("residual stream", n, d, f16 ? DType::F32 : dt, "tokens"),
      item("relative position bias", a.n_heads * tokens, tokens, dt, "heads x tokens"),
      item("attention mask", batch, tokens, DType::I64, "samples")};
  std::vector<Phase> phases(5);
  phases[0].items = {item("input ids", n, 1, DType::I64, "tokens")};
  phases[4].items = {item("bucket ids", tokens * tokens, 1, DType::I64, "token pairs"),
                     item("bias lookup", tokens * tokens, a.n_heads, dt, "token pairs")};
  phases[1].items = {item("normalised input", n, d, dt, "tokens")};
  if (f16) phases[1].items.push_back(item("attention sum (fp16)", n, d, dt, "tokens"));
  for (const char* what : {"q", "k", "v", "attention output"})
    phases[1].items.push_back(item(what, n, in, dt, "tokens"));
  phases[2].items = {item("normalised input", n, d, dt, "tokens"),
                     item("ff hidden", n, a.d_ff, dt, "tokens")};
  if (a.gated) phases[2].items.push_back(item("ff linear", n, a.d_ff, dt, "tokens"));
  if (f16) {
    phases[2].items.push_back(item("ff hidden (fp32)", n, a.d_ff, DType::F32, "tokens"));
    phases[2].items.push_back(item("wo output (fp32)", n, d, DType::F32, "tokens"));
  }
  phases[3].items = {item("last hidden state", n, d, dt, "tokens")};
  return peak_of(state, phases);
}

// What runner/src/models/clip.cpp allocates (N = batch * tokens rows):
//   state (begin): h [N, D] (the last hidden state after the final norm); attention mask [B, T] I64
//   embeddings: ids [N, 1]; positions [N, 1] I64; position embeddings [N, D]
//   layer, attention: z [N, D]; q, k, v, attention output [N, D]
//   layer, MLP: z [N, D]; fc1 output [N, I]
std::vector<ActivationItem> clip_items(const ClipTextArch& a, int64_t batch, int64_t tokens, DType dt) {
  const int64_t n = batch * tokens, d = a.hidden_size;
  const std::vector<ActivationItem> state = {item("residual stream", n, d, dt, "tokens"),
                                             item("attention mask", batch, tokens, DType::I64, "samples")};
  std::vector<Phase> phases(3);
  phases[0].items = {item("input ids", n, 1, DType::I64, "tokens"),
                     item("position ids", n, 1, DType::I64, "tokens"),
                     item("position embeddings", n, d, dt, "tokens")};
  phases[1].items = {item("normalised input", n, d, dt, "tokens")};
  for (const char* what : {"q", "k", "v", "attention output"})
    phases[1].items.push_back(item(what, n, d, dt, "tokens"));
  phases[2].items = {item("normalised input", n, d, dt, "tokens"),
                     item("mlp hidden", n, a.intermediate_size, dt, "tokens")};
  return peak_of(state, phases);
}

}  // namespace

std::optional<Arch> arch_of(const Component& component) {
  const std::optional<json>& config = component.config();
  const std::string cls = class_name_of(config);
  if (cls != "LlamaForCausalLM" && cls != "FluxTransformer2DModel" && cls != "T5EncoderModel" &&
      cls != "CLIPTextModel")
    return std::nullopt;
  const ConfigReader r(*config, config_file(component));
  if (cls == "LlamaForCausalLM") return Arch(read_llama(r));
  if (cls == "T5EncoderModel") return Arch(read_t5(r));
  if (cls == "CLIPTextModel") return Arch(read_clip(r, component));
  return Arch(read_flux(r));
}

std::string arch_name(const Arch& arch) {
  switch (arch.index()) {
    case 0: return "LlamaForCausalLM";
    case 1: return "FluxTransformer2DModel";
    case 2: return "T5EncoderModel";
    default: return "CLIPTextModel";
  }
}

DType model_dtype(const Arch& arch, const Component& component) {
  std::string tensor;
  if (std::holds_alternative<LlamaArch>(arch))
    tensor = "model.norm.weight";
  else if (std::holds_alternative<FluxArch>(arch))
    tensor = "norm_out.linear.bias";
  else if (std::holds_alternative<T5EncoderArch>(arch))
    tensor = "encoder.final_layer_norm.weight";
  else
    tensor = std::get<ClipTextArch>(arch).prefix + "final_layer_norm.weight";
  const auto e = component.find(tensor);
  if (!e)
    fail(ErrorKind::InvalidInput, config_file(component), " describes a ", arch_name(arch), " but tensor '",
         tensor, "' is not in the checkpoint");
  const DType dt = component.info(*e).dtype;
  if (dt != DType::BF16 && dt != DType::F16 && dt != DType::F32)
    fail(ErrorKind::Unsupported, "tensor '", tensor, "' is ", dtype_name(dt),
         "; the forward runs in BF16, F16 or F32");
  return dt;
}

int64_t flux_pipeline_tokens(const Arch& component, int64_t tokens) {
  if (const auto* clip = std::get_if<ClipTextArch>(&component)) return std::min(tokens, clip->max_positions);
  if (std::holds_alternative<T5EncoderArch>(component)) return std::min(tokens, kFluxMaxSequenceLength);
  return tokens;
}

std::vector<ActivationItem> activation_items(const Arch& arch, int64_t batch, int64_t tokens, DType dtype) {
  QTOOL_ASSERT(batch > 0 && tokens > 0);
  if (const auto* l = std::get_if<LlamaArch>(&arch)) return llama_items(*l, batch, tokens, dtype);
  if (const auto* t = std::get_if<T5EncoderArch>(&arch)) return t5_items(*t, batch, tokens, dtype);
  if (const auto* c = std::get_if<ClipTextArch>(&arch)) return clip_items(*c, batch, tokens, dtype);
  return flux_items(std::get<FluxArch>(arch), batch, tokens, dtype);
}

uint64_t handover_bytes(const Arch& arch, int64_t batch, int64_t tokens, DType dtype) {
  QTOOL_ASSERT(batch > 0 && tokens > 0);
  const uint64_t e = dtype_size(dtype), b = u(batch), t = u(tokens);
  if (const auto* l = std::get_if<LlamaArch>(&arch))
    return b * t * (u(l->hidden_size) + 2 * u(l->head_dim)) * e;
  if (const auto* t5 = std::get_if<T5EncoderArch>(&arch)) {
    const uint64_t stream = dtype == DType::F16 ? 4 : e;
    return b * t * u(t5->d_model) * stream + u(t5->n_heads) * t * t * e + b * t * 8;
  }
  if (const auto* c = std::get_if<ClipTextArch>(&arch)) return b * t * u(c->hidden_size) * e + b * t * 8;
  const FluxArch& a = std::get<FluxArch>(arch);
  const uint64_t seq = u(a.text_tokens) + t, d = u(a.dim());
  const uint64_t out = u(a.patch_size * a.patch_size * a.out_channels);
  return b * seq * d * e + 2 * b * d * e + 2 * seq * u(a.head_dim) * 4 + b * t * out * e;
}

ForwardFlops forward_flops(const Arch& arch, int64_t batch, int64_t tokens, uint64_t dtype_bytes) {
  ForwardFlops f;
  const auto lin = [](int64_t rows, int64_t in, int64_t out) { return 2 * u(rows) * u(in) * u(out); };
  // Bytes of `rows` x `cols` elements moved `times` (one read or one write each).
  const auto moved = [&](int64_t rows, int64_t cols, int64_t times) {
    return u(rows) * u(cols) * u(times) * dtype_bytes;
  };
  if (const auto* a = std::get_if<LlamaArch>(&arch)) {
    const int64_t n = batch * tokens, d = a->hidden_size, in = a->intermediate_size;
    const int64_t q_cols = a->n_heads * a->head_dim, kv_cols = a->n_kv_heads * a->head_dim;
    const uint64_t layer =
        lin(n, d, q_cols) + 2 * lin(n, d, kv_cols) + lin(n, q_cols, d) + 3 * lin(n, d, a->intermediate_size);
    f.linear = u(a->n_layers) * layer + lin(n, d, a->vocab_size);
    // Causal: half of the 4 * T^2 * H * hd of dense attention.
    f.attention = u(a->n_layers) * u(batch) * 2 * u(tokens) * u(tokens) * u(a->n_heads) * u(a->head_dim);
    // Two RMS norms, RoPE of q and k, SiLU(gate) * up, two residual adds; then the final norm.
    f.activation_bytes =
        u(a->n_layers) * (moved(n, d, 2 * 2 + 2 * 3) + moved(n, q_cols + kv_cols, 2) + moved(n, in, 3)) +
        moved(n, d, 2);
    return f;
  }
  if (const auto* a = std::get_if<T5EncoderArch>(&arch)) {
    const int64_t n = batch * tokens, d = a->d_model, in = a->inner();
    const uint64_t layer = 4 * lin(n, d, in) + (a->gated ? 3 : 2) * lin(n, d, a->d_ff);
    f.linear = u(a->n_layers) * layer;
    f.attention = u(a->n_layers) * u(batch) * 4 * u(tokens) * u(tokens) * u(in);
    // Two RMS norms, two residual adds, the feed-forward's activation (gated: act(gate) * up).
    f.activation_bytes =
        u(a->n_layers) * (moved(n, d, 2 * 2 + 2 * 3) + moved(n, a->d_ff, a->gated ? 3 : 2)) + moved(n, d, 2);
    return f;
  }
  if (const auto* a = std::get_if<ClipTextArch>(&arch)) {
    const int64_t n = batch * tokens, d = a->hidden_size, in = a->intermediate_size;
    f.linear = u(a->n_layers) * (4 * lin(n, d, d) + 2 * lin(n, d, a->intermediate_size));
    // Causal: half of dense attention.
    f.attention = u(a->n_layers) * u(batch) * 2 * u(tokens) * u(tokens) * u(d);
    // Two layer norms, two residual adds, QuickGELU over fc1's output (the linears' biases are
    // added in the GEMM's epilogue: no pass of their own).
    f.activation_bytes = u(a->n_layers) * (moved(n, d, 2 * 2 + 2 * 3) + moved(n, in, 2)) + moved(n, d, 2);
    return f;
  }
  const FluxArch& a = std::get<FluxArch>(arch);
  const int64_t d = a.dim(), ff = 4 * d, tt = a.text_tokens, t = tt + tokens, n = batch * t;
  const int64_t c = a.patch_size * a.patch_size * a.out_channels;
  const uint64_t embed = lin(batch, 256, d) + lin(batch, d, d);
  f.linear = lin(batch * tokens, a.in_channels, d) + embed * (a.guidance_embeds ? 2 : 1) +
             lin(batch, a.pooled_projection_dim, d) + lin(batch, d, d) +
             lin(batch * tt, a.joint_attention_dim, d);
  const uint64_t dbl = 2 * lin(batch, d, 6 * d) + 4 * lin(n, d, d) + lin(n, d, ff) + lin(n, ff, d);
  const uint64_t sgl = lin(batch, d, 3 * d) + 3 * lin(n, d, d) + lin(n, d, ff) + lin(n, d + ff, d);
  f.linear += u(a.n_double) * dbl + u(a.n_single) * sgl + lin(batch, d, 2 * d) + lin(batch * tokens, d, c);
  f.attention = u(a.n_double + a.n_single) * u(batch) * 4 * u(t) * u(t) * u(d);
  // Per double block, in units of n x d: two modulations (2 each), the q/k RMS norms and RoPE
  // (4 + 4), two gated residuals (3 each). Per single block: one modulation, the norms and RoPE,
  // one gated residual. The biases and the MLP's GELU-tanh are applied in the GEMMs' epilogues
  // (the CUDA backend's linear_act): no pass of their own.
  f.activation_bytes =
      u(a.n_double) * moved(n, d, 2 * 2 + 8 + 2 * 3) + u(a.n_single) * moved(n, d, 2 + 8 + 3);
  return f;
}

}  // namespace qtool::planner
