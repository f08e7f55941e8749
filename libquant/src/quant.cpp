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

constexpr std::string_view kQuantStatePrefix = "weight.quant_state.bitsandbytes__";

bool ends_with(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

std::string join_name(std::string_view module, std::string_view suffix) {
  if (module.empty()) return std::string(suffix);
  return str_cat(module, ".", suffix);
}

uint64_t ceil_div(uint64_t a, uint64_t b) { return (a + b - 1) / b; }

std::string shape_str(std::span<const int64_t> shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += str_cat(i ? ", " : "", shape[i]);
  return s + "]";
}

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

// The quant_state part's declared size: the longest its JSON can be (with double quant the length
// depends on nested_offset's repr; the part is then variable-length).
size_t quant_state_size(DType dtype, uint64_t rows, uint64_t cols, const SchemeOptions& options) {
  return detail::quant_state_max_size(dtype, rows, cols, options);
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
    if (options.scheme == Scheme::Int8 && std::isinf(f16_to_f32(f32_to_f16(v))))
      fail(ErrorKind::InvalidInput, label, ": element (", r, ", ", c, ") = ", v,
           " exceeds the float16 range that int8 (LLM.int8) quantizes in");
  }
  fail(ErrorKind::Internal, label, ": a kernel rejected a value but none is out of range");
}

}  // namespace

// --- Names and options -----------------------------------------------------------------------------

std::optional<Scheme> parse_scheme(std::string_view name) {
  if (name == "int8") return Scheme::Int8;
  if (name == "fp8" || name == "fp8_e4m3") return Scheme::Fp8E4M3;
  if (name == "fp8_e5m2") return Scheme::Fp8E5M2;
  if (name == "nf4") return Scheme::Nf4;
  if (name == "fp4") return Scheme::Fp4;
  return std::nullopt;
}

std::string_view scheme_name(Scheme scheme) { return detail::scheme_entry(scheme).name; }

std::string_view scheme_names_list() { return "int8, fp8, fp8_e4m3, fp8_e5m2, nf4, fp4"; }

bool is_4bit(Scheme scheme) { return scheme == Scheme::Nf4 || scheme == Scheme::Fp4; }
bool is_fp8(Scheme scheme) { return scheme == Scheme::Fp8E4M3 || scheme == Scheme::Fp8E5M2; }

void validate_options(const SchemeOptions& options, std::string_view where) {
  const std::string at = where.empty() ? std::string() : str_cat(where, ": ");
  if (is_4bit(options.scheme)) {
    const uint32_t bs = options.blocksize;
    if (bs < kMinBlocksize || bs > kMaxBlocksize || (bs & (bs - 1)) != 0)
      fail(ErrorKind::InvalidInput, at, "blocksize ", bs, " is not allowed for ", scheme_name(options.scheme),
           " (expected a power of two from ", kMinBlocksize, " to ", kMaxBlocksize, ")");
  } else if (options.double_quant) {
    fail(ErrorKind::InvalidInput, at, "double_quant applies to nf4 and fp4 only, not to ",
         scheme_name(options.scheme));
  }
  if (options.per_tensor && !is_fp8(options.scheme))
    fail(ErrorKind::InvalidInput, at, "per_tensor applies to fp8 only, not to ", scheme_name(options.scheme));
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
  if (options.scheme == Scheme::Int8) return {Part::Weight, Part::Scale, Part::WeightFormat};
  if (is_fp8(options.scheme)) return {Part::Weight, Part::Scale};
  if (options.double_quant)
    return {Part::Weight,       Part::Scale,          Part::QuantMap,
            Part::NestedAbsmax, Part::NestedQuantMap, Part::QuantState};
  return {Part::Weight, Part::Scale, Part::QuantMap, Part::QuantState};
}

// --- Layout ----------------------------------------------------------------------------------------

