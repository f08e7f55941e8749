// A diffusers FluxPipeline folder run as the pipeline runs it (diffusers' pipeline_flux.py,
// FluxPipeline(..., output_type="latent")): the phases in order with the real data flow.
//
//   phase 1  text_encoder (CLIPTextModel): input_ids -> pooler_output      = pooled_projections
//   phase 2  text_encoder_2 (T5EncoderModel): input_ids -> last_hidden_state = encoder_hidden_states
//   phase 3  transformer (FluxTransformer2DModel) x N denoising steps of the flow-matching Euler
//            scheduler (FlowMatchEulerDiscreteScheduler, scheduler/scheduler_config.json):
//              hidden_states = latents, timestep = ⟦⟦t_i⟧/1000⟧ (t_i = σ_i·1000 in float32, cast
//              to the latents' dtype, then divided in it, as the pipeline does), img_ids = (0, row,
//              col) over the packed latent grid, txt_ids = zeros, guidance = guidance_scale (3.5,
//              FluxPipeline's default) when the transformer has guidance_embeds;
//              latents = ⟦fp32(latents) + ⟦⟦σ_{i+1} − σ_i⟧·sample⟧⟧ (the scheduler's step as torch
//              computes it on the CPU: the float32 dt times the model-dtype noise prediction is a
//              model-dtype product with dt rounded to the model dtype first; the sum in float32,
//              cast back to the model dtype). (On CUDA torch keeps dt in float32 inside the product.)
//   phase 4  vae: its linears only (the convolutions are not executed).
//
// The inputs, under the names a diffusers user knows (an --inputs file, or drawn from the seed):
//   text_encoder.input_ids    [B, T1] int  (the CLIP tokenizer's ids)
//   text_encoder_2.input_ids  [B, T2] int  (the T5 tokenizer's ids)
//   latents                   [B, Ti, in_channels]  FluxPipeline's `latents=` argument: packed,
//                             bf16/f16/f32 (rounded once to the transformer's dtype)
// The latent grid is (h/2) x (w/2) = Ti with the sides the factor pair of Ti closest to square
// (rows <= cols), i.e. FluxPipeline's height = 16·rows, width = 16·cols for the usual VAE.
// Drawn from the seed: the encoders' Forward::random_inputs at planner::flux_pipeline_tokens() (CLIP
// at most 77, T5 at most 512 tokens, as the plan sizes them), latents
// N(0, 1) rounded to the model dtype. The final latents are the output `images` (what
// FluxPipeline(..., output_type="latent").images holds: the packed latents, F32 values).
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "qtool/formats/checkpoint.hpp"
#include "qtool/runner/forward.hpp"

