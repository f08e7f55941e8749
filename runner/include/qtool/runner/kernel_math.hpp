// Scalar arithmetic shared by the CPU backend and the CUDA kernels, compiled for both, so that
// activations, digests and dequantized weights come out bit-identical on either side.
//
// - Activations: one hidden state H[token, column] per step, a counter-based hash of (seed,
//   token, column) mapped to a float in [-1, 1) with 24 significant bits and rounded to bf16. A
//   linear with `in` inputs reads H[:, 0:in]. No state, so any element can be made anywhere.
// - Digests: an order-independent 64-bit sum of hashed (index, bits) terms over the 32-bit words
//   (pairs of bf16 elements) of an output, so a GPU reduction with atomics gives the same value as
//   a CPU loop. Two independent 32-bit mixes per word keep it cheap next to the GEMM it checks.
// - x86 float semantics: libquant's CPU dequantizers run on x86 SSE/AVX, where an operation on a
//   NaN returns the first NaN operand, quieted, and an invalid operation (0 * inf) gives the
//   "default NaN" 0xFFC00000. A GPU returns 0x7FFFFFFF instead. The helpers below give the x86
//   result on both sides, so even corrupted weights dequantize to the same bits.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define QTOOL_HD __host__ __device__ __forceinline__
#else
#define QTOOL_HD inline
#endif

namespace qtool::runner::kmath {

// The bits of a value as another type of its size (float <-> uint32_t), on host and device (a
// copy between locals compiles to a register move on both).
template <class To, class From>
QTOOL_HD To bits_as(From v) {
  static_assert(sizeof(To) == sizeof(From));
  To t;
  std::memcpy(&t, &v, sizeof(To));
  return t;
}

QTOOL_HD uint32_t float_bits(float f) { return bits_as<uint32_t>(f); }
QTOOL_HD float bits_float(uint32_t u) { return bits_as<float>(u); }

QTOOL_HD bool is_nan_bits(uint32_t u) { return (u & 0x7FFFFFFFu) > 0x7F800000u; }

// float32 -> bf16, round to nearest even; NaN keeps its sign and top payload bits, quieted
// (exactly qtool::f32_to_bf16).
QTOOL_HD uint16_t f32_to_bf16_bits(float f) {
  const uint32_t u = float_bits(f);
  if (is_nan_bits(u)) return static_cast<uint16_t>((u >> 16) | 0x40u);
  const uint32_t rounding = 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>((u + rounding) >> 16);
}

QTOOL_HD float bf16_bits_to_f32(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

// The x86 NaN rule for a binary operation whose IEEE result `r` is NaN.
QTOOL_HD float x86_nan_result(float a, float b) {
  const uint32_t ua = float_bits(a);
  const uint32_t ub = float_bits(b);
  if (is_nan_bits(ua)) return bits_float(ua | 0x00400000u);
  if (is_nan_bits(ub)) return bits_float(ub | 0x00400000u);
  return bits_float(0xFFC00000u);
}

// a * b, a + b and a / b, each rounded once (never fused into an FMA), with IEEE NaN results.
#if defined(__CUDA_ARCH__)
QTOOL_HD float ieee_mul(float a, float b) { return __fmul_rn(a, b); }
QTOOL_HD float ieee_add(float a, float b) { return __fadd_rn(a, b); }
QTOOL_HD float ieee_div(float a, float b) { return __fdiv_rn(a, b); }
#else
QTOOL_HD float ieee_mul(float a, float b) { return a * b; }
QTOOL_HD float ieee_add(float a, float b) { return a + b; }
QTOOL_HD float ieee_div(float a, float b) { return a / b; }
#endif

// The x86 result of a binary operation on `a` and `b` whose IEEE result is `r`.
QTOOL_HD float x86_result(float r, float a, float b) {
  return is_nan_bits(float_bits(r)) ? x86_nan_result(a, b) : r;
}

// The same operations with x86 NaN results.
QTOOL_HD float x86_mul(float a, float b) { return x86_result(ieee_mul(a, b), a, b); }
QTOOL_HD float x86_add(float a, float b) { return x86_result(ieee_add(a, b), a, b); }
QTOOL_HD float x86_div(float a, float b) { return x86_result(ieee_div(a, b), a, b); }

// A xorshift-multiply finaliser: two multiplications, each between xor-shifts (bijective).
template <class T>
QTOOL_HD T xorshift_multiply(T x, int s0, T m0, int s1, T m1, int s2) {
  x ^= x >> s0;
  x *= m0;
  x ^= x >> s1;
  x *= m1;
  x ^= x >> s2;
  return x;
}

// splitmix64's finaliser: a bijective 64-bit mixer.
QTOOL_HD uint64_t mix64(uint64_t x) {
  return xorshift_multiply<uint64_t>(x, 30, 0xBF58476D1CE4E5B9ull, 27, 0x94D049BB133111EBull, 31);
}

inline constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;

// The stream of a step's hidden state, from the step's seed.
QTOOL_HD uint64_t activation_stream(uint64_t seed) { return mix64(seed * kGolden + 0x5851F42D4C957F2Dull); }

// H[token, column] of the hidden state of `stream`: uniform in [-1, 1) on a grid of 2^-23, then
// rounded to bf16. Returns the bf16 bits. Independent of any width, so every GPU can make the
// columns it needs.
QTOOL_HD uint16_t activation_bf16(uint64_t stream, uint64_t token, uint64_t column) {
  const uint64_t h = mix64(stream + ((token << 32) + column) * kGolden);
  const int32_t m = static_cast<int32_t>(h >> 40) - (1 << 23);  // [-2^23, 2^23)
  const float v = static_cast<float>(m) * (1.0f / 8388608.0f);  // exact: 24 significant bits
  return f32_to_bf16_bits(v);
}

// murmur3's 32-bit finaliser: a bijective mixer.
QTOOL_HD uint32_t fmix32(uint32_t h) {
  return xorshift_multiply<uint32_t>(h, 16, 0x85EBCA6Bu, 13, 0xC2B2AE35u, 16);
}

// Word k's contribution to an output digest: the bf16 elements 2k (low half) and 2k + 1 (high
// half; 0 past the end of an odd-length output). The digest is the wrapping sum over words.
QTOOL_HD uint64_t digest_term(uint64_t k, uint32_t word) {
  const uint32_t kk = static_cast<uint32_t>(k) ^ (static_cast<uint32_t>(k >> 32) * 0x27D4EB2Fu);
  const uint32_t a = fmix32(word ^ (kk * 0x9E3779B1u));
  const uint32_t b = fmix32(word + kk * 0x85EBCA77u + 0x165667B1u);
  return (static_cast<uint64_t>(a) << 32) | b;
}

// Non-finite bf16 elements in a word (0, 1 or 2).
QTOOL_HD uint32_t nonfinite_in_word(uint32_t word) {
  return ((word & 0x7F80u) == 0x7F80u ? 1u : 0u) + (((word >> 16) & 0x7F80u) == 0x7F80u ? 1u : 0u);
}

QTOOL_HD bool is_finite_bf16(uint16_t h) { return (h & 0x7F80u) != 0x7F80u; }

// The order both backends sum a norm's statistics in, in double: term i into partial i % kSumLanes
// in order of i (lane i % 32 of a CUDA warp), then the partials folded as the warp's butterfly
// shuffles fold them (partial j += partial j + 16, then + 8, ..., + 1). One order, so the CPU and
// the GPU give the same bits; the sum is the same to within double rounding as a sequential one.
inline constexpr int kSumLanes = 32;

}  // namespace qtool::runner::kmath
