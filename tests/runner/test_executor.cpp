// The schedule and the CPU backend on real (tiny) checkpoints of every scheme: streamed runs equal
// all-resident runs bit for bit, no quant state is left behind in the host arenas, the arena path
// dequantizes exactly as libquant's CPU reference, and bad plans are rejected.
#include <doctest/doctest.h>

#include <cstdio>
#include <cstring>
#include <random>
#include <set>

#include "qtool/formats/error.hpp"
#include "qtool/runner/executor.hpp"
#include "qtool/runner/schedule.hpp"
#include "qtool/runner/verify.hpp"
#include "runner_test_util.hpp"

using namespace qtool;
using namespace qtool::runner;

namespace {

struct Fixture {
  test::TempDir dir{"exec"};
  std::filesystem::path bf16;
  Fixture() { bf16 = test::synth(dir.path, "tiny", 5); }
};

Fixture& fixture() {
  static Fixture f;
  return f;
}

size_t count_streamed(const Schedule& s, Placement p) {
  size_t n = 0;
  for (const ExecStep& st : s.steps)
    if (st.streamed && s.arenas[st.arena].placement == p) ++n;
  return n;
}

}  // namespace

TEST_CASE("streamed CPU runs equal all-resident runs for every scheme, with groups in memory and on disk") {
  Fixture& f = fixture();
  auto backend = make_cpu_backend(2);
  for (const test::SchemeCase& c : test::all_scheme_cases()) {
    CAPTURE(c.label);
    test::TempDir q("q");
    const auto path = test::quantize(f.bf16, q.path / "model", c);
    const Checkpoint ckpt = Checkpoint::open(path);
    // A cpu budget that leaves some groups pinned and sends the others to disk.
    Schedule s;
    for (double cpu = 0.05; cpu < 0.95; cpu += 0.05) {
      s = build_schedule(ckpt, test::plan_streamed(ckpt, 0.3, cpu));
      if (count_streamed(s, Placement::Cpu) > 0 && count_streamed(s, Placement::Disk) > 0) break;
    }
    REQUIRE(count_streamed(s, Placement::Cpu) > 0);
    REQUIRE(count_streamed(s, Placement::Disk) > 0);
    REQUIRE(s.linears.size() > 0);
    RunOptions o;
    o.tokens = 8;
    o.steps = 2;
    o.seed = 42;
    o.trace = true;
    o.forwards = false;  // every linear on its own activations (test_driver.cpp runs the forward)
    const auto [planned, resident] = test::run_planned_and_resident(*backend, ckpt, s, o);
    REQUIRE(planned.digests.size() == 2);
    CHECK(planned.digests == resident.digests);
    for (const auto& step : planned.digests)
      for (const LayerDigest& d : step) CHECK(d.nonfinite == 0);
    // Different seeds give different outputs (the digest sees the activations).
    CHECK(planned.digests[0][0].hash != planned.digests[1][0].hash);
    CHECK(planned.h2d_bytes_per_step == s.streamed_bytes());
    // The trace has a copy and a compute interval for every streamed step of every run step.
    size_t copies = 0, disk = 0;
    for (const TraceEvent& e : planned.trace) {
      copies += e.lane == Lane::Copy && e.device == 0;
      disk += e.lane == Lane::DiskRead;
    }
    CHECK(copies == 2 * (count_streamed(s, Placement::Cpu) + count_streamed(s, Placement::Disk)));
    CHECK(disk == 2 * count_streamed(s, Placement::Disk));
  }
}

