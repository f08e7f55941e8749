// The quant-mapping config: parsing, every mistake a user can make (each message names the key),
// module patterns, the linear-weight rule, and resolution against real checkpoints.
#include <doctest/doctest.h>

#include <algorithm>
#include <string>

#include "qtool/formats/checkpoint.hpp"
#include "qtool/formats/error.hpp"
#include "qtool/libquant/config.hpp"
#include "test_convert_util.hpp"

using nlohmann::json;
using namespace qtool;
using namespace qtool::quant;

namespace {

// The message of the InvalidInput error parsing `text` raises ("" when it parses).
std::string parse_error(const std::string& text) {
  ErrorKind kind = ErrorKind::Internal;
  const std::string msg =
      test::error_message([&] { parse_quant_config(json::parse(text), "cfg.json"); }, &kind);
  if (!msg.empty()) CHECK(kind == ErrorKind::InvalidInput);
  return msg;
}

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

bool has(const std::vector<std::string>& v, const std::string& x) {
  return std::find(v.begin(), v.end(), x) != v.end();
}

}  // namespace

TEST_CASE("config: the design's example parses into its parts") {
  const QuantConfig c = parse_quant_config(json::parse(R"({
      "quant_backend": "nf4",
      "quant_kwargs": {"blocksize": 128, "double_quant": true},
      "components_to_quantize": ["transformer", "text_encoder_2"],
      "quant_mapping": {"text_encoder_2": {"scheme": "int8"}},
      "modules_to_not_convert": ["proj_out", "*norm*"]})"),
                                           "flux.json");
  REQUIRE(c.backend.has_value());
  CHECK(c.backend->scheme == Scheme::Nf4);
  CHECK(c.backend->blocksize == 128);
  CHECK(c.backend->double_quant);
  REQUIRE(c.components_to_quantize.has_value());
  CHECK(*c.components_to_quantize == std::vector<std::string>{"transformer", "text_encoder_2"});
  REQUIRE(c.quant_mapping.count("text_encoder_2") == 1);
  CHECK(c.quant_mapping.at("text_encoder_2").options.scheme == Scheme::Int8);
  CHECK(c.modules_to_not_convert == std::vector<std::string>{"proj_out", "*norm*"});
  // Round trip through the file vocabulary.
  const QuantConfig again = parse_quant_config(config_to_json(c), "again");
  CHECK(again.backend == c.backend);
  CHECK(again.quant_mapping.at("text_encoder_2").options == c.quant_mapping.at("text_encoder_2").options);
}

TEST_CASE("config: fp8 options and aliases") {
  auto c = parse_quant_config(json::parse(R"({"quant_backend": "fp8"})"), "a");
  CHECK(c.backend->scheme == Scheme::Fp8E4M3);
  CHECK_FALSE(c.backend->per_tensor);
  c = parse_quant_config(
      json::parse(R"({"quant_backend": "fp8_e5m2", "quant_kwargs": {"strategy": "tensor"}})"), "a");
  CHECK(c.backend->scheme == Scheme::Fp8E5M2);
  CHECK(c.backend->per_tensor);
  c = parse_quant_config(
      json::parse(R"({"quant_mapping": {"": {"scheme": "fp8_e4m3", "per_tensor": true}}})"), "a");
  CHECK(c.quant_mapping.at("").options.per_tensor);
  CHECK_FALSE(c.backend.has_value());
}

