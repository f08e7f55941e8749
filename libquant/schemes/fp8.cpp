// fp8 (e4m3fn, e5m2): compressed-tensors weight-only (`naive-quantized`), per output channel or per
// tensor, computed in the weight's dtype as compressed-tensors does with torch on the CPU:
//   scale = dtype(amax / M)                 (M = 448 for e4m3fn, 57344 for e5m2); 0 -> eps(dtype)
//   s     = dtype(w / scale) + 0            (float32 quotient rounded to the weight's dtype, plus
//                                            compressed-tensors' zero zero-point: -0 becomes +0)
//   q     = fp8_rne(clamp(s, -M, M))        (clamp first: the cast does not saturate)
// Layout: <m>.weight F8_E4M3|F8_E5M2 [out, in], <m>.weight_scale (weight dtype) [out, 1] or [1].
// Dequantize: float(q) * scale, exact in float32.
#include <algorithm>
#include <cmath>
#include <mutex>

#include "qtool/libquant/config.hpp"
#include "scheme.hpp"
#include "simd.hpp"

namespace qtool::quant::detail {
namespace {

constexpr Fp8Format kE4M3{448.0f, f32_to_fp8_e4m3, fp8_e4m3_to_f32};
constexpr Fp8Format kE5M2{57344.0f, f32_to_fp8_e5m2, fp8_e5m2_to_f32};

float dtype_eps(DType dtype) {
  switch (dtype) {
    case DType::BF16: return 0.0078125f;      // 2^-7
    case DType::F16: return 0.0009765625f;    // 2^-10
    default: return 1.1920928955078125e-07f;  // 2^-23
  }
}

#if QTOOL_HAVE_X86_SIMD
// fp8 code of finite float32 lanes within +-max, round to nearest even with subnormals (the same
// integer arithmetic as c10's fp8e4m3fn_from_fp32_value / fp8e5m2_from_fp32_value), in the low
// byte of each lane (returned in float lanes); for AVX2 (__m256) and AVX-512 (__m512) lanes alike.
template <bool E5M2, typename V>
[[gnu::always_inline]] inline V encode_fp8(const V& x) {
  using U = typename simd::LaneBits<sizeof(V)>::type;
  using I = typename simd::LaneBits<sizeof(V)>::signed_type;
  constexpr int kManShift = E5M2 ? 21 : 20;  // 23 - mantissa bits
  constexpr uint32_t kMinNormal = E5M2 ? (113u << 23) : (121u << 23);
  constexpr uint32_t kDenormMask = E5M2 ? (134u << 23) : (141u << 23);
  constexpr uint32_t kRebias = static_cast<uint32_t>(E5M2 ? (15 - 127) : (7 - 127)) << 23;
  constexpr uint32_t kHalfUlp = E5M2 ? 0xFFFFFu : 0x7FFFFu;
  const U u = (U)x;
  const U sign = u & 0x80000000u;
  const U a = u ^ sign;
  // Subnormal codes: adding 2^(bias + mantissa) rounds to the code's spacing in float32 hardware.
  const V dm = (V)(U{} + kDenormMask);
  const U denorm = (U)((V)a + dm) - kDenormMask;
  const U normal = (a + ((a >> kManShift) & 1u) + (kRebias + kHalfUlp)) >> kManShift;
  const U code = (I)a < static_cast<int32_t>(kMinNormal) ? denorm : normal;
  return (V)(code | (sign >> 24));
}

// The quotient w / scale rounded to float32 (RNE). With the reciprocal y = fl(1 / scale), Markstein's
// correction q1 = fl(q0 + fl(w - q0 * scale) * y) of q0 = fl(w * y) (two FMAs) is the correctly
// rounded quotient; where it is used (BF16 and F16 weights, 1 / scale finite) it was checked
// against the division for every pair of a 16-bit weight value w and a 16-bit scale with
// |w| <= 450 * scale (the values a row or tensor with that scale holds): after rounding to the
// weight's dtype the two agree everywhere, up to the sign of a zero quotient, which the zero
// point's + 0 erases. F32 weights and scales whose reciprocal overflows divide.
// The overloads the lane-generic code below picks by width.
QTOOL_AVX2_FMA inline __m256 fmadd(__m256 a, __m256 b, __m256 c) { return _mm256_fmadd_ps(a, b, c); }
QTOOL_AVX512 inline __m512 fmadd(__m512 a, __m512 b, __m512 c) { return _mm512_fmadd_ps(a, b, c); }
QTOOL_AVX2 inline __m256 clamp_lanes(__m256 s, __m256 vmax) {
  return _mm256_min_ps(_mm256_max_ps(s, _mm256_sub_ps(_mm256_setzero_ps(), vmax)), vmax);
}
QTOOL_AVX512 inline __m512 clamp_lanes(__m512 s, __m512 vmax) {
  return _mm512_min_ps(_mm512_max_ps(s, _mm512_sub_ps(_mm512_setzero_ps(), vmax)), vmax);
}

// The fp8 codes of weights `x` (float32 lanes), in the low byte of each lane: the quotient,
// rounded to the weight's dtype, plus the zero point, clamped to +-max, encoded.
template <DType D, bool E5M2, bool Recip, typename V>
[[gnu::always_inline]] inline V quant_lanes(const V& x, const V& vscale, const V& vrecip, const V& vmax) {
  V q;
  if constexpr (Recip) {
    const V q0 = x * vrecip;
    q = fmadd(fmadd(-q0, vscale, x), vrecip, q0);  // fl(-q0 * scale + x) = fnmadd(q0, scale, x)
  } else {
    q = x / vscale;
  }
  return encode_fp8<E5M2>(clamp_lanes(simd::round_to<D>(q) + V{}, vmax));
}

// The reference's arithmetic for the last columns of a row.
inline void quant_tail(DType dtype, const Fp8Format& fmt, const uint8_t* src, uint64_t c, uint64_t cols,
                       float scale, uint8_t* q) {
  for (; c < cols; ++c) {
    const float s = round_to_dtype(dtype, load_element(dtype, src, c) / scale) + 0.0f;
    q[c] = fmt.encode(std::clamp(s, -fmt.max, fmt.max));
  }
}

// The store of one step of codes, by width: codes(k) gives the code lanes of columns k, k + 1, ...
// of the step; AVX2 packs the low bytes of four vectors into 32 bytes, AVX-512 narrows one to 16.
struct Avx2Codes {
  using V = __m256;
  static constexpr uint64_t kStep = 32;
  template <typename Codes>
  QTOOL_AVX2_FMA static void store(uint8_t* q, const Codes& codes) {
    const __m256i packed =
        simd::pack_u8_32((__m256i)codes(0), (__m256i)codes(8), (__m256i)codes(16), (__m256i)codes(24));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), packed);
  }
};
struct Avx512Codes {
  using V = __m512;
  static constexpr uint64_t kStep = 16;
  template <typename Codes>
  QTOOL_AVX512 static void store(uint8_t* q, const Codes& codes) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtepi32_epi8((__m512i)codes(0)));
  }
};

