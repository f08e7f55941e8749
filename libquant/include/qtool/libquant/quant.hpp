// Quant schemes of qtool: int8 (bitsandbytes LLM.int8), fp8 e4m3/e5m2 (compressed-tensors
// weight-only naive-quantized) and nf4/fp4 (bitsandbytes 4-bit, optional double quant). Every scheme is
// bit-exact with its reference algorithm (../../../../../shared/FORMATS.md), so the tensors written
// here are read by transformers, diffusers and vLLM unchanged.
//
// Shapes: a linear weight is [out, in] (rows = out, cols = in), row-major. All byte spans are raw
// little-endian tensor data as in a safetensors file.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "qtool/formats/checkpoint.hpp"
#include "qtool/formats/dtype.hpp"
#include "qtool/formats/safetensors.hpp"
#include "qtool/formats/thread_pool.hpp"

namespace qtool::quant {

// A quant scheme: the built-in ones by name; a scheme registered at run time
// (detail::register_scheme, libquant/schemes/scheme.hpp) gets the next free value. Every fact
// about a scheme is in its row of the scheme table (scheme_info, and the functions behind it).
enum class Scheme : uint8_t { Int8, Fp8E4M3, Fp8E5M2, Nf4, Fp4 };

inline constexpr uint32_t kDefaultBlocksize = 64;  // nf4/fp4 elements per absmax block
inline constexpr uint32_t kMinBlocksize = 32;
inline constexpr uint32_t kMaxBlocksize = 4096;
inline constexpr uint32_t kNestedBlocksize = 256;  // double quant: absmax values per nested block

struct SchemeOptions {
  Scheme scheme = Scheme::Nf4;
  uint32_t blocksize = kDefaultBlocksize;  // nf4/fp4 only: power of two in [32, 4096]
  bool double_quant = false;               // nf4/fp4 only: quantize absmax to 8 bits
  bool per_tensor = false;                 // fp8 only: one scale for the whole weight
  bool operator==(const SchemeOptions&) const = default;
};

// The option keys of SchemeOptions a scheme reads (SchemeInfo::option_keys, a bit set).
inline constexpr uint8_t kOptionBlocksize = 1;    // "blocksize"
inline constexpr uint8_t kOptionDoubleQuant = 2;  // "double_quant"
inline constexpr uint8_t kOptionPerTensor = 4;    // "per_tensor" (config key "strategy" too)

// The facts of one scheme (its row of the scheme table).
struct SchemeInfo {
  Scheme scheme = Scheme::Int8;
  std::string_view name = {};    // canonical: "int8", "fp8_e4m3", "fp8_e5m2", "nf4", "fp4"
  std::string_view family = {};  // in messages on options: "nf4 and fp4", "fp8"
  uint8_t option_keys = 0;       // kOption* it reads; the others must keep their defaults
  bool rowwise = true;           // quantize's done-ranges (and error statistics' ranges) are whole rows
  bool f16_range = false;        // the weight is cast to float16 first (LLM.int8): |w| must fit
  // Whether the file records the original weight's dtype (QuantizedLinear::orig_dtype), and where.
  bool records_orig_dtype = true;
  std::string_view orig_dtype_source = {};  // "quant_state 'dtype'", "weight_scale's dtype"
  // Non-empty: a model folder's quantization_config cannot express the scheme (why, and what to
  // use instead); quantize refuses folders and warns for single files (file_warning).
  std::string_view folder_refusal = {};
  std::string_view file_warning = {};
  // The planner's dequantization rate (1e9 elements per second) when a device profile has none.
  double dequant_gelems_per_s = 0.0;
};
const SchemeInfo& scheme_info(Scheme scheme);
// Every scheme of the table, built-in first, then registered ones in order of registration.
std::vector<Scheme> all_schemes();

// A canonical name or alias ("fp8" = fp8_e4m3) of a scheme in the table; nullopt otherwise.
std::optional<Scheme> parse_scheme(std::string_view name);
// The canonical name: "int8", "fp8_e4m3", "fp8_e5m2", "nf4", "fp4".
std::string_view scheme_name(Scheme scheme);
// Every accepted spelling, for error messages ("int8, fp8, fp8_e4m3, fp8_e5m2, nf4, fp4").
std::string scheme_names_list();
// Whether `scheme` reads option `key` ("blocksize", "double_quant", "per_tensor", "strategy").
bool scheme_has_option(Scheme scheme, std::string_view key);
bool is_4bit(Scheme scheme);  // nf4, fp4
bool is_fp8(Scheme scheme);   // fp8_e4m3, fp8_e5m2

// Throws Error(InvalidInput) naming the option ("blocksize", "double_quant", "per_tensor") and,
// when given, `where` (e.g. a config key) for: a blocksize that is not a power of two in
// [32, 4096] (schemes that read it), double_quant or per_tensor on a scheme that does not read it.
void validate_options(const SchemeOptions& options, std::string_view where = {});

// The weight dtypes a scheme accepts as input: BF16, F16, F32.
bool is_quantizable_dtype(DType dtype);

// --- Layout -------------------------------------------------------------------------------------

// The role of one tensor of a quantized linear.
enum class Part : uint8_t {
  Weight,          // int8: I8 [out,in]; fp8: F8_* [out,in]; 4-bit: U8 [(n+1)/2, 1] packed codes
  Scale,           // int8: <m>.SCB F32 [out]; fp8: <m>.weight_scale (weight dtype) [out,1] or [1];
                   // 4-bit: <m>.weight.absmax F32 [n_blocks] (U8 [n_blocks] with double quant)
  WeightFormat,    // int8: <m>.weight_format U8 [] = 0
  QuantMap,        // 4-bit: <m>.weight.quant_map F32 [16] (code value per 4-bit pattern)
  NestedAbsmax,    // 4-bit double quant: <m>.weight.nested_absmax F32 [ceil(n_blocks/256)]
  NestedQuantMap,  // 4-bit double quant: <m>.weight.nested_quant_map F32 [256]
  QuantState,      // 4-bit: <m>.weight.quant_state.bitsandbytes__nf4|fp4 U8 [len] JSON bytes
};
std::string_view part_name(Part part);

// The parts a scheme writes, in the order of quantized_decls / quantize_weight.
std::vector<Part> scheme_parts(const SchemeOptions& options);

// The tensors written for linear module `module` (e.g. "transformer_blocks.0.attn.to_q") whose
// weight has `shape` [out, in] and `dtype` (BF16, F16, F32): names, dtypes and shapes per
// FORMATS.md, in the order of scheme_parts(). Sizes depend only on (shape, dtype, options), never
// on the data, except the quant_state JSON with double quant: it is bitsandbytes' own bytes, whose
// nested_offset is Python's shortest repr, so its decl is variable_length with the longest size
// (SafetensorsWriter writes it at its length; quantize_weight returns it at its length).
// Throws Error(InvalidInput) for a shape that is not 2-D or an unsupported dtype.
std::vector<TensorDecl> quantized_decls(std::string_view module, DType dtype, std::span<const int64_t> shape,
                                        const SchemeOptions& options);
// Sum of the decls' byte sizes.
uint64_t quantized_nbytes(DType dtype, std::span<const int64_t> shape, const SchemeOptions& options);

struct OwnedTensor {
  TensorDecl decl;
  std::vector<uint8_t> bytes;  // decl.nbytes() bytes
};

// Quantizes one weight given as raw little-endian bytes of `dtype` ([out, in], out*in elements).
// NaN or Inf -> Error(InvalidInput) naming `tensor_label` and the element (row, col). Rows and
// blocks are split across `pool`. Returns the tensors in the order of quantized_decls.
std::vector<OwnedTensor> quantize_weight(std::string_view module, std::string_view tensor_label, DType dtype,
                                         std::span<const int64_t> shape, std::span<const uint8_t> data,
                                         const SchemeOptions& options, ThreadPool& pool);
// Called with a range [begin, end) of the flattened weight's elements once every byte of `outs`
// that those elements depend on is final, on the thread that finished them, right after it did
// (the input is still in that core's cache): ranges are disjoint, cover the weight once, and may
// come concurrently. int8 and fp8 ranges are whole rows. With 4-bit double quant, whose block
// absmax are final only once the whole weight is done, the ranges come after that.
using RangeDone = std::function<void(uint64_t begin, uint64_t end)>;
// Same, into caller-owned buffers: `outs[i]` has exactly quantized_decls(...)[i].nbytes() bytes;
// a variable-length quant_state part gets its JSON followed by zeros (see quant_state_bytes).
void quantize_weight_into(std::string_view tensor_label, DType dtype, std::span<const int64_t> shape,
                          std::span<const uint8_t> data, const SchemeOptions& options,
                          std::span<const std::span<uint8_t>> outs, ThreadPool& pool,
                          const RangeDone& range_done = {});

// The JSON in a quant_state part filled by quantize_weight_into: the bytes before the first zero.
std::span<const uint8_t> quant_state_bytes(std::span<const uint8_t> part);

// --- Reading quantized checkpoints --------------------------------------------------------------

struct QuantizedLinear {
  std::string module;  // "transformer_blocks.0.attn.to_q"
  SchemeOptions options;
  DType orig_dtype = DType::BF16;         // dtype of the weight before quantization
  std::vector<int64_t> shape;             // [out, in] of the original weight
  std::vector<std::string> tensor_names;  // the weight and every quant-state tensor
  std::vector<Part> tensor_parts;         // parallel to tensor_names, in scheme_parts() order
  float nested_offset = 0.0f;             // 4-bit double quant: mean(absmax) from the quant_state

