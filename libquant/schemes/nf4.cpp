// nf4 and fp4: bitsandbytes 4-bit blockwise quantization (quantize_4bit on the CPU, bitsandbytes
// 0.50), bit for bit:
//   - the weight is flattened row-major; blocks of `blocksize` cross row boundaries;
//   - absmax[b] = max |x| of the block (float32);
//   - a full block scales by x * fl(1 / max(absmax, 1e-38)); the last, short block (n % blocksize
//     elements) divides, x / max(absmax, 1e-38), and stores that clamped absmax;
//   - scaled = clamp(., -1, 1); sorted index = number of thresholds (float32 midpoints of the
//     sorted code values) strictly below `scaled` (ties take the lower code); fp4 maps the sorted
//     index back to its bit pattern;
//   - byte j = (code[2j] << 4) | code[2j + 1]; an odd element count is padded with 0.0.
// Double quant (compress_statistics) is in double_quant.cpp. Dequantize: code[q] * absmax[i / bs].
#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <string>
#include <system_error>
#include <vector>

#include "qtool/formats/checked.hpp"
#include "qtool/formats/json.hpp"
#include "scheme.hpp"
#include "simd.hpp"

namespace qtool::quant::detail {
namespace {

constexpr std::string_view kQuantStatePrefix = "weight.quant_state.bitsandbytes__";

// NF4 code values (FORMATS.md), float32 bit patterns by 4-bit code.
constexpr uint32_t kNf4Bits[16] = {0xbf800000, 0xbf3239b1, 0xbf066b30, 0xbeca32a0, 0xbe91a24d, 0xbe3d353f,
                                   0xbdba7871, 0x00000000, 0x3da2faff, 0x3e24cae3, 0x3e7c04dd, 0x3ead033a,
                                   0x3ee1a4b8, 0x3f1007ab, 0x3f3913b3, 0x3f800000};
// FP4 (e2m1 with bitsandbytes' bias) by bit pattern, before normalisation by 12; bit 3 is the sign.
constexpr float kFp4Raw[16] = {0, 0.0625f, 8, 12, 4, 6, 2, 3, 0, -0.0625f, -8, -12, -4, -6, -2, -3};
constexpr float kMinAbsmax = 1e-38f;  // torch: absmax.clamp(min=1e-38)

Bnb4Table make_table(Scheme scheme) {
  Bnb4Table t{};
  for (size_t i = 0; i < 16; ++i)
    t.code[i] = scheme == Scheme::Nf4 ? f32_from_bits(kNf4Bits[i]) : kFp4Raw[i] / 12.0f;
  std::array<uint8_t, 16> order{};
  std::iota(order.begin(), order.end(), uint8_t{0});
  std::stable_sort(order.begin(), order.end(), [&](uint8_t a, uint8_t b) { return t.code[a] < t.code[b]; });
  t.pattern_of = order;
  for (size_t i = 0; i < 15; ++i) t.thresholds[i] = (t.code[order[i]] + t.code[order[i + 1]]) / 2.0f;
  return t;
}

inline uint8_t code_of(const Bnb4Table& t, float scaled) {
  int k = 0;
  for (float thr : t.thresholds) k += thr < scaled ? 1 : 0;
  return t.pattern_of[static_cast<size_t>(k)];
}

// The reference for one block; also the fast path's tail for short blocks.
void quantize_block_ref(const WeightView& w, const Bnb4Table& t, uint32_t blocksize, uint64_t b,
                        uint8_t* packed, uint8_t* absmax_out) {
  const uint64_t n = w.numel();
  const uint64_t begin = b * blocksize;
  const uint64_t end = std::min<uint64_t>(n, begin + blocksize);
  float amax = 0.0f;
  for (uint64_t i = begin; i < end; ++i) {
    const float v = load_element(w.dtype, w.data, i);
    if (!std::isfinite(v)) throw BadValueError(BadValue::NonFinite);
    amax = std::max(amax, std::fabs(v));
  }
  const bool full = end - begin == blocksize;
  const float am = std::max(amax, kMinAbsmax);
  store_f32(absmax_out + 4 * b, full ? amax : am);
  const float r = 1.0f / am;
  for (uint64_t i = begin; i < end; i += 2) {
    const float v0 = load_element(w.dtype, w.data, i);
    const float s0 = std::clamp(full ? v0 * r : v0 / am, -1.0f, 1.0f);
    float s1 = 0.0f;  // the pad of an odd count
    if (i + 1 < end) {
      const float v1 = load_element(w.dtype, w.data, i + 1);
      s1 = std::clamp(full ? v1 * r : v1 / am, -1.0f, 1.0f);
    }
    packed[i / 2] = static_cast<uint8_t>((code_of(t, s0) << 4) | code_of(t, s1));
  }
}

#if QTOOL_HAVE_X86_SIMD
// Number of thresholds strictly below each lane, by a four-step binary search over the 15 sorted
// thresholds (t[k] < s holds for a prefix of k): step 1 compares with t[7], step 2 with t[3] or
// t[11], step 3 with t[1 + 4j] and step 4 with t[2j], each picked per lane by a blend or a permute.
struct Thresholds {
  __m256 t7, t3, t11;
  __m256 quarter;  // t[1], t[5], t[9], t[13] in lanes 0-3
  __m256 even;     // t[0], t[2], ..., t[14]
};

QTOOL_AVX2 inline Thresholds make_thresholds(const float* t) {
  return {_mm256_set1_ps(t[7]), _mm256_set1_ps(t[3]), _mm256_set1_ps(t[11]),
          _mm256_setr_ps(t[1], t[5], t[9], t[13], t[13], t[13], t[13], t[13]),
          _mm256_setr_ps(t[0], t[2], t[4], t[6], t[8], t[10], t[12], t[14])};
}

QTOOL_AVX2 inline __m256i count8(const Thresholds& th, __m256 s) {
  const __m256 m1 = _mm256_cmp_ps(th.t7, s, _CMP_LT_OQ);
  __m256i idx = _mm256_and_si256(_mm256_castps_si256(m1), _mm256_set1_epi32(8));
  const __m256 m2 = _mm256_cmp_ps(_mm256_blendv_ps(th.t3, th.t11, m1), s, _CMP_LT_OQ);
  idx = _mm256_add_epi32(idx, _mm256_and_si256(_mm256_castps_si256(m2), _mm256_set1_epi32(4)));
  const __m256 t3 = _mm256_permutevar8x32_ps(th.quarter, _mm256_srli_epi32(idx, 2));
  const __m256 m3 = _mm256_cmp_ps(t3, s, _CMP_LT_OQ);
  idx = _mm256_add_epi32(idx, _mm256_and_si256(_mm256_castps_si256(m3), _mm256_set1_epi32(2)));
  const __m256 t4 = _mm256_permutevar8x32_ps(th.even, _mm256_srli_epi32(idx, 1));
  const __m256 m4 = _mm256_cmp_ps(t4, s, _CMP_LT_OQ);
  return _mm256_add_epi32(idx, _mm256_and_si256(_mm256_castps_si256(m4), _mm256_set1_epi32(1)));
}

// The scaled values are not clamped to [-1, 1] as the reference does: every threshold lies strictly
// inside (-1, 1), so a value beyond +-1 has the same count as +-1 itself.
template <DType D>
QTOOL_AVX2 inline __m256 scaled8(const uint8_t* src, uint64_t i, __m256 vr) {
  return _mm256_mul_ps(simd::load8<D>(src + i * simd::elem_size<D>()), vr);
}

// Where full block b starts in the input; the hardware is asked to fetch ahead of it.
template <DType D>
inline const uint8_t* block_input(const uint8_t* data, uint32_t blocksize, uint64_t b) {
  const uint8_t* src = data + b * blocksize * simd::elem_size<D>();
  simd::prefetch_ahead(src, uint64_t{blocksize} * simd::elem_size<D>());
  return src;
}

// Block b's absmax, from the bits of its magnitudes (simd.hpp), stored; returns the reciprocal the
// block is scaled by. BadValueError on Inf/NaN.
template <DType D>
inline float store_block_absmax(uint32_t bits, uint64_t b, uint8_t* absmax_out) {
  if (bits >= simd::inf_bits<D>()) throw BadValueError(BadValue::NonFinite);
  const float amax = simd::from_bits<D>(bits);
  store_f32(absmax_out + 4 * b, amax);
  return 1.0f / std::max(amax, kMinAbsmax);
}

// One full block (blocksize a multiple of 16) scaled by `r`, 16 elements a step.
template <DType D, bool Fp4>
QTOOL_AVX2 inline void block_avx2(const Thresholds& thr, __m128i pattern_of, const uint8_t* src,
                                  uint32_t blocksize, float r, uint8_t* out) {
  const __m256 vr = _mm256_set1_ps(r);
  const __m128i nibble_weights = _mm_set1_epi16(0x0110);  // bytes (16, 1): 16 * even + odd
  for (uint64_t i = 0; i < blocksize; i += 16) {
    const __m256i k0 = count8(thr, scaled8<D>(src, i, vr));
    const __m256i k1 = count8(thr, scaled8<D>(src, i + 8, vr));
    // 16 sorted indices as bytes, in element order.
    const __m256i w16 = _mm256_permute4x64_epi64(_mm256_packs_epi32(k0, k1), 0xD8);
    __m128i bytes = _mm_packus_epi16(_mm256_castsi256_si128(w16), _mm256_extracti128_si256(w16, 1));
    if constexpr (Fp4) bytes = _mm_shuffle_epi8(pattern_of, bytes);
    const __m128i pairs = _mm_maddubs_epi16(bytes, nibble_weights);
    _mm_storel_epi64(reinterpret_cast<__m128i*>(out + i / 2), _mm_packus_epi16(pairs, pairs));
  }
}

// Quantizes the full blocks [block_begin, block_end) (blocksize a multiple of 16).
template <DType D, bool Fp4>
QTOOL_AVX2 void full_blocks_avx2(const uint8_t* data, const Bnb4Table& t, uint32_t blocksize,
                                 uint64_t block_begin, uint64_t block_end, uint8_t* packed,
                                 uint8_t* absmax_out) {
  const Thresholds thr = make_thresholds(t.thresholds.data());
  const __m128i pattern_of = _mm_loadu_si128(reinterpret_cast<const __m128i*>(t.pattern_of.data()));
  for (uint64_t b = block_begin; b < block_end; ++b) {
    const uint8_t* src = block_input<D>(data, blocksize, b);
    const float r = store_block_absmax<D>(simd::absmax_bits_avx2<D>(src, blocksize), b, absmax_out);
    block_avx2<D, Fp4>(thr, pattern_of, src, blocksize, r, packed + b * blocksize / 2);
  }
}

// AVX-512: the same four-step search on 16 lanes, each step a permute of a 16-entry table by the
// index so far (table[k] is the threshold the step compares with when k is the index so far), a
// compare into a mask and a masked add.
struct Thresholds16 {
  __m512 t7;
  __m512 step4;  // [k] = t[k + 3] for k in {0, 8}
  __m512 step2;  // [k] = t[k + 1] for k in {0, 4, 8, 12}
  __m512 step1;  // [k] = t[k] for even k
};

QTOOL_AVX512 inline Thresholds16 make_thresholds16(const float* t) {
  alignas(64) float s4[16] = {}, s2[16] = {}, s1[16] = {};
  for (int k = 0; k < 16; k += 8) s4[k] = t[k + 3];
  for (int k = 0; k < 16; k += 4) s2[k] = t[k + 1];
  for (int k = 0; k < 16; k += 2) s1[k] = t[k];
  return {_mm512_set1_ps(t[7]), _mm512_load_ps(s4), _mm512_load_ps(s2), _mm512_load_ps(s1)};
}

QTOOL_AVX512 inline __m512i count16(const Thresholds16& th, __m512 s) {
  __m512i k = _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask(th.t7, s, _CMP_LT_OQ), _mm512_set1_epi32(8));
  k = _mm512_mask_add_epi32(k, _mm512_cmp_ps_mask(_mm512_permutexvar_ps(k, th.step4), s, _CMP_LT_OQ), k,
                            _mm512_set1_epi32(4));
  k = _mm512_mask_add_epi32(k, _mm512_cmp_ps_mask(_mm512_permutexvar_ps(k, th.step2), s, _CMP_LT_OQ), k,
                            _mm512_set1_epi32(2));
  return _mm512_mask_add_epi32(k, _mm512_cmp_ps_mask(_mm512_permutexvar_ps(k, th.step1), s, _CMP_LT_OQ), k,
                               _mm512_set1_epi32(1));
}

// The search above as the block loop's counter.
struct SearchCount {
  Thresholds16 th;
  QTOOL_AVX512 __m512i operator()(__m512 s) const { return count16(th, s); }
};

// Where the thresholds allow it (nf4's are at least 0.08 apart), a table lookup instead of the
// search: [-1, 1) cut into 32 buckets of 1/16, bucket k = trunc(16 s + 16) (clamped to 31) holding
// at most one threshold; the count is the number of thresholds below the bucket plus one when s
// is above the bucket's own. 16 s + 16 rounds at most 2^-24 of s across a bucket's lower edge
// (never below it), which is harmless when the bucket below has its threshold further from that
// edge: make_buckets checks both conditions, and fp4 (two thresholds around 0) keeps the search.
struct Buckets {
  bool usable = true;
  alignas(64) float thr[32];
  alignas(64) int32_t below[32];
};

Buckets make_buckets(const Bnb4Table& t) {
  Buckets b;
  for (int k = 0; k < 32; ++k) {
    const float lo = static_cast<float>(k) / 16.0f - 1.0f, hi = static_cast<float>(k + 1) / 16.0f - 1.0f;
    int below = 0, inside = 0;
    b.thr[k] = 2.0f;  // no threshold: s is never above it
    for (float x : t.thresholds) {
      if (!(x > -1.0f && x < 1.0f)) b.usable = false;
      if (x < lo) ++below;
      if (x >= lo && x < hi) {
        ++inside;
        b.thr[k] = x;
        if (!(x < hi - 0x1p-22f)) b.usable = false;
      }
    }
    if (inside > 1) b.usable = false;
    b.below[k] = below;
  }
  return b;
}

const Buckets& buckets_of(Scheme scheme) {
  static const Buckets nf4 = make_buckets(bnb4_table(Scheme::Nf4));
  static const Buckets fp4 = make_buckets(bnb4_table(Scheme::Fp4));
  return scheme == Scheme::Fp4 ? fp4 : nf4;
}

struct BucketCount {
  __m512 thr_lo, thr_hi;
  __m512i below_lo, below_hi;
  QTOOL_AVX512 explicit BucketCount(const Buckets& b)
      : thr_lo(_mm512_load_ps(b.thr)),
        thr_hi(_mm512_load_ps(b.thr + 16)),
        below_lo(_mm512_load_si512(b.below)),
        below_hi(_mm512_load_si512(b.below + 16)) {}
  QTOOL_AVX512 __m512i operator()(__m512 s) const {
    const __m512 sixteen = _mm512_set1_ps(16.0f);
    const __m512i key =
        _mm512_min_epi32(_mm512_cvttps_epi32(_mm512_fmadd_ps(s, sixteen, sixteen)), _mm512_set1_epi32(31));
    const __m512 thr = _mm512_permutex2var_ps(thr_lo, key, thr_hi);
    const __m512i below = _mm512_permutex2var_epi32(below_lo, key, below_hi);
    return _mm512_mask_add_epi32(below, _mm512_cmp_ps_mask(thr, s, _CMP_LT_OQ), below, _mm512_set1_epi32(1));
  }
};

// 16 codes (int32 lanes, element order) -> 8 bytes, high nibble first: each 64-bit lane holds an
// (even, odd) pair; (lane << 4) | (lane >> 32) puts even << 4 | odd in its low byte.
QTOOL_AVX512 inline __m128i pack_nibbles16(__m512i k) {
  const __m512i pairs = _mm512_or_si512(_mm512_slli_epi64(k, 4), _mm512_srli_epi64(k, 32));
  return _mm512_cvtepi64_epi8(pairs);
}

// One full block (blocksize a multiple of 32) scaled by `r`, 32 elements a step.
template <DType D, bool Fp4, typename Count>
QTOOL_AVX512 inline void block_avx512(const Count& count, __m512i pattern_of, const uint8_t* src,
                                      uint32_t blocksize, float r, uint8_t* out) {
  const __m512 vr = _mm512_set1_ps(r);
  for (uint64_t i = 0; i < blocksize; i += 32) {
    __m512i k0 = count(_mm512_mul_ps(simd::load16<D>(src + i * simd::elem_size<D>()), vr));
    __m512i k1 = count(_mm512_mul_ps(simd::load16<D>(src + (i + 16) * simd::elem_size<D>()), vr));
    if constexpr (Fp4) {
      k0 = _mm512_permutexvar_epi32(k0, pattern_of);
      k1 = _mm512_permutexvar_epi32(k1, pattern_of);
    }
    const __m128i bytes = _mm_unpacklo_epi64(pack_nibbles16(k0), pack_nibbles16(k1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i / 2), bytes);
  }
}

template <DType D, bool Fp4, typename Count>
QTOOL_AVX512 void full_blocks_avx512(const uint8_t* data, const Bnb4Table& t, const Count& count,
                                     uint32_t blocksize, uint64_t block_begin, uint64_t block_end,
                                     uint8_t* packed, uint8_t* absmax_out) {
  alignas(64) int32_t pattern[16];
  for (int k = 0; k < 16; ++k) pattern[k] = t.pattern_of[static_cast<size_t>(k)];
  const __m512i pattern_of = _mm512_load_si512(pattern);
  for (uint64_t b = block_begin; b < block_end; ++b) {
    const uint8_t* src = block_input<D>(data, blocksize, b);
    const float r = store_block_absmax<D>(simd::absmax_bits_avx512<D>(src, blocksize), b, absmax_out);
    block_avx512<D, Fp4>(count, pattern_of, src, blocksize, r, packed + b * blocksize / 2);
  }
}

template <DType D, bool Fp4>
QTOOL_AVX512 void full_blocks_avx512(const uint8_t* data, Scheme scheme, const Bnb4Table& t,
                                     uint32_t blocksize, uint64_t block_begin, uint64_t block_end,
                                     uint8_t* packed, uint8_t* absmax_out) {
  if (const Buckets& b = buckets_of(scheme); b.usable)
    full_blocks_avx512<D, Fp4>(data, t, BucketCount(b), blocksize, block_begin, block_end, packed,
                               absmax_out);
  else
    full_blocks_avx512<D, Fp4>(data, t, SearchCount{make_thresholds16(t.thresholds.data())}, blocksize,
                               block_begin, block_end, packed, absmax_out);
}

template <DType D>
QTOOL_AVX2 void full_blocks_dispatch(const uint8_t* data, Scheme scheme, const Bnb4Table& t,
                                     uint32_t blocksize, uint64_t block_begin, uint64_t block_end,
                                     uint8_t* packed, uint8_t* absmax, bool avx512) {
  const bool fp4 = scheme == Scheme::Fp4;
  if (avx512 && blocksize % 32 == 0) {
    if (fp4)
      full_blocks_avx512<D, true>(data, scheme, t, blocksize, block_begin, block_end, packed, absmax);
    else
      full_blocks_avx512<D, false>(data, scheme, t, blocksize, block_begin, block_end, packed, absmax);
  } else if (fp4) {
    full_blocks_avx2<D, true>(data, t, blocksize, block_begin, block_end, packed, absmax);
  } else {
    full_blocks_avx2<D, false>(data, t, blocksize, block_begin, block_end, packed, absmax);
  }
}
#endif

}  // namespace

