// Backends that execute a Schedule. Both run every component through the schedule driver
// (driver.hpp) on their platform: a component whose architecture has a forward (forward.hpp) runs
// its real forward pass, unit by unit, its WeightSource served from the schedule's arenas and
// slots; any other component runs its linears only.
//
// Linears-only: a hidden state H [tokens, max_in] (bf16) is generated from the step's seed; every
// linear y[tokens, out] = H[:, 0:in] * dequant(W)^T (bf16 inputs, fp32 accumulate, bf16 out) runs
// in its step; each output is reduced to a digest (a 64-bit hash of every bit, and its count of
// non-finite values), so two runs can be compared bit for bit without keeping the outputs. A real
// forward is digested likewise: one digest per unit, over the outputs of every op the unit ran.
//
// Device memory per GPU is the plan's reserve model (planner::gpu_reserve): the resident arena,
// one allocation for the ring of slots, the activations (the forwards' items; activation_in and
// activation_out for linears-only components), dequant_scratch and the cuBLAS workspace.
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "qtool/formats/checkpoint.hpp"
#include "qtool/runner/dequant.hpp"
#include "qtool/runner/forward.hpp"
#include "qtool/runner/pipeline.hpp"
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
  // Read each forward's outputs back to the host at the end of its pass (RunResult's output). Off
  // for timing runs: they stay on the device, as a framework's forward leaves them (Llama's
  // float32 logits at 4096 tokens are 2 GB). A pipeline's passes read theirs back either way (the
  // next pass takes them), and so does a run with digests (an output's digest is of its bytes).
  bool outputs = true;
  DeviceSizing sizing;
  // Tests: called on the host once the copy of streamed step `step`'s arena into its device slot
  // has completed and before the step computes, with the host bytes it was copied from (the
  // group's pinned arena, or the staging buffer of a disk group). Adds a host wait per copy.
  std::function<void(size_t step, std::span<uint8_t> host_bytes)> after_copy;
  // The inputs of the components that have a forward, by component name, under the framework's
  // argument names; a component with a forward and no entry gets Forward::random_inputs(1, tokens,
  // seed). Every run step runs the same inputs.
  std::map<std::string, std::vector<HostTensor>> inputs;
  // false: every component runs its linears only (the streaming benchmarks, the linears' tests).
  bool forwards = true;
  // Tests: the forward of a component (null: runner::make_forward).
  std::function<std::unique_ptr<Forward>(const Component&)> make_forward;
  // A FluxPipeline folder (pipeline.hpp) with forwards on and denoise_steps > 0 runs as the
  // pipeline: CLIP, T5, the transformer denoise_steps times with the scheduler between, then the
  // other components; `inputs` then holds the encoders' ids under their component names and the
  // pipeline's `latents` under "". 0: every component once, on its own inputs.
  uint32_t denoise_steps = 0;
  // A plan by phase (planner::PhasePlan), in run order: the driver runs each pass in the phase of
  // its component. Components in no phase's `load` are resident for the job (uploaded at set-up);
  // a phase's `load` components (loaded, and streamed ones' resident units) are uploaded at its
  // start and freed at its end, and its streamed groups go through a ring of `slots` per GPU
  // allocated at its start and freed at its end. Empty: every component resident for the run.
  struct Phase {
    std::string name;
    std::vector<std::string> components;
    std::vector<std::string> load;
    std::map<int, uint32_t> slots;  // per GPU: the phase's device slots K
  };
  std::vector<Phase> phases;
};

struct LayerDigest {
  uint64_t hash = 0;
  uint64_t nonfinite = 0;
  bool operator==(const LayerDigest&) const = default;
};

// The lanes of the trace: per GPU its copy stream and its compute stream, and the host's disk
// reads (disk groups into the staging ring).
enum class Lane : uint8_t { Copy, Compute, DiskRead };
const char* lane_name(Lane lane);  // "copy", "compute", "disk read"

// One interval of the trace: a copy or a compute of one plan step (or activations, a peer copy).
struct TraceEvent {
  std::string name;  // the plan step's name, or "activations", "peer copy", a forward's unit
  Lane lane = Lane::Compute;
  int device = 0;          // the GPU of a copy or compute lane (disk reads: the GPU it feeds)
  uint32_t step = 0;       // the run's step (0 .. steps-1)
  int32_t plan_step = -1;  // index into Schedule::steps, -1 for activations and peer copies
  double start_us = 0;     // from the start of the run
  double dur_us = 0;
  uint64_t bytes = 0;              // copies: bytes moved
  std::string lane_label() const;  // "gpu0 copy", "gpu0 compute", "disk read"
};

