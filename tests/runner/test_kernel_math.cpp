// The scalar arithmetic shared by the CPU backend and the CUDA kernels: conversions must agree
// with formats' exact conversions bit for bit, activations and digests must be deterministic.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "qtool/formats/dtype.hpp"
#include "qtool/runner/cpu_kernels.hpp"
#include "qtool/runner/dequant.hpp"
#include "qtool/runner/kernel_math.hpp"

using namespace qtool;
using namespace qtool::runner;

namespace {

uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

}  // namespace

TEST_CASE("fp8 and f16 decoders equal formats' conversions on every code") {
  for (int v = 0; v < 256; ++v) {
    CAPTURE(v);
    CHECK(bits(dq::e4m3_to_f32(static_cast<uint8_t>(v))) == bits(fp8_e4m3_to_f32(static_cast<uint8_t>(v))));
    CHECK(bits(dq::e5m2_to_f32(static_cast<uint8_t>(v))) == bits(fp8_e5m2_to_f32(static_cast<uint8_t>(v))));
  }
  for (uint32_t h = 0; h < 65536; ++h) {
    if (bits(dq::f16_to_f32(static_cast<uint16_t>(h))) != bits(f16_to_f32(static_cast<uint16_t>(h)))) {
      CAPTURE(h);
      FAIL("f16 decode differs");
    }
  }
}

TEST_CASE("bf16 rounding equals formats' f32_to_bf16, specials and ties included") {
  const uint32_t seed = 0x5eed01;
  std::printf("seed %u\n", seed);
  std::mt19937 rng(seed);
  std::vector<uint32_t> cases = {0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000,
                                 0x7F800001, 0xFFBFFFFF, 0x3F808000, 0x3F818000, 0x3F80C000, 0x00008000,
                                 0x00018000, 0x7F7FFFFF, 0x7F7F8000, 0x007FFFFF, 0x00000001};
  for (int i = 0; i < 200000; ++i) cases.push_back(rng());
  for (uint32_t u : cases) {
    if (kmath::f32_to_bf16_bits(from_bits(u)) != f32_to_bf16(from_bits(u))) {
      CAPTURE(u);
      FAIL("bf16 rounding differs");
    }
  }
}

TEST_CASE("x86 NaN rules: first NaN operand quieted, default NaN for invalid operations") {
  const float snan = from_bits(0x7FA00000);
  const float neg_qnan = from_bits(0xFFC12345);
  CHECK(bits(kmath::x86_mul(snan, 2.0f)) == 0x7FE00000u);
  CHECK(bits(kmath::x86_mul(2.0f, neg_qnan)) == 0xFFC12345u);
  CHECK(bits(kmath::x86_mul(neg_qnan, snan)) == 0xFFC12345u);
  CHECK(bits(kmath::x86_mul(0.0f, INFINITY)) == 0xFFC00000u);
  CHECK(bits(kmath::x86_add(INFINITY, -INFINITY)) == 0xFFC00000u);
  CHECK(kmath::x86_mul(3.0f, 0.5f) == 1.5f);
  CHECK(kmath::x86_add(1.0f, from_bits(0x33800000)) == 1.0f);  // ties to even
}

TEST_CASE("activations are deterministic, bf16, in [-1, 1) and centred") {
  const uint64_t seed = 1234;
  std::printf("seed %llu\n", static_cast<unsigned long long>(seed));
  ThreadPool pool(2);
  const uint64_t tokens = 37, width = 129;
  std::vector<uint16_t> a(tokens * width), b(tokens * width), c(tokens * width);
  const uint64_t s = kmath::activation_stream(seed);
  cpu::generate_activation(s, tokens, width, 0, width, a.data(), pool);
  // Made in two column ranges: the same values (a GPU fills the columns a peer copy lacks).
  cpu::generate_activation(s, tokens, width, 0, 50, b.data(), pool);
  cpu::generate_activation(s, tokens, width, 50, width, b.data(), pool);
  cpu::generate_activation(kmath::activation_stream(seed + 1), tokens, width, 0, width, c.data(), pool);
  CHECK(a == b);
  CHECK(a != c);
  // A narrower hidden state holds the same values in its columns.
  std::vector<uint16_t> narrow(tokens * 40);
  cpu::generate_activation(s, tokens, 40, 0, 40, narrow.data(), pool);
  for (uint64_t t = 0; t < tokens; ++t)
    for (uint64_t k = 0; k < 40; ++k) REQUIRE(narrow[t * 40 + k] == a[t * width + k]);
  double sum = 0, sum_sq = 0;
  for (uint16_t h : a) {
    const float v = kmath::bf16_bits_to_f32(h);
    REQUIRE(v >= -1.0f);
    REQUIRE(v <= 1.0f);  // rounding to bf16 may reach 1.0
    sum += v;
    sum_sq += static_cast<double>(v) * v;
  }
  const double n = static_cast<double>(a.size());
  CHECK(std::fabs(sum / n) < 0.05);
  CHECK(std::fabs(sum_sq / n - 1.0 / 3.0) < 0.03);  // variance of U(-1, 1)
}