const Bnb4Table& bnb4_table(Scheme scheme) {
  static const Bnb4Table nf4 = make_table(Scheme::Nf4);
  static const Bnb4Table fp4 = make_table(Scheme::Fp4);
  return scheme == Scheme::Fp4 ? fp4 : nf4;
}

void bnb4_quantize_blocks_ref(const WeightView& w, Scheme scheme, uint32_t blocksize, uint64_t block_begin,
                              uint64_t block_end, uint8_t* packed, uint8_t* absmax) {
  const Bnb4Table& t = bnb4_table(scheme);
  for (uint64_t b = block_begin; b < block_end; ++b) quantize_block_ref(w, t, blocksize, b, packed, absmax);
}

void bnb4_quantize_blocks_fast(const WeightView& w, Scheme scheme, uint32_t blocksize, uint64_t block_begin,
                               uint64_t block_end, uint8_t* packed, uint8_t* absmax, Impl impl) {
#if QTOOL_HAVE_X86_SIMD
  if (have_simd() && blocksize % 16 == 0) {
    const Bnb4Table& t = bnb4_table(scheme);
    const uint64_t n_full = w.numel() / blocksize;
    const uint64_t full_end = std::min(block_end, n_full);
    if (block_begin < full_end) {
      const bool avx512 = use_avx512(impl);
      switch (w.dtype) {
        case DType::BF16:
          full_blocks_dispatch<DType::BF16>(w.data, scheme, t, blocksize, block_begin, full_end, packed,
                                            absmax, avx512);
          break;
        case DType::F16:
          full_blocks_dispatch<DType::F16>(w.data, scheme, t, blocksize, block_begin, full_end, packed,
                                           absmax, avx512);
          break;
        default:
          full_blocks_dispatch<DType::F32>(w.data, scheme, t, blocksize, block_begin, full_end, packed,
                                           absmax, avx512);
          break;
      }
    }
    for (uint64_t b = std::max(block_begin, full_end); b < block_end; ++b)
      quantize_block_ref(w, t, blocksize, b, packed, absmax);
    return;
  }
#endif
  bnb4_quantize_blocks_ref(w, scheme, blocksize, block_begin, block_end, packed, absmax);
}

