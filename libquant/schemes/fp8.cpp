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
// integer arithmetic as c10's fp8e4m3fn_from_fp32_value / fp8e5m2_from_fp32_value).
template <bool E5M2>
QTOOL_AVX2 inline __m256i encode_fp8(__m256 x) {
  const __m256i u = _mm256_castps_si256(x);
  const __m256i sign = _mm256_and_si256(u, _mm256_set1_epi32(INT32_MIN));
  const __m256i a = _mm256_xor_si256(u, sign);
  constexpr int kManShift = E5M2 ? 21 : 20;  // 23 - mantissa bits
  constexpr uint32_t kMinNormal = E5M2 ? (113u << 23) : (121u << 23);
  constexpr uint32_t kDenormMask = E5M2 ? (134u << 23) : (141u << 23);
  constexpr uint32_t kRebias = static_cast<uint32_t>(E5M2 ? (15 - 127) : (7 - 127)) << 23;
  constexpr uint32_t kHalfUlp = E5M2 ? 0xFFFFFu : 0x7FFFFu;
  // Subnormal codes: adding 2^(bias + mantissa) rounds to the code's spacing in float32 hardware.
  const __m256 dm = _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int32_t>(kDenormMask)));
  const __m256i denorm = _mm256_sub_epi32(_mm256_castps_si256(_mm256_add_ps(_mm256_castsi256_ps(a), dm)),
                                          _mm256_set1_epi32(static_cast<int32_t>(kDenormMask)));
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(a, kManShift), _mm256_set1_epi32(1));
  const __m256i normal = _mm256_srli_epi32(
      _mm256_add_epi32(_mm256_add_epi32(a, odd), _mm256_set1_epi32(static_cast<int32_t>(kRebias + kHalfUlp))),
      kManShift);
  const __m256i is_denorm = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(kMinNormal)), a);
  const __m256i code = _mm256_blendv_epi8(normal, denorm, is_denorm);
  return _mm256_or_si256(code, _mm256_srli_epi32(sign, 24));
}

template <DType D, bool E5M2>
QTOOL_AVX2 inline __m256i quant8(const uint8_t* src, uint64_t c, __m256 vscale, __m256 vmax) {
  const __m256 x = simd::load8<D>(src + c * simd::elem_size<D>());
  __m256 s = _mm256_add_ps(simd::round_to<D>(_mm256_div_ps(x, vscale)), _mm256_setzero_ps());
  s = _mm256_min_ps(_mm256_max_ps(s, _mm256_sub_ps(_mm256_setzero_ps(), vmax)), vmax);
  return encode_fp8<E5M2>(s);
}

template <DType D>
QTOOL_AVX2 float absmax_avx2(const uint8_t* src, uint64_t n) {
  using namespace simd;
  __m256 vmax = _mm256_setzero_ps();
  __m256 bad = _mm256_setzero_ps();
  uint64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    const __m256 a = abs8(load8<D>(src + c * elem_size<D>()));
    bad = _mm256_or_ps(bad, not_finite8(a));
    vmax = _mm256_max_ps(vmax, a);
  }
  float amax = hmax8(vmax);
  bool any_bad = _mm256_movemask_ps(bad) != 0;
  for (; c < n; ++c) {
    const float a = std::fabs(load_element(D, src, c));
    if (!std::isfinite(a)) any_bad = true;
    amax = std::max(amax, a);
  }
  if (any_bad) throw BadValueError(BadValue::NonFinite);
  return amax;
}

template <DType D, bool E5M2>
QTOOL_AVX2 void quant_row_avx2(const uint8_t* src, uint64_t cols, float scale, uint8_t* q) {
  const Fp8Format& fmt = E5M2 ? kE5M2 : kE4M3;
  const __m256 vscale = _mm256_set1_ps(scale);
  const __m256 vmax = _mm256_set1_ps(fmt.max);
  uint64_t c = 0;
  for (; c + 32 <= cols; c += 32) {
    const __m256i packed = simd::pack_u8_32(
        quant8<D, E5M2>(src, c, vscale, vmax), quant8<D, E5M2>(src, c + 8, vscale, vmax),
        quant8<D, E5M2>(src, c + 16, vscale, vmax), quant8<D, E5M2>(src, c + 24, vscale, vmax));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + c), packed);
  }
  for (; c < cols; ++c) {
    const float s = round_to_dtype(D, load_element(D, src, c) / scale) + 0.0f;
    q[c] = fmt.encode(std::clamp(s, -fmt.max, fmt.max));
  }
}

