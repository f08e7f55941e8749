// The architectures whose real forward the runner executes (MODELS.md), as the planner needs to
// know them: their config.json read and validated once (the runner's forwards take the same
// structs), the activation memory their forward holds at its peak, itemised, and their FLOPs.
// The planner reserves and predicts from these; the runner allocates exactly this much.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <variant>
#include <vector>

#include "qtool/formats/checkpoint.hpp"
#include "qtool/formats/dtype.hpp"

namespace qtool::planner {

// LlamaForCausalLM (transformers; MODELS.md §2).
struct LlamaArch {
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;        // D
  int64_t intermediate_size = 0;  // I
  int64_t n_layers = 0;
  int64_t n_heads = 0;     // H
  int64_t n_kv_heads = 0;  // Hkv (= H when the config has none)
  int64_t head_dim = 0;    // hd (= D / H when the config has none)
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  // rope_scaling / rope_parameters of type "llama3" (absent: default RoPE).
  struct Llama3Scaling {
    double factor = 0, low_freq_factor = 0, high_freq_factor = 0;
    int64_t original_max_position_embeddings = 0;
  };
  std::optional<Llama3Scaling> llama3;
  bool tie_word_embeddings = false;
  bool attention_bias = false;
  bool mlp_bias = false;
};

// FluxPipeline's max_sequence_length: the most T5 tokens its transformer takes.
inline constexpr int64_t kFluxMaxSequenceLength = 512;

// FluxTransformer2DModel (diffusers; MODELS.md §1).
struct FluxArch {
  int64_t patch_size = 1;
  int64_t in_channels = 64;
  int64_t out_channels = 64;  // config's, or in_channels when null
  int64_t n_double = 19;      // num_layers
  int64_t n_single = 38;      // num_single_layers
  int64_t head_dim = 128;     // attention_head_dim
  int64_t n_heads = 24;       // num_attention_heads; D = n_heads * head_dim
  int64_t joint_attention_dim = 4096;
  int64_t pooled_projection_dim = 768;
  bool guidance_embeds = false;
  std::vector<int64_t> axes_dims_rope{16, 56, 56};  // sums to head_dim, each even
  int64_t text_tokens = kFluxMaxSequenceLength;     // Tt the plan assumes

  int64_t dim() const { return n_heads * head_dim; }
};

// T5EncoderModel (transformers; MODELS.md §3).
struct T5EncoderArch {
  int64_t vocab_size = 32128;
  int64_t d_model = 512;  // D
  int64_t d_kv = 64;
  int64_t n_heads = 8;  // H; inner = H * d_kv
  int64_t d_ff = 2048;
  int64_t n_layers = 6;
  int64_t num_buckets = 32;    // relative_attention_num_buckets
  int64_t max_distance = 128;  // relative_attention_max_distance
  bool gated = false;          // feed_forward_proj "gated-X"
  std::string act = "relu";    // X: "gelu_new" (for "gated-gelu"), "relu", "gelu_new", "quick_gelu", "silu"
  double eps = 1e-6;           // layer_norm_epsilon

  int64_t inner() const { return n_heads * d_kv; }
};

// CLIPTextModel (transformers; MODELS.md §4), from a text config or the text_config of a full one.
struct ClipTextArch {
  int64_t vocab_size = 49408;
  int64_t hidden_size = 512;  // D
  int64_t intermediate_size = 2048;
  int64_t n_layers = 12;
  int64_t n_heads = 8;  // hd = D / H
  int64_t max_positions = 77;
  std::string act = "quick_gelu";  // or "gelu" (exact), "gelu_new"
  double eps = 1e-5;
  int64_t eos_token_id = 49407;        // 2: the legacy argmax pooling
  std::string prefix = "text_model.";  // "" for transformers 5 files without the prefix

  int64_t head_dim() const { return hidden_size / n_heads; }
};

using Arch = std::variant<LlamaArch, FluxArch, T5EncoderArch, ClipTextArch>;

// The architecture of `component` from its config.json (`architectures[0]` for transformers,
// `_class_name` for diffusers); nullopt when it is not one the runner executes. Error(InvalidInput)
// naming config.json and the key for a recognised architecture whose config is unusable (missing
// or non-positive sizes, heads that do not divide, axes_dims_rope not summing to head_dim, ...).
std::optional<Arch> arch_of(const Component& component);
std::string arch_name(
    const Arch& arch);  // "LlamaForCausalLM", "FluxTransformer2DModel", "T5EncoderModel", ...
// The dtype the framework runs the model in (its activations): that of a tensor no quantizer
// touches (Llama's model.norm.weight, Flux's norm_out.linear.bias): BF16, F16 or F32.
// Error(InvalidInput) when the tensor is missing, Error(Unsupported) for another dtype.
DType model_dtype(const Arch& arch, const Component& component);

// The activation memory the forward holds at its peak for `batch` samples of `tokens` tokens
// (Llama: sequence length; Flux: image tokens, text tokens from FluxArch::text_tokens), in the
// activation dtype `dtype`, itemised (the residual stream, the normalised input, q/k/v, the
// attention output, the MLP intermediate, modulation vectors, RoPE tables, the output ...).
// Each item is one allocation of the backend's activation stack (Ops::alloc), counted rounded up to
// kActivationAlignment bytes as the backends align them; the items' sum is the peak.
inline constexpr uint64_t kActivationAlignment = 256;
struct ActivationItem {
  std::string name;
  uint64_t bytes = 0;
  std::string detail;  // how it was sized: "tokens 4608 x 3072 x bf16"
};
std::vector<ActivationItem> activation_items(const Arch& arch, int64_t batch, int64_t tokens, DType dtype);

// The bytes of the forward's state that cross from one GPU to the next between two of its units
// when a plan splits it (the runner's Forward::shared_state, copied as is): Flux the stream
// [B (Tt + Ti), D], the embedding and its SiLU [B, D], RoPE cos and sin [Tt + Ti, hd] F32 and the
// output [B Ti, p^2 C]; Llama the stream and RoPE cos and sin [B T, hd]; T5 the stream (F32 for an
// F16 model), the position bias [H T, T] and the key mask [B, T] I64; CLIP the stream and the key
// mask.
uint64_t handover_bytes(const Arch& arch, int64_t batch, int64_t tokens, DType dtype);

// The tokens a FluxPipeline's text encoder runs on in a job of `tokens` image tokens, as the
// runner draws its prompts (runner/src/pipeline.cpp) and as the planner sizes its activations and
// compute: CLIP at most its max_position_embeddings, T5 at most kFluxMaxSequenceLength, neither
// more than `tokens`; any other architecture `tokens`.
int64_t flux_pipeline_tokens(const Arch& component, int64_t tokens);

// FLOPs (2 per multiply-add) of one forward: every linear, and attention (4 * q_len * kv_len * H * hd
// per sample, halved for a causal mask).
struct ForwardFlops {
  uint64_t linear = 0;
  uint64_t attention = 0;
  // Bytes the memory-bound ops read and write (activation dtype): each norm, activation, RoPE
  // and residual reads its inputs and writes its output once, and a linear's bias is broadcast
  // into its output first and read back by the GEMM (the CUDA backend's linear).
  uint64_t activation_bytes = 0;
  uint64_t total() const { return linear + attention; }
};
// `dtype_bytes`: the activation dtype's size (activation_bytes).
ForwardFlops forward_flops(const Arch& arch, int64_t batch, int64_t tokens, uint64_t dtype_bytes = 2);

}  // namespace qtool::planner