void bnb4_dequantize_range(const uint8_t* packed, const float* code, const float* absmax, uint32_t blocksize,
                           uint64_t begin, uint64_t end, float* out) {
  for (uint64_t i = begin; i < end; ++i) {
    const uint8_t byte = packed[i / 2];
    const uint8_t q = (i & 1) ? (byte & 0x0F) : (byte >> 4);
    out[i - begin] = code[q] * absmax[i / blocksize];
  }
}

std::string python_float_repr(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v < 0 ? "-Infinity" : "Infinity";
  if (v == 0) return std::signbit(v) ? "-0.0" : "0.0";
  // The shortest round-trip digits, as d.ddde±XX.
  char buf[64];
  const auto r = std::to_chars(buf, buf + sizeof buf, v, std::chars_format::scientific);
  QTOOL_ASSERT(r.ec == std::errc());
  const std::string_view s(buf, static_cast<size_t>(r.ptr - buf));
  const bool negative = s.front() == '-';
  const size_t e_at = s.find('e');
  QTOOL_ASSERT(e_at != std::string_view::npos);
  std::string digits;
  for (char c : s.substr(negative ? 1 : 0, e_at - (negative ? 1 : 0)))
    if (c != '.') digits += c;
  int exponent = 0;
  std::from_chars(s.data() + e_at + (s[e_at + 1] == '+' ? 2 : 1), s.data() + s.size(), exponent);
  std::string out = negative ? "-" : "";
  const int n = static_cast<int>(digits.size());
  if (exponent >= -4 && exponent < 16) {
    if (exponent < 0) {
      out += "0." + std::string(static_cast<size_t>(-exponent - 1), '0') + digits;
    } else if (n <= exponent + 1) {
      out += digits + std::string(static_cast<size_t>(exponent + 1 - n), '0') + ".0";
    } else {
      out += digits.substr(0, static_cast<size_t>(exponent + 1)) + "." +
             digits.substr(static_cast<size_t>(exponent + 1));
    }
  } else {
    out += digits.substr(0, 1);
    if (n > 1) out += "." + digits.substr(1);
    char e[16];
    std::snprintf(e, sizeof e, "e%c%02d", exponent < 0 ? '-' : '+', exponent < 0 ? -exponent : exponent);
    out += e;
  }
  return out;
}