// One row's codes: whole steps of L's lanes, the rest as the reference does. Always inlined into
// the row function of L's target.
template <typename L, DType D, bool E5M2, bool Recip>
[[gnu::always_inline]] inline void quant_row_lanes(const uint8_t* src, uint64_t cols, float scale,
                                                   uint8_t* q) {
  using V = typename L::V;
  const Fp8Format& fmt = E5M2 ? kE5M2 : kE4M3;
  const V vscale = simd::splat<V>(scale), vrecip = simd::splat<V>(1.0f / scale),
          vmax = simd::splat<V>(fmt.max);
  uint64_t c = 0;
  // The codes of columns c + k, c + k + 1, ... (always inlined into L::store).
  const auto codes = [&](uint64_t k) __attribute__((always_inline)) {
    return quant_lanes<D, E5M2, Recip>(simd::load_lanes<D, V>(src + (c + k) * simd::elem_size<D>()), vscale,
                                       vrecip, vmax);
  };
  for (; c + L::kStep <= cols; c += L::kStep) L::store(q + c, codes);
  quant_tail(D, fmt, src, c, cols, scale, q);
}

template <DType D, bool E5M2, bool Recip>
QTOOL_AVX2_FMA void quant_row_avx2(const uint8_t* src, uint64_t cols, float scale, uint8_t* q) {
  quant_row_lanes<Avx2Codes, D, E5M2, Recip>(src, cols, scale, q);
}

