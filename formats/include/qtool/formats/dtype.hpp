// Element types of safetensors files and exact conversions between them and float32.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>

namespace qtool {

// Ordered as in the safetensors spec. Only these are read and written; other spec dtypes
// (F8_E8M0, F4, F6_*, C64) are recognised by name and rejected as Unsupported.
enum class DType : uint8_t {
  BOOL,
  U8,
  I8,
  F8_E5M2,
  F8_E4M3,
  I16,
  U16,
  F16,
  BF16,
  I32,
  U32,
  F32,
  F64,
  I64,
  U64
};

inline constexpr int kNumDTypes = 15;

size_t dtype_size(DType dt);            // bytes per element
std::string_view dtype_name(DType dt);  // "BF16"
bool dtype_is_float(DType dt);          // F8_*, F16, BF16, F32, F64

// Parses a safetensors dtype name. Returns nullopt for unknown names; sets *known_unsupported when
// the name is a real safetensors dtype that qtool does not handle.
std::optional<DType> parse_dtype(std::string_view name, bool* known_unsupported = nullptr);

// Parses the CLI spelling: bf16, f16/fp16, f32/fp32 (also the safetensors names).
std::optional<DType> parse_dtype_cli(std::string_view name);

// torch's name of a float dtype ("bfloat16", "float16", "float32").
std::string_view dtype_torch_name(DType dt);

// --- Scalar conversions. All float -> narrower conversions round to nearest even. ---
float bf16_to_f32(uint16_t h);
uint16_t f32_to_bf16(float f);  // RNE; NaN stays NaN (quiet)
float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);      // RNE, subnormals, overflow to inf
float fp8_e4m3_to_f32(uint8_t v);  // e4m3fn: no inf, 0x7F/0xFF NaN
float fp8_e5m2_to_f32(uint8_t v);
uint8_t f32_to_fp8_e4m3(float f);  // RNE; |f| beyond the finite range gives NaN (caller clamps first)
uint8_t f32_to_fp8_e5m2(float f);  // RNE; overflow to inf

// Converts n elements of dtype `dt` at `src` (little-endian, any alignment) to float32.
// Integers convert exactly when representable; F64 rounds to nearest.
void convert_to_f32(DType dt, const void* src, float* dst, size_t n);
// Converts n floats to dtype `dt` (float dtypes only), RNE.
void convert_from_f32(DType dt, const float* src, void* dst, size_t n);

}  // namespace qtool
