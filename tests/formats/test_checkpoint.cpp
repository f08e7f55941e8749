// Checkpoints: sharded writing and reading, model and pipeline folders, their malformed forms,
// the fingerprint, JSON files and OutputPath.
#include <doctest/doctest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <map>
#include <random>
#include <set>

#include "formats_test_util.hpp"
#include "qtool/formats/checkpoint.hpp"

namespace qtool {
namespace {

namespace fs = std::filesystem;
using test::st_bytes;
using test::st_entry;
using test::st_header;
using test::TempDir;

struct Written {
  std::map<std::string, std::vector<uint8_t>> bytes;
  std::vector<std::vector<TensorDecl>> groups;
};

// A component of `n_layers` layers, each a group of a weight and its quant state of mixed dtypes.
Written make_groups(std::mt19937_64& rng, int n_layers) {
  Written w;
  for (int l = 0; l < n_layers; ++l) {
    const std::string m = "layers." + std::to_string(l) + ".mlp";
    std::vector<TensorDecl> g = {
        {m + ".weight", DType::U8, {static_cast<int64_t>(100 + rng() % 200), 1}},
        {m + ".weight.absmax", DType::F32, {static_cast<int64_t>(1 + rng() % 8)}},
        {m + ".weight.quant_map", DType::F32, {16}},
        {m + ".bias", DType::BF16, {static_cast<int64_t>(1 + rng() % 64)}},
    };
    w.groups.push_back(g);
  }
  w.groups.push_back({{"norm.weight", DType::F16, {32}}});
  w.groups.push_back({{"step", DType::I64, {}}});
  for (const auto& g : w.groups)
    for (const auto& d : g) {
      auto& b = w.bytes[d.name];
      b.resize(d.nbytes());
      for (auto& x : b) x = static_cast<uint8_t>(rng());
    }
  return w;
}

void write_component(const fs::path& dir, const std::string& base, const Written& w, uint64_t max_shard,
                     size_t* n_shards = nullptr) {
  fs::create_directories(dir);
  ComponentWriter cw(dir, base, w.groups, max_shard, {{"qtool.test", "1"}});
  // Tensors in reverse order, to show the order of writes does not matter.
  for (auto it = w.bytes.rbegin(); it != w.bytes.rend(); ++it) cw.write(it->first, it->second);
  cw.commit();
  if (n_shards) *n_shards = cw.n_shards();
}

void check_component(const Component& c, const Written& w) {
  CHECK(c.entries().size() == w.bytes.size());
  uint64_t total = 0, params = 0;
  for (const auto& [name, bytes] : w.bytes) {
    const auto e = c.find(name);
    REQUIRE(e.has_value());
    const auto d = c.data(*e);
    CHECK(std::equal(d.begin(), d.end(), bytes.begin(), bytes.end()));
    total += bytes.size();
    params += c.info(*e).numel();
  }
  CHECK(c.total_bytes() == total);
  CHECK(c.n_params() == params);
  CHECK_FALSE(c.find("missing.weight").has_value());
}

TEST_CASE("shard_file_name") {
  CHECK(shard_file_name("model", 0, 1) == "model.safetensors");
  CHECK(shard_file_name("model", 0, 4) == "model-00001-of-00004.safetensors");
  CHECK(shard_file_name("model", 3, 4) == "model-00004-of-00004.safetensors");
  CHECK(shard_file_name("diffusion_pytorch_model", 1, 3) ==
        "diffusion_pytorch_model-00002-of-00003.safetensors");
}

TEST_CASE("sharded write and read: groups never split, index complete, bytes identical") {
  std::mt19937_64 rng(test::test_seed("sharded write"));
  TempDir dir;
  const Written w = make_groups(rng, 12);
  size_t n_shards = 0;
  write_component(dir.path(), "model", w, 1000, &n_shards);
  CHECK(n_shards >= 3);

  // The files: shards named -0000k-of-0000n, an index, no temporaries.
  std::set<std::string> files;
  for (const auto& e : fs::directory_iterator(dir.path())) files.insert(e.path().filename().string());
  CHECK(files.size() == n_shards + 1);
  CHECK(files.count("model.safetensors.index.json") == 1);
  for (size_t s = 0; s < n_shards; ++s) CHECK(files.count(shard_file_name("model", s, n_shards)) == 1);

  const auto index = read_json_file(dir / "model.safetensors.index.json");
  uint64_t total = 0;
  for (const auto& [n, b] : w.bytes) total += b.size();
  CHECK(index["metadata"]["total_size"] == total);
  CHECK(index["weight_map"].size() == w.bytes.size());

  const auto ck = Checkpoint::open(dir.path());
  CHECK(ck.layout() == Checkpoint::Layout::Model);
  REQUIRE(ck.components().size() == 1);
  const Component& c = ck.components()[0];
  CHECK(c.name().empty());
  CHECK(c.weights_base() == "model");
  CHECK(c.index_path() == dir / "model.safetensors.index.json");
  CHECK(c.shards().size() == n_shards);
  check_component(c, w);
  for (const auto& s : c.shards()) {
    CHECK(s.metadata().at("format") == "pt");
    CHECK(s.metadata().at("qtool.test") == "1");
    uint64_t bytes = 0;
    for (const auto& t : s.tensors()) bytes += t.nbytes();
    // A shard holds at most the limit, unless a single group is larger than it.
    CHECK((bytes <= 1000 || s.tensors().size() <= 4));
  }
  // Groups are never split: every tensor of a group is in the shard of its first tensor.
  for (const auto& g : w.groups) {
    const uint32_t shard = c.find(g[0].name)->shard;
    for (const auto& d : g) CHECK(c.find(d.name)->shard == shard);
  }
}

TEST_CASE(
    "unsharded write: one model.safetensors, no index; a group larger than the limit gets its own shard") {
  std::mt19937_64 rng(test::test_seed("unsharded write"));
  TempDir dir;
  const Written w = make_groups(rng, 3);
  size_t n = 0;
  write_component(dir / "one", "model", w, 0, &n);
  CHECK(n == 1);
  CHECK(fs::exists(dir / "one" / "model.safetensors"));
  CHECK_FALSE(fs::exists(dir / "one" / "model.safetensors.index.json"));
  const auto ck = Checkpoint::open(dir / "one");
  CHECK(ck.components()[0].index_path().empty());
  check_component(ck.components()[0], w);

  write_component(dir / "tiny", "diffusion_pytorch_model", w, 1, &n);
  CHECK(n == w.groups.size());  // every group over the 1-byte limit: one shard each
  const auto ck2 = Checkpoint::open(dir / "tiny");
  CHECK(ck2.components()[0].weights_base() == "diffusion_pytorch_model");
  check_component(ck2.components()[0], w);
}

TEST_CASE("single-file layout") {
  TempDir dir;
  const auto path = dir / "weights.safetensors";
  test::write_file(path, st_bytes(st_header({st_entry("w", "F32", "[2]", 0, 8)}), 8));
  const auto ck = Checkpoint::open(path);
  CHECK(ck.layout() == Checkpoint::Layout::File);
  REQUIRE(ck.components().size() == 1);
  CHECK(ck.components()[0].weights_base() == "weights");
  CHECK_FALSE(ck.components()[0].config().has_value());
  CHECK(ck.components()[0].n_params() == 2);
}

// A diffusers-like pipeline in a folder: components listed out of alphabetical order.
void make_pipeline(const fs::path& root, std::mt19937_64& rng) {
  fs::create_directories(root);
  test::write_file(root / "model_index.json",
                   R"({"_class_name": "FluxPipeline", "_diffusers_version": "0.30.0",
                       "transformer": ["diffusers", "FluxTransformer2DModel"],
                       "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                       "vae": ["diffusers", "AutoencoderKL"],
                       "text_encoder": ["transformers", "CLIPTextModel"],
                       "tokenizer": ["transformers", "CLIPTokenizer"],
                       "image_encoder": [null, null],
                       "force_zeros_for_empty_prompt": true})");
  const Written w = make_groups(rng, 4);
  write_component(root / "transformer", "diffusion_pytorch_model", w, 600);  // >= 4 * 170 bytes: 2+ shards
  test::write_file(root / "transformer" / "config.json",
                   R"({"_class_name": "FluxTransformer2DModel", "num_layers": 4})");
  write_component(root / "vae", "diffusion_pytorch_model", make_groups(rng, 1), 0);
  test::write_file(root / "vae" / "config.json", R"({"_class_name": "AutoencoderKL"})");
  write_component(root / "text_encoder", "model", make_groups(rng, 2), 0);
  test::write_file(root / "text_encoder" / "config.json", R"({"architectures": ["CLIPTextModel"]})");
  fs::create_directories(root / "scheduler");
  test::write_file(root / "scheduler" / "scheduler_config.json", R"({"shift": 3.0})");
  fs::create_directories(root / "tokenizer");
  test::write_file(root / "tokenizer" / "vocab.json", "{}");
}

TEST_CASE("pipeline folder: components in model_index.json order, weightless ones listed apart") {
  std::mt19937_64 rng(test::test_seed("pipeline"));
  TempDir dir;
  make_pipeline(dir / "flux", rng);
  const auto ck = Checkpoint::open(dir / "flux");
  CHECK(ck.layout() == Checkpoint::Layout::Pipeline);
  REQUIRE(ck.model_index().has_value());
  CHECK((*ck.model_index())["_class_name"] == "FluxPipeline");
  std::vector<std::string> names;
  for (const auto& c : ck.components()) names.push_back(c.name());
  CHECK(names == std::vector<std::string>{"transformer", "vae", "text_encoder"});
  CHECK(ck.other_components() == std::vector<std::string>{"scheduler", "tokenizer"});
  const Component* t = ck.find_component("transformer");
  REQUIRE(t != nullptr);
  CHECK(t->weights_base() == "diffusion_pytorch_model");
  CHECK(t->shards().size() > 1);
  CHECK(t->dir() == dir / "flux" / "transformer");
  REQUIRE(t->config().has_value());
  CHECK((*t->config())["num_layers"] == 4);
  CHECK(ck.find_component("text_encoder")->weights_base() == "model");
  CHECK(ck.find_component("scheduler") == nullptr);
}

TEST_CASE("fingerprint: structure only, independent of sharding; changes with any dtype or shape") {
  std::mt19937_64 rng(test::test_seed("fingerprint"));
  TempDir dir;
  const Written w = make_groups(rng, 5);
  write_component(dir / "a", "model", w, 0);
  size_t n_shards = 0;
  write_component(dir / "b", "model", w, 500, &n_shards);
  CHECK(n_shards > 1);
  Written w2 = w;
  w2.groups[0][0].shape[0] += 1;
  w2.bytes[w2.groups[0][0].name].resize(w2.groups[0][0].nbytes());
  write_component(dir / "c", "model", w2, 0);
  Written w3 = w;
  w3.groups[0][3].dtype = DType::F16;  // BF16 -> F16, same byte size
  write_component(dir / "d", "model", w3, 0);

  const std::string fa = Checkpoint::open(dir / "a").fingerprint();
  CHECK(fa.size() == 32);
  CHECK(fa.find_first_not_of("0123456789abcdef") == std::string::npos);
  CHECK(Checkpoint::open(dir / "b").fingerprint() == fa);
  CHECK(Checkpoint::open(dir / "c").fingerprint() != fa);
  CHECK(Checkpoint::open(dir / "d").fingerprint() != fa);
  // Values do not count: same structure, other bytes.
  Written w4 = w;
  for (auto& [n, b] : w4.bytes)
    for (auto& x : b) x ^= 0x5A;
  write_component(dir / "e", "model", w4, 0);
  CHECK(Checkpoint::open(dir / "e").fingerprint() == fa);
}

// --- malformed checkpoints (continuing the numbering of test_malformed.cpp) ---

// A two-shard model folder: shard 1 holds a, b; shard 2 holds c.
void make_sharded(const fs::path& dir, const std::string& index_text = "") {
  fs::create_directories(dir);
  test::write_file(
      dir / "model-00001-of-00002.safetensors",
      st_bytes(st_header({st_entry("a", "F32", "[2]", 0, 8), st_entry("b", "U8", "[3]", 8, 11)}), 11));
  test::write_file(dir / "model-00002-of-00002.safetensors",
                   st_bytes(st_header({st_entry("c", "I8", "[4]", 0, 4)}), 4));
  test::write_file(dir / "model.safetensors.index.json",
                   index_text.empty() ? R"({"metadata": {"total_size": 15}, "weight_map": {
                       "a": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors",
                       "c": "model-00002-of-00002.safetensors"}})"
                                      : index_text);
}

