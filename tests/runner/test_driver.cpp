// The schedule driver: a forward's WeightSource gets each tensor's exact bytes wherever the plan
// put it (resident, a slot filled from pinned memory or from disk, block groups, leaf groups, a
// tied head whose embedding is streamed); plans the forward cannot run are refused before anything
// runs; the real forwards stream bit for bit like all-resident runs and like the mapped checkpoint.
#include <doctest/doctest.h>

#include <cstring>
#include <set>
#include <variant>

#include "qtool/formats/error.hpp"
#include "qtool/planner/arch.hpp"
#include "qtool/runner/cpu_ops.hpp"
#include "qtool/runner/driver.hpp"
#include "qtool/runner/executor.hpp"
#include "qtool/runner/schedule.hpp"
#include "runner_test_util.hpp"
#include "vectors_run.hpp"

using namespace qtool;
using namespace qtool::runner;

namespace {

bool under(const std::string& name, const std::string& unit) {
  return name.size() > unit.size() && name.compare(0, unit.size(), unit) == 0 && name[unit.size()] == '.';
}

// A forward with the real one's units that does no arithmetic: each unit asks for every tensor
// under it (a quantized linear by its weight; lm_head of a tied model by its alias) and compares
// the bytes it is given with the mapped checkpoint's, part by part.
class ByteCheckForward final : public Forward {
 public:
  ByteCheckForward(const Component& comp, std::unique_ptr<Forward> real)
      : comp_(comp), real_(std::move(real)) {
    for (const quant::QuantizedLinear& ql : quant::find_quantized_linears(comp)) {
      for (size_t k = 0; k < ql.tensor_names.size(); ++k) {
        if (ql.tensor_parts[k] == quant::Part::Weight)
          quantized_.emplace(ql.tensor_names[k], quantized_params(ql, comp));
        else
          state_.insert(ql.tensor_names[k]);
      }
    }
  }
  std::string architecture() const override { return real_->architecture(); }
  const std::vector<std::string>& units() const override { return real_->units(); }
  std::vector<std::string> output_names() const override { return real_->output_names(); }
  std::vector<InputSpec> input_specs(int64_t b, int64_t t) const override { return real_->input_specs(b, t); }
  std::vector<HostTensor> random_inputs(int64_t b, int64_t t, uint64_t seed) const override {
    return real_->random_inputs(b, t, seed);
  }
  void check_inputs(const std::vector<HostTensor>& in, int64_t max_tokens) const override {
    real_->check_inputs(in, max_tokens);
  }
  int64_t batch_of(const std::vector<HostTensor>& in) const override { return real_->batch_of(in); }
  void begin(Ops&, const std::vector<HostTensor>&) override {}
  std::vector<Mat*> shared_state() override { return {}; }
  void run_unit(size_t unit, Ops&, WeightSource& weights) override {
    const std::string& u = units()[unit];
    for (const Component::Entry& e : comp_.entries()) {
      const std::string& name = comp_.info(e).name;
      if (!under(name, u) || state_.count(name)) continue;
      check(name, weights.get(name));
    }
    if (u == "lm_head" && !comp_.find("lm_head.weight")) {
      REQUIRE(weights.has("lm_head.weight"));
      check("lm_head.weight", weights.get("lm_head.weight"), "model.embed_tokens.weight");
      ++aliases;
    }
  }
  HostTensor output(Ops&) override {
    HostTensor t{"out", DType::F32, {1}, std::vector<uint8_t>(4)};
    const float v = static_cast<float>(mismatches);
    std::memcpy(t.bytes.data(), &v, 4);
    return t;
  }
  const planner::Arch& arch() const override { return real_->arch(); }

  size_t checked = 0, mismatches = 0, aliases = 0;
  // Where the counts go when the driver destroys the forward (at the end of the run).
  struct Counts {
    size_t checked = 0, mismatches = 0, aliases = 0;
  }* counts = nullptr;
  ~ByteCheckForward() override {
    if (counts) *counts = {checked, mismatches, aliases};
  }