namespace qtool::runner {

// The denoising steps verify runs when neither --denoise-steps nor the plan says (FLUX.1-dev's
// num_inference_steps): the one place this default lives.
inline constexpr uint32_t kDefaultDenoiseSteps = 28;
inline constexpr float kFluxGuidanceScale = 3.5f;  // FluxPipeline.__call__'s guidance_scale
inline constexpr uint32_t kMaxDenoiseSteps = 1000;

// The pipeline-level input and output names (see above).
inline constexpr const char* kLatentsInput = "latents";
inline constexpr const char* kImagesOutput = "images";

// scheduler/scheduler_config.json of a FlowMatchEulerDiscreteScheduler, the fields the Flux
// pipeline uses. Options the runner does not implement (karras / exponential / beta sigmas,
// shift_terminal, invert_sigmas, stochastic_sampling, use_flow_sigmas) are refused.
struct FlowMatchConfig {
  int64_t num_train_timesteps = 1000;
  double shift = 1.0;
  bool use_dynamic_shifting = false;
  bool linear_time_shift = false;  // time_shift_type "linear" (else "exponential")
  double base_shift = 0.5, max_shift = 1.15;
  int64_t base_image_seq_len = 256, max_image_seq_len = 4096;
};
// Error(InvalidInput) naming the file and the key for a missing file, another scheduler class, a
// bad value or an option the runner does not support.
FlowMatchConfig read_flow_match_config(const std::filesystem::path& file);

// The schedule FluxPipeline asks of the scheduler for `steps` steps and `image_seq_len` image
// tokens: sigmas = linspace(1, 1/N, N) (float64, numpy's) cast to float32, mu = calculate_shift
// (float64), shifted in float32 (exponential: e^mu / (e^mu + (1/σ − 1)); linear: mu / (mu + (1/σ −
// 1)); static: shift·σ / (1 + (shift − 1)·σ)), timesteps = σ·1000 (float32), a final σ = 0.
struct FlowMatchSchedule {
  double mu = 0;                 // dynamic shifting only
  std::vector<float> sigmas;     // N + 1
  std::vector<float> timesteps;  // N
};
FlowMatchSchedule flow_match_schedule(const FlowMatchConfig& config, uint32_t steps, int64_t image_seq_len);

// One Euler step on `latents` (values of `dtype`, as floats) with the noise prediction `sample`
// (values of `dtype`), as diffusers' FlowMatchEulerDiscreteScheduler.step on the CPU (above).
void flow_match_euler_step(std::vector<float>& latents, const std::vector<float>& sample, float sigma,
                           float sigma_next, DType dtype);

// Whether `checkpoint` is a pipeline folder whose model_index.json names FluxPipeline.
bool is_flux_pipeline(const Checkpoint& checkpoint);
// The components a FluxPipeline run needs (the VAE is optional) that `checkpoint` lacks, comma
// separated; empty when it has them all. A folder of the transformer alone (quantized for use with
// another folder's encoders) runs as its components do, each on its own inputs.
std::string missing_pipeline_components(const Checkpoint& checkpoint);

// What a pipeline run did.
struct PipelineRun {
  bool ran = false;
  uint32_t denoise_steps = 0;
  FlowMatchSchedule schedule;
  std::vector<float> timestep_inputs;  // the transformer's `timestep` per step (⟦⟦t⟧/1000⟧)
  float guidance = 0;                  // 0 without guidance_embeds
  int64_t grid_rows = 0, grid_cols = 0;
  HostTensor latents;  // the initial latents (model dtype), under kLatentsInput
  HostTensor images;   // the final latents, F32, under kImagesOutput
};

// The data flow of one FluxPipeline run, pass by pass. A pass is one run of one component's
// forward; the runner (the driver, or verify's reference on the original weights) asks each
// pass's inputs, runs it and hands its outputs back.
class FluxPipelineFlow {
 public:
  struct Pass {
    uint32_t component = 0;     // index into checkpoint.components()
    int32_t denoise_step = -1;  // the transformer's step, -1 for the encoders
  };
  // `given`: the encoders' inputs by component name and the pipeline's (kLatentsInput) under "";
  // what is absent is drawn from `seed` (encoders: random_inputs at flux_pipeline_tokens(tokens),
  // seeds seed, seed + 1; latents: seed + 2). Error(InvalidInput) naming the input for inputs that
  // do not fit together (batch sizes, latents' shape, more image tokens than `tokens`), and naming
  // the folder when a component is missing or has another architecture.
  FluxPipelineFlow(const Checkpoint& checkpoint, uint32_t denoise_steps, int64_t tokens, uint64_t seed,
                   const std::map<std::string, std::vector<HostTensor>>& given);
  ~FluxPipelineFlow();
  FluxPipelineFlow(const FluxPipelineFlow&) = delete;
  FluxPipelineFlow& operator=(const FluxPipelineFlow&) = delete;

  const std::vector<Pass>& passes() const { return passes_; }
  // The inputs of pass `p` (every earlier pass's outputs taken).
  std::vector<HostTensor> inputs(size_t p) const;
  // The outputs of pass `p` (Forward::outputs, F32).
  void take(size_t p, const std::vector<HostTensor>& outputs);
  // The encoders' inputs as run (by component name) and the initial latents.
  const std::map<std::string, std::vector<HostTensor>>& given_inputs() const { return given_; }
  const PipelineRun& result() const { return run_; }

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::vector<Pass> passes_;
  std::map<std::string, std::vector<HostTensor>> given_;
  PipelineRun run_;
};

}  // namespace qtool::runner
