// Synthetic checkpoints: real architectures' tensor names, shapes, configs and folder layout,
// filled with deterministic values that look like trained weights. The demo, the tests and the
// benchmarks run on them.
//
// A preset is first described (make_synth_model: components, their JSON/text files and their
// tensor declarations, nothing written), then written (write_synth_model). The description is
// what tests inspect for parameter counts and config/shape consistency.
//
// Presets (parameter counts at scale 1):
//   flux        FLUX.1-dev-like diffusers pipeline (FluxPipeline): transformer
//               (FluxTransformer2DModel, 19 double + 38 single blocks, 11.90B), text_encoder
//               (CLIPTextModel, CLIP-L, 123.06M), text_encoder_2 (T5EncoderModel, T5-v1.1-XXL
//               encoder, 4.762B), vae (AutoencoderKL, 16 latent channels, 83.82M), scheduler,
//               tokenizer, tokenizer_2.
//   tiny-flux   the same pipeline in about 4 MB (2 blocks per list; transformer and T5 sharded).
//   llama       Llama-3-8B-like LlamaForCausalLM (8.03B, GQA 32/8 heads, untied lm_head).
//   llama-tied  Llama-3.2-1B-like LlamaForCausalLM (1.24B, tie_word_embeddings, no lm_head).
//   tiny        a Llama-like model of a few MB that transformers loads (hidden 256, 4 layers,
//               8 heads of 32, 4 kv heads, vocab 1024).
//
// Scaling (`scale` S, 0 < S <= 1), applied to the preset's dimensions with
// scaled(n, m, lo) = max(lo, m * round(n * S / m)):
//   - head counts: heads' = scaled(heads, 1, 1); head dims are kept, so every hidden size is
//     heads' * head_dim (Llama: kv' = scaled(kv, 1, 1), heads' = kv' * heads / kv, keeping GQA);
//   - feed-forward sizes: scaled(ff, 64, 64) (Flux's MLP stays 4 * hidden by construction);
//   - vocabularies: scaled(vocab, 64, 1024); Llama keeps bos/eos at vocab - 256 / - 255;
//   - depths (block lists): scaled(n_layers, 1, 2), so every block list keeps >= 2 blocks;
//   - VAE: block_out_channels scaled(c, 32, 32) (multiples of norm_num_groups),
//     layers_per_block scaled(n, 1, 1); latent channels (16), image channels and Flux's
//     in_channels (64) are interfaces and are kept;
//   - cross-component sizes follow: Flux's joint_attention_dim = text_encoder_2 d_model,
//     pooled_projection_dim = text_encoder hidden_size; positions (CLIP's 77) are kept.
// Each config.json is built from the same scaled dimensions as the shapes.
//
// Values (synth_fill): deterministic functions of (seed, tensor name, element index), from a
// counter-based generator, so any range of any tensor can be generated alone, in any order, on
// any thread, with identical bytes whatever the thread count, sharding or component selection.
//   Weight (linear, conv, embedding; rows = shape[0], fan_in = numel / rows):
//     w[r, j] = s_r * z / sqrt(fan_in), z ~ N(0, 1), s_r = exp(0.35 * n_r), n_r ~ N(0, 1) per row;
//     outliers: about 1e-4 of the elements are replaced by +-U(10, 50) * s_r / sqrt(fan_in).
//   Norm weight: 1 + 0.05 * z.   Bias (and norm bias): 0.02 * z.
// Then rounded (RNE) to the requested dtype.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "qtool/formats/dtype.hpp"
#include "qtool/formats/progress.hpp"
#include "qtool/formats/safetensors.hpp"

