// dequantize_checkpoint (convert.hpp): every quantized linear back to a plain weight, the other
// tensors and files copied.
#include <algorithm>
#include <cmath>
#include <map>
#include <optional>
#include <unordered_map>

#include "convert_run.hpp"
#include "qtool/formats/error.hpp"
#include "qtool/libquant/convert.hpp"
#include "scheme.hpp"

namespace fs = std::filesystem;

namespace qtool::quant {
namespace {

using namespace detail;
using nlohmann::json;

constexpr size_t kElementsPerChunk = 65536;  // dequantized per step of a worker

// Every float tensor of a quantized linear's state (SCB, weight_scale, absmax, nested_absmax, the
// code maps) must be finite: one NaN or Inf scale would write a whole row or block of NaN/Inf
// weights. Error(InvalidInput) naming the tensor and the element.
void check_state_finite(const Component& component, const QuantizedLinear& linear) {
  constexpr size_t kChunk = 4096;
  float buf[kChunk];
  for (size_t k = 0; k < linear.tensor_names.size(); ++k) {
    const Part part = linear.tensor_parts[k];
    if (part == Part::Weight || part == Part::WeightFormat || part == Part::QuantState) continue;
    const auto e = component.find(linear.tensor_names[k]);
    QTOOL_ASSERT(e.has_value());
    const TensorInfo& t = component.info(*e);
    if (t.dtype != DType::F32 && t.dtype != DType::F16 && t.dtype != DType::BF16) continue;  // U8 codes
    const auto data = component.data(*e);
    const uint64_t n = t.numel();
    for (uint64_t i = 0; i < n; i += kChunk) {
      const size_t m = static_cast<size_t>(std::min<uint64_t>(kChunk, n - i));
      convert_to_f32(t.dtype, data.data() + i * dtype_size(t.dtype), buf, m);
      for (size_t j = 0; j < m; ++j) {
        if (std::isfinite(buf[j])) continue;
        fail(ErrorKind::InvalidInput, tensor_label(component, *e), ": element ", i + j, " is ",
             std::isnan(buf[j]) ? "NaN" : (buf[j] < 0 ? "-Inf" : "Inf"), "; the ", part_name(part), " of '",
             linear.module, "' must be finite, or its weights dequantize to NaN/Inf");
      }
    }
  }
}

std::optional<DType> dtype_from_torch_name(const json& value) {
  if (!value.is_string()) return std::nullopt;
  const std::string s = value.get<std::string>();
  if (s == "bfloat16") return DType::BF16;
  if (s == "float16" || s == "half") return DType::F16;
  if (s == "float32" || s == "float") return DType::F32;
  return std::nullopt;
}

// Where each tensor of a quantized linear belongs: the linear's index and the tensor's part.
using PartIndex = std::unordered_map<std::string, std::pair<size_t, Part>>;

PartIndex index_parts(const std::vector<QuantizedLinear>& linears) {
  PartIndex part_of;
  for (size_t li = 0; li < linears.size(); ++li) {
    for (size_t k = 0; k < linears[li].tensor_names.size(); ++k)
      part_of.emplace(linears[li].tensor_names[k], std::make_pair(li, linears[li].tensor_parts[k]));
  }
  return part_of;
}

// int8 does not record the weight's dtype: the config's torch_dtype (or dtype), else the dtype
// most elements of the other float tensors have, else BF16.
DType unrecorded_dtype(const Component& component, const PartIndex& part_of) {
  if (component.config() && component.config()->is_object()) {
    for (const char* key : {"torch_dtype", "dtype"}) {
      if (!component.config()->contains(key)) continue;
      if (const auto dt = dtype_from_torch_name((*component.config())[key])) return *dt;
    }
  }
  std::map<DType, uint64_t> counts;
  for (const auto& e : component.entries()) {
    const TensorInfo& t = component.info(e);
    if (!part_of.count(t.name) && is_quantizable_dtype(t.dtype)) counts[t.dtype] += t.numel();
  }
  DType fallback = DType::BF16;
  uint64_t best = 0;
  for (const auto& [dt, n] : counts) {
    if (n > best) {
      best = n;
      fallback = dt;
    }
  }
  return fallback;
}

// Rows of `l` dequantized, converted to `odt` and written, split across `pool`.
void dequantize_linear(Sink& sink, const QuantizedLinear& l, const TensorBytes& tb, DType odt,
                       ThreadPool& pool) {
  const size_t rows = static_cast<size_t>(l.rows()), cols = static_cast<size_t>(l.cols());
  const size_t osize = dtype_size(odt);
  const std::string name = l.module + ".weight";
  const size_t rows_per_chunk = std::max<size_t>(1, kElementsPerChunk / std::max<size_t>(cols, 1));
  pool.parallel_for(rows, rows_per_chunk, [&](size_t r0, size_t r1) {
    std::vector<float> f(rows_per_chunk * cols);
    std::vector<uint8_t> o(rows_per_chunk * cols * osize);
    for (size_t r = r0; r < r1; r += rows_per_chunk) {
      const size_t re = std::min(r1, r + rows_per_chunk);
      const size_t n = (re - r) * cols;
      dequantize_rows_f32(l, tb, f.data(), r, re);
      convert_from_f32(odt, f.data(), o.data(), n);
      sink.write(name, std::span<const uint8_t>(o.data(), n * osize), r * cols * osize);
    }
  });
}

// One component: its quantized linears found and checked, every tensor dequantized or copied.
class ComponentDequantizer {
 public:
  ComponentDequantizer(ConvertRun& run, const Component& component, std::optional<DType> dtype)
      : run_(run),
        component_(component),
        dtype_(dtype),
        linears_(find_quantized_linears(component)),
        part_of_(index_parts(linears_)),
        unrecorded_dtype_(unrecorded_dtype(component, part_of_)) {
    for (const QuantizedLinear& l : linears_) check_state_finite(component, l);
  }