  int64_t rows() const { return shape.size() == 2 ? shape[0] : 0; }
  int64_t cols() const { return shape.size() == 2 ? shape[1] : 0; }
  uint64_t numel() const { return static_cast<uint64_t>(rows()) * static_cast<uint64_t>(cols()); }
  uint64_t n_blocks() const;  // 4-bit: ceil(numel / blocksize); 0 otherwise
};

// Finds every quantized linear of a component, by tensor names and dtypes and, for 4-bit, the
// quant_state JSON. Inconsistent state (a missing absmax, a wrong dtype or size, unparsable JSON,
// an int8 weight without SCB, ...) throws Error(InvalidInput) naming the file and the tensor.
// Sorted by module name.
std::vector<QuantizedLinear> find_quantized_linears(const Component& component);

// The linear module a tensor belongs to: "a.b.weight" -> "a.b", "a.b.weight.absmax" -> "a.b",
// "a.b.weight.quant_state.bitsandbytes__nf4" -> "a.b", "a.b.SCB" -> "a.b", "a.b.weight_scale" ->
// "a.b", "a.b.bias" -> "a.b"; a name without a dot -> "".
std::string module_of_tensor(std::string_view tensor_name);

// The bytes of one quantized linear's tensors by role (empty spans for parts the scheme lacks).
// quant_map / nested_quant_map may be left empty: the scheme's built-in tables are then used.
struct TensorBytes {
  std::span<const uint8_t> weight;
  std::span<const uint8_t> scale;  // SCB, weight_scale or absmax
  std::span<const uint8_t> quant_map;
  std::span<const uint8_t> nested_absmax;
  std::span<const uint8_t> nested_quant_map;
};
// From the component's mapped tensors.
TensorBytes tensor_bytes(const QuantizedLinear& linear, const Component& component);
// From raw spans given in the order of linear.tensor_names (e.g. inside a host arena).
TensorBytes tensor_bytes(const QuantizedLinear& linear, std::span<const std::span<const uint8_t>> parts);
// Checks every span's size against the layout; Error(InvalidInput) naming the module and part.
void check_tensor_bytes(const QuantizedLinear& linear, const TensorBytes& parts);

// --- Dequantization ------------------------------------------------------------------------------
// Rows [row_begin, row_end) of the [out, in] weight; `out` receives (row_end - row_begin) * in
// values, row row_begin first. Values are exactly the reference dequantization in float32
// (int8: q * SCB / 127; fp8: float(q) * float(scale); 4-bit: code[q] * absmax). The bf16 variant
// rounds those float32 values to nearest even. Safe to call concurrently on disjoint ranges.
void dequantize_rows_f32(const QuantizedLinear& linear, const TensorBytes& parts, float* out,
                         size_t row_begin, size_t row_end);
void dequantize_rows_bf16(const QuantizedLinear& linear, const TensorBytes& parts, uint16_t* out_bf16,
                          size_t row_begin, size_t row_end);
// 4-bit: the float32 absmax of blocks [block_begin, block_end) (double quant decoded:
// nested_quant_map[q] * nested_absmax[i / 256] + nested_offset). `out` has block_end - block_begin values.
void decode_absmax(const QuantizedLinear& linear, const TensorBytes& parts, float* out, size_t block_begin,
                   size_t block_end);

// The whole weight to float32 [out * in], rows split across `pool`.
void dequantize_weight(const QuantizedLinear& linear, const Component& component, float* out,
                       ThreadPool& pool);
void dequantize_weight(const QuantizedLinear& linear, const TensorBytes& parts, float* out, ThreadPool& pool);

// --- Tables --------------------------------------------------------------------------------------
// The 16 code values by 4-bit pattern (nf4: ascending; fp4: bit 3 is the sign), float32.
std::span<const float, 16> code_table(Scheme scheme);
// bitsandbytes' 8-bit signed dynamic map, used for double quant (index 0..255, ascending).
std::span<const float, 256> dynamic_map();

}  // namespace qtool::quant
