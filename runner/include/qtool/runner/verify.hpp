// `qtool verify`: runs a plan on its checkpoint and checks it (DESIGN.md §5).
//
// A component whose architecture has a forward (forward.hpp) runs it (on either backend), on
// --inputs or on inputs drawn from the seed; the others run their linears only. The report says
// which ran ("components"). A FluxPipeline folder runs as the pipeline (pipeline.hpp): CLIP, T5,
// the transformer --denoise-steps times with the flow-matching Euler scheduler, then the VAE's
// linears; each check is reported per phase as well ("phases" in the JSON), and with --reference
// the final latents are checked against the original pipeline's ("reference latents").
//
// Checks, each named in the report:
//   plan matches checkpoint   the plan's fingerprint is the checkpoint's, and its parts agree with
//                             each other and with the checkpoint (plan_checks.hpp); a mismatch is
//                             bad input: Error(InvalidInput), exit 2, before anything runs
//   finite outputs            no NaN or infinity in any linear's output or any op output of a
//                             forward unit, any step
//   every tensor read         each forward read every tensor of its component
//   streamed == resident      the planned run's outputs (each linear's; each forward unit's, over
//                             every op it ran) are bitwise identical to an all-resident run's (or, when
//                             everything cannot be resident at once, to each layer run alone from the mapped
//                             checkpoint)
//   no state left behind      (--poison) host arenas overwritten with garbage right after each
//                             copy: outputs unchanged
//   reference error           (--reference) each linear's output against the original weight's,
//                             within the scheme's predicted bound (error_model.hpp); unquantized
//                             linears stored alike must match exactly
//   reference tensors         (--reference) every tensor not quantized is the original's byte for
//                             byte, and each quantized weight's recorded dtype and shape are the
//                             original's (tensor_compare.hpp)
//   reference output          (--reference) each forward's output against the original model's
//                             forward on the same inputs (verify_forward.hpp states the bound); on
//                             a GPU, of the same forward run again on the CPU backend, and:
//   cuda forward vs cpu       (--reference, CUDA) each CUDA forward output within a relative RMS
//                             error of 2e-2 of that CPU run's
//   peak memory               per GPU, measured peak <= the plan's predicted peak, and the forwards'
//                             activation peak <= the plan's activation items
//   step time                 measured against the plan's prediction: reported; a check only with
//                             a time tolerance (--time-tolerance)
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "qtool/runner/executor.hpp"

namespace qtool::runner {

struct VerifyOptions {
  std::filesystem::path checkpoint;
  std::filesystem::path plan;
  std::filesystem::path reference;  // empty: no reference check
  std::string backend = "auto";     // auto | cuda | cpu
  std::optional<uint64_t> tokens;   // default: the plan's
  uint32_t steps = 3;               // run steps (the first is a warm-up for timing)
  // A FluxPipeline folder's denoising steps (pipeline.hpp); default kDefaultDenoiseSteps. Usage
  // error for another checkpoint.
  std::optional<uint32_t> denoise_steps;
  uint64_t seed = 0;
  bool poison = false;                   // add the "no state left behind" run
  std::optional<double> time_tolerance;  // e.g. 0.2: fail when |measured/predicted - 1| > 0.2
  std::filesystem::path inputs;          // --inputs: the forwards' arguments (safetensors, framework names)
  std::filesystem::path outputs;         // --outputs: the forwards' outputs (F32), and drawn inputs
  std::filesystem::path report;          // JSON report
  std::filesystem::path trace;           // Chrome trace-event JSON of the planned run
  size_t threads = 0;                    // CPU backend and host work
  std::function<void(std::string_view)> log;  // human-readable lines (stderr)
};

struct CheckResult {
  std::string name;
  enum class Status : uint8_t { Pass, Fail, Skip, Info } status = Status::Pass;
  std::string detail;
};
const char* check_status_name(CheckResult::Status status);

struct VerifyReport {
  std::vector<CheckResult> checks;
  nlohmann::json json;  // everything, as written by --report
  bool passed() const;  // no check failed
  std::vector<std::string> failed_names() const;
};

// Runs every check. Bad input (unreadable files, a plan for another checkpoint, a reference
// without a layer) throws Error(InvalidInput/Io); failed checks are in the report.
VerifyReport verify(const VerifyOptions& options);

// Chrome trace-event JSON ("traceEvents", complete events "ph": "X" in microseconds, one process
// per GPU and one thread per lane), for Perfetto or chrome://tracing.
nlohmann::json trace_to_json(const std::vector<TraceEvent>& events);

// The fraction of the copy time of streamed steps that overlaps the compute of another step on
// the same GPU (0 when nothing is streamed): how well copies hide behind compute.
double copy_compute_overlap(const std::vector<TraceEvent>& events, uint32_t step);

}  // namespace qtool::runner
