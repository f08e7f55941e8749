// The FluxPipeline's scheduler (pipeline.hpp): the sigmas FlowMatchEulerDiscreteScheduler gives
// for FluxPipeline's linspace and mu, bit for bit (values printed by diffusers 0.42:
// set_timesteps(sigmas=np.linspace(1, 1/N, N), mu=calculate_shift(seq_len))), the Euler step's
// roundings as torch computes them on the CPU, and the scheduler configs the runner refuses.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <random>

#include "qtool/formats/dtype.hpp"
#include "qtool/formats/error.hpp"
#include "qtool/runner/pipeline.hpp"
#include "runner_test_util.hpp"

using namespace qtool;
using namespace qtool::runner;

namespace {

FlowMatchConfig flux_dev() {
  FlowMatchConfig c;
  c.shift = 3.0;
  c.use_dynamic_shifting = true;
  return c;
}

void expect_sigmas(const FlowMatchSchedule& s, const std::vector<float>& want) {
  REQUIRE(s.sigmas.size() == want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    CAPTURE(i);
    CHECK(s.sigmas[i] == want[i]);
  }
  REQUIRE(s.timesteps.size() + 1 == want.size());
  for (size_t i = 0; i < s.timesteps.size(); ++i) CHECK(s.timesteps[i] == want[i] * 1000.0f);
}

}  // namespace

TEST_CASE("the sigmas are diffusers' for FluxPipeline's linspace and mu, bit for bit") {
  // FLUX.1-dev's config, 2 steps at 16 image tokens: mu = 0.459375.
  FlowMatchSchedule s = flow_match_schedule(flux_dev(), 2, 16);
  CHECK(s.mu == 0.459375);
  expect_sigmas(s, {0x1.0p+0f, 0x1.39c99p-1f, 0.0f});
  CHECK(s.timesteps[1] == 0x1.326ed6p+9f);
  // 28 steps at 4096 tokens (a 1024x1024 image): mu = max_shift.
  s = flow_match_schedule(flux_dev(), 28, 4096);
  CHECK(s.mu == doctest::Approx(1.15).epsilon(1e-15));
  expect_sigmas(s, {0x1.000000p+0f,
                    0x1.fa10b2p-1f,
                    0x1.f3d36ep-1f,
                    0x1.ed4208p-1f,
                    0x1.e655b2p-1f,
                    0x1.df06d2p-1f,
                    0x1.d74cf4p-1f,
                    0x1.cf1ea8p-1f,
                    0x1.c67156p-1f,
                    0x1.bd390ep-1f,
                    0x1.b36860p-1f,
                    0x1.a8f00cp-1f,
                    0x1.9dbeb2p-1f,
                    0x1.91c07ap-1f,
                    0x1.84de9ep-1f,
                    0x1.76fed0p-1f,
                    0x1.680296p-1f,
                    0x1.57c64ep-1f,
                    0x1.462036p-1f,
                    0x1.32dee2p-1f,
                    0x1.1dc786p-1f,
                    0x1.069382p-1f,
                    0x1.d9dab8p-2f,
                    0x1.a0d92ap-2f,
                    0x1.612014p-2f,
                    0x1.196c82p-2f,
                    0x1.904a80p-3f,
                    0x1.acefd2p-4f,
                    0.0f});
  // The linear time shift, 5 steps at 1000 tokens.
  FlowMatchConfig lin = flux_dev();
  lin.linear_time_shift = true;
  expect_sigmas(flow_match_schedule(lin, 5, 1000),
                {0x1.0p+0f, 0x1.6ddefp-1f, 0x1.efdep-2f, 0x1.2d7ec8p-2f, 0x1.151dap-3f, 0.0f});
  // A static shift of 3 (no dynamic shifting); and a single step.
  FlowMatchConfig fixed = flux_dev();
  fixed.use_dynamic_shifting = false;
  expect_sigmas(flow_match_schedule(fixed, 4, 16), {0x1.0p+0f, 0x1.ccccccp-1f, 0x1.8p-1f, 0x1.0p-1f, 0.0f});
  expect_sigmas(flow_match_schedule(fixed, 1, 16), {1.0f, 0.0f});
}

