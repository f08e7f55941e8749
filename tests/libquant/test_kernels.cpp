// The fast paths (SIMD, split across a pool) against the scalar references: random weights and
// edge cases over odd sizes, every value a 16-bit dtype can hold, thread-count independence, and
// the error of dequant(quant(x)).
#include <algorithm>
#include <cmath>
#include <limits>

#include "test_scheme_util.hpp"

using namespace qtool;
using namespace qtool::quant;
using detail::Impl;

namespace {

const Scheme kAllSchemes[] = {Scheme::Int8, Scheme::Fp8E4M3, Scheme::Fp8E5M2, Scheme::Nf4, Scheme::Fp4};
const DType kDtypes[] = {DType::BF16, DType::F16, DType::F32};
const int64_t kOddSizes[] = {1, 2, 3, 5, 7, 15, 16, 17, 31, 33, 63, 64, 65, 127, 128, 129, 255, 257};

std::vector<SchemeOptions> option_variants(Scheme s) {
  std::vector<SchemeOptions> v;
  if (is_4bit(s)) {
    for (uint32_t bs : {32u, 64u, 128u, 4096u})
      for (bool dq : {false, true}) v.push_back({s, bs, dq, false});
  } else if (is_fp8(s)) {
    v.push_back({s, 64, false, false});
    v.push_back({s, 64, false, true});
  } else {
    v.push_back({s, 64, false, false});
  }
  return v;
}

std::string describe(const SchemeOptions& o, DType dt, int64_t rows, int64_t cols) {
  return str_cat(scheme_name(o.scheme), " ", test::dtype_str(dt), " [", rows, ", ", cols,
                 "] bs=", o.blocksize, o.double_quant ? " dq" : "", o.per_tensor ? " per-tensor" : "");
}

// Both fast paths (the best the CPU has, and AVX2 alone) give the reference's bytes.
void check_fast_equals_ref(const test::TestWeight& w, const SchemeOptions& o, ThreadPool& pool) {
  const auto ref = test::quantize_with(w, o, Impl::Reference, pool);
  for (Impl impl : {Impl::Fast, Impl::FastAvx2}) {
    CAPTURE(static_cast<int>(impl));
    const auto fast = test::quantize_with(w, o, impl, pool);
    REQUIRE(ref.size() == fast.size());
    for (size_t i = 0; i < ref.size(); ++i) {
      CAPTURE(i);
      REQUIRE(ref[i] == fast[i]);
    }
  }
}

const char* simd_name() {
  return detail::cpu_features().avx512 ? "AVX-512 (and AVX2 checked too)"
         : detail::have_simd()         ? "AVX2+F16C"
                                       : "none (reference only)";
}

}  // namespace

TEST_CASE("fast paths equal the scalar references on random weights of odd sizes") {
  std::mt19937_64 rng(test::scheme_test_seed("fast vs reference, odd sizes"));
  ThreadPool pool(2);
  MESSAGE("SIMD fast path: ", simd_name());
  int n = 0;
  for (Scheme s : kAllSchemes)
    for (DType dt : kDtypes)
      for (int64_t rows : {int64_t{1}, int64_t{2}, int64_t{3}, int64_t{7}})
        for (int64_t cols : kOddSizes)
          for (const auto& o : option_variants(s)) {
            CAPTURE(describe(o, dt, rows, cols));
            const auto w = test::random_weight(dt, rows, cols, rng, /*edges=*/rows >= 5 || (rows == 7), s);
            check_fast_equals_ref(w, o, pool);
            ++n;
          }
  MESSAGE(n, " shape/scheme/dtype combinations");
}

TEST_CASE("fast paths equal the scalar references with edge rows (zero, extremes, subnormals)") {
  std::mt19937_64 rng(test::scheme_test_seed("fast vs reference, edges"));
  ThreadPool pool(2);
  for (Scheme s : kAllSchemes)
    for (DType dt : kDtypes)
      for (int64_t cols : {int64_t{1}, int64_t{33}, int64_t{64}, int64_t{100}, int64_t{517}})
        for (const auto& o : option_variants(s)) {
          CAPTURE(describe(o, dt, 9, cols));
          check_fast_equals_ref(test::random_weight(dt, 9, cols, rng, true, s), o, pool);
        }
}