 private:
  void check(const std::string& name, const DequantParams& got, const std::string& primary = {}) {
    ++checked;
    const std::string src = primary.empty() ? name : primary;
    if (const auto q = quantized_.find(src); q != quantized_.end()) {
      const PartSizes sizes = part_sizes(q->second);
      const uint8_t* want[kNumParts] = {q->second.weight, q->second.scale, q->second.quant_map,
                                        q->second.nested_absmax, q->second.nested_quant_map};
      const uint8_t* have[kNumParts] = {got.weight, got.scale, got.quant_map, got.nested_absmax,
                                        got.nested_quant_map};
      for (int k = 0; k < kNumParts; ++k)
        if (!want[k] != !have[k] || (want[k] && std::memcmp(want[k], have[k], sizes.bytes[k]) != 0))
          ++mismatches;
      return;
    }
    const auto bytes = comp_.data(*comp_.find(src));
    if (!got.weight || std::memcmp(got.weight, bytes.data(), bytes.size()) != 0) ++mismatches;
  }

  const Component& comp_;
  std::unique_ptr<Forward> real_;
  std::unordered_map<std::string, DequantParams> quantized_;
  std::set<std::string> state_;
};

struct ByteCheck {
  ByteCheckForward* forward = nullptr;  // valid during the run only: the driver owns it
  ByteCheckForward::Counts counts;      // its counts once the run has ended
  RunOptions options() {
    RunOptions o;
    o.tokens = 8;
    o.steps = 2;
    o.make_forward = [this](const Component& c) -> std::unique_ptr<Forward> {
      auto real = make_forward(c);
      if (!real) return nullptr;
      auto f = std::make_unique<ByteCheckForward>(c, std::move(real));
      forward = f.get();
      f->counts = &counts;
      return f;
    };
    return o;
  }
};

size_t streamed(const Schedule& s, Placement p) {
  size_t n = 0;
  for (const ExecStep& st : s.steps) n += st.streamed && s.arenas[st.arena].placement == p;
  return n;
}

std::filesystem::path tied_llama() {
  return std::filesystem::path(QTOOL_RUNNER_TEST_DATA) / "llama_small_tied";
}

}  // namespace

TEST_CASE(
    "the forward gets every tensor's bytes where the plan put it: resident, pinned, disk, leaf groups") {
  test::TempDir dir("driver");
  const auto bf16 = test::synth(dir.path, "tiny", 11);
  auto backend = make_cpu_backend(2);
  for (const std::string scheme : {"", "nf4"}) {
    CAPTURE(scheme);
    const auto path = test::quantize(bf16, dir.path / ("q-" + scheme), {scheme, scheme, 64, true});
    const Checkpoint ckpt = Checkpoint::open(path);
    struct Case {
      const char* label;
      double gpu, cpu;
      uint32_t prefetch;
      planner::OffloadMode mode;
    };
    for (const Case& c : {Case{"blocks, pinned and disk", 0.2, 0.7, 2, planner::OffloadMode::Block},
                          Case{"one slot", 0.1, 1.0, 1, planner::OffloadMode::Block},
                          Case{"leaf groups", 0.0, 1.0, 9, planner::OffloadMode::Leaf}}) {
      CAPTURE(std::string(c.label));
      // Leaf groups on the bf16 model only: a quantized layer's leaves outnumber any ring worth
      // having, so the planner keeps such a model resident rather than stream it leaf by leaf.
      if (c.mode == planner::OffloadMode::Leaf && !scheme.empty()) continue;
      const planner::Plan plan = test::plan_streamed(ckpt, c.gpu, c.cpu, 8, c.prefetch, 1, c.mode);
      const Schedule s = build_schedule(ckpt, plan);
      REQUIRE(streamed(s, Placement::Cpu) + streamed(s, Placement::Disk) > 0);
      for (Mode mode : {Mode::Planned, Mode::AllResident}) {
        ByteCheck bc;
        RunOptions o = bc.options();
        o.mode = mode;
        o.trace = true;
        const RunResult r = backend->run(ckpt, s, o);
        REQUIRE(bc.forward != nullptr);
        CHECK(bc.counts.mismatches == 0);
        CHECK(bc.counts.checked > 0);
        REQUIRE(r.components.size() == 1);
        CHECK(r.components[0].forward);
        CHECK(r.components[0].unread_tensors.empty());
        // The set-up's parts add up within its total; a plan with pinned groups made their copies.
        CHECK(r.setup.total_ms + 1e-6 >= r.setup.open_ms + r.setup.resident_ms + r.setup.host_copies_ms);
        if (mode == Mode::Planned && streamed(s, Placement::Cpu) > 0) CHECK(r.setup.host_copies_ms > 0);
        if (mode == Mode::Planned) {
          size_t copies = 0;
          for (const TraceEvent& e : r.trace) copies += e.lane == Lane::Copy;
          CHECK(copies == 2 * (streamed(s, Placement::Cpu) + streamed(s, Placement::Disk)));
        }
      }
    }
  }
}

