// GPU tests (label `gpu`) of the CUDA backend through the schedule driver: the real forwards
// (Llama, Flux, T5, CLIP) on the CUDA ops against the CPU backend's within a stated tolerance,
// streamed == all-resident bit for bit on the GPU, the measured peak within the plan, and verify
// end to end on tiny-flux. Without a CUDA device the program prints why and exits 77 (skipped).
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <set>

#include "qtool/formats/safetensors.hpp"
#include "qtool/planner/device_profile.hpp"
#include "qtool/planner/plan.hpp"
#include "qtool/planner/planner.hpp"
#include "qtool/runner/cuda_resources.hpp"
#include "qtool/runner/executor.hpp"
#include "qtool/runner/schedule.hpp"
#include "qtool/runner/verify.hpp"
#include "runner_test_util.hpp"
#include "vectors_run.hpp"

using namespace qtool;
using namespace qtool::runner;

int main(int argc, char** argv) {
  if (cuda::device_count() == 0) {
    std::printf("no CUDA device: GPU tests skipped\n");
    return 77;
  }
  std::printf("GPU: %s\n", cuda::describe_device(0).c_str());
  doctest::Context ctx(argc, argv);
  return ctx.run();
}

namespace {

// Relative RMS error and max |error| / max |reference| of two F32 outputs.
struct Diff {
  double rel_rms = 0, rel_max = 0;
};
Diff diff(const HostTensor& got, const HostTensor& ref) {
  REQUIRE(got.dtype == DType::F32);
  REQUIRE(ref.dtype == DType::F32);
  REQUIRE(got.shape == ref.shape);
  REQUIRE(got.bytes.size() == ref.bytes.size());
  const size_t n = ref.bytes.size() / 4;
  std::vector<float> a(n), b(n);
  std::memcpy(a.data(), got.bytes.data(), n * 4);
  std::memcpy(b.data(), ref.bytes.data(), n * 4);
  double err = 0, norm = 0, max_err = 0, max_ref = 0;
  for (size_t i = 0; i < n; ++i) {
    REQUIRE(std::isfinite(a[i]));
    const double e = static_cast<double>(a[i]) - b[i];
    err += e * e;
    norm += static_cast<double>(b[i]) * b[i];
    max_err = std::max(max_err, std::fabs(e));
    max_ref = std::max(max_ref, std::fabs(static_cast<double>(b[i])));
  }
  return {norm > 0 ? std::sqrt(err / norm) : std::sqrt(err), max_ref > 0 ? max_err / max_ref : max_err};
}

// The stated tolerance of the CUDA forward against the CPU backend's, per architecture, as relative
// RMS error of the final output (bf16 models). The element-wise ops, norms and RoPE give the CPU's
// bits; linear (cuBLAS) and attention (online softmax) sum in another order, so their outputs
// differ by about one bf16 rounding (2^-9 relative) and that difference travels through the
// blocks. Two blocks of a tiny preset keep it well below 2e-2; the measured values are printed.
double tolerance(const std::string& architecture) {
  if (architecture == "LlamaForCausalLM") return 2e-2;
  return 2e-2;  // FluxTransformer2DModel, T5EncoderModel, CLIPTextModel
}

std::vector<test::SchemeCase> forward_schemes() {
  return {{"bf16", ""}, {"nf4-dq", "nf4", 64, true}, {"int8", "int8"}, {"fp8_e4m3", "fp8_e4m3"}};
}

}  // namespace