namespace {

std::string quant_state_json_with(DType dtype, uint64_t rows, uint64_t cols, const SchemeOptions& options,
                                  const std::string& offset) {
  std::string json =
      str_cat("{\"quant_type\": \"", scheme_name(options.scheme), "\", \"blocksize\": ", options.blocksize,
              ", \"dtype\": \"", dtype_torch_name(dtype), "\", \"shape\": [", rows, ", ", cols, "]");
  if (options.double_quant) {
    json += str_cat(", \"nested_blocksize\": ", kNestedBlocksize,
                    ", \"nested_dtype\": \"float32\", \"nested_offset\": ", offset);
  }
  return json + "}";
}

}  // namespace

std::string quant_state_json(DType dtype, uint64_t rows, uint64_t cols, const SchemeOptions& options,
                             float nested_offset) {
  return quant_state_json_with(dtype, rows, cols, options,
                               python_float_repr(static_cast<double>(nested_offset)));
}

size_t quant_state_max_size(DType dtype, uint64_t rows, uint64_t cols, const SchemeOptions& options) {
  return quant_state_json_with(dtype, rows, cols, options, std::string(kMaxFloatReprChars, '0')).size();
}

namespace {

// The quant_state JSON, then zeros: the part has room for the longest nested_offset
// (quant_state_bytes).
void write_quant_state(const WeightView& w, const SchemeOptions& options, float nested_offset,
                       std::span<uint8_t> state) {
  const std::string json = quant_state_json(w.dtype, w.rows, w.cols, options, nested_offset);
  QTOOL_ASSERT(json.size() <= state.size());
  std::memcpy(state.data(), json.data(), json.size());
  std::memset(state.data() + json.size(), 0, state.size() - json.size());
}

// Double quant of the float32 block absmax into outs[1] (codes), outs[3] (nested absmax) and
// outs[4] (the nested code map); returns the nested offset, mean(absmax).
float double_quantize_absmax(const std::vector<float>& absmax, std::span<const std::span<uint8_t>> outs,
                             ThreadPool& pool, Impl impl) {
  const uint64_t n_blocks = absmax.size();
  const float offset = torch_mean_f32(absmax.data(), n_blocks);
  if (!std::isfinite(offset))
    fail(ErrorKind::InvalidInput,
         "the mean of the block absmax overflows float32; double quant cannot encode it");
  const uint64_t n_blocks2 = (n_blocks + kNestedBlocksize - 1) / kNestedBlocksize;
  pool.parallel_for(n_blocks2, 64, [&](size_t b, size_t e) {
    dynamic_quantize_blocks(absmax.data(), n_blocks, offset, b, e, outs[1].data(), outs[3].data(), impl);
  });
  std::memcpy(outs[4].data(), dynamic_map_table().data(), sizeof(float) * 256);
  return offset;
}

}  // namespace

