// The real forwards (runner/src/models/) against the frameworks: tiny random LlamaForCausalLM,
// FluxTransformer2DModel, T5EncoderModel and CLIPTextModel checkpoints built, saved and run by
// transformers / diffusers (tests/interop/forward_models.py and forward_encoders.py --set
// committed, stored under data/), run here on the CPU ops
// in exactly the activation memory the planner reserves. Also: the config parsing (arch_of), the
// host-side tables, the inputs' checks, the plan order of units and weights, and the FLOPs.
// Tolerance: qtool's output within twice the framework's own bf16 noise (models_test_util.hpp,
// judge); the figures are printed.
#include <doctest/doctest.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>

#include "model_util.hpp"
#include "models_test_util.hpp"
#include "qtool/planner/module_tree.hpp"
#include "qtool/planner/templates.hpp"
#include "runner_test_util.hpp"

namespace fs = std::filesystem;
using namespace qtool;
using namespace qtool::test;
using nlohmann::json;

namespace {

const fs::path kData = QTOOL_RUNNER_TEST_DATA;

struct Loaded {
  Checkpoint ck;
  std::unique_ptr<runner::Forward> fwd;
  std::map<std::string, runner::HostTensor> vectors;
  const Component& comp() const { return ck.components()[0]; }
};

Loaded load(const std::string& name) {
  Loaded l{Checkpoint::open(kData / name), nullptr, {}};
  l.fwd = runner::make_forward(l.comp());
  REQUIRE(l.fwd);
  l.vectors = read_vectors(kData / name / "vectors.safetensors");
  return l;
}

const char* output_name(const runner::Forward& f) {
  if (f.architecture() == "LlamaForCausalLM") return "logits";
  if (f.architecture() == "FluxTransformer2DModel") return "sample";
  return "last_hidden_state";
}

const std::vector<std::string> kVariants = {"llama_small", "llama_small_tied", "flux_small",
                                            "t5_small",    "clip_small",       "clip_small_eos"};

}  // namespace

TEST_CASE("forwards give the frameworks' outputs on their own tiny checkpoints") {
  ThreadPool pool(2);
  for (const std::string& v : kVariants) {
    CAPTURE(v);
    Loaded l = load(v);
    const auto inputs = inputs_of(*l.fwd, l.vectors);
    const DType dt = planner::model_dtype(l.fwd->arch(), l.comp());
    CHECK(dt == DType::BF16);
    const ForwardRun r = run_forward(*l.fwd, l.comp(), inputs, dt, pool);
    CHECK(r.output.name == output_name(*l.fwd));
    // CLIP adds pooler_output; every output is judged.
    CHECK(r.outputs.size() == (l.fwd->architecture() == "CLIPTextModel" ? 2u : 1u));
    for (const runner::HostTensor& out : r.outputs) {
      CAPTURE(out.name);
      const runner::HostTensor& want = l.vectors.at(out.name);
      CHECK(out.dtype == DType::F32);
      CHECK(out.shape == want.shape);
      const Judgement j = judge(out, l.vectors);
      std::printf(
          "%-17s %s %s: vs the framework max rel %.5f, rms rel %.5f; the framework's bf16 noise max %.5f, "
          "rms %.5f; qtool vs float32 rms %.5f; activation peak %llu of %llu reserved\n",
          v.c_str(), out.name.c_str(), runner::models::shape_str(out.shape).c_str(), j.vs_framework.max_rel,
          j.vs_framework.rms_rel, j.noise.max_rel, j.noise.rms_rel, j.vs_f32.rms_rel,
          static_cast<unsigned long long>(r.peak), static_cast<unsigned long long>(r.reserved));
      CHECK(j.vs_framework.finite);
      CHECK(j.vs_framework.max_rel <= 2 * j.noise.max_rel);
      CHECK(j.vs_framework.rms_rel <= 2 * j.noise.rms_rel);
      CHECK(j.vs_f32.rms_rel <= 1.25 * j.noise.rms_rel);
      CHECK(j.ok);
    }
    // The planner's activation reserve is what the forward holds at its peak.
    CHECK(peak_matches(r.peak, r.reserved));
  }
}

TEST_CASE("every unit's state stays within the output's tolerance of the framework's hooks") {
  // The frameworks' forward hooks (forward_models.py) give each block's output; the state after
  // the matching unit lies within the bound of the final output (twice the framework's bf16
  // noise), the error growing from about one bf16 rounding after the first GEMM.
  ThreadPool pool(2);
  for (const std::string& v : kVariants) {
    Loaded l = load(v);
    const ForwardRun r = run_forward(*l.fwd, l.comp(), inputs_of(*l.fwd, l.vectors), DType::BF16, pool);
    const Judgement j = judge(r.output, l.vectors);
    size_t hooked = 0;
    for (const auto& [name, t] : l.vectors) hooked += name.starts_with("stage.");
    CHECK(r.stages.size() == hooked);
    for (const runner::HostTensor& s : r.stages) {
      CAPTURE(v);
      CAPTURE(s.name);
      const auto want = l.vectors.find("stage." + s.name);
      REQUIRE(want != l.vectors.end());
      CHECK(s.shape == want->second.shape);
      const Deviation d = deviation(as_floats(s), as_floats(want->second));
      std::printf("%-17s %-36s max rel %.5f, rms rel %.5f\n", v.c_str(), s.name.c_str(), d.max_rel,
                  d.rms_rel);
      CHECK(d.finite);
      CHECK(d.max_rel <= 2 * j.noise.max_rel);
      CHECK(d.rms_rel <= 2 * j.noise.rms_rel);
    }
  }
}

