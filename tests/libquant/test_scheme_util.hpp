// Helpers for the libquant scheme tests: a printed seed, weights built in the weight's dtype with
// edge cases, quantization through the reference or the fast path, and hex decoding.
#pragma once

#include <doctest/doctest.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "qtool/formats/dtype.hpp"
#include "qtool/formats/thread_pool.hpp"
#include "qtool/libquant/quant.hpp"
#include "scheme.hpp"

namespace qtool::test {

// QTOOL_TEST_SEED if set, else from the clock; printed so that a failure can be replayed.
inline uint64_t scheme_test_seed(const char* what) {
  uint64_t seed;
  if (const char* env = std::getenv("QTOOL_TEST_SEED"))
    seed = std::strtoull(env, nullptr, 10);
  else
    seed = static_cast<uint64_t>(std::random_device{}()) ^ (static_cast<uint64_t>(::getpid()) << 20);
  std::fprintf(stderr, "[%s] QTOOL_TEST_SEED=%llu\n", what, static_cast<unsigned long long>(seed));
  return seed;
}

inline std::vector<uint8_t> from_hex(std::string_view hex) {
  std::vector<uint8_t> out(hex.size() / 2);
  for (size_t i = 0; i < out.size(); ++i)
    out[i] = static_cast<uint8_t>(std::stoul(std::string(hex.substr(2 * i, 2)), nullptr, 16));
  return out;
}

// A weight of `dtype` stored as raw bytes, written element by element from float32 values.
struct TestWeight {
  DType dtype = DType::BF16;
  int64_t rows = 0, cols = 0;
  std::vector<uint8_t> bytes;

  TestWeight(DType dt, int64_t r, int64_t c)
      : dtype(dt), rows(r), cols(c), bytes(static_cast<size_t>(r * c) * dtype_size(dt)) {}
  std::vector<int64_t> shape() const { return {rows, cols}; }
  uint64_t numel() const { return static_cast<uint64_t>(rows * cols); }
  void set(uint64_t i, float v) { convert_from_f32(dtype, &v, bytes.data() + i * dtype_size(dtype), 1); }
  void set_bits(uint64_t i, uint32_t bits) {
    if (dtype == DType::F32)
      std::memcpy(bytes.data() + 4 * i, &bits, 4);
    else {
      const auto h = static_cast<uint16_t>(bits);
      std::memcpy(bytes.data() + 2 * i, &h, 2);
    }
  }
  float get(uint64_t i) const { return quant::detail::load_element(dtype, bytes.data(), i); }
};

// Weights that look trained (normal, per-row scale, rare outliers) with edge cases mixed in when
// `edges`: an all-zero row, a row of the dtype's extremes, subnormals, exact ties.
inline TestWeight random_weight(DType dtype, int64_t rows, int64_t cols, std::mt19937_64& rng, bool edges,
                                quant::Scheme scheme = quant::Scheme::Nf4, bool outliers = true) {
  TestWeight w(dtype, rows, cols);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> unif(0.0f, 1.0f);
  for (int64_t r = 0; r < rows; ++r) {
    const float row_scale = 0.05f * std::exp(0.5f * normal(rng));
    for (int64_t c = 0; c < cols; ++c) {
      float v = normal(rng) * row_scale;
      if (outliers && unif(rng) < 0.01f) v *= 20.0f;
      w.set(static_cast<uint64_t>(r * cols + c), v);
    }
  }
  if (!edges) return w;
  const float max_val = dtype == DType::F16    ? 65504.0f
                        : dtype == DType::BF16 ? 3.3895313892515355e38f
                                               : 3.4028234663852886e38f;
  const float big = scheme == quant::Scheme::Int8 ? (dtype == DType::BF16 ? 65280.0f : 65504.0f) : max_val;
  const float tiny = dtype == DType::F16 ? 5.9604644775390625e-08f : 1e-39f;  // subnormal of the dtype
  auto row = [&](int64_t r, auto fn) {
    if (r < rows)
      for (int64_t c = 0; c < cols; ++c) w.set(static_cast<uint64_t>(r * cols + c), fn(c));
  };
  row(1, [](int64_t) { return 0.0f; });
  row(2, [&](int64_t c) { return c == 0 ? big : c == 1 ? -big : 0.001f * static_cast<float>(c % 5); });
  row(3, [&](int64_t c) { return tiny * static_cast<float>(c % 7 - 3); });
  row(4, [&](int64_t c) { return c % 2 ? -0.0f : 1e-6f * static_cast<float>(c); });
  return w;
}

// Quantizes through one implementation; returns the tensors' bytes in quantized_decls order.
inline std::vector<std::vector<uint8_t>> quantize_with(const TestWeight& w,
                                                       const quant::SchemeOptions& options,
                                                       quant::detail::Impl impl, ThreadPool& pool) {
  const auto shape = w.shape();
  const auto decls = quant::quantized_decls("m", w.dtype, shape, options);
  std::vector<std::vector<uint8_t>> outs;
  for (const auto& d : decls) outs.emplace_back(d.nbytes(), uint8_t{0xA5});
  std::vector<std::span<uint8_t>> spans(outs.begin(), outs.end());
  quant::detail::quantize_weight_impl("test tensor 'm.weight'", w.dtype, shape, w.bytes, options, spans, pool,
                                      impl);
  return outs;
}

// A QuantizedLinear for bytes produced by quantize_with (module "m").
inline quant::QuantizedLinear linear_for(const TestWeight& w, const quant::SchemeOptions& options,
                                         float nested_offset) {
  quant::QuantizedLinear q;
  q.module = std::string(1, 'm');  // (assigning a literal trips a GCC 12 -Wrestrict false positive)
  q.options = options;
  q.orig_dtype = quant::is_fp8(options.scheme) || quant::is_4bit(options.scheme) ? w.dtype : DType::F16;
  q.shape = w.shape();
  for (const auto& d : quant::quantized_decls("m", w.dtype, q.shape, options))
    q.tensor_names.push_back(d.name);
  q.tensor_parts = quant::scheme_parts(options);
  q.nested_offset = nested_offset;
  return q;
}

inline std::vector<std::span<const uint8_t>> const_spans(const std::vector<std::vector<uint8_t>>& outs) {
  return {outs.begin(), outs.end()};
}

// The nested_offset recorded in a 4-bit quant_state JSON (last part).
inline float offset_of(const std::vector<std::vector<uint8_t>>& outs) {
  const std::string json(outs.back().begin(), outs.back().end());
  const size_t p = json.find("\"nested_offset\": ");
  return p == std::string::npos ? 0.0f : std::strtof(json.c_str() + p + 17, nullptr);
}

inline const char* dtype_str(DType dt) {
  return dt == DType::BF16 ? "BF16" : dt == DType::F16 ? "F16" : "F32";
}

}  // namespace qtool::test
