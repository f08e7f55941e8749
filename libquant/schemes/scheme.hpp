// Internal interface of the quant schemes: one file per scheme under libquant/schemes/, each with
// its constants and tables, a scalar reference (the source of truth), a fast path checked against
// it, and a dequantizer; one entry per scheme in the scheme table (scheme_table.cpp).
//
// Kernels take a range (rows for int8/fp8, flattened blocks for nf4/fp4) and never start threads;
// the driver (src/quant.cpp) splits ranges across a ThreadPool. Outputs are written at their
// positions in the full tensors, so disjoint ranges can run concurrently.
#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <nlohmann/json.hpp>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "qtool/formats/checkpoint.hpp"
#include "qtool/formats/dtype.hpp"
#include "qtool/formats/error.hpp"
#include "qtool/formats/thread_pool.hpp"
#include "qtool/libquant/quant.hpp"

namespace qtool::quant::detail {

// Reference: the scalar source of truth. Fast: the fastest path the CPU has (AVX-512, else AVX2,
// else the reference). FastAvx2: the AVX2 path even on an AVX-512 CPU, so that tests check both.
enum class Impl { Reference, Fast, FastAvx2 };

// What the CPU (and the OS, for the vector state) offers, read once (cpu_features.cpp).
struct CpuFeatures {
  bool avx2 = false;    // AVX2 and F16C
  bool fma = false;     // and FMA
  bool avx512 = false;  // and AVX-512 F, DQ, BW, VL
};
const CpuFeatures& cpu_features();
// True when the CPU has what the fast paths use (AVX2, F16C); otherwise Fast runs the reference.
bool have_simd();
// Whether a fast path `impl` uses its AVX-512 variant on this CPU.
inline bool use_avx512(Impl impl) { return impl == Impl::Fast && cpu_features().avx512; }

// A [rows, cols] weight of `dtype` (BF16, F16, F32) as raw little-endian bytes, row-major.
struct WeightView {
  DType dtype = DType::BF16;
  const uint8_t* data = nullptr;
  uint64_t rows = 0;
  uint64_t cols = 0;
  uint64_t numel() const { return rows * cols; }
};

// Thrown by kernels for a value they cannot quantize; the driver rescans serially for the first
// offending element and throws Error(InvalidInput) naming the tensor and the element.
enum class BadValue { NonFinite, F16Overflow };
struct BadValueError : std::exception {
  BadValue what_kind;
  explicit BadValueError(BadValue k) : what_kind(k) {}
  const char* what() const noexcept override { return "bad value"; }
};

// --- Scalar element helpers -----------------------------------------------------------------

inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float f32_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t load_u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}
inline void store_u16(uint8_t* p, uint16_t v) { std::memcpy(p, &v, 2); }
inline float load_f32(const uint8_t* p) {
  float v;
  std::memcpy(&v, p, 4);
  return v;
}
inline void store_f32(uint8_t* p, float v) { std::memcpy(p, &v, 4); }

// Element i of a BF16/F16/F32 buffer as float32 (exact).
inline float load_element(DType dtype, const uint8_t* data, uint64_t i) {
  switch (dtype) {
    case DType::BF16: return bf16_to_f32(load_u16(data + 2 * i));
    case DType::F16: return f16_to_f32(load_u16(data + 2 * i));
    default: return load_f32(data + 4 * i);
  }
}
// Rounds a float32 to `dtype` (BF16, F16, F32) and back: the value torch holds after `.to(dtype)`.
inline float round_to_dtype(DType dtype, float v) {
  switch (dtype) {
    case DType::BF16: return bf16_to_f32(f32_to_bf16(v));
    case DType::F16: return f16_to_f32(f32_to_f16(v));
    default: return v;
  }
}
// Stores a float32 (already representable in `dtype`) as element i of a BF16/F16/F32 buffer.
inline void store_element(DType dtype, uint8_t* data, uint64_t i, float v) {
  switch (dtype) {
    case DType::BF16: store_u16(data + 2 * i, f32_to_bf16(v)); return;
    case DType::F16: store_u16(data + 2 * i, f32_to_f16(v)); return;
    default: store_f32(data + 4 * i, v); return;
  }
}