TEST_CASE("a larger weight: fast equals reference, and the bytes do not depend on the thread count") {
  std::mt19937_64 rng(test::scheme_test_seed("thread independence"));
  ThreadPool pool1(1), pool2(2), pool3(3);
  for (Scheme s : kAllSchemes)
    for (DType dt : {DType::BF16, DType::F32}) {
      // 300 x 1000: 4688 blocks of 64, 19 nested blocks; rows split unevenly among 3 threads.
      const auto w = test::random_weight(dt, 300, 1000, rng, true, s);
      for (const auto& o : option_variants(s)) {
        if (o.blocksize == 4096 || o.blocksize == 128) continue;
        CAPTURE(describe(o, dt, 300, 1000));
        const auto a = test::quantize_with(w, o, Impl::Fast, pool1);
        CHECK(a == test::quantize_with(w, o, Impl::Fast, pool2));
        CHECK(a == test::quantize_with(w, o, Impl::Fast, pool3));
        CHECK(a == test::quantize_with(w, o, Impl::FastAvx2, pool3));
        CHECK(a == test::quantize_with(w, o, Impl::Reference, pool3));
      }
    }
}

TEST_CASE("every finite 16-bit value: fp8 and int8 fast paths equal the references") {
  // A first element of +-max makes the scale exactly 1 (fp8) so each value is encoded directly;
  // int8 runs every value through the float16 cast and the multiplier.
  ThreadPool pool(2);
  for (DType dt : {DType::BF16, DType::F16}) {
    for (Scheme s : {Scheme::Fp8E4M3, Scheme::Fp8E5M2, Scheme::Int8}) {
      const float limit = s == Scheme::Fp8E4M3 ? 448.0f : s == Scheme::Fp8E5M2 ? 57344.0f : 65280.0f;
      std::vector<uint16_t> patterns;
      for (uint32_t b = 0; b < 65536; ++b) {
        const float v =
            dt == DType::BF16 ? bf16_to_f32(static_cast<uint16_t>(b)) : f16_to_f32(static_cast<uint16_t>(b));
        if (std::isfinite(v) && std::fabs(v) <= limit) patterns.push_back(static_cast<uint16_t>(b));
      }
      test::TestWeight w(dt, 1, static_cast<int64_t>(patterns.size()) + 1);
      w.set(0, limit);
      for (size_t i = 0; i < patterns.size(); ++i) w.set_bits(i + 1, patterns[i]);
      CAPTURE(describe({s}, dt, 1, w.cols));
      check_fast_equals_ref(w, {s}, pool);
      if (is_fp8(s)) {
        // Scale 1: the code is the value's own fp8 encoding, and decodes back within half a step.
        const auto outs = test::quantize_with(w, {s}, Impl::Fast, pool);
        const auto& fmt = detail::fp8_format(s);
        for (size_t i = 1; i < outs[0].size(); ++i) {
          const float v = w.get(i), d = fmt.decode(outs[0][i]);
          const float step = std::max(std::ldexp(std::fabs(d), s == Scheme::Fp8E4M3 ? -3 : -2),
                                      s == Scheme::Fp8E4M3 ? 0x1p-9f : 0x1p-16f);
          if (!(std::fabs(v - d) <= step / 2)) FAIL_CHECK("value ", v, " -> ", d);
        }
      }
    }
  }
}

TEST_CASE("int8 bf16: every absmax from 2^-12 to 2^-6 with every value under 2^-17") {
  // The fast path skips rounding bf16 values to float16 when SCB >= 2^-8, where values under
  // 2^-17 (the only ones the rounding changes) quantize to 0 either way. One row per bf16 absmax
  // in [2^-12, 2^-6), each holding every bf16 value of magnitude under 2^-17: below the
  // threshold the rounding changes some codes, so a wrong threshold shows here.
  ThreadPool pool(2);
  std::vector<uint16_t> tiny;
  for (uint32_t b = 0; b < 65536; ++b) {
    const float v = bf16_to_f32(static_cast<uint16_t>(b));
    if (std::fabs(v) < 0x1p-17f) tiny.push_back(static_cast<uint16_t>(b));
  }
  const uint16_t lo = f32_to_bf16(0x1p-12f), hi = f32_to_bf16(0x1p-6f);
  test::TestWeight w(DType::BF16, hi - lo, static_cast<int64_t>(tiny.size()) + 1);
  for (uint16_t top = lo; top < hi; ++top) {
    const uint64_t row = top - lo;
    w.set(row * w.cols, bf16_to_f32(top));
    for (size_t i = 0; i < tiny.size(); ++i) w.set_bits(row * w.cols + i + 1, tiny[i]);
  }
  check_fast_equals_ref(w, {Scheme::Int8}, pool);
}