namespace qtool {

// How a tensor's values are drawn; see the file comment.
enum class SynthInit : uint8_t { Weight, NormWeight, Bias };

struct SynthTensor {
  TensorDecl decl;
  SynthInit init = SynthInit::Weight;
};

struct SynthComponent {
  std::string name;          // pipeline component name ("transformer"); "" for a single model
  std::string library;       // model_index.json library: "diffusers" or "transformers"
  std::string class_name;    // "FluxTransformer2DModel", "CLIPTokenizer", ...
  std::string weights_base;  // "diffusion_pytorch_model" or "model"; "" when it has no weights
  // Files of the component folder, by file name: config.json, scheduler_config.json,
  // tokenizer files, generation_config.json. JSON files are written with indent 2.
  std::map<std::string, nlohmann::json> json_files;
  std::map<std::string, std::string> text_files;
  std::vector<SynthTensor> tensors;     // in the model's state_dict order
  uint64_t default_max_shard_size = 0;  // bytes; 0 = one file
  uint64_t published_params = 0;        // the real model's count (0: none); at scale 1 only

  uint64_t n_params() const;  // sum of numel
  uint64_t n_bytes() const;   // sum of tensor bytes
  // config.json (scheduler_config.json for a scheduler); nullptr when it has neither.
  const nlohmann::json* config() const;
};

struct SynthModel {
  std::string preset;
  double scale = 1.0;
  DType dtype = DType::BF16;
  bool is_pipeline = false;
  nlohmann::json model_index;              // pipelines: model_index.json (selected components)
  std::vector<SynthComponent> components;  // pipeline: model_index order; model: one, named ""

  const SynthComponent* find(std::string_view name) const;
  uint64_t n_params() const;
  uint64_t n_bytes() const;
};

struct SynthSpec {
  std::string preset;
  double scale = 1.0;                   // 0 < scale <= 1
  DType dtype = DType::BF16;            // BF16, F16 or F32
  std::vector<std::string> components;  // pipelines only; empty = all
};

struct SynthPresetInfo {
  std::string name;
  std::string description;
};
const std::vector<SynthPresetInfo>& synth_presets();

// Describes a preset without writing anything. Throws Error(Usage) naming the option for an
// unknown preset, a scale outside (0, 1], a dtype other than bf16/f16/f32, an unknown component,
// or components given for a preset that is a single model.
SynthModel make_synth_model(const SynthSpec& spec);

// --- Values ---

// The generator's key of one tensor: a hash of (seed, name).
uint64_t synth_tensor_key(uint64_t seed, std::string_view tensor_name);

// Writes elements [begin, end) of tensor `t` (row-major, as float32) to out[0 .. end - begin).
// Requires end <= numel. Identical results for any split of a tensor into ranges.
void synth_fill(const SynthTensor& t, uint64_t seed, uint64_t begin, uint64_t end, float* out);

// --- Writing ---

struct SynthWriteOptions {
  uint64_t seed = 0;
  std::optional<uint64_t> max_shard_size;  // bytes, for every component; nullopt = defaults
  size_t threads = 0;                      // 0 = hardware concurrency
  bool force = false;                      // replace an existing output
  ProgressFn progress;                     // bytes of tensor data written
};

struct SynthComponentResult {
  std::string name;
  std::string class_name;
  uint64_t n_params = 0;
  uint64_t published_params = 0;
  uint64_t n_bytes = 0;
  uint64_t max_shard_size = 0;  // what was used; 0 = one file
  size_t n_shards = 0;          // 0 for components without weights
};

struct SynthResult {
  std::filesystem::path output;
  std::vector<SynthComponentResult> components;
  uint64_t n_params = 0;
  uint64_t n_bytes = 0;
  double seconds = 0;
};

// The summary write_synth_model returns, computed without writing (for --dry-run).
SynthResult synth_summary(const SynthModel& model, const SynthWriteOptions& options);

// Writes the model to `out` (a folder). The output appears under its final name only when
// complete (OutputPath); an existing `out` is refused with Error(InvalidInput) unless `force`.
// Tensor data is generated in bounded chunks (a few MiB per thread) by a thread pool, so peak
// memory does not depend on the model's size.
SynthResult write_synth_model(const SynthModel& model, const std::filesystem::path& out,
                              const SynthWriteOptions& options);

}  // namespace qtool