TEST_CASE("a tied head reads its embedding's bytes, from the slot its group is copied into again") {
  const Checkpoint ckpt = Checkpoint::open(tied_llama());
  REQUIRE(!ckpt.components()[0].find("lm_head.weight"));
  auto backend = make_cpu_backend(2);
  // Everything streamed in single-unit groups: the embedding's group is copied twice.
  const planner::Plan plan = test::plan_streamed(ckpt, 0.0, 1.0, 8, 1, 1, planner::OffloadMode::Block);
  const Schedule s = build_schedule(ckpt, plan);
  size_t embed_copies = 0;
  for (const ExecStep& st : s.steps)
    for (const std::string& m : st.modules)
      embed_copies += st.streamed && (m == "lm_head" || m == "model.embed_tokens");
  ByteCheck bc;
  const RunResult r = backend->run(ckpt, s, bc.options());
  REQUIRE(bc.forward != nullptr);
  CHECK(bc.counts.aliases == 2);  // two run steps
  CHECK(bc.counts.mismatches == 0);
  CHECK(r.components[0].unread_tensors.empty());
  INFO("streamed steps of the embedding and the tied head: " << embed_copies);
}

TEST_CASE("plans the forward cannot run are refused before anything runs") {
  test::TempDir dir("driver-bad");
  const Checkpoint ckpt = Checkpoint::open(test::synth(dir.path, "tiny", 12));
  auto backend = make_cpu_backend(2);
  SUBCASE("a unit's leaf groups need more slots than the plan has") {
    planner::Plan plan = test::plan_streamed(ckpt, 0.0, 1.0, 8, 9, 1, planner::OffloadMode::Leaf);
    REQUIRE(!plan.groups.empty());
    plan.settings.prefetch = 2;
    for (planner::DevicePlan& d : plan.devices)
      if (d.n_slots) d.n_slots = 2;
    const Schedule s = build_schedule(ckpt, plan);
    ByteCheck bc;
    CHECK_THROWS_WITH_AS(backend->run(ckpt, s, bc.options()), doctest::Contains("slots"), Error);
  }
  SUBCASE("the plan's step order is not the forward's") {
    // Two resident steps swapped (streamed ones would break the groups' numbering, which the
    // plan checks refuse first).
    planner::Plan plan = test::plan_streamed(ckpt, 0.6, 1.0, 8, 2);
    size_t i = 0;
    while (i + 1 < plan.schedule.size() && !(plan.schedule[i].group < 0 && plan.schedule[i + 1].group < 0 &&
                                             plan.schedule[i].component == plan.schedule[i + 1].component))
      ++i;
    REQUIRE(i + 1 < plan.schedule.size());
    std::swap(plan.schedule[i], plan.schedule[i + 1]);
    const Schedule s = build_schedule(ckpt, plan);
    ByteCheck bc;
    CHECK_THROWS_WITH_AS(backend->run(ckpt, s, bc.options()), doctest::Contains("forward runs unit"), Error);
  }
  SUBCASE("the planner never makes a leaf plan whose units do not fit the ring") {
    planner::PlanOptions o;
    o.templates = &test::templates();
    o.profile = test::small_profile();
    o.offload = planner::OffloadMode::Leaf;
    o.by_phase = false;  // a pipeline as one sequence: the driver keeps every component on the GPUs
    o.budget.cpu = 1ull << 30;
    o.budget.gpus[0] = 64ull << 20;
    o.tokens = 8;
    for (uint32_t k : {1u, 2u, 4u}) {
      o.prefetch = k;
      try {
        const planner::Plan plan = planner::make_plan(ckpt, o);
        const Schedule s = build_schedule(ckpt, plan);
        ByteCheck bc;
        CHECK_NOTHROW(backend->run(ckpt, s, bc.options()));
      } catch (const Error& e) {
        CHECK(e.kind() == ErrorKind::InvalidInput);  // no plan at all is fine; a wrong one is not
      }
    }
  }
}