TEST_CASE("config: every mistake names the file and the key") {
  struct Case {
    const char* text;
    const char* key;   // must appear in the message
    const char* what;  // and this
  };
  const Case cases[] = {
      {R"({"quant_backend": "nf4", "quant_kwarg": {}})", "quant_kwarg", "unknown key"},
      {R"({"quant_backend": "nf5"})", "quant_backend", "unknown scheme 'nf5'"},
      {R"({"quant_backend": 4})", "quant_backend", "scheme name"},
      {R"({"quant_mapping": {"vae": {"scheme": "int4"}}})", "quant_mapping.vae.scheme",
       "unknown scheme 'int4'"},
      {R"({"quant_mapping": {"vae": {"blocksize": 64}}})", "quant_mapping.vae", "no \"scheme\""},
      {R"({"quant_mapping": {"vae": "int8"}})", "quant_mapping.vae", "must be an object"},
      {R"({"quant_mapping": []})", "quant_mapping", "must be an object"},
      {R"({"quant_backend": "nf4", "quant_kwargs": {"blocksize": 48}})", "quant_kwargs.blocksize",
       "48 is not allowed"},
      {R"({"quant_backend": "nf4", "quant_kwargs": {"blocksize": 16}})", "quant_kwargs.blocksize",
       "16 is not allowed"},
      {R"({"quant_backend": "nf4", "quant_kwargs": {"blocksize": 8192}})", "quant_kwargs.blocksize",
       "8192 is not allowed"},
      {R"({"quant_backend": "nf4", "quant_kwargs": {"blocksize": 64.5}})", "quant_kwargs.blocksize",
       "positive integer"},
      {R"({"quant_backend": "nf4", "quant_kwargs": {"blocksize": -64}})", "quant_kwargs.blocksize",
       "positive integer"},
      {R"({"quant_mapping": {"t": {"scheme": "fp4", "blocksize": 100}}})", "quant_mapping.t.blocksize",
       "100 is not allowed"},
      {R"({"quant_backend": "int8", "quant_kwargs": {"blocksize": 64}})", "quant_kwargs.blocksize",
       "not an option of scheme 'int8'"},
      {R"({"quant_backend": "int8", "quant_kwargs": {"double_quant": true}})", "quant_kwargs.double_quant",
       "not an option of scheme 'int8'"},
      {R"({"quant_backend": "nf4", "quant_kwargs": {"per_tensor": true}})", "quant_kwargs.per_tensor",
       "not an option of scheme 'nf4'"},
      {R"({"quant_backend": "nf4", "quant_kwargs": {"blocksizes": 64}})", "quant_kwargs.blocksizes",
       "unknown key"},
      {R"({"quant_backend": "nf4", "quant_kwargs": {"double_quant": "yes"}})", "quant_kwargs.double_quant",
       "true or false"},
      {R"({"quant_backend": "nf4", "quant_kwargs": [64]})", "quant_kwargs", "must be an object"},
      {R"({"quant_backend": "fp8", "quant_kwargs": {"strategy": "block"}})", "quant_kwargs.strategy",
       "\"channel\" or \"tensor\""},
      {R"({"quant_backend": "fp8", "quant_kwargs": {"strategy": "tensor", "per_tensor": false}})",
       "quant_kwargs.strategy", "contradicts"},
      {R"({"quant_kwargs": {"blocksize": 64}, "quant_mapping": {"a": {"scheme": "nf4"}}})", "quant_kwargs",
       "without quant_backend"},
      {R"({"components_to_quantize": ["transformer"], "quant_mapping": {"vae": {"scheme": "nf4"}}})",
       "components_to_quantize[0]", "'transformer' has no scheme"},
      {R"({"quant_backend": "nf4", "components_to_quantize": ["a", "a"]})", "components_to_quantize[1]",
       "listed twice"},
      {R"({"quant_backend": "nf4", "components_to_quantize": [3]})", "components_to_quantize[0]",
       "component name"},
      {R"({"quant_backend": "nf4", "components_to_quantize": {"a": 1}})", "components_to_quantize",
       "list of component names"},
      {R"({"quant_backend": "nf4", "modules_to_not_convert": "proj_out"})", "modules_to_not_convert",
       "list of module patterns"},
      {R"({"quant_backend": "nf4", "modules_to_not_convert": ["a", ""]})", "modules_to_not_convert[1]",
       "non-empty string"},
      {R"({"quant_mapping": {"t": {"scheme": "nf4", "modules_to_not_convert": [1]}}})",
       "quant_mapping.t.modules_to_not_convert[0]", "non-empty string"},
      {R"({"quant_mapping": {"t": {"scheme": "nf4", "colour": 1}}})", "quant_mapping.t.colour",
       "unknown key"},
      {R"({"description": "nothing"})", "cfg.json", "nothing to quantize"},
      {R"(["nf4"])", "cfg.json", "must be a JSON object"},
  };
  for (const Case& c : cases) {
    CAPTURE(c.text);
    const std::string msg = parse_error(c.text);
    REQUIRE_FALSE(msg.empty());
    CHECK_MESSAGE(contains(msg, "cfg.json"), msg);
    CHECK_MESSAGE(contains(msg, c.key), msg);
    CHECK_MESSAGE(contains(msg, c.what), msg);
  }
}

TEST_CASE("config: a config file that is not JSON names the file and the byte") {
  test::ScratchDir dir;
  const auto path = dir / "bad.json";
  std::ofstream(path) << "{\"quant_backend\": \"nf4\",}";
  ErrorKind kind = ErrorKind::Internal;
  const std::string msg = test::error_message([&] { read_quant_config(path); }, &kind);
  CHECK(kind == ErrorKind::InvalidInput);
  CHECK(contains(msg, path.string()));
  CHECK(contains(msg, "byte"));
}

