// Strategies on hand-built trees with known optimal answers, including the cases accelerate's
// greedy infer_auto_device_map gets wrong. Sizes are in KiB-sized units (multiples of the
// 256-byte arena alignment) and the device profile has no fixed costs, so answers are exact.
#include <doctest/doctest.h>

#include <map>

#include "qtool/formats/error.hpp"
#include "qtool/planner/planner.hpp"

using namespace qtool;
using namespace qtool::planner;

namespace {

constexpr uint64_t kU = 1024;  // one size unit

DeviceProfile bare_profile() {
  DeviceProfile p;
  p.context_bytes = 0;
  p.cublas_workspace_bytes = 0;
  p.alloc_granularity_bytes = 1;
  p.host_alloc_granularity_bytes = 1;
  p.pinned_page_table_bytes_per_gib = 0;
  return p;
}

TensorDesc u8(std::string name, uint64_t nbytes) {
  TensorDesc d;
  d.name = std::move(name);
  d.nbytes = nbytes;
  d.dtype = DType::U8;
  d.shape = {static_cast<int64_t>(nbytes)};
  return d;
}

// A model of blocks "blocks.i" with the given sizes (in kU), each one tensor.
PipelineInput blocks_model(const std::vector<uint64_t>& sizes) {
  ComponentInput c;
  for (size_t i = 0; i < sizes.size(); ++i)
    c.tensors.push_back(u8(str_cat("blocks.", i, ".w.weight"), sizes[i] * kU));
  PipelineInput in;
  in.path = "hand-built";
  in.fingerprint = "test";
  in.components.push_back(std::move(c));
  return in;
}

PlanOptions options(Strategy s, std::map<int32_t, uint64_t> gpus_ku,
                    std::optional<uint64_t> cpu_ku = std::nullopt) {
  PlanOptions o;
  o.strategy = s;
  for (auto [g, b] : gpus_ku) o.budget.gpus[g] = b * kU;
  if (cpu_ku)
    o.budget.cpu = *cpu_ku * kU;
  else
    o.budget.cpu = uint64_t{1} << 40;
  o.tokens = 1;
  o.profile = bare_profile();
  return o;
}

std::string loc_of(const Plan& p, const std::string& key) {
  for (const ComponentPlan& c : p.components) {
    for (const DeviceMapEntry& e : c.device_map) {
      if (e.prefix == key) return e.location.str();
      if (key.starts_with(e.prefix + ".") || e.prefix.empty()) return e.location.str();
    }
  }
  return "missing";
}

uint64_t gpu_weights(const Plan& p, int32_t gpu) {
  const DevicePlan* d = p.find_device(Location::on_gpu(gpu));
  return d ? d->weights_bytes : 0;
}

void require_valid(const Plan& p, const PipelineInput& in) {
  const auto problems = check_plan(p, in);
  for (const auto& s : problems) MESSAGE(s);
  REQUIRE(problems.empty());
  // JSON round trip is lossless.
  const nlohmann::json j = plan_to_json(p);
  CHECK(plan_to_json(plan_from_json(j, "roundtrip")) == j);
}

}  // namespace

TEST_CASE("sequential revisits a GPU it skipped instead of offloading") {
  // accelerate: blocks.0 (6) on GPU 0; blocks.1 (6) does not fit GPU 0's 4 left, so it moves to
  // GPU 1 and never comes back: blocks.4 and blocks.5 go to cpu although GPU 0 has room for them.
  const PipelineInput in = blocks_model({6, 6, 2, 2, 2, 2});
  const Plan p = make_plan(in, options(Strategy::Sequential, {{0, 10}, {1, 10}}));
  require_valid(p, in);
  CHECK(p.offloaded_bytes() == 0);
  CHECK(p.groups.empty());
  CHECK(loc_of(p, "blocks.0") == "0");
  CHECK(loc_of(p, "blocks.1") == "1");
  CHECK(loc_of(p, "blocks.3") == "1");
  CHECK(loc_of(p, "blocks.4") == "0");
  CHECK(loc_of(p, "blocks.5") == "0");
  CHECK(gpu_weights(p, 0) == 10 * kU);
  CHECK(gpu_weights(p, 1) == 10 * kU);
}

