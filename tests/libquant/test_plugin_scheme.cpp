// A scheme added from the test tree (schemes/int4_sym.cpp: its file and its one registration row)
// runs through everything qtool does with a scheme, with no change to libquant, the planner or the
// runner: names and options, quantize (tensors and the folder's quantization_config), recognising
// it in the written checkpoint, dequantization, the plan (its dequant rate from its row), and the
// CPU verify. The CUDA dequantizer refuses it by name.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdio>
#include <random>

#include "qtool/formats/json.hpp"
#include "qtool/libquant/config.hpp"
#include "qtool/libquant/convert.hpp"
#include "qtool/libquant/quant.hpp"
#include "qtool/planner/plan.hpp"
#include "qtool/runner/verify.hpp"
#include "runner/runner_test_util.hpp"

namespace qtool {
namespace {

quant::Scheme int4() {
  const auto s = quant::parse_scheme("int4_sym");
  REQUIRE(s.has_value());
  return *s;
}

// The scheme's definition, computed here on its own: q * scale per group of 32.
float expected_value(const float* row, uint64_t cols, uint64_t c) {
  const uint64_t g0 = c / 32 * 32, g1 = std::min<uint64_t>(cols, g0 + 32);
  float amax = 0;
  for (uint64_t k = g0; k < g1; ++k) amax = std::max(amax, std::fabs(row[k]));
  const float scale = amax / 7.0f;
  if (scale == 0) return 0;
  return std::clamp(std::nearbyint(row[c] / scale), -8.0f, 7.0f) * scale;
}

}  // namespace

TEST_CASE("a scheme registered from the test tree has a name, options and a layout") {
  const quant::Scheme s = int4();
  CHECK(quant::scheme_name(s) == "int4_sym");
  CHECK(quant::scheme_names_list().find("int4_sym") != std::string::npos);
  const auto all = quant::all_schemes();
  CHECK(std::find(all.begin(), all.end(), s) != all.end());
  // Options it does not read are refused, naming the option and the scheme.
  quant::SchemeOptions so;
  so.scheme = s;
  CHECK_NOTHROW(quant::validate_options(so));
  so.double_quant = true;
  CHECK_THROWS_WITH_AS(quant::validate_options(so), doctest::Contains("double_quant"), Error);
  so.double_quant = false;
  so.per_tensor = true;
  CHECK_THROWS_WITH_AS(quant::validate_options(so), doctest::Contains("int4_sym"), Error);
  // The quant config reads it by name; its keys are the scheme's (none).
  const auto config = quant::parse_quant_config(nlohmann::json{{"quant_backend", "int4_sym"}}, "test");
  REQUIRE(config.backend.has_value());
  CHECK(config.backend->scheme == s);
  CHECK_THROWS_AS(
      quant::parse_quant_config(
          nlohmann::json{{"quant_backend", "int4_sym"}, {"quant_kwargs", {{"blocksize", 64}}}}, "test"),
      Error);
  const int64_t shape[2] = {3, 33};
  quant::SchemeOptions plain;
  plain.scheme = s;
  const auto decls = quant::quantized_decls("a.b", DType::BF16, shape, plain);
  REQUIRE(decls.size() == 3);
  CHECK(decls[0].name == "a.b.weight");
  CHECK(decls[0].shape == std::vector<int64_t>{3, 17});
  CHECK(decls[1].name == "a.b.weight_group_scale");
  CHECK(decls[1].shape == std::vector<int64_t>{3, 2});
  CHECK(quant::scheme_parts(plain) ==
        std::vector<quant::Part>{quant::Part::Weight, quant::Part::Scale, quant::Part::QuantState});
}

TEST_CASE("the test scheme quantizes and dequantizes odd shapes, zeros and refuses NaN/Inf") {
  const uint64_t seed = 20261205;
  std::printf("int4_sym seed %llu\n", static_cast<unsigned long long>(seed));
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd;
  ThreadPool pool(2);
  quant::SchemeOptions so;
  so.scheme = int4();
  for (const uint64_t rows : {1u, 3u, 7u}) {
    for (const uint64_t cols : {1u, 2u, 31u, 32u, 33u, 65u, 100u}) {
      CAPTURE(rows);
      CAPTURE(cols);
      std::vector<float> w(rows * cols);
      for (float& v : w) v = nd(rng);
      for (uint64_t c = 0; c < std::min<uint64_t>(cols, 32); ++c) w[c] = 0.0f;  // an all-zero group
      if (rows * cols > 40) w[40] = 1e-40f;                                     // a subnormal
      const int64_t shape[2] = {static_cast<int64_t>(rows), static_cast<int64_t>(cols)};
      const auto bytes = std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(w.data()), w.size() * 4);
      const auto tensors = quant::quantize_weight("m", "m.weight", DType::F32, shape, bytes, so, pool);
      REQUIRE(tensors.size() == 3);
      std::vector<std::span<const uint8_t>> parts;
      for (const auto& t : tensors) parts.emplace_back(t.bytes);
      quant::QuantizedLinear l;
      l.module = "m";
      l.options = so;
      l.orig_dtype = DType::F32;
      l.shape = {shape[0], shape[1]};
      for (const auto& t : tensors) l.tensor_names.push_back(t.decl.name);
      l.tensor_parts = quant::scheme_parts(so);
      std::vector<float> out(rows * cols);
      quant::dequantize_weight(l, quant::tensor_bytes(l, parts), out.data(), pool);
      for (uint64_t r = 0; r < rows; ++r)
        for (uint64_t c = 0; c < cols; ++c)
          REQUIRE(out[r * cols + c] == expected_value(w.data() + r * cols, cols, c));
    }
  }
  for (const float bad : {NAN, INFINITY}) {
    std::vector<float> w(2 * 40, 0.5f);
    w[45] = bad;
    const int64_t shape[2] = {2, 40};
    const auto bytes = std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(w.data()), w.size() * 4);
    CHECK_THROWS_WITH_AS(quant::quantize_weight("m", "m.weight", DType::F32, shape, bytes, so, pool),
                         doctest::Contains("element (1, 5)"), Error);
  }
}

