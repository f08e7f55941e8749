// One-pass error statistics of a quantized weight (convert_stats.hpp).
#include "convert_stats.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <vector>

#include "scheme.hpp"
#include "simd.hpp"

#if defined(__x86_64__)
#include <immintrin.h>
#define QTOOL_STATS_SIMD 1
#define QTOOL_STATS_TARGET __attribute__((target("avx2,fma,f16c")))
#endif

namespace qtool::quant::detail {

void ErrorSums::add(const ErrorSums& o) {
  sum_sq_ref += o.sum_sq_ref;
  sum_sq_err += o.sum_sq_err;
  max_abs_err = std::max(max_abs_err, o.max_abs_err);
}

namespace {

// bitsandbytes dequantizes LLM.int8 as (q * SCB) * float(1/127).
constexpr float kInvInt8Max = 7.874015718698502e-3f;
// Float partial sums are flushed into double at least this often (elements).
constexpr size_t kFlushEvery = 4096;

float load_original(DType dtype, const uint8_t* p, size_t i) {
  switch (dtype) {
    case DType::BF16: {
      uint16_t h;
      std::memcpy(&h, p + 2 * i, 2);
      return bf16_to_f32(h);
    }
    case DType::F16: {
      uint16_t h;
      std::memcpy(&h, p + 2 * i, 2);
      return f16_to_f32(h);
    }
    default: {
      float f;
      std::memcpy(&f, p + 4 * i, 4);
      return f;
    }
  }
}

float load_f32(const uint8_t* p, size_t i) {
  float f;
  std::memcpy(&f, p + 4 * i, 4);
  return f;
}

// Scalar accumulation into float partials flushed to double.
struct ScalarAcc {
  ErrorSums& sums;
  float ref = 0, err = 0, max = 0;
  size_t n = 0;
  explicit ScalarAcc(ErrorSums& s) : sums(s) {}
  void add(float w, float d) {
    const float e = d - w;
    ref += w * w;
    err += e * e;
    max = std::max(max, std::fabs(e));
    if (++n == kFlushEvery) flush();
  }
  void flush() {
    sums.sum_sq_ref += ref;
    sums.sum_sq_err += err;
    sums.max_abs_err = std::max(sums.max_abs_err, max);
    ref = err = max = 0;
    n = 0;
  }
  ~ScalarAcc() { flush(); }
};

std::array<float, 256> fp8_table(Scheme scheme) {
  std::array<float, 256> t{};
  for (int i = 0; i < 256; ++i) {
    t[i] = scheme == Scheme::Fp8E4M3 ? fp8_e4m3_to_f32(static_cast<uint8_t>(i))
                                     : fp8_e5m2_to_f32(static_cast<uint8_t>(i));
  }
  return t;
}

std::array<float, 16> bnb4_codes(const QuantizedLinear& linear, const TensorBytes& parts) {
  std::array<float, 16> code{};
  if (parts.quant_map.size() == sizeof(float) * 16) {
    std::memcpy(code.data(), parts.quant_map.data(), sizeof code);
  } else {
    const auto t = code_table(linear.options.scheme);
    std::copy(t.begin(), t.end(), code.begin());
  }
  return code;
}

uint8_t nibble(const uint8_t* packed, size_t i) {
  const uint8_t byte = packed[i / 2];
  return (i & 1) ? (byte & 0x0F) : (byte >> 4);
}

// What each scheme's dequantizer gives for one element, as the scalar paths and the SIMD paths'
// tails compute it.
float int8_value(uint8_t q, float scb) {
  return (static_cast<float>(static_cast<int8_t>(q)) * scb) * kInvInt8Max;
}

struct Bnb4Values {
  const float* code;
  const float* absmax;  // of blocks block0, block0 + 1, ...
  size_t block0;
  uint32_t bs;
  const uint8_t* packed;
  float operator()(size_t i) const { return code[nibble(packed, i)] * absmax[i / bs - block0]; }
};

// ---- scalar paths ----------------------------------------------------------------------------

void int8_scalar(const uint8_t* q, const uint8_t* scb, DType dtype, const uint8_t* w, size_t cols, size_t r0,
                 size_t r1, ErrorSums& sums) {
  ScalarAcc acc(sums);
  for (size_t r = r0; r < r1; ++r) {
    const float s = load_f32(scb, r);
    for (size_t c = 0; c < cols; ++c) {
      const size_t i = r * cols + c;
      acc.add(load_original(dtype, w, i), int8_value(q[i], s));
    }
  }
}

void fp8_scalar(const float* table, const uint8_t* q, const uint8_t* scales, DType dtype, bool per_tensor,
                const uint8_t* w, size_t cols, size_t r0, size_t r1, ErrorSums& sums) {
  ScalarAcc acc(sums);
  for (size_t r = r0; r < r1; ++r) {
    const float s = load_original(dtype, scales, per_tensor ? 0 : r);
    for (size_t c = 0; c < cols; ++c) {
      const size_t i = r * cols + c;
      acc.add(load_original(dtype, w, i), table[q[i]] * s);
    }
  }
}

void bnb4_scalar(const Bnb4Values& value, DType dtype, const uint8_t* w, size_t i0, size_t i1,
                 ErrorSums& sums) {
  ScalarAcc acc(sums);
  for (size_t i = i0; i < i1; ++i) acc.add(load_original(dtype, w, i), value(i));
}

// ---- AVX2 paths ------------------------------------------------------------------------------

#ifdef QTOOL_STATS_SIMD

QTOOL_STATS_TARGET inline float hsum(__m256 v) {
  alignas(32) float t[8];
  _mm256_store_ps(t, v);
  return ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
}

QTOOL_STATS_TARGET inline float hmax(__m256 v) {
  alignas(32) float t[8];
  _mm256_store_ps(t, v);
  return std::max({t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7]});
}

// The accumulating operations by width, for run_lanes below.
QTOOL_STATS_TARGET inline __m256 fmadd_lanes(__m256 a, __m256 b, __m256 c) {
  return _mm256_fmadd_ps(a, b, c);
}
QTOOL_STATS_TARGET inline __m256 max_lanes(__m256 a, __m256 b) { return _mm256_max_ps(a, b); }

#define QTOOL_STATS_TARGET512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")))

QTOOL_STATS_TARGET512 inline __m512 fmadd_lanes(__m512 a, __m512 b, __m512 c) {
  return _mm512_fmadd_ps(a, b, c);
}
QTOOL_STATS_TARGET512 inline __m512 max_lanes(__m512 a, __m512 b) { return _mm512_max_ps(a, b); }
// 16 lanes: the two halves added (or maxed) lane-wise, then as 8.
QTOOL_STATS_TARGET512 inline float hsum(__m512 v) {
  return hsum(_mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1)));
}
QTOOL_STATS_TARGET512 inline float hmax(__m512 v) {
  return hmax(_mm256_max_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1)));
}