TEST_CASE("no largest-layer reserve when nothing is offloaded") {
  // accelerate holds the largest layer's size back on GPU 0 for swapping offloaded layers even
  // when everything fits; with a budget equal to the model that pushes a block to cpu.
  const PipelineInput in = blocks_model({8, 4, 4, 4});
  const Plan p = make_plan(in, options(Strategy::Sequential, {{0, 20}}));
  require_valid(p, in);
  CHECK(p.offloaded_bytes() == 0);
  const DevicePlan* d = p.find_device(Location::on_gpu(0));
  REQUIRE(d);
  CHECK(d->n_slots == 0);
  for (const ReserveItem& r : d->reserve) CHECK(r.name != "device_slots");
  CHECK(d->predicted_peak == 20 * kU);
  CHECK(p.settings.offload_mode == "none");
}

TEST_CASE("balanced minimises the largest GPU load over contiguous partitions") {
  SUBCASE("even") {
    const PipelineInput in = blocks_model({4, 4, 4, 4});
    const Plan p = make_plan(in, options(Strategy::Balanced, {{0, 100}, {1, 100}}));
    require_valid(p, in);
    CHECK(gpu_weights(p, 0) == 8 * kU);
    CHECK(gpu_weights(p, 1) == 8 * kU);
  }
  SUBCASE("a large last block") {
    // Optimal contiguous split: [1,1,1,1] | [8] (max 8); half-by-bytes first fit gives 11 | 1.
    const PipelineInput in = blocks_model({1, 1, 1, 1, 8});
    const Plan p = make_plan(in, options(Strategy::Balanced, {{0, 100}, {1, 100}}));
    require_valid(p, in);
    CHECK(std::max(gpu_weights(p, 0), gpu_weights(p, 1)) == 8 * kU);
  }
  SUBCASE("three GPUs, known optimum") {
    // 7 | 2 2 3 | 5 2 : max 7 is optimal (7 alone forces >= 7; total 21 over 3).
    const PipelineInput in = blocks_model({7, 2, 2, 3, 5, 2});
    const Plan p = make_plan(in, options(Strategy::Balanced, {{0, 100}, {1, 100}, {2, 100}}));
    require_valid(p, in);
    CHECK(std::max({gpu_weights(p, 0), gpu_weights(p, 1), gpu_weights(p, 2)}) == 7 * kU);
  }
  SUBCASE("auto is balanced with several GPUs, sequential with one") {
    const PipelineInput in = blocks_model({4, 4, 4, 4});
    const Plan two = make_plan(in, options(Strategy::Auto, {{0, 100}, {1, 100}}));
    CHECK(two.settings.strategy == "balanced");
    CHECK(gpu_weights(two, 1) == 8 * kU);
    const Plan one = make_plan(in, options(Strategy::Auto, {{0, 100}}));
    CHECK(one.settings.strategy == "sequential");
    CHECK(gpu_weights(one, 0) == 16 * kU);
  }
}

TEST_CASE("balanced_low_0 keeps GPU 0 light and reserves nothing on an unused GPU") {
  const PipelineInput in = blocks_model({4, 4, 4, 4, 4, 4});
  PlanOptions o = options(Strategy::BalancedLow0, {{0, 100}, {1, 100}, {2, 100}});
  o.profile.context_bytes = 5 * kU;
  SUBCASE("the other GPUs hold everything") {
    const Plan p = make_plan(in, o);
    require_valid(p, in);
    CHECK(gpu_weights(p, 0) == 0);
    CHECK(gpu_weights(p, 1) == 12 * kU);
    CHECK(gpu_weights(p, 2) == 12 * kU);
    CHECK(p.find_device(Location::on_gpu(0))->predicted_peak == 0);
    CHECK(p.find_device(Location::on_gpu(1))->predicted_peak == 17 * kU);
  }
  SUBCASE("GPU 0 takes only what the others cannot hold") {
    o.budget.gpus[1] = 13 * kU;  // 8 KiB of weights after the 5 KiB context
    o.budget.gpus[2] = 13 * kU;
    const Plan p = make_plan(in, o);
    require_valid(p, in);
    CHECK(gpu_weights(p, 0) == 8 * kU);
    CHECK(gpu_weights(p, 1) == 8 * kU);
    CHECK(gpu_weights(p, 2) == 8 * kU);
    CHECK(loc_of(p, "blocks.0") == "0");  // GPU 0 takes a prefix
  }
}