TEST_CASE("malformed 52: the valid two-shard baseline opens") {
  TempDir dir;
  make_sharded(dir / "m");
  const auto ck = Checkpoint::open(dir / "m");
  CHECK(ck.components()[0].entries().size() == 3);
  CHECK(ck.components()[0].shards().size() == 2);
}

TEST_CASE("malformed 53: index names a shard that does not exist") {
  TempDir dir;
  make_sharded(dir / "m", R"({"weight_map": {"a": "model-00001-of-00002.safetensors",
      "b": "model-00001-of-00002.safetensors", "c": "model-00003-of-00002.safetensors"}})");
  test::check_error(
      [&] { Checkpoint::open(dir / "m"); }, ErrorKind::InvalidInput,
      {"model.safetensors.index.json", "'c'", "model-00003-of-00002.safetensors", "does not exist"});
}

TEST_CASE("malformed 54: a tensor in another shard than the index says") {
  TempDir dir;
  make_sharded(dir / "m", R"({"weight_map": {"a": "model-00001-of-00002.safetensors",
      "b": "model-00002-of-00002.safetensors", "c": "model-00002-of-00002.safetensors"}})");
  test::check_error([&] { Checkpoint::open(dir / "m"); }, ErrorKind::InvalidInput,
                    {"model-00001-of-00002.safetensors", "'b'",
                     "maps it to 'model-00002-of-00002.safetensors'", "file offset"});
}