TEST_CASE("a damaged tensor moves the output far outside the tolerance") {
  // What verify relies on: every tensor feeds the output. Damage a norm weight, a bias and the
  // embedding of a copy of each model (every 7th byte XORed) and compare again.
  ThreadPool pool(2);
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"llama_small", "model.layers.1.post_attention_layernorm.weight"},
      {"llama_small", "model.layers.0.self_attn.k_proj.bias"},
      {"llama_small_tied", "model.embed_tokens.weight"},
      {"flux_small", "single_transformer_blocks.1.attn.norm_k.weight"},
      {"flux_small", "time_text_embed.guidance_embedder.linear_1.bias"},
      {"flux_small", "norm_out.linear.weight"},
      {"t5_small", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"},
      {"t5_small", "encoder.block.1.layer.1.DenseReluDense.wi_1.weight"},
      {"t5_small", "encoder.final_layer_norm.weight"},
      {"clip_small", "embeddings.position_embedding.weight"},
      {"clip_small", "encoder.layers.1.self_attn.v_proj.bias"},
      {"clip_small_eos", "final_layer_norm.bias"}};
  for (const auto& [variant, tensor] : cases) {
    CAPTURE(variant);
    CAPTURE(tensor);
    TempDir tmp("models-damage");
    fs::copy(kData / variant, tmp.path / variant, fs::copy_options::recursive);
    const fs::path dir = tmp.path / variant;
    {
      const Checkpoint ck = Checkpoint::open(dir);
      const Component& c = ck.components()[0];
      const auto e = c.find(tensor);
      REQUIRE(e);
      const uint64_t off = c.shard_of(*e).header().data_offset() + c.info(*e).begin;
      const uint64_t n = c.info(*e).nbytes();
      std::fstream f(c.shard_of(*e).path(), std::ios::in | std::ios::out | std::ios::binary);
      for (uint64_t i = 0; i < n; i += 7) {
        f.seekg(static_cast<std::streamoff>(off + i));
        char b = 0;
        f.read(&b, 1);
        b = static_cast<char>(b ^ 0x5A);
        f.seekp(static_cast<std::streamoff>(off + i));
        f.write(&b, 1);
      }
    }
    const Checkpoint ck = Checkpoint::open(dir);
    auto fwd = runner::make_forward(ck.components()[0]);
    const auto vectors = read_vectors(dir / "vectors.safetensors");
    const ForwardRun r = run_forward(*fwd, ck.components()[0], inputs_of(*fwd, vectors), DType::BF16, pool);
    const Judgement j = judge(r.output, vectors);
    CHECK(!j.ok);
    CHECK((!j.vs_framework.finite || j.vs_framework.rms_rel > 10 * j.noise.rms_rel));
  }
}

TEST_CASE("units run in the planner's order and fetch their tensors in the plan's order") {
  ThreadPool pool(2);
  planner::TemplateLibrary lib;
  const auto models_dir = planner::find_data_subdir("models");
  REQUIRE(models_dir);
  lib.load_dir(*models_dir);
  for (const std::string& v : kVariants) {
    CAPTURE(v);
    Loaded l = load(v);
    const planner::ModelTemplate* tmpl = lib.find(planner::class_name_of(l.comp().config()));
    REQUIRE(tmpl);
    const planner::ModuleTree tree =
        planner::ModuleTree::build(l.comp(), planner::tied_pairs_for(tmpl, l.comp().config()));
    const auto units = planner::execution_units(tree, tmpl);
    // Each planner unit lies inside one forward unit, in the forward's order.
    const auto& fu = l.fwd->units();
    size_t at = 0;
    std::vector<std::string> plan_tensors;
    for (const planner::Unit& u : units) {
      const std::string& prefix = tree.node(u.node).prefix;
      while (at < fu.size() && !(prefix == fu[at] || prefix.starts_with(fu[at] + "."))) ++at;
      CAPTURE(prefix);
      REQUIRE(at < fu.size());
      for (uint32_t t : u.tensors) plan_tensors.push_back(tree.tensors()[t].name);
    }
    // Every tensor is fetched, in the plan's order; a tied head adds its alias at the end.
    const ForwardRun r = run_forward(*l.fwd, l.comp(), inputs_of(*l.fwd, l.vectors), DType::BF16, pool);
    std::vector<std::string> fetched = r.fetched;
    if (!l.comp().find("lm_head.weight") && fetched.back() == "lm_head.weight") fetched.pop_back();
    CHECK(fetched == plan_tensors);
    if (fetched != plan_tensors)
      for (size_t i = 0; i < std::max(fetched.size(), plan_tensors.size()); ++i)
        std::printf("%-60s %s\n", i < fetched.size() ? fetched[i].c_str() : "-",
                    i < plan_tensors.size() ? plan_tensors[i].c_str() : "-");
  }
}

TEST_CASE("Llama's inv_freq equals transformers' buffer bit for bit") {
  for (const char* v : {"llama_small", "llama_small_tied"}) {
    CAPTURE(v);
    Loaded l = load(v);
    const auto inv = runner::models::llama_inv_freq(std::get<planner::LlamaArch>(l.fwd->arch()));
    const auto want = as_floats(l.vectors.at("rope.inv_freq"));
    REQUIRE(inv.size() == want.size());
    for (size_t i = 0; i < inv.size(); ++i) {
      CAPTURE(i);
      CHECK(std::memcmp(&inv[i], &want[i], 4) == 0);
    }
  }
}