TEST_CASE("CUDA forwards against the CPU backend's: Llama, Flux, T5, CLIP in every scheme, streamed") {
  test::TempDir dir("gpu-fwd");
  auto gpu = make_cuda_backend();
  auto cpu = make_cpu_backend(2);
  for (const std::string preset : {"tiny", "tiny-flux"}) {
    const auto bf16 = test::synth(dir.path, preset, 21);
    for (const test::SchemeCase& c : forward_schemes()) {
      CAPTURE(preset);
      CAPTURE(c.label);
      const auto path =
          c.scheme.empty() ? bf16 : test::quantize(bf16, dir.path / (preset + "-" + c.label), c);
      const Checkpoint ckpt = Checkpoint::open(path);
      const Schedule s = build_schedule(ckpt, test::plan_streamed(ckpt, 0.2, 0.5, 12, 2));
      RunOptions o;
      o.tokens = 12;
      o.steps = 1;
      o.seed = 9;
      const RunResult rc = cpu->run(ckpt, s, o);
      const RunResult rg = gpu->run(ckpt, s, o);
      REQUIRE(rg.components.size() == rc.components.size());
      size_t n_forwards = 0;
      for (size_t ci = 0; ci < rc.components.size(); ++ci) {
        const ComponentRun& a = rg.components[ci];
        const ComponentRun& b = rc.components[ci];
        CHECK(a.forward == b.forward);
        if (!b.forward) continue;
        ++n_forwards;
        CAPTURE(b.architecture);
        CHECK(a.unread_tensors.empty());
        const Diff d = diff(a.output, b.output);
        MESSAGE(preset, " ", c.label, " ", b.architecture, " '", b.component, "': rel RMS ", d.rel_rms,
                ", max |err| / max |ref| ", d.rel_max, " (tolerance ", tolerance(b.architecture), ")");
        CHECK(d.rel_rms <= tolerance(b.architecture));
        REQUIRE(a.more_outputs.size() == b.more_outputs.size());
        for (size_t k = 0; k < a.more_outputs.size(); ++k)
          CHECK(diff(a.more_outputs[k], b.more_outputs[k]).rel_rms <= tolerance(b.architecture));
      }
      CHECK(n_forwards == (preset == "tiny" ? 1u : 3u));  // tiny-flux: transformer, CLIP, T5
    }
  }
}

TEST_CASE("CUDA: streamed == all-resident bit for bit (every op of every unit), cpu and disk groups") {
  test::TempDir dir("gpu-stream");
  auto gpu = make_cuda_backend();
  for (const std::string preset : {"tiny", "tiny-flux"}) {
    CAPTURE(preset);
    const auto bf16 = test::synth(dir.path, preset, 5);
    const Checkpoint ckpt =
        Checkpoint::open(test::quantize(bf16, dir.path / (preset + "-nf4"), {"nf4", "nf4"}));
    Schedule s;
    size_t n_cpu = 0, n_disk = 0;
    for (double cpu = 0.05; cpu < 0.95; cpu += 0.05) {
      s = build_schedule(ckpt, test::plan_streamed(ckpt, 0.1, cpu, 12, 2));
      n_cpu = n_disk = 0;
      for (const ExecStep& st : s.steps)
        if (st.streamed) (s.arenas[st.arena].placement == Placement::Disk ? n_disk : n_cpu)++;
      if (n_cpu && n_disk) break;
    }
    REQUIRE(n_cpu + n_disk > 0);
    RunOptions o;
    o.tokens = 12;
    o.steps = 3;
    o.seed = 4;
    o.sizing.staging_buffers = s.n_slots;
    const auto [planned, resident] = test::run_planned_and_resident(*gpu, ckpt, s, o);
    REQUIRE(!planned.unit_names.empty());
    CHECK(planned.unit_digests == resident.unit_digests);
    CHECK(planned.digests == resident.digests);
    CHECK(planned.unit_digests[0] == planned.unit_digests[2]);  // the same inputs every run step
    for (size_t ci = 0; ci < planned.components.size(); ++ci)
      CHECK(planned.components[ci].output.bytes == resident.components[ci].output.bytes);
    CHECK(planned.h2d_bytes_per_step > 0);
    // Timing runs (no digests, no host waits) give the same outputs.
    o.digests = false;
    o.steps = 2;
    const RunResult timed = gpu->run(ckpt, s, o);
    for (size_t ci = 0; ci < planned.components.size(); ++ci)
      CHECK(timed.components[ci].output.bytes == planned.components[ci].output.bytes);
    REQUIRE(timed.step_ms.size() == 2);
    CHECK(timed.step_ms[1] > 0);
  }
}