TEST_CASE("malformed 55: a shard tensor missing from the index") {
  TempDir dir;
  make_sharded(dir / "m", R"({"weight_map": {"a": "model-00001-of-00002.safetensors",
      "c": "model-00002-of-00002.safetensors"}})");
  test::check_error([&] { Checkpoint::open(dir / "m"); }, ErrorKind::InvalidInput,
                    {"model-00001-of-00002.safetensors", "'b'", "not in the index", "file offset"});
}

TEST_CASE("malformed 56: an index tensor that no shard holds") {
  TempDir dir;
  make_sharded(dir / "m", R"({"weight_map": {"a": "model-00001-of-00002.safetensors",
      "b": "model-00001-of-00002.safetensors", "c": "model-00002-of-00002.safetensors",
      "d": "model-00002-of-00002.safetensors"}})");
  test::check_error([&] { Checkpoint::open(dir / "m"); }, ErrorKind::InvalidInput,
                    {"model.safetensors.index.json", "'d'", "does not contain it"});
}

TEST_CASE("malformed 57: index that is not valid JSON") {
  TempDir dir;
  make_sharded(dir / "m", R"({"weight_map": {"a": "model-00001-of-00002.safetensors",})");
  test::check_error([&] { Checkpoint::open(dir / "m"); }, ErrorKind::InvalidInput,
                    {"model.safetensors.index.json", "invalid JSON at byte"});
}