template <typename V>
[[gnu::always_inline]] inline V abs_lanes(const V& d) {
  using U = typename simd::LaneBits<sizeof(V)>::type;
  return (V)((U)d & 0x7FFFFFFFu);
}

// Elements [i, i + n) (n a multiple of L::kLanes) against what `dec(j)` decodes for elements
// [j, j + L::kLanes). Two independent sets of accumulators, kept in registers and flushed every
// kFlushEvery elements. One definition for both widths, always inlined into L::run (whose target
// picks the instructions).
template <typename L, DType D, typename Dec>
[[gnu::always_inline]] inline void run_lanes(const uint8_t* w, size_t i, size_t n, const Dec& dec,
                                             ErrorSums& sums) {
  using V = typename L::V;
  constexpr size_t kLanes = L::kLanes;
  constexpr size_t kSize = simd::elem_size<D>();
  for (size_t done = 0; done < n;) {
    const size_t m = std::min(n - done, kFlushEvery);
    V r0{}, r1{}, e0{}, e1{}, x0{}, x1{};
    const size_t base = i + done;
    size_t k = 0;
    for (; k + 2 * kLanes <= m; k += 2 * kLanes) {
      if (k % 32 == 0) simd::prefetch_ahead(w + (base + k) * kSize, 64);
      const V w0 = L::template load<D>(w + (base + k) * kSize);
      const V w1 = L::template load<D>(w + (base + k + kLanes) * kSize);
      const V d0 = dec(base + k) - w0, d1 = dec(base + k + kLanes) - w1;
      r0 = fmadd_lanes(w0, w0, r0);
      r1 = fmadd_lanes(w1, w1, r1);
      e0 = fmadd_lanes(d0, d0, e0);
      e1 = fmadd_lanes(d1, d1, e1);
      x0 = max_lanes(x0, abs_lanes(d0));
      x1 = max_lanes(x1, abs_lanes(d1));
    }
    for (; k < m; k += kLanes) {
      const V w0 = L::template load<D>(w + (base + k) * kSize);
      const V d0 = dec(base + k) - w0;
      r0 = fmadd_lanes(w0, w0, r0);
      e0 = fmadd_lanes(d0, d0, e0);
      x0 = max_lanes(x0, abs_lanes(d0));
    }
    sums.sum_sq_ref += hsum(r0 + r1);
    sums.sum_sq_err += hsum(e0 + e1);
    sums.max_abs_err = std::max(sums.max_abs_err, hmax(max_lanes(x0, x1)));
    done += m;
  }
}