TEST_CASE(
    "real forwards: streamed == all-resident bit for bit, unit by unit, and equal to the mapped checkpoint") {
  test::TempDir dir("driver-real");
  auto backend = make_cpu_backend(2);
  for (const std::string preset : {"tiny", "tiny-flux"}) {
    CAPTURE(preset);
    const auto bf16 = test::synth(dir.path, preset, 13);
    const auto path = test::quantize(bf16, dir.path / (preset + "-nf4"), {"nf4", "nf4", 64, true});
    const Checkpoint ckpt = Checkpoint::open(path);
    const Schedule s = build_schedule(ckpt, test::plan_streamed(ckpt, 0.2, 0.5, 12, 2));
    REQUIRE(streamed(s, Placement::Cpu) + streamed(s, Placement::Disk) > 0);
    RunOptions o;
    o.tokens = 12;
    o.steps = 2;
    o.seed = 5;
    const auto [planned, resident] = test::run_planned_and_resident(*backend, ckpt, s, o);
    REQUIRE(!planned.unit_names.empty());
    CHECK(planned.unit_digests == resident.unit_digests);
    CHECK(planned.unit_digests[0] == planned.unit_digests[1]);  // the same inputs every run step
    for (const LayerDigest& d : planned.unit_digests[0]) CHECK(d.nonfinite == 0);
    const ComponentRun* fwd = nullptr;
    for (const ComponentRun& c : planned.components)
      if (c.forward) fwd = &c;
    REQUIRE(fwd != nullptr);
    CHECK(fwd->unread_tensors.empty());
    REQUIRE(resident.components.size() == planned.components.size());
    for (size_t ci = 0; ci < planned.components.size(); ++ci)
      if (planned.components[ci].forward)
        CHECK(resident.components[ci].output.bytes == planned.components[ci].output.bytes);
    // The same forward straight from the mapped checkpoint gives the same bits.
    const Component& comp = *ckpt.find_component(fwd->component);
    auto forward = make_forward(comp);
    ThreadPool pool(2);
    auto ops = make_cpu_ops(pool, 2 * fwd->activation_peak_bytes() + (16u << 20));
    MappedWeights weights(comp, s.tied[static_cast<size_t>(&comp - ckpt.components().data())]);
    CHECK(run_forward(*forward, *ops, weights, fwd->inputs).bytes == fwd->output.bytes);
    CHECK(weights.read().size() > 0);
  }
}

namespace {

uint64_t item_bytes(const DeviceMemory& m, MemoryKind kind) {
  uint64_t b = 0;
  for (const MemoryItem& it : m.items) b += it.kind == kind ? it.bytes : 0;
  return b;
}

RunOptions flux_phases(RunOptions o) {
  o.denoise_steps = 2;
  o.phases = {{"text_encoder", {"text_encoder"}, {"text_encoder"}, {}},
              {"text_encoder_2", {"text_encoder_2"}, {}, {}},
              {"denoise", {"transformer"}, {"transformer"}, {}},
              {"vae", {"vae"}, {"vae"}, {}}};
  return o;
}

}  // namespace

