// The one-pass error statistics of the conversion report against the library's dequantizer:
// every scheme, input dtype and awkward shape, on the AVX2 and the scalar paths.
#include <doctest/doctest.h>

#include <cmath>
#include <random>
#include <vector>

#include "convert_stats.hpp"
#include "qtool/formats/thread_pool.hpp"
#include "qtool/libquant/config.hpp"
#include "qtool/libquant/quant.hpp"
#include "test_convert_util.hpp"

using namespace qtool;
using namespace qtool::quant;

namespace {

struct Quantized {
  std::vector<TensorDecl> decls;
  std::vector<std::vector<uint8_t>> bufs;
  QuantizedLinear linear;
  TensorBytes parts;
};

// Quantizes `bytes` and describes the result as a QuantizedLinear, as the conversion does.
Quantized quantize(const std::vector<uint8_t>& bytes, DType dtype, int64_t rows, int64_t cols,
                   const SchemeOptions& o, ThreadPool& pool) {
  Quantized q;
  const std::vector<int64_t> shape{rows, cols};
  q.decls = quantized_decls("m", dtype, shape, o);
  std::vector<std::span<uint8_t>> outs;
  for (const auto& d : q.decls) q.bufs.emplace_back(d.nbytes());
  for (auto& b : q.bufs) outs.emplace_back(b);
  quantize_weight_into("m", dtype, shape, bytes, o, outs, pool);
  q.linear.module = std::string(1, 'm');
  q.linear.options = o;
  q.linear.orig_dtype = dtype;
  q.linear.shape = shape;
  q.linear.tensor_parts = scheme_parts(o);
  for (const auto& d : q.decls) q.linear.tensor_names.push_back(d.name);
  if (o.double_quant) {
    const auto state = quant_state_bytes(q.bufs.back());
    q.linear.nested_offset =
        nlohmann::json::parse(state.begin(), state.end()).at("nested_offset").get<float>();
  }
  std::vector<std::span<const uint8_t>> parts(q.bufs.begin(), q.bufs.end());
  q.parts = tensor_bytes(q.linear, parts);
  return q;
}

}  // namespace

TEST_CASE("convert stats: one pass equals dequantize-then-compare") {
  const uint64_t seed = test::printed_seed("convert stats");
  std::mt19937_64 rng(seed);
  ThreadPool pool(1);
  const std::pair<int64_t, int64_t> shapes[] = {{1, 1},   {1, 7},   {3, 5},   {2, 64},  {7, 33},
                                                {17, 64}, {5, 129}, {64, 40}, {9, 1000}};
  std::vector<SchemeOptions> schemes;
  for (Scheme s : {Scheme::Int8, Scheme::Fp8E4M3, Scheme::Fp8E5M2, Scheme::Nf4, Scheme::Fp4}) {
    SchemeOptions o;
    o.scheme = s;
    schemes.push_back(o);
    if (is_fp8(s)) {
      o.per_tensor = true;
      schemes.push_back(o);
    }
    if (is_4bit(s)) {
      o.double_quant = true;
      schemes.push_back(o);
      o.blocksize = 32;
      schemes.push_back(o);
    }
  }
  for (const auto& [rows, cols] : shapes) {
    for (DType dtype : {DType::BF16, DType::F16, DType::F32}) {
      // Normal values with per-row scales, a zero row, an outlier, a subnormal.
      std::vector<float> f(static_cast<size_t>(rows * cols));
      std::normal_distribution<float> nd(0.0f, 1.0f);
      for (int64_t r = 0; r < rows; ++r) {
        const float scale = std::exp(0.5f * nd(rng)) * 0.02f;
        for (int64_t c = 0; c < cols; ++c) f[r * cols + c] = r == 1 ? 0.0f : scale * nd(rng);
      }
      if (f.size() > 3) f[3] = 0.9f;
      if (f.size() > 5) f[5] = 1e-40f;
      std::vector<uint8_t> bytes(f.size() * dtype_size(dtype));
      convert_from_f32(dtype, f.data(), bytes.data(), f.size());
      std::vector<float> ref(f.size());
      convert_to_f32(dtype, bytes.data(), ref.data(), ref.size());
      for (const SchemeOptions& o : schemes) {
        CAPTURE(rows);
        CAPTURE(cols);
        CAPTURE(dtype_name(dtype));
        const std::string tag = options_to_json(o).dump();
        CAPTURE(tag);
        const Quantized q = quantize(bytes, dtype, rows, cols, o, pool);
        std::vector<float> deq(f.size());
        dequantize_rows_f32(q.linear, q.parts, deq.data(), 0, static_cast<size_t>(rows));
        double sr = 0, se = 0;
        float mx = 0;
        for (size_t i = 0; i < deq.size(); ++i) {
          const float e = deq[i] - ref[i];
          sr += double(ref[i]) * ref[i];
          se += double(e) * e;
          mx = std::max(mx, std::fabs(e));
        }
        for (detail::Impl simd : {detail::Impl::Fast, detail::Impl::FastAvx2, detail::Impl::Reference}) {
          CAPTURE(static_cast<int>(simd));
          detail::ErrorSums whole, split;
          detail::accumulate_error(q.linear, q.parts, dtype, bytes.data(), 0, static_cast<size_t>(rows),
                                   whole, simd);
          // Row by row adds up to the same.
          for (int64_t r = 0; r < rows; ++r) {
            detail::accumulate_error(q.linear, q.parts, dtype, bytes.data(), static_cast<size_t>(r),
                                     static_cast<size_t>(r + 1), split, simd);
          }
          for (const auto* s : {&whole, &split}) {
            CHECK(s->sum_sq_ref == doctest::Approx(sr).epsilon(1e-5));
            CHECK(s->sum_sq_err == doctest::Approx(se).epsilon(1e-5));
            CHECK(s->max_abs_err == mx);  // the same decoded values, exactly
          }
        }
      }
    }
  }
}