  size_t n_linears() const { return linears_.size(); }

  // The output tensors: each linear's weight in place of its first tensor, the others as they are.
  std::vector<std::vector<TensorDecl>> declare_outputs() const {
    std::vector<std::vector<TensorDecl>> groups;
    for (const auto& e : component_.entries()) {
      const TensorInfo& t = component_.info(e);
      const auto it = part_of_.find(t.name);
      if (it == part_of_.end()) {
        groups.push_back({TensorDecl{t.name, t.dtype, t.shape}});
      } else if (it->second.second == Part::Weight) {
        const QuantizedLinear& l = linears_[it->second.first];
        groups.push_back({TensorDecl{l.module + ".weight", out_dtype_of(l), l.shape}});
      }
    }
    return groups;
  }

  ComponentReport convert(Sink& sink) {
    ComponentReport cr;
    cr.name = component_.name();
    cr.options = linears_.empty() ? json(nullptr) : options_to_json(linears_.front().options);
    for (const auto& e : component_.entries()) {
      const TensorInfo& t = component_.info(e);
      const auto it = part_of_.find(t.name);
      if (it != part_of_.end() && it->second.second != Part::Weight) continue;  // read with its weight
      TensorReport tr =
          it == part_of_.end() ? copy(sink, e) : dequantize(sink, t, linears_[it->second.first]);
      if (tr.scheme.empty())
        ++cr.n_copied;
      else
        ++cr.n_quantized;
      cr.bytes_in += tr.bytes_in;
      cr.bytes_out += tr.bytes_out;
      run_.report.tensors.push_back(std::move(tr));
    }
    return cr;
  }

 private:
  DType out_dtype_of(const QuantizedLinear& l) const {
    if (dtype_) return *dtype_;
    if (!scheme_info(l.options.scheme).records_orig_dtype) return unrecorded_dtype_;
    return l.orig_dtype;
  }

  TensorReport copy(Sink& sink, const Component::Entry& e) {
    const TensorInfo& t = component_.info(e);
    TensorReport tr = tensor_report(component_, t);
    tr.bytes_out = t.nbytes();
    copy_input_tensor(component_, e, sink, t.name, component_.data(e),
                      [&](uint64_t n) { run_.progress.advance(n, t.name); });
    release_tensor_pages(component_, e);
    return tr;
  }

  TensorReport dequantize(Sink& sink, const TensorInfo& t, const QuantizedLinear& l) {
    const TensorBytes tb = tensor_bytes(l, component_);
    check_tensor_bytes(l, tb);
    const DType odt = out_dtype_of(l);
    dequantize_linear(sink, l, tb, odt, run_.pool);
    TensorReport tr = tensor_report(component_, t);
    tr.scheme = std::string(scheme_name(l.options.scheme));
    tr.bytes_in = 0;
    for (const auto& tn : l.tensor_names) {
      const auto pe = component_.find(tn);
      QTOOL_ASSERT(pe.has_value());
      tr.bytes_in += component_.info(*pe).nbytes();
      release_tensor_pages(component_, *pe);
    }
    tr.bytes_out = l.numel() * dtype_size(odt);
    run_.progress.advance(tr.bytes_in, l.module + ".weight");
    return tr;
  }

  ConvertRun& run_;
  const Component& component_;
  const std::optional<DType> dtype_;
  const std::vector<QuantizedLinear> linears_;
  const PartIndex part_of_;
  const DType unrecorded_dtype_;
};

}  // namespace

ConvertReport dequantize_checkpoint(const fs::path& input, const fs::path& output, std::optional<DType> dtype,
                                    const ConvertOptions& options) {
  if (dtype && !is_quantizable_dtype(*dtype)) {
    fail(ErrorKind::Usage, "--dtype: ", dtype_name(*dtype), " is not bf16, f16 or f32");
  }
  ConvertRun run("dequantize", input, output, options);
  const std::vector<OtherFile> other_files = list_other_files(run.checkpoint);
  size_t n_linears_total = 0;
  for (const Component& component : run.checkpoint.components()) {
    ComponentDequantizer dequantizer(run, component, dtype);
    n_linears_total += dequantizer.n_linears();
    const std::map<std::string, std::string> provenance = {
        {"qtool_version", options.tool_version},
        {"qtool_command", "dequantize"},
        {"qtool_scheme", "none"},
        {"qtool_component", component.name()},
        {"qtool_source_fingerprint", run.fingerprint},
    };
    ComponentOutput out = run.open_component(component, dequantizer.declare_outputs(), provenance);
    run.finish_component(out.sink, dequantizer.convert(out.sink));
    if (!run.is_file() && component.config()) {
      json cfg = *component.config();
      if (cfg.is_object()) cfg.erase("quantization_config");
      run.write_config(component, out.dir, cfg);
    }
  }
  if (n_linears_total == 0) {
    run.add_warning(
        str_cat(input.string(), ": no quantized weights found; the tensors are copied unchanged"));
  }
  return run.finish(other_files);
}

}  // namespace qtool::quant
