// The synthetic presets as described (nothing written): parameter counts at scale 1 against the
// published ones, the real models' tensor names, and configs consistent with the shapes at every
// scale.
#include <doctest/doctest.h>

#include <cmath>
#include <map>
#include <regex>
#include <set>
#include <string>
#include <string_view>

#include "qtool/formats/error.hpp"
#include "qtool/formats/synth.hpp"

using qtool::DType;
using qtool::SynthComponent;
using qtool::SynthModel;
using qtool::SynthSpec;
using Shape = std::vector<int64_t>;

namespace {

SynthModel make(const std::string& preset, double scale = 1.0, DType dt = DType::BF16) {
  SynthSpec spec;
  spec.preset = preset;
  spec.scale = scale;
  spec.dtype = dt;
  return qtool::make_synth_model(spec);
}

const SynthComponent& component(const SynthModel& m, std::string_view name) {
  const SynthComponent* c = m.find(name);
  REQUIRE_MESSAGE(c != nullptr, "component '", name, "' missing from ", m.preset);
  return *c;
}

std::map<std::string, Shape> shapes(const SynthComponent& c) {
  std::map<std::string, Shape> out;
  for (const auto& t : c.tensors) {
    CHECK_MESSAGE(out.emplace(t.decl.name, t.decl.shape).second, "duplicate tensor ", t.decl.name);
  }
  return out;
}

Shape shape_of(const std::map<std::string, Shape>& s, const std::string& name) {
  auto it = s.find(name);
  REQUIRE_MESSAGE(it != s.end(), "tensor '", name, "' missing");
  return it->second;
}

// Number of distinct N in names "<prefix>.N.", and that they are 0..N-1.
int64_t count_blocks(const std::map<std::string, Shape>& s, const std::string& prefix) {
  std::set<int64_t> idx;
  const std::regex re("^" + std::regex_replace(prefix, std::regex(R"(\.)"), R"(\.)") + R"(\.(\d+)\.)");
  for (const auto& [name, shape] : s) {
    std::smatch m;
    if (std::regex_search(name, m, re)) idx.insert(std::stoll(m[1].str()));
  }
  if (!idx.empty()) CHECK(*idx.rbegin() == static_cast<int64_t>(idx.size()) - 1);
  return static_cast<int64_t>(idx.size());
}

int64_t j(const nlohmann::json& cfg, const char* key) {
  REQUIRE_MESSAGE(cfg.contains(key), "config key ", key);
  return cfg.at(key).get<int64_t>();
}

void check_within(uint64_t got, double published, double tolerance) {
  const double dev = std::abs(static_cast<double>(got) / published - 1.0);
  CHECK_MESSAGE(dev < tolerance, "params ", got, " vs published ", published, " (", dev * 100, "%)");
}

// --- Consistency checks: every shape re-derived from config.json alone. ---

void check_flux_transformer(const SynthModel& m) {
  const auto& c = component(m, "transformer");
  const auto& cfg = *c.config();
  const auto s = shapes(c);
  const int64_t hd = j(cfg, "attention_head_dim"), D = j(cfg, "num_attention_heads") * hd;
  int64_t axes = 0;
  for (const auto& a : cfg.at("axes_dims_rope")) axes += a.get<int64_t>();
  CHECK(axes == hd);
  CHECK(count_blocks(s, "transformer_blocks") == j(cfg, "num_layers"));
  CHECK(count_blocks(s, "single_transformer_blocks") == j(cfg, "num_single_layers"));
  CHECK(shape_of(s, "x_embedder.weight") == Shape{D, j(cfg, "in_channels")});
  CHECK(shape_of(s, "context_embedder.weight") == Shape{D, j(cfg, "joint_attention_dim")});
  CHECK(shape_of(s, "time_text_embed.text_embedder.linear_1.weight") ==
        Shape{D, j(cfg, "pooled_projection_dim")});
  CHECK(shape_of(s, "time_text_embed.timestep_embedder.linear_1.weight") == Shape{D, 256});
  CHECK(s.count("time_text_embed.guidance_embedder.linear_2.weight") ==
        (cfg.at("guidance_embeds").get<bool>() ? 1u : 0u));
  CHECK(shape_of(s, "transformer_blocks.0.norm1.linear.weight") == Shape{6 * D, D});
  CHECK(shape_of(s, "transformer_blocks.0.attn.norm_added_k.weight") == Shape{hd});
  CHECK(shape_of(s, "transformer_blocks.0.attn.to_add_out.weight") == Shape{D, D});
  CHECK(shape_of(s, "transformer_blocks.0.ff_context.net.0.proj.weight") == Shape{4 * D, D});
  CHECK(shape_of(s, "transformer_blocks.0.ff.net.2.bias") == Shape{D});
  CHECK(shape_of(s, "single_transformer_blocks.0.norm.linear.weight") == Shape{3 * D, D});
  CHECK(shape_of(s, "single_transformer_blocks.0.proj_out.weight") == Shape{D, 5 * D});
  CHECK(shape_of(s, "single_transformer_blocks.0.attn.norm_q.weight") == Shape{hd});
  CHECK(shape_of(s, "norm_out.linear.weight") == Shape{2 * D, D});
  CHECK(shape_of(s, "proj_out.weight") == Shape{j(cfg, "in_channels"), D});
  // The transformer reads the text encoders' outputs and the VAE's latents (2x2 patches).
  if (const auto* t5 = m.find("text_encoder_2"))
    CHECK(j(*t5->config(), "d_model") == j(cfg, "joint_attention_dim"));
  if (const auto* clip = m.find("text_encoder"))
    CHECK(j(*clip->config(), "hidden_size") == j(cfg, "pooled_projection_dim"));
  if (const auto* vae = m.find("vae"))
    CHECK(4 * j(*vae->config(), "latent_channels") == j(cfg, "in_channels"));
}

void check_clip(const SynthModel& m) {
  const auto& c = component(m, "text_encoder");
  const auto& cfg = *c.config();
  const auto s = shapes(c);
  const int64_t H = j(cfg, "hidden_size"), I = j(cfg, "intermediate_size");
  CHECK(H % j(cfg, "num_attention_heads") == 0);
  CHECK(cfg.at("architectures") == nlohmann::json::array({"CLIPTextModel"}));
  CHECK(cfg.at("model_type") == "clip_text_model");
  CHECK(count_blocks(s, "text_model.encoder.layers") == j(cfg, "num_hidden_layers"));
  CHECK(shape_of(s, "text_model.embeddings.token_embedding.weight") == Shape{j(cfg, "vocab_size"), H});
  CHECK(shape_of(s, "text_model.embeddings.position_embedding.weight") ==
        Shape{j(cfg, "max_position_embeddings"), H});
  CHECK(shape_of(s, "text_model.encoder.layers.0.self_attn.q_proj.weight") == Shape{H, H});
  CHECK(shape_of(s, "text_model.encoder.layers.0.mlp.fc1.weight") == Shape{I, H});
  CHECK(shape_of(s, "text_model.encoder.layers.0.mlp.fc2.weight") == Shape{H, I});
  CHECK(shape_of(s, "text_model.final_layer_norm.bias") == Shape{H});
  // The tokenizer's ids fit the embedding.
  if (const auto* tok = m.find("tokenizer")) {
    const auto& vocab = tok->json_files.at("vocab.json");
    for (const auto& [token, id] : vocab.items()) CHECK(id.get<int64_t>() < j(cfg, "vocab_size"));
    CHECK(vocab.at("<|endoftext|>").get<int64_t>() + 1 == static_cast<int64_t>(vocab.size()));
  }
}

void check_t5(const SynthModel& m) {
  const auto& c = component(m, "text_encoder_2");
  const auto& cfg = *c.config();
  const auto s = shapes(c);
  const int64_t M = j(cfg, "d_model"), inner = j(cfg, "num_heads") * j(cfg, "d_kv"), F = j(cfg, "d_ff");
  CHECK(cfg.at("architectures") == nlohmann::json::array({"T5EncoderModel"}));
  CHECK(count_blocks(s, "encoder.block") == j(cfg, "num_layers"));
  CHECK(shape_of(s, "shared.weight") == Shape{j(cfg, "vocab_size"), M});
  CHECK(s.count("encoder.embed_tokens.weight") == 0);  // tied to shared, not saved
  CHECK(shape_of(s, "encoder.block.0.layer.0.SelfAttention.q.weight") == Shape{inner, M});
  CHECK(shape_of(s, "encoder.block.0.layer.0.SelfAttention.o.weight") == Shape{M, inner});
  CHECK(shape_of(s, "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight") ==
        Shape{j(cfg, "relative_attention_num_buckets"), j(cfg, "num_heads")});
  CHECK(s.count("encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight") == 0);
  CHECK(shape_of(s, "encoder.block.0.layer.1.DenseReluDense.wi_0.weight") == Shape{F, M});
  CHECK(shape_of(s, "encoder.block.0.layer.1.DenseReluDense.wi_1.weight") == Shape{F, M});
  CHECK(shape_of(s, "encoder.block.0.layer.1.DenseReluDense.wo.weight") == Shape{M, F});
  CHECK(shape_of(s, "encoder.final_layer_norm.weight") == Shape{M});
  if (const auto* tok = m.find("tokenizer_2"))
    CHECK(static_cast<int64_t>(tok->json_files.at("tokenizer.json").at("model").at("vocab").size()) <=
          j(cfg, "vocab_size"));
}

void check_vae(const SynthModel& m) {
  const auto& c = component(m, "vae");
  const auto& cfg = *c.config();
  const auto s = shapes(c);
  std::vector<int64_t> ch;
  for (const auto& x : cfg.at("block_out_channels")) ch.push_back(x.get<int64_t>());
  const int64_t L = j(cfg, "latent_channels"), lpb = j(cfg, "layers_per_block"),
                G = j(cfg, "norm_num_groups");
  const auto n = static_cast<int64_t>(ch.size());
  for (int64_t x : ch) CHECK(x % G == 0);
  CHECK(static_cast<int64_t>(cfg.at("down_block_types").size()) == n);
  CHECK(shape_of(s, "encoder.conv_in.weight") == Shape{ch[0], j(cfg, "in_channels"), 3, 3});
  CHECK(shape_of(s, "encoder.conv_out.weight") == Shape{2 * L, ch.back(), 3, 3});
  CHECK(shape_of(s, "decoder.conv_in.weight") == Shape{ch.back(), L, 3, 3});
  CHECK(shape_of(s, "decoder.conv_out.weight") == Shape{j(cfg, "out_channels"), ch[0], 3, 3});
  CHECK(count_blocks(s, "encoder.down_blocks") == n);
  CHECK(count_blocks(s, "decoder.up_blocks") == n);
  for (int64_t i = 0; i < n; ++i) {
    CHECK(count_blocks(s, "encoder.down_blocks." + std::to_string(i) + ".resnets") == lpb);
    CHECK(count_blocks(s, "decoder.up_blocks." + std::to_string(i) + ".resnets") == lpb + 1);
    CHECK(shape_of(s, "encoder.down_blocks." + std::to_string(i) + ".resnets.0.conv2.weight") ==
          Shape{ch[i], ch[i], 3, 3});
    CHECK(s.count("encoder.down_blocks." + std::to_string(i) + ".downsamplers.0.conv.weight") ==
          (i + 1 < n ? 1u : 0u));
  }
  CHECK(shape_of(s, "encoder.mid_block.attentions.0.to_q.weight") == Shape{ch.back(), ch.back()});
  CHECK(cfg.at("use_quant_conv") == false);
  CHECK(s.count("quant_conv.weight") == 0);
}

void check_llama(const SynthModel& m, bool tied) {
  REQUIRE(m.components.size() == 1);
  const auto& c = m.components[0];
  CHECK(c.name.empty());
  const auto& cfg = *c.config();
  const auto s = shapes(c);
  const int64_t H = j(cfg, "hidden_size"), hd = j(cfg, "head_dim"), nh = j(cfg, "num_attention_heads"),
                kv = j(cfg, "num_key_value_heads"), V = j(cfg, "vocab_size"), I = j(cfg, "intermediate_size");
  CHECK(cfg.at("architectures") == nlohmann::json::array({"LlamaForCausalLM"}));
  CHECK(cfg.at("model_type") == "llama");
  CHECK(cfg.at("tie_word_embeddings") == tied);
  CHECK(cfg.contains("rope_theta"));
  CHECK(cfg.contains("torch_dtype"));
  CHECK(nh * hd == H);
  CHECK(nh % kv == 0);
  CHECK(j(cfg, "bos_token_id") < V);
  CHECK(j(cfg, "eos_token_id") < V);
  CHECK(count_blocks(s, "model.layers") == j(cfg, "num_hidden_layers"));
  CHECK(shape_of(s, "model.embed_tokens.weight") == Shape{V, H});
  CHECK(shape_of(s, "model.layers.0.self_attn.q_proj.weight") == Shape{nh * hd, H});
  CHECK(shape_of(s, "model.layers.0.self_attn.k_proj.weight") == Shape{kv * hd, H});
  CHECK(shape_of(s, "model.layers.0.self_attn.v_proj.weight") == Shape{kv * hd, H});
  CHECK(shape_of(s, "model.layers.0.self_attn.o_proj.weight") == Shape{H, nh * hd});
  CHECK(shape_of(s, "model.layers.0.mlp.gate_proj.weight") == Shape{I, H});
  CHECK(shape_of(s, "model.layers.0.mlp.down_proj.weight") == Shape{H, I});
  CHECK(shape_of(s, "model.layers.0.post_attention_layernorm.weight") == Shape{H});
  CHECK(shape_of(s, "model.norm.weight") == Shape{H});
  CHECK(s.count("lm_head.weight") == (tied ? 0u : 1u));
  if (!tied) CHECK(shape_of(s, "lm_head.weight") == Shape{V, H});
}

void check_preset(const std::string& preset, double scale) {
  CAPTURE(preset);
  CAPTURE(scale);
  const SynthModel m = make(preset, scale);
  if (m.is_pipeline) {
    check_flux_transformer(m);
    check_clip(m);
    check_t5(m);
    check_vae(m);
    // model_index.json names each component with its library and class.
    for (const auto& c : m.components) {
      CHECK(m.model_index.at(c.name) == nlohmann::json::array({c.library, c.class_name}));
      REQUIRE_FALSE(c.json_files.empty());
    }
    CHECK(m.model_index.at("_class_name") == "FluxPipeline");
  } else {
    check_llama(m, preset == "llama-tied");
  }
  // Block lists keep at least two blocks at any scale.
  for (const auto& c : m.components) {
    const auto s = shapes(c);
    for (const char* list : {"transformer_blocks", "single_transformer_blocks", "encoder.block",
                             "model.layers", "text_model.encoder.layers"}) {
      const int64_t n = count_blocks(s, list);
      if (n) CHECK(n >= 2);
    }
  }
}

}  // namespace

