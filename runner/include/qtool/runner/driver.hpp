// The schedule driver: the one walker of a Schedule, for every backend. A backend implements the
// device interface below (memory, a slot copy, the waits that order it, the ops); the driver does
// the rest:
//
// - Set-up: resident arenas loaded once per GPU; per streaming GPU a ring of K slots of its
//   largest group; cpu groups in pinned host arenas; disk groups read from the checkpoint files
//   into a pinned staging ring.
// - A copy thread walks the streamed steps in execution order and copies step j's arena into slot
//   j mod K of its GPU as soon as the slot's previous step (j - K) has been released by compute;
//   disk groups are read into staging first. Trace events and the after_copy hook as RunOptions says.
// - Compute, on the calling thread, component by component in plan order: a component whose
//   architecture has a forward (make_forward) runs it unit by unit; any other runs its linears
//   only (one unit per plan step). A unit's WeightSource resolves each tensor to the arena where it
//   lives at that moment: the resident arena, or the slot its group was copied into (waiting for
//   that copy). A tied alias resolves to its primary in the unit's own steps (a tied head whose
//   embedding is streamed names the group again, and it is copied again).
// - A run by phase (RunOptions::phases): per (component, GPU) its part of the resident arena, held
//   for the job or only during its phase; per phase its own ring of slots (driver_phases.cpp).
// - Units and steps need not match one to one: a step may hold several units (block groups of N),
//   and a unit may span several steps (leaf groups inside a block; a top-level module whose leaves
//   are units of their own). A streamed step is released when the last unit using it ends, so a
//   DequantParams stays valid until its unit ends (the forwards fetch a unit's tensors up front);
//   a unit whose streamed steps do not fit the K slots at once is refused before anything runs
//   (Error(InvalidInput): plan with more slots or block groups; the planner never makes one).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include "qtool/formats/checkpoint.hpp"
#include "qtool/formats/error.hpp"
#include "qtool/runner/executor.hpp"
#include "qtool/runner/forward.hpp"
#include "qtool/runner/ops.hpp"
#include "qtool/runner/schedule.hpp"

