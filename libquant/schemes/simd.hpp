// AVX2 + F16C helpers shared by the fast paths. Functions carry their own target attribute, so the
// library's baseline flags stay portable; callers check have_simd() at run time. Every operation
// here is exact or IEEE round-to-nearest-even, so the fast paths equal the scalar references.
#pragma once

#if defined(__x86_64__) || defined(__i386__)
#define QTOOL_HAVE_X86_SIMD 1
#include <immintrin.h>

#include <cstdint>

#include "qtool/formats/dtype.hpp"

#define QTOOL_AVX2 __attribute__((target("avx2,f16c")))

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

// Round finite float32 lanes to bfloat16 precision (RNE) and back.
QTOOL_AVX2 inline __m256 round_bf16(__m256 x) {
  const __m256i u = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
  return _mm256_castsi256_ps(_mm256_and_si256(r, _mm256_set1_epi32(static_cast<int32_t>(0xFFFF0000u))));
}

template <DType D>
QTOOL_AVX2 inline __m256 round_to(__m256 x) {
  if constexpr (D == DType::BF16)
    return round_bf16(x);
  else if constexpr (D == DType::F16)
    return round_f16(x);
  else
    return x;
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

}  // namespace qtool::quant::detail::simd

#endif
