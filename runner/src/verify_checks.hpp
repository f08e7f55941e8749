// verify's pieces (verify.hpp; verify.cpp runs them in order): the inputs checked and the backend
// chosen (verify_setup.cpp), the checks on the planned run and the runs it is compared with
// (verify_run_checks.cpp), the checks against the original weights (verify_reference.cpp), and the
// measured sections of the report: memory, phases, timing, trace (verify_report.cpp). Each check
// adds its result to a Checks and its section to the report's JSON.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "qtool/formats/checkpoint.hpp"
#include "qtool/formats/thread_pool.hpp"
#include "qtool/planner/plan.hpp"
#include "qtool/runner/executor.hpp"
#include "qtool/runner/schedule.hpp"
#include "qtool/runner/verify.hpp"

namespace qtool::runner::verify_detail {

// The checks' results as they come: each logged ("  [pass] name: detail") and kept in the report.
class Checks {
 public:
  Checks(VerifyReport& report, const VerifyOptions& options) : report_(report), options_(options) {}
  void log(const std::string& line) const {
    if (options_.log) options_.log(line);
  }
  void add(std::string name, CheckResult::Status status, std::string detail);
  nlohmann::json& json() { return report_.json; }
  const VerifyReport& report() const { return report_; }

 private:
  VerifyReport& report_;
  const VerifyOptions& options_;
};

// verify's inputs, read and checked before anything runs (bad ones throw here, exit 2): the
// checkpoint, its plan and schedule, the backend, the run's sizes and the planned run's options.
struct Setup {
  Setup(const VerifyOptions& options, const Checks& checks);

  const VerifyOptions& options;
  const Checkpoint checkpoint;
  const planner::Plan plan;
  const std::string fingerprint;
  const Schedule schedule;
  const std::unique_ptr<Backend> backend;
  bool on_gpu = false;
  uint64_t tokens = 0;
  bool plan_tokens = false;  // tokens are the plan's: its memory and time predictions apply
  uint32_t run_denoise = 0;  // a FluxPipeline's denoising steps; 0 for anything else
  size_t n_streamed = 0;     // streamed plan steps
  size_t n_disk = 0;         // ... of them read from disk
  RunOptions run_opts;       // the planned run's
};

// The run's description on stderr, the report's header and the "plan matches checkpoint" check.
void report_setup(const Setup& s, Checks& checks);

// "%.3g" and such: one double formatted.
std::string fmt(const char* f, double v);

// Per linear: whether it ran linears-only (forward components' linears have no digest of their own).
std::vector<bool> linears_only_mask(const Schedule& schedule, const RunResult& run);

// The row stride of the hidden state a linears-only component's linears read in a run (the
// driver's: its widest input), so that a layer run alone multiplies the same layout (a GPU GEMM
// may choose its algorithm by the stride).
uint64_t linears_only_ld(const Schedule& schedule, const LinearTask& l);

// A run's phases: its components in run order (a FluxPipeline's: CLIP, T5, the transformer, then
// the others), each with what the checks found in it.
struct Phase {
  std::string component;
  size_t outputs = 0;  // digests compared / checked
  uint64_t nonfinite = 0;
  size_t mismatches = 0;  // streamed vs all-resident
};
std::vector<Phase> make_phases(const RunResult& run);

// What the all-resident run (or each layer run alone) gave, to compare the planned run with.
struct ResidentRun {
  std::string how;  // what was compared with, for the check's detail
  std::vector<std::vector<LayerDigest>> digests, units;
  std::vector<double> step_ms;
  HostTensor images;
};

// --- verify_run_checks.cpp: the planned run's own checks and the runs it is compared with. ---
void check_finite_outputs(const Setup& s, const RunResult& planned, std::vector<Phase>& phases,
                          Checks& checks);
void report_pipeline(const RunResult& planned, Checks& checks);
void report_components(const RunResult& run, Checks& checks);
void check_weights_read(const RunResult& run, Checks& checks);
ResidentRun run_all_resident(const Setup& s, const Checks& checks);
void check_streamed_vs_resident(const Setup& s, const RunResult& planned, const ResidentRun& resident,
                                std::vector<Phase>& phases, Checks& checks);
void check_no_state_left_behind(const Setup& s, const RunResult& planned, Checks& checks);

// --- verify_reference.cpp: --reference, against the original weights; the report's "layers". ---
nlohmann::json check_reference(const Setup& s, const RunResult& planned, Checks& checks);

// --- verify_report.cpp: what was measured, and the report's tail. ---
void check_peak_memory(const Setup& s, const RunResult& planned, const std::vector<Phase>& phases,
                       Checks& checks);
void report_phases(const RunResult& planned, const std::vector<Phase>& phases, Checks& checks);
void check_step_time(const Setup& s, const RunResult& planned, std::vector<double> resident_ms,
                     Checks& checks);
void report_trace(const Setup& s, const RunResult& planned, Checks& checks);
void finish_report(const Setup& s, const RunResult& planned, Checks& checks);

}  // namespace qtool::runner::verify_detail
