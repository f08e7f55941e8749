// The schedule driver's parts (driver.hpp): the Driver, its set-up and run order (driver.cpp),
// its copy thread and slot ring (driver_copy.cpp), and the compute walk over each component's
// units with a WeightSource served from the arenas (driver_units.cpp).
#pragma once

#include <chrono>
#include <condition_variable>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_set>
#include <vector>

#include "qtool/runner/driver.hpp"
#include "qtool/runner/pipeline.hpp"
#include "run_support.hpp"
#include "unit_ops.hpp"

namespace qtool::runner::driver_detail {

using Clock = std::chrono::steady_clock;

// Milliseconds from a to b, and from t0 to now.
inline double ms_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}
inline double ms_since(Clock::time_point t0) { return ms_between(t0, Clock::now()); }

enum class StepState : uint8_t { Pending, Held, Released };

// The units a component runs and how: its forward, or its linears (one unit per plan step).
class UnitRunner {
 public:
  virtual ~UnitRunner() = default;
  virtual const std::vector<std::string>& units() const = 0;
  // On `device`'s ops, the GPU of the first unit.
  virtual void begin(Ops& ops, int device, uint32_t run_step) = 0;
  virtual void run_unit(size_t unit, Ops& ops, WeightSource& weights) = 0;
  virtual void end(Ops& ops, ComponentRun& run) = 0;
  // The activations its units share (Forward::shared_state; linears only: their input), which
  // the driver hands to the next unit's GPU.
  virtual std::vector<Mat*> shared_state() = 0;
  // After a hand-over, before the next unit: what it makes per GPU, on `device`'s `ops`.
  virtual void moved_to(Ops& ops, int device) { (void)ops, (void)device; }
};

inline std::string label(const std::string& component, const std::string& name) {
  return component.empty() ? name : component + "/" + name;
}

class Driver;

// A component's units in one pass: how they run, and the plan steps each reads.
struct ComponentUnits {
  std::unique_ptr<UnitRunner> runner;
  std::vector<std::vector<size_t>> steps_of;  // per unit: its plan steps
  std::vector<size_t> last_unit;              // per plan step: the last unit reading it (SIZE_MAX: none)
};

// The WeightSource of one unit: tensors resolved in the unit's steps.
class StepWeights final : public WeightSource {
 public:
  StepWeights(Driver& driver, uint32_t component) : driver_(driver), component_(component) {}
  void enter(size_t unit, const std::string& unit_name, const std::vector<size_t>* steps) {
    unit_ = unit;
    unit_name_ = &unit_name;
    steps_ = steps;
  }
  DequantParams get(std::string_view tensor) override;
  bool has(std::string_view tensor) const override;
  std::unordered_set<uint64_t> read;  // (component, entry) keys of the tensors read

 private:
  Driver& driver_;
  uint32_t component_;
  size_t unit_ = 0;
  const std::string* unit_name_ = nullptr;
  const std::vector<size_t>* steps_ = nullptr;
};

inline uint64_t entry_key(Component::Entry e) { return (static_cast<uint64_t>(e.shard) << 32) | e.index; }

class Driver {
 public:
  Driver(Platform& platform, const Checkpoint& checkpoint, const Schedule& schedule,
         const RunOptions& options)
      : platform_(platform), checkpoint_(checkpoint), schedule_(schedule), options_(options) {}
  RunResult run();

  const Schedule& schedule() const { return schedule_; }
  const Checkpoint& checkpoint() const { return checkpoint_; }
  // The arena step `si` reads from and its base address now (waiting for its copy if streamed).
  uint32_t arena_of(size_t si) const { return schedule_.steps[si].arena; }
  const uint8_t* acquire(size_t si, const std::string& tensor);

 private:
  bool streamed(size_t si) const { return planned_ && schedule_.steps[si].streamed; }
  // The copy of streamed step `si` in the current pass.
  size_t item(size_t si) const { return pass_item0_[cur_pass_] + rank_[si]; }
  void set_up();
  // A run by phase (RunOptions::phases, driver_phases.cpp).
  void set_up_phases();
  void begin_phase(size_t phase);
  void end_phase(size_t phase);
  void note_phase_peak(size_t phase);
  uint64_t slots_of(size_t si) const;  // K of the ring step `si` is copied into
  // ops_need_ from each component's own need: per component the most any component of its phase
  // needs (a run by phase), else the most any component of the job needs.
  void size_ops(const std::vector<OpsNeed>& per_component);
  void make_forwards();
  void make_passes();
  void copy_loop(uint32_t run_step);
  void wait_copy(size_t si);
  void finish(size_t si);
  void run_step(uint32_t run_step);
  void run_component(uint32_t component, uint32_t run_step, size_t pass);
  ComponentUnits component_units(uint32_t component, uint32_t run_step, size_t pass, bool first_pass);
  // The ops of each GPU a component's run has used, and the mark to release them to at its end.
  struct OpsInUse {
    Ops* ops = nullptr;
    size_t mark = 0;
    // The shared state's views here when it last left this GPU: still allocated (the stack is
    // released at the component's end), so a hand-over back here copies into them.
    std::vector<Mat> left;
  };
  using ComponentOps = std::map<int, OpsInUse>;
  // GPU `device`'s ops for component `component` (made the platform's active ones), marked and
  // their peak reset when the run first uses them.
  Ops& ops_on(uint32_t component, int device, ComponentOps& used);
  void run_units(uint32_t component, uint32_t run_step, size_t pass, const ComponentUnits& units,
                 UnitOps& unit_ops, StepWeights& weights, int device, ComponentOps& used);
  // Copies the runner's shared state from GPU `from` to `to` (each view once: aliases follow),
  // into the views it left on `to` before where they fit, else new ones from `to`'s ops, and points
  // it there; the bytes are the run step's peer bytes.
  void hand_over(UnitRunner& runner, int from, int to, ComponentOps& used, uint32_t run_step);
  // A forward's output digested and handed to the pipeline; on its first pass, its unread tensors.
  void end_forward(uint32_t component, uint32_t run_step, size_t pass, size_t n_units,
                   const StepWeights& weights, bool first_pass);
  bool runs_on(const std::vector<std::vector<size_t>>& steps_of, int device) const;  // any step on `device`
  void unit_steps(uint32_t component, const std::vector<std::string>& units,
                  std::vector<std::vector<size_t>>& out, std::vector<size_t>& last_unit) const;
  void trace(std::string name, Lane lane, int device, uint32_t step, int32_t plan_step, Clock::time_point a,
             Clock::time_point b, uint64_t bytes);