// --- int8 (schemes/int8.cpp) ------------------------------------------------------------------
// Rows [row_begin, row_end): q is I8 [rows, cols], scb is F32 [rows] (bytes, full tensors).
void int8_quantize_rows_ref(const WeightView& w, uint64_t row_begin, uint64_t row_end, uint8_t* q,
                            uint8_t* scb);
void int8_quantize_rows_fast(const WeightView& w, uint64_t row_begin, uint64_t row_end, uint8_t* q,
                             uint8_t* scb, Impl impl = Impl::Fast);
// out[(r - row_begin) * cols + c] = (q * scb[r]) * (float)(1/127), as bitsandbytes dequantizes.
void int8_dequantize_rows(const uint8_t* q, const uint8_t* scb, uint64_t cols, uint64_t row_begin,
                          uint64_t row_end, float* out);

// --- fp8 (schemes/fp8.cpp) --------------------------------------------------------------------
struct Fp8Format {
  float max;                 // 448 (e4m3fn) or 57344 (e5m2)
  uint8_t (*encode)(float);  // RNE, finite inputs within +-max
  float (*decode)(uint8_t);
};
const Fp8Format& fp8_format(Scheme scheme);
// The scale for an absolute maximum `amax` of a weight of `dtype`: amax / max rounded to dtype,
// 0 replaced by dtype's epsilon. Returned as float32 (exactly representable in dtype).
float fp8_scale(DType dtype, float amax, float fmt_max);
// max |w| over rows [row_begin, row_end) (exact); BadValueError on NaN/Inf.
float fp8_absmax_rows(const WeightView& w, uint64_t row_begin, uint64_t row_end, Impl impl);
// Rows [row_begin, row_end): q is F8 [rows, cols]. Per channel (tensor_scale < 0): each row's
// scale is computed and written to scales (weight dtype, [rows]); per tensor: `tensor_scale` is
// used and scales is not touched.
void fp8_quantize_rows_ref(const WeightView& w, Scheme scheme, float tensor_scale, uint64_t row_begin,
                           uint64_t row_end, uint8_t* q, uint8_t* scales);
void fp8_quantize_rows_fast(const WeightView& w, Scheme scheme, float tensor_scale, uint64_t row_begin,
                            uint64_t row_end, uint8_t* q, uint8_t* scales, Impl impl = Impl::Fast);
// out = float(q) * scale (exact in float32). scale_dtype is the weight's dtype; per_tensor: one scale.
void fp8_dequantize_rows(Scheme scheme, const uint8_t* q, const uint8_t* scales, DType scale_dtype,
                         bool per_tensor, uint64_t cols, uint64_t row_begin, uint64_t row_end, float* out);

// --- nf4 / fp4 (schemes/nf4.cpp) ----------------------------------------------------------------
struct Bnb4Table {
  std::array<float, 16> code;          // value per 4-bit pattern (the quant_map)
  std::array<float, 15> thresholds;    // midpoints of the sorted values (float32)
  std::array<uint8_t, 16> pattern_of;  // sorted index -> 4-bit pattern
};
const Bnb4Table& bnb4_table(Scheme scheme);
// Flattened blocks [block_begin, block_end) of `blocksize` elements (the last may be short):
// packed is U8 [(n+1)/2] (high nibble first, odd n padded with the code of 0.0), absmax F32
// [n_blocks] (bytes, full tensors).
void bnb4_quantize_blocks_ref(const WeightView& w, Scheme scheme, uint32_t blocksize, uint64_t block_begin,
                              uint64_t block_end, uint8_t* packed, uint8_t* absmax);
void bnb4_quantize_blocks_fast(const WeightView& w, Scheme scheme, uint32_t blocksize, uint64_t block_begin,
                               uint64_t block_end, uint8_t* packed, uint8_t* absmax, Impl impl = Impl::Fast);