TEST_CASE("host tables: RoPE and the timestep sinusoid") {
  using namespace runner::models;
  // Flux: zero ids are the identity rotation; each value appears twice (adjacent pairs); axis a
  // covers its own columns.
  std::vector<float> cos, sin;
  flux_rope_tables({0, 0, 0, 1, 2, 3}, {4, 6, 6}, cos, sin);
  REQUIRE(cos.size() == 32);
  for (int c = 0; c < 16; ++c) {
    CHECK(cos[c] == 1.0f);
    CHECK(sin[c] == 0.0f);
  }
  for (int c = 0; c < 16; c += 2) {
    CHECK(cos[16 + c] == cos[16 + c + 1]);
    CHECK(sin[16 + c] == sin[16 + c + 1]);
  }
  CHECK(cos[16] == static_cast<float>(std::cos(1.0)));          // axis 0, m 0: id 1
  CHECK(sin[20] == static_cast<float>(std::sin(2.0)));          // axis 1, m 0: id 2
  CHECK(sin[26] == static_cast<float>(std::sin(3.0)));          // axis 2, m 0: id 3
  CHECK(cos[18] == static_cast<float>(std::cos(1.0 / 100.0)));  // axis 0 (d 4), m 1: 10000^(-1/2)
  // Llama: halves layout, rounded to the model dtype.
  planner::LlamaArch a;
  a.head_dim = 6;
  a.rope_theta = 10000.0;
  const auto inv = llama_inv_freq(a);
  REQUIRE(inv.size() == 3);
  CHECK(inv[0] == 1.0f);
  std::vector<uint8_t> lc, ls;
  llama_rope_tables(inv, {0, 5}, DType::BF16, lc, ls);
  REQUIRE(lc.size() == 2 * 6 * 2);
  std::vector<float> c(12), s(12);
  convert_to_f32(DType::BF16, lc.data(), c.data(), 12);
  convert_to_f32(DType::BF16, ls.data(), s.data(), 12);
  for (int i = 0; i < 6; ++i) CHECK(c[i] == 1.0f);
  for (int i = 0; i < 3; ++i) {
    CHECK(c[6 + i] == c[9 + i]);
    CHECK(s[6 + i] == s[9 + i]);
  }
  CHECK(c[6] == bf16_to_f32(f32_to_bf16(std::cos(5.0f))));
  // Timestep sinusoid: cos first; φ(0) = [1 x 128 | 0 x 128]; frequency 0 is 1 rad per unit.
  const auto phi0 = timestep_sinusoid(0.0f);
  const auto phi = timestep_sinusoid(312.0f);
  REQUIRE(phi.size() == 256);
  for (int k = 0; k < 128; ++k) {
    CHECK(phi0[k] == 1.0f);
    CHECK(phi0[128 + k] == 0.0f);
  }
  CHECK(phi[0] == std::cos(312.0f));
  CHECK(phi[128] == std::sin(312.0f));
}

namespace {

// A copy of a committed model folder with its config.json edited.
struct ConfigCase {
  TempDir tmp{"models-config"};
  fs::path dir;
  ConfigCase(const std::string& variant, const std::function<void(json&)>& edit) {
    dir = tmp.path / variant;
    fs::copy(kData / variant, dir, fs::copy_options::recursive);
    json j = read_json_file(dir / "config.json");
    edit(j);
    std::ofstream(dir / "config.json") << j.dump(2);
  }
  std::optional<planner::Arch> arch() const {
    return planner::arch_of(Checkpoint::open(dir).components()[0]);
  }
};

void check_config_error(const std::string& variant, const std::function<void(json&)>& edit,
                        const std::string& key, ErrorKind kind = ErrorKind::InvalidInput) {
  CAPTURE(key);
  const ConfigCase c(variant, edit);
  try {
    (void)c.arch();
    FAIL("no error");
  } catch (const Error& e) {
    CHECK(e.kind() == kind);
    const std::string msg = e.what();
    CAPTURE(msg);
    CHECK(msg.find("config.json") != std::string::npos);
    CHECK(msg.find(key) != std::string::npos);
  }
}

}  // namespace