// The float16 bits of fp8 codes in 16-bit lanes (U16: a GCC vector of uint16; always inlined
// into the decoder of its width).
template <typename U16>
[[gnu::always_inline]] inline U16 fp8_f16_bits(const U16& v, bool e4m3) {
  return e4m3 ? (U16)(((v & 0x80) << 8) | ((v & 0x7F) << 7)) : (U16)(v << 8);
}

// The codes at q as float lanes of V, by width: int8 codes, and fp8 codes decoded through
// float16 (e5m2 is the high byte of a float16; e4m3 moves its exponent and mantissa three bits
// down, which reads as a float16 2^8 times too small, subnormals included).
template <typename V>
V int8_lanes(const uint8_t* q);
template <>
QTOOL_STATS_TARGET inline __m256 int8_lanes<__m256>(const uint8_t* q) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q))));
}
template <>
QTOOL_STATS_TARGET512 inline __m512 int8_lanes<__m512>(const uint8_t* q) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))));
}
template <typename V>
V fp8_lanes(const uint8_t* q, bool e4m3);
template <>
QTOOL_STATS_TARGET inline __m256 fp8_lanes<__m256>(const uint8_t* q, bool e4m3) {
  using U16 = uint16_t __attribute__((vector_size(16)));
  const __m128i v = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q)));
  return _mm256_cvtph_ps((__m128i)fp8_f16_bits((U16)v, e4m3));
}
template <>
QTOOL_STATS_TARGET512 inline __m512 fp8_lanes<__m512>(const uint8_t* q, bool e4m3) {
  using U16 = uint16_t __attribute__((vector_size(32)));
  const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
  return _mm512_cvtph_ps((__m256i)fp8_f16_bits((U16)v, e4m3));
}

// The decoders of int8 and fp8, one definition for both widths: what elements i, i + 1, ... decode
// to as the lanes of L::V. Always inlined into L::run (whose target picks the instructions); the
// loop-invariant broadcasts are hoisted out of its loop.
template <typename L>
struct Int8Dec {
  using V = typename L::V;
  const uint8_t* q;
  float scb;
  [[gnu::always_inline]] V operator()(size_t i) const {
    return (int8_lanes<V>(q + i) * simd::splat<V>(scb)) * simd::splat<V>(kInvInt8Max);
  }
};

// fp8: exact for every finite code (the quantizers clamp, so NaN and Inf codes are never
// written), and the product rounds once, as table[q] * s does.
template <typename L>
struct Fp8Dec {
  using V = typename L::V;
  const uint8_t* q;
  float s;  // the row's scale, times 2^8 for e4m3
  bool e4m3;
  Fp8Dec(const uint8_t* q_, float scale, bool e4m3_)
      : q(q_), s(e4m3_ ? scale * 0x1p8f : scale), e4m3(e4m3_) {}
  [[gnu::always_inline]] V operator()(size_t i) const {
    return fp8_lanes<V>(q + i, e4m3) * simd::splat<V>(s);
  }
};

