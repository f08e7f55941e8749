// AVX2 + F16C (and AVX-512) helpers shared by the fast paths. Functions carry their own target
// attribute, so the library's baseline flags stay portable; callers check cpu_features() at run
// time. Every operation here is exact or IEEE round-to-nearest-even, so the fast paths equal the
// scalar references.
#pragma once

#if defined(__x86_64__) || defined(__i386__)
#define QTOOL_HAVE_X86_SIMD 1
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "qtool/formats/dtype.hpp"

// GCC 12's AVX-512 intrinsics start from _mm512_undefined_*() and warn about it once inlined
// (GCC bug 105593, fixed in GCC 13); the files that include this header do not otherwise rely on
// these two warnings.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
// The lane-generic helpers below (and fp8.cpp's encode_fp8) take and return vectors without a
// target attribute of their own; they are always inlined into a function of the lanes' target, so
// -Wpsabi's warning about passing such vectors without that target (which GCC gives at the end of
// the file, whatever the pragmas around the template) concerns calls that never exist.
#pragma GCC diagnostic ignored "-Wpsabi"

#define QTOOL_AVX2 __attribute__((target("avx2,f16c")))
#define QTOOL_AVX2_FMA __attribute__((target("avx2,f16c,fma")))
#define QTOOL_AVX512 __attribute__((target("avx2,f16c,fma,avx512f,avx512bw,avx512vl,avx512dq")))

namespace qtool::quant::detail::simd {

// 8 elements of a BF16/F16/F32 buffer as float32 (exact).
template <DType D>
QTOOL_AVX2 inline __m256 load8(const uint8_t* p) {
  if constexpr (D == DType::BF16) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else if constexpr (D == DType::F16) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  } else {
    return _mm256_loadu_ps(reinterpret_cast<const float*>(p));
  }
}

template <DType D>
constexpr uint64_t elem_size() {
  return D == DType::F32 ? 4 : 2;
}

QTOOL_AVX2 inline __m256 abs8(__m256 x) {
  return _mm256_andnot_ps(_mm256_castsi256_ps(_mm256_set1_epi32(INT32_MIN)), x);
}

// All-ones lanes where |x| is Inf or NaN.
QTOOL_AVX2 inline __m256 not_finite8(__m256 abs_x) {
  return _mm256_cmp_ps(abs_x, _mm256_set1_ps(__builtin_inff()), _CMP_NLT_UQ);
}

QTOOL_AVX2 inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

// Round float32 lanes to float16 precision (RNE, subnormals, overflow to Inf) and back.
QTOOL_AVX2 inline __m256 round_f16(__m256 x) {
  return _mm256_cvtph_ps(_mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// 32 lanes of 0..255 in four epi32 vectors -> 32 bytes in order.
QTOOL_AVX2 inline __m256i pack_u8_32(__m256i a, __m256i b, __m256i c, __m256i d) {
  const __m256i ab = _mm256_packus_epi32(a, b);
  const __m256i cd = _mm256_packus_epi32(c, d);
  const __m256i abcd = _mm256_packus_epi16(ab, cd);
  return _mm256_permutevar8x32_epi32(abcd, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// 32 lanes of -128..127 in four epi32 vectors -> 32 signed bytes in order.
QTOOL_AVX2 inline __m256i pack_i8_32(__m256i a, __m256i b, __m256i c, __m256i d) {
  const __m256i ab = _mm256_packs_epi32(a, b);
  const __m256i cd = _mm256_packs_epi32(c, d);
  const __m256i abcd = _mm256_packs_epi16(ab, cd);
  return _mm256_permutevar8x32_epi32(abcd, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// Software prefetch of the input `kPrefetchAhead` bytes ahead of where a kernel reads. The input
// is a file mapping read once, front to back, straight from the page cache: the hardware
// prefetchers stop at every 4 KiB page, so without this a kernel waits on memory at each page.
inline constexpr uint64_t kPrefetchAhead = 4096;
inline void prefetch_ahead(const uint8_t* p, uint64_t bytes) {
  for (uint64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + kPrefetchAhead + off, 0, 3);
}

// --- Absolute maxima from the bits ---------------------------------------------------------------
// Non-negative floats order as their bit patterns, so the largest magnitude of a BF16/F16/F32 run
// is the integer maximum of the magnitudes' bits (sign bit cleared), and a run holds an Inf or NaN
// exactly when that maximum is at least the bits of Inf. One integer max per 16 (or 8, F32)
// elements instead of a conversion, a compare and a float max per 8.

template <DType D>
constexpr uint32_t inf_bits() {
  return D == DType::BF16 ? 0x7F80u : D == DType::F16 ? 0x7C00u : 0x7F800000u;
}

// The float value of magnitude bits of D (finite).
template <DType D>
inline float from_bits(uint32_t bits) {
  if constexpr (D == DType::BF16)
    return bf16_to_f32(static_cast<uint16_t>(bits));
  else if constexpr (D == DType::F16)
    return f16_to_f32(static_cast<uint16_t>(bits));
  else {
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
}

template <DType D>
inline uint32_t magnitude_bits(const uint8_t* p, uint64_t i) {
  if constexpr (D == DType::F32) {
    uint32_t u;
    std::memcpy(&u, p + 4 * i, 4);
    return u & 0x7FFFFFFFu;
  } else {
    uint16_t u;
    std::memcpy(&u, p + 2 * i, 2);
    return u & 0x7FFFu;
  }
}

QTOOL_AVX2 inline uint32_t hmax_epu16(__m256i v) {
  __m128i m = _mm_max_epu16(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  m = _mm_minpos_epu16(_mm_xor_si128(m, _mm_set1_epi16(-1)));  // min of the complements
  return 0xFFFFu ^ static_cast<uint32_t>(_mm_extract_epi16(m, 0));
}

QTOOL_AVX2 inline uint32_t hmax_epu32(__m256i v) {
  __m128i m = _mm_max_epu32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0x4E));
  m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0xB1));
  return static_cast<uint32_t>(_mm_cvtsi128_si32(m));
}

// The largest magnitude's bits over elements [0, n) of a BF16/F16/F32 run.
template <DType D>
QTOOL_AVX2 inline uint32_t absmax_bits_avx2(const uint8_t* p, uint64_t n) {
  constexpr uint64_t kLanes = D == DType::F32 ? 8 : 16;
  __m256i m = _mm256_setzero_si256();
  const __m256i mask = D == DType::F32 ? _mm256_set1_epi32(0x7FFFFFFF) : _mm256_set1_epi16(0x7FFF);
  uint64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const __m256i v =
        _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i * elem_size<D>())), mask);
    m = D == DType::F32 ? _mm256_max_epu32(m, v) : _mm256_max_epu16(m, v);
  }
  uint32_t best = D == DType::F32 ? hmax_epu32(m) : hmax_epu16(m);
  for (; i < n; ++i) best = std::max(best, magnitude_bits<D>(p, i));
  return best;
}