std::vector<TensorDecl> quantized_decls(std::string_view module, DType dtype, std::span<const int64_t> shape,
                                        const SchemeOptions& options) {
  validate_options(options);
  const auto [rows, cols] = check_weight(str_cat("module '", module, "'"), dtype, shape);
  const auto out = static_cast<int64_t>(rows), in = static_cast<int64_t>(cols);
  std::vector<TensorDecl> decls;
  if (options.scheme == Scheme::Int8) {
    decls.push_back({join_name(module, "weight"), DType::I8, {out, in}});
    decls.push_back({join_name(module, "SCB"), DType::F32, {out}});
    decls.push_back({join_name(module, "weight_format"), DType::U8, {}});
  } else if (is_fp8(options.scheme)) {
    const DType q = options.scheme == Scheme::Fp8E5M2 ? DType::F8_E5M2 : DType::F8_E4M3;
    decls.push_back({join_name(module, "weight"), q, {out, in}});
    if (options.per_tensor)
      decls.push_back({join_name(module, "weight_scale"), dtype, {1}});
    else
      decls.push_back({join_name(module, "weight_scale"), dtype, {out, 1}});
  } else {
    const uint64_t n = rows * cols;
    const auto n_blocks = static_cast<int64_t>(ceil_div(n, options.blocksize));
    decls.push_back({join_name(module, "weight"), DType::U8, {static_cast<int64_t>((n + 1) / 2), 1}});
    decls.push_back(
        {join_name(module, "weight.absmax"), options.double_quant ? DType::U8 : DType::F32, {n_blocks}});
    decls.push_back({join_name(module, "weight.quant_map"), DType::F32, {16}});
    if (options.double_quant) {
      decls.push_back({join_name(module, "weight.nested_absmax"),
                       DType::F32,
                       {static_cast<int64_t>(ceil_div(static_cast<uint64_t>(n_blocks), kNestedBlocksize))}});
      decls.push_back({join_name(module, "weight.nested_quant_map"), DType::F32, {256}});
    }
    decls.push_back(
        {join_name(module, str_cat("weight.quant_state.bitsandbytes__", scheme_name(options.scheme))),
         DType::U8,
         {static_cast<int64_t>(quant_state_size(dtype, rows, cols, options))},
         options.double_quant});
  }
  return decls;
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
                          std::span<const std::span<uint8_t>> outs, ThreadPool& pool, Impl impl) {
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
    scheme_entry(options.scheme).quantize(w, options, outs, pool, impl);
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
                          std::span<const std::span<uint8_t>> outs, ThreadPool& pool) {
  detail::quantize_weight_impl(tensor_label, dtype, shape, data, options, outs, pool, Impl::Fast);
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
  // Quant-state suffixes that contain dots come first, with or without a module before them.
  auto strip = [&](std::string_view suffix) -> std::optional<std::string> {
    if (name == suffix) return std::string();
    if (name.size() > suffix.size() && ends_with(name, suffix) &&
        name[name.size() - suffix.size() - 1] == '.')
      return std::string(name.substr(0, name.size() - suffix.size() - 1));
    return std::nullopt;
  };
  static constexpr std::string_view kStateSuffixes[] = {"weight.absmax", "weight.quant_map",
                                                        "weight.nested_absmax", "weight.nested_quant_map"};
  for (std::string_view s : kStateSuffixes)
    if (auto m = strip(s)) return *m;
  constexpr std::string_view kState = "weight.quant_state.bitsandbytes__";
  if (const size_t p = name.rfind(kState); p != std::string_view::npos &&
                                           name.find('.', p + kState.size()) == std::string_view::npos &&
                                           (p == 0 || name[p - 1] == '.'))
    return std::string(name.substr(0, p == 0 ? 0 : p - 1));
  const size_t dot = name.rfind('.');
  if (dot == std::string_view::npos) return std::string();
  return std::string(name.substr(0, dot));
}

namespace {

struct Finder {
  const Component& comp;

  std::string where(Component::Entry e) const {
    return str_cat(comp.shard_of(e).path().string(), ": tensor '", comp.info(e).name, "'");
  }
  std::string where_missing(std::string_view name, Component::Entry near) const {
    return str_cat(comp.shard_of(near).path().string(), ": tensor '", name, "'");
  }

  Component::Entry require(std::string_view name, Component::Entry near, std::string_view why) const {
    const auto e = comp.find(name);
    if (!e) fail(ErrorKind::InvalidInput, where_missing(name, near), " is missing (", why, ")");
    return *e;
  }

  void expect_dtype(Component::Entry e, DType dt) const {
    if (comp.info(e).dtype != dt)
      fail(ErrorKind::InvalidInput, where(e), ": dtype ", dtype_name(comp.info(e).dtype), ", expected ",
           dtype_name(dt));
  }
  void expect_numel(Component::Entry e, uint64_t n) const {
    if (comp.info(e).numel() != n)
      fail(ErrorKind::InvalidInput, where(e), ": ", comp.info(e).numel(), " elements, expected ", n);
  }