TEST_CASE("config: module patterns") {
  // Plain names match the module, its ancestors' names and its dotted suffixes.
  CHECK(pattern_matches("proj_out", "proj_out"));
  CHECK(pattern_matches("proj_out", "single_transformer_blocks.3.proj_out"));
  CHECK_FALSE(pattern_matches("proj_out", "single_transformer_blocks.3.proj_out_x"));
  CHECK_FALSE(pattern_matches("out", "single_transformer_blocks.3.proj_out"));
  CHECK(pattern_matches("transformer_blocks.0", "transformer_blocks.0.attn.to_q"));
  CHECK_FALSE(pattern_matches("transformer_blocks.0", "single_transformer_blocks.0.attn.to_q"));
  CHECK_FALSE(pattern_matches("transformer_blocks.1", "transformer_blocks.10.attn.to_q"));
  CHECK(pattern_matches("attn.to_q", "transformer_blocks.0.attn.to_q"));
  CHECK(pattern_matches("norm_out.linear", "norm_out.linear"));
  CHECK_FALSE(pattern_matches("norm_out.linear", "transformer_blocks.0.norm1.linear"));
  // Globs.
  CHECK(pattern_matches("*norm*", "norm_out.linear"));
  CHECK(pattern_matches("*norm*", "transformer_blocks.0.norm1.linear"));
  CHECK_FALSE(pattern_matches("*norm*", "transformer_blocks.0.attn.to_q"));
  CHECK(pattern_matches("transformer_blocks.*.ff.*", "transformer_blocks.12.ff.net.2"));
  CHECK_FALSE(pattern_matches("transformer_blocks.*.ff.*", "transformer_blocks.12.attn.to_q"));
  CHECK(pattern_matches("model.layers.[0-3].mlp", "model.layers.2.mlp.down_proj"));
  CHECK_FALSE(pattern_matches("model.layers.[0-3].mlp", "model.layers.5.mlp.down_proj"));
  CHECK(pattern_matches("to_?", "transformer_blocks.0.attn.to_k"));
  CHECK_FALSE(pattern_matches("to_?", "transformer_blocks.0.attn.to_out.0"));
}

TEST_CASE("config: which tensors are linear weights") {
  const std::vector<int64_t> m{64, 32};
  const std::vector<int64_t> v{64};
  const std::vector<int64_t> conv{64, 32, 3, 3};
  auto linear = [&](const char* name, DType dt = DType::BF16, const std::vector<int64_t>& shape = {64, 32}) {
    return !linear_exclusion(name, dt, shape).has_value();
  };
  CHECK(linear("model.layers.0.self_attn.q_proj.weight"));
  CHECK(linear("x_embedder.weight"));
  CHECK(linear("context_embedder.weight"));
  CHECK(linear("time_text_embed.timestep_embedder.linear_1.weight"));
  CHECK(linear("norm_out.linear.weight"));
  CHECK(linear("transformer_blocks.0.norm1.linear.weight"));
  CHECK(linear("proj.weight", DType::F16));
  CHECK(linear("proj.weight", DType::F32));
  CHECK_FALSE(linear("model.embed_tokens.weight"));
  CHECK_FALSE(linear("shared.weight"));
  CHECK_FALSE(linear("encoder.embed_tokens.weight"));
  CHECK_FALSE(linear("text_model.embeddings.token_embedding.weight"));
  CHECK_FALSE(linear("text_model.embeddings.position_embedding.weight"));
  CHECK_FALSE(linear("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"));
  CHECK_FALSE(linear("transformer.wte.weight"));
  CHECK_FALSE(linear("lm_head.weight"));
  CHECK_FALSE(linear("model.norm.weight"));
  CHECK_FALSE(linear("model.layers.0.input_layernorm.weight"));
  CHECK_FALSE(linear("h.0.ln_1.weight"));
  CHECK_FALSE(linear("model.layers.0.self_attn.q_proj.bias"));
  CHECK_FALSE(linear("model.layers.0.self_attn.q_proj.weight", DType::BF16, v));
  CHECK_FALSE(linear("encoder.conv_in.weight", DType::BF16, conv));
  CHECK_FALSE(linear("proj.weight", DType::I8));
  CHECK_FALSE(linear("proj.weight", DType::F8_E4M3));
  CHECK_FALSE(linear("weight"));
  CHECK_FALSE(linear("proj.weight", DType::BF16, {0, 32}));
  CHECK(linear_exclusion("model.embed_tokens.weight", DType::BF16, m)->find("embedding") !=
        std::string::npos);
  CHECK(linear_exclusion("enc.conv.weight", DType::BF16, conv)->find("4-D") != std::string::npos);
}

