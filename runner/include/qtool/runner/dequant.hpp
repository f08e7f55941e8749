// One linear weight as the runner sees it, in any storage the checkpoint can hold, and its
// element-wise dequantization to bf16. The same element functions run on the CPU (tests) and in
// the CUDA kernels (runner/cuda/dequant.cu), and give exactly libquant's dequantize_rows_bf16:
// the same float32 operations in the same order, each rounded once, then bf16 round-to-nearest-even.
//
//   int8         w = (float(q) * SCB[row]) * 0.007874016f   (bitsandbytes' 1/127 constant)
//   fp8 e4m3/e5m2 w = float(q) * float(scale[row])        (scale[0] when per tensor)
//   nf4 / fp4     w = code[q] * absmax[i / blocksize]
//                 absmax[b] = nested_map[qa[b]] * nested_absmax[b / 256] + nested_offset   (double quant)
//   bf16/f16/f32 (unquantized linears) w = round_bf16(float(w))
//
// Shapes: the weight is [rows = out, cols = in]; element i = row * cols + col (4-bit codes are
// packed two per byte over that flat order, first element in the high nibble).
#pragma once

#include <cstdint>
#include <string>

#include "qtool/runner/kernel_math.hpp"

namespace qtool::runner {

// How a linear weight is stored: a plain dtype, a scheme the element functions below (and the CUDA
// kernels) decode, or Host: any other scheme of libquant's table, dequantized on the CPU through its
// table entry (DequantParams::scheme); the CUDA backend refuses it. This is the kernels' tag only
// (this header is compiled without libquant): the facts of a quantized kind (its name, 4-bit or
// not) are its scheme's row of libquant's table, reached through one mapping in dequant.cpp
// (weight_kind_of, scheme_of_kind); a plain kind's are its DType's.
enum class WeightKind : uint8_t { Bf16, F16, F32, Int8, Fp8E4M3, Fp8E5M2, Nf4, Fp4, Host };

// The dtype of an fp8 weight_scale tensor.
enum class ScaleType : uint8_t { F32, Bf16, F16 };

// Pointers into one copy of a linear's tensors (host memory on the CPU, device memory in a
// kernel); every pointer is to the start of that tensor's bytes. Unused parts are null.
struct DequantParams {
  WeightKind kind = WeightKind::Bf16;
  uint64_t rows = 0;
  uint64_t cols = 0;
  uint32_t blocksize = 64;                // 4-bit: elements per absmax block
  bool double_quant = false;              // 4-bit: absmax stored as U8 codes + nested state
  bool per_tensor = false;                // fp8: one scale for the whole weight
  ScaleType scale_type = ScaleType::F32;  // fp8 only
  float nested_offset = 0.0f;             // 4-bit double quant
  // A quantized weight: its quant::Scheme and the original weight's DType (their values; this
  // header is also compiled for the kernels, without libquant).
  uint8_t scheme = 0;
  uint8_t orig_dtype = 0;
  const uint8_t* weight = nullptr;  // [rows, cols] of kind, or packed 4-bit codes
  const uint8_t* scale = nullptr;   // SCB F32 [rows] | weight_scale [rows] or [1] | absmax F32/U8 [n_blocks]
  const uint8_t* quant_map = nullptr;         // 4-bit: F32 [16]; null: the built-in table
  const uint8_t* nested_absmax = nullptr;     // 4-bit double quant: F32 [ceil(n_blocks / 256)]
  const uint8_t* nested_quant_map = nullptr;  // 4-bit double quant: F32 [256]; null: built-in

