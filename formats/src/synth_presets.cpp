// The synthetic presets: tensor names and shapes of the real model definitions (diffusers'
// FluxTransformer2DModel and AutoencoderKL; transformers' CLIPTextModel, T5EncoderModel and
// LlamaForCausalLM), in their state_dict order, with the config files those libraries write.
#include <algorithm>
#include <array>
#include <cmath>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "qtool/formats/error.hpp"
#include "qtool/formats/synth.hpp"
#include "synth_tokenizers.hpp"

namespace qtool {
namespace {

using nlohmann::json;

constexpr uint64_t kGB = 1'000'000'000;  // diffusers/transformers max_shard_size "5GB" is decimal
constexpr const char* kDiffusersVersion = "0.30.0.dev0";
constexpr const char* kFluxTransformersVersion = "4.43.3";

// max(lo, m * round(n * s / m)): the one rounding rule of --scale (see synth.hpp).
int64_t scaled(int64_t n, double s, int64_t m, int64_t lo) {
  const auto v = static_cast<int64_t>(std::llround(static_cast<double>(n) * s / static_cast<double>(m))) * m;
  return std::max(lo, v);
}

// Appends tensor declarations in state_dict order.
class Builder {
 public:
  Builder(std::vector<SynthTensor>& out, DType dtype) : out_(out), dtype_(dtype) {}

  void add(std::string name, std::vector<int64_t> shape, SynthInit init) {
    out_.push_back(SynthTensor{TensorDecl{std::move(name), dtype_, std::move(shape)}, init});
  }
  void weight(const std::string& name, std::vector<int64_t> shape) {
    add(name, std::move(shape), SynthInit::Weight);
  }
  void linear(const std::string& prefix, int64_t out, int64_t in, bool bias = true) {
    weight(prefix + ".weight", {out, in});
    if (bias) add(prefix + ".bias", {out}, SynthInit::Bias);
  }
  void conv(const std::string& prefix, int64_t out, int64_t in, int64_t k) {
    weight(prefix + ".weight", {out, in, k, k});
    add(prefix + ".bias", {out}, SynthInit::Bias);
  }
  // An attention's query, key, value and output projections, `names` in that order under
  // `prefix`: `hidden` inputs to a query `width` and keys and values `kv_width` wide, and the
  // output back from `width` to `hidden`.
  void attention(const std::string& prefix, const std::array<const char*, 4>& names, int64_t hidden,
                 int64_t width, int64_t kv_width, bool bias = true) {
    linear(prefix + names[0], width, hidden, bias);
    linear(prefix + names[1], kv_width, hidden, bias);
    linear(prefix + names[2], kv_width, hidden, bias);
    linear(prefix + names[3], hidden, width, bias);
  }
  // A gated MLP's gate, up and down projections, `names` in that order under `prefix`, without
  // bias: `hidden` to `width` twice, and back.
  void gated_mlp(const std::string& prefix, const std::array<const char*, 3>& names, int64_t hidden,
                 int64_t width) {
    linear(prefix + names[0], width, hidden, false);
    linear(prefix + names[1], width, hidden, false);
    linear(prefix + names[2], hidden, width, false);
  }
  // LayerNorm / GroupNorm (weight and bias) or RMSNorm (weight only).
  void norm(const std::string& prefix, int64_t n, bool bias = true) {
    add(prefix + ".weight", {n}, SynthInit::NormWeight);
    if (bias) add(prefix + ".bias", {n}, SynthInit::Bias);
  }