  QuantizedLinear bnb4(Component::Entry state_entry, std::string_view suffix_type) const {
    const TensorInfo& st = comp.info(state_entry);
    const std::string module = module_of_tensor(st.name);
    if (st.dtype != DType::U8)
      fail(ErrorKind::InvalidInput, where(state_entry), ": dtype ", dtype_name(st.dtype),
           ", expected U8 JSON bytes");
    const auto bytes = comp.data(state_entry);
    const nlohmann::json j =
        parse_json(std::string_view(reinterpret_cast<const char*>(bytes.data()), bytes.size()),
                   str_cat(where(state_entry), ": quant_state"));
    auto bad = [&](std::string_view key, std::string_view msg) {
      fail(ErrorKind::InvalidInput, where(state_entry), ": quant_state key '", key, "' ", msg);
    };
    if (!j.is_object()) bad("", "is not a JSON object");
    auto get = [&](std::string_view key) -> const nlohmann::json& {
      const auto it = j.find(std::string(key));
      if (it == j.end()) bad(key, "is missing");
      return *it;
    };
    QuantizedLinear q;
    q.module = module;
    const auto& quant_type = get("quant_type");
    if (!quant_type.is_string() || quant_type.get<std::string>() != suffix_type)
      bad("quant_type", str_cat("does not match the tensor name (", suffix_type, ")"));
    q.options.scheme = suffix_type == "nf4" ? Scheme::Nf4 : Scheme::Fp4;
    const auto& bs = get("blocksize");
    if (!bs.is_number_unsigned() || bs.get<uint64_t>() > kMaxBlocksize)
      bad("blocksize", "is not a power of two from 32 to 4096");
    q.options.blocksize = bs.get<uint32_t>();
    try {
      validate_options(q.options, where(state_entry));
    } catch (const Error&) {
      bad("blocksize", str_cat("= ", q.options.blocksize, " is not a power of two from 32 to 4096"));
    }
    const auto& dt = get("dtype");
    const std::string dts = dt.is_string() ? dt.get<std::string>() : "";
    if (dts == "bfloat16")
      q.orig_dtype = DType::BF16;
    else if (dts == "float16")
      q.orig_dtype = DType::F16;
    else if (dts == "float32")
      q.orig_dtype = DType::F32;
    else
      bad("dtype", str_cat("= '", dts, "' is not bfloat16, float16 or float32"));
    const auto& shape = get("shape");
    if (!shape.is_array() || shape.size() != 2 || !shape[0].is_number_unsigned() ||
        !shape[1].is_number_unsigned())
      bad("shape", "is not a 2-D shape [out, in]");
    const uint64_t rows = shape[0].get<uint64_t>(), cols = shape[1].get<uint64_t>();
    if (rows == 0 || cols == 0) bad("shape", "is empty");
    // The element count, and the bytes of its bf16 or f32 dequantized form, must have a size.
    if (rows > INT64_MAX || cols > INT64_MAX || !checked_mul(rows, cols, 4))
      bad("shape", str_cat("[", rows, ", ", cols, "] has more elements than fit in 64 bits"));
    q.shape = {static_cast<int64_t>(rows), static_cast<int64_t>(cols)};
    if (j.contains("nested_absmax") || j.contains("nested_offset") || j.contains("nested_blocksize")) {
      q.options.double_quant = true;
      const auto& nb = get("nested_blocksize");
      if (!nb.is_number_unsigned() || nb.get<uint64_t>() != kNestedBlocksize)
        bad("nested_blocksize", "is not 256");
      const auto& nd = get("nested_dtype");
      if (!nd.is_string() || nd.get<std::string>() != "float32") bad("nested_dtype", "is not \"float32\"");
      const auto& off = get("nested_offset");
      if (!off.is_number()) bad("nested_offset", "is not a number");
      q.nested_offset = static_cast<float>(off.get<double>());
      if (!std::isfinite(q.nested_offset)) bad("nested_offset", "is not finite");
    }
    const uint64_t n = q.numel();
    const uint64_t n_blocks = q.n_blocks();
    const auto w = require(join_name(module, "weight"), state_entry, "the packed 4-bit weight");
    expect_dtype(w, DType::U8);
    expect_numel(w, (n + 1) / 2);
    const auto absmax = require(join_name(module, "weight.absmax"), state_entry, "the block absmax");
    expect_dtype(absmax, q.options.double_quant ? DType::U8 : DType::F32);
    expect_numel(absmax, n_blocks);
    const auto qmap = require(join_name(module, "weight.quant_map"), state_entry, "the 4-bit code values");
    expect_dtype(qmap, DType::F32);
    expect_numel(qmap, 16);
    q.tensor_names = {comp.info(w).name, comp.info(absmax).name, comp.info(qmap).name};
    q.tensor_parts = {Part::Weight, Part::Scale, Part::QuantMap};
    if (q.options.double_quant) {
      const auto na = require(join_name(module, "weight.nested_absmax"), state_entry, "double quant");
      expect_dtype(na, DType::F32);
      expect_numel(na, ceil_div(n_blocks, kNestedBlocksize));
      const auto nm = require(join_name(module, "weight.nested_quant_map"), state_entry, "double quant");
      expect_dtype(nm, DType::F32);
      expect_numel(nm, 256);
      q.tensor_names.push_back(comp.info(na).name);
      q.tensor_names.push_back(comp.info(nm).name);
      q.tensor_parts.push_back(Part::NestedAbsmax);
      q.tensor_parts.push_back(Part::NestedQuantMap);
    } else {
      for (std::string_view s : {"weight.nested_absmax", "weight.nested_quant_map"})
        if (const auto e = comp.find(join_name(module, s)))
          fail(ErrorKind::InvalidInput, where(*e), ": present, but the quant_state has no nested_offset");
    }
    q.tensor_names.push_back(st.name);
    q.tensor_parts.push_back(Part::QuantState);
    return q;
  }