void bnb4_quantize(const WeightView& w, const SchemeOptions& options,
                   std::span<const std::span<uint8_t>> outs, ThreadPool& pool, Impl impl,
                   const RangeDone& range_done) {
  const uint64_t n = w.numel();
  const uint64_t n_blocks = (n + options.blocksize - 1) / options.blocksize;
  uint8_t* packed = outs[0].data();
  std::vector<float> absmax_f32;
  uint8_t* absmax = outs[1].data();
  const Bnb4Table& t = bnb4_table(options.scheme);
  std::memcpy(outs[2].data(), t.code.data(), sizeof(float) * 16);
  if (options.double_quant) {
    absmax_f32.resize(n_blocks);
    absmax = reinterpret_cast<uint8_t*>(absmax_f32.data());
  } else {
    write_quant_state(w, options, 0.0f, outs.back());
  }
  // Ranges are reported as they are done without double quant, whose absmax are not final yet.
  const RangeDone not_yet;
  quantize_in_steps(
      n_blocks, options.blocksize, n, w.dtype, pool, options.double_quant ? not_yet : range_done,
      [&](uint64_t sb, uint64_t se) {
        if (impl == Impl::Reference)
          bnb4_quantize_blocks_ref(w, options.scheme, options.blocksize, sb, se, packed, absmax);
        else
          bnb4_quantize_blocks_fast(w, options.scheme, options.blocksize, sb, se, packed, absmax, impl);
      });
  if (!options.double_quant) return;
  write_quant_state(w, options, double_quantize_absmax(absmax_f32, outs, pool, impl), outs.back());
  if (!range_done) return;
  const uint64_t range =
      std::max<uint64_t>(1, kRangeDoneBytes / (uint64_t{options.blocksize} * dtype_size(w.dtype))) *
      options.blocksize;
  for_each_taken(pool, (n + range - 1) / range, pool.size(),
                 [&](uint64_t k) { range_done(k * range, std::min(n, (k + 1) * range)); });
}

