// Whole-checkpoint conversion: `qtool quantize` and `qtool dequantize`.
//
// Both stream: components one after another, tensors one after another from the mapped input,
// each quantized tensor's rows split across a pool of worker threads. Every output tensor is
// declared up front (quantized sizes do not depend on the data), a weight and its quant state in
// one group so that they share a shard. Pages of the input are released once read, so peak memory
// is a few times the largest tensor, whatever the size of the checkpoint.
//
// The folder layout is kept: model_index.json, components without weights (scheduler,
// tokenizers) and every other non-weight file are copied; each quantized component's config.json
// gets the `quantization_config` its loaders expect (bitsandbytes for int8/nf4/fp4 with
// llm_int8_skip_modules; for fp8 what compressed-tensors' own writer writes for weight-only fp8:
// naive-quantized, its version, "ignore" with the unquantized Linear modules); dequantize removes
// it. fp8_e5m2 is refused for a folder (Error(InvalidInput)): compressed-tensors' config cannot say
// e5m2 and its loaders would read the codes as e4m3; a single .safetensors file takes it. Every safetensors
// file carries qtool's provenance in `__metadata__`. The output appears under its final name only when
// complete; the input is never written.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "qtool/formats/dtype.hpp"
#include "qtool/formats/progress.hpp"
#include "qtool/libquant/config.hpp"
#include "qtool/libquant/quant.hpp"

namespace qtool::quant {

struct ConvertOptions {
  size_t n_threads = 0;                              // worker threads; 0: every core
  uint64_t max_shard_size = 0;                       // bytes per output shard; 0: as the input (see below)
  bool force = false;                                // replace an existing output
  std::string tool_version;                          // recorded in __metadata__ ("qtool_version")
  ProgressFn progress;                               // bytes of input tensor data done / total
  std::function<void(std::string_view)> on_warning;  // each warning as it is found
};
// Without max_shard_size, a component stored in one file is written as one file, and a sharded
// one is written with shards no larger than its largest input shard.

// One tensor of the input and what became of it.
struct TensorReport {
  std::string component;
  std::string name;           // the input tensor's name
  std::string scheme;         // "" when copied unchanged
  DType dtype = DType::BF16;  // input dtype
  std::vector<int64_t> shape;
  uint64_t bytes_in = 0;   // input tensor bytes (quantize: the weight; dequantize: all parts)
  uint64_t bytes_out = 0;  // output bytes (quantize: the weight and all its quant state)
  // Quantized weights: the dequantized output (from the bytes written) against the input.
  bool has_error = false;
  double sum_sq_ref = 0;  // sum of w^2
  double sum_sq_err = 0;  // sum of (dequant(q) - w)^2
  double max_abs_err = 0;
  double rel_rms() const;  // sqrt(sum_sq_err / sum_sq_ref); 0 when both are 0
  double sqnr_db() const;  // 10 log10(sum_sq_ref / sum_sq_err); +inf when exact
};

struct ComponentReport {
  std::string name;
  nlohmann::json options;  // options_to_json of its scheme, or null when copied
  size_t n_quantized = 0;
  size_t n_copied = 0;
  uint64_t bytes_in = 0;  // all tensors
  uint64_t bytes_out = 0;
  size_t n_shards = 0;
  double sum_sq_ref = 0;
  double sum_sq_err = 0;
  std::string worst_tensor;  // the quantized tensor with the lowest SQNR
  double worst_sqnr_db = 0;
  std::vector<std::string> unquantized_modules;  // what loaders are told to leave alone
};

struct ConvertReport {
  std::string command;  // "quantize" or "dequantize"
  std::filesystem::path input;
  std::filesystem::path output;
  std::string tool_version;
  size_t n_threads = 0;
  double seconds = 0;
  uint64_t bytes_in = 0;      // tensor data read
  uint64_t bytes_out = 0;     // tensor data written
  uint64_t files_copied = 0;  // non-weight files copied
  nlohmann::json config;      // the quant config as applied (quantize)
  std::vector<ComponentReport> components;
  std::vector<TensorReport> tensors;  // every tensor, in input order
  std::vector<std::string> warnings;
};

// The report as JSON: totals, per component and per tensor (SQNR of an exact tensor: null).
nlohmann::json report_to_json(const ConvertReport& report);

// A human summary: one line per component (scheme, tensors converted and copied, bytes in and
// out, relative RMS error and SQNR with the worst tensor), totals, time and throughput; with
// `per_tensor`, a line per converted tensor too.
std::string summary_text(const ConvertReport& report, bool per_tensor);

// Quantizes `input` (a .safetensors file, a model folder or a pipeline folder) to `output` (a
// file for a file, a folder otherwise) as `config` says. Errors (Error): InvalidInput for config
// mistakes (naming the key), an existing output without `force` (naming it), NaN or Inf in a
// weight (naming the tensor and the element index); nothing is then left under `output`.
ConvertReport quantize_checkpoint(const std::filesystem::path& input, const QuantConfig& config,
                                  const std::filesystem::path& output, const ConvertOptions& options);

// Turns every quantized linear of `input` back into a plain `<m>.weight` of `dtype` (nullopt: the
// dtype it had before quantization, as the quant state records it; int8, which does not record
// it, takes the config's torch_dtype, else the dtype of the other float tensors, else BF16).
// Quant state and quantization_config are removed; everything else is copied.
ConvertReport dequantize_checkpoint(const std::filesystem::path& input, const std::filesystem::path& output,
                                    std::optional<DType> dtype, const ConvertOptions& options);

// The config.json `quantization_config` qtool writes for a component quantized with `options`,
// given the component's original weight dtype and the modules left unquantized (FORMATS.md).
nlohmann::json quantization_config_json(const SchemeOptions& options, DType weight_dtype,
                                        const std::vector<std::string>& unquantized_modules);

}  // namespace qtool::quant
