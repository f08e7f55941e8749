// Shared pieces of the CPU ops (cpu_ops.cpp, cpu_ops_linear.cpp, cpu_ops_attention.cpp): element
// loads and stores with the activation dtypes' roundings, row access of views, the split of work
// over the pool's threads, and the float32 8-lane vector type of the dot products.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

#include "qtool/formats/dtype.hpp"
#include "qtool/formats/error.hpp"
#include "qtool/formats/thread_pool.hpp"
#include "qtool/runner/dequant.hpp"
#include "qtool/runner/kernel_math.hpp"
#include "qtool/runner/ops.hpp"

namespace qtool::runner::cpu_ops {

// float32 -> f16 bits, round to nearest even, subnormals, overflow to inf; NaN -> sign | 0x7E00
// (as qtool::f32_to_f16, without its generic encoder).
inline uint16_t f32_to_f16_bits(float f) {
  const uint32_t u = kmath::float_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return static_cast<uint16_t>(sign | 0x7E00u);
  if (a >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // >= 65520 rounds to inf
  if (a < 0x38800000u) {
    // Below 2^-14: a multiple of 2^-24; the scaling is exact and rintf rounds to nearest even.
    const float scaled = kmath::bits_float(a) * 16777216.0f;
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(std::rint(scaled)));
  }
  const uint32_t r = a - 0x38000000u + 0xFFFu + ((a >> 13) & 1u);
  return static_cast<uint16_t>(sign | (r >> 13));
}

// v rounded to dtype `dt` (BF16, F16 or F32) and widened back: the value ⟦v⟧ a tensor of that
// dtype holds.
inline float round_to(DType dt, float v) {
  switch (dt) {
    case DType::BF16: return kmath::bf16_bits_to_f32(kmath::f32_to_bf16_bits(v));
    case DType::F16: return dq::f16_to_f32(f32_to_f16_bits(v));
    default: return v;
  }
}

inline float load(DType dt, const uint8_t* p, int64_t i) {
  switch (dt) {
    case DType::BF16: return kmath::bf16_bits_to_f32(dq::load_u16(p, static_cast<uint64_t>(i)));
    case DType::F16: return dq::f16_to_f32(dq::load_u16(p, static_cast<uint64_t>(i)));
    case DType::F32: return dq::load_f32(p, static_cast<uint64_t>(i));
    default: break;
  }
  QTOOL_ASSERT_MSG(false, "activation dtype ", dtype_name(dt), " is not BF16, F16 or F32");
  return 0.0f;
}

inline void store(DType dt, uint8_t* p, int64_t i, float v) {
  switch (dt) {
    case DType::BF16: {
      const uint16_t h = kmath::f32_to_bf16_bits(v);
      std::memcpy(p + 2 * i, &h, 2);
      return;
    }
    case DType::F16: {
      const uint16_t h = f32_to_f16_bits(v);
      std::memcpy(p + 2 * i, &h, 2);
      return;
    }
    case DType::F32: std::memcpy(p + 4 * i, &v, 4); return;
    default: break;
  }
  QTOOL_ASSERT_MSG(false, "activation dtype ", dtype_name(dt), " is not BF16, F16 or F32");
}

inline uint8_t* row_ptr(const Mat& m, int64_t r) {
  return static_cast<uint8_t*>(m.data) + static_cast<size_t>(r * m.ld) * m.elem_bytes();
}

// Row r of m widened to float32 (m.cols values).
void load_row(const Mat& m, int64_t r, float* dst);
// Row r of m := src rounded once to m's dtype.
void store_row(const float* src, const Mat& m, int64_t r);

// Element i (< numel) of a plain (BF16/F16/F32) weight vector as float32.
inline float weight_value(const DequantParams& w, uint64_t i) { return dq::plain_value(w, i); }

// finfo(dt).min, the additive mask value of transformers.
inline float finfo_min(DType dt) {
  switch (dt) {
    case DType::BF16: return kmath::bf16_bits_to_f32(0xFF7Fu);
    case DType::F16: return -65504.0f;
    default: return std::numeric_limits<float>::lowest();
  }
}

// Splits [0, n) into one contiguous range per thread of the pool (ranges of at least
// `min_items`): fn(slot, begin, end), slot < pool.size(), so that each call may use the scratch
// of its slot. Deterministic: the ranges depend on n and the pool size only.
void for_slots(ThreadPool& pool, size_t n, size_t min_items,
               const std::function<void(size_t, size_t, size_t)>& fn);

// Rows of m per parallel chunk for an element-wise op on `cols` columns (about 16 K elements).
inline size_t rows_per_chunk(int64_t cols) {
  return static_cast<size_t>(std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(1, cols)));
}

// Rounds n up to a multiple of 8 (the lanes of the dot products).
inline int64_t round_up8(int64_t n) { return (n + 7) & ~int64_t{7}; }

// The backend's reusable scratch (outside the activation block).
struct Scratch {
  std::vector<float> xf;                        // linear: x in float32, [rows, round_up8(in)]
  std::vector<std::vector<float>> weight_rows;  // linear: per slot, dequantized rows
  std::vector<std::vector<float>> kv;           // attention: per slot, K and V of one head
  std::vector<std::vector<float>> scores;       // attention: per slot, one row of scores
};

void linear(ThreadPool& pool, Scratch& scratch, const Mat& x, const DequantParams& weight,
            const DequantParams* bias, const Mat& out);
void attention(ThreadPool& pool, Scratch& scratch, const Mat& q, const Mat& k, const Mat& v,
               const AttentionShape& shape, const Mat& out);

}  // namespace qtool::runner::cpu_ops
