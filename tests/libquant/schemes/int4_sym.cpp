// int4_sym: a scheme that lives in the test tree, registered into libquant's scheme table at static
// initialisation (its one row, at the end of this file), to show that a scheme is its own file
// and its row. Symmetric int4 per group of 32 along a row, one float32 scale per group:
//   scale[r, g] = max |w| of the group / 7          (0 for an all-zero group)
//   q           = clamp(round_half_even(w / scale), -8, 7)   (0 where scale is 0)
//   w'          = q * scale
// Layout of linear <m> with weight [rows, cols]:
//   <m>.weight              U8  [rows, ceil(cols / 2)]  two codes per byte, the even column in the
//                                                       high nibble, two's complement
//   <m>.weight_group_scale  F32 [rows, ceil(cols / 32)]
//   <m>.weight_shape        I64 [2] = [rows, cols]      (the marker: what recognises the linear)
// The loader config is qtool's own ({"quant_method": "qtool", "scheme": "int4_sym", ...}).
#include <algorithm>
#include <cmath>
#include <cstring>

#include "scheme.hpp"

namespace qtool::quant::detail {
namespace {

constexpr uint64_t kGroup = 32;
constexpr float kQMax = 7.0f;

uint64_t packed_cols(uint64_t cols) { return (cols + 1) / 2; }
uint64_t n_groups(uint64_t cols) { return ceil_div(cols, kGroup); }

std::vector<Part> int4_parts(const SchemeOptions&) { return {Part::Weight, Part::Scale, Part::QuantState}; }

std::vector<TensorDecl> int4_decls(std::string_view module, DType, uint64_t rows, uint64_t cols,
                                   const SchemeOptions&) {
  const auto r = static_cast<int64_t>(rows);
  return {{join_name(module, "weight"), DType::U8, {r, static_cast<int64_t>(packed_cols(cols))}},
          {join_name(module, "weight_group_scale"), DType::F32, {r, static_cast<int64_t>(n_groups(cols))}},
          {join_name(module, "weight_shape"), DType::I64, {2}}};
}

void quantize_rows(const WeightView& w, uint64_t r0, uint64_t r1, uint8_t* packed, uint8_t* scales) {
  const uint64_t pc = packed_cols(w.cols), ng = n_groups(w.cols);
  for (uint64_t r = r0; r < r1; ++r) {
    std::memset(packed + r * pc, 0, pc);
    for (uint64_t g = 0; g < ng; ++g) {
      const uint64_t c0 = g * kGroup, c1 = std::min(w.cols, c0 + kGroup);
      float amax = 0.0f;
      for (uint64_t c = c0; c < c1; ++c) {
        const float v = load_element(w.dtype, w.data, r * w.cols + c);
        if (!std::isfinite(v)) throw BadValueError(BadValue::NonFinite);
        amax = std::max(amax, std::fabs(v));
      }
      const float scale = amax / kQMax;
      store_f32(scales + 4 * (r * ng + g), scale);
      for (uint64_t c = c0; c < c1; ++c) {
        const float v = load_element(w.dtype, w.data, r * w.cols + c);
        const float q = scale == 0.0f ? 0.0f : std::clamp(std::nearbyint(v / scale), -8.0f, kQMax);
        const auto nib = static_cast<uint8_t>(static_cast<int>(q) & 0xF);
        packed[r * pc + c / 2] |= (c % 2 == 0) ? static_cast<uint8_t>(nib << 4) : nib;
      }
    }
  }
}

void int4_quantize(const WeightView& w, const SchemeOptions&, std::span<const std::span<uint8_t>> outs,
                   ThreadPool& pool, Impl, const RangeDone& range_done) {
  const int64_t shape[2] = {static_cast<int64_t>(w.rows), static_cast<int64_t>(w.cols)};
  std::memcpy(outs[2].data(), shape, sizeof shape);
  pool.parallel_for(w.rows, 1, [&](size_t b, size_t e) {
    quantize_rows(w, b, e, outs[0].data(), outs[1].data());
    if (range_done) range_done(b * w.cols, e * w.cols);
  });
}

void int4_dequantize(const QuantizedLinear& linear, const TensorBytes& parts, float* out, uint64_t row_begin,
                     uint64_t row_end) {
  const auto cols = static_cast<uint64_t>(linear.cols());
  const uint64_t pc = packed_cols(cols), ng = n_groups(cols);
  for (uint64_t r = row_begin; r < row_end; ++r) {
    for (uint64_t c = 0; c < cols; ++c) {
      const uint8_t byte = parts.weight[r * pc + c / 2];
      const int nib = (c % 2 == 0) ? byte >> 4 : byte & 0xF;
      const int q = nib >= 8 ? nib - 16 : nib;
      out[(r - row_begin) * cols + c] =
          static_cast<float>(q) * load_f32(parts.scale.data() + 4 * (r * ng + c / kGroup));
    }
  }
}

std::optional<QuantizedLinear> int4_recognise(const TensorFinder& f, Component::Entry e) {
  const TensorInfo& si = f.info(e);
  if (!has_suffix(si.name, "weight_shape")) return std::nullopt;
  const std::string module = module_of_tensor(si.name);
  f.expect_dtype(e, DType::I64);
  f.expect_numel(e, 2);
  int64_t shape[2];
  std::memcpy(shape, f.component().data(e).data(), sizeof shape);
  if (shape[0] <= 0 || shape[1] <= 0 || shape[0] > (int64_t{1} << 32) || shape[1] > (int64_t{1} << 32))
    fail(ErrorKind::InvalidInput, f.where(e), ": shape [", shape[0], ", ", shape[1], "] is not a weight's");
  const auto rows = static_cast<uint64_t>(shape[0]), cols = static_cast<uint64_t>(shape[1]);
  const auto w = f.require(join_name(module, "weight"), e, "the packed int4 codes");
  f.expect_dtype(w, DType::U8);
  f.expect_numel(w, rows * packed_cols(cols));
  const auto s = f.require(join_name(module, "weight_group_scale"), e, "the group scales");
  f.expect_dtype(s, DType::F32);
  f.expect_numel(s, rows * n_groups(cols));
  QuantizedLinear q;
  q.module = module;
  q.options.scheme = *parse_scheme("int4_sym");
  q.orig_dtype = DType::BF16;
  q.shape = {shape[0], shape[1]};
  q.tensor_names = {f.info(w).name, f.info(s).name, si.name};
  q.tensor_parts = {Part::Weight, Part::Scale, Part::QuantState};
  return q;
}

nlohmann::json int4_loader_config(const SchemeOptions&, DType, const std::vector<std::string>& unquantized) {
  return {{"quant_method", "qtool"}, {"scheme", "int4_sym"}, {"group_size", kGroup}, {"ignore", unquantized}};
}

}  // namespace

// The row.
[[maybe_unused]] const Scheme kInt4Sym =
    register_scheme({.info = {.name = "int4_sym",
                              .family = "int4_sym",
                              .records_orig_dtype = false,  // the original dtype is not stored
                              .dequant_gelems_per_s = 400.0},
                     .parts = int4_parts,
                     .decls = int4_decls,
                     .quantize = int4_quantize,
                     .dequantize_rows = int4_dequantize,
                     .recognise = int4_recognise,
                     .loader_config = int4_loader_config});

}  // namespace qtool::quant::detail