TEST_CASE("tied embeddings are counted once and placed together") {
  TemplateLibrary lib;
  ModelTemplate t;
  t.name = "llama-test";
  t.class_names = {"LlamaForCausalLM"};
  t.order = {"model.embed_tokens", "model.layers", "model.norm", "lm_head"};
  t.ties = {{"model.embed_tokens.weight", "lm_head.weight", "tie_word_embeddings", false}};
  lib.add(t);
  auto model = [](bool with_head) {
    ComponentInput c;
    c.config = nlohmann::json{{"architectures", {"LlamaForCausalLM"}}, {"tie_word_embeddings", true}};
    c.tensors.push_back(u8("model.embed_tokens.weight", 10 * kU));
    for (int i = 0; i < 4; ++i) c.tensors.push_back(u8(str_cat("model.layers.", i, ".mlp.weight"), 4 * kU));
    c.tensors.push_back(u8("model.norm.weight", kU));
    if (with_head) c.tensors.push_back(u8("lm_head.weight", 10 * kU));
    PipelineInput in;
    in.path = "tied";
    in.components.push_back(std::move(c));
    return in;
  };
  for (bool with_head : {false, true}) {
    CAPTURE(with_head);
    const PipelineInput in = model(with_head);
    // 10 + 16 + 1 = 27 units: fits a budget of 27 only if the head is counted once.
    PlanOptions o = options(Strategy::Balanced, {{0, 14}, {1, 13}});
    o.templates = &lib;
    const Plan p = make_plan(in, o);
    require_valid(p, in);
    CHECK(p.offloaded_bytes() == 0);
    CHECK(p.components[0].bytes == 27 * kU);
    CHECK(p.components[0].template_name == "llama-test");
    CHECK(loc_of(p, "lm_head") == loc_of(p, "model.embed_tokens"));
    REQUIRE(p.components[0].tied.size() == 1);
    CHECK(p.components[0].tied[0].alias == "lm_head.weight");
    // The head runs last, on the embedding's GPU.
    CHECK(p.schedule.back().modules == std::vector<std::string>{"lm_head"});
  }
  SUBCASE("an offloaded embedding is streamed again for its tied head") {
    const PipelineInput in = model(false);
    PlanOptions o = options(Strategy::Sequential, {{0, 12}});
    o.templates = &lib;
    o.offload = OffloadMode::Block;
    o.blocks_per_group = 1;
    o.prefetch = 1;
    const Plan p = make_plan(in, o);
    require_valid(p, in);
    CHECK(loc_of(p, "lm_head") == loc_of(p, "model.embed_tokens"));
    if (loc_of(p, "model.embed_tokens") != "0") CHECK(p.schedule.back().group == p.schedule.front().group);
  }
}

TEST_CASE("4-bit sizes: quant state travels with its weight and sizes are exact") {
  // An nf4 linear with double quant stores: weight U8 [n/2,1], absmax U8, quant_map F32[16],
  // nested_absmax F32, nested_quant_map F32[256], quant_state JSON; all belong to module m.
  ComponentInput c;
  uint64_t per_block = 0;
  for (int i = 0; i < 6; ++i) {
    const std::string m = str_cat("layers.", i, ".mlp");
    const uint64_t n = 4096 * 1024;  // [4096, 1024] weight
    std::vector<TensorDesc> parts = {u8(m + ".weight", n / 2),
                                     u8(m + ".weight.absmax", n / 64),
                                     u8(m + ".weight.quant_map", 64),
                                     u8(m + ".weight.nested_absmax", 4 * (n / 64 / 256)),
                                     u8(m + ".weight.nested_quant_map", 1024),
                                     u8(m + ".weight.quant_state.bitsandbytes__nf4", 213)};
    parts[0].shape = {static_cast<int64_t>(n / 2), 1};
    per_block = 0;
    for (const auto& t : parts) per_block += t.nbytes;
    for (auto& t : parts) c.tensors.push_back(std::move(t));
    c.quantized.push_back({m, 4096, 1024, "nf4"});
  }
  PipelineInput in;
  in.path = "nf4";
  in.components.push_back(c);
  // The bf16 weights (6 x 8 MiB) would need 48 MiB; the nf4 ones (12.4 MiB) fit in 24 MiB.
  PlanOptions o;
  o.strategy = Strategy::Sequential;
  o.budget.gpus[0] = 24ull << 20;  // 8 MiB of it is the bf16 dequant scratch
  o.budget.cpu = 1ull << 40;
  o.tokens = 1;
  o.profile = bare_profile();
  const Plan p = make_plan(in, o);
  require_valid(p, in);
  CHECK(p.components[0].bytes == 6 * per_block);
  CHECK(p.gpu_bytes() == 6 * per_block);
  CHECK(p.offloaded_bytes() == 0);
  // Each linear runs once with its original shape and scheme; the dequant scratch is its bf16 size.
  size_t linears = 0;
  for (const ScheduleStep& s : p.schedule) {
    for (const LinearOp& l : s.linears) {
      CHECK(l.kind == "nf4");
      CHECK(l.out == 4096);
      CHECK(l.in == 1024);
      ++linears;
    }
  }
  CHECK(linears == 6);
  bool scratch = false;
  for (const ReserveItem& r : p.find_device(Location::on_gpu(0))->reserve) {
    if (r.name == "dequant_scratch") {
      scratch = true;
      CHECK(r.bytes == 4096ull * 1024 * 2);
    }
  }
  CHECK(scratch);
  SUBCASE("offloaded in leaf groups, the whole quant state is in the group") {
    PlanOptions o2 = o;
    o2.budget.gpus[0] =
        4096ull * 1024 * 2 + 3 * per_block + 4 * 4096;  // scratch + room for ~2 blocks + slots
    o2.offload = OffloadMode::Leaf;
    const Plan q = make_plan(in, o2);
    require_valid(q, in);
    REQUIRE_FALSE(q.groups.empty());
    for (const OffloadGroup& g : q.groups) CHECK(g.tensors.size() == 6);
  }
}