TEST_CASE("arch_of reads transformers 4.x and 5.x Llama configs and diffusers' Flux config") {
  {
    const auto a = std::get<planner::LlamaArch>(*ConfigCase("llama_small", [](json&) {}).arch());
    CHECK(a.vocab_size == 97);
    CHECK(a.hidden_size == 48);
    CHECK(a.intermediate_size == 88);
    CHECK(a.n_layers == 2);
    CHECK(a.n_heads == 4);
    CHECK(a.n_kv_heads == 2);
    CHECK(a.head_dim == 12);
    CHECK(a.rms_norm_eps == 1e-5);
    CHECK(a.rope_theta == 500000.0);
    REQUIRE(a.llama3);
    CHECK(a.llama3->factor == 8.0);
    CHECK(a.llama3->low_freq_factor == 1.0);
    CHECK(a.llama3->high_freq_factor == 4.0);
    CHECK(a.llama3->original_max_position_embeddings == 64);
    CHECK(!a.tie_word_embeddings);
    CHECK(a.attention_bias);
    CHECK(!a.mlp_bias);
  }
  // 4.x: rope_theta at the top, rope_scaling with the old key `type`; no head_dim, no
  // num_key_value_heads (defaults D / H and H).
  {
    const auto a =
        std::get<planner::LlamaArch>(*ConfigCase("llama_small", [](json& j) {
                                        json rp = j["rope_parameters"];
                                        j.erase("rope_parameters");
                                        j["rope_theta"] = 250000.0;
                                        j["rope_scaling"] = {{"type", "llama3"},
                                                             {"factor", 4.0},
                                                             {"low_freq_factor", 2.0},
                                                             {"high_freq_factor", 8.0},
                                                             {"original_max_position_embeddings", 8192}};
                                        j.erase("head_dim");
                                        j.erase("num_key_value_heads");
                                        j.erase("rms_norm_eps");
                                      }).arch());
    CHECK(a.rope_theta == 250000.0);
    REQUIRE(a.llama3);
    CHECK(a.llama3->factor == 4.0);
    CHECK(a.llama3->original_max_position_embeddings == 8192);
    CHECK(a.head_dim == 12);
    CHECK(a.n_kv_heads == 4);
    CHECK(a.rms_norm_eps == 1e-6);
  }
  {
    const auto a = std::get<planner::LlamaArch>(*ConfigCase("llama_small_tied", [](json& j) {
                                                   j.erase("rope_parameters");
                                                   j["rope_scaling"] = nullptr;
                                                 }).arch());
    CHECK(a.rope_theta == 10000.0);
    CHECK(!a.llama3);
    CHECK(a.tie_word_embeddings);
    CHECK(a.mlp_bias);
    CHECK(a.head_dim == 6);
  }
  {
    const auto a = std::get<planner::FluxArch>(*ConfigCase("flux_small", [](json&) {}).arch());
    CHECK(a.n_double == 2);
    CHECK(a.n_single == 2);
    CHECK(a.n_heads == 2);
    CHECK(a.head_dim == 16);
    CHECK(a.dim() == 32);
    CHECK(a.in_channels == 12);
    CHECK(a.out_channels == 12);  // null -> in_channels
    CHECK(a.joint_attention_dim == 24);
    CHECK(a.pooled_projection_dim == 16);
    CHECK(a.guidance_embeds);
    CHECK(a.axes_dims_rope == std::vector<int64_t>{4, 6, 6});
  }
  // Other architectures: no forward (nullopt), no error.
  CHECK(!ConfigCase("llama_small", [](json& j) { j["architectures"] = {"MistralForCausalLM"}; }).arch());
}

TEST_CASE("arch_of rejects unusable configs naming config.json and the key") {
  check_config_error(
      "llama_small", [](json& j) { j.erase("hidden_size"); }, "hidden_size");
  check_config_error(
      "llama_small", [](json& j) { j["vocab_size"] = 0; }, "vocab_size");
  check_config_error(
      "llama_small", [](json& j) { j["num_hidden_layers"] = "two"; }, "num_hidden_layers");
  check_config_error(
      "llama_small", [](json& j) { j["num_key_value_heads"] = 3; }, "num_key_value_heads");
  check_config_error(
      "llama_small", [](json& j) { j["head_dim"] = 7; }, "head_dim");
  check_config_error(
      "llama_small", [](json& j) { j["rms_norm_eps"] = -1.0; }, "rms_norm_eps");
  check_config_error(
      "llama_small", [](json& j) { j["tie_word_embeddings"] = "yes"; }, "tie_word_embeddings");
  check_config_error(
      "llama_small", [](json& j) { j["rope_parameters"].erase("low_freq_factor"); },
      "rope_parameters.low_freq_factor");
  check_config_error(
      "llama_small", [](json& j) { j["rope_parameters"]["high_freq_factor"] = 0.5; },
      "rope_parameters.high_freq_factor");
  check_config_error(
      "llama_small", [](json& j) { j["rope_parameters"]["rope_type"] = "yarn"; }, "rope_parameters.rope_type",
      ErrorKind::Unsupported);
  check_config_error(
      "llama_small",
      [](json& j) {
        j.erase("rope_parameters");
        j["rope_scaling"] = {{"type", "dynamic"}, {"factor", 2.0}};
      },
      "rope_scaling.type", ErrorKind::Unsupported);
  check_config_error(
      "llama_small", [](json& j) { j["hidden_act"] = "gelu"; }, "hidden_act", ErrorKind::Unsupported);
  check_config_error(
      "flux_small",
      [](json& j) {
        j["axes_dims_rope"] = {4, 6, 8};
      },
      "axes_dims_rope");
  check_config_error(
      "flux_small",
      [](json& j) {
        j["axes_dims_rope"] = {5, 5, 6};
      },
      "axes_dims_rope[0]");
  check_config_error(
      "flux_small", [](json& j) { j["num_attention_heads"] = -2; }, "num_attention_heads");
  check_config_error(
      "flux_small", [](json& j) { j["guidance_embeds"] = 1; }, "guidance_embeds");
}

TEST_CASE("a checkpoint whose tensors do not match its config fails naming the tensor") {
  ThreadPool pool(2);
  const ConfigCase c("llama_small", [](json& j) { j["intermediate_size"] = 90; });
  const Checkpoint ck = Checkpoint::open(c.dir);
  auto fwd = runner::make_forward(ck.components()[0]);
  const auto vectors = read_vectors(c.dir / "vectors.safetensors");
  try {
    (void)run_forward(*fwd, ck.components()[0], inputs_of(*fwd, vectors), DType::BF16, pool);
    FAIL("no error");
  } catch (const Error& e) {
    CHECK(e.kind() == ErrorKind::InvalidInput);
    CHECK(std::string(e.what()).find("model.layers.0.mlp.down_proj.weight") != std::string::npos);
  }
}