TEST_CASE("float32 inputs halfway between float16 values and at subnormal boundaries (int8)") {
  ThreadPool pool(2);
  std::mt19937_64 rng(test::scheme_test_seed("f16 ties"));
  test::TestWeight w(DType::F32, 4, 4096);
  std::uniform_int_distribution<uint32_t> pick(0, 0x7BFE);
  for (uint64_t i = 0; i < w.numel(); ++i) {
    const uint16_t h = static_cast<uint16_t>(pick(rng));
    const float lo = f16_to_f32(h), hi = f16_to_f32(static_cast<uint16_t>(h + 1));
    const float mid = lo + (hi - lo) / 2;  // exact in float32
    w.set(i, (i & 1) ? -mid : mid);
  }
  w.set(0, 65504.0f);
  w.set(1, 65519.99f);  // rounds down to 65504 in float16
  check_fast_equals_ref(w, {Scheme::Int8}, pool);
}

TEST_CASE("fp8 at scales across the whole exponent range: every 16-bit value a row can hold") {
  // The fast paths divide by the row's scale through its reciprocal and a correction (fp8.cpp);
  // each row here has its own absmax (column 0), so its own scale, and holds every 16-bit value
  // within that absmax. Rows whose 1 / scale overflows (absmax near the smallest subnormals)
  // take the division path; the others the reciprocal's.
  std::mt19937_64 rng(test::scheme_test_seed("fp8 scales"));
  ThreadPool pool(2);
  for (DType dt : {DType::BF16, DType::F16}) {
    const int min_exp = dt == DType::BF16 ? -133 : -24, max_exp = dt == DType::BF16 ? 127 : 14;
    std::vector<float> amaxes;
    for (int e = min_exp; e <= max_exp; e += (dt == DType::BF16 ? 11 : 3)) {
      const float m = 1.0f + static_cast<float>(rng() % 128) / 128.0f;
      amaxes.push_back(std::ldexp(m, e));
    }
    amaxes.push_back(dt == DType::BF16 ? 3.3895313892515355e38f : 65504.0f);
    amaxes.push_back(dt == DType::BF16 ? 0x1p-133f : 0x1p-24f);  // the smallest subnormal
    amaxes.push_back(0.0f);                                      // scale = eps
    std::vector<std::vector<uint16_t>> rows;
    size_t cols = 0;
    for (float& a : amaxes) {
      test::TestWeight one(dt, 1, 1);
      one.set(0, a);
      a = one.get(0);  // as the dtype holds it
      std::vector<uint16_t> bits;
      for (uint32_t b = 0; b < 65536; ++b) {
        const float v =
            dt == DType::BF16 ? bf16_to_f32(static_cast<uint16_t>(b)) : f16_to_f32(static_cast<uint16_t>(b));
        if (std::isfinite(v) && std::fabs(v) <= a) bits.push_back(static_cast<uint16_t>(b));
      }
      cols = std::max(cols, bits.size() + 1);
      rows.push_back(std::move(bits));
    }
    test::TestWeight w(dt, static_cast<int64_t>(rows.size()), static_cast<int64_t>(cols));
    for (size_t r = 0; r < rows.size(); ++r) {
      w.set(r * cols, amaxes[r]);
      for (size_t i = 0; i < rows[r].size(); ++i) w.set_bits(r * cols + 1 + i, rows[r][i]);
      for (size_t i = rows[r].size() + 1; i < cols; ++i) w.set(r * cols + i, 0.0f);
    }
    for (Scheme s : {Scheme::Fp8E4M3, Scheme::Fp8E5M2}) {
      CAPTURE(describe({s}, dt, w.rows, w.cols));
      check_fast_equals_ref(w, {s}, pool);
    }
  }
}

TEST_CASE("4-bit: values on the thresholds take the lower code; zero blocks are code 0.0") {
  ThreadPool pool(1);
  for (Scheme s : {Scheme::Nf4, Scheme::Fp4}) {
    const auto& t = detail::bnb4_table(s);
    test::TestWeight w(DType::F32, 2, 32);
    w.set(0, 1.0f);  // absmax 1: scaled values equal the inputs exactly
    for (size_t i = 0; i < 15; ++i) w.set(i + 1, t.thresholds[i]);
    for (size_t i = 16; i < 32; ++i) w.set(i, 0.0f);
    for (size_t i = 32; i < 64; ++i) w.set(i, 0.0f);  // block 1: all zero
    for (auto impl : {Impl::Reference, Impl::Fast, Impl::FastAvx2}) {
      const auto outs = test::quantize_with(w, {s, 32}, impl, pool);
      auto code = [&](size_t i) { return (i & 1) ? (outs[0][i / 2] & 15) : (outs[0][i / 2] >> 4); };
      for (size_t i = 0; i < 15; ++i) CHECK(code(i + 1) == t.pattern_of[i]);  // threshold i -> sorted index i
      const uint8_t zero_code = t.pattern_of[7];
      CHECK(t.code[zero_code] == 0.0f);
      for (size_t i = 32; i < 64; ++i) CHECK(code(i) == zero_code);
      float absmax1;
      std::memcpy(&absmax1, outs[1].data() + 4, 4);
      CHECK(absmax1 == 0.0f);
    }
  }
  CHECK(detail::bnb4_table(Scheme::Nf4).pattern_of[7] == 7);  // nf4: an all-zero block writes code 7
}

