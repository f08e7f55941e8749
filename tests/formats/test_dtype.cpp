// Dtype conversions against an independent formulation: every code of every narrow float format is
// decoded in double arithmetic from its fields, and float32 -> narrow rounding is checked against
// a nearest-value search over the sorted table of all values (ties to the even code).
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "formats_test_util.hpp"
#include "qtool/formats/dtype.hpp"

namespace qtool {
namespace {

struct Format {
  const char* name;
  int exp_bits;
  int man_bits;
  int bias;
  uint32_t max_finite;  // largest finite positive code
  uint32_t overflow;    // the code of values beyond the finite range (inf, or NaN for e4m3fn)
  bool ieee_special;    // all-ones exponent is inf/NaN (false: e4m3fn, where only S.1111.111 is NaN)
};

constexpr Format kF16{"F16", 5, 10, 15, 0x7BFF, 0x7C00, true};
constexpr Format kBF16{"BF16", 8, 7, 127, 0x7F7F, 0x7F80, true};
constexpr Format kE4M3{"F8_E4M3", 4, 3, 7, 0x7E, 0x7F, false};
constexpr Format kE5M2{"F8_E5M2", 5, 2, 15, 0x7B, 0x7C, true};

uint32_t sign_bit(const Format& f) { return 1u << (f.exp_bits + f.man_bits); }

// The value of a code from its fields, in double arithmetic, as if every exponent were finite.
double field_value(const Format& f, uint32_t code) {
  const uint32_t man = code & ((1u << f.man_bits) - 1);
  const uint32_t exp = (code >> f.man_bits) & ((1u << f.exp_bits) - 1);
  double m = static_cast<double>(man) / static_cast<double>(1u << f.man_bits);
  int e = static_cast<int>(exp) - f.bias;
  if (exp == 0)
    e = 1 - f.bias;  // subnormal
  else
    m += 1.0;
  double scale = 1.0;
  for (int i = 0; i < std::abs(e); ++i) scale = e > 0 ? scale * 2.0 : scale * 0.5;
  const double v = m * scale;
  return (code & sign_bit(f)) ? -v : v;
}

bool is_nan_code(const Format& f, uint32_t code) {
  const uint32_t mag = code & (sign_bit(f) - 1);
  if (!f.ieee_special) return mag == f.overflow;
  return mag > f.overflow;
}
bool is_inf_code(const Format& f, uint32_t code) {
  return f.ieee_special && (code & (sign_bit(f) - 1)) == f.overflow;
}

float decode(const Format& f, uint32_t code) {
  if (&f == &kF16) return f16_to_f32(static_cast<uint16_t>(code));
  if (&f == &kBF16) return bf16_to_f32(static_cast<uint16_t>(code));
  if (&f == &kE4M3) return fp8_e4m3_to_f32(static_cast<uint8_t>(code));
  return fp8_e5m2_to_f32(static_cast<uint8_t>(code));
}
uint32_t encode(const Format& f, float x) {
  if (&f == &kF16) return f32_to_f16(x);
  if (&f == &kBF16) return f32_to_bf16(x);
  if (&f == &kE4M3) return f32_to_fp8_e4m3(x);
  return f32_to_fp8_e5m2(x);
}

// Round to nearest, ties to the even code, over the table of non-negative values; beyond the last
// finite value the next code (the overflow code) is a value like any other.
class RefEncoder {
 public:
  explicit RefEncoder(const Format& f) : f_(f) {
    for (uint32_t c = 0; c <= f.overflow; ++c) values_.push_back(field_value(f, c));
  }
  // Returns the expected code, or nullopt when the result must be a NaN.
  std::optional<uint32_t> operator()(float x) const {
    if (std::isnan(x)) return std::nullopt;
    const uint32_t sign = std::signbit(x) ? sign_bit(f_) : 0;
    const double a = std::fabs(static_cast<double>(x));
    uint32_t code;
    if (a >= values_.back()) {
      code = f_.overflow;
    } else {
      const auto it = std::upper_bound(values_.begin(), values_.end(), a);  // first value > a
      const uint32_t hi = static_cast<uint32_t>(it - values_.begin());
      const uint32_t lo = hi - 1;
      const double dlo = a - values_[lo], dhi = values_[hi] - a;
      if (dlo < dhi)
        code = lo;
      else if (dhi < dlo)
        code = hi;
      else
        code = (lo % 2 == 0) ? lo : hi;
    }
    if (is_nan_code(f_, code)) return std::nullopt;
    return sign | code;
  }
  const std::vector<double>& values() const { return values_; }