// Elements [begin, end) of the flattened weight: out[i - begin] = code[q_i] * absmax[i / blocksize].
// `code` is the 16-entry quant_map; `absmax` float32 of every block (decoded).
void bnb4_dequantize_range(const uint8_t* packed, const float* code, const float* absmax, uint32_t blocksize,
                           uint64_t begin, uint64_t end, float* out);

// --- double quant of absmax (schemes/double_quant.cpp) ------------------------------------------
// torch.mean of a contiguous float32 CPU tensor, reproduced bit for bit: torch's cascade sum
// (aten/src/ATen/native/cpu/SumKernel.cpp) with `lanes` float lanes per vector, split across
// `threads` OpenMP threads when n > 32768 (at::parallel_reduce's two-pass reduction), then divided
// by n. The sum kernel runs its 8-lane (AVX2) build also on AVX512 CPUs. The defaults match
// bitsandbytes run with torch's default thread count on a 2-core machine; the serial result
// (threads = 1) is what torch.set_num_threads(1) gives.
inline constexpr int kTorchMeanLanes = 8;
inline constexpr int kTorchMeanThreads = 2;
float torch_mean_f32(const float* x, uint64_t n, int lanes = kTorchMeanLanes,
                     int threads = kTorchMeanThreads);
// bitsandbytes' CPU quantize_blockwise of (x - offset) with the signed dynamic map, blocks of 256:
// per block absmax2 = max |x - offset|; q from a 65536-entry lookup table of the map's midpoints
// (index trunc(fma((clamp(v / absmax2) + 1) / 2, 65535, 0.5))); an all-zero block gives q = 0.
// Blocks [block_begin, block_end) of ceil(n / 256); q U8 [n], absmax2 F32 [n_blocks2] (bytes).
// `impl`: Reference the scalar loop; otherwise full blocks take the AVX2 + FMA path when the CPU
// has it (the same operations lane by lane, bit for bit).
void dynamic_quantize_blocks(const float* x, uint64_t n, float offset, uint64_t block_begin,
                             uint64_t block_end, uint8_t* q, uint8_t* absmax2, Impl impl = Impl::Fast);
// absmax[i] = (map[q[i]] * nested_absmax[i / 256]) + offset for i in [begin, end).
void dynamic_dequantize(const uint8_t* q, const float* map, const float* nested_absmax, float offset,
                        uint64_t begin, uint64_t end, float* out);
const std::array<float, 256>& dynamic_map_table();

// --- The scheme table (scheme_table.cpp) ----------------------------------------------------------

// The error of a quantized weight against the original (convert's statistics).
struct ErrorSums {
  double sum_sq_ref = 0;  // sum of w^2
  double sum_sq_err = 0;  // sum of (dequant - w)^2
  float max_abs_err = 0;  // max |dequant - w|
  void add(const ErrorSums& o);
};

// What a scheme's recogniser reads a component through (quant.cpp): its tensors, and errors that
// name the file and the tensor.
class TensorFinder {
 public:
  explicit TensorFinder(const Component& comp) : comp_(comp) {}
  const Component& component() const { return comp_; }
  const TensorInfo& info(Component::Entry e) const { return comp_.info(e); }
  std::string where(Component::Entry e) const;
  std::string where_missing(std::string_view name, Component::Entry near) const;
  // The tensor `name`, or Error(InvalidInput) "... is missing (why)".
  Component::Entry require(std::string_view name, Component::Entry near, std::string_view why) const;
  void expect_dtype(Component::Entry e, DType dt) const;
  void expect_numel(Component::Entry e, uint64_t n) const;

 private:
  const Component& comp_;
};

// `module`.`suffix` ("a.b" + "weight" -> "a.b.weight"; an empty module gives the suffix).
std::string join_name(std::string_view module, std::string_view suffix);
// "[2, 3]".
std::string shape_str(std::span<const int64_t> shape);
inline uint64_t ceil_div(uint64_t a, uint64_t b) { return (a + b - 1) / b; }
// `name` is `suffix` or ends with "." + `suffix`.
inline bool has_suffix(std::string_view name, std::string_view suffix) {
  return name == suffix || (name.size() > suffix.size() && name.ends_with(suffix) &&
                            name[name.size() - suffix.size() - 1] == '.');
}

