// int8: bitsandbytes LLM.int8 row-wise quantization (int8_vectorwise_quant on the weight cast to
// float16), bit for bit as bitsandbytes 0.50 computes it on the CPU:
//   h      = float(fp16(w))                       (the weight cast to float16)
//   SCB[r] = max_c |h[r, c]|                       (float32, exact)
//   m      = fl(fl(1 / SCB[r]) * 127)              (`127.0 / row_stats` is reciprocal() * 127 in torch)
//   q      = round_half_even(fl(h * m))            (float32 product, then torch.round)
// A zero row gives SCB 0 and q 0. Layout: <m>.weight I8 [out, in], <m>.SCB F32 [out],
// <m>.weight_format U8 [] = 0. Dequantize: fl(fl(q * SCB) * 0.007874016f) (int8_vectorwise_dequant).
#include <algorithm>
#include <cmath>
#include <cstring>

#include "scheme.hpp"
#include "simd.hpp"

namespace qtool::quant::detail {
namespace {

constexpr float kInt8Max = 127.0f;
constexpr float kInvInt8Max = 7.874015718698502e-3f;  // the constant bitsandbytes dequantizes with

float f16_round(DType dtype, float v) { return dtype == DType::F16 ? v : f16_to_f32(f32_to_f16(v)); }

float int8_multiplier(float scb) { return (1.0f / scb) * kInt8Max; }

#if QTOOL_HAVE_X86_SIMD
// 8 source elements rounded to float16 precision, as float32.
template <DType D>
QTOOL_AVX2 inline __m256 load_h8(const uint8_t* src, uint64_t c) {
  const __m256 x = simd::load8<D>(src + c * simd::elem_size<D>());
  if constexpr (D == DType::F16)
    return x;
  else
    return simd::round_f16(x);
}

template <DType D, bool kRoundF16>
QTOOL_AVX2 inline __m256i quant8(const uint8_t* src, uint64_t c, __m256 vm) {
  const __m256 h = kRoundF16 ? load_h8<D>(src, c) : simd::load8<D>(src + c * simd::elem_size<D>());
  const __m256 p = _mm256_mul_ps(h, vm);
  return _mm256_cvtps_epi32(_mm256_round_ps(p, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

template <DType D, bool kRoundF16>
QTOOL_AVX2 void quant_row(const uint8_t* src, uint64_t cols, float m, uint8_t* q) {
  const __m256 vm = _mm256_set1_ps(m);
  uint64_t c = 0;
  for (; c + 32 <= cols; c += 32) {
    const __m256i packed =
        simd::pack_i8_32(quant8<D, kRoundF16>(src, c, vm), quant8<D, kRoundF16>(src, c + 8, vm),
                         quant8<D, kRoundF16>(src, c + 16, vm), quant8<D, kRoundF16>(src, c + 24, vm));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + c), packed);
  }
  for (; c < cols; ++c) {
    const float h = f16_round(D, load_element(D, src, c));
    q[c] = static_cast<uint8_t>(static_cast<int8_t>(std::nearbyint(h * m)));
  }
}

// A bf16 value is exact in float16 unless |x| < 2^-17 (below float16's subnormal spacing) or it
// overflows (rejected with the row). When SCB >= 2^-8, m <= 32513 and every |x| <= 2^-17 gives
// |x * m| < 0.25 whether rounded to float16 or not: q = 0 either way, so the rounding is skipped.
constexpr float kBf16NoRoundScb = 0.00390625f;

// AVX-512: the same row on 16 lanes (vcvtps2dq with round-to-nearest-even, signed saturation).
template <DType D, bool kRoundF16>
QTOOL_AVX512 void quant_row_avx512(const uint8_t* src, uint64_t cols, float m, uint8_t* q) {
  const __m512 vm = _mm512_set1_ps(m);
  uint64_t c = 0;
  for (; c + 16 <= cols; c += 16) {
    __m512 h = simd::load16<D>(src + c * simd::elem_size<D>());
    if constexpr (kRoundF16) h = simd::round_f16(h);
    const __m512i i =
        _mm512_cvt_roundps_epi32(_mm512_mul_ps(h, vm), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + c), _mm512_cvtsepi32_epi8(i));
  }
  for (; c < cols; ++c) {
    const float h = f16_round(D, load_element(D, src, c));
    q[c] = static_cast<uint8_t>(static_cast<int8_t>(std::nearbyint(h * m)));
  }
}

template <DType D>
void int8_row_simd(const uint8_t* src, uint64_t cols, uint8_t* q, uint8_t* scb_out, bool avx512) {
  // Pass 1: absmax of the source row, from the magnitudes' bits (simd.hpp). Rounding to float16 is
  // monotonic and odd, so the absmax of the rounded row is the rounded absmax; any Inf/NaN in the
  // source, or a float16 overflow of the largest element, rejects the row.
  const uint32_t bits =
      avx512 ? simd::absmax_bits_avx512<D>(src, cols) : simd::absmax_bits_avx2<D>(src, cols);
  if (bits >= simd::inf_bits<D>()) throw BadValueError(BadValue::NonFinite);
  const float scb = f16_round(D, simd::from_bits<D>(bits));
  if (!std::isfinite(scb)) throw BadValueError(BadValue::NonFinite);
  store_f32(scb_out, scb);
  if (scb == 0.0f) {
    std::memset(q, 0, cols);
    return;
  }
  // Pass 2: q = rne(h * m).
  const float m = int8_multiplier(scb);
  const bool round = !(D == DType::F16 || (D == DType::BF16 && scb >= kBf16NoRoundScb));
  if (avx512) {
    if (round)
      quant_row_avx512<D, true>(src, cols, m, q);
    else
      quant_row_avx512<D, false>(src, cols, m, q);
  } else if (round) {
    quant_row<D, true>(src, cols, m, q);
  } else {
    quant_row<D, false>(src, cols, m, q);
  }
}
#endif

}  // namespace

void int8_quantize_rows_ref(const WeightView& w, uint64_t row_begin, uint64_t row_end, uint8_t* q,
                            uint8_t* scb) {
  const uint64_t cols = w.cols;
  for (uint64_t r = row_begin; r < row_end; ++r) {
    float amax = 0.0f;
    for (uint64_t c = 0; c < cols; ++c) {
      const float v = load_element(w.dtype, w.data, r * cols + c);
      if (!std::isfinite(v)) throw BadValueError(BadValue::NonFinite);
      const float h = f16_round(w.dtype, v);
      if (!std::isfinite(h)) throw BadValueError(BadValue::F16Overflow);
      amax = std::max(amax, std::fabs(h));
    }
    store_f32(scb + 4 * r, amax);
    uint8_t* qr = q + r * cols;
    if (amax == 0.0f) {
      std::memset(qr, 0, cols);
      continue;
    }
    const float m = int8_multiplier(amax);
    for (uint64_t c = 0; c < cols; ++c) {
      const float h = f16_round(w.dtype, load_element(w.dtype, w.data, r * cols + c));
      const float p = h * m;
      qr[c] = static_cast<uint8_t>(static_cast<int8_t>(std::nearbyint(p)));
    }
  }
}

void int8_quantize_rows_fast(const WeightView& w, uint64_t row_begin, uint64_t row_end, uint8_t* q,
                             uint8_t* scb, Impl impl) {
#if QTOOL_HAVE_X86_SIMD
  if (have_simd()) {
    const uint64_t es = dtype_size(w.dtype);
    const bool avx512 = use_avx512(impl);
    for (uint64_t r = row_begin; r < row_end; ++r) {
      const uint8_t* src = w.data + r * w.cols * es;
      switch (w.dtype) {
        case DType::BF16: int8_row_simd<DType::BF16>(src, w.cols, q + r * w.cols, scb + 4 * r, avx512); break;
        case DType::F16: int8_row_simd<DType::F16>(src, w.cols, q + r * w.cols, scb + 4 * r, avx512); break;
        default: int8_row_simd<DType::F32>(src, w.cols, q + r * w.cols, scb + 4 * r, avx512); break;
      }
    }
    return;
  }
#else
  (void)impl;
#endif
  int8_quantize_rows_ref(w, row_begin, row_end, q, scb);
}

void int8_dequantize_rows(const uint8_t* q, const uint8_t* scb, uint64_t cols, uint64_t row_begin,
                          uint64_t row_end, float* out) {
  for (uint64_t r = row_begin; r < row_end; ++r) {
    const float s = load_f32(scb + 4 * r);
    const uint8_t* qr = q + r * cols;
    float* o = out + (r - row_begin) * cols;
    for (uint64_t c = 0; c < cols; ++c) {
      const float v = static_cast<float>(static_cast<int8_t>(qr[c])) * s;
      o[c] = v * kInvInt8Max;
    }
  }
}

void int8_quantize(const WeightView& w, const SchemeOptions&, std::span<const std::span<uint8_t>> outs,
                   ThreadPool& pool, Impl impl, const RangeDone& range_done) {
  uint8_t* q = outs[0].data();
  uint8_t* scb = outs[1].data();
  outs[2][0] = 0;  // weight_format: "row"
  quantize_in_steps(w.rows, w.cols, w.numel(), w.dtype, pool, range_done, [&](uint64_t r, uint64_t re) {
    if (impl == Impl::Reference)
      int8_quantize_rows_ref(w, r, re, q, scb);
    else
      int8_quantize_rows_fast(w, r, re, q, scb, impl);
  });
}

void int8_dequantize_linear(const QuantizedLinear& linear, const TensorBytes& parts, float* out,
                            uint64_t row_begin, uint64_t row_end) {
  int8_dequantize_rows(parts.weight.data(), parts.scale.data(), static_cast<uint64_t>(linear.cols()),
                       row_begin, row_end, out);
}

std::vector<Part> int8_parts(const SchemeOptions&) { return {Part::Weight, Part::Scale, Part::WeightFormat}; }

std::vector<TensorDecl> int8_decls(std::string_view module, DType, uint64_t rows, uint64_t cols,
                                   const SchemeOptions&) {
  const auto out = static_cast<int64_t>(rows), in = static_cast<int64_t>(cols);
  return {{join_name(module, "weight"), DType::I8, {out, in}},
          {join_name(module, "SCB"), DType::F32, {out}},
          {join_name(module, "weight_format"), DType::U8, {}}};
}

// The marker is <m>.SCB.
std::optional<QuantizedLinear> int8_recognise(const TensorFinder& f, Component::Entry scb_entry) {
  const TensorInfo& scb = f.info(scb_entry);
  if (!has_suffix(scb.name, "SCB")) return std::nullopt;
  const std::string module = module_of_tensor(scb.name);
  const auto w = f.require(join_name(module, "weight"), scb_entry, "the int8 weight of this SCB");
  const TensorInfo& wi = f.info(w);
  f.expect_dtype(w, DType::I8);
  if (wi.shape.size() != 2) fail(ErrorKind::InvalidInput, f.where(w), ": shape is not 2-D [out, in]");
  f.expect_dtype(scb_entry, DType::F32);
  f.expect_numel(scb_entry, static_cast<uint64_t>(wi.shape[0]));
  QuantizedLinear q;
  q.module = module;
  q.options.scheme = Scheme::Int8;
  q.orig_dtype = DType::F16;  // LLM.int8 quantizes the weight cast to float16
  q.shape = wi.shape;
  q.tensor_names = {wi.name, scb.name};
  q.tensor_parts = {Part::Weight, Part::Scale};
  if (const auto wf = f.component().find(join_name(module, "weight_format"))) {
    const TensorInfo& fi = f.info(*wf);
    if (fi.numel() != 1 || (fi.dtype != DType::U8 && fi.dtype != DType::I64 && fi.dtype != DType::I32))
      fail(ErrorKind::InvalidInput, f.where(*wf), ": dtype ", dtype_name(fi.dtype), " shape ",
           shape_str(fi.shape), ", expected a U8, I32 or I64 scalar");
    // The whole little-endian value, not its first byte: I32 256 is not format 0.
    const auto bytes = f.component().data(*wf);
    int64_t format = 0;
    if (fi.dtype == DType::U8) {
      format = bytes[0];
    } else if (fi.dtype == DType::I32) {
      int32_t v;
      std::memcpy(&v, bytes.data(), sizeof v);
      format = v;
    } else {
      std::memcpy(&format, bytes.data(), sizeof format);
    }
    if (format != 0)
      fail(ErrorKind::Unsupported, f.where(*wf), ": weight format ", format,
           " is not supported (only 0, row-major)");
    q.tensor_names.push_back(fi.name);
    q.tensor_parts.push_back(Part::WeightFormat);
  }
  return q;
}

void int8_check_unclaimed(const TensorFinder& f, Component::Entry e) {
  const TensorInfo& t = f.info(e);
  if (t.dtype != DType::I8 || !has_suffix(t.name, "weight")) return;
  fail(ErrorKind::InvalidInput, f.where(e), ": an I8 weight without '",
       join_name(module_of_tensor(t.name), "SCB"),
       "' (the row scales of bitsandbytes LLM.int8): its int8 codes cannot be read as weights");
}

nlohmann::json bnb_loader_config(const SchemeOptions& options, DType weight_dtype,
                                 const std::vector<std::string>& unquantized_modules) {
  const bool four = is_4bit(options.scheme);
  return {
      {"quant_method", "bitsandbytes"},
      {"_load_in_4bit", four},
      {"_load_in_8bit", !four},
      {"load_in_4bit", four},
      {"load_in_8bit", !four},
      {"llm_int8_threshold", 6.0},
      {"llm_int8_skip_modules", unquantized_modules},
      {"llm_int8_enable_fp32_cpu_offload", false},
      {"llm_int8_has_fp16_weight", false},
      {"bnb_4bit_quant_type", four ? std::string(scheme_name(options.scheme)) : std::string("fp4")},
      {"bnb_4bit_use_double_quant", four && options.double_quant},
      {"bnb_4bit_compute_dtype", four ? std::string(dtype_torch_name(weight_dtype)) : std::string("float32")},
      {"bnb_4bit_quant_storage", "uint8"}};
}

}  // namespace qtool::quant::detail