 private:
  const Format& f_;
  std::vector<double> values_;
};

void check_encode(const Format& f, const RefEncoder& ref, float x) {
  const auto want = ref(x);
  const uint32_t got = encode(f, x);
  if (!want) {
    INFO(f.name, " x=", x);
    CHECK(is_nan_code(f, got));
    return;
  }
  if (got != *want) {
    uint32_t bits;
    std::memcpy(&bits, &x, 4);
    FAIL_CHECK(f.name, ": f32 ", x, " (bits 0x", std::hex, bits, ") encoded 0x", got, ", expected 0x", *want);
  }
}

void check_format(const Format& f) {
  const uint32_t n_codes = sign_bit(f) << 1;
  // Every code decodes to its field value and re-encodes to itself.
  size_t bad = 0;
  for (uint32_t c = 0; c < n_codes; ++c) {
    const float v = decode(f, c);
    if (is_nan_code(f, c)) {
      if (!std::isnan(v) || !std::isnan(decode(f, encode(f, v)))) ++bad;
      continue;
    }
    const double want = is_inf_code(f, c) ? ((c & sign_bit(f)) ? -INFINITY : INFINITY) : field_value(f, c);
    if (static_cast<double>(v) != want || std::signbit(v) != ((c & sign_bit(f)) != 0)) ++bad;
    if (encode(f, v) != c) ++bad;
  }
  CHECK_MESSAGE(bad == 0, f.name, ": ", bad, " codes failed the decode/round-trip check");

  const RefEncoder ref(f);
  const auto& vals = ref.values();
  // Exact ties (midpoints), and the floats just either side of them, for both signs.
  for (size_t i = 0; i + 1 < vals.size(); ++i) {
    const double mid = (vals[i] + vals[i + 1]) / 2;
    const float m = static_cast<float>(mid);
    if (static_cast<double>(m) != mid) continue;  // not a float: cannot be a tie in f32 input
    for (float x : {m, std::nextafter(m, 0.0f), std::nextafter(m, INFINITY), static_cast<float>(vals[i])}) {
      check_encode(f, ref, x);
      check_encode(f, ref, -x);
    }
  }
  // Specials and extremes.
  for (float x : {0.0f, -0.0f, INFINITY, -INFINITY, std::numeric_limits<float>::quiet_NaN(),
                  -std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::max(),
                  std::numeric_limits<float>::min(), std::numeric_limits<float>::denorm_min(), 1e-30f, 1e30f})
    check_encode(f, ref, x);
  // Random float32 bit patterns (all of them: NaNs, subnormals, huge) and random values in range.
  std::mt19937_64 rng(test::test_seed(f.name));
  std::uniform_real_distribution<double> in_range(-1.2 * vals.back(), 1.2 * vals.back());
  for (int i = 0; i < 200000; ++i) {
    const uint32_t bits = static_cast<uint32_t>(rng());
    float x;
    std::memcpy(&x, &bits, 4);
    check_encode(f, ref, x);
    check_encode(f, ref, static_cast<float>(in_range(rng)));
    check_encode(f, ref, static_cast<float>(in_range(rng) * 1e-4));
  }
}

TEST_CASE("F16: every code decodes exactly and round-trips; f32 -> f16 rounds to nearest even") {
  check_format(kF16);
}
TEST_CASE("BF16: every code decodes exactly and round-trips; f32 -> bf16 rounds to nearest even") {
  check_format(kBF16);
}
TEST_CASE("F8_E4M3: every code decodes exactly and round-trips; f32 -> e4m3fn rounds to nearest even") {
  check_format(kE4M3);
}
TEST_CASE("F8_E5M2: every code decodes exactly and round-trips; f32 -> e5m2 rounds to nearest even") {
  check_format(kE5M2);
}

TEST_CASE("narrow float edge cases from FORMATS.md") {
  // RNE ties: 1 + 2^-8 lies halfway between bf16 1.0 (even) and 1 + 2^-7 (odd).
  CHECK(f32_to_bf16(1.0f + std::ldexp(1.0f, -8)) == 0x3F80);
  CHECK(f32_to_bf16(1.0f + 3 * std::ldexp(1.0f, -8)) == 0x3F82);
  CHECK(f32_to_f16(1.0f + std::ldexp(1.0f, -11)) == 0x3C00);
  CHECK(f32_to_f16(1.0f + 3 * std::ldexp(1.0f, -11)) == 0x3C02);
  // Overflow: f16 65504 is the largest finite, 65520 is the tie that rounds to inf.
  CHECK(f32_to_f16(65504.0f) == 0x7BFF);
  CHECK(f32_to_f16(65519.996f) == 0x7BFF);
  CHECK(f32_to_f16(65520.0f) == 0x7C00);
  CHECK(f32_to_f16(-1e9f) == 0xFC00);
  // Subnormals: f16's smallest is 2^-24; 2^-25 ties to zero, a bit more rounds up.
  CHECK(f32_to_f16(std::ldexp(1.0f, -24)) == 0x0001);
  CHECK(f32_to_f16(std::ldexp(1.0f, -25)) == 0x0000);
  CHECK(f32_to_f16(std::ldexp(1.5f, -25)) == 0x0001);
  CHECK(f32_to_f16(std::ldexp(3.0f, -25)) == 0x0002);  // 1.5 * 2^-24 ties to 2 (even)
  // e4m3fn: max 448 (0x7E); 464 is the tie that stays at 448; above it is NaN (no infinity).
  CHECK(f32_to_fp8_e4m3(448.0f) == 0x7E);
  CHECK(f32_to_fp8_e4m3(464.0f) == 0x7E);
  CHECK((f32_to_fp8_e4m3(464.1f) & 0x7F) == 0x7F);
  CHECK((f32_to_fp8_e4m3(INFINITY) & 0x7F) == 0x7F);
  CHECK(fp8_e4m3_to_f32(0x01) == std::ldexp(1.0f, -9));
  CHECK(f32_to_fp8_e4m3(std::ldexp(1.0f, -10)) == 0x00);  // tie to even: zero
  CHECK(f32_to_fp8_e4m3(std::ldexp(1.5f, -10)) == 0x01);
  CHECK(std::isnan(fp8_e4m3_to_f32(0x7F)));
  CHECK(std::isnan(fp8_e4m3_to_f32(0xFF)));
  // e5m2: max 57344 (0x7B); the next step would be 65536 (0x7C, inf), so 61440 is the tie that
  // rounds to inf (0x7C has the even mantissa).
  CHECK(f32_to_fp8_e5m2(57344.0f) == 0x7B);
  CHECK(f32_to_fp8_e5m2(61439.0f) == 0x7B);
  CHECK(f32_to_fp8_e5m2(61440.0f) == 0x7C);
  CHECK(f32_to_fp8_e5m2(-1e6f) == 0xFC);
  CHECK(std::isinf(fp8_e5m2_to_f32(0x7C)));
  CHECK(fp8_e5m2_to_f32(0x01) == std::ldexp(1.0f, -16));
  // NaN stays NaN, sign kept where the format has one.
  CHECK(std::isnan(bf16_to_f32(f32_to_bf16(std::nanf("")))));
  CHECK(std::isnan(f16_to_f32(f32_to_f16(-std::nanf("")))));
  CHECK((f32_to_bf16(-std::numeric_limits<float>::quiet_NaN()) & 0x8000) != 0);
  // A signalling NaN must not round into infinity.
  float snan;
  const uint32_t snan_bits = 0x7F800001u;
  std::memcpy(&snan, &snan_bits, 4);
  CHECK(std::isnan(bf16_to_f32(f32_to_bf16(snan))));
  CHECK(std::isnan(f16_to_f32(f32_to_f16(snan))));
}

TEST_CASE("dtype table: names, sizes, parsing") {
  const char* names[] = {"BOOL", "U8",  "I8",  "F8_E5M2", "F8_E4M3", "I16", "U16", "F16",
                         "BF16", "I32", "U32", "F32",     "F64",     "I64", "U64"};
  const size_t sizes[] = {1, 1, 1, 1, 1, 2, 2, 2, 2, 4, 4, 4, 8, 8, 8};
  for (int i = 0; i < kNumDTypes; ++i) {
    const auto dt = static_cast<DType>(i);
    CHECK(dtype_name(dt) == names[i]);
    CHECK(dtype_size(dt) == sizes[i]);
    bool unsupported = true;
    CHECK(parse_dtype(names[i], &unsupported) == dt);
    CHECK_FALSE(unsupported);
  }
  for (const char* u : {"F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "C64"}) {
    bool unsupported = false;
    CHECK_FALSE(parse_dtype(u, &unsupported).has_value());
    CHECK(unsupported);
  }
  for (const char* bad : {"f32", "FLOAT", "", "F8", "BF16 "}) {
    bool unsupported = true;
    CHECK_FALSE(parse_dtype(bad, &unsupported).has_value());
    CHECK_FALSE(unsupported);
  }
  CHECK(parse_dtype_cli("bf16") == DType::BF16);
  CHECK(parse_dtype_cli("fp16") == DType::F16);
  CHECK(parse_dtype_cli("float32") == DType::F32);
  CHECK(parse_dtype_cli("F8_E4M3") == DType::F8_E4M3);
  CHECK_FALSE(parse_dtype_cli("I8").has_value());
  CHECK_FALSE(parse_dtype_cli("int4").has_value());
  CHECK(dtype_is_float(DType::BF16));
  CHECK_FALSE(dtype_is_float(DType::I32));
  CHECK(dtype_torch_name(DType::F8_E4M3) == "float8_e4m3fn");
}

TEST_CASE("array conversions match the scalar ones at any alignment") {
  std::mt19937_64 rng(test::test_seed("array conversions"));
  constexpr size_t kN = 257;
  for (int i = 0; i < kNumDTypes; ++i) {
    const auto dt = static_cast<DType>(i);
    const size_t es = dtype_size(dt);
    std::vector<uint8_t> buf(kN * es + 3);
    for (auto& b : buf) b = static_cast<uint8_t>(rng());
    const uint8_t* src = buf.data() + 3;  // misaligned on purpose
    std::vector<float> got(kN);
    convert_to_f32(dt, src, got.data(), kN);
    size_t bad = 0;
    for (size_t k = 0; k < kN; ++k) {
      const uint8_t* p = src + k * es;
      double want = 0;
      switch (dt) {
        case DType::BOOL: want = p[0] ? 1 : 0; break;
        case DType::U8: want = p[0]; break;
        case DType::I8: want = static_cast<int8_t>(p[0]); break;
        case DType::F8_E5M2: want = fp8_e5m2_to_f32(p[0]); break;
        case DType::F8_E4M3: want = fp8_e4m3_to_f32(p[0]); break;
        default: {
          // Little-endian assembly, independent of memcpy.
          uint64_t u = 0;
          for (size_t b = 0; b < es; ++b) u |= static_cast<uint64_t>(p[b]) << (8 * b);
          if (dt == DType::I16)
            want = static_cast<int16_t>(u);
          else if (dt == DType::U16)
            want = static_cast<uint16_t>(u);
          else if (dt == DType::F16)
            want = f16_to_f32(static_cast<uint16_t>(u));
          else if (dt == DType::BF16)
            want = bf16_to_f32(static_cast<uint16_t>(u));
          else if (dt == DType::I32)
            want = static_cast<int32_t>(u);
          else if (dt == DType::U32)
            want = static_cast<uint32_t>(u);
          else if (dt == DType::F32) {
            uint32_t w = static_cast<uint32_t>(u);
            float f;
            std::memcpy(&f, &w, 4);
            want = f;
          } else if (dt == DType::F64) {
            double d;
            std::memcpy(&d, &u, 8);
            want = d;
          } else if (dt == DType::I64)
            want = static_cast<double>(static_cast<int64_t>(u));
          else
            want = static_cast<double>(u);
        }
      }
      const float w = static_cast<float>(want);  // rounding of wide integers/doubles: to nearest
      const bool same = (std::isnan(w) && std::isnan(got[k])) || std::memcmp(&w, &got[k], 4) == 0;
      if (!same) ++bad;
    }
    CHECK_MESSAGE(bad == 0, dtype_name(dt), ": ", bad, " elements differ");
  }

  std::vector<float> src(kN);
  for (auto& x : src) x = std::ldexp(static_cast<float>(static_cast<int32_t>(rng())), -28);
  for (DType dt : {DType::F16, DType::BF16, DType::F8_E4M3, DType::F8_E5M2, DType::F32, DType::F64}) {
    std::vector<uint8_t> out(kN * dtype_size(dt) + 1);
    convert_from_f32(dt, src.data(), out.data() + 1, kN);
    std::vector<float> back(kN), scalar(kN);
    convert_to_f32(dt, out.data() + 1, back.data(), kN);
    for (size_t k = 0; k < kN; ++k) {
      if (dt == DType::F16)
        scalar[k] = f16_to_f32(f32_to_f16(src[k]));
      else if (dt == DType::BF16)
        scalar[k] = bf16_to_f32(f32_to_bf16(src[k]));
      else if (dt == DType::F8_E4M3)
        scalar[k] = fp8_e4m3_to_f32(f32_to_fp8_e4m3(src[k]));
      else if (dt == DType::F8_E5M2)
        scalar[k] = fp8_e5m2_to_f32(f32_to_fp8_e5m2(src[k]));
      else
        scalar[k] = src[k];
    }
    CHECK_MESSAGE(std::memcmp(back.data(), scalar.data(), 4 * kN) == 0, dtype_name(dt));
  }
  std::vector<uint8_t> out(kN * 4);
  test::check_error([&] { convert_from_f32(DType::I32, src.data(), out.data(), kN); }, ErrorKind::Unsupported,
                    {"I32"});
}

}  // namespace
}  // namespace qtool