// One row of the scheme table: the facts (SchemeInfo) and the functions of a scheme. Functions
// that may be null say so.
struct SchemeEntry {
  SchemeInfo info = {};
  // Other spellings parse_scheme accepts ("fp8" for fp8_e4m3).
  std::span<const std::string_view> aliases = {};
  // The parts of a quantized linear, in the order of decls.
  std::vector<Part> (*parts)(const SchemeOptions& options) = nullptr;
  // The tensors of linear `module` whose [rows, cols] weight is `dtype` (checked by the caller).
  std::vector<TensorDecl> (*decls)(std::string_view module, DType dtype, uint64_t rows, uint64_t cols,
                                   const SchemeOptions& options) = nullptr;
  // Quantizes the whole weight into outs (decls order, sizes checked by the caller).
  // `range_done` (may be empty) as quantize_weight_into promises it (quant.hpp).
  void (*quantize)(const WeightView& w, const SchemeOptions& options,
                   std::span<const std::span<uint8_t>> outs, ThreadPool& pool, Impl impl,
                   const RangeDone& range_done) = nullptr;
  // Rows [row_begin, row_end) of the dequantized weight in float32.
  void (*dequantize_rows)(const QuantizedLinear& linear, const TensorBytes& parts, float* out,
                          uint64_t row_begin, uint64_t row_end) = nullptr;
  // Recognising: called with every tensor of a component; returns the linear whose marker tensor
  // (e.g. its SCB) `e` is, nullopt for any other tensor; Error(InvalidInput) for inconsistent
  // state. Schemes sharing a recogniser (nf4 and fp4) have it called once.
  std::optional<QuantizedLinear> (*recognise)(const TensorFinder& finder, Component::Entry e) = nullptr;
  // Called with every tensor of a module no scheme claimed: throws for this scheme's codes or
  // state without their marker (an I8 weight without SCB). May be null.
  void (*check_unclaimed)(const TensorFinder& finder, Component::Entry e) = nullptr;
  // With a double-quant style quant_state: fills what recognise reads from it into `linear` from
  // freshly written parts (outs in decls order). May be null.
  void (*read_written_state)(QuantizedLinear& linear, std::span<const std::span<uint8_t>> outs) = nullptr;
  // The `quantization_config` of a model folder's config.json (FORMATS.md): the loader's own.
  nlohmann::json (*loader_config)(const SchemeOptions& options, DType weight_dtype,
                                  const std::vector<std::string>& unquantized_modules) = nullptr;
  // Error statistics over elements [begin, end) (whole rows when info.rowwise) in one pass over the
  // quantized and the original bytes. Null: through dequantize_rows (error_stats_generic).
  void (*accumulate_error)(const QuantizedLinear& linear, const TensorBytes& parts, DType dtype,
                           const uint8_t* original, uint64_t begin, uint64_t end, ErrorSums& sums,
                           Impl impl) = nullptr;
};
const SchemeEntry& scheme_entry(Scheme scheme);
// The names a quantized linear's parts take after "<module>." that hold a dot themselves, over every
// scheme of the table with each option key it reads off and on (module_of_tensor strips them whole).
// A name ending in its scheme's own name (bitsandbytes' "weight.quant_state.bitsandbytes__nf4") is
// a stem ("weight.quant_state.bitsandbytes__") that any one word without a dot completes, so that a
// quant type qtool lacks still stays with its module, where the recogniser refuses it by name.
struct DottedPartNames {
  std::vector<std::string> suffixes;  // "weight.absmax", "weight.nested_quant_map"
  std::vector<std::string> stems;     // "weight.quant_state.bitsandbytes__"
};
const DottedPartNames& dotted_part_names();
// Adds a scheme to the table (from a test or a plugin, at static initialisation or before any
// thread uses the table) and returns the value that names it; entry.info.scheme is ignored.
// Error(InvalidInput) for a name or alias the table already has, or a table that is full.
Scheme register_scheme(const SchemeEntry& entry);