TEST_CASE("no quant state stays behind: host arenas overwritten right after their copy change nothing") {
  Fixture& f = fixture();
  auto backend = make_cpu_backend(2);
  for (const test::SchemeCase& c : test::all_scheme_cases()) {
    if (c.scheme.empty()) continue;
    CAPTURE(c.label);
    test::TempDir q("poison");
    const Checkpoint ckpt = Checkpoint::open(test::quantize(f.bf16, q.path / "model", c));
    const Schedule s = build_schedule(ckpt, test::plan_streamed(ckpt, 0.2, 0.5));
    RunOptions o;
    o.tokens = 4;
    o.steps = 1;
    o.seed = 7;
    const RunResult clean = backend->run(ckpt, s, o);
    size_t poisoned = 0;
    const uint64_t seed = 1234;
    std::printf("poison seed %llu\n", static_cast<unsigned long long>(seed));
    std::mt19937_64 rng(seed);
    o.after_copy = [&](size_t, std::span<uint8_t> host) {
      for (auto& b : host) b = static_cast<uint8_t>(rng());
      ++poisoned;
    };
    const RunResult dirty = backend->run(ckpt, s, o);
    CHECK(poisoned == count_streamed(s, Placement::Cpu) + count_streamed(s, Placement::Disk));
    CHECK(dirty.digests == clean.digests);
    REQUIRE(!clean.unit_names.empty());  // the Llama forward ran, every op's output digested
    CHECK(dirty.unit_digests == clean.unit_digests);
  }
}

TEST_CASE("dequantizing through the arena layout matches libquant's CPU reference bit for bit") {
  Fixture& f = fixture();
  ThreadPool pool(2);
  for (const test::SchemeCase& c : test::all_scheme_cases()) {
    if (c.scheme.empty()) continue;
    CAPTURE(c.label);
    test::TempDir q("arena");
    const Checkpoint ckpt = Checkpoint::open(test::quantize(f.bf16, q.path / "model", c));
    const Schedule s = build_schedule(ckpt, test::plan_streamed(ckpt, 0.0, 1.0));
    size_t checked = 0;
    for (const Arena& a : s.arenas) {
      std::vector<uint8_t> buf(a.bytes + 256);
      uint8_t* base = buf.data() + (256 - reinterpret_cast<uintptr_t>(buf.data()) % 256) % 256;
      fill_arena(ckpt, a, base);
      for (const LinearTask& l : s.linears) {
        if (&s.arenas[s.steps[l.step].arena] != &a || !l.quantized()) continue;
        const DequantParams p = s.bind(l, base);
        std::vector<uint16_t> ours(p.numel());
        dequantize_to_bf16_cpu(p, ours.data(), 0, p.numel());
        const Component& comp = ckpt.components()[l.component_index];
        quant::QuantizedLinear ql;
        for (const auto& x : quant::find_quantized_linears(comp))
          if (x.module == l.module) ql = x;
        REQUIRE(ql.module == l.module);
        std::vector<uint16_t> ref(p.numel());
        quant::dequantize_rows_bf16(ql, quant::tensor_bytes(ql, comp), ref.data(), 0,
                                    static_cast<size_t>(ql.rows()));
        CHECK(ours == ref);
        ++checked;
      }
    }
    CHECK(checked > 0);
  }
}

TEST_CASE("a plan that splits a weight from its quant state, or lacks a tensor, is rejected") {
  Fixture& f = fixture();
  test::TempDir q("bad");
  const Checkpoint ckpt = Checkpoint::open(test::quantize(f.bf16, q.path / "model", {"nf4", "nf4"}));
  planner::Plan plan = test::plan_streamed(ckpt, 0.2, 1.0);
  REQUIRE(!plan.groups.empty());
  // Move one absmax out of its group: the step now lacks its quant state.
  const auto is_absmax = [](const planner::GroupTensor& t) {
    return t.name.find(".absmax") != std::string::npos;
  };
  auto gi = std::find_if(plan.groups.begin(), plan.groups.end(), [&](const planner::OffloadGroup& g) {
    return std::any_of(g.tensors.begin(), g.tensors.end(), is_absmax);
  });
  REQUIRE(gi != plan.groups.end());
  planner::OffloadGroup& g = *gi;
  auto it = std::find_if(g.tensors.begin(), g.tensors.end(), is_absmax);
  const std::string moved = it->name;
  g.tensors.erase(it);
  try {
    build_schedule(ckpt, plan);
    FAIL("expected an error");
  } catch (const Error& e) {
    CHECK(e.kind() == ErrorKind::InvalidInput);
    CHECK(std::string(e.what()).find(moved) != std::string::npos);
  }
  // A tensor name the checkpoint does not have.
  planner::Plan plan2 = test::plan_streamed(ckpt, 0.2, 1.0);
  plan2.groups[0].tensors[0].name = "no.such.tensor";
  CHECK_THROWS_AS(build_schedule(ckpt, plan2), Error);
}