TEST_CASE("config: resolution against a pipeline") {
  const uint64_t seed = test::printed_seed("config pipeline");
  test::ScratchDir dir;
  const auto ckpt_path = dir / "flux";
  test::write_preset("tiny-flux", ckpt_path, seed);
  const Checkpoint ckpt = Checkpoint::open(ckpt_path);

  SUBCASE("the design's mapping") {
    const QuantConfig c = parse_quant_config(json::parse(R"({
        "quant_backend": "nf4", "quant_kwargs": {"double_quant": true},
        "components_to_quantize": ["transformer", "text_encoder_2"],
        "quant_mapping": {"text_encoder_2": {"scheme": "int8"}},
        "modules_to_not_convert": ["x_embedder", "transformer_blocks.1", "no_such_module"]})"),
                                             "flux.json");
    const QuantPlan plan = plan_quantization(c, ckpt);
    const ComponentPlan* t = plan.find("transformer");
    const ComponentPlan* t5 = plan.find("text_encoder_2");
    const ComponentPlan* clip = plan.find("text_encoder");
    const ComponentPlan* vae = plan.find("vae");
    REQUIRE((t && t5 && clip && vae));
    CHECK(t->options->scheme == Scheme::Nf4);
    CHECK(t->options->double_quant);
    CHECK(t->source_key == "quant_backend");
    CHECK(t5->options->scheme == Scheme::Int8);
    CHECK(t5->source_key == "quant_mapping.text_encoder_2");
    CHECK_FALSE(clip->options.has_value());
    CHECK_FALSE(vae->options.has_value());
    CHECK(t->is_quantized("transformer_blocks.0.attn.to_q"));
    CHECK(t->is_quantized("single_transformer_blocks.1.attn.to_q"));
    CHECK_FALSE(t->is_quantized("transformer_blocks.1.attn.to_q"));
    CHECK_FALSE(t->is_quantized("x_embedder"));
    CHECK(has(t->unquantized_modules, "x_embedder"));
    CHECK(has(t->unquantized_modules, "transformer_blocks.1.ff.net.2"));
    CHECK_FALSE(has(t->unquantized_modules, "transformer_blocks.0.ff.net.2"));
    // Every 2-D weight is on exactly one side.
    const Component* tc = ckpt.find_component("transformer");
    size_t n_2d = 0;
    for (const auto& e : tc->entries()) {
      const TensorInfo& ti = tc->info(e);
      if (ti.shape.size() != 2 || ti.name.size() < 7 || ti.name.substr(ti.name.size() - 7) != ".weight")
        continue;
      ++n_2d;
      const std::string m = ti.name.substr(0, ti.name.size() - 7);
      CHECK(t->is_quantized(m) != has(t->unquantized_modules, m));
    }
    CHECK(n_2d == t->quantized_modules.size() + t->unquantized_modules.size());
    // T5's embedding stays, named for the loader, and so do its "wo" projections, which
    // transformers keeps in full precision (T5's _keep_in_fp32_modules).
    CHECK(has(t5->unquantized_modules, "shared"));
    CHECK(has(t5->unquantized_modules, "encoder.block.0.layer.1.DenseReluDense.wo"));
    CHECK_FALSE(t5->is_quantized("encoder.block.1.layer.1.DenseReluDense.wo"));
    CHECK(t5->is_quantized("encoder.block.1.layer.1.DenseReluDense.wi_0"));
    CHECK(t5->is_quantized("encoder.block.0.layer.0.SelfAttention.q"));
    // The pattern matching nothing is a warning naming it.
    bool warned = false;
    for (const auto& w : plan.warnings) {
      warned = warned || (contains(w, "modules_to_not_convert[2]") && contains(w, "no_such_module"));
    }
    CHECK(warned);
  }

  SUBCASE("unknown components and components without weights name the key") {
    std::string msg = test::error_message([&] {
      plan_quantization(parse_quant_config(json::parse(R"({"quant_backend": "nf4",
          "components_to_quantize": ["transformer", "unet"]})"),
                                           "c.json"),
                        ckpt);
    });
    CHECK(contains(msg, "c.json: components_to_quantize[1]"));
    CHECK(contains(msg, "unknown component 'unet'"));
    CHECK(contains(msg, "'transformer'"));  // lists what there is
    msg = test::error_message([&] {
      plan_quantization(parse_quant_config(
                            json::parse(R"({"quant_mapping": {"scheduler": {"scheme": "int8"}}})"), "c.json"),
                        ckpt);
    });
    CHECK(contains(msg, "quant_mapping.scheduler"));
    CHECK(contains(msg, "holds no weights"));
  }

  SUBCASE("a pattern in a mapping entry that matches nothing is a warning naming it") {
    const QuantPlan plan = plan_quantization(
        parse_quant_config(json::parse(R"({"quant_mapping": {"text_encoder": {"scheme": "int8",
            "modules_to_not_convert": ["*fc1", "proj_out"]}}})"),
                           "c.json"),
        ckpt);
    REQUIRE(plan.warnings.size() == 1);
    CHECK(contains(plan.warnings[0], "quant_mapping.text_encoder.modules_to_not_convert[1]"));
    CHECK(contains(plan.warnings[0], "'proj_out'"));
    const ComponentPlan* clip = plan.find("text_encoder");
    CHECK(clip->options->scheme == Scheme::Int8);
    CHECK_FALSE(plan.find("transformer")->options.has_value());
    for (const auto& m : clip->quantized_modules) CHECK_FALSE(pattern_matches("*fc1", m));
  }

  SUBCASE("without components_to_quantize every weight component is quantized") {
    const QuantPlan plan =
        plan_quantization(parse_quant_config(json::parse(R"({"quant_backend": "int8"})"), "c"), ckpt);
    for (const auto& c : plan.components) CHECK(c.options.has_value());
  }
}