TEST_CASE("4-bit: the short last block divides and keeps its clamped absmax; odd counts are padded") {
  ThreadPool pool(1);
  test::TestWeight w(DType::F32, 1, 5);  // one short block of 5 (blocksize 64), padded to 6 nibbles
  for (uint64_t i = 0; i < 5; ++i) w.set(i, 0.0f);
  const auto outs = test::quantize_with(w, {Scheme::Nf4, 64}, Impl::Fast, pool);
  float am;
  std::memcpy(&am, outs[1].data(), 4);
  CHECK(am == 1e-38f);           // clamped, as torch stores the short block's max
  REQUIRE(outs[0].size() == 3);  // (5 + 1) / 2
  CHECK(outs[0][2] == 0x77);     // element 4 and the pad: both code 7
}

TEST_CASE("double quant's nested blocks: the AVX2 path equals the reference, edge blocks included") {
  const uint64_t seed = test::scheme_test_seed("nested blocks");
  std::mt19937_64 rng(seed);
  std::lognormal_distribution<float> ld(-4.0f, 1.5f);
  for (const uint64_t n : {uint64_t{1}, uint64_t{255}, uint64_t{256}, uint64_t{257}, uint64_t{2048 + 77}}) {
    std::vector<float> x(n);
    for (auto& v : x) v = ld(rng);
    // Block 1 (when there is one): all equal to the offset (absmax2 0, codes 0); block 2: 0 and
    // the smallest subnormal (at offset 0, 1 / absmax2 overflows: the reference's NaN path);
    // block 3: the extremes.
    const float offset = detail::torch_mean_f32(x.data(), n);
    for (uint64_t i = 256; i < std::min<uint64_t>(n, 512); ++i) x[i] = offset;
    for (uint64_t i = 512; i < std::min<uint64_t>(n, 768); ++i)
      x[i] = i % 2 ? 0.0f : std::numeric_limits<float>::denorm_min();
    for (uint64_t i = 768; i < std::min<uint64_t>(n, 1024); ++i)
      x[i] = i % 3 == 0 ? 0.0f : (i % 3 == 1 ? 3.4e38f : std::numeric_limits<float>::denorm_min());
    const uint64_t n_blocks2 = (n + kNestedBlocksize - 1) / kNestedBlocksize;
    for (const float off : {offset, 0.0f, 1.5f}) {
      CAPTURE(n);
      CAPTURE(off);
      std::vector<uint8_t> q_ref(n), q_fast(n), a_ref(4 * n_blocks2), a_fast(4 * n_blocks2);
      detail::dynamic_quantize_blocks(x.data(), n, off, 0, n_blocks2, q_ref.data(), a_ref.data(),
                                      Impl::Reference);
      detail::dynamic_quantize_blocks(x.data(), n, off, 0, n_blocks2, q_fast.data(), a_fast.data(),
                                      Impl::Fast);
      CHECK(q_ref == q_fast);
      CHECK(a_ref == a_fast);
    }
  }
}