  QuantizedLinear int8(Component::Entry scb_entry) const {
    const TensorInfo& scb = comp.info(scb_entry);
    const std::string module = module_of_tensor(scb.name);
    const auto w = require(join_name(module, "weight"), scb_entry, "the int8 weight of this SCB");
    const TensorInfo& wi = comp.info(w);
    expect_dtype(w, DType::I8);
    if (wi.shape.size() != 2) fail(ErrorKind::InvalidInput, where(w), ": shape is not 2-D [out, in]");
    expect_dtype(scb_entry, DType::F32);
    expect_numel(scb_entry, static_cast<uint64_t>(wi.shape[0]));
    QuantizedLinear q;
    q.module = module;
    q.options.scheme = Scheme::Int8;
    q.orig_dtype = DType::F16;  // LLM.int8 quantizes the weight cast to float16
    q.shape = wi.shape;
    q.tensor_names = {wi.name, scb.name};
    q.tensor_parts = {Part::Weight, Part::Scale};
    if (const auto wf = comp.find(join_name(module, "weight_format"))) {
      const TensorInfo& fi = comp.info(*wf);
      if (fi.numel() != 1 || (fi.dtype != DType::U8 && fi.dtype != DType::I64 && fi.dtype != DType::I32))
        fail(ErrorKind::InvalidInput, where(*wf), ": dtype ", dtype_name(fi.dtype), " shape ",
             shape_str(fi.shape), ", expected a U8, I32 or I64 scalar");
      // The whole little-endian value, not its first byte: I32 256 is not format 0.
      const auto bytes = comp.data(*wf);
      int64_t format = 0;
      if (fi.dtype == DType::U8) {
        format = bytes[0];
      } else if (fi.dtype == DType::I32) {
        int32_t v;
        std::memcpy(&v, bytes.data(), sizeof v);
        format = v;
      } else {
        std::memcpy(&format, bytes.data(), sizeof format);
      }
      if (format != 0)
        fail(ErrorKind::Unsupported, where(*wf), ": weight format ", format,
             " is not supported (only 0, row-major)");
      q.tensor_names.push_back(fi.name);
      q.tensor_parts.push_back(Part::WeightFormat);
    }
    return q;
  }