TEST_CASE("config: a single model is the component \"\"; tied lm_head is listed") {
  const uint64_t seed = test::printed_seed("config model");
  test::ScratchDir dir;
  test::write_preset("llama-tied", dir / "llama", seed, DType::BF16, 0.05);
  const Checkpoint ckpt = Checkpoint::open(dir / "llama");
  REQUIRE_FALSE(ckpt.components()[0].find("lm_head.weight"));
  const QuantPlan plan =
      plan_quantization(parse_quant_config(json::parse(R"({"quant_backend": "nf4"})"), "c"), ckpt);
  REQUIRE(plan.components.size() == 1);
  const ComponentPlan& c = plan.components[0];
  CHECK(c.component.empty());
  CHECK(has(c.unquantized_modules, "lm_head"));
  CHECK(has(c.unquantized_modules, "model.embed_tokens"));
  CHECK(c.is_quantized("model.layers.0.mlp.down_proj"));
  // Naming a component a single model does not have.
  const std::string msg = test::error_message([&] {
    plan_quantization(
        parse_quant_config(json::parse(R"({"quant_mapping": {"transformer": {"scheme": "nf4"}}})"), "c"),
        ckpt);
  });
  CHECK(contains(msg, "quant_mapping.transformer"));
  CHECK(contains(msg, "single model"));
}

TEST_CASE("config: a skip list that a loader's rule would read wider is a warning") {
  // transformers' llm_int8_skip_modules matches plain suffixes: skipping "proj" would also skip
  // "out_proj", which qtool quantizes.
  test::ScratchDir dir;
  const auto model = dir / "m";
  std::filesystem::create_directories(model);
  write_json_file(model / "config.json",
                  json{{"model_type", "llama"}, {"architectures", {"LlamaForCausalLM"}}});
  {
    ComponentWriter w(model, "model",
                      {{TensorDecl{"proj.weight", DType::F32, {4, 8}}},
                       {TensorDecl{"out_proj.weight", DType::F32, {4, 8}}}},
                      0);
    std::vector<uint8_t> zeros(4 * 8 * 4, 0);
    w.write("proj.weight", zeros);
    w.write("out_proj.weight", zeros);
    w.commit();
  }
  const Checkpoint ckpt = Checkpoint::open(model);
  const QuantPlan plan = plan_quantization(
      parse_quant_config(json::parse(R"({"quant_backend": "int8", "modules_to_not_convert": ["proj"]})"),
                         "c"),
      ckpt);
  CHECK(plan.components[0].is_quantized("out_proj"));
  CHECK_FALSE(plan.components[0].is_quantized("proj"));
  bool warned = false;
  for (const auto& w : plan.warnings)
    warned = warned || (contains(w, "transformers") && contains(w, "'out_proj'"));
  CHECK(warned);
}