TEST_CASE("dequant(quant(x)) stays within each scheme's error bound") {
  std::mt19937_64 rng(test::scheme_test_seed("error bounds"));
  ThreadPool pool(2);
  for (DType dt : kDtypes) {
    const auto w = test::random_weight(dt, 64, 300, rng, false, Scheme::Nf4, /*outliers=*/false);
    for (Scheme s : kAllSchemes)
      for (const auto& o : option_variants(s)) {
        if (o.blocksize == 4096) continue;
        CAPTURE(describe(o, dt, 64, 300));
        const auto outs = test::quantize_with(w, o, Impl::Fast, pool);
        const auto q = test::linear_for(w, o, test::offset_of(outs));
        const auto parts = tensor_bytes(q, test::const_spans(outs));
        std::vector<float> deq(w.numel());
        dequantize_weight(q, parts, deq.data(), pool);
        // Per-element bound from the scheme's step size.
        std::vector<float> absmax_true(q.n_blocks());
        if (is_4bit(s)) {
          SchemeOptions plain = o;
          plain.double_quant = false;
          const auto p = test::quantize_with(w, plain, Impl::Fast, pool);
          std::memcpy(absmax_true.data(), p[1].data(), p[1].size());
        }
        double err2 = 0, ref2 = 0;
        for (uint64_t i = 0; i < w.numel(); ++i) {
          const float x = w.get(i), d = deq[i];
          const uint64_t r = i / static_cast<uint64_t>(w.cols);
          float bound = 0;
          if (s == Scheme::Int8) {
            float scb;
            std::memcpy(&scb, outs[1].data() + 4 * r, 4);
            bound = 0.5f * scb / 127.0f * 1.0001f + std::fabs(x) * 0x1p-11f;
          } else if (is_fp8(s)) {
            const float scale = detail::load_element(dt, outs[1].data(), o.per_tensor ? 0 : r);
            const int man = s == Scheme::Fp8E4M3 ? 3 : 2;
            bound = std::fabs(x) * (std::ldexp(1.0f, -man - 1) + 0x1p-8f) +
                    scale * (s == Scheme::Fp8E4M3 ? 0x1p-9f : 0x1p-16f);
          } else {
            const float a = absmax_true[i / o.blocksize];
            // Half the widest gap of the code values: nf4 (-1, -0.696), fp4 (8/12, 12/12).
            const float half_gap = s == Scheme::Nf4 ? 0.152f : 0.1667f;
            // Double quant moves absmax by at most half a step of the dynamic map (< 0.0075) of
            // its nested block's absmax2, plus the lookup table's resolution.
            float da = 0;
            if (o.double_quant) {
              float absmax2;
              std::memcpy(&absmax2, outs[3].data() + 4 * (i / o.blocksize / kNestedBlocksize), 4);
              da = absmax2 * 0.0076f;
            }
            bound = a * half_gap * 1.0001f + da * 1.17f;
          }
          if (!(std::fabs(x - d) <= bound))
            FAIL_CHECK("element ", i, ": ", x, " -> ", d, " (bound ", bound, ")");
          err2 += double(x - d) * double(x - d);
          ref2 += double(x) * double(x);
        }
        const double rel_rms = std::sqrt(err2 / ref2);
        const double limit = s == Scheme::Int8      ? 0.012
                             : s == Scheme::Fp8E4M3 ? 0.04
                             : s == Scheme::Fp8E5M2 ? 0.08
                             : s == Scheme::Nf4     ? 0.12
                                                    : 0.16;
        CAPTURE(rel_rms);
        CHECK(rel_rms < limit);
      }
  }
}

TEST_CASE("dequantize by row ranges equals the whole; bf16 output is the rounded float32") {
  std::mt19937_64 rng(test::scheme_test_seed("dequant ranges"));
  ThreadPool pool(3);
  for (Scheme s : kAllSchemes)
    for (const auto& o : option_variants(s)) {
      if (o.blocksize == 4096) continue;
      const auto w = test::random_weight(DType::BF16, 37, 45, rng, true, s);  // blocks cross rows
      CAPTURE(describe(o, DType::BF16, 37, 45));
      const auto outs = test::quantize_with(w, o, Impl::Fast, pool);
      const auto q = test::linear_for(w, o, test::offset_of(outs));
      const auto parts = tensor_bytes(q, test::const_spans(outs));
      std::vector<float> whole(w.numel());
      dequantize_weight(q, parts, whole.data(), pool);
      std::vector<float> pieces(w.numel());
      for (size_t r = 0; r < 37; r += 5) {
        const size_t re = std::min<size_t>(37, r + 5);
        dequantize_rows_f32(q, parts, pieces.data() + r * 45, r, re);
      }
      CHECK(std::memcmp(whole.data(), pieces.data(), whole.size() * 4) == 0);
      std::vector<uint16_t> bf(w.numel() - 3 * 45);
      dequantize_rows_bf16(q, parts, bf.data(), 3, 37);
      bool same = true;
      for (size_t i = 0; i < bf.size(); ++i) same = same && bf[i] == f32_to_bf16(whole[3 * 45 + i]);
      CHECK(same);
      // The file's quant_map is optional: the built-in tables give the same values.
      TensorBytes no_maps = parts;
      no_maps.quant_map = {};
      no_maps.nested_quant_map = {};
      std::vector<float> again(w.numel());
      dequantize_weight(q, no_maps, again.data(), pool);
      CHECK(std::memcmp(whole.data(), again.data(), whole.size() * 4) == 0);
    }
}
