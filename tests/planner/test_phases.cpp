// A pipeline planned by phase (planner.hpp make_phased_plan) on the tiny-flux preset described in
// memory: FluxPipeline's four phases in order from the template, each component resident, loaded
// or streamed as the budget forces, the job's time the sum of its parts, the plan file's phases
// round trip, and checkpoints without phases planned as before (version 2, no phases).
#include <doctest/doctest.h>
#include <unistd.h>

#include <filesystem>
#include <set>
#include <string>

#include "qtool/formats/checkpoint.hpp"
#include "qtool/formats/error.hpp"
#include "qtool/formats/synth.hpp"
#include "qtool/planner/planner.hpp"

using namespace qtool;
using namespace qtool::planner;

namespace {

// A preset written to a temporary folder and read back as `qtool plan` reads it (with the
// architectures the runner executes).
PipelineInput input_of(const std::string& preset) {
  const std::filesystem::path dir =
      std::filesystem::temp_directory_path() / ("qtool-phases-" + preset + "-" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  SynthSpec spec;
  spec.preset = preset;
  SynthWriteOptions w;
  w.seed = 5;
  w.threads = 2;
  write_synth_model(make_synth_model(spec), dir, w);
  PipelineInput in = plan_input_of(Checkpoint::open(dir));
  std::filesystem::remove_all(dir);
  return in;
}

// A profile with small fixed costs, so that the tiny model's weights decide what fits.
DeviceProfile small_profile() {
  DeviceProfile p;
  p.name = "small";
  p.context_bytes = 1 << 20;
  p.cublas_workspace_bytes = 64 << 10;
  p.alloc_granularity_bytes = 4096;
  p.pinned_page_table_bytes_per_gib = 4096;
  return p;
}

struct Fixture {
  TemplateLibrary lib;
  PipelineInput in;
  PlanOptions opt;
  Fixture() {
    const auto dir = find_data_subdir("models");
    REQUIRE(dir);
    lib.load_dir(*dir);
    in = input_of("tiny-flux");
    opt.templates = &lib;
    opt.tokens = 64;
    opt.profile = small_profile();
    opt.budget.cpu = uint64_t{1} << 34;
  }
  Plan plan(uint64_t gpu) {
    opt.budget.gpus = {{0, gpu}};
    return make_plan(in, opt);
  }
  uint64_t smallest() {
    opt.budget.gpus = {{0, 1}};
    try {
      (void)make_plan(in, opt);
    } catch (const Error& e) {
      const std::string msg = e.what(), key = "Smallest budget that fits: --max-memory 0=";
      const size_t at = msg.find(key);
      REQUIRE(at != std::string::npos);
      return std::stoull(msg.substr(at + key.size()));
    }
    FAIL("a 1-byte budget was accepted");
    return 0;
  }
};

PhaseMode mode_of(const Plan& p, std::string_view component) {
  for (const PhasePlan& ph : p.phases)
    for (const PhaseComponent& c : ph.components)
      if (p.components[c.component].name == component) return c.mode;
  FAIL("no component " << component);
  return PhaseMode::Loaded;
}

void check_valid(const Plan& p, const PipelineInput& in) {
  const auto problems = check_plan(p, in);
  for (const auto& pr : problems) MESSAGE(pr);
  REQUIRE(problems.empty());
}

}  // namespace

TEST_CASE("phases: FluxPipeline's template gives its four phases, everything resident when it fits") {
  Fixture f;
  const Plan p = f.plan(uint64_t{1} << 32);
  check_valid(p, f.in);
  REQUIRE(p.phases.size() == 4);
  const std::vector<std::string> names = {"text_encoder", "text_encoder_2", "denoise", "vae"};
  const std::vector<std::string> comps = {"text_encoder", "text_encoder_2", "transformer", "vae"};
  for (size_t i = 0; i < 4; ++i) {
    CAPTURE(i);
    CHECK(p.phases[i].name == names[i]);
    REQUIRE(p.phases[i].components.size() == 1);
    CHECK(p.components[p.phases[i].components[0].component].name == comps[i]);
    CHECK(p.phases[i].components[0].mode == PhaseMode::Resident);
    CHECK(p.phases[i].repeat == (i == 2 ? kDefaultDenoiseSteps : 1u));
    CHECK(p.phases[i].load_s == 0);  // resident components load at the job's start
  }
  CHECK(p.denoise_steps == kDefaultDenoiseSteps);
  CHECK(p.groups.empty());
  CHECK(p.phases[3].note.find("convolutions are not executed") != std::string::npos);
  // The job's resident arenas are in every phase's peak.
  for (const PhasePlan& ph : p.phases)
    CHECK(ph.devices.at(0).resident_bytes == p.phases[0].devices.at(0).resident_bytes);
}

TEST_CASE("phases: the text encoders' activations at the prompt's tokens, not the image's") {
  // FluxPipeline runs CLIP on at most its max_position_embeddings tokens and T5 on at most
  // max_sequence_length (512), whatever the image tokens: the runner draws its prompts so
  // (flux_pipeline_tokens), and each phase's reserve must be sized the same way.
  Fixture f;
  f.opt.tokens = 4096;
  const Plan p = f.plan(uint64_t{1} << 36);
  check_valid(p, f.in);
  REQUIRE(p.phases.size() == 4);
  for (size_t i = 0; i < 3; ++i) {
    const PhasePlan& ph = p.phases[i];
    const ComponentInput& c = f.in.components[p.phases[i].components.at(0).component];
    REQUIRE(c.arch);
    const int64_t tokens = flux_pipeline_tokens(*c.arch, 4096);
    CAPTURE(c.name);
    CAPTURE(tokens);
    if (c.name == "text_encoder") CHECK(tokens == std::get<ClipTextArch>(*c.arch).max_positions);
    if (c.name == "text_encoder_2") CHECK(tokens == kFluxMaxSequenceLength);
    if (c.name == "transformer") CHECK(tokens == 4096);
    uint64_t planned = 0, expected = 0;
    for (const ReserveItem& r : ph.devices.at(0).reserve)
      if (r.name.starts_with("activations: ") && r.name != "activations: rounding") planned += r.bytes;
    for (const ActivationItem& a : activation_items(*c.arch, 1, tokens, c.activation_dtype))
      expected += a.bytes;
    CHECK(planned == expected);
  }
}

TEST_CASE("phases: budgets force each mode: resident, loaded at the phase's start, streamed") {
  Fixture f;
  const uint64_t lo = f.smallest();
  const uint64_t hi = lo + (uint64_t{64} << 20);
  std::map<std::string, std::set<PhaseMode>> seen;
  bool loaded_with_resident_denoiser = false;
  Plan prev;
  for (int step = 0; step <= 64; ++step) {
    const uint64_t b = lo + (hi - lo) * static_cast<uint64_t>(step) / 64;
    CAPTURE(b);
    const Plan p = f.plan(b);
    check_valid(p, f.in);
    for (const PhasePlan& ph : p.phases)
      for (const PhaseComponent& c : ph.components) {
        seen[p.components[c.component].name].insert(c.mode);
        CHECK(!c.reason.empty());
      }
    if (mode_of(p, "transformer") == PhaseMode::Resident && mode_of(p, "text_encoder_2") == PhaseMode::Loaded)
      loaded_with_resident_denoiser = true;
  }
  // At the smallest budget the denoiser (the largest phase) streams; with room, it stays.
  CHECK(mode_of(f.plan(lo), "transformer") == PhaseMode::Streamed);
  CHECK(mode_of(f.plan(hi), "transformer") == PhaseMode::Resident);
  CHECK(seen["transformer"].count(PhaseMode::Streamed));
  CHECK(seen["transformer"].count(PhaseMode::Resident));
  // Between them, the denoiser is kept and an encoder is loaded per phase (model offload).
  CHECK(loaded_with_resident_denoiser);
  // One byte below the smallest budget is refused, naming the phase that needs it.
  f.opt.budget.gpus = {{0, lo - 1}};
  try {
    (void)make_plan(f.in, f.opt);
    FAIL("one byte below the smallest budget was accepted");
  } catch (const Error& e) {
    const std::string msg = e.what();
    CHECK(msg.starts_with("phase '"));
    CHECK(msg.find("short by 1 bytes") != std::string::npos);
    CHECK(msg.find("--max-memory 0=" + std::to_string(lo)) != std::string::npos);
  }
}

TEST_CASE("phases: the job's time is the loads, the encoders once and N denoising steps") {
  Fixture f;
  const uint64_t lo = f.smallest();
  for (uint64_t b : {lo, lo + (uint64_t{2} << 20), uint64_t{1} << 32}) {
    std::vector<double> job;
    std::vector<Plan> plans;
    for (uint32_t n : {1u, 7u, 28u}) {
      f.opt.denoise_steps = n;
      plans.push_back(f.plan(b));
      const Plan& p = plans.back();
      check_valid(p, f.in);
      CHECK(p.phases[2].repeat == n);
      double sum = p.job_load_s;
      for (const PhasePlan& ph : p.phases) {
        double loads = 0;
        for (const PhaseComponent& c : ph.components) {
          const double gbps = c.load_pinned ? p.profile.h2d_pinned_gbps : p.profile.h2d_pageable_gbps;
          if (c.load_bytes)
            CHECK(c.load_s ==
                  doctest::Approx(c.load_bytes / (gbps * 1e9) + p.profile.copy_latency_us * 1e-6));
          if (c.mode != PhaseMode::Resident) loads += c.load_s;
        }
        CHECK(ph.load_s == doctest::Approx(loads));
        CHECK(ph.time_s == doctest::Approx(ph.load_s + ph.repeat * ph.step_s));
        sum += ph.time_s;
      }
      CHECK(p.predicted_job_s == doctest::Approx(sum));
      job.push_back(p.predicted_job_s);
    }
    // The same placement for every N: the job grows by exactly one denoising step per step.
    CHECK(job[1] - job[0] == doctest::Approx(6 * plans[0].phases[2].step_s));
    CHECK(job[2] - job[0] == doctest::Approx(27 * plans[0].phases[2].step_s));
    CHECK(plans[0].phases[2].step_s > 0);
  }
}

TEST_CASE("phases: the plan file's phases round trip; version 3 with phases, 2 without") {
  Fixture f;
  const Plan p = f.plan(f.smallest() + (uint64_t{1} << 20));
  const nlohmann::json j = plan_to_json(p);
  CHECK(j["version"] == kPlanVersion);
  REQUIRE(j["phases"].size() == 4);
  const Plan back = plan_from_json(j, "test.json");
  CHECK(plan_to_json(back) == j);
  check_valid(back, f.in);
  // A phase naming no component of the plan, a bad mode, or no phases in a version-3 plan.
  nlohmann::json bad = j;
  bad["phases"][1]["components"][0]["name"] = "nope";
  CHECK_THROWS_WITH_AS(plan_from_json(bad, "b.json"), doctest::Contains("phases[1].components[0].name"),
                       Error);
  bad = j;
  bad["phases"][0]["components"][0]["mode"] = "floating";
  CHECK_THROWS_WITH_AS(plan_from_json(bad, "b.json"), doctest::Contains("resident, loaded or streamed"),
                       Error);
  bad = j;
  bad["phases"] = nlohmann::json::array();
  CHECK_THROWS_AS(plan_from_json(bad, "b.json"), Error);
  bad = j;
  bad["phases"][2]["schedule"] = {0, 100000};
  CHECK_THROWS_WITH_AS(plan_from_json(bad, "b.json"), doctest::Contains("phases[2].schedule"), Error);
  // check_plan finds phases that do not match the pipeline.
  Plan wrong = back;
  std::swap(wrong.phases[0].components, wrong.phases[1].components);
  CHECK(!check_plan(wrong, f.in).empty());
  wrong = back;
  wrong.phases[2].repeat = 3;
  CHECK(!check_plan(wrong, f.in).empty());

  // Without phases in the template the pipeline is one sequence, as before: version 2.
  TemplateLibrary flat;
  for (ModelTemplate t : f.lib.templates()) {
    t.phases.clear();
    flat.add(std::move(t));
  }
  f.opt.templates = &flat;
  const Plan seq = f.plan(uint64_t{1} << 32);
  CHECK(seq.phases.empty());
  const nlohmann::json sj = plan_to_json(seq);
  CHECK(sj["version"] == kPlanVersionNoPhases);
  CHECK(!sj.contains("phases"));
  CHECK(!sj.contains("predicted_job_s"));
  CHECK(plan_to_json(plan_from_json(sj, "seq.json")) == sj);
  // A model is never phased.
  PlanOptions o = f.opt;
  o.templates = &f.lib;
  o.budget.gpus = {{0, uint64_t{1} << 32}};
  const Plan llama = make_plan(input_of("tiny"), o);
  CHECK(llama.phases.empty());
  CHECK(plan_to_json(llama)["version"] == kPlanVersionNoPhases);
}

TEST_CASE("phases: --denoise-steps out of range and bad template phases are errors") {
  Fixture f;
  for (uint32_t n : {0u, kMaxDenoiseSteps + 1}) {
    f.opt.denoise_steps = n;
    f.opt.budget.gpus = {{0, uint64_t{1} << 32}};
    try {
      (void)make_plan(f.in, f.opt);
      FAIL("accepted --denoise-steps " << n);
    } catch (const Error& e) {
      CHECK(e.kind() == ErrorKind::Usage);
      CHECK(std::string(e.what()).find("--denoise-steps") != std::string::npos);
    }
  }
  auto parse = [](const char* phases) {
    const std::string text = std::string(R"({"format": "qtool-model-template", "version": 1, "templates": [
      {"name": "p", "class_names": ["P"], "components": ["a", "b"], "phases": )") +
                             phases + "}]}";
    return parse_templates(nlohmann::json::parse(text), "t.json");
  };
  CHECK(
      parse(
          R"([{"name": "x", "components": ["a"]}, {"name": "y", "components": ["b"], "repeat": "denoise_steps"}])")
          .front()
          .phases.size() == 2);
  CHECK_THROWS_WITH_AS(parse(R"([{"name": "x", "components": ["c"]}])"), doctest::Contains("'c'"), Error);
  CHECK_THROWS_WITH_AS(parse(R"([{"name": "x", "components": ["a"]}, {"name": "y", "components": ["a"]}])"),
                       doctest::Contains("two phases"), Error);
  CHECK_THROWS_WITH_AS(parse(R"([{"name": "x", "components": ["a"], "repeat": 0}])"),
                       doctest::Contains("repeat"), Error);
  CHECK_THROWS_AS(parse(R"([])"), Error);
}