TEST_CASE("offload: the fewest blocks streamed, groups and slots as the candidates say") {
  // 10 blocks of 4 on one GPU of 20. Block mode, 1 per group, 2 slots: 20 - 2*4 = 12 resident.
  const PipelineInput in = blocks_model({4, 4, 4, 4, 4, 4, 4, 4, 4, 4});
  PlanOptions o = options(Strategy::Sequential, {{0, 20}});
  o.offload = OffloadMode::Block;
  o.blocks_per_group = 1;
  o.prefetch = 2;
  const Plan p = make_plan(in, o);
  require_valid(p, in);
  CHECK(gpu_weights(p, 0) == 12 * kU);
  CHECK(p.offloaded_bytes() == 28 * kU);
  CHECK(p.groups.size() == 7);
  const DevicePlan* d = p.find_device(Location::on_gpu(0));
  CHECK(d->n_slots == 2);
  CHECK(d->slot_bytes == 4 * kU);
  CHECK(d->predicted_peak == 20 * kU);
  SUBCASE("offloaded blocks are spread between resident ones, so copies overlap their compute") {
    o.budget.gpus[0] = 32;  // 8 for the slots, 6 blocks resident, 4 streamed
    o.budget.gpus[0] *= kU;
    const Plan q = make_plan(in, o);
    require_valid(q, in);
    CHECK(gpu_weights(q, 0) == 24 * kU);
    std::vector<std::string> locs;
    for (int i = 0; i < 10; ++i) locs.push_back(loc_of(q, str_cat("blocks.", i)));
    CHECK(locs == std::vector<std::string>{"0", "cpu", "0", "cpu", "0", "0", "cpu", "0", "cpu", "0"});
  }
  SUBCASE("two blocks per group") {
    o.blocks_per_group = 2;
    o.prefetch = 1;  // 1 slot of 8: 12 resident again
    const Plan q = make_plan(in, o);
    require_valid(q, in);
    CHECK(gpu_weights(q, 0) == 12 * kU);
    for (const OffloadGroup& g : q.groups) CHECK(g.modules.size() <= 2);
  }
  SUBCASE("host budget: pinned until full, then disk") {
    o.budget.cpu = 12 * kU + 2 * 4 * kU;  // 3 groups pinned + a 2-buffer staging ring
    const Plan q = make_plan(in, o);
    require_valid(q, in);
    const DevicePlan* cpu = q.find_device(Location::cpu());
    const DevicePlan* disk = q.find_device(Location::disk());
    REQUIRE(disk);
    CHECK(cpu->weights_bytes == 12 * kU);
    CHECK(disk->weights_bytes == 16 * kU);
    CHECK(cpu->predicted_peak <= *o.budget.cpu);
    CHECK(q.predicted_step_s > p.predicted_step_s);  // disk is slower
  }
  SUBCASE("a cpu budget below the staging ring is infeasible, and the smallest budget given works") {
    o.budget.cpu = 4 * kU;
    try {
      (void)make_plan(in, o);
      FAIL("expected an error");
    } catch (const Error& e) {
      CHECK(e.kind() == ErrorKind::InvalidInput);
      const std::string msg = e.what();
      CHECK(msg.find("short by 4096 bytes") != std::string::npos);
      CHECK(msg.find("cpu=8192") != std::string::npos);
    }
    o.budget.cpu = 8 * kU;
    const Plan q = make_plan(in, o);
    require_valid(q, in);
    CHECK(q.find_device(Location::cpu())->predicted_peak == 8 * kU);
  }
}