template <DType D, bool E5M2, bool Recip>
QTOOL_AVX512 void quant_row_avx512(const uint8_t* src, uint64_t cols, float scale, uint8_t* q) {
  quant_row_lanes<Avx512Codes, D, E5M2, Recip>(src, cols, scale, q);
}

// BF16 weights with AVX-512, 32 columns a step: the quotient and its rounding to bf16 in float32
// lanes as above, then the clamp and the encoding on the 32 bf16 values at once, in 16-bit lanes
// (bits a of |s|: the format's integer arithmetic with 7 mantissa bits in, about half the
// instructions of encode_fp8 on float lanes). Every |s| in (half the smallest fp8 subnormal, the
// smallest normal) would need the subnormal arithmetic: a step holding one (rare in real weights;
// the tests hold every value) takes the float lanes.
template <bool E5M2>
struct Bf16Encoding {
  static constexpr int kShift = E5M2 ? 5 : 4;                     // 7 - mantissa bits
  static constexpr uint16_t kMax = E5M2 ? 0x4760 : 0x43E0;        // the format's max (57344, 448)
  static constexpr uint16_t kMinNormal = E5M2 ? 0x3880 : 0x3C80;  // 2^-14, 2^-6
  static constexpr uint16_t kZeroUpTo = E5M2 ? 0x3700 : 0x3A80;   // 2^-17, 2^-10: code 0 (ties to even)
  static constexpr uint16_t kRebiasHalf =                         // exponent bias change + half ulp - 1
      static_cast<uint16_t>(((E5M2 ? 15 : 7) - 127) * 128 + (1 << (kShift - 1)) - 1);
};

// Word k of the step: element k's bf16 bits, from the rounded float lanes of unpacklo (elements
// 8g..8g+3 of each 128-bit lane g) and unpackhi (8g+4..8g+7), in their high halves.
QTOOL_AVX512 inline __m512i element_order_words() {
  alignas(64) uint16_t idx[32];
  for (int e = 0; e < 32; ++e) {
    const int g = e / 8, r = e % 8;
    idx[e] = static_cast<uint16_t>(r < 4 ? 2 * (4 * g + r) + 1 : 32 + 2 * (4 * g + r - 4) + 1);
  }
  return _mm512_load_si512(idx);
}

// The quotient's float32 bits plus the rounding increment: bf16(x / scale) in the high half.
QTOOL_AVX512 inline __m512i rounded_quotient(__m512 x, __m512 vscale, __m512 vrecip) {
  const __m512 q0 = _mm512_mul_ps(x, vrecip);
  const __m512i u = _mm512_castps_si512(_mm512_fmadd_ps(_mm512_fnmadd_ps(q0, vscale, x), vrecip, q0));
  const __m512i low_bit = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  return _mm512_add_epi32(u, _mm512_add_epi32(low_bit, _mm512_set1_epi32(0x7FFF)));
}