TEST_CASE(
    "CUDA: verify --backend cuda on tiny-flux nf4 end to end: every check passes, peak within the plan") {
  test::TempDir dir("gpu-verify");
  const auto bf16 = test::synth(dir.path, "tiny-flux", 17);
  const auto path = test::quantize(bf16, dir.path / "nf4", {"nf4", "nf4", 64, true});
  const Checkpoint ckpt = Checkpoint::open(path);
  // The plan with the measured profile of this GPU's kind (its CUDA context and workspace),
  // streaming: the least GPU budget any plan fits in plus a tenth of the weights.
  planner::PlanOptions po;
  po.templates = &test::templates();
  const bool h100 = cuda::describe_device(0).find("H100") != std::string::npos;
  po.profile =
      planner::load_device_profile(std::filesystem::path(QTOOL_SOURCE_DIR) / "sample_configs/devices" /
                                   (h100 ? "h100-pcie-gen5.json" : "h200.json"));
  po.tokens = 16;
  po.prefetch = 2;
  uint64_t total = 0;
  for (const Component& c : ckpt.components()) total += c.total_bytes();
  po.budget.cpu = total;
  po.by_phase = false;  // a pipeline as one sequence: the driver keeps every component on the GPUs
  uint64_t lo = 1 << 20, hi = (64ull << 30);
  while (hi - lo > (1u << 16)) {
    const uint64_t mid = lo + (hi - lo) / 2;
    po.budget.gpus[0] = mid;
    bool ok = true;
    try {
      planner::make_plan(ckpt, po);
    } catch (const Error&) {
      ok = false;
    }
    (ok ? hi : lo) = mid;
  }
  po.budget.gpus[0] = hi + total / 10;
  const planner::Plan plan = planner::make_plan(ckpt, po);
  planner::write_plan(dir.path / "plan.json", plan);
  VerifyOptions v;
  v.checkpoint = path;
  v.plan = dir.path / "plan.json";
  v.reference = bf16;
  v.backend = "cuda";
  v.steps = 3;
  v.poison = true;
  v.outputs = dir.path / "out.safetensors";
  v.report = dir.path / "report.json";
  v.trace = dir.path / "trace.json";
  v.log = [](std::string_view line) { std::printf("%.*s\n", static_cast<int>(line.size()), line.data()); };
  const VerifyReport r = verify(v);
  CHECK(r.json["backend"] == "cuda");
  for (const CheckResult& c : r.checks) {
    CAPTURE(c.name);
    CAPTURE(c.detail);
    CHECK(c.status != CheckResult::Status::Fail);
    if (c.name == "peak memory" || c.name == "streamed == resident" || c.name == "every tensor read" ||
        c.name == "cuda forward vs cpu" || c.name == "reference output")
      CHECK(c.status == CheckResult::Status::Pass);
  }
  CHECK(r.passed());
  std::set<std::string> names;
  for (const CheckResult& c : r.checks) names.insert(c.name);
  CHECK(names.count("cuda forward vs cpu") == 1);
  CHECK(names.count("reference output") == 1);
  REQUIRE(std::filesystem::exists(v.outputs));
  const SafetensorsFile out = SafetensorsFile::open(v.outputs);
  CHECK(out.find("transformer.sample") != nullptr);
  // Replaying the written inputs gives the same output bit for bit.
  VerifyOptions again = v;
  again.inputs = v.outputs;
  again.outputs = dir.path / "again.safetensors";
  again.reference.clear();
  again.poison = false;
  again.trace.clear();
  again.report.clear();
  CHECK(verify(again).passed());
  const SafetensorsFile out2 = SafetensorsFile::open(again.outputs);
  const TensorInfo* a = out.find("transformer.sample");
  const TensorInfo* b = out2.find("transformer.sample");
  REQUIRE((a != nullptr && b != nullptr));
  const auto da = out.data(*a), db = out2.data(*b);
  CHECK((da.size() == db.size() && std::memcmp(da.data(), db.data(), da.size()) == 0));
}

// The interop check on the GPU: the frameworks' own outputs (transformers / diffusers on their tiny
// checkpoints, tests/runner/data) against the CUDA forward through the driver, within the
// bound the CPU backend meets (twice the framework's own bf16 noise, max and RMS).
TEST_CASE("CUDA forwards on the frameworks' inputs give the frameworks' outputs (stored vectors)") {
  auto gpu = make_cuda_backend();
  for (const std::string& v : test::vector_variants()) {
    CAPTURE(v);
    const test::VectorRun r = test::run_vectors(*gpu, std::filesystem::path(QTOOL_RUNNER_TEST_DATA) / v);
    for (const auto& [name, j] : r.judged) {
      CAPTURE(name);
      MESSAGE(v, " ", name, ": vs the framework max rel ", j.vs_framework.max_rel, ", rms rel ",
              j.vs_framework.rms_rel, "; the framework's own noise max ", j.noise.max_rel, ", rms ",
              j.noise.rms_rel);
      CHECK(j.ok);
    }
  }
}
