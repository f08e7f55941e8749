// The quant-mapping config (pipeline level), modelled on diffusers' PipelineQuantizationConfig,
// and its resolution against a checkpoint: which tensors of which component are quantized with
// which scheme, and which linear modules are left alone.
//
//     {
//       "quant_backend": "nf4",
//       "quant_kwargs": {"blocksize": 64, "double_quant": true},
//       "components_to_quantize": ["transformer", "text_encoder_2"],
//       "quant_mapping": {"text_encoder_2": {"scheme": "int8"}},
//       "modules_to_not_convert": ["proj_out", "*norm*"]
//     }
//
// - `quant_backend` + `quant_kwargs`: the default scheme and its options.
// - `components_to_quantize`: the components the default applies to (absent: every component that
//   holds weights). A single model or file is one component named "".
// - `quant_mapping`: per component `{"scheme": NAME, OPTION: VALUE..., "modules_to_not_convert":
//   [...]}`; it overrides the default for that component and adds it to the quantized set. Its
//   options are its own: the top-level `quant_kwargs` do not apply to it.
// - `modules_to_not_convert`: glob patterns on module names (see pattern_matches) applied to
//   every quantized component; a mapping entry may add its own.
// - `description`: free text, ignored.
//
// Options (`quant_kwargs` or a mapping entry): `blocksize` (nf4/fp4: a power of two in
// [32, 4096], default 64), `double_quant` (nf4/fp4, default false), `per_tensor` (fp8: one scale
// for the whole weight, default false) or `strategy` (fp8: "channel" or "tensor").
//
// Mistakes are Error(InvalidInput) whose message names the file and the key
// (`flux.json: quant_mapping.text_encoder_2.scheme: unknown scheme 'nf5' ...`); a pattern that
// matches no module of the checkpoint is a warning naming the pattern.
#pragma once

#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "qtool/formats/checkpoint.hpp"
#include "qtool/libquant/quant.hpp"

namespace qtool::quant {

struct MappingEntry {
  SchemeOptions options;
  std::vector<std::string> modules_to_not_convert;  // in addition to the top-level patterns
};

struct QuantConfig {
  std::string label;                                               // the file name, for messages
  std::optional<SchemeOptions> backend;                            // quant_backend + quant_kwargs
  std::optional<std::vector<std::string>> components_to_quantize;  // nullopt: every component
  std::map<std::string, MappingEntry> quant_mapping;
  std::vector<std::string> modules_to_not_convert;
};

// Parses and checks a config (every error names `label` and the key). Does not look at any
// checkpoint: component names and patterns are checked by plan_quantization.
QuantConfig parse_quant_config(const nlohmann::json& json, std::string_view label);
// Reads and parses a config file (Error(Io) / Error(InvalidInput) naming the path).
QuantConfig read_quant_config(const std::filesystem::path& path);
// A config that quantizes every component with one scheme: `qtool quantize --scheme nf4`.
QuantConfig config_for_scheme(const SchemeOptions& options);

// {"scheme": "nf4", "blocksize": 64, "double_quant": true} (only the options the scheme has).
nlohmann::json options_to_json(const SchemeOptions& options);
// The config back as JSON, in the file's vocabulary (recorded in reports).
nlohmann::json config_to_json(const QuantConfig& config);

// --- Which tensors are quantized -----------------------------------------------------------------

// A module-name pattern. Globs (`*` any run of characters, dots included; `?` one character;
// `[...]` a set) are matched against the whole module name, every ancestor of it (so a pattern
// naming a block covers everything inside it) and every dotted suffix of it (so `proj_out` matches
// `single_transformer_blocks.3.proj_out`, as transformers' llm_int8_skip_modules does):
// "transformer_blocks.0" matches "transformer_blocks.0.attn.to_q" but not
// "single_transformer_blocks.0.attn.to_q"; "*norm*" matches "norm_out.linear".
bool pattern_matches(std::string_view pattern, std::string_view module);

// Why a tensor is not the weight of a linear layer that can be quantized, or nullopt when it is.
// The rule, by name, dtype and shape: the name ends in ".weight"; the dtype is BF16, F16 or F32;
// the shape is 2-D (convolution kernels are 3-D/4-D, norms and biases 1-D); and the module's own
// name (its last dotted part) is not an embedding or a norm: `embed_tokens`, `embed_*`, `shared`,
// `wte`, `wpe`, `*embedding*` (token_embedding, position_embedding, word_embeddings),
// `relative_attention_bias`, `*norm*`, `ln_*`; nor the output head `lm_head`, which bitsandbytes
// loaders also keep in full precision. Linear layers whose name merely contains "embed"
// (`x_embedder`, `timestep_embedder.linear_1`) are quantized.
std::optional<std::string> linear_exclusion(std::string_view tensor_name, DType dtype,
                                            std::span<const int64_t> shape);
// Whether a module is an embedding by its own name (its last dotted part), as linear_exclusion
// says: a lookup table, not a layer that runs a matrix product.
bool is_embedding_module(std::string_view module);

// The resolved plan for one component.
struct ComponentPlan {
  std::string component;                       // "" for a single model
  std::optional<SchemeOptions> options;        // nullopt: the component is copied unchanged
  std::string source_key;                      // "quant_backend" or "quant_mapping.<name>"
  std::vector<std::string> patterns;           // modules_to_not_convert that apply to it
  std::vector<std::string> quantized_modules;  // sorted: modules whose "<m>.weight" is quantized
  // Sorted: every module with a 2-D float "<m>.weight" that stays unquantized (skipped by a
  // pattern, by the linear rule, or because its loader keeps it in full precision: T5's "wo",
  // transformers' _keep_in_fp32_modules for model_type t5/mt5/umt5), plus "lm_head" when it is
  // tied to the embeddings and absent.
  // This is what loaders get as llm_int8_skip_modules / ignore.
  std::vector<std::string> unquantized_modules;
  bool is_quantized(std::string_view module) const;
};

struct QuantPlan {
  std::vector<ComponentPlan> components;  // one per weight component, in checkpoint order
  std::vector<std::string> warnings;      // patterns matching nothing, loader conflicts, ...
  const ComponentPlan* find(std::string_view component) const;
};

// Resolves the config against the checkpoint. Error(InvalidInput) naming the key for a component
// that does not exist or holds no weights, for a component with no scheme, for a config that
// quantizes nothing, and for an input that is already quantized. Warnings: a pattern matching
// no module, a quantized component without any linear weight, and a module name that a loader's
// own skip rule (transformers: prefix or suffix; diffusers: leaf name) would confuse with a
// quantized one.
QuantPlan plan_quantization(const QuantConfig& config, const Checkpoint& checkpoint);

}  // namespace qtool::quant