template <bool E5M2>
QTOOL_AVX512 void quant_row_bf16_avx512(const uint8_t* src, uint64_t cols, float scale, uint8_t* q) {
  using E = Bf16Encoding<E5M2>;
  const Fp8Format& fmt = E5M2 ? kE5M2 : kE4M3;
  const __m512 vscale = _mm512_set1_ps(scale), vrecip = _mm512_set1_ps(1.0f / scale),
               vmax = _mm512_set1_ps(fmt.max);
  const __m512i order = element_order_words(), zero = _mm512_setzero_si512();
  const __m512i magnitude = _mm512_set1_epi16(0x7FFF), max = _mm512_set1_epi16(static_cast<short>(E::kMax));
  const __m512i min_normal = _mm512_set1_epi16(static_cast<short>(E::kMinNormal));
  const __m512i zero_up_to = _mm512_set1_epi16(static_cast<short>(E::kZeroUpTo));
  const __m512i one16 = _mm512_set1_epi16(1), rebias = _mm512_set1_epi16(static_cast<short>(E::kRebiasHalf));
  uint64_t c = 0;
  for (; c + 32 <= cols; c += 32) {
    const __m512i w = _mm512_loadu_si512(src + 2 * c);
    const __m512i bits = _mm512_permutex2var_epi16(
        rounded_quotient(_mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, w)), vscale, vrecip), order,
        rounded_quotient(_mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, w)), vscale, vrecip));
    const __m512i a = _mm512_min_epu16(_mm512_and_si512(bits, magnitude), max);
    const __mmask32 normal = _mm512_cmpge_epu16_mask(a, min_normal);
    if (_kandn_mask32(normal, _mm512_cmpgt_epu16_mask(a, zero_up_to))) {
      for (uint64_t k = 0; k < 32; k += 16) {
        const __m512 x = simd::load_lanes<DType::BF16, __m512>(src + 2 * (c + k));
        const __m512 codes = quant_lanes<DType::BF16, E5M2, true>(x, vscale, vrecip, vmax);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q + c + k),
                         _mm512_cvtepi32_epi8(_mm512_castps_si512(codes)));
      }
      continue;
    }
    __m512i code = _mm512_add_epi16(
        _mm512_add_epi16(a, _mm512_and_si512(_mm512_srli_epi16(a, E::kShift), one16)), rebias);
    code = _mm512_maskz_srli_epi16(normal, code, E::kShift);
    // The sign of a nonzero s (the zero point's + 0 turned -0 into +0).
    code = _mm512_or_si512(
        code, _mm512_maskz_srli_epi16(_mm512_test_epi16_mask(a, a), _mm512_andnot_si512(magnitude, bits), 8));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + c), _mm512_cvtepi16_epi8(code));
  }
  quant_tail(DType::BF16, fmt, src, c, cols, scale, q);
}

template <DType D, bool E5M2>
void quant_row(const uint8_t* src, uint64_t cols, float scale, uint8_t* q, bool avx512) {
  const bool recip = D != DType::F32 && std::isfinite(1.0f / scale);
  if constexpr (D == DType::BF16) {
    if (avx512 && recip) return quant_row_bf16_avx512<E5M2>(src, cols, scale, q);
  }
  if (avx512) {
    if (recip)
      quant_row_avx512<D, E5M2, true>(src, cols, scale, q);
    else
      quant_row_avx512<D, E5M2, false>(src, cols, scale, q);
  } else if (recip) {
    quant_row_avx2<D, E5M2, true>(src, cols, scale, q);
  } else {
    quant_row_avx2<D, E5M2, false>(src, cols, scale, q);
  }
}

// max |w| over elements [0, n), from the magnitudes' bits (simd.hpp); BadValueError on Inf/NaN.
template <DType D>
float absmax_simd(const uint8_t* src, uint64_t n, bool avx512) {
  const uint32_t bits = avx512 ? simd::absmax_bits_avx512<D>(src, n) : simd::absmax_bits_avx2<D>(src, n);
  if (bits >= simd::inf_bits<D>()) throw BadValueError(BadValue::NonFinite);
  return simd::from_bits<D>(bits);
}

template <DType D>
void fp8_rows_simd(const uint8_t* data, uint64_t cols, bool e5m2, float tensor_scale, uint64_t row_begin,
                   uint64_t row_end, uint8_t* q, uint8_t* scales, bool avx512) {
  const float fmt_max = e5m2 ? kE5M2.max : kE4M3.max;
  for (uint64_t r = row_begin; r < row_end; ++r) {
    const uint8_t* src = data + r * cols * simd::elem_size<D>();
    simd::prefetch_ahead(src, cols * simd::elem_size<D>());
    float scale = tensor_scale;
    if (tensor_scale < 0.0f) {
      scale = fp8_scale(D, absmax_simd<D>(src, cols, avx512), fmt_max);
      store_element(D, scales, r, scale);
    }
    if (e5m2)
      quant_row<D, true>(src, cols, scale, q + r * cols, avx512);
    else
      quant_row<D, false>(src, cols, scale, q + r * cols, avx512);
  }
}