// Where the 4-bit codes and the block absmax of element i are, for the decoders of both widths.
struct Bnb4Blocks {
  const uint8_t* packed;
  const float* absmax;  // absmax of block (i >> log2_bs) - block0
  size_t block0;
  unsigned log2_bs;
  explicit Bnb4Blocks(const Bnb4Values& v)
      : packed(v.packed),
        absmax(v.absmax),
        block0(v.block0),
        log2_bs(static_cast<unsigned>(__builtin_ctz(v.bs))) {}
  float block_absmax(size_t i) const { return absmax[(i >> log2_bs) - block0]; }
};

struct Bnb4Dec : Bnb4Blocks {
  __m256 code_lo, code_hi;  // code[0..7], code[8..15]
  __m256i shifts, low4;
  QTOOL_STATS_TARGET explicit Bnb4Dec(const Bnb4Values& v)
      : Bnb4Blocks(v),
        code_lo(_mm256_loadu_ps(v.code)),
        code_hi(_mm256_loadu_ps(v.code + 8)),
        shifts(_mm256_setr_epi32(4, 0, 12, 8, 20, 16, 28, 24)),
        low4(_mm256_set1_epi32(0x0F)) {}
  QTOOL_STATS_TARGET __m256 operator()(size_t i) const {
    uint32_t x;
    std::memcpy(&x, packed + i / 2, 4);
    const __m256i idx =
        _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(x)), shifts), low4);
    // A 16-entry lookup: both halves permuted by the low 3 bits, bit 3 picks the half.
    const __m256 lo = _mm256_permutevar8x32_ps(code_lo, idx);
    const __m256 hi = _mm256_permutevar8x32_ps(code_hi, idx);
    const __m256 v = _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
    return _mm256_mul_ps(v, _mm256_set1_ps(block_absmax(i)));
  }
};

// 16 codes from 8 bytes: each byte doubled (pshufb), widened, the even lanes shifted right by 4,
// masked to 4 bits, and looked up in the 16-entry table with one permute.
struct Bnb4Dec16 : Bnb4Blocks {
  __m512 code;
  __m128i doubled;
  __m512i shifts, low4;
  QTOOL_STATS_TARGET512 explicit Bnb4Dec16(const Bnb4Values& v)
      : Bnb4Blocks(v),
        code(_mm512_loadu_ps(v.code)),
        doubled(_mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7)),
        shifts(_mm512_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0)),
        low4(_mm512_set1_epi32(0x0F)) {}
  QTOOL_STATS_TARGET512 __m512 operator()(size_t i) const {
    const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(packed + i / 2));
    const __m512i wide = _mm512_cvtepu8_epi32(_mm_shuffle_epi8(bytes, doubled));
    const __m512i idx = _mm512_and_si512(_mm512_srlv_epi32(wide, shifts), low4);
    return _mm512_mul_ps(_mm512_permutexvar_ps(idx, code), _mm512_set1_ps(block_absmax(i)));
  }
};

// The lanes of one SIMD width: its 4-bit decoder, its run over elements and its loads.
struct Avx2 {
  using V = __m256;
  static constexpr size_t kLanes = 8;
  using Bnb4 = Bnb4Dec;
  template <DType D, typename Dec>
  QTOOL_STATS_TARGET static void run(const uint8_t* w, size_t i, size_t n, const Dec& dec, ErrorSums& sums) {
    run_lanes<Avx2, D>(w, i, n, dec, sums);
  }
  template <DType D>
  QTOOL_STATS_TARGET static __m256 load(const uint8_t* p) {
    return simd::load8<D>(p);
  }
};
struct Avx512 {
  using V = __m512;
  static constexpr size_t kLanes = 16;
  using Bnb4 = Bnb4Dec16;
  template <DType D, typename Dec>
  QTOOL_STATS_TARGET512 static void run(const uint8_t* w, size_t i, size_t n, const Dec& dec,
                                        ErrorSums& sums) {
    run_lanes<Avx512, D>(w, i, n, dec, sums);
  }
  template <DType D>
  QTOOL_STATS_TARGET512 static __m512 load(const uint8_t* p) {
    return simd::load16<D>(p);
  }
};

