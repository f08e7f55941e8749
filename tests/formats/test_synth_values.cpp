// Values of synthetic tensors: deterministic from (seed, name, index) whatever the range split,
// and distributed like trained weights (normal rows with varying scales, rare outliers; norms
// near 1; small biases), not like uniform noise.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "formats_test_util.hpp"
#include "qtool/formats/synth.hpp"

using qtool::DType;
using qtool::SynthInit;
using qtool::SynthTensor;

namespace {

SynthTensor tensor(const std::string& name, std::vector<int64_t> shape, SynthInit init = SynthInit::Weight) {
  return SynthTensor{qtool::TensorDecl{name, DType::F32, std::move(shape)}, init};
}

uint64_t numel(const SynthTensor& t) {
  uint64_t n = 1;
  for (int64_t d : t.decl.shape) n *= static_cast<uint64_t>(d);
  return n;
}

std::vector<float> fill_all(const SynthTensor& t, uint64_t seed) {
  std::vector<float> v(numel(t));
  qtool::synth_fill(t, seed, 0, v.size(), v.data());
  return v;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

}  // namespace

TEST_CASE("synth values: any split of a tensor into ranges gives the same bits") {
  const uint64_t seed = qtool::test::test_seed("synth split");
  std::mt19937_64 rng(seed);
  // Odd shapes, so ranges cross rows, generator blocks and outlier blocks at odd places.
  for (const auto& t : {tensor("a.weight", {333, 1031}), tensor("b.weight", {7, 3, 3, 3}),
                        tensor("c.bias", {1000}, SynthInit::Bias), tensor("d.weight", {65536 * 3 + 17, 1}),
                        tensor("e.weight", {1}), tensor("n.weight", {513}, SynthInit::NormWeight)}) {
    CAPTURE(t.decl.name);
    const auto whole = fill_all(t, seed);
    for (int trial = 0; trial < 20; ++trial) {
      std::vector<float> pieces(whole.size(), std::nanf(""));
      uint64_t pos = 0;
      while (pos < whole.size()) {
        const uint64_t len = std::min<uint64_t>(whole.size() - pos, 1 + rng() % 300'000);
        qtool::synth_fill(t, seed, pos, pos + len, pieces.data() + pos);
        pos += len;
      }
      REQUIRE(same_bits(whole, pieces));
    }
  }
}

TEST_CASE("synth values: the seed and the tensor name select the values") {
  const uint64_t seed = qtool::test::test_seed("synth seed");
  const auto t = tensor("layers.0.q.weight", {64, 64});
  CHECK(same_bits(fill_all(t, seed), fill_all(t, seed)));
  CHECK_FALSE(same_bits(fill_all(t, seed), fill_all(t, seed + 1)));
  CHECK_FALSE(same_bits(fill_all(t, seed), fill_all(tensor("layers.1.q.weight", {64, 64}), seed)));
  // Values are a function of the index, not of the shape: a prefix stays the same.
  const auto longer = fill_all(tensor("x.bias", {300}, SynthInit::Bias), seed);
  const auto shorter = fill_all(tensor("x.bias", {100}, SynthInit::Bias), seed);
  CHECK(std::memcmp(longer.data(), shorter.data(), 100 * sizeof(float)) == 0);
}

TEST_CASE("synth values: weights look trained (normal rows, varying row scales, rare outliers)") {
  const uint64_t seed = qtool::test::test_seed("synth stats");
  const int64_t rows = 1024, cols = 4096;
  const auto t = tensor("blocks.3.mlp.fc1.weight", {rows, cols});
  const auto w = fill_all(t, seed);
  for (float x : w) REQUIRE(std::isfinite(x));

  // Per row: a robust scale (median absolute deviation), then the values in units of it.
  std::vector<double> row_std(rows);
  double sum = 0, n_outliers = 0;
  double within1 = 0, within2 = 0, m2 = 0, m4 = 0, n_normal = 0;
  for (int64_t r = 0; r < rows; ++r) {
    std::vector<float> a(w.begin() + r * cols, w.begin() + (r + 1) * cols);
    for (float& x : a) x = std::abs(x);
    std::nth_element(a.begin(), a.begin() + cols / 2, a.end());
    const double sigma = a[cols / 2] / 0.6744897501960817;  // MAD of a normal
    row_std[r] = sigma;
    for (int64_t c = 0; c < cols; ++c) {
      const double x = w[r * cols + c];
      sum += x;
      const double z = x / sigma;
      if (std::abs(z) > 8.0) {  // a normal gives |z| > 8 with probability 1e-15
        ++n_outliers;
        CHECK(std::abs(z) < 60.0);
        continue;
      }
      ++n_normal;
      within1 += std::abs(z) < 1.0;
      within2 += std::abs(z) < 2.0;
      m2 += z * z;
      m4 += z * z * z * z;
    }
  }
  const double n = static_cast<double>(rows * cols);
  // Mean ~ 0 (weights have std ~ 1/sqrt(4096) = 0.0156, so this is ~5 standard errors).
  CHECK(std::abs(sum / n) < 5 * 0.02 / std::sqrt(n));
  // Normal within rows: 68.3% within 1 sigma, 95.4% within 2; kurtosis 3 (a uniform gives 1.8
  // and 57.7% within 1 sigma).
  CHECK(within1 / n_normal == doctest::Approx(0.6827).epsilon(0.01));
  CHECK(within2 / n_normal == doctest::Approx(0.9545).epsilon(0.005));
  const double kurtosis = (m4 / n_normal) / std::pow(m2 / n_normal, 2);
  CHECK(kurtosis == doctest::Approx(3.0).epsilon(0.03));
  // The overall scale is 1/sqrt(fan_in) (geometric mean of row scales).
  double log_sum = 0;
  for (double s : row_std) log_sum += std::log(s);
  CHECK(std::exp(log_sum / rows) == doctest::Approx(1.0 / std::sqrt(cols)).epsilon(0.05));
  // Row scales vary (log-normal, sigma 0.35): spread of log scales and max/min ratio.
  double log_var = 0;
  for (double s : row_std) log_var += std::pow(std::log(s) - log_sum / rows, 2);
  CHECK(std::sqrt(log_var / rows) == doctest::Approx(0.35).epsilon(0.15));
  CHECK(*std::max_element(row_std.begin(), row_std.end()) /
            *std::min_element(row_std.begin(), row_std.end()) >
        3.0);
  // Outliers: about 1e-4 of the elements (419 expected here).
  CHECK(n_outliers > 0.5e-4 * n);
  CHECK(n_outliers < 2e-4 * n);
}

TEST_CASE("synth values: norms near 1, biases small, conv rows scaled by their fan-in") {
  const uint64_t seed = qtool::test::test_seed("synth kinds");
  auto moments = [](const std::vector<float>& v) {
    double s = 0, s2 = 0;
    for (float x : v) s += x;
    const double mean = s / static_cast<double>(v.size());
    for (float x : v) s2 += (x - mean) * (x - mean);
    return std::make_pair(mean, std::sqrt(s2 / static_cast<double>(v.size())));
  };
  const auto [nm, ns] = moments(fill_all(tensor("norm.weight", {100000}, SynthInit::NormWeight), seed));
  CHECK(nm == doctest::Approx(1.0).epsilon(0.002));
  CHECK(ns == doctest::Approx(0.05).epsilon(0.05));
  const auto [bm, bs] = moments(fill_all(tensor("proj.bias", {100000}, SynthInit::Bias), seed));
  CHECK(std::abs(bm) < 0.001);
  CHECK(bs == doctest::Approx(0.02).epsilon(0.05));
  // A conv [out, in, 3, 3]: fan-in in * 9.
  const auto [cm, cs] = moments(fill_all(tensor("conv.weight", {256, 128, 3, 3}), seed));
  CHECK(std::abs(cm) < 0.001);
  // RMS of row scales exp(0.35 z) is exp(0.35^2) = 1.13; outliers add a little.
  CHECK(cs * std::sqrt(128.0 * 9) == doctest::Approx(1.13).epsilon(0.15));
}
