// Backends that execute a Schedule: the CUDA backend (pinned host arenas, a ring of device slots
// per GPU, a copy stream and a compute stream ordered by events, dequant kernels + cuBLAS) and the
// CPU backend, which runs the same schedule with the same semantics (a copy thread filling the
// slots ahead of the compute thread), so that outputs, digests and checks are comparable.
//
// One step: the hidden state H [tokens, max_in] (bf16) is generated from the step's seed on the
// GPU of the first plan step and follows the steps from GPU to GPU by peer copies (a GPU whose
// linears are wider than the source's makes the extra columns itself). Every linear
// y[tokens, out] = H[:, 0:in] * dequant(W)^T (bf16 inputs, fp32 accumulate, bf16 out) runs in its
// step; each output is reduced to a digest (a 64-bit hash of every bit, and its count of
// non-finite values), so two runs can be compared bit for bit without keeping the outputs.
//
// Device memory per GPU is the plan's reserve model (planner::gpu_reserve): the resident arena,
// one allocation for the ring of slots, activation_in [tokens, max_in], activation_out
// [tokens, max_out], dequant_scratch and the cuBLAS workspace (the digests and the 4-bit tables
// ride in the rounding slack of one of them). Nothing is allocated while steps run.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "qtool/formats/checkpoint.hpp"
#include "qtool/runner/dequant.hpp"
#include "qtool/runner/schedule.hpp"

namespace qtool::runner {

enum class Mode : uint8_t {
  Planned,      // as the plan says: resident groups loaded once, the others streamed
  AllResident,  // every group loaded once onto its GPU (the reference for bitwise comparison)
};

// Sizes the plan does not derive from the schedule.
struct DeviceSizing {
  uint64_t cublas_workspace_bytes = 32ull << 20;  // the device profile's, as the plan reserved it
  uint64_t alloc_granularity_bytes = 2ull << 20;  // the device profile's: cudaMalloc's rounding
  uint64_t staging_buffers = 2;                   // pinned staging buffers for disk groups (host memory)
};

struct RunOptions {
  Mode mode = Mode::Planned;
  uint64_t tokens = 16;
  uint32_t steps = 1;
  uint64_t seed = 0;   // step s uses seed + s
  bool trace = false;  // record copy/compute intervals of every group
  // Reduce every output to a digest (a kernel per linear). Off for timing runs: a step then does
  // only a model's work (dequantize, multiply); digests are left zero.
  bool digests = true;
  DeviceSizing sizing;
  // Tests: called on the host once the copy of streamed step `step`'s arena into its device slot
  // has completed and before the step computes, with the host bytes it was copied from (the
  // group's pinned arena, or the staging buffer of a disk group). Adds a host wait per copy.
  std::function<void(size_t step, std::span<uint8_t> host_bytes)> after_copy;
};

struct LayerDigest {
  uint64_t hash = 0;
  uint64_t nonfinite = 0;
  bool operator==(const LayerDigest&) const = default;
};

// One interval of the trace: a copy or a compute of one plan step (or activations, a peer copy).
struct TraceEvent {
  std::string name;        // the plan step's name, or "activations", "peer copy"
  std::string lane;        // "gpu0 copy", "gpu0 compute", "disk read"
  uint32_t step = 0;       // the run's step (0 .. steps-1)
  int32_t plan_step = -1;  // index into Schedule::steps, -1 for activations and peer copies
  double start_us = 0;     // from the start of the run
  double dur_us = 0;
  uint64_t bytes = 0;  // copies: bytes moved
};

// One buffer class the backend allocated on a GPU (or, on the CPU backend, would have).
struct MemoryItem {
  std::string name;  // "resident weights", "slots", "activations", ...
  uint64_t bytes = 0;
};

struct DeviceMemory {
  int device = 0;
  std::vector<MemoryItem> items;  // the backend's own allocations, as requested
  uint64_t allocated_bytes = 0;   // sum of items
  // CUDA: max over the run of (total - free) from cudaMemGetInfo (context, cuBLAS, module images,
  // allocator rounding and everything above included); CPU: allocated_bytes.
  uint64_t measured_peak_bytes = 0;
  uint64_t baseline_bytes = 0;     // CUDA: (total - free) once the context existed, before any allocation
  uint64_t pinned_host_bytes = 0;  // pinned host arenas and staging of the run (all GPUs)
  std::string how;                 // how the peak was measured
};

struct RunResult {
  std::string backend;       // "cuda" or "cpu"
  std::string device_names;  // "NVIDIA H100 80GB HBM3"
  Mode mode = Mode::Planned;
  std::vector<std::vector<LayerDigest>> digests;  // [step][linear id]
  std::vector<double> step_ms;                    // wall time of each step, device-measured on CUDA
  std::vector<DeviceMemory> memory;               // per GPU of the schedule
  std::vector<TraceEvent> trace;
  uint64_t h2d_bytes_per_step = 0;  // streamed bytes copied to the devices per step
  uint64_t peer_bytes_per_step = 0;
  std::vector<std::string> notes;
};

// One layer run outside the schedule (verify's reference pass): its output [tokens, out], bf16 bits.
struct LayerRun {
  std::vector<uint16_t> y;
  LayerDigest digest;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;
  virtual std::string device_names() const = 0;
  // Runs `options.steps` steps of the schedule. Throws Error(InvalidInput) when the devices cannot
  // hold what the schedule needs.
  virtual RunResult run(const Checkpoint& checkpoint, const Schedule& schedule,
                        const RunOptions& options) = 0;
  // y = H(seed)[:, 0:in] * dequant(weight)^T for one weight given by host pointers (the mapped
  // checkpoint), on GPU `device` (CUDA): the same kernels as the schedule's, so its digest equals
  // the schedule's for the same weight bytes and seed.
  // `ldx` is the row stride of H the schedule used on that GPU (its max_in).
  virtual LayerRun run_layer(const DequantParams& host_params, uint64_t tokens, uint64_t ldx, uint64_t seed,
                             int device) = 0;
};

std::unique_ptr<Backend> make_cpu_backend(size_t n_threads = 0);
// Error(Unsupported) when qtool was built without CUDA or no CUDA device is present.
std::unique_ptr<Backend> make_cuda_backend();
bool cuda_backend_available();  // built with CUDA and at least one device present

// The bytes of each tensor of a linear's DequantParams (weight, scale, quant_map, nested_absmax,
// nested_quant_map), for copying them; 0 for absent parts.
struct PartSizes {
  uint64_t bytes[kNumParts] = {};
};
PartSizes part_sizes(const DequantParams& params);

}  // namespace qtool::runner