TEST_CASE("the Euler step rounds as torch does on the CPU: dt to the model dtype, the sum in float32") {
  const uint64_t seed = 20261205;
  std::printf("seed %llu\n", static_cast<unsigned long long>(seed));
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const float sigma = 0x1.39c99p-1f, next = 0.0f;  // dt = -0.6129..., not a bf16 value
  const float dt = next - sigma;
  REQUIRE(bf16_to_f32(f32_to_bf16(dt)) != dt);
  size_t differs_from_f32_dt = 0;
  for (DType dtype : {DType::BF16, DType::F16}) {
    const auto round = [&](float v) {
      return dtype == DType::BF16 ? bf16_to_f32(f32_to_bf16(v)) : f16_to_f32(f32_to_f16(v));
    };
    std::vector<float> latents(4099), sample(4099);
    for (size_t i = 0; i < latents.size(); ++i) {
      latents[i] = round(normal(rng));
      sample[i] = round(normal(rng));
    }
    // Edge values: zeros, a subnormal-ish product, the largest finite values.
    sample[0] = 0.0f;
    latents[1] = 0.0f;
    sample[2] = round(1e-30f);
    std::vector<float> got = latents;
    flow_match_euler_step(got, sample, sigma, next, dtype);
    for (size_t i = 0; i < got.size(); ++i) {
      const float want = round(latents[i] + round(round(dt) * sample[i]));
      CAPTURE(i);
      REQUIRE(got[i] == want);
      differs_from_f32_dt += got[i] != round(latents[i] + round(dt * sample[i]));
    }
    CHECK(got[0] == latents[0]);
  }
  // The rounding of dt is visible: the float32-dt step (CUDA's) gives other bits somewhere.
  CHECK(differs_from_f32_dt > 0);
}

TEST_CASE("scheduler configs the runner does not implement are refused, naming the key") {
  test::TempDir dir("scheduler");
  const auto write = [&](const std::string& body) {
    std::ofstream(dir.path / "scheduler_config.json") << body;
    return dir.path / "scheduler_config.json";
  };
  const auto refused = [&](const std::string& body, const std::string& key) {
    CAPTURE(body);
    try {
      read_flow_match_config(write(body));
      FAIL("accepted");
    } catch (const Error& e) {
      CHECK(e.kind() == ErrorKind::InvalidInput);
      CHECK(std::string(e.what()).find(key) != std::string::npos);
    }
  };
  const std::string head = R"({"_class_name": "FlowMatchEulerDiscreteScheduler", )";
  const FlowMatchConfig ok = read_flow_match_config(
      write(head + R"("shift": 3.0, "use_dynamic_shifting": true, "base_image_seq_len": 256,
                      "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15, "shift_terminal": null})"));
  CHECK(ok.use_dynamic_shifting);
  CHECK(ok.shift == 3.0);
  CHECK(ok.num_train_timesteps == 1000);
  refused(R"({"_class_name": "EulerDiscreteScheduler"})", "_class_name");
  refused(head + R"("use_karras_sigmas": true})", "use_karras_sigmas");
  refused(head + R"("stochastic_sampling": true})", "stochastic_sampling");
  refused(head + R"("invert_sigmas": true})", "invert_sigmas");
  refused(head + R"("shift_terminal": 0.1})", "shift_terminal");
  refused(head + R"("time_shift_type": "cosine"})", "time_shift_type");
  refused(head + R"("shift": "three"})", "shift");
  refused(head + R"("use_dynamic_shifting": true, "base_image_seq_len": 8, "max_image_seq_len": 8})",
          "max_image_seq_len");
  refused("[1, 2]", "JSON object");
}