TEST_CASE("malformed 58: index without a weight_map") {
  TempDir dir;
  make_sharded(dir / "m", R"({"metadata": {"total_size": 15}})");
  test::check_error([&] { Checkpoint::open(dir / "m"); }, ErrorKind::InvalidInput,
                    {"model.safetensors.index.json", "weight_map"});
}

TEST_CASE("malformed 59: index with an implausible total_size") {
  TempDir dir;
  make_sharded(dir / "m", R"({"metadata": {"total_size": 999999999}, "weight_map": {
      "a": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors",
      "c": "model-00002-of-00002.safetensors"}})");
  test::check_error([&] { Checkpoint::open(dir / "m"); }, ErrorKind::InvalidInput,
                    {"model.safetensors.index.json", "total_size", "implausible"});
}

TEST_CASE("malformed 60: index mapping a tensor to a path outside the folder") {
  TempDir dir;
  make_sharded(dir / "m", R"({"weight_map": {"a": "../model-00001-of-00002.safetensors"}})");
  test::check_error([&] { Checkpoint::open(dir / "m"); }, ErrorKind::InvalidInput,
                    {"model.safetensors.index.json", "'a'", "not a file name"});
}

TEST_CASE("malformed 61: a malformed shard inside a model folder is named by its path") {
  TempDir dir;
  make_sharded(dir / "m");
  test::write_file(dir / "m" / "model-00002-of-00002.safetensors",
                   st_bytes(st_header({st_entry("c", "I8", "[4]", 0, 4)}), 3));
  test::check_error(
      [&] { Checkpoint::open(dir / "m"); }, ErrorKind::InvalidInput,
      {(dir / "m" / "model-00002-of-00002.safetensors").string(), "'c'", "exceeds data size 3"});
}

