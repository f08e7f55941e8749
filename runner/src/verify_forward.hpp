// verify's pieces for the real forwards: --inputs read and checked, --outputs written, and the
// quantized model's output against the original model's forward on the same inputs.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <unordered_map>
#include <vector>

#include "qtool/formats/checkpoint.hpp"
#include "qtool/formats/thread_pool.hpp"
#include "qtool/runner/executor.hpp"
#include "qtool/runner/forward.hpp"
#include "qtool/runner/schedule.hpp"

namespace qtool::runner {

// The input name of `tensor` of `component` in an --inputs / --outputs file: "transformer.sample"
// in a pipeline, "sample" in a model folder or file.
std::string io_name(const Checkpoint& checkpoint, const std::string& component, const std::string& tensor);

// Reads --inputs: every tensor must be an argument of a component's forward (named as io_name
// says) or one of its outputs (an --outputs file replays: its outputs are ignored), every component with a
// forward must get valid inputs (Forward::check_inputs, at most `max_tokens` tokens).
// A FluxPipeline folder run as the pipeline (`denoise_steps` > 0, pipeline.hpp) takes the
// pipeline's inputs instead: text_encoder.input_ids, text_encoder_2.input_ids and latents (under
// "" in the result), checked together.
// Error(InvalidInput) naming the file and the input otherwise. Returns the inputs by component.
std::map<std::string, std::vector<HostTensor>> read_inputs(const std::filesystem::path& file,
                                                           const Checkpoint& checkpoint, int64_t max_tokens,
                                                           uint32_t denoise_steps = 0);

// Writes --outputs atomically: each forward component's output (F32, under io_name), and its
// inputs too when `with_inputs` (drawn from the seed: the file then replays the run). A pipeline
// run adds `images` (the final latents) and, with its inputs, `latents` and the encoders' ids
// (the transformer's last inputs are not written: the flow makes them).
void write_outputs(const std::filesystem::path& file, const Checkpoint& checkpoint, const RunResult& run,
                   bool with_inputs);

// The quantized model's output against the original's forward on the same inputs (CPU ops).
//   exact:  the component has no quantized linear: the outputs must be equal bit for bit.
//   Otherwise two conditions:
//   substituted: the original's forward with each quantized linear's weight replaced by the
//           quantized file's, dequantized, gives the quantized model's output bit for bit (the
//           files differ in their quantized linears only: an embedding, a norm, a bias or a head
//           damaged after quantization shows here, whatever the quantization error);
//   bound:  rel_error (||y_q - y_ref|| / ||y_ref||) <= kForwardBoundFactor * simulated
//           + kForwardBoundFloor, where `simulated` is the relative error of the original's forward
//           with zero-mean Gaussian noise added to every quantized linear's weight, per element of
//           the variance the error model (error_model.hpp) predicts for that element's column:
//           the error model's prediction carried through the real forward (seeded, in the report),
//           the largest of kNoiseDraws draws.
struct ForwardReference {
  std::string component;
  std::string output;  // "logits", "sample"
  bool exact = false;
  double rel_error = 0;
  double max_abs_error = 0;
  double simulated_rel_error = 0;
  double bound = 0;
  uint64_t nonfinite = 0;
  uint64_t noise_seed = 0;
  bool substituted = true;  // equals the original with its quantized linears dequantized
  bool within() const;
  nlohmann::json to_json() const;
};
// The measured error and each draw of the simulated one are samples of spreads that are wide on
// small models and after many denoising steps: over 24 seeds of the tiny Flux pipeline in int8,
// the measured error was up to 2.4x the largest of three draws (the latents after 28 steps; up
// to 1.9x for one component's output) and up to 3.8x a single draw. A factor 2 over one draw
// failed one seed in four; 3 over the largest of three leaves a margin over what was seen, and a
// quantization that is wrong (a scale, a code map) still lands tens of times past it.
inline constexpr double kForwardBoundFactor = 3.0;
inline constexpr int kNoiseDraws = 3;
inline constexpr double kForwardBoundFloor = 1e-3;

ForwardReference compare_forward_with_reference(const Component& quantized, const Component& reference,
                                                const ComponentRun& run,
                                                const std::unordered_map<std::string, std::string>& tied,
                                                uint64_t seed, ThreadPool& pool);

// A FluxPipeline run's final latents (`images`) against the whole pipeline run again on the
// original's weights from the same inputs (ids, latents; the same schedule), with the same
// conditions as a forward's: exact when no component of the flow has a quantized linear; else the
// pipeline with every quantized linear dequantized gives the quantized run's latents bit for bit,
// and rel_error <= kForwardBoundFactor * simulated + kForwardBoundFloor, `simulated` being the
// pipeline with the error model's noise in every quantized linear of CLIP, T5 and the transformer
// (drawn once: every denoising step sees the same noisy weights).
ForwardReference compare_pipeline_with_reference(const Checkpoint& quantized, const Checkpoint& reference,
                                                 const RunResult& run, const Schedule& schedule,
                                                 uint64_t tokens, uint64_t seed, ThreadPool& pool);

}  // namespace qtool::runner