// The whole-tensor drivers of each scheme (used by the table).
void int8_quantize(const WeightView& w, const SchemeOptions& options,
                   std::span<const std::span<uint8_t>> outs, ThreadPool& pool, Impl impl,
                   const RangeDone& range_done);
void fp8_quantize(const WeightView& w, const SchemeOptions& options, std::span<const std::span<uint8_t>> outs,
                  ThreadPool& pool, Impl impl, const RangeDone& range_done);
void bnb4_quantize(const WeightView& w, const SchemeOptions& options,
                   std::span<const std::span<uint8_t>> outs, ThreadPool& pool, Impl impl,
                   const RangeDone& range_done);
void int8_dequantize_linear(const QuantizedLinear& linear, const TensorBytes& parts, float* out,
                            uint64_t row_begin, uint64_t row_end);
void fp8_dequantize_linear(const QuantizedLinear& linear, const TensorBytes& parts, float* out,
                           uint64_t row_begin, uint64_t row_end);
void bnb4_dequantize_linear(const QuantizedLinear& linear, const TensorBytes& parts, float* out,
                            uint64_t row_begin, uint64_t row_end);

// Their layouts (parts, decls), recognisers and loader configs (used by the table).
std::vector<Part> int8_parts(const SchemeOptions& options);
std::vector<Part> fp8_parts(const SchemeOptions& options);
std::vector<Part> bnb4_parts(const SchemeOptions& options);
std::vector<TensorDecl> int8_decls(std::string_view module, DType dtype, uint64_t rows, uint64_t cols,
                                   const SchemeOptions& options);
std::vector<TensorDecl> fp8_decls(std::string_view module, DType dtype, uint64_t rows, uint64_t cols,
                                  const SchemeOptions& options);
std::vector<TensorDecl> bnb4_decls(std::string_view module, DType dtype, uint64_t rows, uint64_t cols,
                                   const SchemeOptions& options);
std::optional<QuantizedLinear> int8_recognise(const TensorFinder& finder, Component::Entry e);
std::optional<QuantizedLinear> fp8_recognise(const TensorFinder& finder, Component::Entry e);
std::optional<QuantizedLinear> bnb4_recognise(const TensorFinder& finder, Component::Entry e);
void int8_check_unclaimed(const TensorFinder& finder, Component::Entry e);
void fp8_check_unclaimed(const TensorFinder& finder, Component::Entry e);
void bnb4_check_unclaimed(const TensorFinder& finder, Component::Entry e);
void bnb4_read_written_state(QuantizedLinear& linear, std::span<const std::span<uint8_t>> outs);
// bitsandbytes' config (transformers' BitsAndBytesConfig.to_dict) for int8, nf4 and fp4.
nlohmann::json bnb_loader_config(const SchemeOptions& options, DType weight_dtype,
                                 const std::vector<std::string>& unquantized_modules);
// compressed-tensors' naive-quantized config for weight-only fp8.
nlohmann::json fp8_loader_config(const SchemeOptions& options, DType weight_dtype,
                                 const std::vector<std::string>& unquantized_modules);
// Error statistics (src/convert_stats.cpp: scalar, AVX2 and AVX-512 paths).
void int8_accumulate_error(const QuantizedLinear& linear, const TensorBytes& parts, DType dtype,
                           const uint8_t* original, uint64_t begin, uint64_t end, ErrorSums& sums, Impl impl);
void fp8_accumulate_error(const QuantizedLinear& linear, const TensorBytes& parts, DType dtype,
                          const uint8_t* original, uint64_t begin, uint64_t end, ErrorSums& sums, Impl impl);
void bnb4_accumulate_error(const QuantizedLinear& linear, const TensorBytes& parts, DType dtype,
                           const uint8_t* original, uint64_t begin, uint64_t end, ErrorSums& sums, Impl impl);