TEST_CASE("malformed 62: model_index.json that is not valid JSON") {
  std::mt19937_64 rng(test::test_seed("broken pipeline"));
  TempDir dir;
  make_pipeline(dir / "p", rng);
  test::write_file(dir / "p" / "model_index.json", R"({"transformer": ["diffusers", "X"] "vae": 1})");
  test::check_error([&] { Checkpoint::open(dir / "p"); }, ErrorKind::InvalidInput,
                    {"model_index.json", "invalid JSON at byte"});
}

TEST_CASE("malformed 63: model_index.json entry that is not [library, class]") {
  std::mt19937_64 rng(test::test_seed("broken pipeline"));
  TempDir dir;
  make_pipeline(dir / "p", rng);
  test::write_file(dir / "p" / "model_index.json",
                   R"({"transformer": ["diffusers"], "vae": ["diffusers", "AutoencoderKL"]})");
  test::check_error([&] { Checkpoint::open(dir / "p"); }, ErrorKind::InvalidInput,
                    {"model_index.json", "'transformer'", "[library, class]"});
  test::write_file(dir / "p" / "model_index.json", R"({"transformer": "FluxTransformer2DModel"})");
  test::check_error([&] { Checkpoint::open(dir / "p"); }, ErrorKind::InvalidInput,
                    {"model_index.json", "'transformer'", "[library, class]"});
}

TEST_CASE("malformed 64: model_index.json naming a component folder that is missing") {
  std::mt19937_64 rng(test::test_seed("broken pipeline"));
  TempDir dir;
  make_pipeline(dir / "p", rng);
  fs::remove_all(dir / "p" / "vae");
  test::check_error([&] { Checkpoint::open(dir / "p"); }, ErrorKind::InvalidInput,
                    {"model_index.json", "'vae'", "no folder"});
}

TEST_CASE("malformed 65: model_index.json that is not an object") {
  TempDir dir;
  fs::create_directories(dir / "p");
  test::write_file(dir / "p" / "model_index.json", "[\"transformer\"]");
  test::check_error([&] { Checkpoint::open(dir / "p"); }, ErrorKind::InvalidInput,
                    {"model_index.json", "not a JSON object"});
}

TEST_CASE("malformed 66: a component with PyTorch pickle weights only") {
  std::mt19937_64 rng(test::test_seed("pickle"));
  TempDir dir;
  make_pipeline(dir / "p", rng);
  fs::remove_all(dir / "p" / "vae");
  fs::create_directories(dir / "p" / "vae");
  test::write_file(dir / "p" / "vae" / "diffusion_pytorch_model.bin", "PK");
  test::check_error([&] { Checkpoint::open(dir / "p"); }, ErrorKind::Unsupported,
                    {"diffusion_pytorch_model.bin", "'vae'", "safetensors"});
}

TEST_CASE("malformed 67: a model folder without weights, and a missing path") {
  TempDir dir;
  fs::create_directories(dir / "empty");
  test::write_file(dir / "empty" / "config.json", "{}");
  test::check_error([&] { Checkpoint::open(dir / "empty"); }, ErrorKind::InvalidInput,
                    {(dir / "empty").string(), "no .safetensors"});
  test::check_error([&] { Checkpoint::open(dir / "nothing-here"); }, ErrorKind::Io, {"nothing-here"});
}