// The SIMD paths of each scheme, for either width: whole lanes through L's decoder, the rest of a
// row (or of the range, for 4-bit) through the scalar value.
template <typename L, DType D>
QTOOL_STATS_TARGET void int8_simd(const uint8_t* q, const uint8_t* scb, const uint8_t* w, size_t cols,
                                  size_t r0, size_t r1, ErrorSums& sums) {
  ScalarAcc tail(sums);
  const size_t n_lanes = cols & ~(L::kLanes - 1);
  for (size_t r = r0; r < r1; ++r) {
    const float s = load_f32(scb, r);
    const size_t base = r * cols;
    L::template run<D>(w, base, n_lanes, Int8Dec<L>{q, s}, sums);
    for (size_t i = base + n_lanes; i < base + cols; ++i)
      tail.add(load_original(D, w, i), int8_value(q[i], s));
  }
}

template <typename L, DType D>
QTOOL_STATS_TARGET void fp8_simd(Scheme scheme, const float* table, const uint8_t* q, const uint8_t* scales,
                                 bool per_tensor, const uint8_t* w, size_t cols, size_t r0, size_t r1,
                                 ErrorSums& sums) {
  ScalarAcc tail(sums);
  const size_t n_lanes = cols & ~(L::kLanes - 1);
  for (size_t r = r0; r < r1; ++r) {
    const float s = load_original(D, scales, per_tensor ? 0 : r);
    const size_t base = r * cols;
    L::template run<D>(w, base, n_lanes, Fp8Dec<L>(q, s, scheme == Scheme::Fp8E4M3), sums);
    for (size_t i = base + n_lanes; i < base + cols; ++i) tail.add(load_original(D, w, i), table[q[i]] * s);
  }
}

// Groups of lanes never straddle a block: blocks are powers of two >= 32 long.
template <typename L, DType D>
QTOOL_STATS_TARGET void bnb4_simd(const Bnb4Values& value, const uint8_t* w, size_t i0, size_t i1,
                                  ErrorSums& sums) {
  ScalarAcc tail(sums);
  size_t i = i0;
  for (; i < i1 && i % L::kLanes != 0; ++i) tail.add(load_original(D, w, i), value(i));
  const size_t n_lanes = (i1 - i) & ~(L::kLanes - 1);
  L::template run<D>(w, i, n_lanes, typename L::Bnb4(value), sums);
  for (i += n_lanes; i < i1; ++i) tail.add(load_original(D, w, i), value(i));
}

bool cpu_has_avx2() { return cpu_features().fma; }

#endif  // QTOOL_STATS_SIMD

}  // namespace

void accumulate_error(const QuantizedLinear& linear, const TensorBytes& parts, DType dtype,
                      const uint8_t* original, size_t row_begin, size_t row_end, ErrorSums& sums, Impl impl) {
  const size_t cols = static_cast<size_t>(linear.cols());
  accumulate_error_elements(linear, parts, dtype, original, row_begin * cols, row_end * cols, sums, impl);
}

namespace {

// With the SIMD path `impl` allows on this CPU: fn.template operator()<L, D>() with L its width
// (Avx512 or Avx2) and D the original weight's dtype (BF16, F16, else F32); true. Without: false.
template <typename Fn>
bool with_simd([[maybe_unused]] Impl impl, [[maybe_unused]] DType dtype, [[maybe_unused]] Fn&& fn) {
#ifdef QTOOL_STATS_SIMD
  if (impl == Impl::Reference || !cpu_has_avx2()) return false;
  auto with_dtype = [&]<typename L>() {
    switch (dtype) {
      case DType::BF16: fn.template operator()<L, DType::BF16>(); return;
      case DType::F16: fn.template operator()<L, DType::F16>(); return;
      default: fn.template operator()<L, DType::F32>(); return;
    }
  };
  if (use_avx512(impl))
    with_dtype.template operator()<Avx512>();
  else
    with_dtype.template operator()<Avx2>();
  return true;
#else
  return false;
#endif
}

}  // namespace

