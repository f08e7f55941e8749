// quantize_checkpoint (convert.hpp): each component's weights quantized as the plan says, the
// other tensors and files copied, each tensor written while the next one converts.
#include <array>
#include <mutex>
#include <optional>

#include "convert_run.hpp"
#include "convert_stats.hpp"
#include "qtool/formats/error.hpp"
#include "qtool/libquant/convert.hpp"
#include "scheme.hpp"

namespace fs = std::filesystem;

namespace qtool::quant {

nlohmann::json quantization_config_json(const SchemeOptions& options, DType weight_dtype,
                                        const std::vector<std::string>& unquantized_modules) {
  return detail::scheme_entry(options.scheme).loader_config(options, weight_dtype, unquantized_modules);
}

namespace {

using namespace detail;
using nlohmann::json;

// A scheme a loader's quantization_config cannot express (fp8_e5m2: compressed-tensors' 8-bit
// float is always float8_e4m3fn, so transformers and vLLM would load the codes as e4m3 without a
// word) is refused for a model folder before anything is written.
void refuse_inexpressible(const Checkpoint& checkpoint, const QuantPlan& plan) {
  for (const Component& component : checkpoint.components()) {
    const ComponentPlan* cp = plan.find(component.name());
    if (!cp || !cp->options || cp->quantized_modules.empty()) continue;
    const SchemeInfo& info = scheme_info(cp->options->scheme);
    if (info.folder_refusal.empty()) continue;
    fail(ErrorKind::InvalidInput, info.name, " for ", component_label(component), " of ",
         checkpoint.root().string(), ": ", info.folder_refusal);
  }
}

// The output tensors of a component: a quantized weight and its quant state form one group, every
// other tensor is a group of its own.
struct ComponentDecls {
  std::vector<std::vector<TensorDecl>> groups;  // by entry
  std::vector<bool> quantize;                   // by entry
  DType weight_dtype = DType::BF16;             // of the first quantized weight
};

ComponentDecls declare_outputs(const Component& component, const ComponentPlan& cp) {
  const auto& entries = component.entries();
  ComponentDecls d;
  d.quantize.assign(entries.size(), false);
  d.groups.reserve(entries.size());
  bool have_weight_dtype = false;
  for (size_t i = 0; i < entries.size(); ++i) {
    const TensorInfo& t = component.info(entries[i]);
    const std::string module = module_of_tensor(t.name);
    if (cp.options && t.name == module + ".weight" && cp.is_quantized(module)) {
      d.quantize[i] = true;
      d.groups.push_back(quantized_decls(module, t.dtype, t.shape, *cp.options));
      if (!have_weight_dtype) {
        d.weight_dtype = t.dtype;
        have_weight_dtype = true;
      }
    } else {
      d.groups.push_back({TensorDecl{t.name, t.dtype, t.shape}});
    }
  }
  return d;
}

std::map<std::string, std::string> provenance(const ConvertRun& run, const Component& component,
                                              const ComponentPlan& cp) {
  return {
      {"qtool_version", run.options.tool_version},
      {"qtool_command", "quantize"},
      {"qtool_scheme", cp.options ? std::string(scheme_name(cp.options->scheme)) : std::string("none")},
      {"qtool_options", cp.options ? options_to_json(*cp.options).dump() : std::string("null")},
      {"qtool_component", component.name()},
      {"qtool_source_fingerprint", run.fingerprint},
      {"qtool_unquantized_modules", json(cp.unquantized_modules).dump()},
  };
}

// A QuantizedLinear describing tensors we have just produced (for dequantizing them back).
QuantizedLinear linear_from_output(const std::string& module, const SchemeOptions& options, DType dtype,
                                   std::span<const int64_t> shape, const std::vector<TensorDecl>& decls,
                                   const std::vector<std::span<uint8_t>>& outs) {
  QuantizedLinear linear;
  linear.module = module;
  linear.options = options;
  linear.orig_dtype = dtype;
  linear.shape.assign(shape.begin(), shape.end());
  linear.tensor_parts = scheme_parts(options);
  for (const auto& d : decls) linear.tensor_names.push_back(d.name);
  if (const auto read = scheme_entry(options.scheme).read_written_state) read(linear, outs);
  return linear;
}

// Each variable-length part (the double-quant quant_state) cut to its JSON.
void cut_variable_length(const std::vector<TensorDecl>& group, std::vector<std::span<uint8_t>>& outs) {
  for (size_t k = 0; k < group.size(); ++k) {
    if (group[k].variable_length) outs[k] = outs[k].first(quant_state_bytes(outs[k]).size());
  }
}

// The error of what is written, from the written bytes: each range as soon as the kernel has
// finished it, on its thread, while its input is still in that core's cache. The written state is
// read once, at the first range (every byte a range depends on is final by then).
class WrittenError {
 public:
  WrittenError(std::string module, const SchemeOptions& options, const TensorInfo& t,
               const std::vector<TensorDecl>& group, const std::vector<std::span<uint8_t>>& outs,
               const uint8_t* original)
      : module_(std::move(module)),
        options_(options),
        t_(t),
        group_(group),
        outs_(outs),
        original_(original) {}
  WrittenError(const WrittenError&) = delete;
  WrittenError& operator=(const WrittenError&) = delete;