TEST_CASE("malformed 68: config.json that is not valid JSON") {
  TempDir dir;
  make_sharded(dir / "m");
  test::write_file(dir / "m" / "config.json", "{\"hidden_size\": 4096,,}");
  test::check_error([&] { Checkpoint::open(dir / "m"); }, ErrorKind::InvalidInput,
                    {"config.json", "invalid JSON at byte 21"});
}

TEST_CASE("malformed 69: several .safetensors files and no index") {
  TempDir dir;
  make_sharded(dir / "m");
  fs::remove(dir / "m" / "model.safetensors.index.json");
  test::check_error([&] { Checkpoint::open(dir / "m"); }, ErrorKind::InvalidInput,
                    {(dir / "m").string(), "no index"});
}

// --- JSON files ---

TEST_CASE("write_json_file / read_json_file") {
  TempDir dir;
  const nlohmann::json j = {{"a", 1}, {"b", {1, 2, 3}}, {"s", "\xc3\xa9"}};
  write_json_file(dir / "x.json", j);
  CHECK(read_json_file(dir / "x.json") == j);
  size_t n = 0;
  for ([[maybe_unused]] const auto& e : fs::directory_iterator(dir.path())) ++n;
  CHECK(n == 1);  // no temporary left behind
  test::check_error([&] { read_json_file(dir / "none.json"); }, ErrorKind::Io, {"none.json"});
  test::check_error([&] { write_json_file(dir / "no" / "dir.json", j); }, ErrorKind::Io, {"dir.json"});
}

// --- OutputPath ---

TEST_CASE("OutputPath: nothing under the final name until commit; uncommitted work is removed") {
  TempDir dir;
  const fs::path out = dir / "out";
  {
    OutputPath o(out, false);
    CHECK(o.tmp().parent_path() == o.final_path().parent_path());
    CHECK(o.tmp() != o.final_path());
    fs::create_directories(o.tmp());
    test::write_file(o.tmp() / "model.safetensors", "x");
    CHECK_FALSE(fs::exists(out));
  }  // abandoned: e.g. an error while writing
  CHECK(fs::is_empty(dir.path()));
  {
    OutputPath o(out, false);
    fs::create_directories(o.tmp());
    test::write_file(o.tmp() / "a.txt", "new");
    o.commit();
  }
  CHECK(fs::exists(out / "a.txt"));
  size_t n = 0;
  for ([[maybe_unused]] const auto& e : fs::directory_iterator(dir.path())) ++n;
  CHECK(n == 1);
}

TEST_CASE("OutputPath: refuses an existing output without force; with force, commit replaces it") {
  TempDir dir;
  const fs::path out = dir / "out";
  fs::create_directories(out);
  test::write_file(out / "old.txt", "old");
  test::check_error([&] { OutputPath o(out, false); }, ErrorKind::InvalidInput, {out.string(), "--force"});
  CHECK(fs::exists(out / "old.txt"));
  {
    OutputPath o(out, true);
    fs::create_directories(o.tmp());
    test::write_file(o.tmp() / "new.txt", "new");
    CHECK(fs::exists(out / "old.txt"));  // the old output stays until the new one is complete
    o.commit();
  }
  CHECK(fs::exists(out / "new.txt"));
  CHECK_FALSE(fs::exists(out / "old.txt"));
  size_t n = 0;
  for ([[maybe_unused]] const auto& e : fs::directory_iterator(dir.path())) ++n;
  CHECK(n == 1);

  // A file output replaces a file.
  const fs::path f = dir / "plan.json";
  test::write_file(f, "old");
  {
    OutputPath o(f, true);
    test::write_file(o.tmp(), "new");
    o.commit();
  }
  CHECK(test::read_file(f) == std::vector<uint8_t>{'n', 'e', 'w'});
}

TEST_CASE("OutputPath: refuses the input itself, a path inside the input, and an output holding the input") {
  TempDir dir;
  fs::create_directories(dir / "ckpt" / "sub");
  test::check_error([&] { OutputPath o(dir / "ckpt", true, dir / "ckpt"); }, ErrorKind::InvalidInput,
                    {"input"});
  test::check_error([&] { OutputPath o(dir / "ckpt" / "q", true, dir / "ckpt"); }, ErrorKind::InvalidInput,
                    {"inside the input"});
  test::check_error([&] { OutputPath o(dir.path(), true, dir / "ckpt" / "sub"); }, ErrorKind::InvalidInput,
                    {"inside the output"});
  test::check_error([&] { OutputPath o(dir / "ckpt/", true, dir / "ckpt/./sub/.."); },
                    ErrorKind::InvalidInput, {"input"});
  OutputPath ok(dir / "ckpt-q", false, dir / "ckpt");
  CHECK(ok.final_path().filename() == "ckpt-q");
}