TEST_CASE("the test scheme goes through quantize, plan and the CPU verify") {
  test::TempDir dir("plugin-scheme");
  const auto bf16 = test::synth(dir.path, "tiny", 11);
  quant::SchemeOptions so;
  so.scheme = int4();
  quant::ConvertOptions co;
  co.n_threads = 2;
  const auto out = dir.path / "int4";
  const quant::ConvertReport report = quant::quantize_checkpoint(bf16, quant::config_for_scheme(so), out, co);
  CHECK(report.bytes_out < report.bytes_in);

  // The folder's config carries the scheme's loader config; the checkpoint is read back as int4_sym
  // linears of the original shapes.
  const auto cfg = read_json_file(out / "config.json");
  CHECK(cfg.at("quantization_config").at("quant_method") == "qtool");
  CHECK(cfg.at("quantization_config").at("scheme") == "int4_sym");
  const Checkpoint ckpt = Checkpoint::open(out);
  const Checkpoint orig = Checkpoint::open(bf16);
  size_t n_linears = 0;
  ThreadPool pool(2);
  for (const Component& c : ckpt.components()) {
    for (const quant::QuantizedLinear& l : quant::find_quantized_linears(c)) {
      ++n_linears;
      CHECK(l.options.scheme == so.scheme);
      const Component* oc = orig.find_component(c.name());
      REQUIRE(oc != nullptr);
      const auto e = oc->find(l.module + ".weight");
      REQUIRE(e.has_value());
      CHECK(oc->info(*e).shape == l.shape);
      // Dequantized, every element is the scheme's value of the original.
      std::vector<float> deq(l.numel()), ref(l.numel());
      quant::dequantize_weight(l, c, deq.data(), pool);
      convert_to_f32(oc->info(*e).dtype, oc->data(*e).data(), ref.data(), ref.size());
      const auto cols = static_cast<uint64_t>(l.cols());
      size_t wrong = 0;
      for (uint64_t i = 0; i < ref.size(); ++i)
        wrong += deq[i] != expected_value(ref.data() + i / cols * cols, cols, i % cols);
      CHECK_MESSAGE(wrong == 0, l.module);
    }
  }
  CHECK(n_linears > 0);

  // The plan names the scheme as the linears' kind and streams it.
  const planner::Plan plan = test::plan_streamed(ckpt, 0.3, 0.5);
  size_t int4_ops = 0;
  for (const auto& step : plan.schedule)
    for (const auto& op : step.linears) int4_ops += op.kind == "int4_sym";
  CHECK(int4_ops == n_linears);
  planner::write_plan(dir.path / "plan.json", plan);

  runner::VerifyOptions v;
  v.checkpoint = out;
  v.plan = dir.path / "plan.json";
  v.backend = "cpu";
  v.steps = 2;
  v.poison = true;
  v.threads = 2;
  const runner::VerifyReport r = runner::verify(v);
  if (!r.passed())
    for (const runner::CheckResult& c : r.checks)
      MESSAGE(c.name << ": " << std::string(runner::check_status_name(c.status)) << " " << c.detail);
  CHECK(r.passed());

  // The CUDA backend's dequantizer has no kernel for it: it refuses by name, before any launch.
  const Component& c0 = ckpt.components().front();
  const auto linears = quant::find_quantized_linears(c0);
  REQUIRE(!linears.empty());
  const runner::DequantParams p = runner::quantized_params(linears.front(), c0);
  CHECK(p.kind == runner::WeightKind::Host);
  CHECK_THROWS_WITH_AS(runner::require_device_kind(p), doctest::Contains("int4_sym"), Error);
}

}  // namespace qtool