TEST_CASE("synth: parameter counts at scale 1 are within 1% of the published models") {
  const SynthModel flux = make("flux");
  // Published counts: FLUX.1-dev transformer 11.90B, CLIP ViT-L/14 text model 123.06M,
  // T5 v1.1 XXL encoder 4.762B, FLUX.1 VAE 83.82M.
  check_within(component(flux, "transformer").n_params(), 11.90e9, 0.01);
  check_within(component(flux, "text_encoder").n_params(), 123.06e6, 0.01);
  check_within(component(flux, "text_encoder_2").n_params(), 4.762e9, 0.01);
  check_within(component(flux, "vae").n_params(), 83.82e6, 0.01);
  for (const char* c : {"scheduler", "tokenizer", "tokenizer_2"}) CHECK(component(flux, c).tensors.empty());
  // About 34 GB in bf16.
  CHECK(flux.n_bytes() > 33'000'000'000ull);
  CHECK(flux.n_bytes() < 35'000'000'000ull);
  check_within(make("llama").components[0].n_params(), 8.030e9, 0.01);       // Meta-Llama-3-8B
  check_within(make("llama-tied").components[0].n_params(), 1.236e9, 0.01);  // Llama-3.2-1B
  // The counts the presets carry to print beside their own agree too.
  for (const auto& c : flux.components)
    if (c.published_params) check_within(c.n_params(), static_cast<double>(c.published_params), 0.01);
}

TEST_CASE("synth: full-scale flux has the real block lists and names") {
  const SynthModel flux = make("flux");
  const auto s = shapes(component(flux, "transformer"));
  CHECK(count_blocks(s, "transformer_blocks") == 19);
  CHECK(count_blocks(s, "single_transformer_blocks") == 38);
  CHECK(shape_of(s, "transformer_blocks.18.attn.to_q.weight") == Shape{3072, 3072});
  CHECK(shape_of(s, "single_transformer_blocks.37.proj_out.weight") == Shape{3072, 15360});
  CHECK(shape_of(s, "context_embedder.weight") == Shape{3072, 4096});
  CHECK(shape_of(s, "x_embedder.weight") == Shape{3072, 64});
  CHECK(s.size() == 1160);  // diffusers' state_dict of FluxTransformer2DModel (FLUX.1-dev)
  const auto t5 = shapes(component(flux, "text_encoder_2"));
  CHECK(count_blocks(t5, "encoder.block") == 24);
  CHECK(t5.size() == 219);
  CHECK(shapes(component(flux, "text_encoder")).size() == 196);
  CHECK(shapes(component(flux, "vae")).size() == 244);
  const auto llama = shapes(make("llama").components[0]);
  CHECK(llama.size() == 291);
  CHECK(shape_of(llama, "lm_head.weight") == Shape{128256, 4096});
  CHECK(shape_of(llama, "model.layers.31.mlp.up_proj.weight") == Shape{14336, 4096});
}

TEST_CASE("synth: configs are consistent with the shapes at every scale") {
  for (const char* preset : {"flux", "tiny-flux", "llama", "llama-tied", "tiny"})
    for (double scale : {1.0, 0.5, 0.3, 0.1, 0.05, 0.01}) check_preset(preset, scale);
}

TEST_CASE("synth: scaling shrinks widths and depths, never below two blocks") {
  const SynthModel full = make("flux"), half = make("flux", 0.5), small = make("flux", 0.05);
  CHECK(j(*component(half, "transformer").config(), "num_attention_heads") == 12);
  CHECK(j(*component(half, "transformer").config(), "num_layers") == 10);  // round(9.5)
  CHECK(j(*component(half, "transformer").config(), "num_single_layers") == 19);
  CHECK(j(*component(half, "transformer").config(), "attention_head_dim") == 128);
  CHECK(j(*component(small, "transformer").config(), "num_layers") == 2);
  CHECK(j(*component(small, "text_encoder_2").config(), "d_model") == 192);  // 3 heads of 64
  CHECK(half.n_params() < full.n_params() / 4);
  // A scaled flux is small enough for tests (< 64 MB in bf16).
  CHECK(small.n_bytes() < 64'000'000);
  // Published counts are only claimed at scale 1.
  for (const auto& c : small.components) CHECK(c.published_params == 0);
  // Shard defaults shrink with the component: the scaled transformer still has several shards.
  const auto& t = component(small, "transformer");
  CHECK(t.default_max_shard_size < t.n_bytes());
  const SynthModel tiny = make("tiny");
  CHECK(tiny.n_bytes() < 10'000'000);
  CHECK(make("tiny", 0.5).n_bytes() < tiny.n_bytes());
  CHECK(make("tiny-flux").n_bytes() < 10'000'000);
}

TEST_CASE("synth: dtype is applied to every tensor and to torch_dtype") {
  const SynthModel m = make("tiny", 1.0, DType::F16);
  for (const auto& t : m.components[0].tensors) CHECK(t.decl.dtype == DType::F16);
  CHECK(m.components[0].config()->at("torch_dtype") == "float16");
}

TEST_CASE("synth: --components selects pipeline components and model_index.json follows") {
  SynthSpec spec;
  spec.preset = "tiny-flux";
  spec.components = {"vae", "transformer"};
  const SynthModel m = qtool::make_synth_model(spec);
  REQUIRE(m.components.size() == 2);
  CHECK(m.find("vae") != nullptr);
  CHECK(m.find("transformer") != nullptr);
  CHECK(m.model_index.contains("transformer"));
  CHECK_FALSE(m.model_index.contains("text_encoder"));
}

TEST_CASE("synth: bad specs are usage errors naming the option") {
  auto usage = [](SynthSpec spec, const char* option) {
    try {
      qtool::make_synth_model(spec);
      FAIL("no error for ", option);
    } catch (const qtool::Error& e) {
      CHECK(e.kind() == qtool::ErrorKind::Usage);
      CHECK_MESSAGE(std::string(e.what()).find(option) != std::string::npos, e.what());
    }
  };
  SynthSpec s;
  s.preset = "gpt5";
  usage(s, "--preset");
  s.preset = "flux";
  s.scale = 0.0;
  usage(s, "--scale");
  s.scale = 1.5;
  usage(s, "--scale");
  s.scale = std::nan("");
  usage(s, "--scale");
  s.scale = 1.0;
  s.dtype = DType::F8_E4M3;
  usage(s, "--dtype");
  s.dtype = DType::BF16;
  s.components = {"unet"};
  usage(s, "--components");
  s.preset = "llama";
  s.components = {"transformer"};
  usage(s, "--components");
}