TEST_CASE("OutputPath: temporaries of killed runs are cleaned up") {
  TempDir dir;
  // A process that has exited: its pid is free (not reused this quickly in practice).
  const pid_t child = ::fork();
  if (child == 0) ::_exit(0);
  ::waitpid(child, nullptr, 0);
  const fs::path stale = dir / ("out.tmp-" + std::to_string(child));
  fs::create_directories(stale);
  test::write_file(stale / "model.safetensors", "partial");
  const fs::path live = dir / ("out.tmp-" + std::to_string(::getppid()));  // a running process: kept
  fs::create_directories(live);
  // The single-file writer's temporary beside a single-file output.
  const fs::path stale_file = dir / ("out.tmp-" + std::to_string(child) + ".tmp-" + std::to_string(child));
  test::write_file(stale_file, "partial");
  const fs::path unrelated = dir / ("out.tmp-" + std::to_string(child) + "x");  // not a name we make: kept
  test::write_file(unrelated, "keep");
  {
    OutputPath o(dir / "out", false);
    CHECK_FALSE(fs::exists(stale));
    CHECK_FALSE(fs::exists(stale_file));
    CHECK(fs::exists(live));
    CHECK(fs::exists(unrelated));
  }
}

// A process id that is no longer running.
pid_t dead_pid() {
  const pid_t child = ::fork();
  if (child == 0) ::_exit(0);
  ::waitpid(child, nullptr, 0);
  return child;
}

TEST_CASE(
    "OutputPath: an old output a killed run moved aside comes back; with the final name taken it goes") {
  TempDir dir;
  // Killed between the two renames of a commit without RENAME_EXCHANGE: no `out`, `out.old-<pid>`.
  const fs::path old = dir / ("out.old-" + std::to_string(dead_pid()));
  fs::create_directories(old);
  test::write_file(old / "a.txt", "old");
  // Without --force the restored output is refused like any existing one, and stays.
  test::check_error([&] { OutputPath o(dir / "out", false); }, ErrorKind::InvalidInput, {"--force"});
  CHECK(test::read_file(dir / "out" / "a.txt") == std::vector<uint8_t>{'o', 'l', 'd'});
  CHECK_FALSE(fs::exists(old));

  // A second leftover while `out` exists: deleted, `out` untouched.
  const fs::path old2 = dir / ("out.old-" + std::to_string(dead_pid()));
  fs::create_directories(old2);
  test::write_file(old2 / "b.txt", "older");
  {
    OutputPath o(dir / "out", true);
    CHECK_FALSE(fs::exists(old2));
    CHECK(fs::exists(dir / "out" / "a.txt"));
  }
  size_t n = 0;
  for ([[maybe_unused]] const auto& e : fs::directory_iterator(dir.path())) ++n;
  CHECK(n == 1);
}

TEST_CASE("OutputPath: with force a folder replaces a file and a file a folder, leaving no sibling") {
  TempDir dir;
  const fs::path out = dir / "out";
  test::write_file(out, "old file");
  {
    OutputPath o(out, true);
    fs::create_directories(o.tmp());
    test::write_file(o.tmp() / "new.txt", "new");
    o.commit();
  }
  CHECK(fs::is_directory(out));
  CHECK(fs::exists(out / "new.txt"));
  {
    OutputPath o(out, true);
    test::write_file(o.tmp(), "a file");
    o.commit();
  }
  CHECK(fs::is_regular_file(out));
  CHECK(test::read_file(out).size() == 6);
  size_t n = 0;
  for ([[maybe_unused]] const auto& e : fs::directory_iterator(dir.path())) ++n;
  CHECK(n == 1);
}

}  // namespace
}  // namespace qtool