// 16 elements of a BF16/F16/F32 buffer as float32 (exact).
template <DType D>
QTOOL_AVX512 inline __m512 load16(const uint8_t* p) {
  if constexpr (D == DType::BF16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else if constexpr (D == DType::F16) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  } else {
    return _mm512_loadu_ps(reinterpret_cast<const float*>(p));
  }
}

template <DType D>
QTOOL_AVX512 inline uint32_t absmax_bits_avx512(const uint8_t* p, uint64_t n) {
  constexpr uint64_t kLanes = D == DType::F32 ? 16 : 32;
  __m512i m = _mm512_setzero_si512();
  const __m512i mask = D == DType::F32 ? _mm512_set1_epi32(0x7FFFFFFF) : _mm512_set1_epi16(0x7FFF);
  uint64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const __m512i v = _mm512_and_si512(_mm512_loadu_si512(p + i * elem_size<D>()), mask);
    m = D == DType::F32 ? _mm512_max_epu32(m, v) : _mm512_max_epu16(m, v);
  }
  const __m256i lo = _mm512_castsi512_si256(m), hi = _mm512_extracti64x4_epi64(m, 1);
  uint32_t best =
      D == DType::F32 ? hmax_epu32(_mm256_max_epu32(lo, hi)) : hmax_epu16(_mm256_max_epu16(lo, hi));
  for (; i < n; ++i) best = std::max(best, magnitude_bits<D>(p, i));
  return best;
}

// A float in every lane of V (__m256 or __m512).
template <typename V>
V splat(float x);
template <>
QTOOL_AVX2 inline __m256 splat<__m256>(float x) {
  return _mm256_set1_ps(x);
}
template <>
QTOOL_AVX512 inline __m512 splat<__m512>(float x) {
  return _mm512_set1_ps(x);
}

// The elements of a BF16/F16/F32 buffer as the float32 lanes of V: load8 or load16, for the
// lane-generic code (always inlined into a function of V's target).
template <DType D, typename V>
[[gnu::always_inline]] inline V load_lanes(const uint8_t* p) {
  if constexpr (sizeof(V) == sizeof(__m256))
    return load8<D>(p);
  else
    return load16<D>(p);
}

QTOOL_AVX512 inline __m512 round_f16(__m512 x) {
  return _mm512_cvtph_ps(_mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// --- Rounding to the weight's dtype, one definition for AVX2 (__m256) and AVX-512 (__m512) -------
// Written with GCC vector operators on the lanes' bits; always inlined into a function of the
// matching target attribute, which picks the instructions (the same as the intrinsics would be).

// The float lanes of a vector of `Bytes` bytes (__m256: 32, __m512: 64) as uint32 and int32 lanes.
template <size_t Bytes>
struct LaneBits;
template <>
struct LaneBits<32> {
  using type = uint32_t __attribute__((vector_size(32)));
  using signed_type = int32_t __attribute__((vector_size(32)));
};
template <>
struct LaneBits<64> {
  using type = uint32_t __attribute__((vector_size(64)));
  using signed_type = int32_t __attribute__((vector_size(64)));
};

// Round finite float32 lanes to bfloat16 precision (RNE) and back.
template <typename V>
[[gnu::always_inline]] inline V round_bf16(const V& x) {
  using U = typename LaneBits<sizeof(V)>::type;
  const U u = (U)x;
  return (V)((u + (((u >> 16) & 1u) + 0x7FFFu)) & 0xFFFF0000u);
}

template <DType D, typename V>
[[gnu::always_inline]] inline V round_to(const V& x) {
  if constexpr (D == DType::BF16)
    return round_bf16(x);
  else if constexpr (D == DType::F16)
    return round_f16(x);
  else
    return x;
}

}  // namespace qtool::quant::detail::simd

#endif