void bnb4_dequantize_linear(const QuantizedLinear& linear, const TensorBytes& parts, float* out,
                            uint64_t row_begin, uint64_t row_end) {
  const uint64_t cols = static_cast<uint64_t>(linear.cols());
  const uint64_t begin = row_begin * cols, end = row_end * cols;
  if (begin >= end) return;
  const uint32_t bs = linear.options.blocksize;
  const uint64_t block_begin = begin / bs, block_end = (end - 1) / bs + 1;
  std::vector<float> absmax(block_end - block_begin);
  decode_absmax(linear, parts, absmax.data(), block_begin, block_end);
  std::array<float, 16> code = bnb4_table(linear.options.scheme).code;
  if (!parts.quant_map.empty()) std::memcpy(code.data(), parts.quant_map.data(), sizeof(float) * 16);
  const uint8_t* packed = parts.weight.data();
  for (uint64_t i = begin; i < end;) {
    const uint64_t b = i / bs;
    const uint64_t stop = std::min(end, (b + 1) * bs);
    const float a = absmax[b - block_begin];
    if (i & 1) {  // a range that starts on a low nibble
      out[i - begin] = code[packed[i / 2] & 0x0F] * a;
      ++i;
    }
    for (; i + 1 < stop; i += 2) {
      const uint8_t byte = packed[i / 2];
      out[i - begin] = code[byte >> 4] * a;
      out[i + 1 - begin] = code[byte & 0x0F] * a;
    }
    if (i < stop) {
      out[i - begin] = code[packed[i / 2] >> 4] * a;
      ++i;
    }
  }
}