namespace qtool::runner {

// Host memory the copies read from (CUDA: pinned).
class HostBuffer {
 public:
  virtual ~HostBuffer() = default;
  virtual uint8_t* data() = 0;
  virtual uint64_t size() const = 0;
};

// One GPU as the driver uses it (the CPU backend: host memory standing in for it).
class Device {
 public:
  virtual ~Device() = default;
  // Device memory (256-byte aligned, contents undefined), held until the device is destroyed and
  // recorded as an item of `kind`.
  virtual uint8_t* allocate(MemoryKind kind, uint64_t bytes) = 0;
  // Gives back memory from allocate() once the work issued so far that reads it has completed; its
  // item leaves memory().items (a plan by phase: a component loaded at its phase's start).
  virtual void free(uint8_t* memory) = 0;
  // Device memory held now: CPU: the live allocations; CUDA: cudaMemGetInfo's total - free once
  // the work issued so far has completed, less the part of the ops' activation block not reached.
  // Each call also counts toward memory().measured_peak_bytes.
  virtual uint64_t held_bytes() = 0;
  // Synchronous host -> device copy (resident arenas, at set-up).
  virtual void upload(uint8_t* dst, std::span<const uint8_t> host) = 0;
  // Copy side (the driver's copy thread, in streaming order, once the slot is free): copies `host`
  // into `slot_memory` (slot `slot` of the ring). With `wait` it returns once the copy is complete
  // (the driver rewrites `host` next: a disk staging buffer; or a test hook reads it); without, it
  // may return while the copy is still in flight (`host` stays untouched until the run ends).
  virtual void copy_to_slot(uint32_t slot, uint8_t* slot_memory, std::span<const uint8_t> host,
                            bool wait) = 0;
  // Compute side: work issued after wait_copied sees the slot's last copy complete; release says
  // the work issued so far is the slot's last use.
  virtual void wait_copied(uint32_t slot) = 0;
  virtual void release(uint32_t slot) = 0;
  // Records an activation item the ops hold (their memory is the ops' own).
  virtual void note(MemoryKind kind, uint64_t bytes) = 0;
  // Drops the activation items noted so far (a run by phase, at a phase's start: its ops are new).
  virtual void forget_activations() = 0;
  virtual DeviceMemory memory() const = 0;
  // Waits until the work issued so far on the device (copies, and compute that reads its memory)
  // has completed: the driver calls it at the end of each run step, before it takes the step's time.
  virtual void synchronize() {}
};

// What the driver asks of the ops for one component: activation memory and dequant scratch.
struct OpsNeed {
  // Per forward component planner::activation_items at `batch` x its tokens (a FluxPipeline's
  // encoders at planner::flux_pipeline_tokens) and a quarter and 1 MiB more (verify's memory
  // check, not this capacity, holds the forward to the plan); per linears-only component its
  // hidden state and output.
  uint64_t activation_bytes = 0;
  // The bf16 weight of its largest linear that is dequantized before the GEMM (the plan's
  // dequant_scratch): each GPU the component runs units on has ops of this size.
  uint64_t dequant_scratch_bytes = 0;
};

// What Platform::transfer is given: two dense views of one shape and dtype (our invariant).
inline void check_transfer(const Mat& src, const Mat& dst) {
  QTOOL_ASSERT(src.dense() && dst.dense() && src.rows == dst.rows && src.cols == dst.cols &&
               src.dtype == dst.dtype);
}

// What a backend provides to the driver.
class Platform {
 public:
  virtual ~Platform() = default;
  virtual std::string name() const = 0;  // "cpu"
  virtual std::string device_names() const = 0;
  virtual std::unique_ptr<Device> open(int index) = 0;
  virtual std::unique_ptr<HostBuffer> host_buffer(uint64_t bytes) = 0;
  // The ops that run on GPU `device`, with at least `need`'s activation memory and dequant scratch;
  // the ops asked for last are the ones the compute waits and releases of the devices order (the
  // unit running now). Each GPU has its own (the CPU backend too: separate host blocks whose ops
  // refuse another's views), so a forward's state crosses GPUs only through transfer().
  virtual Ops& ops(int device, const OpsNeed& need) = 0;
  // Copies the dense view `src` of GPU `src_device`'s ops into `dst` (same shape and dtype) of GPU
  // `dst_device`'s: after the work issued so far on the source, before the work issued next on
  // the destination, and before the source's next work may overwrite `src`.
  virtual void transfer(int src_device, const Mat& src, int dst_device, const Mat& dst) = 0;
  // The milliseconds the transfers since the last call took (CUDA: timed by events around each
  // copy on the destination's stream, read once the devices are synchronized; CPU: the copies'
  // wall time).
  virtual double take_transfer_ms() = 0;
  // Frees every GPU's ops and their memory (a run by phase, between phases: the next phase's ops
  // are sized for its components); the next ops() makes them anew.
  virtual void release_ops() {}
};

// The digest of `n` elements of `dtype` in host memory: the wrapping sum of kmath::digest_term
// over its 32-bit words (for bf16 exactly cpu::digest), and its count of NaN and infinite values.
LayerDigest host_digest(const uint8_t* bytes, uint64_t n, DType dtype);

// Runs `options.steps` steps of the schedule on `platform`.
RunResult drive(Platform& platform, const Checkpoint& checkpoint, const Schedule& schedule,
                const RunOptions& options);

// OpsNeed per component of the checkpoint, for a run of `schedule`; `pipeline`: a FluxPipeline run.
std::vector<OpsNeed> ops_needs(const Checkpoint& checkpoint, const Schedule& schedule, uint64_t tokens,
                               uint64_t batch, const std::vector<std::unique_ptr<Forward>>& forwards,
                               bool pipeline);

// A WeightSource over one component's mapped tensors (verify's reference forward): each tensor is
// copied once into 256-byte aligned host memory (a quantized linear with its quant state); a tied
// alias the file lacks resolves to its primary (`tied`: alias -> primary); `perturb`, when set,
// may change a plain tensor's bytes after the copy (its DequantParams say kind and shape).
class MappedWeights final : public WeightSource {
 public:
  MappedWeights(const Component& component, std::unordered_map<std::string, std::string> tied = {},
                std::function<void(std::string_view name, const DequantParams& params, uint8_t* bytes)>
                    perturb = nullptr);
  ~MappedWeights() override;
  DequantParams get(std::string_view tensor) override;
  bool has(std::string_view tensor) const override;
  const std::vector<std::string>& read() const { return read_; }

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::vector<std::string> read_;
};

// Runs `forward` all-resident on `ops` with `weights`: begin, every unit, output.
HostTensor run_forward(Forward& forward, Ops& ops, WeightSource& weights,
                       const std::vector<HostTensor>& inputs);

}  // namespace qtool::runner