// The quant_state JSON of a 4-bit weight (FORMATS.md), byte for byte what bitsandbytes'
// QuantState.as_dict(packed=True) writes through json.dumps: the same keys in the same order,
// ", " and ": " separators, nested_offset (a float32 widened to double) as Python's repr.
std::string quant_state_json(DType dtype, uint64_t rows, uint64_t cols, const SchemeOptions& options,
                             float nested_offset);
// Its longest length for (dtype, shape, options): with double quant, that of the longest repr of a
// nested_offset (kMaxFloatReprChars); otherwise the exact length.
size_t quant_state_max_size(DType dtype, uint64_t rows, uint64_t cols, const SchemeOptions& options);
inline constexpr size_t kMaxFloatReprChars = 24;  // "-1.2345678901234567e-308" is 24 characters

// Python's repr of a double, which json.dumps writes for a float: the shortest digits that read
// back as `v`; fixed notation for decimal exponents -4..15 ("0.09431193023920059", "1.0", "0.0001"),
// else d[.ddd]e±XX ("1e-05", "1.5e+16"); "NaN", "Infinity", "-Infinity" as json.dumps writes them.
std::string python_float_repr(double v);

// Quantizes with an explicit implementation (tests compare Reference and Fast).
void quantize_weight_impl(std::string_view tensor_label, DType dtype, std::span<const int64_t> shape,
                          std::span<const uint8_t> data, const SchemeOptions& options,
                          std::span<const std::span<uint8_t>> outs, ThreadPool& pool, Impl impl,
                          const RangeDone& range_done = {});

// Bytes of input a kernel quantizes before it reports the range done: small enough that the
// caller's pass over the same range (convert's error statistics) finds it in the core's cache.
inline constexpr uint64_t kRangeDoneBytes = uint64_t{256} << 10;
// The fewest elements a worker thread is given at once.
inline constexpr uint64_t kMinShareElements = uint64_t{1} << 16;

// Calls fn(k) for every k in [0, n) on at most `max_threads` of the pool's threads, each thread
// taking the next k as it finishes one. Equal static shares finish at different times when a
// thread loses its core to another (convert's writer), and the others then wait; taken one at a
// time, the steps keep every core busy to the end.
template <typename Fn>
void for_each_taken(ThreadPool& pool, uint64_t n, uint64_t max_threads, const Fn& fn) {
  std::atomic<uint64_t> next{0};
  const uint64_t threads = std::clamp<uint64_t>(max_threads, 1, std::max<uint64_t>(1, n));
  pool.parallel_for(std::min<uint64_t>(pool.size(), threads), 1, [&](size_t, size_t) {
    for (uint64_t k = next.fetch_add(1); k < n; k = next.fetch_add(1)) fn(k);
  });
}

// Units of `unit_elements` elements each (rows, or 4-bit blocks) split across `pool`, at least
// kMinShareElements a thread, in steps of about kRangeDoneBytes of input taken as threads free
// up: `quantize(u, ue)` per step, then `range_done` (when set) over the step's elements, clamped
// to `n_elements`.
template <typename Fn>
void quantize_in_steps(uint64_t n_units, uint64_t unit_elements, uint64_t n_elements, DType dtype,
                       ThreadPool& pool, const RangeDone& range_done, const Fn& quantize) {
  const uint64_t unit = std::max<uint64_t>(1, unit_elements);
  const uint64_t step = std::max<uint64_t>(1, kRangeDoneBytes / (unit * dtype_size(dtype)));
  const uint64_t min_share = std::max<uint64_t>(1, kMinShareElements / unit);
  for_each_taken(pool, (n_units + step - 1) / step, n_units / min_share, [&](uint64_t k) {
    const uint64_t u = k * step, ue = std::min<uint64_t>(n_units, u + step);
    quantize(u, ue);
    if (range_done) range_done(std::min(n_elements, u * unit), std::min(n_elements, ue * unit));
  });
}

}  // namespace qtool::quant::detail