// The fast paths need FMA besides AVX2 (the reciprocal's correction).
bool have_fp8_simd() { return cpu_features().fma; }
#endif

}  // namespace

const Fp8Format& fp8_format(Scheme scheme) { return scheme == Scheme::Fp8E5M2 ? kE5M2 : kE4M3; }

float fp8_scale(DType dtype, float amax, float fmt_max) {
  const float scale = round_to_dtype(dtype, amax / fmt_max);
  return scale == 0.0f ? dtype_eps(dtype) : scale;
}

float fp8_absmax_rows(const WeightView& w, uint64_t row_begin, uint64_t row_end, Impl impl) {
  const uint64_t begin = row_begin * w.cols, end = row_end * w.cols;
#if QTOOL_HAVE_X86_SIMD
  if (impl != Impl::Reference && have_fp8_simd()) {
    const uint8_t* src = w.data + begin * dtype_size(w.dtype);
    switch (w.dtype) {
      case DType::BF16: return absmax_simd<DType::BF16>(src, end - begin, use_avx512(impl));
      case DType::F16: return absmax_simd<DType::F16>(src, end - begin, use_avx512(impl));
      default: return absmax_simd<DType::F32>(src, end - begin, use_avx512(impl));
    }
  }
#else
  (void)impl;
#endif
  float amax = 0.0f;
  for (uint64_t i = begin; i < end; ++i) {
    const float v = load_element(w.dtype, w.data, i);
    if (!std::isfinite(v)) throw BadValueError(BadValue::NonFinite);
    amax = std::max(amax, std::fabs(v));
  }
  return amax;
}

void fp8_quantize_rows_ref(const WeightView& w, Scheme scheme, float tensor_scale, uint64_t row_begin,
                           uint64_t row_end, uint8_t* q, uint8_t* scales) {
  const Fp8Format& fmt = fp8_format(scheme);
  for (uint64_t r = row_begin; r < row_end; ++r) {
    float scale = tensor_scale;
    if (tensor_scale < 0.0f) {
      scale = fp8_scale(w.dtype, fp8_absmax_rows(w, r, r + 1, Impl::Reference), fmt.max);
      store_element(w.dtype, scales, r, scale);
    }
    for (uint64_t c = 0; c < w.cols; ++c) {
      const uint64_t i = r * w.cols + c;
      const float v = load_element(w.dtype, w.data, i);
      if (!std::isfinite(v)) throw BadValueError(BadValue::NonFinite);
      const float s = round_to_dtype(w.dtype, v / scale) + 0.0f;  // + the zero point: -0 -> +0
      q[i] = fmt.encode(std::clamp(s, -fmt.max, fmt.max));
    }
  }
}

void fp8_quantize_rows_fast(const WeightView& w, Scheme scheme, float tensor_scale, uint64_t row_begin,
                            uint64_t row_end, uint8_t* q, uint8_t* scales, Impl impl) {
#if QTOOL_HAVE_X86_SIMD
  if (have_fp8_simd()) {
    const bool e5m2 = scheme == Scheme::Fp8E5M2;
    const bool avx512 = use_avx512(impl);
    switch (w.dtype) {
      case DType::BF16:
        fp8_rows_simd<DType::BF16>(w.data, w.cols, e5m2, tensor_scale, row_begin, row_end, q, scales, avx512);
        return;
      case DType::F16:
        fp8_rows_simd<DType::F16>(w.data, w.cols, e5m2, tensor_scale, row_begin, row_end, q, scales, avx512);
        return;
      default:
        fp8_rows_simd<DType::F32>(w.data, w.cols, e5m2, tensor_scale, row_begin, row_end, q, scales, avx512);
        return;
    }
  }
#else
  (void)impl;
#endif
  fp8_quantize_rows_ref(w, scheme, tensor_scale, row_begin, row_end, q, scales);
}