TEST_CASE("a run by phase: a loaded component is held during its phase only, the outputs unchanged") {
  test::TempDir dir("driver-phases");
  auto backend = make_cpu_backend(2);
  const auto path =
      test::quantize(test::synth(dir.path, "tiny-flux", 21), dir.path / "nf4", {"nf4", "nf4", 64, true});
  const Checkpoint ckpt = Checkpoint::open(path);
  RunOptions o;
  o.tokens = 12;
  o.steps = 2;
  o.seed = 3;
  o.denoise_steps = 2;
  SUBCASE("every component resident in the plan: text_encoder_2 for the job, the others loaded per phase") {
    const Schedule s = build_schedule(ckpt, test::plan_streamed(ckpt, 4.0, 0.5, 12, 2));
    REQUIRE(streamed(s, Placement::Cpu) + streamed(s, Placement::Disk) == 0);
    const RunResult whole = backend->run(ckpt, s, o);
    const RunResult phased = backend->run(ckpt, s, flux_phases(o));
    CHECK(phased.unit_digests == whole.unit_digests);
    CHECK(phased.digests == whole.digests);
    CHECK(phased.pipeline.images.bytes == whole.pipeline.images.bytes);
    REQUIRE(phased.phases.size() == 4);
    const auto& ph = phased.phases;
    CHECK(ph[2].passes == 2);
    CHECK(ph[1].load_bytes == 0);
    const uint64_t job = ph[1].peak_bytes.at(0);  // the job-resident weights alone
    CHECK(job > 0);
    for (size_t p : {0, 2, 3}) {
      CAPTURE(p);
      CHECK(ph[p].load_bytes > 0);
      CHECK(ph[p].peak_bytes.at(0) == job + ph[p].load_bytes);  // held in its phase, nothing else
    }
    // Every loaded component's memory was given back at its phase's end: the run ends holding the
    // job-resident weights, and the whole run never held two loaded components at once.
    REQUIRE(phased.memory.size() == 1);
    CHECK(item_bytes(phased.memory[0], MemoryKind::ResidentArena) == job);
    const uint64_t all = item_bytes(whole.memory[0], MemoryKind::ResidentArena);
    CHECK(job + ph[0].load_bytes + ph[2].load_bytes + ph[3].load_bytes == all);
    const uint64_t acts = phased.memory[0].allocated_bytes - job;
    CHECK(phased.memory[0].measured_peak_bytes ==
          job + std::max({ph[0].load_bytes, ph[2].load_bytes, ph[3].load_bytes}) + acts);
    CHECK(whole.memory[0].measured_peak_bytes == whole.memory[0].allocated_bytes);
    // Each phase's ops made once per run step (4 phases x 2 steps); one phase holding every
    // component keeps its ops from one step to the next, with the same outputs.
    CHECK(phased.ops_releases == 8);
    RunOptions one = flux_phases(o);
    one.phases = {{"all", {"text_encoder", "text_encoder_2", "transformer", "vae"}, {}, {}}};
    const RunResult kept = backend->run(ckpt, s, one);
    CHECK(kept.ops_releases == 1);
    CHECK(kept.unit_digests == whole.unit_digests);
    CHECK(kept.pipeline.images.bytes == whole.pipeline.images.bytes);
  }
  SUBCASE("a streamed plan: each phase's ring is allocated in its phase and freed after it") {
    const Schedule s = build_schedule(ckpt, test::plan_streamed(ckpt, 0.2, 0.5, 12, 2));
    REQUIRE(streamed(s, Placement::Cpu) + streamed(s, Placement::Disk) > 0);
    const RunResult whole = backend->run(ckpt, s, o);
    const RunResult phased = backend->run(ckpt, s, flux_phases(o));
    CHECK(phased.unit_digests == whole.unit_digests);
    CHECK(phased.pipeline.images.bytes == whole.pipeline.images.bytes);
    CHECK(phased.h2d_bytes_per_step == whole.h2d_bytes_per_step);
    REQUIRE(phased.memory.size() == 1);
    CHECK(item_bytes(phased.memory[0], MemoryKind::DeviceSlots) == 0);
    CHECK(item_bytes(whole.memory[0], MemoryKind::DeviceSlots) > 0);
    CHECK(phased.memory[0].measured_peak_bytes <= whole.memory[0].measured_peak_bytes);
  }
}

TEST_CASE("the ops of a FluxPipeline run are sized per component: the encoders at their own token counts") {
  test::TempDir dir("driver-ops-needs");
  const auto path =
      test::quantize(test::synth(dir.path, "tiny-flux", 5), dir.path / "nf4", {"nf4", "nf4", 64, true});
  const Checkpoint ckpt = Checkpoint::open(path);
  const Schedule s = build_schedule(ckpt, test::plan_streamed(ckpt, 4.0, 0.5, 12, 2));
  std::vector<std::unique_ptr<Forward>> forwards;
  size_t t5 = SIZE_MAX, clip = SIZE_MAX, flux = SIZE_MAX;
  for (size_t ci = 0; ci < ckpt.components().size(); ++ci) {
    const Component& c = ckpt.components()[ci];
    forwards.push_back(make_forward(c));
    if (c.name() == "text_encoder") clip = ci;
    if (c.name() == "text_encoder_2") t5 = ci;
    if (c.name() == "transformer") flux = ci;
  }
  REQUIRE(t5 != SIZE_MAX);
  REQUIRE(clip != SIZE_MAX);
  REQUIRE(flux != SIZE_MAX);
  REQUIRE(forwards[t5]);
  // At 4096 tokens a T5 with 4096 positions would hold a [heads, 4096, 4096] bias; a FluxPipeline
  // runs it at no more than 512 tokens (planner::flux_pipeline_tokens), CLIP at its 77 positions.
  const std::vector<OpsNeed> run = ops_needs(ckpt, s, 4096, 1, forwards, false);
  const std::vector<OpsNeed> pipe = ops_needs(ckpt, s, 4096, 1, forwards, true);
  CHECK(pipe[flux].activation_bytes == run[flux].activation_bytes);
  CHECK(pipe[t5].activation_bytes < run[t5].activation_bytes);
  CHECK(pipe[clip].activation_bytes < run[clip].activation_bytes);
  const std::vector<OpsNeed> at512 = ops_needs(ckpt, s, 512, 1, forwards, false);
  CHECK(pipe[t5].activation_bytes == at512[t5].activation_bytes);
  // The dequant scratch: each component's own largest dequantized linear (bf16 bytes).
  for (size_t ci = 0; ci < pipe.size(); ++ci) {
    uint64_t most = 0;
    for (const LinearTask& l : s.linears)
      if (l.component_index == ci && l.needs_scratch()) most = std::max<uint64_t>(most, l.params.numel() * 2);
    CAPTURE(ckpt.components()[ci].name());
    CHECK(pipe[ci].dequant_scratch_bytes == most);
  }
  CHECK(pipe[flux].dequant_scratch_bytes > 0);  // nf4: dequantized before the GEMM
}

