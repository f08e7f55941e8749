// The real forward pass of one component, written once per architecture over the op vocabulary
// (ops.hpp), as MODELS.md specifies it: LlamaForCausalLM (transformers) and
// FluxTransformer2DModel (diffusers), T5EncoderModel and CLIPTextModel (transformers). One file per
// architecture under runner/src/models/.
//
// How the schedule driver runs it: the forward's units are the component's top-level modules and
// blocks in execution order ("x_embedder", "time_text_embed", "context_embedder",
// "transformer_blocks.0", ..., "norm_out", "proj_out"; "model.embed_tokens", "model.layers.0", ...,
// "model.norm", "lm_head") — the units the planner places and groups. The driver calls begin(),
// then run_unit() for each unit in order, then output(). A unit asks its WeightSource for every
// tensor it reads, in the order the plan lists them; the driver's WeightSource answers with the
// tensor bound where it lives at that moment (the resident arena, or the device slot its group was
// streamed into, waiting for the copy), so the forward never knows where a weight lives.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "qtool/formats/checkpoint.hpp"
#include "qtool/planner/arch.hpp"
#include "qtool/runner/ops.hpp"

namespace qtool::runner {

// Resolves a component's tensors (full names, "model.layers.3.self_attn.q_proj.weight") to bound
// weights. For a quantized linear's "<module>.weight" the result carries its whole quant state.
// A tied alias ("lm_head.weight" of a tied Llama) resolves to its primary's bytes.
class WeightSource {
 public:
  virtual ~WeightSource() = default;
  virtual DequantParams get(std::string_view tensor) = 0;
  // Whether the component has the tensor (optional biases, tied heads).
  virtual bool has(std::string_view tensor) const = 0;
};

// A tensor in host memory: forward inputs and outputs (safetensors dtypes and shapes).
struct HostTensor {
  std::string name;  // the framework's argument name: "input_ids", "hidden_states", "logits"
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;  // row-major, numel * dtype_size
};

// One input of the forward: its name, the dtypes accepted, its shape for (batch, tokens).
struct InputSpec {
  std::string name;
  std::vector<DType> dtypes;   // accepted (F32 is accepted for every float input as well)
  std::vector<int64_t> shape;  // for the batch and token count asked
  bool optional = false;
};

class Forward {
 public:
  virtual ~Forward() = default;
  virtual std::string architecture() const = 0;  // "LlamaForCausalLM", "FluxTransformer2DModel"
  // Units in execution order (see above).
  virtual const std::vector<std::string>& units() const = 0;
  // `tokens` is the plan's token count: Llama's sequence length T; Flux's image tokens Ti (text
  // tokens come from the config's or the input's Tt).
  virtual std::vector<InputSpec> input_specs(int64_t batch, int64_t tokens) const = 0;
  // Inputs drawn deterministically from `seed`, as a framework user would pass them.
  virtual std::vector<HostTensor> random_inputs(int64_t batch, int64_t tokens, uint64_t seed) const = 0;
  // Error(InvalidInput) naming the input for a missing, misnamed, mis-shaped or out-of-range input
  // (token ids >= vocab) or more tokens than `max_tokens`.
  virtual void check_inputs(const std::vector<HostTensor>& inputs, int64_t max_tokens) const = 0;
  // The batch of checked inputs: dimension 0 of the batch-major ones (not of every input: Flux's
  // img_ids [Ti, 3] and txt_ids [Tt, 3] have no batch dimension).
  virtual int64_t batch_of(const std::vector<HostTensor>& inputs) const = 0;
  // Uploads the inputs and computes what depends on them alone (RoPE tables, timestep
  // embeddings' sinusoids). Allocates the state the units share (the residual stream) from `ops`.
  virtual void begin(Ops& ops, const std::vector<HostTensor>& inputs) = 0;
  virtual void run_unit(size_t unit, Ops& ops, WeightSource& weights) = 0;
  // The activations the units share, live from begin() to output(): the residual stream and what
  // a later unit reads (RoPE tables, the modulation input, a key mask, the output). Each is a
  // dense buffer from ops.alloc, or empty (data null) until a unit makes it. Consecutive units may
  // run on different GPUs (a plan over several): between them the driver copies each of these into
  // the next GPU's ops and points the forward at the copy, so a unit only ever reads its own ops'
  // memory. A unit keeps nothing else of the ops across units (no buffer, no mark).
  virtual std::vector<Mat*> shared_state() = 0;
  // The output under the framework's name ("logits", "sample", "last_hidden_state"), F32.
  virtual HostTensor output(Ops& ops) = 0;
  // The names outputs() gives, in its order (an --outputs file replayed as --inputs skips them).
  virtual std::vector<std::string> output_names() const = 0;
  // Every output under the framework's names, F32: output() first, then any others (CLIP's
  // "pooler_output"). The default is output() alone.
  virtual std::vector<HostTensor> outputs(Ops& ops) {
    std::vector<HostTensor> all;
    all.push_back(output(ops));
    return all;
  }
  // The config it was made from (the planner reserves activation memory and predicts FLOPs from
  // it: planner::activation_items, planner::forward_flops).
  virtual const planner::Arch& arch() const = 0;
};

// The forward of `component`, recognised from its config.json (`architectures` / `_class_name`);
// null when it has none yet (the component then runs its linears only). Error(InvalidInput) naming
// config.json and the key for a recognised architecture with an unusable config.
std::unique_ptr<Forward> make_forward(const Component& component);

}  // namespace qtool::runner