TEST_CASE("leaf mode streams single layers through small slots") {
  // 8 blocks of two 2-unit layers (4 each) on a GPU of 20, 2 slots of 2: 16 resident.
  ComponentInput c;
  for (int i = 0; i < 8; ++i) {
    c.tensors.push_back(u8(str_cat("blocks.", i, ".a.weight"), 2 * kU));
    c.tensors.push_back(u8(str_cat("blocks.", i, ".b.weight"), 2 * kU));
  }
  PipelineInput in;
  in.path = "leaf";
  in.components.push_back(c);
  PlanOptions o = options(Strategy::Sequential, {{0, 20}});
  o.offload = OffloadMode::Leaf;
  o.prefetch = 2;
  const Plan p = make_plan(in, o);
  require_valid(p, in);
  CHECK(gpu_weights(p, 0) == 16 * kU);
  CHECK(p.groups.size() == 8);  // 4 blocks x 2 layers
  for (const OffloadGroup& g : p.groups) CHECK(g.arena_bytes == 2 * kU);
  SUBCASE("auto picks the plan with the shortest predicted step") {
    o.offload = OffloadMode::Auto;
    o.prefetch.reset();
    const Plan q = make_plan(in, o);
    require_valid(q, in);
    CHECK(q.predicted_step_s <= p.predicted_step_s * 1.0011);
  }
}

TEST_CASE("infeasible GPU budget: the shortfall and the smallest budget that fits") {
  const PipelineInput in = blocks_model({4, 4, 4, 4});
  PlanOptions o = options(Strategy::Sequential, {{0, 3}});
  o.profile.context_bytes = 1000;
  std::string msg;
  try {
    (void)make_plan(in, o);
  } catch (const Error& e) {
    CHECK(e.kind() == ErrorKind::InvalidInput);
    msg = e.what();
  }
  REQUIRE(!msg.empty());
  // The smallest plan streams every block through one slot of 4 KiB: 1000 + 4096 bytes.
  CHECK(msg.find("short by ") != std::string::npos);
  CHECK(msg.find("--max-memory 0=5096") != std::string::npos);
  o.budget.gpus[0] = 5096;
  const Plan p = make_plan(in, o);
  require_valid(p, in);
  CHECK(p.gpu_bytes() == 0);
  CHECK(p.find_device(Location::on_gpu(0))->predicted_peak == 5096);
  o.budget.gpus[0] = 5095;
  CHECK_THROWS_AS((void)make_plan(in, o), Error);
}

TEST_CASE("execution order: template, then heuristic") {
  TemplateLibrary lib;
  ModelTemplate t;
  t.name = "flux-test";
  t.class_names = {"FluxTransformer2DModel"};
  t.order = {
      "x_embedder", "time_text_embed", "context_embedder", "transformer_blocks", "single_transformer_blocks",
      "norm_out",   "proj_out"};
  lib.add(t);
  ComponentInput c;
  for (const char* n :
       {"proj_out.weight", "norm_out.linear.weight", "single_transformer_blocks.1.proj.weight",
        "single_transformer_blocks.0.proj.weight", "transformer_blocks.10.ff.weight",
        "transformer_blocks.2.ff.weight", "context_embedder.weight", "x_embedder.weight",
        "time_text_embed.timestep_embedder.linear_1.weight"}) {
    c.tensors.push_back(u8(n, kU));
  }
  PipelineInput in;
  in.components.push_back(c);
  auto order = [&](const TemplateLibrary* l, const char* cls) {
    in.components[0].config = nlohmann::json{{"_class_name", cls}};
    PlanOptions o = options(Strategy::Sequential, {{0, 100}});
    o.templates = l;
    const Plan p = make_plan(in, o);
    std::vector<std::string> mods;
    for (const ScheduleStep& s : p.schedule) mods.insert(mods.end(), s.modules.begin(), s.modules.end());
    return mods;
  };
  CHECK(order(&lib, "FluxTransformer2DModel") ==
        std::vector<std::string>{"x_embedder", "time_text_embed.timestep_embedder.linear_1",
                                 "context_embedder", "transformer_blocks.2", "transformer_blocks.10",
                                 "single_transformer_blocks.0", "single_transformer_blocks.1",
                                 "norm_out.linear", "proj_out"});
  // Heuristic: embeddings, blocks (block lists in name order), others, norms and heads.
  CHECK(order(nullptr, "Unknown") ==
        std::vector<std::string>{"context_embedder", "time_text_embed.timestep_embedder.linear_1",
                                 "x_embedder", "single_transformer_blocks.0", "single_transformer_blocks.1",
                                 "transformer_blocks.2", "transformer_blocks.10", "norm_out.linear",
                                 "proj_out"});
}