  Platform& platform_;
  const Checkpoint& checkpoint_;
  const Schedule& schedule_;
  const RunOptions& options_;
  bool planned_ = true;
  RunResult result_;
  std::map<int, std::unique_ptr<Device>> devices_;
  std::vector<const uint8_t*> on_device_;                // per arena: its device copy, if held there
  std::vector<std::unique_ptr<HostBuffer>> host_arena_;  // per arena: pinned copy of a cpu group
  std::vector<std::unique_ptr<HostBuffer>> staging_;     // disk groups
  std::map<int, std::pair<uint8_t*, uint64_t>> slots_;   // per GPU: ring base, slot bytes
  uint64_t k_ = 1;                                       // slots per ring
  // A run by phase: per (component, GPU) its tensors in the GPU's resident arena, [lo, lo + bytes),
  // with their host copy and, while held, their device memory.
  struct Span {
    uint64_t lo = 0, bytes = 0;
    std::unique_ptr<HostBuffer> host;
    uint8_t* mem = nullptr;
  };
  bool phased_ = false;
  std::map<std::pair<uint32_t, int>, Span> spans_;
  std::vector<uint8_t> loaded_;                      // per component: loaded per phase, else job-resident
  std::vector<size_t> pass_phase_;                   // per pass: its phase
  std::vector<std::map<int, uint64_t>> phase_slot_;  // per phase, per GPU: its slot bytes
  std::vector<std::map<int, uint64_t>> phase_k_;     // per phase, per GPU: its slots
  std::vector<size_t> item_phase_;                   // per copy item: its phase
  int64_t ring_phase_ = -1;                          // the phase whose rings are allocated (mu_)
  Clock::time_point phase_t0_;                       // the phase's passes began
  // A run step runs passes: one run of one component's units each, in order (each component
  // once; a FluxPipeline's transformer once per denoising step). The copy thread copies every
  // pass's streamed steps, in pass order.
  struct CopyItem {
    size_t step = 0;
    uint64_t seq = 0;  // its sequence on its GPU
  };
  std::vector<uint32_t> passes_;         // per pass: its component
  std::vector<std::string> pass_label_;  // per pass: "transformer[denoise 3]"
  size_t cur_pass_ = 0;
  std::vector<CopyItem> items_;     // the copies of a run step, in order
  std::vector<size_t> pass_item0_;  // per pass: its first item
  std::vector<size_t> rank_;        // per streamed step: its position among its component's streamed steps
  std::vector<uint64_t> dev_rank_;  // ... among those on its GPU
  std::map<int, uint64_t> device_items_;                      // per GPU: its items per run step
  std::unique_ptr<FluxPipelineFlow> flow_;                    // a FluxPipeline run
  std::vector<std::unique_ptr<Forward>> forwards_;            // per component (null: linears only)
  std::vector<std::vector<HostTensor>> inputs_;               // per component with a forward
  std::vector<size_t> digest_base_;                           // per pass: its first unit digest
  std::vector<std::vector<std::vector<size_t>>> unit_steps_;  // per forward component, per unit: its steps
  std::vector<std::vector<size_t>> last_unit_;  // per forward component, per step: its last unit
  std::vector<OpsNeed> ops_need_;               // per component: what its ops are made with (size_ops)
  size_t ops_phase_ = SIZE_MAX;                 // the phase the platform's ops were made for (SIZE_MAX: none)
  std::unique_ptr<ShardFiles> files_;
  Clock::time_point origin_;
  std::mutex trace_mu_;

  // The ring, per run step.
  std::mutex mu_;
  std::condition_variable cv_;
  size_t copies_done_ = 0;
  uint64_t peer_bytes_ = 0;  // this run step's hand-overs between GPUs
  bool abort_ = false;
  std::exception_ptr copy_error_;
  std::vector<StepState> state_;               // per item
  std::map<int, uint64_t> released_;           // per GPU: its first step (by seq) not yet released
  std::map<int, std::vector<uint8_t>> freed_;  // per GPU, per seq: released
};

}  // namespace qtool::runner::driver_detail