std::vector<Part> bnb4_parts(const SchemeOptions& options) {
  if (options.double_quant)
    return {Part::Weight,       Part::Scale,          Part::QuantMap,
            Part::NestedAbsmax, Part::NestedQuantMap, Part::QuantState};
  return {Part::Weight, Part::Scale, Part::QuantMap, Part::QuantState};
}

std::vector<TensorDecl> bnb4_decls(std::string_view module, DType dtype, uint64_t rows, uint64_t cols,
                                   const SchemeOptions& options) {
  const uint64_t n = rows * cols;
  const auto n_blocks = static_cast<int64_t>(ceil_div(n, options.blocksize));
  std::vector<TensorDecl> decls;
  decls.push_back({join_name(module, "weight"), DType::U8, {static_cast<int64_t>((n + 1) / 2), 1}});
  decls.push_back(
      {join_name(module, "weight.absmax"), options.double_quant ? DType::U8 : DType::F32, {n_blocks}});
  decls.push_back({join_name(module, "weight.quant_map"), DType::F32, {16}});
  if (options.double_quant) {
    decls.push_back({join_name(module, "weight.nested_absmax"),
                     DType::F32,
                     {static_cast<int64_t>(ceil_div(static_cast<uint64_t>(n_blocks), kNestedBlocksize))}});
    decls.push_back({join_name(module, "weight.nested_quant_map"), DType::F32, {256}});
  }
  // The quant_state part's declared size: the longest its JSON can be (with double quant the length
  // depends on nested_offset's repr; the part is then variable-length).
  decls.push_back({join_name(module, str_cat(kQuantStatePrefix, scheme_name(options.scheme))),
                   DType::U8,
                   {static_cast<int64_t>(quant_state_max_size(dtype, rows, cols, options))},
                   options.double_quant});
  return decls;
}