namespace {

runner::HostTensor* find(std::vector<runner::HostTensor>& in, const std::string& name) {
  for (auto& t : in)
    if (t.name == name) return &t;
  return nullptr;
}

void check_input_error(const runner::Forward& f, std::vector<runner::HostTensor> in, int64_t max_tokens,
                       const std::string& name) {
  CAPTURE(name);
  try {
    f.check_inputs(in, max_tokens);
    FAIL("no error");
  } catch (const Error& e) {
    CHECK(e.kind() == ErrorKind::InvalidInput);
    CAPTURE(e.what());
    CHECK(std::string(e.what()).find("'" + name + "'") != std::string::npos);
  }
}

}  // namespace

TEST_CASE("check_inputs names the bad input; random_inputs are valid and reproducible") {
  Loaded llama = load("llama_small");
  Loaded flux = load("flux_small");
  const auto& lf = *llama.fwd;
  const auto& ff = *flux.fwd;
  const auto l_in = inputs_of(lf, llama.vectors);
  const auto f_in = inputs_of(ff, flux.vectors);
  lf.check_inputs(l_in, 9);
  ff.check_inputs(f_in, 12);

  check_input_error(lf, l_in, 8, "input_ids");  // more tokens than planned
  check_input_error(lf, {}, 9, "input_ids");    // missing
  {
    auto in = l_in;
    find(in, "input_ids")->name = "input_id";  // misnamed
    check_input_error(lf, in, 9, "input_id");
  }
  {
    auto in = l_in;
    int64_t bad = 97;  // == vocab
    std::memcpy(find(in, "input_ids")->bytes.data() + 8 * 5, &bad, 8);
    check_input_error(lf, in, 9, "input_ids");
  }
  {
    auto in = l_in;
    auto pos = *find(in, "input_ids");
    pos.name = "position_ids";
    pos.shape = {1, 18};
    in.push_back(pos);
    check_input_error(lf, in, 9, "position_ids");
  }
  {
    auto in = l_in;
    find(in, "input_ids")->dtype = DType::F32;
    find(in, "input_ids")->bytes.resize(4 * 18);
    check_input_error(lf, in, 9, "input_ids");
  }
  check_input_error(ff, f_in, 11, "hidden_states");
  for (const char* drop : {"guidance", "txt_ids", "pooled_projections"}) {
    auto in = f_in;
    in.erase(std::find_if(in.begin(), in.end(), [&](const auto& t) { return t.name == drop; }));
    check_input_error(ff, in, 12, drop);
  }
  {
    auto in = f_in;
    find(in, "img_ids")->shape = {11, 3};
    find(in, "img_ids")->bytes.resize(11 * 3 * 2);
    check_input_error(ff, in, 12, "img_ids");
  }
  {
    auto in = f_in;
    find(in, "timestep")->shape = {3};
    find(in, "timestep")->bytes.resize(12);
    check_input_error(ff, in, 12, "timestep");
  }
  {
    auto in = f_in;
    const uint16_t bf_nan = 0x7FC0;
    std::memcpy(find(in, "pooled_projections")->bytes.data(), &bf_nan, 2);
    check_input_error(ff, in, 12, "pooled_projections");
  }
  // F32 is accepted for every float input.
  {
    auto in = f_in;
    auto& x = *find(in, "hidden_states");
    x.bytes = runner::models::encode(as_floats(x), DType::F32);
    x.dtype = DType::F32;
    ff.check_inputs(in, 12);
  }

  for (const runner::Forward* f :
       {static_cast<const runner::Forward*>(&lf), static_cast<const runner::Forward*>(&ff)}) {
    const auto a = f->random_inputs(2, 6, 1234);
    const auto b = f->random_inputs(2, 6, 1234);
    const auto c = f->random_inputs(2, 6, 1235);
    f->check_inputs(a, 6);
    REQUIRE(a.size() == b.size());
    for (size_t i = 0; i < a.size(); ++i) CHECK(a[i].bytes == b[i].bytes);
    CHECK(a[0].bytes != c[0].bytes);
  }
  // Flux's random img_ids: the pipeline's grid (0, row, col) of 2 x 3 for 6 tokens.
  const auto r = ff.random_inputs(1, 6, 7);
  std::vector<float> ids;
  for (const auto& t : r)
    if (t.name == "img_ids") ids = as_floats(t);
  CHECK(ids == std::vector<float>{0, 0, 0, 0, 0, 1, 0, 0, 2, 0, 1, 0, 0, 1, 1, 0, 1, 2});
}

TEST_CASE("the activation reserve is the forward's peak at any batch and token count") {
  ThreadPool pool(2);
  for (const std::string& v : kVariants) {
    Loaded l = load(v);
    for (const auto& [batch, tokens] :
         std::vector<std::pair<int64_t, int64_t>>{{1, 1}, {1, 7}, {3, 5}, {2, 33}}) {
      CAPTURE(v);
      CAPTURE(batch);
      CAPTURE(tokens);
      const auto in = l.fwd->random_inputs(batch, tokens, 99);
      const ForwardRun r = run_forward(*l.fwd, l.comp(), in, DType::BF16, pool);
      CHECK(peak_matches(r.peak, r.reserved));
      CHECK(deviation(as_floats(r.output), as_floats(r.output)).finite);
    }
  }
}

