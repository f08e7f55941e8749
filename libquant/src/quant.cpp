// The public libquant API: scheme names and options, layouts, the quantize driver (splits work
// across the pool, turns kernel failures into errors naming the tensor and element), recognising
// quantized linears in a checkpoint, and dequantization.
#include "qtool/libquant/quant.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <nlohmann/json.hpp>

#include "qtool/formats/checked.hpp"
#include "qtool/formats/json.hpp"
#include "scheme.hpp"

namespace qtool::quant {

using detail::BadValue;
using detail::BadValueError;
using detail::Impl;
using detail::WeightView;

namespace {

using detail::ceil_div;
using detail::join_name;
using detail::shape_str;

// Checks a weight's dtype and shape; returns (rows, cols).
std::pair<uint64_t, uint64_t> check_weight(std::string_view what, DType dtype,
                                           std::span<const int64_t> shape) {
  if (!is_quantizable_dtype(dtype))
    fail(ErrorKind::Unsupported, what, ": dtype ", dtype_name(dtype),
         " cannot be quantized (expected BF16, F16 or F32)");
  if (shape.size() != 2)
    fail(ErrorKind::InvalidInput, what, ": shape ", shape_str(shape), " is not 2-D [out, in]");
  if (shape[0] <= 0 || shape[1] <= 0)
    fail(ErrorKind::InvalidInput, what, ": shape ", shape_str(shape), " is empty; nothing to quantize");
  return {static_cast<uint64_t>(shape[0]), static_cast<uint64_t>(shape[1])};
}

// After a kernel rejected a value: the first offending element, in row-major order.
[[noreturn]] void fail_bad_value(std::string_view label, const WeightView& w, const SchemeOptions& options) {
  const uint64_t n = w.numel();
  for (uint64_t i = 0; i < n; ++i) {
    const float v = detail::load_element(w.dtype, w.data, i);
    const uint64_t r = i / w.cols, c = i % w.cols;
    if (std::isnan(v))
      fail(ErrorKind::InvalidInput, label, ": element (", r, ", ", c, ") is NaN; ",
           scheme_name(options.scheme), " cannot quantize it");
    if (std::isinf(v))
      fail(ErrorKind::InvalidInput, label, ": element (", r, ", ", c, ") is ", v < 0 ? "-Inf" : "Inf", "; ",
           scheme_name(options.scheme), " cannot quantize it");
    if (scheme_info(options.scheme).f16_range && std::isinf(f16_to_f32(f32_to_f16(v))))
      fail(ErrorKind::InvalidInput, label, ": element (", r, ", ", c, ") = ", v,
           " exceeds the float16 range that ", scheme_name(options.scheme), " (LLM.int8) quantizes in");
  }
  fail(ErrorKind::Internal, label, ": a kernel rejected a value but none is out of range");
}

}  // namespace

// --- Names and options -----------------------------------------------------------------------------

std::optional<Scheme> parse_scheme(std::string_view name) {
  for (const Scheme scheme : all_schemes()) {
    const auto& e = detail::scheme_entry(scheme);
    if (e.info.name == name) return scheme;
    for (const std::string_view alias : e.aliases)
      if (alias == name) return scheme;
  }
  return std::nullopt;
}

std::string_view scheme_name(Scheme scheme) { return scheme_info(scheme).name; }

std::string scheme_names_list() {
  std::string list;
  for (const Scheme scheme : all_schemes()) {
    const auto& e = detail::scheme_entry(scheme);
    for (const std::string_view alias : e.aliases) list += str_cat(list.empty() ? "" : ", ", alias);
    list += str_cat(list.empty() ? "" : ", ", e.info.name);
  }
  return list;
}

bool is_4bit(Scheme scheme) { return scheme == Scheme::Nf4 || scheme == Scheme::Fp4; }
bool is_fp8(Scheme scheme) { return scheme == Scheme::Fp8E4M3 || scheme == Scheme::Fp8E5M2; }

bool scheme_has_option(Scheme scheme, std::string_view key) {
  const uint8_t keys = scheme_info(scheme).option_keys;
  if (key == "blocksize") return keys & kOptionBlocksize;
  if (key == "double_quant") return keys & kOptionDoubleQuant;
  if (key == "per_tensor" || key == "strategy") return keys & kOptionPerTensor;
  return false;
}

namespace {

// "nf4 and fp4", the families of the schemes that read option `key`.
std::string families_with(std::string_view key) {
  std::string list;
  for (const Scheme scheme : all_schemes()) {
    if (!scheme_has_option(scheme, key)) continue;
    const std::string_view family = scheme_info(scheme).family;
    if (list.find(family) == std::string::npos) list += str_cat(list.empty() ? "" : ", ", family);
  }
  return list;
}

}  // namespace

void validate_options(const SchemeOptions& options, std::string_view where) {
  const std::string at = where.empty() ? std::string() : str_cat(where, ": ");
  const Scheme scheme = options.scheme;
  if (scheme_has_option(scheme, "blocksize")) {
    const uint32_t bs = options.blocksize;
    if (bs < kMinBlocksize || bs > kMaxBlocksize || (bs & (bs - 1)) != 0)
      fail(ErrorKind::InvalidInput, at, "blocksize ", bs, " is not allowed for ", scheme_name(scheme),
           " (expected a power of two from ", kMinBlocksize, " to ", kMaxBlocksize, ")");
  }
  if (options.double_quant && !scheme_has_option(scheme, "double_quant"))
    fail(ErrorKind::InvalidInput, at, "double_quant applies to ", families_with("double_quant"),
         " only, not to ", scheme_name(scheme));
  if (options.per_tensor && !scheme_has_option(scheme, "per_tensor"))
    fail(ErrorKind::InvalidInput, at, "per_tensor applies to ", families_with("per_tensor"), " only, not to ",
         scheme_name(scheme));
}

bool is_quantizable_dtype(DType dtype) {
  return dtype == DType::BF16 || dtype == DType::F16 || dtype == DType::F32;
}

std::string_view part_name(Part part) {
  switch (part) {
    case Part::Weight: return "weight";
    case Part::Scale: return "scale";
    case Part::WeightFormat: return "weight_format";
    case Part::QuantMap: return "quant_map";
    case Part::NestedAbsmax: return "nested_absmax";
    case Part::NestedQuantMap: return "nested_quant_map";
    case Part::QuantState: return "quant_state";
  }
  return "?";
}

std::vector<Part> scheme_parts(const SchemeOptions& options) {
  return detail::scheme_entry(options.scheme).parts(options);
}

// --- Layout ----------------------------------------------------------------------------------------

std::vector<TensorDecl> quantized_decls(std::string_view module, DType dtype, std::span<const int64_t> shape,
                                        const SchemeOptions& options) {
  validate_options(options);
  const auto [rows, cols] = check_weight(str_cat("module '", module, "'"), dtype, shape);
  return detail::scheme_entry(options.scheme).decls(module, dtype, rows, cols, options);
}

uint64_t quantized_nbytes(DType dtype, std::span<const int64_t> shape, const SchemeOptions& options) {
  uint64_t total = 0;
  for (const auto& d : quantized_decls("m", dtype, shape, options)) total += d.nbytes();
  return total;
}

// --- Quantization ----------------------------------------------------------------------------------

namespace detail {

void quantize_weight_impl(std::string_view tensor_label, DType dtype, std::span<const int64_t> shape,
                          std::span<const uint8_t> data, const SchemeOptions& options,
                          std::span<const std::span<uint8_t>> outs, ThreadPool& pool, Impl impl,
                          const RangeDone& range_done) {
  validate_options(options, tensor_label);
  const auto [rows, cols] = check_weight(tensor_label, dtype, shape);
  const uint64_t expect = rows * cols * dtype_size(dtype);
  if (data.size() != expect)
    fail(ErrorKind::InvalidInput, tensor_label, ": ", data.size(), " bytes of data for shape ",
         shape_str(shape), " ", dtype_name(dtype), " (expected ", expect, ")");
  const auto decls = quantized_decls("m", dtype, shape, options);
  QTOOL_ASSERT_MSG(outs.size() == decls.size(), "quantize_weight: ", outs.size(), " output buffers for ",
                   decls.size(), " tensors");
  for (size_t i = 0; i < decls.size(); ++i)
    QTOOL_ASSERT_MSG(outs[i].size() == decls[i].nbytes(), "quantize_weight: output ", i, " has ",
                     outs[i].size(), " bytes, expected ", decls[i].nbytes());
  const WeightView w{dtype, data.data(), rows, cols};
  try {
    scheme_entry(options.scheme).quantize(w, options, outs, pool, impl, range_done);
  } catch (const BadValueError&) {
    fail_bad_value(tensor_label, w, options);
  } catch (const Error& e) {
    if (e.kind() == ErrorKind::Internal) throw;
    fail(e.kind(), tensor_label, ": ", e.what());
  }
}

}  // namespace detail

void quantize_weight_into(std::string_view tensor_label, DType dtype, std::span<const int64_t> shape,
                          std::span<const uint8_t> data, const SchemeOptions& options,
                          std::span<const std::span<uint8_t>> outs, ThreadPool& pool,
                          const RangeDone& range_done) {
  detail::quantize_weight_impl(tensor_label, dtype, shape, data, options, outs, pool, Impl::Fast, range_done);
}

std::vector<OwnedTensor> quantize_weight(std::string_view module, std::string_view tensor_label, DType dtype,
                                         std::span<const int64_t> shape, std::span<const uint8_t> data,
                                         const SchemeOptions& options, ThreadPool& pool) {
  validate_options(options, tensor_label);
  check_weight(tensor_label, dtype, shape);
  std::vector<OwnedTensor> result;
  for (auto& d : quantized_decls(module, dtype, shape, options)) {
    const uint64_t nbytes = d.nbytes();
    result.push_back({std::move(d), std::vector<uint8_t>(nbytes)});
  }
  std::vector<std::span<uint8_t>> outs;
  for (auto& t : result) outs.emplace_back(t.bytes);
  quantize_weight_into(tensor_label, dtype, shape, data, options, outs, pool);
  for (auto& t : result) {
    if (!t.decl.variable_length) continue;
    t.bytes.resize(quant_state_bytes(t.bytes).size());
    t.decl.shape = {static_cast<int64_t>(t.bytes.size())};
  }
  return result;
}

std::span<const uint8_t> quant_state_bytes(std::span<const uint8_t> part) {
  const auto end = std::find(part.begin(), part.end(), uint8_t{0});
  return part.first(static_cast<size_t>(end - part.begin()));
}

// --- Reading quantized checkpoints -------------------------------------------------------------------

uint64_t QuantizedLinear::n_blocks() const {
  return is_4bit(options.scheme) ? ceil_div(numel(), options.blocksize) : 0;
}

std::string module_of_tensor(std::string_view name) {
  // The quant-state names that contain dots come first (detail::dotted_part_names: the scheme
  // table's), with or without a module before them.
  const detail::DottedPartNames& dotted = detail::dotted_part_names();
  for (const std::string& s : dotted.suffixes)
    if (detail::has_suffix(name, s))
      return name == s ? std::string() : std::string(name.substr(0, name.size() - s.size() - 1));
  for (const std::string& stem : dotted.stems)
    if (const size_t p = name.rfind(stem); p != std::string_view::npos &&
                                           name.find('.', p + stem.size()) == std::string_view::npos &&
                                           (p == 0 || name[p - 1] == '.'))
      return std::string(name.substr(0, p == 0 ? 0 : p - 1));
  const size_t dot = name.rfind('.');
  if (dot == std::string_view::npos) return std::string();
  return std::string(name.substr(0, dot));
}

namespace detail {

std::string join_name(std::string_view module, std::string_view suffix) {
  if (module.empty()) return std::string(suffix);
  return str_cat(module, ".", suffix);
}

std::string shape_str(std::span<const int64_t> shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += str_cat(i ? ", " : "", shape[i]);
  return s + "]";
}

std::string TensorFinder::where(Component::Entry e) const {
  return str_cat(comp_.shard_of(e).path().string(), ": tensor '", comp_.info(e).name, "'");
}

std::string TensorFinder::where_missing(std::string_view name, Component::Entry near) const {
  return str_cat(comp_.shard_of(near).path().string(), ": tensor '", name, "'");
}

Component::Entry TensorFinder::require(std::string_view name, Component::Entry near,
                                       std::string_view why) const {
  const auto e = comp_.find(name);
  if (!e) fail(ErrorKind::InvalidInput, where_missing(name, near), " is missing (", why, ")");
  return *e;
}

void TensorFinder::expect_dtype(Component::Entry e, DType dt) const {
  if (comp_.info(e).dtype != dt)
    fail(ErrorKind::InvalidInput, where(e), ": dtype ", dtype_name(comp_.info(e).dtype), ", expected ",
         dtype_name(dt));
}

void TensorFinder::expect_numel(Component::Entry e, uint64_t n) const {
  if (comp_.info(e).numel() != n)
    fail(ErrorKind::InvalidInput, where(e), ": ", comp_.info(e).numel(), " elements, expected ", n);
}

}  // namespace detail

namespace {

// Each recogniser (or unclaimed-state check) of the table once, in table order.
template <typename Fn>
std::vector<Fn> distinct(Fn detail::SchemeEntry::*member) {
  std::vector<Fn> fns;
  for (const Scheme scheme : all_schemes()) {
    const Fn fn = detail::scheme_entry(scheme).*member;
    if (fn && std::find(fns.begin(), fns.end(), fn) == fns.end()) fns.push_back(fn);
  }
  return fns;
}

}  // namespace

std::vector<QuantizedLinear> find_quantized_linears(const Component& component) {
  const detail::TensorFinder f{component};
  const auto recognisers = distinct(&detail::SchemeEntry::recognise);
  std::map<std::string, QuantizedLinear> found;
  for (const auto e : component.entries()) {
    for (const auto recognise : recognisers) {
      auto q = recognise(f, e);
      if (!q) continue;
      if (found.count(q->module))
        fail(ErrorKind::InvalidInput, f.where(e), ": module '", q->module,
             "' has quant state of more than one scheme");
      std::string module = q->module;
      found.emplace(std::move(module), std::move(*q));
      break;
    }
  }
  // Orphaned state, and quantized codes without their scales (never to be read as plain weights):
  // each scheme checks the tensors of the modules no scheme claimed.
  const auto checks = distinct(&detail::SchemeEntry::check_unclaimed);
  for (const auto e : component.entries()) {
    if (found.count(module_of_tensor(component.info(e).name))) continue;
    for (const auto check : checks) check(f, e);
  }
  std::vector<QuantizedLinear> result;
  for (auto& [_, q] : found) result.push_back(std::move(q));
  return result;
}

TensorBytes tensor_bytes(const QuantizedLinear& linear, std::span<const std::span<const uint8_t>> parts) {
  QTOOL_ASSERT_MSG(parts.size() == linear.tensor_names.size(), "tensor_bytes: ", parts.size(), " spans for ",
                   linear.tensor_names.size(), " tensors of ", linear.module);
  TensorBytes b;
  for (size_t i = 0; i < parts.size(); ++i) {
    switch (linear.tensor_parts[i]) {
      case Part::Weight: b.weight = parts[i]; break;
      case Part::Scale: b.scale = parts[i]; break;
      case Part::QuantMap: b.quant_map = parts[i]; break;
      case Part::NestedAbsmax: b.nested_absmax = parts[i]; break;
      case Part::NestedQuantMap: b.nested_quant_map = parts[i]; break;
      case Part::WeightFormat:
      case Part::QuantState: break;
    }
  }
  return b;
}

TensorBytes tensor_bytes(const QuantizedLinear& linear, const Component& component) {
  std::vector<std::span<const uint8_t>> parts;
  for (const auto& name : linear.tensor_names) {
    const auto e = component.find(name);
    if (!e)
      fail(ErrorKind::InvalidInput, "component '", component.name(), "': tensor '", name, "' is missing");
    parts.push_back(component.data(*e));
  }
  return tensor_bytes(linear, parts);
}

void check_tensor_bytes(const QuantizedLinear& linear, const TensorBytes& parts) {
  const auto decls = quantized_decls(linear.module, linear.orig_dtype, linear.shape, linear.options);
  const auto roles = scheme_parts(linear.options);
  auto check = [&](Part part, std::span<const uint8_t> bytes, bool optional) {
    for (size_t i = 0; i < roles.size(); ++i) {
      if (roles[i] != part) continue;
      if (optional && bytes.empty()) return;
      if (bytes.size() != decls[i].nbytes())
        fail(ErrorKind::InvalidInput, "module '", linear.module, "': ", part_name(part), " has ",
             bytes.size(), " bytes, expected ", decls[i].nbytes());
      return;
    }
  };
  check(Part::Weight, parts.weight, false);
  check(Part::Scale, parts.scale, false);
  check(Part::QuantMap, parts.quant_map, true);
  check(Part::NestedAbsmax, parts.nested_absmax, false);
  check(Part::NestedQuantMap, parts.nested_quant_map, true);
}

// --- Dequantization --------------------------------------------------------------------------------

void decode_absmax(const QuantizedLinear& linear, const TensorBytes& parts, float* out, size_t block_begin,
                   size_t block_end) {
  QTOOL_ASSERT(is_4bit(linear.options.scheme) && block_end <= linear.n_blocks());
  if (!linear.options.double_quant) {
    std::memcpy(out, parts.scale.data() + 4 * block_begin, 4 * (block_end - block_begin));
    return;
  }
  std::array<float, 256> map = detail::dynamic_map_table();
  if (!parts.nested_quant_map.empty())
    std::memcpy(map.data(), parts.nested_quant_map.data(), sizeof(float) * 256);
  const uint64_t b2_begin = block_begin / kNestedBlocksize,
                 b2_end = (block_end + kNestedBlocksize - 1) / kNestedBlocksize;
  std::vector<float> nested(b2_end);
  std::memcpy(nested.data() + b2_begin, parts.nested_absmax.data() + 4 * b2_begin, 4 * (b2_end - b2_begin));
  detail::dynamic_dequantize(parts.scale.data(), map.data(), nested.data(), linear.nested_offset, block_begin,
                             block_end, out);
}

void dequantize_rows_f32(const QuantizedLinear& linear, const TensorBytes& parts, float* out,
                         size_t row_begin, size_t row_end) {
  QTOOL_ASSERT(row_begin <= row_end && row_end <= static_cast<size_t>(linear.rows()));
  detail::scheme_entry(linear.options.scheme).dequantize_rows(linear, parts, out, row_begin, row_end);
}

void dequantize_rows_bf16(const QuantizedLinear& linear, const TensorBytes& parts, uint16_t* out_bf16,
                          size_t row_begin, size_t row_end) {
  const auto cols = static_cast<size_t>(linear.cols());
  constexpr size_t kRowsPerStep = 16;
  std::vector<float> tmp;
  for (size_t r = row_begin; r < row_end; r += kRowsPerStep) {
    const size_t re = std::min(row_end, r + kRowsPerStep);
    tmp.resize((re - r) * cols);
    dequantize_rows_f32(linear, parts, tmp.data(), r, re);
    uint16_t* o = out_bf16 + (r - row_begin) * cols;
    for (size_t i = 0; i < tmp.size(); ++i) {
      // Round to nearest even; NaN (an fp8 NaN code) stays a quiet NaN.
      const uint32_t u = detail::f32_bits(tmp[i]);
      o[i] = std::isnan(tmp[i]) ? static_cast<uint16_t>((u >> 16) | 0x40)
                                : static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    }
  }
}

void dequantize_weight(const QuantizedLinear& linear, const TensorBytes& parts, float* out,
                       ThreadPool& pool) {
  check_tensor_bytes(linear, parts);
  const auto rows = static_cast<size_t>(linear.rows()), cols = static_cast<size_t>(linear.cols());
  const size_t min_rows = std::max<size_t>(1, (size_t{1} << 16) / std::max<size_t>(1, cols));
  pool.parallel_for(rows, min_rows,
                    [&](size_t b, size_t e) { dequantize_rows_f32(linear, parts, out + b * cols, b, e); });
}

void dequantize_weight(const QuantizedLinear& linear, const Component& component, float* out,
                       ThreadPool& pool) {
  dequantize_weight(linear, tensor_bytes(linear, component), out, pool);
}

// --- Tables ------------------------------------------------------------------------------------------

std::span<const float, 16> code_table(Scheme scheme) {
  QTOOL_ASSERT(is_4bit(scheme));
  return std::span<const float, 16>(detail::bnb4_table(scheme).code);
}

std::span<const float, 256> dynamic_map() { return std::span<const float, 256>(detail::dynamic_map_table()); }

}  // namespace qtool::quant