template <DType D>
QTOOL_AVX2 void fp8_rows_avx2(const uint8_t* data, uint64_t cols, bool e5m2, float tensor_scale,
                              uint64_t row_begin, uint64_t row_end, uint8_t* q, uint8_t* scales) {
  const float fmt_max = e5m2 ? kE5M2.max : kE4M3.max;
  for (uint64_t r = row_begin; r < row_end; ++r) {
    const uint8_t* src = data + r * cols * simd::elem_size<D>();
    float scale = tensor_scale;
    if (tensor_scale < 0.0f) {
      scale = fp8_scale(D, absmax_avx2<D>(src, cols), fmt_max);
      store_element(D, scales, r, scale);
    }
    if (e5m2)
      quant_row_avx2<D, true>(src, cols, scale, q + r * cols);
    else
      quant_row_avx2<D, false>(src, cols, scale, q + r * cols);
  }
}
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
  if (impl == Impl::Fast && have_simd()) {
    const uint8_t* src = w.data + begin * dtype_size(w.dtype);
    switch (w.dtype) {
      case DType::BF16: return absmax_avx2<DType::BF16>(src, end - begin);
      case DType::F16: return absmax_avx2<DType::F16>(src, end - begin);
      default: return absmax_avx2<DType::F32>(src, end - begin);
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
                            uint64_t row_end, uint8_t* q, uint8_t* scales) {
#if QTOOL_HAVE_X86_SIMD
  if (have_simd()) {
    const bool e5m2 = scheme == Scheme::Fp8E5M2;
    switch (w.dtype) {
      case DType::BF16:
        fp8_rows_avx2<DType::BF16>(w.data, w.cols, e5m2, tensor_scale, row_begin, row_end, q, scales);
        return;
      case DType::F16:
        fp8_rows_avx2<DType::F16>(w.data, w.cols, e5m2, tensor_scale, row_begin, row_end, q, scales);
        return;
      default:
        fp8_rows_avx2<DType::F32>(w.data, w.cols, e5m2, tensor_scale, row_begin, row_end, q, scales);
        return;
    }
  }
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
                  ThreadPool& pool, Impl impl) {
  uint8_t* q = outs[0].data();
  uint8_t* scales = outs[1].data();
  const uint64_t min_rows = std::max<uint64_t>(1, (uint64_t{1} << 16) / std::max<uint64_t>(1, w.cols));
  float tensor_scale = -1.0f;
  if (options.per_tensor) {
    std::mutex mu;
    float amax = 0.0f;
    pool.parallel_for(w.rows, min_rows, [&](size_t b, size_t e) {
      const float m = fp8_absmax_rows(w, b, e, impl);
      std::lock_guard<std::mutex> lock(mu);
      amax = std::max(amax, m);
    });
    tensor_scale = fp8_scale(w.dtype, amax, fp8_format(options.scheme).max);
    store_element(w.dtype, scales, 0, tensor_scale);
  }
  pool.parallel_for(w.rows, min_rows, [&](size_t b, size_t e) {
    if (impl == Impl::Fast)
      fp8_quantize_rows_fast(w, options.scheme, tensor_scale, b, e, q, scales);
    else
      fp8_quantize_rows_ref(w, options.scheme, tensor_scale, b, e, q, scales);
  });
}

void fp8_dequantize_linear(const QuantizedLinear& linear, const TensorBytes& parts, float* out,
                           uint64_t row_begin, uint64_t row_end) {
  fp8_dequantize_rows(linear.options.scheme, parts.weight.data(), parts.scale.data(), linear.orig_dtype,
                      linear.options.per_tensor, static_cast<uint64_t>(linear.cols()), row_begin, row_end,
                      out);
}

}  // namespace qtool::quant::detail