namespace {

QuantizedLinear bnb4_read(const TensorFinder& f, Component::Entry state_entry, std::string_view suffix_type) {
  const Component& comp = f.component();
  const TensorInfo& st = comp.info(state_entry);
  const std::string module = module_of_tensor(st.name);
  if (st.dtype != DType::U8)
    fail(ErrorKind::InvalidInput, f.where(state_entry), ": dtype ", dtype_name(st.dtype),
         ", expected U8 JSON bytes");
  const auto bytes = comp.data(state_entry);
  const nlohmann::json j =
      parse_json(std::string_view(reinterpret_cast<const char*>(bytes.data()), bytes.size()),
                 str_cat(f.where(state_entry), ": quant_state"));
  auto bad = [&](std::string_view key, std::string_view msg) {
    fail(ErrorKind::InvalidInput, f.where(state_entry), ": quant_state key '", key, "' ", msg);
  };
  if (!j.is_object()) bad("", "is not a JSON object");
  auto get = [&](std::string_view key) -> const nlohmann::json& {
    const auto it = j.find(std::string(key));
    if (it == j.end()) bad(key, "is missing");
    return *it;
  };
  QuantizedLinear q;
  q.module = module;
  const auto& quant_type = get("quant_type");
  if (!quant_type.is_string() || quant_type.get<std::string>() != suffix_type)
    bad("quant_type", str_cat("does not match the tensor name (", suffix_type, ")"));
  q.options.scheme = suffix_type == "nf4" ? Scheme::Nf4 : Scheme::Fp4;
  const auto& bs = get("blocksize");
  if (!bs.is_number_unsigned() || bs.get<uint64_t>() > kMaxBlocksize)
    bad("blocksize", "is not a power of two from 32 to 4096");
  q.options.blocksize = bs.get<uint32_t>();
  try {
    validate_options(q.options, f.where(state_entry));
  } catch (const Error&) {
    bad("blocksize", str_cat("= ", q.options.blocksize, " is not a power of two from 32 to 4096"));
  }
  const auto& dt = get("dtype");
  const std::string dts = dt.is_string() ? dt.get<std::string>() : "";
  if (dts == "bfloat16")
    q.orig_dtype = DType::BF16;
  else if (dts == "float16")
    q.orig_dtype = DType::F16;
  else if (dts == "float32")
    q.orig_dtype = DType::F32;
  else
    bad("dtype", str_cat("= '", dts, "' is not bfloat16, float16 or float32"));
  const auto& shape = get("shape");
  if (!shape.is_array() || shape.size() != 2 || !shape[0].is_number_unsigned() ||
      !shape[1].is_number_unsigned())
    bad("shape", "is not a 2-D shape [out, in]");
  const uint64_t rows = shape[0].get<uint64_t>(), cols = shape[1].get<uint64_t>();
  if (rows == 0 || cols == 0) bad("shape", "is empty");
  // The element count, and the bytes of its bf16 or f32 dequantized form, must have a size.
  if (rows > INT64_MAX || cols > INT64_MAX || !checked_mul(rows, cols, 4))
    bad("shape", str_cat("[", rows, ", ", cols, "] has more elements than fit in 64 bits"));
  q.shape = {static_cast<int64_t>(rows), static_cast<int64_t>(cols)};
  if (j.contains("nested_absmax") || j.contains("nested_offset") || j.contains("nested_blocksize")) {
    q.options.double_quant = true;
    const auto& nb = get("nested_blocksize");
    if (!nb.is_number_unsigned() || nb.get<uint64_t>() != kNestedBlocksize)
      bad("nested_blocksize", "is not 256");
    const auto& nd = get("nested_dtype");
    if (!nd.is_string() || nd.get<std::string>() != "float32") bad("nested_dtype", "is not \"float32\"");
    const auto& off = get("nested_offset");
    if (!off.is_number()) bad("nested_offset", "is not a number");
    q.nested_offset = static_cast<float>(off.get<double>());
    if (!std::isfinite(q.nested_offset)) bad("nested_offset", "is not finite");
  }
  const uint64_t n = q.numel();
  const uint64_t n_blocks = q.n_blocks();
  const auto w = f.require(join_name(module, "weight"), state_entry, "the packed 4-bit weight");
  f.expect_dtype(w, DType::U8);
  f.expect_numel(w, (n + 1) / 2);
  const auto absmax = f.require(join_name(module, "weight.absmax"), state_entry, "the block absmax");
  f.expect_dtype(absmax, q.options.double_quant ? DType::U8 : DType::F32);
  f.expect_numel(absmax, n_blocks);
  const auto qmap = f.require(join_name(module, "weight.quant_map"), state_entry, "the 4-bit code values");
  f.expect_dtype(qmap, DType::F32);
  f.expect_numel(qmap, 16);
  q.tensor_names = {comp.info(w).name, comp.info(absmax).name, comp.info(qmap).name};
  q.tensor_parts = {Part::Weight, Part::Scale, Part::QuantMap};
  if (q.options.double_quant) {
    const auto na = f.require(join_name(module, "weight.nested_absmax"), state_entry, "double quant");
    f.expect_dtype(na, DType::F32);
    f.expect_numel(na, ceil_div(n_blocks, kNestedBlocksize));
    const auto nm = f.require(join_name(module, "weight.nested_quant_map"), state_entry, "double quant");
    f.expect_dtype(nm, DType::F32);
    f.expect_numel(nm, 256);
    q.tensor_names.push_back(comp.info(na).name);
    q.tensor_names.push_back(comp.info(nm).name);
    q.tensor_parts.push_back(Part::NestedAbsmax);
    q.tensor_parts.push_back(Part::NestedQuantMap);
  } else {
    for (std::string_view s : {"weight.nested_absmax", "weight.nested_quant_map"})
      if (const auto e = comp.find(join_name(module, s)))
        fail(ErrorKind::InvalidInput, f.where(*e), ": present, but the quant_state has no nested_offset");
  }
  q.tensor_names.push_back(st.name);
  q.tensor_parts.push_back(Part::QuantState);
  return q;
}

}  // namespace

// The marker is <m>.weight.quant_state.bitsandbytes__<type>.
std::optional<QuantizedLinear> bnb4_recognise(const TensorFinder& f, Component::Entry e) {
  const std::string& name = f.info(e).name;
  const size_t p = name.rfind(kQuantStatePrefix);
  if (p == std::string::npos || (p != 0 && name[p - 1] != '.') ||
      name.find('.', p + kQuantStatePrefix.size()) != std::string::npos)
    return std::nullopt;
  const std::string type = name.substr(p + kQuantStatePrefix.size());
  if (type != "nf4" && type != "fp4")
    fail(ErrorKind::Unsupported, f.where(e), ": quant type '", type, "' is not supported (nf4, fp4)");
  return bnb4_read(f, e, type);
}

void bnb4_check_unclaimed(const TensorFinder& f, Component::Entry e) {
  const std::string& name = f.info(e).name;
  if (name.ends_with(".weight.absmax"))
    fail(ErrorKind::InvalidInput, f.where(e),
         ": 4-bit absmax without a weight.quant_state.bitsandbytes__nf4/fp4");
}

void bnb4_read_written_state(QuantizedLinear& linear, std::span<const std::span<uint8_t>> outs) {
  if (!linear.options.double_quant) return;
  for (size_t i = 0; i < linear.tensor_parts.size(); ++i) {
    if (linear.tensor_parts[i] != Part::QuantState) continue;
    const auto& bytes = outs[i];
    const nlohmann::json state = nlohmann::json::parse(bytes.begin(), bytes.end());
    linear.nested_offset = state.at("nested_offset").get<float>();
  }
}

}  // namespace qtool::quant::detail
