// Writing synthetic checkpoints: the folder layout the loaders expect, read back through qtool's
// reader; bytes independent of thread count and sharding; outputs only under their final name.
#include <doctest/doctest.h>

#include <cstring>
#include <filesystem>
#include <map>
#include <vector>

#include "formats_test_util.hpp"
#include "qtool/formats/checkpoint.hpp"
#include "qtool/formats/synth.hpp"

namespace fs = std::filesystem;
using qtool::Checkpoint;
using qtool::DType;
using qtool::SynthModel;

namespace {

SynthModel make(const std::string& preset, DType dt = DType::BF16, std::vector<std::string> components = {}) {
  qtool::SynthSpec spec;
  spec.preset = preset;
  spec.dtype = dt;
  spec.components = std::move(components);
  return qtool::make_synth_model(spec);
}

qtool::SynthResult write(const SynthModel& m, const fs::path& out, uint64_t seed, size_t threads,
                         std::optional<uint64_t> max_shard = std::nullopt, bool force = false) {
  qtool::SynthWriteOptions o;
  o.seed = seed;
  o.threads = threads;
  o.max_shard_size = max_shard;
  o.force = force;
  return qtool::write_synth_model(m, out, o);
}

// component name -> tensor name -> bytes
std::map<std::string, std::map<std::string, std::vector<uint8_t>>> read_all(const fs::path& path) {
  std::map<std::string, std::map<std::string, std::vector<uint8_t>>> out;
  const Checkpoint ck = Checkpoint::open(path);
  for (const auto& c : ck.components())
    for (const auto& e : c.entries()) {
      const auto d = c.data(e);
      out[c.name()][c.info(e).name] = std::vector<uint8_t>(d.begin(), d.end());
    }
  return out;
}

std::vector<std::string> entries_of(const fs::path& dir) {
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

}  // namespace

TEST_CASE("synth write: tiny-flux is a diffusers pipeline folder that qtool reads back exactly") {
  const uint64_t seed = qtool::test::test_seed("synth tiny-flux");
  qtool::test::TempDir tmp;
  const SynthModel m = make("tiny-flux");
  const auto result = write(m, tmp / "flux", seed, 2);
  const fs::path root = tmp / "flux";
  CHECK(entries_of(tmp.path()) == std::vector<std::string>{"flux"});  // no temporaries left
  CHECK(entries_of(root) == std::vector<std::string>{"model_index.json", "scheduler", "text_encoder",
                                                     "text_encoder_2", "tokenizer", "tokenizer_2",
                                                     "transformer", "vae"});
  const auto index = qtool::read_json_file(root / "model_index.json");
  CHECK(index.at("transformer") == nlohmann::json::array({"diffusers", "FluxTransformer2DModel"}));
  CHECK(index.at("text_encoder_2") == nlohmann::json::array({"transformers", "T5EncoderModel"}));
  CHECK(fs::exists(root / "scheduler" / "scheduler_config.json"));
  for (const char* f : {"vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"})
    CHECK(fs::exists(root / "tokenizer" / f));
  for (const char* f : {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"})
    CHECK(fs::exists(root / "tokenizer_2" / f));
  // Sharded as configured for the tiny preset: the transformer and T5 with an index.
  CHECK(fs::exists(root / "transformer" / "diffusion_pytorch_model.safetensors.index.json"));
  CHECK(fs::exists(root / "transformer" / "diffusion_pytorch_model-00001-of-00003.safetensors"));
  CHECK(fs::exists(root / "text_encoder_2" / "model.safetensors.index.json"));
  CHECK(fs::exists(root / "text_encoder" / "model.safetensors"));
  CHECK(fs::exists(root / "vae" / "diffusion_pytorch_model.safetensors"));

  const Checkpoint ck = Checkpoint::open(root);
  CHECK(ck.layout() == Checkpoint::Layout::Pipeline);
  std::vector<std::string> others = ck.other_components();
  std::sort(others.begin(), others.end());
  CHECK(others == std::vector<std::string>{"scheduler", "tokenizer", "tokenizer_2"});
  size_t n_weight_components = 0;
  for (const auto& sc : m.components) {
    if (sc.tensors.empty()) continue;
    ++n_weight_components;
    const qtool::Component* c = ck.find_component(sc.name);
    REQUIRE(c != nullptr);
    CHECK(c->entries().size() == sc.tensors.size());
    CHECK(c->n_params() == sc.n_params());
    CHECK(c->config().has_value());
    CHECK(*c->config() == *sc.config());
    for (const auto& t : sc.tensors) {
      const auto e = c->find(t.decl.name);
      REQUIRE_MESSAGE(e.has_value(), t.decl.name);
      CHECK(c->info(*e).dtype == DType::BF16);
      CHECK(c->info(*e).shape == t.decl.shape);
      // The bytes are the generator's values rounded to bf16.
      std::vector<float> v(c->info(*e).numel());
      qtool::synth_fill(t, seed, 0, v.size(), v.data());
      std::vector<uint8_t> want(v.size() * 2);
      qtool::convert_from_f32(DType::BF16, v.data(), want.data(), v.size());
      const auto got = c->data(*e);
      REQUIRE(got.size() == want.size());
      CHECK(std::memcmp(got.data(), want.data(), want.size()) == 0);
    }
    CHECK(c->shards().front().metadata().at("qtool.synth.preset") == "tiny-flux");
    CHECK(c->shards().front().metadata().at("qtool.synth.seed") == std::to_string(seed));
  }
  CHECK(ck.components().size() == n_weight_components);
  for (const auto& c : result.components) {
    if (c.name == "transformer") CHECK(c.n_shards == 3);
    if (c.name == "text_encoder") CHECK(c.n_shards == 1);
  }
}

TEST_CASE("synth write: bytes do not depend on the thread count or the sharding") {
  const uint64_t seed = qtool::test::test_seed("synth threads");
  qtool::test::TempDir tmp;
  const SynthModel m = make("tiny-flux");
  write(m, tmp / "t1", seed, 1);
  write(m, tmp / "t3", seed, 3, uint64_t{0});        // one file per component
  write(m, tmp / "t2", seed, 2, uint64_t{150'000});  // many shards
  const auto a = read_all(tmp / "t1"), b = read_all(tmp / "t3"), c = read_all(tmp / "t2");
  CHECK(a == b);
  CHECK(a == c);
  CHECK(Checkpoint::open(tmp / "t3").find_component("transformer")->shards().size() == 1);
  CHECK(Checkpoint::open(tmp / "t2").find_component("transformer")->shards().size() > 3);
  // Another seed gives other bytes, same structure.
  write(m, tmp / "other", seed + 1, 2);
  const auto d = read_all(tmp / "other");
  CHECK(a != d);
  CHECK(Checkpoint::open(tmp / "other").fingerprint() == Checkpoint::open(tmp / "t1").fingerprint());
}

TEST_CASE("synth write: tiny llama folder, f32 values exact") {
  const uint64_t seed = qtool::test::test_seed("synth tiny");
  qtool::test::TempDir tmp;
  const SynthModel m = make("tiny", DType::F32);
  write(m, tmp / "tiny", seed, 2);
  const Checkpoint ck = Checkpoint::open(tmp / "tiny");
  CHECK(ck.layout() == Checkpoint::Layout::Model);
  REQUIRE(ck.components().size() == 1);
  const auto& c = ck.components()[0];
  CHECK(fs::exists(tmp / "tiny" / "config.json"));
  CHECK(fs::exists(tmp / "tiny" / "generation_config.json"));
  CHECK(fs::exists(tmp / "tiny" / "model.safetensors.index.json"));
  CHECK(c.shards().size() > 1);
  CHECK(c.config()->at("torch_dtype") == "float32");
  for (const auto& t : m.components[0].tensors) {
    const auto e = c.find(t.decl.name);
    REQUIRE(e.has_value());
    std::vector<float> v(c.info(*e).numel());
    qtool::synth_fill(t, seed, 0, v.size(), v.data());
    CHECK(std::memcmp(c.data(*e).data(), v.data(), v.size() * 4) == 0);
  }
  CHECK_FALSE(c.find("lm_head.weight") == std::nullopt);
}

TEST_CASE("synth write: an existing output is refused without force and replaced with it") {
  const uint64_t seed = qtool::test::test_seed("synth force");
  qtool::test::TempDir tmp;
  const SynthModel m = make("tiny");
  write(m, tmp / "out", seed, 2);
  const auto before = read_all(tmp / "out");
  try {
    write(m, tmp / "out", seed + 1, 2);
    FAIL("an existing output was overwritten without force");
  } catch (const qtool::Error& e) {
    CHECK(e.kind() == qtool::ErrorKind::InvalidInput);
    CHECK(std::string(e.what()).find("out") != std::string::npos);
  }
  CHECK(read_all(tmp / "out") == before);
  write(m, tmp / "out", seed + 1, 2, std::nullopt, true);
  CHECK(read_all(tmp / "out") != before);
  CHECK(entries_of(tmp.path()) == std::vector<std::string>{"out"});
}

TEST_CASE("synth write: a component selection writes only those folders") {
  const uint64_t seed = qtool::test::test_seed("synth components");
  qtool::test::TempDir tmp;
  write(make("tiny-flux", DType::BF16, {"transformer", "scheduler"}), tmp / "p", seed, 2);
  CHECK(entries_of(tmp / "p") == std::vector<std::string>{"model_index.json", "scheduler", "transformer"});
  const Checkpoint ck = Checkpoint::open(tmp / "p");
  REQUIRE(ck.components().size() == 1);
  CHECK(ck.components()[0].name() == "transformer");
  // Same bytes as in the full pipeline: values do not depend on what else is written.
  write(make("tiny-flux"), tmp / "all", seed, 2);
  CHECK(read_all(tmp / "p").at("transformer") == read_all(tmp / "all").at("transformer"));
}
