#include "qtool/formats/dtype.hpp"

#include <bit>
#include <cmath>
#include <cstring>

#include "qtool/formats/error.hpp"

namespace qtool {
namespace {

// A T at `p` (any alignment).
template <typename T>
T load(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

// n elements of T at `p` as float32, each through `decode`; and back through `encode`.
template <typename T, float (*decode)(T)>
void decode_all(const uint8_t* p, float* dst, size_t n) {
  for (size_t i = 0; i < n; ++i) dst[i] = decode(load<T>(p + sizeof(T) * i));
}
template <typename T, T (*encode)(float)>
void encode_all(const float* src, uint8_t* p, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    const T v = encode(src[i]);
    std::memcpy(p + sizeof(T) * i, &v, sizeof(T));
  }
}
void copy_f32(const uint8_t* p, float* dst, size_t n) { std::memcpy(dst, p, 4 * n); }
void copy_f32(const float* src, uint8_t* p, size_t n) { std::memcpy(p, src, 4 * n); }

template <typename From, typename To>
To cast(From v) {
  return static_cast<To>(v);
}
float bool_value(uint8_t v) { return v ? 1.0f : 0.0f; }

using DecodeFn = void (*)(const uint8_t* p, float* dst, size_t n);
using EncodeFn = void (*)(const float* src, uint8_t* p, size_t n);

struct DTypeTraits {
  DType dtype;
  const char* name;
  size_t size;
  bool is_float;
  const char* torch_name;
  DecodeFn to_f32;
  EncodeFn from_f32;  // null: not supported
};

// The rows of the two common kinds, `size` being the element type's: an integer dtype read by
// value and never written; a float dtype stored as T's bits, read through `decode` and written
// through `encode`.
template <typename T>
constexpr DTypeTraits integer_row(DType dtype, const char* name, const char* torch_name) {
  return {dtype, name, sizeof(T), false, torch_name, decode_all<T, cast<T, float>>, nullptr};
}
template <typename T, float (*decode)(T), T (*encode)(float)>
constexpr DTypeTraits float_row(DType dtype, const char* name, const char* torch_name) {
  return {dtype, name, sizeof(T), true, torch_name, decode_all<T, decode>, encode_all<T, encode>};
}

constexpr DTypeTraits kTraits[kNumDTypes] = {
    {DType::BOOL, "BOOL", 1, false, "bool", decode_all<uint8_t, bool_value>, nullptr},
    integer_row<uint8_t>(DType::U8, "U8", "uint8"),
    integer_row<int8_t>(DType::I8, "I8", "int8"),
    float_row<uint8_t, fp8_e5m2_to_f32, f32_to_fp8_e5m2>(DType::F8_E5M2, "F8_E5M2", "float8_e5m2"),
    float_row<uint8_t, fp8_e4m3_to_f32, f32_to_fp8_e4m3>(DType::F8_E4M3, "F8_E4M3", "float8_e4m3fn"),
    integer_row<int16_t>(DType::I16, "I16", "int16"),
    integer_row<uint16_t>(DType::U16, "U16", "uint16"),
    float_row<uint16_t, f16_to_f32, f32_to_f16>(DType::F16, "F16", "float16"),
    float_row<uint16_t, bf16_to_f32, f32_to_bf16>(DType::BF16, "BF16", "bfloat16"),
    integer_row<int32_t>(DType::I32, "I32", "int32"),
    integer_row<uint32_t>(DType::U32, "U32", "uint32"),
    {DType::F32, "F32", 4, true, "float32", copy_f32, copy_f32},
    float_row<double, cast<double, float>, cast<float, double>>(DType::F64, "F64", "float64"),
    integer_row<int64_t>(DType::I64, "I64", "int64"),
    integer_row<uint64_t>(DType::U64, "U64", "uint64"),
};

const DTypeTraits& traits(DType dt) {
  const auto i = static_cast<size_t>(dt);
  QTOOL_ASSERT(i < static_cast<size_t>(kNumDTypes));
  return kTraits[i];
}

uint32_t bits_of(float f) { return std::bit_cast<uint32_t>(f); }
float float_of(uint32_t u) { return std::bit_cast<float>(u); }

// A binary float with `man_bits` mantissa bits and exponent `bias`, decoded exactly.
float decode_minifloat(uint32_t code, int exp_bits, int man_bits, int bias) {
  const uint32_t sign = code >> (exp_bits + man_bits);
  const uint32_t exp = (code >> man_bits) & ((1u << exp_bits) - 1);
  const uint32_t man = code & ((1u << man_bits) - 1);
  float mag;
  if (exp == 0)
    mag = std::ldexp(static_cast<float>(man), 1 - bias - man_bits);
  else
    mag = std::ldexp(static_cast<float>(man | (1u << man_bits)), static_cast<int>(exp) - bias - man_bits);
  return sign ? -mag : mag;
}

// Rounds |f| to nearest even in a binary float with `man_bits` mantissa bits and exponent `bias`.
// Returns the unsigned code; codes above `max_finite_code` are the caller's to map (inf or NaN).
uint32_t encode_magnitude(float x, int man_bits, int bias) {
  const int min_exp = 1 - bias;  // exponent of the smallest normal
  int e;
  std::frexp(x, &e);  // x = m * 2^e, m in [0.5, 1)
  e -= 1;             // x = m' * 2^e, m' in [1, 2)
  if (x == 0.0f) return 0;
  if (e < min_exp) {
    // Subnormal range: multiples of 2^(min_exp - man_bits). Scaling by a power of two is exact.
    const float q = std::nearbyint(std::ldexp(x, man_bits - min_exp));
    return static_cast<uint32_t>(q);  // q == 2^man_bits is the smallest normal, encoded the same
  }
  float q = std::nearbyint(std::ldexp(x, man_bits - e));  // in [2^M, 2^(M+1)]
  if (q >= std::ldexp(1.0f, man_bits + 1)) {
    q = std::ldexp(1.0f, man_bits);
    e += 1;
  }
  const uint64_t biased = static_cast<uint64_t>(e + bias);
  const uint64_t code = (biased << man_bits) | (static_cast<uint64_t>(q) - (1u << man_bits));
  return code > 0xFFFFFFFFull ? 0xFFFFFFFFu : static_cast<uint32_t>(code);
}

}  // namespace

size_t dtype_size(DType dt) { return traits(dt).size; }
std::string_view dtype_name(DType dt) { return traits(dt).name; }
bool dtype_is_float(DType dt) { return traits(dt).is_float; }
std::string_view dtype_torch_name(DType dt) { return traits(dt).torch_name; }

std::optional<DType> parse_dtype(std::string_view name, bool* known_unsupported) {
  if (known_unsupported) *known_unsupported = false;
  for (const auto& t : kTraits)
    if (name == t.name) return t.dtype;
  static const char* kUnsupported[] = {"F8_E8M0", "F4",          "F6_E2M3",    "F6_E3M2",
                                       "C64",     "F8_E4M3FNUZ", "F8_E5M2FNUZ"};
  for (const char* u : kUnsupported)
    if (name == u && known_unsupported) *known_unsupported = true;
  return std::nullopt;
}

std::optional<DType> parse_dtype_cli(std::string_view name) {
  if (name == "bf16" || name == "bfloat16") return DType::BF16;
  if (name == "f16" || name == "fp16" || name == "float16") return DType::F16;
  if (name == "f32" || name == "fp32" || name == "float32") return DType::F32;
  auto dt = parse_dtype(name);
  if (dt && dtype_is_float(*dt)) return dt;
  return std::nullopt;
}

float bf16_to_f32(uint16_t h) { return float_of(static_cast<uint32_t>(h) << 16); }

uint16_t f32_to_bf16(float f) {
  const uint32_t u = bits_of(f);
  if (std::isnan(f)) return static_cast<uint16_t>((u >> 16) | 0x40);
  const uint32_t rounding = 0x7FFF + ((u >> 16) & 1);
  return static_cast<uint16_t>((u + rounding) >> 16);
}

float f16_to_f32(uint16_t h) {
  const uint32_t exp = (h >> 10) & 0x1F;
  if (exp == 0x1F) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
    const uint32_t man = static_cast<uint32_t>(h & 0x3FF) << 13;
    return float_of(sign | 0x7F800000u | man);
  }
  return decode_minifloat(h, 5, 10, 15);
}