  RangeDone range_done() {
    return [this](uint64_t begin, uint64_t end) { add_range(begin, end); };
  }
  void store(TensorReport& tr) const {
    tr.sum_sq_ref = stats_.sum_sq_ref;
    tr.sum_sq_err = stats_.sum_sq_err;
    tr.max_abs_err = stats_.max_abs_err;
    tr.has_error = true;
  }

 private:
  void read_written_state() {
    written_ = outs_;
    cut_variable_length(group_, written_);
    parts_.assign(written_.begin(), written_.end());
    linear_ = linear_from_output(module_, options_, t_.dtype, t_.shape, group_, written_);
    tb_ = tensor_bytes(*linear_, std::span<const std::span<const uint8_t>>(parts_.data(), parts_.size()));
  }
  void add_range(uint64_t begin, uint64_t end) {
    std::call_once(once_, [this] { read_written_state(); });
    ErrorSums sums;
    accumulate_error_elements(*linear_, tb_, t_.dtype, original_, begin, end, sums);
    std::lock_guard<std::mutex> lock(mu_);
    stats_.add(sums);
  }

  std::string module_;
  const SchemeOptions& options_;
  const TensorInfo& t_;
  const std::vector<TensorDecl>& group_;
  const std::vector<std::span<uint8_t>>& outs_;
  const uint8_t* original_;
  std::once_flag once_;
  std::optional<QuantizedLinear> linear_;
  TensorBytes tb_;
  std::vector<std::span<uint8_t>> written_;
  std::vector<std::span<const uint8_t>> parts_;
  std::mutex mu_;
  ErrorSums stats_;
};

void add_tensor_error(ComponentReport& cr, const TensorReport& tr) {
  cr.sum_sq_ref += tr.sum_sq_ref;
  cr.sum_sq_err += tr.sum_sq_err;
  const double s = tr.sqnr_db();
  if (cr.worst_tensor.empty() || s < cr.worst_sqnr_db) {
    cr.worst_tensor = tr.name;
    cr.worst_sqnr_db = s;
  }
}

// Two output buffers: one being filled while the other is written. They outlive each component's
// write queue.
struct OutputBuffers {
  static constexpr size_t kCount = 2;
  std::array<Scratch, kCount> scratch;
  std::array<WriteQueue::Batch, kCount> batch{};
  size_t next = 0;
};

// One component: its tensors quantized or copied in input order.
class ComponentQuantizer {
 public:
  ComponentQuantizer(ConvertRun& run, const Component& component, const ComponentPlan& cp,
                     ComponentDecls decls, OutputBuffers& buffers)
      : run_(run),
        component_(component),
        cp_(cp),
        decls_(decls.groups),  // the groups move into the writer; the conversion keeps the names and sizes
        weight_dtype_(decls.weight_dtype),
        quantize_(std::move(decls.quantize)),
        out_(run.open_component(component, std::move(decls.groups), provenance(run, component, cp))),
        buffers_(buffers) {}

  // Converts every tensor; returns the component's report with the output's folder.
  ComponentReport convert() {
    ComponentReport cr;
    cr.name = component_.name();
    cr.options = cp_.options ? options_to_json(*cp_.options) : json(nullptr);
    cr.unquantized_modules = cp_.unquantized_modules;
    const auto& entries = component_.entries();
    for (size_t i = 0; i < entries.size(); ++i) {
      if (i + 1 < entries.size()) prefetch_pages(component_.data(entries[i + 1]));
      TensorReport tr = tensor_report(component_, component_.info(entries[i]));
      if (quantize_[i]) {
        quantize(i, tr);
        ++cr.n_quantized;
        add_tensor_error(cr, tr);
      } else {
        copy(i, tr);
        ++cr.n_copied;
      }
      cr.bytes_in += tr.bytes_in;
      cr.bytes_out += tr.bytes_out;
      run_.report.tensors.push_back(std::move(tr));
    }
    writes_.finish();
    return cr;
  }

  Sink& sink() { return out_.sink; }
  const fs::path& dir() const { return out_.dir; }
  DType weight_dtype() const { return weight_dtype_; }

 private:
  void copy(size_t i, TensorReport& tr) {
    const auto e = component_.entries()[i];
    const TensorInfo& t = component_.info(e);
    writes_.submit(copies_, [&sink = out_.sink, &progress = run_.progress, &component = component_, e,
                             &name = t.name, data = component_.data(e)] {
      copy_input_tensor(component, e, sink, name, data, [&](uint64_t n) { progress.advance(n, name); });
      release_tensor_pages(component, e);
    });
    tr.bytes_out = t.nbytes();
  }