TEST_CASE("verify on the CPU: passes on a good plan, exit-2 error on another checkpoint's plan") {
  Fixture& f = fixture();
  test::TempDir q("verify");
  const auto path = test::quantize(f.bf16, q.path / "model", {"int8", "int8"});
  const Checkpoint ckpt = Checkpoint::open(path);
  planner::Plan plan = test::plan_streamed(ckpt, 0.3, 0.5);
  planner::write_plan(q.path / "plan.json", plan);
  VerifyOptions v;
  v.checkpoint = path;
  v.plan = q.path / "plan.json";
  v.reference = f.bf16;
  v.backend = "cpu";
  v.steps = 2;
  v.poison = true;
  v.trace = q.path / "trace.json";
  v.threads = 2;
  const VerifyReport r = verify(v);
  if (!r.passed())
    for (const CheckResult& c : r.checks)
      MESSAGE(c.name << ": " << check_status_name(c.status) << " " << c.detail);
  CHECK(r.passed());
  const auto trace = read_json_file(q.path / "trace.json");
  CHECK(trace["traceEvents"].size() > 4);

  // A plan made for the bf16 checkpoint does not fit the int8 one.
  const Checkpoint other = Checkpoint::open(f.bf16);
  planner::write_plan(q.path / "other.json", test::plan_streamed(other, 0.3, 0.5));
  v.plan = q.path / "other.json";
  try {
    verify(v);
    FAIL("expected an error");
  } catch (const Error& e) {
    CHECK(e.kind() == ErrorKind::InvalidInput);
    CHECK(std::string(e.what()).find("fingerprint") != std::string::npos);
  }
}

TEST_CASE("trace JSON and copy/compute overlap") {
  std::vector<TraceEvent> ev = {
      {"g0", Lane::Copy, 0, 0, 0, 0, 10, 100},    {"g0", Lane::Compute, 0, 0, 0, 10, 20, 0},
      {"g1", Lane::Copy, 0, 0, 1, 12, 10, 100},   {"g1", Lane::Compute, 0, 0, 1, 30, 20, 0},
      {"a", Lane::Compute, 0, 0, -1, 0, 1, 0},    {"g2", Lane::Compute, 1, 0, 2, 12, 10, 0},
      {"g0", Lane::DiskRead, 0, 0, 0, 0, 5, 100},
  };
  // g0's copy overlaps nothing but the activation event (plan_step -1, ignored); g1's copy [12, 22)
  // lies inside g0's compute [10, 30): half the copy time is hidden (g2 computes on another GPU).
  CHECK(copy_compute_overlap(ev, 0) == doctest::Approx(0.5));
  const auto j = trace_to_json(ev);
  size_t complete = 0;
  std::set<std::string> lanes;
  for (const auto& e : j["traceEvents"]) {
    complete += e["ph"] == "X";
    if (e["name"] == "thread_name") lanes.insert(e["args"]["name"].get<std::string>());
  }
  CHECK(complete == ev.size());
  CHECK(lanes == std::set<std::string>{"gpu0 copy", "gpu0 compute", "gpu1 compute", "disk read"});
}

TEST_CASE(
    "a two-GPU plan on the CPU backend: units on both devices, the forward's state crosses, outputs as "
    "resident") {
  Fixture& f = fixture();
  test::TempDir q("two");
  const Checkpoint ckpt =
      Checkpoint::open(test::quantize(f.bf16, q.path / "model", {"nf4 dq", "nf4", 64, true}));
  const Schedule s = build_schedule(ckpt, test::plan_streamed(ckpt, 0.3, 0.5, 8, 2, 2));
  REQUIRE(s.devices == std::vector<int>{0, 1});
  auto backend = make_cpu_backend(2);
  RunOptions o;
  o.tokens = 8;
  o.steps = 2;
  o.trace = true;
  const auto [planned, resident] = test::run_planned_and_resident(*backend, ckpt, s, o);
  CHECK(planned.digests == resident.digests);
  CHECK(planned.unit_digests == resident.unit_digests);
  CHECK(planned.memory.size() == 2);
  std::set<int> computing;
  for (const TraceEvent& e : planned.trace)
    if (e.lane == Lane::Compute) computing.insert(e.device);
  CHECK(computing == std::set<int>{0, 1});
}