TEST_CASE("the driver's forwards on the frameworks' inputs give the frameworks' outputs (stored vectors)") {
  auto backend = make_cpu_backend(2);
  for (const std::string& v : test::vector_variants()) {
    CAPTURE(v);
    const test::VectorRun r = test::run_vectors(*backend, std::filesystem::path(QTOOL_RUNNER_TEST_DATA) / v);
    CHECK(r.judged.size() == (r.architecture == "CLIPTextModel" ? 2u : 1u));
    for (const auto& [name, j] : r.judged) {
      CAPTURE(name);
      CHECK(j.ok);
    }
  }
}

TEST_CASE(
    "a plan over two GPUs: each unit on its GPU's ops, the state handed over as the planner prices it") {
  test::TempDir dir("driver-two");
  auto backend = make_cpu_backend(2);
  for (const std::string preset : {"tiny", "tiny-flux"}) {
    CAPTURE(preset);
    const auto bf16 = test::synth(dir.path, preset, 21);
    const Checkpoint ckpt =
        Checkpoint::open(test::quantize(bf16, dir.path / (preset + "-nf4"), {"nf4", "nf4"}));
    const uint64_t tokens = 12;
    const Schedule two = build_schedule(ckpt, test::plan_streamed(ckpt, 0.3, 0.5, tokens, 2, 2));
    const Schedule one = build_schedule(ckpt, test::plan_streamed(ckpt, 0.3, 0.5, tokens, 2, 1));
    // The bytes the planner prices for each change of GPU inside a component with a forward (a
    // Flux change just before proj_out also carries norm_out's output, which only proj_out reads).
    uint64_t expected = 0, crossings = 0;
    for (size_t i = 1; i < two.steps.size(); ++i) {
      const ExecStep &a = two.steps[i - 1], &b = two.steps[i];
      if (a.component != b.component || a.device == b.device) continue;
      const Component& comp = ckpt.components()[b.component];
      const auto arch = planner::arch_of(comp);
      if (!arch) continue;  // linears only: each GPU makes its own input
      ++crossings;
      const DType dt = planner::model_dtype(*arch, comp);
      expected += planner::handover_bytes(*arch, 1, static_cast<int64_t>(tokens), dt);
      if (const auto* f = std::get_if<planner::FluxArch>(&*arch); f && b.modules.front() == "proj_out")
        expected += tokens * static_cast<uint64_t>(f->dim()) * dtype_size(dt);
    }
    REQUIRE(crossings > 0);
    RunOptions o;
    o.tokens = tokens;
    o.steps = 2;
    o.seed = 9;
    const auto [planned, resident] = test::run_planned_and_resident(*backend, ckpt, two, o);
    const RunResult single = backend->run(ckpt, one, o);
    // The CPU ops compute alike on every "GPU": every op of every unit, and the outputs, as on one.
    CHECK(planned.unit_digests == single.unit_digests);
    CHECK(planned.unit_digests == resident.unit_digests);
    CHECK(planned.digests == single.digests);
    for (size_t ci = 0; ci < planned.components.size(); ++ci)
      CHECK(planned.components[ci].output.bytes == single.components[ci].output.bytes);
    CHECK(planned.peer_bytes_per_step == expected);
    REQUIRE(planned.peer_ms.size() == 2);
    CHECK(single.peer_bytes_per_step == 0);
    // Both GPUs' ops ran forward units and held activations.
    std::set<int> gpus;
    for (const ComponentRun& c : planned.components)
      for (const auto& [gpu, bytes] : c.activation_peak_by_gpu)
        if (bytes > 0) gpus.insert(gpu);
    CHECK(gpus == std::set<int>{0, 1});
  }
}