TEST_CASE("--max-memory forms") {
  const Budget a = parse_max_memory("0=20GiB,1=20GiB,cpu=64GiB");
  CHECK(a.gpus.at(0) == 20ull << 30);
  CHECK(a.gpus.at(1) == 20ull << 30);
  CHECK(*a.cpu == 64ull << 30);
  const Budget b = parse_max_memory(R"({"0": "20GiB", "cpu": "64GiB", "1": 1000})");
  CHECK(b.gpus.at(0) == 20ull << 30);
  CHECK(b.gpus.at(1) == 1000);
  CHECK(*b.cpu == 64ull << 30);
  const Budget c = parse_max_memory("cuda:0=512MiB");
  CHECK(c.gpus.at(0) == 512ull << 20);
  CHECK_FALSE(c.cpu);
  CHECK_THROWS_AS(parse_max_memory("cpu=64GiB"), Error);  // no GPU
  CHECK_THROWS_AS(parse_max_memory("0=20XB"), Error);
  CHECK_THROWS_AS(parse_max_memory("gpu0=20GiB"), Error);
  CHECK_THROWS_AS(parse_max_memory("0=1GiB,0=2GiB"), Error);
  CHECK_THROWS_AS(parse_max_memory("{\"0\": [1]}"), Error);
  CHECK_THROWS_AS(parse_max_memory("/nonexistent/budget.json"), Error);
}

TEST_CASE("plan files: version and structure are checked") {
  const PipelineInput in = blocks_model({4, 4});
  const Plan p = make_plan(in, options(Strategy::Sequential, {{0, 100}}));
  nlohmann::json j = plan_to_json(p);
  CHECK(j["format"] == "qtool-plan");
  CHECK(j["components"][0]["device_map"] == nlohmann::json{{"", 0}});
  nlohmann::json bad = j;
  bad["version"] = kPlanVersion + 1;
  CHECK_THROWS_WITH_AS(plan_from_json(bad, "p.json"), doctest::Contains("version"), Error);
  bad = j;
  bad.erase("schedule");
  CHECK_THROWS_WITH_AS(plan_from_json(bad, "p.json"), doctest::Contains("schedule"), Error);
  bad = j;
  bad["components"][0]["device_map"][""] = "gpu";
  CHECK_THROWS_AS(plan_from_json(bad, "p.json"), Error);
}

TEST_CASE("gpu_reserve names each item and rounds allocations") {
  DeviceProfile prof;
  GpuWork w;
  w.tokens = 4096;
  w.max_in = 3072;
  w.max_out = 12288;
  w.max_dequant_numel = 3072ull * 12288;
  w.n_slots = 2;
  w.slot_bytes = 100'000'000;
  w.used = true;
  const auto items = gpu_reserve(prof, w);
  std::map<std::string, uint64_t> by;
  for (const auto& r : items) by[r.name] = r.bytes;
  CHECK(by["cuda_context"] == prof.context_bytes);
  CHECK(by["cublas_workspace"] == 32ull << 20);
  CHECK(by["activation_in"] == 4096ull * 3072 * 2);  // 24 MiB, a multiple of 2 MiB
  CHECK(by["activation_out"] == 4096ull * 12288 * 2);
  CHECK(by["dequant_scratch"] == 3072ull * 12288 * 2);
  CHECK(by["device_slots"] == round_up(200'000'000, 2ull << 20));
  CHECK(by.count("pinned_page_tables") == 0);  // nothing pinned
  w.pinned_host_bytes = (3ull << 30) + 1;      // 4 GiB started: 4 x 2 MiB of page tables
  by.clear();
  for (const auto& r : gpu_reserve(prof, w)) by[r.name] = r.bytes;
  CHECK(by["pinned_page_tables"] == 8ull << 20);
  w.used = false;
  CHECK(gpu_reserve(prof, w).empty());
}