uint16_t f32_to_f16(float f) {
  const uint16_t sign = (bits_of(f) >> 16) & 0x8000;
  if (std::isnan(f)) return static_cast<uint16_t>(sign | 0x7E00);
  const uint32_t code = std::isinf(f) ? 0x7C00u : encode_magnitude(std::fabs(f), 10, 15);
  return static_cast<uint16_t>(sign | (code >= 0x7C00u ? 0x7C00u : code));
}

float fp8_e4m3_to_f32(uint8_t v) {
  if ((v & 0x7F) == 0x7F) return std::nanf("");
  return decode_minifloat(v, 4, 3, 7);
}

float fp8_e5m2_to_f32(uint8_t v) { return f16_to_f32(static_cast<uint16_t>(v) << 8); }

uint8_t f32_to_fp8_e4m3(float f) {
  const uint8_t sign = (bits_of(f) >> 24) & 0x80;
  if (!std::isfinite(f)) return static_cast<uint8_t>(sign | 0x7F);
  const uint32_t code = encode_magnitude(std::fabs(f), 3, 7);
  return static_cast<uint8_t>(sign | (code > 0x7E ? 0x7F : code));  // e4m3fn has no infinity
}

uint8_t f32_to_fp8_e5m2(float f) {
  const uint8_t sign = (bits_of(f) >> 24) & 0x80;
  if (std::isnan(f)) return static_cast<uint8_t>(sign | 0x7F);
  const uint32_t code = std::isinf(f) ? 0x7Cu : encode_magnitude(std::fabs(f), 2, 15);
  return static_cast<uint8_t>(sign | (code >= 0x7C ? 0x7C : code));
}

void convert_to_f32(DType dt, const void* src, float* dst, size_t n) {
  traits(dt).to_f32(static_cast<const uint8_t*>(src), dst, n);
}

void convert_from_f32(DType dt, const float* src, void* dst, size_t n) {
  const EncodeFn encode = traits(dt).from_f32;
  if (!encode)
    fail(ErrorKind::Unsupported, "conversion from float32 to ", dtype_name(dt), " is not supported");
  encode(src, static_cast<uint8_t*>(dst), n);
}

}  // namespace qtool