TEST_CASE("forward_flops: MODELS.md's worked examples") {
  // Flux at D 3072, Ti 4096 + Tt 512: one double block 24 D^2 T + 24 D^2 linear, 4 T^2 D attention;
  // one single block 24 D^2 T + 6 D^2.
  planner::FluxArch f;
  f.n_double = 1;
  f.n_single = 0;
  const auto one = planner::forward_flops(f, 1, 4096);
  f.n_double = 2;
  const auto two = planner::forward_flops(f, 1, 4096);
  const uint64_t d = 3072, t = 4608;
  CHECK(two.linear - one.linear == 24 * d * d * t + 24 * d * d);
  CHECK(two.attention - one.attention == 4 * t * t * d);
  f.n_single = 1;
  const auto three = planner::forward_flops(f, 1, 4096);
  CHECK(three.linear - two.linear == 24 * d * d * t + 6 * d * d);
  // Llama 3 8B at T 8192: 3.57 T linear a layer, causal attention half of 4 T^2 H hd; lm_head 2 T D V.
  planner::LlamaArch l;
  l.vocab_size = 128256;
  l.hidden_size = 4096;
  l.intermediate_size = 14336;
  l.n_heads = 32;
  l.n_kv_heads = 8;
  l.head_dim = 128;
  l.n_layers = 1;
  const auto l1 = planner::forward_flops(l, 1, 8192);
  l.n_layers = 2;
  const auto l2 = planner::forward_flops(l, 1, 8192);
  const uint64_t layer = l2.linear - l1.linear;
  CHECK(layer == 2ull * 8192 * (4096ull * 128 * (2 * 32 + 2 * 8) + 3ull * 4096 * 14336));
  CHECK(layer / 1'000'000'000 == 3573);
  CHECK(l2.attention - l1.attention == 2ull * 8192 * 8192 * 32 * 128);
  CHECK(l1.linear - layer == 2ull * 8192 * 4096 * 128256);
}

TEST_CASE("a quantized checkpoint runs the same forward: bit for bit its dequantized weights' output") {
  // The linears dequantize to the activation dtype exactly as `qtool dequantize` writes the
  // weights, so the forward on the quantized file equals the forward on its dequantized copy.
  ThreadPool pool(2);
  for (const std::string& v : kVariants) {
    for (const SchemeCase& sc : all_scheme_cases()) {
      if (sc.scheme.empty()) continue;
      CAPTURE(v);
      CAPTURE(sc.label);
      TempDir tmp("models-quant");
      const fs::path q = quantize(kData / v, tmp.path / "q", sc);
      quant::ConvertOptions co;
      co.n_threads = 2;
      quant::dequantize_checkpoint(q, tmp.path / "d", std::nullopt, co);
      const Checkpoint qck = Checkpoint::open(q), dck = Checkpoint::open(tmp.path / "d");
      REQUIRE(!quant::find_quantized_linears(qck.components()[0]).empty());
      auto qf = runner::make_forward(qck.components()[0]);
      auto df = runner::make_forward(dck.components()[0]);
      REQUIRE(qf);
      REQUIRE(df);
      const auto vectors = read_vectors(kData / v / "vectors.safetensors");
      const auto in = inputs_of(*qf, vectors);
      const ForwardRun qr = run_forward(*qf, qck.components()[0], in, DType::BF16, pool);
      const ForwardRun dr = run_forward(*df, dck.components()[0], in, DType::BF16, pool);
      CHECK(qr.output.bytes == dr.output.bytes);
      CHECK(deviation(as_floats(qr.output), as_floats(qr.output)).finite);
    }
  }
}

TEST_CASE("T5's relative position buckets: MODELS.md §3.4's table for 32 buckets, max distance 128") {
  // Bucket runs [first rel, last rel] → bucket, from the table the probe verified on transformers.
  struct Run {
    int64_t lo, hi, bucket;
  };
  const std::vector<Run> runs = {{-11, -8, 8},   {-15, -12, 9},  {-22, -16, 10}, {-31, -23, 11},
                                 {-45, -32, 12}, {-63, -46, 13}, {-90, -64, 14}, {-1200, -91, 15},
                                 {8, 11, 24},    {12, 15, 25},   {16, 22, 26},   {23, 31, 27},
                                 {32, 45, 28},   {46, 63, 29},   {64, 90, 30},   {91, 1200, 31}};
  CHECK(runner::models::t5_relative_bucket(0, 32, 128) == 0);
  for (int64_t r = 1; r <= 7; ++r) {
    CHECK(runner::models::t5_relative_bucket(-r, 32, 128) == r);
    CHECK(runner::models::t5_relative_bucket(r, 32, 128) == 16 + r);
  }
  for (const Run& run : runs)
    for (int64_t r = run.lo; r <= run.hi; ++r) {
      CAPTURE(r);
      CHECK(runner::models::t5_relative_bucket(r, 32, 128) == run.bucket);
    }
  // Other sizes: 16 buckets (exact below 4), max distance 40; every bucket within [0, NB).
  CHECK(runner::models::t5_relative_bucket(-3, 16, 40) == 3);
  CHECK(runner::models::t5_relative_bucket(3, 16, 40) == 11);
  // 4 + trunc(ln(a / 4) / ln(10) · 4): a 12 → 1.98, 13 → 2.05, 22 → 2.96, 23 → 3.04, 39 → 3.96.
  CHECK(runner::models::t5_relative_bucket(-12, 16, 40) == 5);
  CHECK(runner::models::t5_relative_bucket(-13, 16, 40) == 6);
  CHECK(runner::models::t5_relative_bucket(-22, 16, 40) == 6);
  CHECK(runner::models::t5_relative_bucket(-23, 16, 40) == 7);
  CHECK(runner::models::t5_relative_bucket(-39, 16, 40) == 7);
  CHECK(runner::models::t5_relative_bucket(40, 16, 40) == 15);
  for (int64_t r = -300; r <= 300; ++r) {
    const int64_t b = runner::models::t5_relative_bucket(r, 16, 40);
    CHECK((b >= 0 && b < 16));
    CHECK((r > 0) == (b >= 8));
  }
  // Equal to the double-precision formula over the range MODELS.md's probe verified.
  for (const auto& [nb, md] : std::vector<std::pair<int64_t, int64_t>>{{32, 128}, {16, 40}, {64, 256}})
    for (int64_t r = -1200; r <= 1200; ++r) {
      const int64_t n = nb / 2, e = n / 2, a = r < 0 ? -r : r;
      const int64_t base = r > 0 ? n : 0;
      const int64_t want =
          a < e ? base + a
                : base + std::min<int64_t>(n - 1,
                                           e + static_cast<int64_t>(std::log(static_cast<double>(a) / e) /
                                                                    std::log(static_cast<double>(md) / e) *
                                                                    static_cast<double>(n - e)));
      CAPTURE(nb);
      CAPTURE(r);
      CHECK(runner::models::t5_relative_bucket(r, nb, md) == want);
    }
}

TEST_CASE("CLIP pools at the EOS position by both conventions") {
  // eos_token_id 2: the first maximum id; otherwise the first position holding eos_token_id
  // (position 0 when none does).
  const std::vector<int64_t> ids = {5, 2, 98, 98, 98,  //
                                    2, 7, 9,  98, 3,   //
                                    4, 6, 2,  1,  0};
  CHECK(runner::models::clip_eos_positions(ids, 3, 5, 2) == std::vector<int64_t>{2, 3, 1});
  CHECK(runner::models::clip_eos_positions(ids, 3, 5, 98) == std::vector<int64_t>{2, 3, 0});
  CHECK(runner::models::clip_eos_positions(ids, 3, 5, 7) == std::vector<int64_t>{0, 1, 0});
  // In the committed vectors the two rules pick different rows (token 2 sits before the EOS
  // padding, and the legacy argmax finds the padding's first EOS as well): the framework's
  // pooler_output is the last hidden state at those rows.
  for (const std::string v : {"clip_small", "clip_small_eos"}) {
    CAPTURE(v);
    Loaded l = load(v);
    const auto& a = std::get<planner::ClipTextArch>(l.fwd->arch());
    const runner::HostTensor& ids_t = l.vectors.at("input_ids");
    const auto pos = runner::models::clip_eos_positions(runner::models::ints_of(ids_t), ids_t.shape[0],
                                                        ids_t.shape[1], a.eos_token_id);
    const auto last = as_floats(l.vectors.at("last_hidden_state"));
    const auto pooled = as_floats(l.vectors.at("pooler_output"));
    const int64_t d = a.hidden_size, t = ids_t.shape[1];
    for (int64_t b = 0; b < ids_t.shape[0]; ++b)
      for (int64_t i = 0; i < d; ++i)
        CHECK(pooled[static_cast<size_t>(b * d + i)] ==
              last[static_cast<size_t>((b * t + pos[static_cast<size_t>(b)]) * d + i)]);
  }
}

TEST_CASE("arch_of reads T5 and CLIP text configs (flat, nested in text_config, without the prefix)") {
  {
    const auto a = std::get<planner::T5EncoderArch>(*ConfigCase("t5_small", [](json&) {}).arch());
    CHECK(a.d_model == 40);
    CHECK(a.d_kv == 12);
    CHECK(a.n_heads == 3);
    CHECK(a.d_ff == 56);
    CHECK(a.n_layers == 2);
    CHECK(a.vocab_size == 67);
    CHECK(a.num_buckets == 32);
    CHECK(a.max_distance == 128);
    CHECK(a.gated);
    CHECK(a.act == "gelu_new");
    CHECK(a.eps == 1e-6);
  }
  {
    const auto a = std::get<planner::T5EncoderArch>(*ConfigCase("t5_small", [](json& j) {
                                                       j["feed_forward_proj"] = "relu";
                                                       j.erase("d_ff");
                                                     }).arch());
    CHECK(!a.gated);
    CHECK(a.act == "relu");
    CHECK(a.d_ff == 2048);  // T5Config's default
  }
  {
    const auto a = std::get<planner::ClipTextArch>(*ConfigCase("clip_small", [](json&) {}).arch());
    CHECK(a.hidden_size == 36);
    CHECK(a.n_heads == 3);
    CHECK(a.intermediate_size == 52);
    CHECK(a.max_positions == 40);
    CHECK(a.eos_token_id == 2);
    CHECK(a.act == "quick_gelu");
    CHECK(a.prefix.empty());  // transformers 5 saves CLIPTextModel without "text_model."
  }
  {
    // A full CLIPConfig: the text tower's keys under text_config.
    const auto a = std::get<planner::ClipTextArch>(*ConfigCase("clip_small_eos", [](json& j) {
                                                      json text = j;
                                                      text.erase("architectures");
                                                      j = json{{"architectures", {"CLIPTextModel"}},
                                                               {"text_config", text},
                                                               {"vision_config", {{"hidden_size", 8}}}};
                                                    }).arch());
    CHECK(a.hidden_size == 36);
    CHECK(a.eos_token_id == 98);
  }
  check_config_error(
      "t5_small", [](json& j) { j["d_model"] = 0; }, "d_model");
  check_config_error(
      "t5_small", [](json& j) { j["relative_attention_num_buckets"] = 30; },
      "relative_attention_num_buckets");
  check_config_error(
      "t5_small", [](json& j) { j["relative_attention_max_distance"] = 8; },
      "relative_attention_max_distance");
  check_config_error(
      "t5_small", [](json& j) { j["feed_forward_proj"] = "gated-gelu_fast"; }, "feed_forward_proj",
      ErrorKind::Unsupported);
  check_config_error(
      "t5_small", [](json& j) { j["layer_norm_epsilon"] = "small"; }, "layer_norm_epsilon");
  check_config_error(
      "clip_small", [](json& j) { j["num_attention_heads"] = 5; }, "num_attention_heads");
  check_config_error(
      "clip_small", [](json& j) { j["hidden_act"] = "gelu"; }, "hidden_act", ErrorKind::Unsupported);
  check_config_error(
      "clip_small", [](json& j) { j["eos_token_id"] = "</s>"; }, "eos_token_id");
  check_config_error(
      "clip_small",
      [](json& j) {
        json text = j;
        text["max_position_embeddings"] = -1;
        j = json{{"architectures", {"CLIPTextModel"}}, {"text_config", text}};
      },
      "text_config.max_position_embeddings");
}

TEST_CASE("the encoders' check_inputs name the bad input") {
  Loaded t5 = load("t5_small");
  Loaded clip = load("clip_small");
  const auto t_in = inputs_of(*t5.fwd, t5.vectors);
  const auto c_in = inputs_of(*clip.fwd, clip.vectors);
  t5.fwd->check_inputs(t_in, 100);
  clip.fwd->check_inputs(c_in, 16);
  check_input_error(*t5.fwd, t_in, 99, "input_ids");
  {
    auto in = t_in;
    int64_t bad = 67;  // the vocabulary size
    std::memcpy(find(in, "input_ids")->bytes.data() + 8 * 5, &bad, 8);
    check_input_error(*t5.fwd, in, 100, "input_ids");
  }
  {
    auto in = t_in;
    runner::HostTensor m{"attention_mask", DType::I64, {1, 100}, std::vector<uint8_t>(800, 0)};
    m.bytes[8 * 3] = 2;
    in.push_back(m);
    check_input_error(*t5.fwd, in, 100, "attention_mask");
    in.back().shape = {1, 99};
    in.back().bytes.resize(99 * 8);
    check_input_error(*t5.fwd, in, 100, "attention_mask");
  }
  {
    // More tokens than position embeddings.
    const auto in = clip.fwd->random_inputs(1, 41, 7);
    check_input_error(*clip.fwd, in, 64, "input_ids");
    auto pos = clip.fwd->random_inputs(3, 16, 7);
    runner::HostTensor p{"position_ids", DType::I64, {3, 16}, std::vector<uint8_t>(3 * 16 * 8, 0)};
    int64_t bad = 40;
    std::memcpy(p.bytes.data() + 8 * 17, &bad, 8);
    pos.push_back(p);
    check_input_error(*clip.fwd, pos, 16, "position_ids");
  }
  // random_inputs: valid, reproducible, an EOS in every sample.
  for (const Loaded* l : {&t5, &clip}) {
    const auto a = l->fwd->random_inputs(3, 17, 11), b = l->fwd->random_inputs(3, 17, 11);
    l->fwd->check_inputs(a, 17);
    CHECK(a[0].bytes == b[0].bytes);
  }
  const auto r = runner::models::ints_of(clip.fwd->random_inputs(4, 9, 5)[0]);
  for (int64_t s = 0; s < 4; ++s) CHECK(r[static_cast<size_t>(s * 9 + 8)] == 98);
}

TEST_CASE("forward_flops of the encoders") {
  planner::T5EncoderArch t;
  t.d_model = 4096;
  t.d_kv = 64;
  t.n_heads = 64;
  t.d_ff = 10240;
  t.gated = true;
  t.n_layers = 1;
  const auto t1 = planner::forward_flops(t, 1, 512);
  // A T5-XXL block at T 512: q, k, v, o (4 · 2 T D inner) and wi_0, wi_1, wo (3 · 2 T D F).
  CHECK(t1.linear == 2ull * 512 * (4ull * 4096 * 4096 + 3ull * 4096 * 10240));
  CHECK(t1.attention == 4ull * 512 * 512 * 4096);
  planner::ClipTextArch c;
  c.hidden_size = 768;
  c.intermediate_size = 3072;
  c.n_heads = 12;
  c.n_layers = 12;
  const auto c12 = planner::forward_flops(c, 2, 77);
  CHECK(c12.linear == 12ull * 2 * 154 * (4ull * 768 * 768 + 2ull * 768 * 3072));
  CHECK(c12.attention == 12ull * 2 * 2 * 77 * 77 * 768);  // causal: half
}