void fp8_dequantize_rows(Scheme scheme, const uint8_t* q, const uint8_t* scales, DType scale_dtype,
                         bool per_tensor, uint64_t cols, uint64_t row_begin, uint64_t row_end, float* out) {
  float table[256];
  const Fp8Format& fmt = fp8_format(scheme);
  for (int i = 0; i < 256; ++i) table[i] = fmt.decode(static_cast<uint8_t>(i));
  for (uint64_t r = row_begin; r < row_end; ++r) {
    const float s = load_element(scale_dtype, scales, per_tensor ? 0 : r);
    const uint8_t* qr = q + r * cols;
    float* o = out + (r - row_begin) * cols;
    for (uint64_t c = 0; c < cols; ++c) o[c] = table[qr[c]] * s;
  }
}

void fp8_quantize(const WeightView& w, const SchemeOptions& options, std::span<const std::span<uint8_t>> outs,
                  ThreadPool& pool, Impl impl, const RangeDone& range_done) {
  uint8_t* q = outs[0].data();
  uint8_t* scales = outs[1].data();
  float tensor_scale = -1.0f;
  if (options.per_tensor) {
    std::mutex mu;
    float amax = 0.0f;
    const uint64_t min_rows = std::max<uint64_t>(1, kMinShareElements / std::max<uint64_t>(1, w.cols));
    pool.parallel_for(w.rows, min_rows, [&](size_t b, size_t e) {
      const float m = fp8_absmax_rows(w, b, e, impl);
      std::lock_guard<std::mutex> lock(mu);
      amax = std::max(amax, m);
    });
    tensor_scale = fp8_scale(w.dtype, amax, fp8_format(options.scheme).max);
    store_element(w.dtype, scales, 0, tensor_scale);
  }
  quantize_in_steps(w.rows, w.cols, w.numel(), w.dtype, pool, range_done, [&](uint64_t r, uint64_t re) {
    if (impl == Impl::Reference)
      fp8_quantize_rows_ref(w, options.scheme, tensor_scale, r, re, q, scales);
    else
      fp8_quantize_rows_fast(w, options.scheme, tensor_scale, r, re, q, scales, impl);
  });
}

void fp8_dequantize_linear(const QuantizedLinear& linear, const TensorBytes& parts, float* out,
                           uint64_t row_begin, uint64_t row_end) {
  fp8_dequantize_rows(linear.options.scheme, parts.weight.data(), parts.scale.data(), linear.orig_dtype,
                      linear.options.per_tensor, static_cast<uint64_t>(linear.cols()), row_begin, row_end,
                      out);
}

std::vector<Part> fp8_parts(const SchemeOptions&) { return {Part::Weight, Part::Scale}; }

std::vector<TensorDecl> fp8_decls(std::string_view module, DType dtype, uint64_t rows, uint64_t cols,
                                  const SchemeOptions& options) {
  const auto out = static_cast<int64_t>(rows), in = static_cast<int64_t>(cols);
  const DType q = options.scheme == Scheme::Fp8E5M2 ? DType::F8_E5M2 : DType::F8_E4M3;
  std::vector<TensorDecl> decls{{join_name(module, "weight"), q, {out, in}}};
  if (options.per_tensor)
    decls.push_back({join_name(module, "weight_scale"), dtype, {1}});
  else
    decls.push_back({join_name(module, "weight_scale"), dtype, {out, 1}});
  return decls;
}