// The buffer classes a backend allocates on a GPU (or, on the CPU backend, would have). Each has
// the name of the plan's reserve item it is compared with (planner::gpu_reserve).
enum class MemoryKind : uint8_t {
  ResidentArena,         // "resident_arena": the GPU's resident weights (DevicePlan::arena_bytes)
  StreamedHeldResident,  // "streamed_groups_held_resident": all-resident runs only
  DeviceSlots,           // "device_slots"
  ActivationIn,          // "activation_in": linear-only components
  ActivationOut,         // "activation_out"
  DequantScratch,        // "dequant_scratch"
  CublasWorkspace,       // "cublas_workspace"
  ForwardActivations,    // "forward_activations": the real forwards' activation peak (Ops::peak_bytes)
};
const char* memory_kind_name(MemoryKind kind);

struct MemoryItem {
  MemoryKind kind = MemoryKind::ResidentArena;
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

// What one component ran.
struct ComponentRun {
  std::string component;                           // "" for a single model
  std::string architecture;                        // the forward's ("LlamaForCausalLM"), "" for linears-only
  bool forward = false;                            // ran its real forward (else its linears only)
  std::vector<std::string> units;                  // forward units in execution order (digest names)
  std::vector<HostTensor> inputs;                  // the inputs it ran on (forwards)
  HostTensor output;                               // the output of the last run step, F32 (forwards)
  std::vector<HostTensor> more_outputs;            // its other outputs (CLIP's pooler_output)
  std::map<int, uint64_t> activation_peak_by_gpu;  // per GPU it ran units on: its ops' peak (Ops::peak_bytes)
  uint64_t activation_peak_bytes() const {         // the largest of any GPU's
    uint64_t peak = 0;
    for (const auto& [gpu, bytes] : activation_peak_by_gpu) peak = std::max(peak, bytes);
    return peak;
  }
  uint32_t passes = 0;  // forward runs per run step (a pipeline's transformer: its steps)
  // Tensors of the component the forward never asked for (every tensor must feed the forward).
  std::vector<std::string> unread_tensors;
};

struct RunResult {
  std::string backend;       // "cuda" or "cpu"
  std::string device_names;  // "NVIDIA H100 80GB HBM3"
  Mode mode = Mode::Planned;
  std::vector<std::vector<LayerDigest>> digests;  // [step][linear id] (linears-only components)
  // [step][k]: the output of forward unit k (units of every forward component, in order).
  std::vector<std::vector<LayerDigest>> unit_digests;
  std::vector<std::string> unit_names;  // "transformer/transformer_blocks.0"
  std::vector<ComponentRun> components;
  std::vector<double> step_ms;       // wall time of each step, device-measured on CUDA
  std::vector<DeviceMemory> memory;  // per GPU of the schedule
  std::vector<TraceEvent> trace;
  uint64_t h2d_bytes_per_step = 0;  // streamed bytes copied to the devices per step
  // A plan over several GPUs: the bytes of forward state handed from one unit's GPU to the next's
  // per step (the last step's), and per step the time those copies took (Platform::take_transfer_ms).
  uint64_t peer_bytes_per_step = 0;
  std::vector<double> peer_ms;
  std::vector<std::string> notes;
  // A FluxPipeline run (RunOptions::denoise_steps): its schedule, initial and final latents (the
  // last run step's).
  PipelineRun pipeline;
  // Per plan step: how many times a run step copies it (its component's passes when streamed, else 0).
  std::vector<uint32_t> copies_per_step;
  // A run by phase (RunOptions::phases), the last run step's: per phase its load time at its start,
  // the time of its passes, and per GPU the most memory held during it (Device::held_bytes).
  struct PhaseRun {
    std::string name;
    double load_ms = 0;
    double run_ms = 0;
    uint32_t passes = 0;
    uint64_t load_bytes = 0;
    std::map<int, uint64_t> peak_bytes;
  };
  std::vector<PhaseRun> phases;
  // How many times a run by phase gave its ops back at a phase's start (the activation block,
  // dequant scratch and library handles, made again for the new phase): once per change of phase,
  // never when a phase begins again right after itself.
  uint32_t ops_releases = 0;
  // The driver's set-up before its first step, wall time in ms: the devices opened (a GPU's CUDA
  // context at the first), the resident arenas filled and uploaded, the streamed groups' host
  // copies made (pinned on a GPU) and filled, and all of it with the rings.
  struct SetupTimes {
    double open_ms = 0, resident_ms = 0, host_copies_ms = 0, total_ms = 0;
  } setup;
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

// A linear's parts laid out side by side as in an arena (each at a 256-byte boundary), for copying
// them from host pointers into one buffer: offsets, the total, and the parts' pointers (null for
// absent ones).
struct PartLayout {
  PartSizes sizes;
  const uint8_t* source[kNumParts] = {};
  uint64_t offset[kNumParts] = {};
  uint64_t total = 0;
};
PartLayout part_layout(const DequantParams& params);
// `params` with its part pointers moved into a copy of the layout at `base`.
DequantParams rebase_parts(const DequantParams& params, const PartLayout& layout, const uint8_t* base);

}  // namespace qtool::runner