TEST_CASE("streaming GPUs reserve the page tables of the pinned host memory") {
  const PipelineInput in = blocks_model({4, 4, 4, 4, 4, 4, 4, 4, 4, 4});
  PlanOptions o = options(Strategy::Sequential, {{0, 22}});  // 2 KiB for the tables
  o.profile.pinned_page_table_bytes_per_gib = 2 * kU;
  o.offload = OffloadMode::Block;
  o.blocks_per_group = 1;
  o.prefetch = 2;
  const Plan p = make_plan(in, o);
  const auto problems = check_plan(p, in);
  REQUIRE(problems.empty());
  const DevicePlan* d = p.find_device(Location::on_gpu(0));
  uint64_t tables = 0;
  for (const ReserveItem& r : d->reserve) {
    if (r.name == "pinned_page_tables") tables = r.bytes;
  }
  CHECK(tables == 2 * kU);  // 28 KiB pinned: one GiB started
  CHECK(gpu_weights(p, 0) == 12 * kU);
  CHECK(d->predicted_peak == 22 * kU);
  // Without the room for the tables, one more block is streamed.
  o.budget.gpus[0] = 21 * kU;
  const Plan q = make_plan(in, o);
  REQUIRE(check_plan(q, in).empty());
  CHECK(gpu_weights(q, 0) == 8 * kU);
}

TEST_CASE("cost model: copies overlap compute through the slots") {
  // 8 bf16 linears [1024, 1024] (2 MiB each) on one GPU that holds 4 of them plus 2 slots.
  ComponentInput c;
  for (int i = 0; i < 8; ++i) {
    TensorDesc d;
    d.name = str_cat("layers.", i, ".fc.weight");
    d.dtype = DType::BF16;
    d.shape = {1024, 1024};
    d.nbytes = 1024 * 1024 * 2;
    c.tensors.push_back(d);
  }
  PipelineInput in;
  in.path = "sim";
  in.components.push_back(c);
  PlanOptions o;
  o.strategy = Strategy::Sequential;
  o.tokens = 4096;
  o.profile = bare_profile();
  o.profile.bf16_tflops = 1.0;      // 8.6 ms per linear
  o.profile.h2d_pinned_gbps = 0.5;  // 4.2 ms per 2 MiB copy
  o.profile.kernel_launch_us = 0;
  o.profile.copy_latency_us = 0;
  const uint64_t act = 2 * 4096ull * 1024 * 2;  // activation_in + activation_out
  o.budget.gpus[0] = act + 6 * (2ull << 20);
  o.budget.cpu = 1ull << 40;
  o.offload = OffloadMode::Block;
  o.blocks_per_group = 1;
  o.prefetch = 2;
  const Plan p = make_plan(in, o);
  REQUIRE(check_plan(p, in).empty());
  CHECK(p.gpu_bytes() == 4 * (2ull << 20));
  const double linear = 2.0 * 4096 * 1024 * 1024 / 1e12;
  const double copy = (2.0 * 1024 * 1024) / 0.5e9;
  CHECK(p.compute_s == doctest::Approx(8 * linear));
  CHECK(p.transfer_s == doctest::Approx(4 * copy));
  // Spread 4 of 8: every copy is hidden behind the resident compute before it except the first
  // one's (it starts at t=0 while layer 0 runs): the step is the compute alone.
  CHECK(p.predicted_step_s == doctest::Approx(8 * linear));
  // With one slot and the streamed layers back to back, copies would stall compute; the
  // simulation says so too.
  o.profile.h2d_pinned_gbps = 0.05;  // 42 ms per copy: transfer-bound
  const Plan q = make_plan(in, o);
  CHECK(q.predicted_step_s >= q.transfer_s);
  CHECK(q.predicted_step_s < q.transfer_s + q.compute_s);
}