// The marker is <m>.weight_scale beside an F8 weight (other schemes' weight_scale are not ours).
std::optional<QuantizedLinear> fp8_recognise(const TensorFinder& f, Component::Entry scale_entry) {
  const TensorInfo& si = f.info(scale_entry);
  if (!has_suffix(si.name, "weight_scale")) return std::nullopt;
  const std::string module = module_of_tensor(si.name);
  const auto w = f.component().find(join_name(module, "weight"));
  if (!w)
    fail(ErrorKind::InvalidInput, f.where_missing(join_name(module, "weight"), scale_entry),
         " is missing (the weight of this weight_scale)");
  const TensorInfo& wi = f.info(*w);
  if (wi.dtype != DType::F8_E4M3 && wi.dtype != DType::F8_E5M2) return std::nullopt;  // not an fp8 weight
  if (wi.shape.size() != 2) fail(ErrorKind::InvalidInput, f.where(*w), ": shape is not 2-D [out, in]");
  if (!is_quantizable_dtype(si.dtype))
    fail(ErrorKind::InvalidInput, f.where(scale_entry), ": dtype ", dtype_name(si.dtype),
         ", expected BF16, F16 or F32");
  QuantizedLinear q;
  q.module = module;
  q.options.scheme = wi.dtype == DType::F8_E5M2 ? Scheme::Fp8E5M2 : Scheme::Fp8E4M3;
  q.orig_dtype = si.dtype;
  q.shape = wi.shape;
  const auto out = static_cast<uint64_t>(wi.shape[0]);
  const bool per_channel_shape = (si.shape.size() == 2 && si.shape[1] == 1) || si.shape.size() == 1;
  if (si.numel() == out && per_channel_shape && !(si.shape.size() == 1 && out == 1)) {
    q.options.per_tensor = false;
  } else if (si.numel() == 1 && si.shape.size() <= 1) {
    q.options.per_tensor = true;
  } else {
    fail(ErrorKind::Unsupported, f.where(scale_entry), ": shape ", shape_str(si.shape),
         " is neither per channel [", out,
         ", 1] nor per tensor [1] (group and block scales are not supported)");
  }
  q.tensor_names = {wi.name, si.name};
  q.tensor_parts = {Part::Weight, Part::Scale};
  return q;
}

void fp8_check_unclaimed(const TensorFinder& f, Component::Entry e) {
  const TensorInfo& t = f.info(e);
  if ((t.dtype != DType::F8_E4M3 && t.dtype != DType::F8_E5M2) || !has_suffix(t.name, "weight")) return;
  fail(ErrorKind::InvalidInput, f.where(e), ": an ", dtype_name(t.dtype), " weight without '",
       join_name(module_of_tensor(t.name), "weight_scale"),
       "' (its compressed-tensors scale): its fp8 codes cannot be read as weights");
}

// The compressed-tensors release whose writer the fp8 quantization_config reproduces (its
// "version" field); tests/interop/quantize_interop.py compares the two byte for byte.
constexpr const char* kCompressedTensorsVersion = "0.20.1";

nlohmann::json fp8_loader_config(const SchemeOptions& options, DType,
                                 const std::vector<std::string>& unquantized_modules) {
  // What compressed-tensors' own writer (ModelCompressor.update_config, release
  // kCompressedTensorsVersion) writes for weight-only fp8: the format it infers for a float scheme
  // without input activations is naive-quantized; "ignore" lists the unquantized modules of the
  // targeted type (Linear), so embeddings and norms are not in it.
  std::vector<std::string> ignore;
  for (const auto& m : unquantized_modules) {
    const std::string_view leaf =
        std::string_view(m).substr(m.rfind('.') == std::string::npos ? 0 : m.rfind('.') + 1);
    const bool norm = leaf.find("norm") != std::string_view::npos || leaf.starts_with("ln_");
    if (!is_embedding_module(m) && !norm) ignore.push_back(m);
  }
  const nlohmann::json weights = {
      {"num_bits", 8},         {"type", "float"},  {"symmetric", true},
      {"group_size", nullptr}, {"dynamic", false}, {"strategy", options.per_tensor ? "tensor" : "channel"}};
  return {{"config_groups",
           {{"group_0",
             {{"format", "naive-quantized"},
              {"input_activations", nullptr},
              {"output_activations", nullptr},
              {"targets", {"Linear"}},
              {"weights", weights}}}}},
          {"format", "naive-quantized"},
          {"global_compression_ratio", nullptr},
          {"ignore", ignore},
          {"kv_cache_scheme", nullptr},
          {"moe_sparsity_config", nullptr},
          {"quant_method", "compressed-tensors"},
          {"quantization_status", "compressed"},
          {"sparsity_config", nlohmann::json::object()},
          {"transform_config", nlohmann::json::object()},
          {"version", kCompressedTensorsVersion}};
}

}  // namespace qtool::quant::detail