 private:
  std::vector<SynthTensor>& out_;
  DType dtype_;
};

std::string idx(const std::string& prefix, int64_t i) { return prefix + "." + std::to_string(i); }

// A pipeline component ("" for a single model) of `library` ("diffusers" or "transformers").
SynthComponent component(std::string name, std::string library, std::string class_name) {
  SynthComponent c;
  c.name = std::move(name);
  c.library = std::move(library);
  c.class_name = std::move(class_name);
  return c;
}

// A component with weights: its library's weights file base name and default shard size
// (diffusers: diffusion_pytorch_model, 10 GB; transformers: model, 5 GB).
SynthComponent weighted_component(std::string name, std::string library, std::string class_name,
                                  uint64_t published_params) {
  SynthComponent c = component(std::move(name), std::move(library), std::move(class_name));
  const bool diffusers = c.library == "diffusers";
  c.weights_base = diffusers ? "diffusion_pytorch_model" : "model";
  c.default_max_shard_size = (diffusers ? 10 : 5) * kGB;
  c.published_params = published_params;
  return c;
}

// --- FLUX.1 transformer (diffusers FluxTransformer2DModel) ---

struct FluxDims {
  int64_t heads = 24;
  int64_t head_dim = 128;
  std::vector<int64_t> axes_dims_rope = {16, 56, 56};  // sums to head_dim
  int64_t layers = 19;
  int64_t single_layers = 38;
  int64_t in_channels = 64;  // 16 latent channels in 2x2 patches
  int64_t pooled_projection_dim = 768;
  int64_t joint_attention_dim = 4096;
  bool guidance_embeds = true;
};

SynthComponent flux_transformer(const FluxDims& d, DType dt) {
  SynthComponent c = weighted_component("transformer", "diffusers", "FluxTransformer2DModel", 11'901'408'320);
  const int64_t D = d.heads * d.head_dim;
  const int64_t kTimeProj = 256;  // Timesteps(num_channels=256)
  Builder b(c.tensors, dt);
  auto embedder = [&](const std::string& p, int64_t in) {
    b.linear(p + ".linear_1", D, in);
    b.linear(p + ".linear_2", D, D);
  };
  embedder("time_text_embed.timestep_embedder", kTimeProj);
  if (d.guidance_embeds) embedder("time_text_embed.guidance_embedder", kTimeProj);
  embedder("time_text_embed.text_embedder", d.pooled_projection_dim);
  b.linear("context_embedder", D, d.joint_attention_dim);
  b.linear("x_embedder", D, d.in_channels);
  for (int64_t i = 0; i < d.layers; ++i) {
    const std::string p = idx("transformer_blocks", i);
    b.linear(p + ".norm1.linear", 6 * D, D);  // AdaLayerNormZero: shift/scale/gate x 2
    b.linear(p + ".norm1_context.linear", 6 * D, D);
    b.norm(p + ".attn.norm_q", d.head_dim, false);  // RMSNorm over the head dim
    b.norm(p + ".attn.norm_k", d.head_dim, false);
    b.attention(p + ".attn.", {"to_q", "to_k", "to_v", "to_out.0"}, D, D, D);
    b.norm(p + ".attn.norm_added_q", d.head_dim, false);
    b.norm(p + ".attn.norm_added_k", d.head_dim, false);
    b.attention(p + ".attn.", {"add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"}, D, D, D);
    b.linear(p + ".ff.net.0.proj", 4 * D, D);  // GELU(tanh) with mult 4
    b.linear(p + ".ff.net.2", D, 4 * D);
    b.linear(p + ".ff_context.net.0.proj", 4 * D, D);
    b.linear(p + ".ff_context.net.2", D, 4 * D);
  }
  for (int64_t i = 0; i < d.single_layers; ++i) {
    const std::string p = idx("single_transformer_blocks", i);
    b.linear(p + ".norm.linear", 3 * D, D);  // AdaLayerNormZeroSingle
    b.linear(p + ".proj_mlp", 4 * D, D);     // mlp_ratio 4
    b.linear(p + ".proj_out", D, 5 * D);     // attention + mlp concatenated
    b.norm(p + ".attn.norm_q", d.head_dim, false);
    b.norm(p + ".attn.norm_k", d.head_dim, false);
    b.linear(p + ".attn.to_q", D, D);
    b.linear(p + ".attn.to_k", D, D);
    b.linear(p + ".attn.to_v", D, D);
  }
  b.linear("norm_out.linear", 2 * D, D);   // AdaLayerNormContinuous: scale, shift
  b.linear("proj_out", d.in_channels, D);  // patch_size^2 * out_channels (= in_channels)

  c.json_files["config.json"] = json{
      {"_class_name", c.class_name},
      {"_diffusers_version", kDiffusersVersion},
      {"attention_head_dim", d.head_dim},
      {"axes_dims_rope", d.axes_dims_rope},
      {"guidance_embeds", d.guidance_embeds},
      {"in_channels", d.in_channels},
      {"joint_attention_dim", d.joint_attention_dim},
      {"num_attention_heads", d.heads},
      {"num_layers", d.layers},
      {"num_single_layers", d.single_layers},
      {"out_channels", nullptr},
      {"patch_size", 1},
      {"pooled_projection_dim", d.pooled_projection_dim},
  };
  return c;
}

// --- AutoencoderKL (diffusers), FLUX's variant: 16 latent channels, no quant convs ---

struct VaeDims {
  std::vector<int64_t> channels = {128, 256, 512, 512};  // block_out_channels
  int64_t layers_per_block = 2;
  int64_t latent_channels = 16;
  int64_t norm_num_groups = 32;
  int64_t image_channels = 3;
};

SynthComponent flux_vae(const VaeDims& d, DType dt) {
  SynthComponent c = weighted_component("vae", "diffusers", "AutoencoderKL", 83'819'683);
  Builder b(c.tensors, dt);
  auto resnet = [&](const std::string& p, int64_t in, int64_t out) {  // ResnetBlock2D
    b.norm(p + ".norm1", in);
    b.conv(p + ".conv1", out, in, 3);
    b.norm(p + ".norm2", out);
    b.conv(p + ".conv2", out, out, 3);
    if (in != out) b.conv(p + ".conv_shortcut", out, in, 1);
  };
  auto mid_block = [&](const std::string& p, int64_t ch) {  // UNetMidBlock2D, one attention
    b.norm(p + ".attentions.0.group_norm", ch);
    b.attention(p + ".attentions.0.", {"to_q", "to_k", "to_v", "to_out.0"}, ch, ch, ch);
    resnet(p + ".resnets.0", ch, ch);
    resnet(p + ".resnets.1", ch, ch);
  };
  const auto& ch = d.channels;
  const auto n_blocks = static_cast<int64_t>(ch.size());
  // Encoder: conv_in, down blocks (a downsampler on all but the last), mid block, 2*latent out.
  b.conv("encoder.conv_in", ch[0], d.image_channels, 3);
  int64_t prev = ch[0];
  for (int64_t i = 0; i < n_blocks; ++i) {
    const std::string p = idx("encoder.down_blocks", i);
    for (int64_t j = 0; j < d.layers_per_block; ++j)
      resnet(idx(p + ".resnets", j), j == 0 ? prev : ch[i], ch[i]);
    if (i + 1 < n_blocks) b.conv(p + ".downsamplers.0.conv", ch[i], ch[i], 3);
    prev = ch[i];
  }
  mid_block("encoder.mid_block", ch.back());
  b.norm("encoder.conv_norm_out", ch.back());
  b.conv("encoder.conv_out", 2 * d.latent_channels, ch.back(), 3);
  // Decoder: channels reversed; up blocks (layers_per_block + 1 resnets, an upsampler on all
  // but the last) are registered before the mid block.
  std::vector<int64_t> rev(ch.rbegin(), ch.rend());
  b.conv("decoder.conv_in", rev[0], d.latent_channels, 3);
  prev = rev[0];
  for (int64_t i = 0; i < n_blocks; ++i) {
    const std::string p = idx("decoder.up_blocks", i);
    for (int64_t j = 0; j <= d.layers_per_block; ++j)
      resnet(idx(p + ".resnets", j), j == 0 ? prev : rev[i], rev[i]);
    if (i + 1 < n_blocks) b.conv(p + ".upsamplers.0.conv", rev[i], rev[i], 3);
    prev = rev[i];
  }
  mid_block("decoder.mid_block", rev[0]);
  b.norm("decoder.conv_norm_out", rev.back());
  b.conv("decoder.conv_out", d.image_channels, rev.back(), 3);

  c.json_files["config.json"] = json{
      {"_class_name", c.class_name},
      {"_diffusers_version", kDiffusersVersion},
      {"act_fn", "silu"},
      {"block_out_channels", ch},
      {"down_block_types", std::vector<std::string>(ch.size(), "DownEncoderBlock2D")},
      {"force_upcast", true},
      {"in_channels", d.image_channels},
      {"latent_channels", d.latent_channels},
      {"latents_mean", nullptr},
      {"latents_std", nullptr},
      {"layers_per_block", d.layers_per_block},
      {"mid_block_add_attention", true},
      {"norm_num_groups", d.norm_num_groups},
      {"out_channels", d.image_channels},
      {"sample_size", 1024},
      {"scaling_factor", 0.3611},
      {"shift_factor", 0.1159},
      {"up_block_types", std::vector<std::string>(ch.size(), "UpDecoderBlock2D")},
      {"use_post_quant_conv", false},
      {"use_quant_conv", false},
  };
  return c;
}

// The sizes the text models (CLIP, T5, Llama) share, under their own names in each config.
struct TextDims {
  int64_t heads;
  int64_t head_dim;      // T5: d_kv
  int64_t intermediate;  // the MLP's width; T5: d_ff
  int64_t layers;
  int64_t vocab;
  int64_t hidden() const { return heads * head_dim; }  // T5: d_model
};

// --scale on a text model: widths and depths shrink, head dims stay.
TextDims scale_text(TextDims d, double s) {
  d.heads = scaled(d.heads, s, 1, 1);
  d.intermediate = scaled(d.intermediate, s, 64, 64);
  d.layers = scaled(d.layers, s, 1, 2);
  d.vocab = scaled(d.vocab, s, 64, 1024);
  return d;
}

// --- CLIPTextModel (transformers), CLIP ViT-L/14's text tower ---

struct ClipDims {
  TextDims text{.heads = 12, .head_dim = 64, .intermediate = 3072, .layers = 12, .vocab = 49408};
  int64_t max_positions = 77;
};

SynthComponent clip_text(const ClipDims& d, DType dt) {
  SynthComponent c = weighted_component("text_encoder", "transformers", "CLIPTextModel", 123'060'480);
  const TextDims& t = d.text;
  const int64_t H = t.hidden();
  Builder b(c.tensors, dt);
  // Hub checkpoints keep the CLIPTextTransformer under "text_model." (transformers maps it).
  b.weight("text_model.embeddings.token_embedding.weight", {t.vocab, H});
  b.weight("text_model.embeddings.position_embedding.weight", {d.max_positions, H});
  for (int64_t i = 0; i < t.layers; ++i) {
    const std::string p = idx("text_model.encoder.layers", i);
    b.linear(p + ".self_attn.k_proj", H, H);
    b.linear(p + ".self_attn.v_proj", H, H);
    b.linear(p + ".self_attn.q_proj", H, H);
    b.linear(p + ".self_attn.out_proj", H, H);
    b.norm(p + ".layer_norm1", H);
    b.linear(p + ".mlp.fc1", t.intermediate, H);
    b.linear(p + ".mlp.fc2", H, t.intermediate);
    b.norm(p + ".layer_norm2", H);
  }
  b.norm("text_model.final_layer_norm", H);

  c.json_files["config.json"] = json{
      {"_name_or_path", "openai/clip-vit-large-patch14"},
      {"architectures", {c.class_name}},
      {"attention_dropout", 0.0},
      {"bos_token_id", 0},
      {"dropout", 0.0},
      {"eos_token_id", 2},
      {"hidden_act", "quick_gelu"},
      {"hidden_size", H},
      {"initializer_factor", 1.0},
      {"initializer_range", 0.02},
      {"intermediate_size", t.intermediate},
      {"layer_norm_eps", 1e-05},
      {"max_position_embeddings", d.max_positions},
      {"model_type", "clip_text_model"},
      {"num_attention_heads", t.heads},
      {"num_hidden_layers", t.layers},
      {"pad_token_id", 1},
      {"projection_dim", H},
      {"torch_dtype", std::string(dtype_torch_name(dt))},
      {"transformers_version", kFluxTransformersVersion},
      {"vocab_size", t.vocab},
  };
  return c;
}

// --- T5EncoderModel (transformers), T5 v1.1 XXL's encoder ---

struct T5Dims {
  TextDims text{.heads = 64, .head_dim = 64, .intermediate = 10240, .layers = 24, .vocab = 32128};
  int64_t buckets = 32;
};

SynthComponent t5_encoder(const T5Dims& d, DType dt) {
  SynthComponent c = weighted_component("text_encoder_2", "transformers", "T5EncoderModel", 4'762'310'656);
  const TextDims& t = d.text;
  const int64_t M = t.hidden(), inner = t.heads * t.head_dim;
  Builder b(c.tensors, dt);
  // encoder.embed_tokens.weight is tied to shared.weight and not saved.
  b.weight("shared.weight", {t.vocab, M});
  for (int64_t i = 0; i < t.layers; ++i) {
    const std::string p = idx("encoder.block", i);
    b.attention(p + ".layer.0.SelfAttention.", {"q", "k", "v", "o"}, M, inner, inner, false);
    if (i == 0) b.weight(p + ".layer.0.SelfAttention.relative_attention_bias.weight", {d.buckets, t.heads});
    b.norm(p + ".layer.0.layer_norm", M, false);  // T5LayerNorm: RMS, weight only
    b.gated_mlp(p + ".layer.1.DenseReluDense.", {"wi_0", "wi_1", "wo"}, M, t.intermediate);
    b.norm(p + ".layer.1.layer_norm", M, false);
  }
  b.norm("encoder.final_layer_norm", M, false);

  c.json_files["config.json"] = json{
      {"_name_or_path", "google/t5-v1_1-xxl"},
      {"architectures", {c.class_name}},
      {"classifier_dropout", 0.0},
      {"d_ff", t.intermediate},
      {"d_kv", t.head_dim},
      {"d_model", M},
      {"decoder_start_token_id", 0},
      {"dense_act_fn", "gelu_new"},
      {"dropout_rate", 0.1},
      {"eos_token_id", 1},
      {"feed_forward_proj", "gated-gelu"},
      {"initializer_factor", 1.0},
      {"is_encoder_decoder", true},
      {"is_gated_act", true},
      {"layer_norm_epsilon", 1e-06},
      {"model_type", "t5"},
      {"num_decoder_layers", t.layers},
      {"num_heads", t.heads},
      {"num_layers", t.layers},
      {"output_past", true},
      {"pad_token_id", 0},
      {"relative_attention_max_distance", 128},
      {"relative_attention_num_buckets", d.buckets},
      {"tie_word_embeddings", false},
      {"torch_dtype", std::string(dtype_torch_name(dt))},
      {"transformers_version", kFluxTransformersVersion},
      {"use_cache", true},
      {"vocab_size", t.vocab},
  };
  return c;
}

// --- The non-weight pipeline components ---

SynthComponent flux_scheduler() {
  SynthComponent c = component("scheduler", "diffusers", "FlowMatchEulerDiscreteScheduler");
  c.json_files["scheduler_config.json"] = json{
      {"_class_name", c.class_name},  {"_diffusers_version", kDiffusersVersion},
      {"base_image_seq_len", 256},    {"base_shift", 0.5},
      {"max_image_seq_len", 4096},    {"max_shift", 1.15},
      {"num_train_timesteps", 1000},  {"shift", 3.0},
      {"use_dynamic_shifting", true},
  };
  return c;
}

SynthComponent clip_tokenizer(int64_t max_positions) {
  SynthComponent c = component("tokenizer", "transformers", "CLIPTokenizer");
  synth_detail::add_clip_tokenizer_files(c, max_positions);
  return c;
}

SynthComponent t5_tokenizer() {
  SynthComponent c = component("tokenizer_2", "transformers", "T5TokenizerFast");
  synth_detail::add_t5_tokenizer_files(c);
  return c;
}

// --- LlamaForCausalLM (transformers) ---

struct LlamaDims {
  TextDims text{.heads = 32, .head_dim = 128, .intermediate = 14336, .layers = 32, .vocab = 128256};
  int64_t kv_heads = 8;
  int64_t max_positions = 8192;
  double rope_theta = 500000.0;
  json rope_scaling = nullptr;
  bool tie = false;
};

SynthComponent llama(const LlamaDims& d, DType dt, uint64_t published, uint64_t max_shard,
                     const char* version) {
  SynthComponent c = weighted_component("", "transformers", "LlamaForCausalLM", published);
  c.default_max_shard_size = max_shard;
  const TextDims& t = d.text;
  const int64_t H = t.hidden(), kv = d.kv_heads * t.head_dim;
  Builder b(c.tensors, dt);
  b.weight("model.embed_tokens.weight", {t.vocab, H});
  for (int64_t i = 0; i < t.layers; ++i) {
    const std::string p = idx("model.layers", i);
    b.attention(p + ".self_attn.", {"q_proj", "k_proj", "v_proj", "o_proj"}, H, H, kv, false);
    b.gated_mlp(p + ".mlp.", {"gate_proj", "up_proj", "down_proj"}, H, t.intermediate);
    b.norm(p + ".input_layernorm", H, false);
    b.norm(p + ".post_attention_layernorm", H, false);
  }
  b.norm("model.norm", H, false);
  if (!d.tie) b.weight("lm_head.weight", {t.vocab, H});

  // Llama 3 keeps its special tokens in the last 256 ids; so do the scaled vocabularies.
  const int64_t bos = t.vocab - 256, eos = t.vocab - 255;
  c.json_files["config.json"] = json{
      {"architectures", {c.class_name}},
      {"attention_bias", false},
      {"attention_dropout", 0.0},
      {"bos_token_id", bos},
      {"eos_token_id", eos},
      {"head_dim", t.head_dim},
      {"hidden_act", "silu"},
      {"hidden_size", H},
      {"initializer_range", 0.02},
      {"intermediate_size", t.intermediate},
      {"max_position_embeddings", d.max_positions},
      {"mlp_bias", false},
      {"model_type", "llama"},
      {"num_attention_heads", t.heads},
      {"num_hidden_layers", t.layers},
      {"num_key_value_heads", d.kv_heads},
      {"pretraining_tp", 1},
      {"rms_norm_eps", 1e-05},
      {"rope_scaling", d.rope_scaling},
      {"rope_theta", d.rope_theta},
      {"tie_word_embeddings", d.tie},
      {"torch_dtype", std::string(dtype_torch_name(dt))},
      {"transformers_version", version},
      {"use_cache", true},
      {"vocab_size", t.vocab},
  };
  c.json_files["generation_config.json"] = json{
      {"bos_token_id", bos},
      {"do_sample", true},
      {"eos_token_id", eos},
      {"max_length", 4096},
      {"temperature", 0.6},
      {"top_p", 0.9},
      {"transformers_version", version},
  };
  return c;
}

// Llama's heads shrink by their key/value heads, keeping the query heads per key/value head.
LlamaDims scale_llama(LlamaDims d, double s) {
  const int64_t group = d.text.heads / d.kv_heads;
  d.text = scale_text(d.text, s);
  d.kv_heads = scaled(d.kv_heads, s, 1, 1);
  d.text.heads = d.kv_heads * group;
  return d;
}

struct FluxPipelineDims {
  FluxDims transformer;
  ClipDims clip;
  T5Dims t5;
  VaeDims vae;
};

FluxPipelineDims scale_flux(FluxPipelineDims d, double s) {
  d.clip.text = scale_text(d.clip.text, s);
  d.t5.text = scale_text(d.t5.text, s);
  d.transformer.heads = scaled(d.transformer.heads, s, 1, 1);
  d.transformer.layers = scaled(d.transformer.layers, s, 1, 2);
  d.transformer.single_layers = scaled(d.transformer.single_layers, s, 1, 2);
  for (auto& ch : d.vae.channels) ch = scaled(ch, s, d.vae.norm_num_groups, d.vae.norm_num_groups);
  d.vae.layers_per_block = scaled(d.vae.layers_per_block, s, 1, 1);
  return d;
}

FluxPipelineDims tiny_flux_dims() {
  FluxPipelineDims d;
  d.transformer.heads = 2;
  d.transformer.head_dim = 32;
  d.transformer.axes_dims_rope = {8, 12, 12};
  d.transformer.layers = 2;
  d.transformer.single_layers = 2;
  d.clip.text = {.heads = 2, .head_dim = 32, .intermediate = 256, .layers = 2, .vocab = 1024};
  d.t5.text = {.heads = 2, .head_dim = 32, .intermediate = 128, .layers = 2, .vocab = 1024};
  d.vae.channels = {32, 32, 64, 64};
  d.vae.layers_per_block = 1;
  return d;
}

LlamaDims tiny_llama_dims() {
  LlamaDims d;
  d.text = {.heads = 8, .head_dim = 32, .intermediate = 704, .layers = 4, .vocab = 1024};
  d.kv_heads = 4;
  d.max_positions = 2048;
  return d;
}

LlamaDims llama32_1b_dims() {
  LlamaDims d;
  d.text = {.heads = 32, .head_dim = 64, .intermediate = 8192, .layers = 16, .vocab = 128256};
  d.kv_heads = 8;
  d.max_positions = 131072;
  d.rope_scaling = json{{"factor", 32.0},
                        {"high_freq_factor", 4.0},
                        {"low_freq_factor", 1.0},
                        {"original_max_position_embeddings", 8192},
                        {"rope_type", "llama3"}};
  d.tie = true;
  return d;
}

std::vector<SynthComponent> flux_components(const FluxPipelineDims& in, DType dt) {
  FluxPipelineDims d = in;
  // The transformer's text inputs are the text encoders' outputs.
  d.transformer.joint_attention_dim = d.t5.text.hidden();
  d.transformer.pooled_projection_dim = d.clip.text.hidden();
  std::vector<SynthComponent> out;
  out.push_back(flux_scheduler());
  out.push_back(clip_text(d.clip, dt));
  out.push_back(t5_encoder(d.t5, dt));
  out.push_back(clip_tokenizer(d.clip.max_positions));
  out.push_back(t5_tokenizer());
  out.push_back(flux_transformer(d.transformer, dt));
  out.push_back(flux_vae(d.vae, dt));
  return out;
}

// At scale < 1 the default shard size shrinks with the component, so a scaled checkpoint keeps
// the real one's shard count.
void scale_shard_defaults(std::vector<SynthComponent>& scaled_components,
                          const std::vector<SynthComponent>& full) {
  for (size_t i = 0; i < scaled_components.size(); ++i) {
    auto& c = scaled_components[i];
    if (c.default_max_shard_size == 0 || full[i].n_params() == 0) continue;
    const double ratio = static_cast<double>(c.n_params()) / static_cast<double>(full[i].n_params());
    c.default_max_shard_size = std::max<uint64_t>(
        1, static_cast<uint64_t>(std::llround(static_cast<double>(c.default_max_shard_size) * ratio)));
  }
}

void clear_published(std::vector<SynthComponent>& components) {
  for (auto& c : components) c.published_params = 0;
}

const std::vector<SynthPresetInfo> kPresets = {
    {"flux",
     "FLUX.1-dev-like diffusers pipeline: transformer (11.90B), CLIP-L text_encoder, T5-XXL text_encoder_2, "
     "vae, scheduler, tokenizers"},
    {"tiny-flux", "a flux pipeline of a few MB, 2 blocks per block list, for tests"},
    {"llama", "Llama-3-8B-like LlamaForCausalLM (8.03B, 4 shards)"},
    {"llama-tied", "Llama-3.2-1B-like LlamaForCausalLM with tied embeddings (1.24B)"},
    {"tiny", "a Llama-like model of a few MB that transformers loads, for tests"},
};

}  // namespace

const std::vector<SynthPresetInfo>& synth_presets() { return kPresets; }

uint64_t SynthComponent::n_params() const {
  uint64_t n = 0;
  for (const auto& t : tensors) {
    uint64_t e = 1;
    for (int64_t d : t.decl.shape) e *= static_cast<uint64_t>(d);
    n += e;
  }
  return n;
}

uint64_t SynthComponent::n_bytes() const {
  uint64_t n = 0;
  for (const auto& t : tensors) n += t.decl.nbytes();
  return n;
}

const nlohmann::json* SynthComponent::config() const {
  for (const char* f : {"config.json", "scheduler_config.json"}) {
    auto it = json_files.find(f);
    if (it != json_files.end()) return &it->second;
  }
  return nullptr;
}

const SynthComponent* SynthModel::find(std::string_view name) const {
  for (const auto& c : components)
    if (c.name == name) return &c;
  return nullptr;
}

uint64_t SynthModel::n_params() const {
  uint64_t n = 0;
  for (const auto& c : components) n += c.n_params();
  return n;
}

uint64_t SynthModel::n_bytes() const {
  uint64_t n = 0;
  for (const auto& c : components) n += c.n_bytes();
  return n;
}

SynthModel make_synth_model(const SynthSpec& spec) {
  if (!(spec.scale > 0.0 && spec.scale <= 1.0))
    fail(ErrorKind::Usage, "--scale: ", spec.scale, " is outside (0, 1]");
  if (spec.dtype != DType::BF16 && spec.dtype != DType::F16 && spec.dtype != DType::F32)
    fail(ErrorKind::Usage, "--dtype: ", dtype_name(spec.dtype), " is not one of bf16, f16, f32");
  SynthModel m;
  m.preset = spec.preset;
  m.scale = spec.scale;
  m.dtype = spec.dtype;
  const double s = spec.scale;
  const DType dt = spec.dtype;

  if (spec.preset == "flux" || spec.preset == "tiny-flux") {
    m.is_pipeline = true;
    const bool tiny = spec.preset == "tiny-flux";
    auto build = [&](const FluxPipelineDims& d) {
      auto components = flux_components(d, dt);
      if (tiny) {
        clear_published(components);
        // Small shards so that the tests see sharded components with an index.
        for (auto& c : components) {
          if (c.name == "transformer")
            c.default_max_shard_size = 400'000;
          else if (c.name == "text_encoder_2")
            c.default_max_shard_size = 200'000;
        }
      }
      return components;
    };
    const FluxPipelineDims base = tiny ? tiny_flux_dims() : FluxPipelineDims{};
    if (s < 1.0) {
      m.components = build(scale_flux(base, s));
      clear_published(m.components);
      scale_shard_defaults(m.components, build(base));
    } else {
      m.components = build(base);
    }
    if (!spec.components.empty()) {
      std::set<std::string> wanted;
      for (const auto& name : spec.components) {
        bool known = false;
        for (const auto& c : m.components) known = known || c.name == name;
        if (!known) {
          std::string all;
          for (const auto& c : m.components) all += (all.empty() ? "" : ", ") + c.name;
          fail(ErrorKind::Usage, "--components: '", name, "' is not a component of preset '", spec.preset,
               "' (", all, ")");
        }
        wanted.insert(name);
      }
      std::erase_if(m.components, [&](const SynthComponent& c) { return !wanted.count(c.name); });
    }
    m.model_index = json{{"_class_name", "FluxPipeline"}, {"_diffusers_version", kDiffusersVersion}};
    for (const auto& c : m.components) m.model_index[c.name] = json::array({c.library, c.class_name});
    return m;
  }

  LlamaDims base;
  uint64_t published = 0, max_shard = 5 * kGB;
  const char* version = "4.40.0.dev0";
  if (spec.preset == "llama") {
    published = 8'030'261'248;
  } else if (spec.preset == "llama-tied") {
    base = llama32_1b_dims();
    published = 1'235'814'400;
    version = "4.45.0.dev0";
  } else if (spec.preset == "tiny") {
    base = tiny_llama_dims();
    max_shard = 4'000'000;  // two shards, so the tests see an index
  } else {
    std::string all;
    for (const auto& p : kPresets) all += (all.empty() ? "" : ", ") + p.name;
    fail(ErrorKind::Usage, "--preset: unknown preset '", spec.preset, "' (", all, ")");
  }
  if (!spec.components.empty())
    fail(ErrorKind::Usage, "--components: preset '", spec.preset, "' is a single model, not a pipeline");
  m.components.push_back(
      llama(s < 1.0 ? scale_llama(base, s) : base, dt, s < 1.0 ? 0 : published, max_shard, version));
  if (s < 1.0) {
    std::vector<SynthComponent> full{llama(base, dt, published, max_shard, version)};
    scale_shard_defaults(m.components, full);
  }
  return m;
}

}  // namespace qtool
