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

#include "scheme.hpp"
#include "simd.hpp"

namespace qtool::quant::detail {
namespace {

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

template <DType D>
QTOOL_AVX2 inline __m256 scaled8(const uint8_t* src, uint64_t i, __m256 vr) {
  const __m256 x = simd::load8<D>(src + i * simd::elem_size<D>());
  const __m256 s = _mm256_mul_ps(x, vr);
  return _mm256_min_ps(_mm256_max_ps(s, _mm256_set1_ps(-1.0f)), _mm256_set1_ps(1.0f));
}

// Quantizes the full blocks [block_begin, block_end) (blocksize a multiple of 16).
template <DType D, bool Fp4>
QTOOL_AVX2 void full_blocks_avx2(const uint8_t* data, const Bnb4Table& t, uint32_t blocksize,
                                 uint64_t block_begin, uint64_t block_end, uint8_t* packed,
                                 uint8_t* absmax_out) {
  using namespace simd;
  const Thresholds thr = make_thresholds(t.thresholds.data());
  const __m128i pattern_of = _mm_loadu_si128(reinterpret_cast<const __m128i*>(t.pattern_of.data()));
  const __m128i nibble_weights = _mm_set1_epi16(0x0110);  // bytes (16, 1): 16 * even + odd
  for (uint64_t b = block_begin; b < block_end; ++b) {
    const uint64_t begin = b * blocksize;
    const uint8_t* src = data + begin * elem_size<D>();
    __m256 vmax = _mm256_setzero_ps();
    __m256 bad = _mm256_setzero_ps();
    for (uint64_t i = 0; i < blocksize; i += 8) {
      const __m256 a = abs8(load8<D>(src + i * elem_size<D>()));
      bad = _mm256_or_ps(bad, not_finite8(a));
      vmax = _mm256_max_ps(vmax, a);
    }
    if (_mm256_movemask_ps(bad) != 0) throw BadValueError(BadValue::NonFinite);
    const float amax = hmax8(vmax);
    store_f32(absmax_out + 4 * b, amax);
    const __m256 vr = _mm256_set1_ps(1.0f / std::max(amax, kMinAbsmax));
    uint8_t* out = packed + begin / 2;
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
}

template <DType D>
QTOOL_AVX2 void full_blocks_dispatch(const uint8_t* data, Scheme scheme, const Bnb4Table& t,
                                     uint32_t blocksize, uint64_t block_begin, uint64_t block_end,
                                     uint8_t* packed, uint8_t* absmax) {
  if (scheme == Scheme::Fp4)
    full_blocks_avx2<D, true>(data, t, blocksize, block_begin, block_end, packed, absmax);
  else
    full_blocks_avx2<D, false>(data, t, blocksize, block_begin, block_end, packed, absmax);
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
                               uint64_t block_end, uint8_t* packed, uint8_t* absmax) {
#if QTOOL_HAVE_X86_SIMD
  if (have_simd() && blocksize % 16 == 0) {
    const Bnb4Table& t = bnb4_table(scheme);
    const uint64_t n_full = w.numel() / blocksize;
    const uint64_t full_end = std::min(block_end, n_full);
    if (block_begin < full_end) {
      switch (w.dtype) {
        case DType::BF16:
          full_blocks_dispatch<DType::BF16>(w.data, scheme, t, blocksize, block_begin, full_end, packed,
                                            absmax);
          break;
        case DType::F16:
          full_blocks_dispatch<DType::F16>(w.data, scheme, t, blocksize, block_begin, full_end, packed,
                                           absmax);
          break;
        default:
          full_blocks_dispatch<DType::F32>(w.data, scheme, t, blocksize, block_begin, full_end, packed,
                                           absmax);
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

void bnb4_quantize(const WeightView& w, const SchemeOptions& options,
                   std::span<const std::span<uint8_t>> outs, ThreadPool& pool, Impl impl) {
  const uint64_t n = w.numel();
  const uint64_t n_blocks = (n + options.blocksize - 1) / options.blocksize;
  uint8_t* packed = outs[0].data();
  std::vector<float> absmax_f32;
  uint8_t* absmax = outs[1].data();
  if (options.double_quant) {
    absmax_f32.resize(n_blocks);
    absmax = reinterpret_cast<uint8_t*>(absmax_f32.data());
  }
  const uint64_t min_blocks = std::max<uint64_t>(1, (uint64_t{1} << 16) / options.blocksize);
  pool.parallel_for(n_blocks, min_blocks, [&](size_t b, size_t e) {
    if (impl == Impl::Fast)
      bnb4_quantize_blocks_fast(w, options.scheme, options.blocksize, b, e, packed, absmax);
    else
      bnb4_quantize_blocks_ref(w, options.scheme, options.blocksize, b, e, packed, absmax);
  });
  const Bnb4Table& t = bnb4_table(options.scheme);
  std::memcpy(outs[2].data(), t.code.data(), sizeof(float) * 16);
  float offset = 0.0f;
  if (options.double_quant) {
    offset = torch_mean_f32(absmax_f32.data(), n_blocks);
    if (!std::isfinite(offset))
      fail(ErrorKind::InvalidInput,
           "the mean of the block absmax overflows float32; double quant cannot encode it");
    const uint64_t n_blocks2 = (n_blocks + kNestedBlocksize - 1) / kNestedBlocksize;
    pool.parallel_for(n_blocks2, 64, [&](size_t b, size_t e) {
      dynamic_quantize_blocks(absmax_f32.data(), n_blocks, offset, b, e, outs[1].data(), outs[3].data());
    });
    std::memcpy(outs[4].data(), dynamic_map_table().data(), sizeof(float) * 256);
  }
  // The JSON, then zeros: the part has room for the longest nested_offset (quant_state_bytes).
  const std::string json = quant_state_json(w.dtype, w.rows, w.cols, options, offset);
  std::span<uint8_t> state = outs.back();
  QTOOL_ASSERT(json.size() <= state.size());
  std::memcpy(state.data(), json.data(), json.size());
  std::memset(state.data() + json.size(), 0, state.size() - json.size());
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

}  // namespace qtool::quant::detail
