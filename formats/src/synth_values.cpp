// Values of synthetic tensors: a counter-based generator (splitmix64's mixer over
// key + counter * golden ratio), so element i of a tensor depends only on (seed, name, i).
// Normals come from Box-Muller with branch-free float approximations of log, sin and cos,
// computed in aligned blocks of kBlockElems elements so every element is produced by the same
// instructions whatever range is asked for.
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>

#include "qtool/formats/error.hpp"
#include "qtool/formats/synth.hpp"

#if defined(__GNUC__)
#define QTOOL_SYNTH_INLINE inline __attribute__((always_inline))
#else
#define QTOOL_SYNTH_INLINE inline
#endif

namespace qtool {
namespace {

constexpr uint64_t kGamma = 0x9E3779B97F4A7C15ull;

constexpr uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

constexpr uint64_t bits_at(uint64_t key, uint64_t counter) { return mix64(key + counter * kGamma); }

// Sub-streams of one tensor's key.
constexpr uint64_t kRowStream = 0x726f772d7363616cull;      // per-row scales
constexpr uint64_t kOutlierStream = 0x6f75746c69657273ull;  // outlier counts and positions

constexpr float kLn2 = 0.693147180559945309f;
constexpr float kHalfPi = 1.57079632679489662f;

// ln(u) for u in (0, 1], |error| < 2e-7: u = m * 2^e with m in [sqrt(1/2), sqrt(2)),
// ln m = 2 atanh((m - 1) / (m + 1)) by its series.
QTOOL_SYNTH_INLINE float log_unit(float u) {
  uint32_t bits = std::bit_cast<uint32_t>(u);
  int32_t e = static_cast<int32_t>(bits >> 23) - 127;
  uint32_t mant = (bits & 0x7FFFFFu) | 0x3F800000u;
  const uint32_t big = mant > 0x3FB504F3u ? 1u : 0u;  // m > sqrt(2): halve it
  mant -= big << 23;
  e += static_cast<int32_t>(big);
  const float m = std::bit_cast<float>(mant);
  const float f = (m - 1.0f) / (m + 1.0f);
  const float f2 = f * f;
  const float series = 1.0f + f2 * (1.0f / 3 + f2 * (1.0f / 5 + f2 * (1.0f / 7 + f2 * (1.0f / 9))));
  return static_cast<float>(e) * kLn2 + 2.0f * f * series;
}

// sin and cos of x in [0, pi/2) by Taylor polynomials (|error| < 1e-7).
QTOOL_SYNTH_INLINE float sin_quarter(float x) {
  const float x2 = x * x;
  return x * (1.0f +
              x2 * (-1.0f / 6 + x2 * (1.0f / 120 +
                                      x2 * (-1.0f / 5040 + x2 * (1.0f / 362880 + x2 * (-1.0f / 39916800))))));
}
QTOOL_SYNTH_INLINE float cos_quarter(float x) {
  const float x2 = x * x;
  return 1.0f +
         x2 * (-0.5f + x2 * (1.0f / 24 +
                             x2 * (-1.0f / 720 +
                                   x2 * (1.0f / 40320 + x2 * (-1.0f / 3628800 + x2 * (1.0f / 479001600))))));
}

// sqrt(x) for x >= 0 (relative error < 3e-7): an estimate of 1/sqrt(x) from the bits, two
// Newton steps, times x. Plain arithmetic, unlike std::sqrt (which may set errno), so loops
// using it vectorize.
QTOOL_SYNTH_INLINE float sqrt_nonneg(float x) {
  float y = std::bit_cast<float>(0x5F375A86u - (std::bit_cast<uint32_t>(x) >> 1));
  const float half_x = 0.5f * x;
  y = y * (1.5f - half_x * y * y);
  y = y * (1.5f - half_x * y * y);
  return x * y;
}

// One pair of independent standard normals from a 64-bit hash: a radius from its top 24 bits,
// an angle in the first quadrant from 22 bits of the low word, and two sign bits that reflect
// it into all four. Integer-to-float conversions are from 32-bit values and signs are applied
// by flipping the sign bit, so the block loop below vectorizes.
QTOOL_SYNTH_INLINE void normal_pair(uint32_t hi, uint32_t lo, float& z0, float& z1) {
  const float u = static_cast<float>(static_cast<int32_t>(hi >> 8) + 1) * 0x1p-24f;  // (0, 1], exact
  const float r = sqrt_nonneg(-2.0f * log_unit(u));
  const float theta = static_cast<float>(static_cast<int32_t>(lo >> 10)) * (kHalfPi * 0x1p-22f);
  const uint32_t c = std::bit_cast<uint32_t>(r * cos_quarter(theta)) ^ ((lo & 1u) << 31);
  const uint32_t s = std::bit_cast<uint32_t>(r * sin_quarter(theta)) ^ ((lo & 2u) << 30);
  z0 = std::bit_cast<float>(c);
  z1 = std::bit_cast<float>(s);
}

constexpr uint64_t kBlockPairs = 64;
constexpr uint64_t kBlockElems = 2 * kBlockPairs;

// Standard normals of elements [block * kBlockElems, (block + 1) * kBlockElems).
void normal_block(uint64_t key, uint64_t block, float* out) {
  uint32_t hi[kBlockPairs], lo[kBlockPairs];
  const uint64_t pair0 = block * kBlockPairs;
  for (uint64_t i = 0; i < kBlockPairs; ++i) {
    const uint64_t h = bits_at(key, pair0 + i);
    hi[i] = static_cast<uint32_t>(h >> 32);
    lo[i] = static_cast<uint32_t>(h);
  }
  float z0[kBlockPairs], z1[kBlockPairs];
  for (uint64_t i = 0; i < kBlockPairs; ++i) normal_pair(hi[i], lo[i], z0[i], z1[i]);
  for (uint64_t i = 0; i < kBlockPairs; ++i) {
    out[2 * i] = z0[i];
    out[2 * i + 1] = z1[i];
  }
}

// Standard normals of elements [begin, end) into out.
void fill_normals(uint64_t key, uint64_t begin, uint64_t end, float* out) {
  float tmp[kBlockElems];
  uint64_t i = begin;
  while (i < end) {
    const uint64_t block = i / kBlockElems, off = i % kBlockElems;
    const uint64_t n = std::min(end - i, kBlockElems - off);
    if (off == 0 && n == kBlockElems) {
      normal_block(key, block, out + (i - begin));
    } else {
      normal_block(key, block, tmp);
      std::memcpy(out + (i - begin), tmp + off, n * sizeof(float));
    }
    i += n;
  }
}

inline double uniform53(uint64_t h) { return static_cast<double>(h >> 11) * 0x1p-53; }

constexpr double kRowSigma = 0.35;     // log-normal spread of per-row scales
constexpr double kOutlierRate = 1e-4;  // fraction of elements replaced by outliers
constexpr uint64_t kOutlierBlock = 1u << 16;
constexpr uint64_t kMaxOutliersPerBlock = 63;
constexpr float kNormSpread = 0.05f;
constexpr float kBiasStd = 0.02f;

// The standard deviation of row r of a weight with fan-in `fan_in`.
float row_std(uint64_t key, uint64_t r, double inv_sqrt_fan_in) {
  const uint64_t h = bits_at(key ^ kRowStream, r);
  float z0, z1;
  normal_pair(static_cast<uint32_t>(h >> 32), static_cast<uint32_t>(h), z0, z1);
  return static_cast<float>(std::exp(kRowSigma * static_cast<double>(z0)) * inv_sqrt_fan_in);
}

}  // namespace

uint64_t synth_tensor_key(uint64_t seed, std::string_view tensor_name) {
  uint64_t h = 0xcbf29ce484222325ull;  // FNV-1a 64
  for (char c : tensor_name) {
    h ^= static_cast<uint8_t>(c);
    h *= 0x100000001b3ull;
  }
  return mix64(h ^ mix64(seed + kGamma));
}

void synth_fill(const SynthTensor& t, uint64_t seed, uint64_t begin, uint64_t end, float* out) {
  uint64_t numel = 1;
  for (int64_t d : t.decl.shape) numel *= static_cast<uint64_t>(d);
  QTOOL_ASSERT_MSG(begin <= end && end <= numel, "tensor '", t.decl.name, "': range [", begin, ", ", end,
                   ") of ", numel);
  if (begin == end) return;
  const uint64_t key = synth_tensor_key(seed, t.decl.name);
  fill_normals(key, begin, end, out);
  const uint64_t n = end - begin;

  if (t.init == SynthInit::NormWeight) {
    for (uint64_t i = 0; i < n; ++i) out[i] = 1.0f + kNormSpread * out[i];
    return;
  }
  if (t.init == SynthInit::Bias) {
    for (uint64_t i = 0; i < n; ++i) out[i] *= kBiasStd;
    return;
  }

  // Weight: rows are the first dimension, the fan-in everything after it.
  const uint64_t rows = t.decl.shape.empty() ? 1 : static_cast<uint64_t>(t.decl.shape[0]);
  const uint64_t row_len = numel / rows;
  const double inv_sqrt_fan_in = 1.0 / std::sqrt(static_cast<double>(row_len));
  for (uint64_t r = begin / row_len; r * row_len < end; ++r) {
    const uint64_t lo = std::max(begin, r * row_len), hi = std::min(end, (r + 1) * row_len);
    const float s = row_std(key, r, inv_sqrt_fan_in);
    float* p = out + (lo - begin);
    for (uint64_t i = 0; i < hi - lo; ++i) p[i] *= s;
  }

  // Outliers: per block of kOutlierBlock elements, a Poisson count at kOutlierRate, positions
  // uniform in the block, magnitudes U(10, 50) times the row's standard deviation.
  const uint64_t okey = key ^ kOutlierStream;
  for (uint64_t b = begin / kOutlierBlock; b * kOutlierBlock < end; ++b) {
    const uint64_t b0 = b * kOutlierBlock, len = std::min(numel - b0, kOutlierBlock);
    const double lambda = static_cast<double>(len) * kOutlierRate;
    const double u = uniform53(bits_at(okey, b * (kMaxOutliersPerBlock + 1)));
    double p = std::exp(-lambda), cdf = p;
    uint64_t k = 0;
    while (u > cdf && k < kMaxOutliersPerBlock) {
      ++k;
      p *= lambda / static_cast<double>(k);
      cdf += p;
    }
    for (uint64_t j = 1; j <= k; ++j) {
      const uint64_t h = bits_at(okey, b * (kMaxOutliersPerBlock + 1) + j);
      const uint64_t pos = b0 + (((h >> 32) * len) >> 32);
      if (pos < begin || pos >= end) continue;
      const float mag = 10.0f + 40.0f * static_cast<float>(h & 0xFFFFFFu) * 0x1p-24f;
      const float sign = (h >> 24) & 1 ? -1.0f : 1.0f;
      out[pos - begin] = sign * mag * row_std(key, pos / row_len, inv_sqrt_fan_in);
    }
  }
}

}  // namespace qtool