void int8_accumulate_error(const QuantizedLinear& linear, const TensorBytes& parts, DType dtype,
                           const uint8_t* original, uint64_t begin, uint64_t end, ErrorSums& sums,
                           Impl impl) {
  const size_t cols = static_cast<size_t>(linear.cols());
  const size_t r0 = begin / cols, r1 = end / cols;
  const uint8_t* q = parts.weight.data();
  const uint8_t* scb = parts.scale.data();
  ErrorSums local;
  if (!with_simd(impl, dtype,
                 [&]<typename L, DType D>() { int8_simd<L, D>(q, scb, original, cols, r0, r1, local); }))
    int8_scalar(q, scb, dtype, original, cols, r0, r1, local);
  sums.add(local);
}

void fp8_accumulate_error(const QuantizedLinear& linear, const TensorBytes& parts, DType dtype,
                          const uint8_t* original, uint64_t begin, uint64_t end, ErrorSums& sums, Impl impl) {
  const Scheme scheme = linear.options.scheme;
  const size_t cols = static_cast<size_t>(linear.cols());
  const size_t r0 = begin / cols, r1 = end / cols;
  const auto table = fp8_table(scheme);
  const bool per_tensor = linear.options.per_tensor;
  const uint8_t* q = parts.weight.data();
  const uint8_t* scales = parts.scale.data();
  ErrorSums local;
  if (!with_simd(impl, dtype, [&]<typename L, DType D>() {
        fp8_simd<L, D>(scheme, table.data(), q, scales, per_tensor, original, cols, r0, r1, local);
      }))
    fp8_scalar(table.data(), q, scales, dtype, per_tensor, original, cols, r0, r1, local);
  sums.add(local);
}

void bnb4_accumulate_error(const QuantizedLinear& linear, const TensorBytes& parts, DType dtype,
                           const uint8_t* original, uint64_t begin, uint64_t end, ErrorSums& sums,
                           Impl impl) {
  const uint32_t bs = linear.options.blocksize;
  const size_t i0 = begin, i1 = end;
  const size_t b0 = i0 / bs, b1 = (i1 - 1) / bs + 1;
  std::vector<float> absmax(b1 - b0);
  decode_absmax(linear, parts, absmax.data(), b0, b1);
  const auto code = bnb4_codes(linear, parts);
  const Bnb4Values value{code.data(), absmax.data(), b0, bs, parts.weight.data()};
  ErrorSums local;
  if (!with_simd(impl, dtype,
                 [&]<typename L, DType D>() { bnb4_simd<L, D>(value, original, i0, i1, local); }))
    bnb4_scalar(value, dtype, original, i0, i1, local);
  sums.add(local);
}

namespace {

// Any scheme, through its dequantizer: the rows covering [begin, end) in float32, then compared.
void error_stats_generic(const QuantizedLinear& linear, const TensorBytes& parts, DType dtype,
                         const uint8_t* original, uint64_t begin, uint64_t end, ErrorSums& sums) {
  const auto cols = static_cast<uint64_t>(linear.cols());
  const auto dequantize_rows = scheme_entry(linear.options.scheme).dequantize_rows;
  constexpr uint64_t kRowsPerStep = 16;
  std::vector<float> rows;
  ScalarAcc acc(sums);
  for (uint64_t r = begin / cols; r * cols < end; r += kRowsPerStep) {
    const uint64_t re = std::min<uint64_t>(r + kRowsPerStep, (end + cols - 1) / cols);
    rows.resize((re - r) * cols);
    dequantize_rows(linear, parts, rows.data(), r, re);
    for (uint64_t i = std::max(begin, r * cols); i < std::min(end, re * cols); ++i)
      acc.add(load_original(dtype, original, i), rows[i - r * cols]);
  }
}

}  // namespace

void accumulate_error_elements(const QuantizedLinear& linear, const TensorBytes& parts, DType dtype,
                               const uint8_t* original, uint64_t begin, uint64_t end, ErrorSums& sums,
                               Impl impl) {
  if (begin >= end) return;
  const size_t cols = static_cast<size_t>(linear.cols());
  const SchemeEntry& entry = scheme_entry(linear.options.scheme);
  QTOOL_ASSERT(!entry.info.rowwise || (cols > 0 && begin % cols == 0 && end % cols == 0));
  if (entry.accumulate_error)
    entry.accumulate_error(linear, parts, dtype, original, begin, end, sums, impl);
  else
    error_stats_generic(linear, parts, dtype, original, begin, end, sums);
}

}  // namespace qtool::quant::detail