  // The parts of `group` laid out in the next free buffer, each at a multiple of 64 bytes.
  std::vector<std::span<uint8_t>> next_outputs(const std::vector<TensorDecl>& group, size_t& buffer) {
    size_t total = 0;
    for (const auto& d : group) total += (d.nbytes() + 63) & ~size_t{63};
    buffer = buffers_.next++ % OutputBuffers::kCount;
    writes_.wait(buffers_.batch[buffer]);  // its last contents are written
    uint8_t* base = buffers_.scratch[buffer].get(std::max<size_t>(total, 1));
    std::vector<std::span<uint8_t>> outs;
    size_t off = 0;
    for (const auto& d : group) {
      outs.emplace_back(base + off, d.nbytes());
      off += (d.nbytes() + 63) & ~size_t{63};
    }
    return outs;
  }

  void quantize(size_t i, TensorReport& tr) {
    const auto e = component_.entries()[i];
    const TensorInfo& t = component_.info(e);
    const auto data = component_.data(e);
    const SchemeOptions& so = *cp_.options;
    const auto& group = decls_[i];
    size_t buffer = 0;
    std::vector<std::span<uint8_t>> outs = next_outputs(group, buffer);
    WrittenError error(module_of_tensor(t.name), so, t, group, outs, data.data());
    quantize_weight_into(tensor_label(component_, e), t.dtype, t.shape, data, so,
                         std::span<const std::span<uint8_t>>(outs.data(), outs.size()), run_.pool,
                         error.range_done());
    cut_variable_length(group, outs);
    error.store(tr);
    // A shard truncated under us reads as zeros past its end (MappedFile): stop here.
    component_.shard_of(e).check_intact();
    release_tensor_pages(component_, e);
    for (const auto& o : outs) tr.bytes_out += o.size();
    for (size_t k = 0; k < group.size(); ++k) {
      writes_.submit(buffers_.batch[buffer],
                     [&sink = out_.sink, &name = group[k].name, out = outs[k]] { sink.write(name, out); });
    }
    run_.progress.advance(t.nbytes(), t.name);
    tr.scheme = std::string(scheme_name(so.scheme));
  }

  ConvertRun& run_;
  const Component& component_;
  const ComponentPlan& cp_;
  const std::vector<std::vector<TensorDecl>> decls_;
  const DType weight_dtype_;
  const std::vector<bool> quantize_;
  ComponentOutput out_;
  OutputBuffers& buffers_;
  WriteQueue::Batch copies_;  // outlives the queue, whose thread counts it down
  WriteQueue writes_{8};      // last: its thread stops before the members it uses go
};

// config.json with the quantization_config its loaders read.
void write_quantized_config(ConvertRun& run, const Component& component, const ComponentPlan& cp,
                            const fs::path& out_dir, DType weight_dtype) {
  json cfg = *component.config();
  if (cp.options && !cp.quantized_modules.empty()) {
    if (!cfg.is_object()) {
      fail(ErrorKind::InvalidInput, (component.dir() / "config.json").string(), ": not a JSON object");
    }
    cfg["quantization_config"] = quantization_config_json(*cp.options, weight_dtype, cp.unquantized_modules);
  }
  run.write_config(component, out_dir, cfg);
}

}  // namespace

ConvertReport quantize_checkpoint(const fs::path& input, const QuantConfig& config, const fs::path& output,
                                  const ConvertOptions& options) {
  ConvertRun run("quantize", input, output, options);
  const QuantPlan plan = plan_quantization(config, run.checkpoint);
  // Checked before any conversion: a bad link fails the run at once.
  const std::vector<OtherFile> other_files = list_other_files(run.checkpoint);
  run.report.config = config_to_json(config);
  for (const auto& w : plan.warnings) run.add_warning(w);
  if (!run.is_file()) refuse_inexpressible(run.checkpoint, plan);

  OutputBuffers buffers;
  for (const Component& component : run.checkpoint.components()) {
    const ComponentPlan* cp = plan.find(component.name());
    QTOOL_ASSERT(cp != nullptr);
    ComponentQuantizer quantizer(run, component, *cp, declare_outputs(component, *cp), buffers);
    run.finish_component(quantizer.sink(), quantizer.convert());
    if (!run.is_file() && component.config())
      write_quantized_config(run, component, *cp, quantizer.dir(), quantizer.weight_dtype());
    const SchemeInfo* info = cp->options ? &scheme_info(cp->options->scheme) : nullptr;
    if (run.is_file() && info && !info->file_warning.empty() && !cp->quantized_modules.empty())
      run.add_warning(str_cat(component_label(component), ": ", info->file_warning));
  }
  return run.finish(other_files);
}

}  // namespace qtool::quant