TEST_CASE("digest is order-independent and sees every bit") {
  const uint32_t seed = 99;
  std::printf("seed %u\n", seed);
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  std::vector<uint16_t> y(1001);
  for (auto& v : y) v = f32_to_bf16(nd(rng));
  const cpu::Digest d = cpu::digest(y.data(), y.size());
  // Summing the word terms in reverse gives the same digest (the last word holds one element).
  uint64_t reversed = 0;
  for (size_t k = (y.size() + 1) / 2; k-- > 0;) {
    const uint32_t word = y[2 * k] | (2 * k + 1 < y.size() ? static_cast<uint32_t>(y[2 * k + 1]) << 16 : 0u);
    reversed += kmath::digest_term(k, word);
  }
  CHECK(reversed == d.hash);
  // The last, unpaired element counts.
  {
    auto z = y;
    z.back() = static_cast<uint16_t>(z.back() ^ 1);
    CHECK(cpu::digest(z.data(), z.size()).hash != d.hash);
  }
  CHECK(d.nonfinite == 0);
  for (size_t i : {size_t{0}, size_t{500}, size_t{1000}}) {
    for (int bit : {0, 7, 15}) {
      auto z = y;
      z[i] = static_cast<uint16_t>(z[i] ^ (1u << bit));
      CHECK(cpu::digest(z.data(), z.size()).hash != d.hash);
    }
  }
  // Swapping two different values changes it (positions are part of the digest).
  auto z = y;
  REQUIRE(z[3] != z[4]);
  std::swap(z[3], z[4]);
  CHECK(cpu::digest(z.data(), z.size()).hash != d.hash);
  z = y;
  z[7] = 0x7FC0;  // NaN
  z[8] = 0xFF80;  // -inf
  CHECK(cpu::digest(z.data(), z.size()).nonfinite == 2);
}

TEST_CASE("CPU GEMM matches a float64 reference at odd sizes") {
  const uint32_t seed = 7;
  std::printf("seed %u\n", seed);
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  ThreadPool pool(2);
  for (uint64_t tokens : {1, 3, 16}) {
    for (uint64_t in : {1, 7, 8, 17, 64, 133}) {
      for (uint64_t out : {1, 5, 33}) {
        std::vector<uint16_t> x(tokens * in), w(out * in);
        for (auto& v : x) v = f32_to_bf16(nd(rng));
        for (auto& v : w) v = f32_to_bf16(nd(rng));
        // x with a row stride wider than `in`, as the hidden state is.
        const uint64_t ldx = in + 3;
        std::vector<uint16_t> xs(tokens * ldx, 0x7FC0);
        for (uint64_t t = 0; t < tokens; ++t)
          for (uint64_t k = 0; k < in; ++k) xs[t * ldx + k] = x[t * in + k];
        std::vector<uint16_t> y(tokens * out, 0x7FC0);
        cpu::gemm_bf16(xs.data(), ldx, w.data(), y.data(), tokens, in, out, pool);
        for (uint64_t t = 0; t < tokens; ++t) {
          for (uint64_t o = 0; o < out; ++o) {
            double ref = 0, mag = 0;
            for (uint64_t k = 0; k < in; ++k) {
              const double p = static_cast<double>(bf16_to_f32(x[t * in + k])) * bf16_to_f32(w[o * in + k]);
              ref += p;
              mag += std::fabs(p);
            }
            CAPTURE(tokens);
            CAPTURE(in);
            CAPTURE(out);
            // fp32 accumulation, then one rounding to bf16 (half a bf16 ulp, 2^-8 relative).
            const double got = bf16_to_f32(y[t * out + o]);
            REQUIRE(std::fabs(got - ref) <= std::fabs(ref) * (1.0 / 256) + 1e-6 * mag + 1e-30);
          }
        }
      }
    }
  }
}