  std::optional<QuantizedLinear> fp8(Component::Entry scale_entry) const {
    const TensorInfo& si = comp.info(scale_entry);
    const std::string module = module_of_tensor(si.name);
    const auto w = comp.find(join_name(module, "weight"));
    if (!w)
      fail(ErrorKind::InvalidInput, where_missing(join_name(module, "weight"), scale_entry),
           " is missing (the weight of this weight_scale)");
    const TensorInfo& wi = comp.info(*w);
    if (wi.dtype != DType::F8_E4M3 && wi.dtype != DType::F8_E5M2) return std::nullopt;  // not an fp8 weight
    if (wi.shape.size() != 2) fail(ErrorKind::InvalidInput, where(*w), ": shape is not 2-D [out, in]");
    if (!is_quantizable_dtype(si.dtype))
      fail(ErrorKind::InvalidInput, where(scale_entry), ": dtype ", dtype_name(si.dtype),
           ", expected BF16, F16 or F32");
    QuantizedLinear q;
    q.module = module;
    q.options.scheme = wi.dtype == DType::F8_E5M2 ? Scheme::Fp8E5M2 : Scheme::Fp8E4M3;
    q.orig_dtype = si.dtype;
    q.shape = wi.shape;
    const auto out = static_cast<uint64_t>(wi.shape[0]);
    const bool per_channel_shape = (si.shape.size() == 2 && si.shape[1] == 1) || si.shape.size() == 1;
    if (si.numel() == out && per_channel_shape && !(si.shape.size() == 1 && out == 1)) {
      q.options.per_tensor = false;
    } else if (si.numel() == 1 && si.shape.size() <= 1) {
      q.options.per_tensor = true;
    } else {
      fail(ErrorKind::Unsupported, where(scale_entry), ": shape ", shape_str(si.shape),
           " is neither per channel [", out,
           ", 1] nor per tensor [1] (group and block scales are not supported)");
    }
    q.tensor_names = {wi.name, si.name};
    q.tensor_parts = {Part::Weight, Part::Scale};
    return q;
  }
};

}  // namespace

std::vector<QuantizedLinear> find_quantized_linears(const Component& component) {
  Finder f{component};
  std::map<std::string, QuantizedLinear> found;
  auto add = [&](QuantizedLinear q, Component::Entry e) {
    if (found.count(q.module))
      fail(ErrorKind::InvalidInput, f.where(e), ": module '", q.module,
           "' has quant state of more than one scheme");
    found.emplace(q.module, std::move(q));
  };
  for (const auto e : component.entries()) {
    const std::string& name = component.info(e).name;
    if (const size_t p = name.rfind(kQuantStatePrefix);
        p != std::string::npos && (p == 0 || name[p - 1] == '.') &&
        name.find('.', p + kQuantStatePrefix.size()) == std::string::npos) {
      const std::string type = name.substr(p + kQuantStatePrefix.size());
      if (type != "nf4" && type != "fp4")
        fail(ErrorKind::Unsupported, f.where(e), ": quant type '", type, "' is not supported (nf4, fp4)");
      add(f.bnb4(e, type), e);
    } else if (ends_with(name, ".SCB") || name == "SCB") {
      add(f.int8(e), e);
    } else if (ends_with(name, ".weight_scale") || name == "weight_scale") {
      if (auto q = f.fp8(e)) add(std::move(*q), e);
    }
  }
  // Orphaned state, and quantized codes without their scales (never to be read as plain weights):
  // a 4-bit absmax without a quant_state, an I8 weight without SCB, an fp8 weight without
  // weight_scale.
  for (const auto e : component.entries()) {
    const TensorInfo& t = component.info(e);
    const std::string& name = t.name;
    if (ends_with(name, ".weight.absmax") && !found.count(module_of_tensor(name)))
      fail(ErrorKind::InvalidInput, f.where(e),
           ": 4-bit absmax without a weight.quant_state.bitsandbytes__nf4/fp4");
    if (name != "weight" && !ends_with(name, ".weight")) continue;
    const std::string module = module_of_tensor(name);
    if (found.count(module)) continue;
    if (t.dtype == DType::I8)
      fail(ErrorKind::InvalidInput, f.where(e), ": an I8 weight without '", join_name(module, "SCB"),
           "' (the row scales of bitsandbytes LLM.int8): its int8 codes cannot be read as weights");
    if (t.dtype == DType::F8_E4M3 || t.dtype == DType::F8_E5M2)
      fail(ErrorKind::InvalidInput, f.where(e), ": an ", dtype_name(t.dtype), " weight without '",
           join_name(module, "weight_scale"),
           "' (its compressed-tensors scale): its fp8 codes cannot be read as weights");
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