  uint64_t numel() const { return rows * cols; }
};

bool is_4bit(WeightKind kind);                  // the scheme table's is_4bit
std::string weight_kind_name(WeightKind kind);  // "bf16", "int8", "nf4", ... ("host" for Host)
// The storage's name: the scheme's for a quantized weight ("int8", a registered scheme's name).
std::string weight_name(const DequantParams& params);

// Error(InvalidInput) naming the scheme for a Host weight: no device kernel decodes it.
void require_device_kind(const DequantParams& params);

// Host weights: rows [row_begin, row_end) in float32 through libquant's dequantizer of the scheme
// (what dequantize_rows_f32 gives). Every part pointer the scheme has must be set.
void dequantize_host_rows_f32(const DequantParams& params, float* out, uint64_t row_begin, uint64_t row_end);
// The byte size of each part of a Host weight, by LinearPart slot (schedule.hpp); 0 for parts the
// scheme lacks.
void host_part_sizes(const DequantParams& params, uint64_t* sizes);

namespace dq {

inline constexpr uint32_t kNestedBlocksize = 256;
// bitsandbytes dequantizes int8 with this float32 constant (not a division by 127).
inline constexpr float kInvInt8Max = 7.874015718698502e-3f;

QTOOL_HD float load_f32(const uint8_t* p, uint64_t i) {
  uint32_t u;
#if defined(__CUDA_ARCH__)
  u = reinterpret_cast<const uint32_t*>(p)[i];
#else
  std::memcpy(&u, p + 4 * i, 4);
#endif
  return kmath::bits_float(u);
}

QTOOL_HD uint16_t load_u16(const uint8_t* p, uint64_t i) {
#if defined(__CUDA_ARCH__)
  return reinterpret_cast<const uint16_t*>(p)[i];
#else
  uint16_t u;
  std::memcpy(&u, p + 2 * i, 2);
  return u;
#endif
}

// f16 -> f32 exactly as qtool::f16_to_f32 (NaN payload kept, not quieted).
QTOOL_HD float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  const uint32_t man = h & 0x3FFu;
  if (exp == 0x1F) return kmath::bits_float(sign | 0x7F800000u | (man << 13));
  if (exp == 0) {
    // man * 2^-24, exact in float32.
    const float mag = static_cast<float>(man) * (1.0f / 16777216.0f);
    return sign ? -mag : mag;
  }
  return kmath::bits_float(sign | ((exp + 112u) << 23) | (man << 13));
}

// fp8 e4m3fn -> f32 exactly as qtool::fp8_e4m3_to_f32 (0x7F/0xFF: the quiet NaN 0x7FC00000).
QTOOL_HD float e4m3_to_f32(uint8_t v) {
  if ((v & 0x7F) == 0x7F) return kmath::bits_float(0x7FC00000u);
  const uint32_t sign = static_cast<uint32_t>(v & 0x80u) << 24;
  const uint32_t exp = (v >> 3) & 0xFu;
  const uint32_t man = v & 0x7u;
  if (exp == 0) {
    const float mag = static_cast<float>(man) * (1.0f / 512.0f);  // man * 2^-9
    return sign ? -mag : mag;
  }
  return kmath::bits_float(sign | ((exp + 120u) << 23) | (man << 20));
}

// fp8 e5m2 -> f32 exactly as qtool::fp8_e5m2_to_f32 (the f16 with the same top byte).
QTOOL_HD float e5m2_to_f32(uint8_t v) { return f16_to_f32(static_cast<uint16_t>(v) << 8); }

// nf4 and fp4 code values by 4-bit pattern (FORMATS.md), as float32 bit patterns.
inline constexpr uint32_t kNf4Bits[16] = {
    0xbf800000, 0xbf3239b1, 0xbf066b30, 0xbeca32a0, 0xbe91a24d, 0xbe3d353f, 0xbdba7871, 0x00000000,
    0x3da2faff, 0x3e24cae3, 0x3e7c04dd, 0x3ead033a, 0x3ee1a4b8, 0x3f1007ab, 0x3f3913b3, 0x3f800000};

// The scale of row `row` for int8 (SCB) and fp8 (weight_scale), as float32.
QTOOL_HD float row_scale(const DequantParams& p, uint64_t row) {
  if (p.kind == WeightKind::Int8) return load_f32(p.scale, row);
  const uint64_t i = p.per_tensor ? 0 : row;
  switch (p.scale_type) {
    case ScaleType::Bf16: return kmath::bf16_bits_to_f32(load_u16(p.scale, i));
    case ScaleType::F16: return f16_to_f32(load_u16(p.scale, i));
    case ScaleType::F32: break;
  }
  return load_f32(p.scale, i);
}

// 4-bit: the float32 absmax of block `b`; `nested_map` is the 256-entry map (file's or built-in).
QTOOL_HD float block_absmax(const DequantParams& p, uint64_t b, const float* nested_map) {
  if (!p.double_quant) return load_f32(p.scale, b);
  const float code = nested_map[p.scale[b]];
  const float nested = load_f32(p.nested_absmax, b / kNestedBlocksize);
  return kmath::x86_add(kmath::x86_mul(code, nested), p.nested_offset);
}

// int8 / fp8: the float32 value of element `col` of row `row`, given that row's scale.
QTOOL_HD float rowwise_value(WeightKind kind, uint8_t q, float scale) {
  switch (kind) {
    case WeightKind::Int8:
      return kmath::x86_mul(kmath::x86_mul(static_cast<float>(static_cast<int8_t>(q)), scale), kInvInt8Max);
    case WeightKind::Fp8E4M3: return kmath::x86_mul(e4m3_to_f32(q), scale);
    case WeightKind::Fp8E5M2: return kmath::x86_mul(e5m2_to_f32(q), scale);
    default: break;
  }
  return 0.0f;
}

// Unquantized weights: element i as float32.
QTOOL_HD float plain_value(const DequantParams& p, uint64_t i) {
  switch (p.kind) {
    case WeightKind::Bf16: return kmath::bf16_bits_to_f32(load_u16(p.weight, i));
    case WeightKind::F16: return f16_to_f32(load_u16(p.weight, i));
    case WeightKind::F32: return load_f32(p.weight, i);
    default: break;
  }
  return 0.0f;
}

// The 4-bit code of element i.
QTOOL_HD uint32_t code_of(const uint8_t* packed, uint64_t i) {
  const uint8_t byte = packed[i >> 1];
  return (i & 1) ? (byte & 0xFu) : (byte >> 4);
}

// Element i of any weight as float32 (the scalar reference path; kernels vectorise it).
// `code_table` (16) and `nested_map` (256) are the tables in use (file's or built-in).
QTOOL_HD float element_f32(const DequantParams& p, uint64_t i, const float* code_table,
                           const float* nested_map) {
  switch (p.kind) {
    case WeightKind::Bf16:
    case WeightKind::F16:
    case WeightKind::F32: return plain_value(p, i);
    case WeightKind::Int8:
    case WeightKind::Fp8E4M3:
    case WeightKind::Fp8E5M2: {
      const uint64_t row = i / p.cols;
      return rowwise_value(p.kind, p.weight[i], row_scale(p, row));
    }
    case WeightKind::Nf4:
    case WeightKind::Fp4:
      return kmath::x86_mul(code_table[code_of(p.weight, i)], block_absmax(p, i / p.blocksize, nested_map));
    case WeightKind::Host: break;  // no element function: dequantize_host_rows_f32
  }
  return 0.0f;
}

}  // namespace dq

// --- CPU -------------------------------------------------------------------------------------------

// Elements [begin, end) of the flat [rows, cols] weight to bf16 bits, on the CPU, through the same
// element functions as the kernels. `out` receives end - begin values.
void dequantize_to_bf16_cpu(const DequantParams& params, uint16_t* out, uint64_t begin, uint64_t end);

// The tables a 4-bit weight uses: its file's quant_map / nested_quant_map when present, else the
// built-in nf4/fp4 codes and bitsandbytes' dynamic map.
void resolve_tables(const DequantParams& params, float code_table[16], float nested_map[256]);

}  // namespace qtool::runner
