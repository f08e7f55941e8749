// Plans of components the runner executes with their real forward (arch_of): the reserve holds the
// forward's activation items at --tokens instead of activation_in/out (linears-only components keep
// theirs), the steps follow the forward's units in order, and the predicted FLOPs are the forward's.
#include <doctest/doctest.h>
#include <unistd.h>

#include <filesystem>
#include <map>
#include <string>

#include "qtool/formats/checkpoint.hpp"
#include "qtool/formats/synth.hpp"
#include "qtool/planner/arch.hpp"
#include "qtool/planner/planner.hpp"
#include "qtool/planner/templates.hpp"

using namespace qtool;
using namespace qtool::planner;

namespace {

struct Synth {
  std::filesystem::path dir;
  explicit Synth(const std::string& preset) {
    dir = std::filesystem::temp_directory_path() /
          ("qtool-fwdplan-" + preset + "-" + std::to_string(::getpid()));
    std::filesystem::remove_all(dir);
    SynthSpec spec;
    spec.preset = preset;
    SynthWriteOptions w;
    w.seed = 3;
    w.threads = 2;
    write_synth_model(make_synth_model(spec), dir, w);
  }
  ~Synth() { std::filesystem::remove_all(dir); }
};

const TemplateLibrary& library() {
  static const TemplateLibrary lib = [] {
    TemplateLibrary l;
    if (const auto d = find_data_subdir("models")) l.load_dir(*d);
    return l;
  }();
  return lib;
}

Plan plan_of(const Checkpoint& ckpt, uint64_t tokens, uint64_t gpu_bytes) {
  PlanOptions o;
  o.templates = &library();
  o.tokens = tokens;
  o.budget.gpus[0] = gpu_bytes;
  o.budget.cpu = 1ull << 32;
  o.profile.context_bytes = 1 << 20;
  o.profile.cublas_workspace_bytes = 1 << 20;
  o.profile.alloc_granularity_bytes = 4096;
  return make_plan(ckpt, o);
}

uint64_t items_named(const DevicePlan& d, const std::string& prefix) {
  uint64_t b = 0;
  for (const ReserveItem& r : d.reserve)
    if (r.name.rfind(prefix, 0) == 0) b += r.bytes;
  return b;
}

}  // namespace

TEST_CASE("a Llama plan reserves its forward's activations and predicts its FLOPs, at odd token counts") {
  Synth s("tiny");
  const Checkpoint ckpt = Checkpoint::open(s.dir);
  const auto arch = arch_of(ckpt.components()[0]);
  REQUIRE(arch);
  for (uint64_t tokens : {1ull, 7ull, 33ull}) {
    CAPTURE(tokens);
    const Plan plan = plan_of(ckpt, tokens, 1ull << 30);
    REQUIRE(plan.components[0].forward == "LlamaForCausalLM");
    const DevicePlan& gpu = plan.devices[0];
    uint64_t want = 0;
    for (const ActivationItem& it : activation_items(*arch, 1, static_cast<int64_t>(tokens), DType::BF16)) {
      want += it.bytes;
      bool found = false;
      for (const ReserveItem& r : gpu.reserve)
        found = found || r.name == std::string(kForwardActivationPrefix) + it.name;
      CHECK_MESSAGE(found, it.name);
    }
    CHECK(items_named(gpu, std::string(kForwardActivationPrefix)) >= want);
    CHECK(items_named(gpu, "activation_in") == 0);  // no linears-only component
    CHECK(items_named(gpu, "activation_out") == 0);
    CHECK(items_named(gpu, "dequant_scratch") == 0);  // bf16: nothing to dequantize
    uint64_t flops = 0;
    for (const ScheduleStep& st : plan.schedule) flops += st.flops;
    CHECK(flops == forward_flops(*arch, 1, static_cast<int64_t>(tokens)).linear);
    // Steps in the forward's order: the embedding, the layers in order, the norm, the head.
    std::vector<std::string> order;
    for (const ScheduleStep& st : plan.schedule)
      order.insert(order.end(), st.modules.begin(), st.modules.end());
    REQUIRE(order.size() >= 4);
    CHECK(order.front() == "model.embed_tokens");
    CHECK(order[order.size() - 2] == "model.norm");
    CHECK(order.back() == "lm_head");
    for (size_t i = 1; i + 2 < order.size(); ++i) CHECK(order[i] == "model.layers." + std::to_string(i - 1));
  }
}

TEST_CASE(
    "a Flux pipeline plan: the transformer's forward units, items and FLOPs; text encoders run linears") {
  Synth s("tiny-flux");
  const Checkpoint ckpt = Checkpoint::open(s.dir);
  const Component* tr = ckpt.find_component("transformer");
  REQUIRE(tr);
  const auto arch = arch_of(*tr);
  REQUIRE(arch);
  const uint64_t tokens = 20;
  const Plan plan = plan_of(ckpt, tokens, 1ull << 30);
  std::vector<std::string> units;
  uint64_t flops = 0;
  for (const ScheduleStep& st : plan.schedule) {
    if (plan.components[st.component].name != "transformer") continue;
    units.insert(units.end(), st.modules.begin(), st.modules.end());
    flops += st.flops;
  }
  const std::vector<std::string> want = {"x_embedder",
                                         "time_text_embed",
                                         "context_embedder",
                                         "transformer_blocks.0",
                                         "transformer_blocks.1",
                                         "single_transformer_blocks.0",
                                         "single_transformer_blocks.1",
                                         "norm_out",
                                         "proj_out"};
  CHECK(units == want);
  CHECK(flops == forward_flops(*arch, 1, static_cast<int64_t>(tokens)).linear);
  const std::map<std::string, std::string> forwards = {{"transformer", "FluxTransformer2DModel"},
                                                       {"text_encoder", "CLIPTextModel"},
                                                       {"text_encoder_2", "T5EncoderModel"}};
  for (const ComponentPlan& c : plan.components)
    CHECK(c.forward == (forwards.count(c.name) ? forwards.at(c.name) : std::string()));
  // Planned by phase: the transformer's phase reserves its forward's items, the VAE's (linears
  // only) activation_in.
  REQUIRE(plan.phases.size() == 4);
  DevicePlan denoise, vae;
  denoise.reserve = plan.phases[2].devices.at(0).reserve;
  vae.reserve = plan.phases[3].devices.at(0).reserve;
  CHECK(items_named(denoise, std::string(kForwardActivationPrefix)) > 0);
  CHECK(items_named(vae, "activation_in") > 0);
  CHECK(items_named(vae, std::string(kForwardActivationPrefix)) == 0);
}
