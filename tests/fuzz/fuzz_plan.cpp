// libFuzzer entry point for the plan parser: the input is a plan file (`qtool verify --plan FILE`),
// written to tmpfs and read with read_plan, then turned into the runner's schedule against a
// fixed tiny checkpoint, as verify does before it runs anything. The checkpoint is the tiny-flux
// pipeline (synthesized once at start-up) quantized with every scheme kind: the transformer nf4
// with double quant, text_encoder fp8_e4m3, text_encoder_2 int8 (tests/fuzz/corpus_plan holds
// plans `qtool plan` made for it). verify's fingerprint check is left out so that plans reach the
// schedule whatever they say.
//
// A plan that parses must survive its round trip (plan_to_json, then plan_from_json, gives the
// same JSON). A schedule that builds is used as the CPU backend uses it: each arena of at most
// kMaxArena bytes is filled from the checkpoint, and every linear it holds is bound into it and
// dequantized (first and last row). Whatever the bytes, reading either works or throws a
// bad-input qtool::Error naming the plan file (fuzz_util.hpp).
#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "fuzz_util.hpp"
#include "qtool/formats/checkpoint.hpp"
#include "qtool/formats/synth.hpp"
#include "qtool/libquant/config.hpp"
#include "qtool/libquant/convert.hpp"
#include "qtool/planner/plan.hpp"
#include "qtool/runner/dequant.hpp"
#include "qtool/runner/schedule.hpp"

namespace {

using namespace qtool;

constexpr uint64_t kMaxArena = uint64_t{16} << 20;

// The config tests/fuzz/corpus_plan's plans were made with (tests/fuzz/README.md).
constexpr const char* kQuantConfig = R"({
  "quant_backend": "nf4",
  "quant_kwargs": {"double_quant": true},
  "components_to_quantize": ["transformer"],
  "quant_mapping": {"text_encoder": {"scheme": "fp8_e4m3"}, "text_encoder_2": {"scheme": "int8"}}
})";

const Checkpoint& checkpoint() {
  static const Checkpoint ck = [] {
    const std::filesystem::path root = fuzz::scratch_root();
    SynthSpec spec;
    spec.preset = "tiny-flux";
    SynthWriteOptions synth;
    synth.threads = 1;
    write_synth_model(make_synth_model(spec), root / "tiny-flux", synth);
    quant::ConvertOptions convert;
    convert.n_threads = 1;
    const quant::QuantConfig config =
        quant::parse_quant_config(nlohmann::json::parse(kQuantConfig), "fuzz config");
    quant::quantize_checkpoint(root / "tiny-flux", config, root / "tiny-flux-q", convert);
    return Checkpoint::open(root / "tiny-flux-q");
  }();
  return ck;
}

void use_schedule(const Checkpoint& ck, const runner::Schedule& schedule) {
  std::vector<uint8_t> arena_bytes;
  std::vector<uint16_t> row;
  for (const runner::ExecStep& step : schedule.steps) {
    QTOOL_ASSERT(step.arena < schedule.arenas.size());
    const runner::Arena& arena = schedule.arenas[step.arena];
    if (arena.bytes > kMaxArena) continue;
    arena_bytes.assign(arena.bytes, 0);
    runner::fill_arena(ck, arena, arena_bytes.data());
    for (uint32_t li : step.linears) {
      QTOOL_ASSERT(li < schedule.linears.size());
      const runner::LinearTask& linear = schedule.linears[li];
      const runner::DequantParams p = schedule.bind(linear, arena_bytes.data());
      if (p.rows == 0 || p.cols == 0) continue;
      row.resize(p.cols);
      runner::dequantize_to_bf16_cpu(p, row.data(), 0, p.cols);
      runner::dequantize_to_bf16_cpu(p, row.data(), p.numel() - p.cols, p.numel());
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const Checkpoint& ck = checkpoint();
  const std::filesystem::path path = fuzz::scratch_root() / "plan.json";
  fuzz::write_file(path, std::span<const uint8_t>(data, size));
  planner::Plan plan;
  try {
    plan = planner::read_plan(path);
    const nlohmann::json once = planner::plan_to_json(plan);
    const nlohmann::json twice = planner::plan_to_json(planner::plan_from_json(once, path.string()));
    QTOOL_ASSERT_MSG(once == twice, "the plan does not survive its round trip");
  } catch (const Error& e) {
    fuzz::check_bad_input_error(e, {path.string()});
    return 0;
  }
  try {
    // verify names the plan file when it reports these (its items are named: "plan schedule[3]").
    const runner::Schedule schedule = runner::build_schedule(ck, plan);
    use_schedule(ck, schedule);
  } catch (const Error& e) {
    fuzz::check_bad_input_error(e, {path.string(), "plan", ck.root().string()});
  }
  return 0;
}
