// The plan: where every module of a checkpoint lives and how offloaded weights are streamed, as
// `qtool plan` writes it and the runner executes it. The file is versioned JSON
// ("format": "qtool-plan", "version": kPlanVersion); plan_from_json() rejects other versions.
//
// What the runner does with a plan (the contract this header fixes):
// - `schedule` is the execution order of one step. Each ScheduleStep runs on GPU `gpu`: either a
//   resident unit (group == -1; its tensors were loaded once into that GPU's resident arena) or
//   an offloaded group (group >= 0) that must be in one of that GPU's device slots when the step
//   runs. The runner copies offloaded groups in the order their steps appear (a copy stream,
//   `prefetch` slots ahead), then runs the step's linear layers in the listed tensor order.
//   A group normally appears in one step; a tied weight's second user (a tied lm_head of an
//   offloaded embedding) names the same group again, and it is copied again.
// - Offloaded group g lives in one contiguous pinned host arena (target "cpu") or is read from
//   the checkpoint files through a pinned staging ring (target "disk"). Its tensors sit at
//   `arena_offset` (each 256-byte aligned, see layout_arena); the slot receives the arena image.
// - The resident weights of one GPU are one arena: layout_arena() over the tensors of that GPU's
//   resident steps in schedule order, one allocation rounded up to the profile's granularity
//   (DevicePlan::arena_bytes).
// - Memory per GPU: the `reserve` items (gpu_reserve()) plus the resident arena. `predicted_peak`
//   is their sum; `qtool verify` compares its measured peak to it.
// - Sizes are bytes, times seconds, rates as in DeviceProfile.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "qtool/planner/device_profile.hpp"

namespace qtool::planner {

// 2: components name the forward the runner executes ("forward"); a GPU running a forward reserves
// its activation items ("activations: ...") instead of activation_in/out for it.
// 3: a pipeline planned by phase ("phases", "denoise_steps", "predicted_job_s", "job_load_s"; see
// PhasePlan). A plan without phases is still written as version 2 (byte for byte as before), and
// both versions are read.
inline constexpr int kPlanVersion = 3;
inline constexpr int kPlanVersionNoPhases = 2;
// The reserve items of the forwards' activations are named "activations: <item>".
inline constexpr std::string_view kForwardActivationPrefix = "activations: ";
inline constexpr std::string_view kPlanFormat = "qtool-plan";
inline constexpr uint64_t kArenaAlignment = 256;  // every tensor in an arena or slot starts here

// Where a module lives: a GPU (resident), or offloaded to pinned host memory or to disk.
// In JSON: the GPU index as an integer, "cpu" or "disk" (accelerate's device_map values).
struct Location {
  enum class Kind : uint8_t { Gpu, Cpu, Disk };
  Kind kind = Kind::Gpu;
  int32_t gpu = 0;  // Gpu only

  static Location on_gpu(int32_t index) { return {Kind::Gpu, index}; }
  static Location cpu() { return {Kind::Cpu, -1}; }
  static Location disk() { return {Kind::Disk, -1}; }
  bool is_gpu() const { return kind == Kind::Gpu; }
  bool operator==(const Location&) const = default;
  std::string str() const;  // "0", "cpu", "disk"
};
nlohmann::json location_to_json(const Location& loc);
Location location_from_json(const nlohmann::json& j, std::string_view where);

// One named part of a device's memory that is not a resident weight.
struct ReserveItem {
  std::string name;    // "cuda_context", "cublas_workspace", "activation_in", "activation_out",
                       // "dequant_scratch", "device_slots"; host: "pinned_arenas", "disk_staging"
  uint64_t bytes = 0;  // as allocated (rounded up to the allocation granularity)
  std::string detail;  // how it was sized, e.g. "tokens 4096 x in 12288 x bf16"
};

// Inputs of the per-GPU reserve model, for the work one GPU executes.
struct GpuWork {
  uint64_t tokens = 0;             // activation rows per linear
  uint64_t max_in = 0;             // largest input features of a linear run on this GPU
  uint64_t max_out = 0;            // largest output features of a linear run on this GPU
  uint64_t max_dequant_numel = 0;  // largest linear whose weight is not bf16 (quantized, f16, f32)
  uint32_t n_slots = 0;            // device slots (0: this GPU streams nothing)
  uint64_t slot_bytes = 0;         // one slot: the largest group arena streamed to this GPU
  uint64_t pinned_host_bytes = 0;  // pinned host memory of the whole plan (arenas + staging ring)
  bool used = false;               // anything runs on this GPU (else the reserve is empty)
  // The activation items of the largest real forward run on this GPU (planner::activation_items
  // at the plan's tokens); max_in and max_out then cover only the linears-only components.
  std::vector<ReserveItem> forward_activations;
};

// The reserve the runner really allocates on one GPU, item by item, each allocation rounded up to
// profile.alloc_granularity_bytes:
//   cuda_context      = profile.context_bytes (not an allocation: context, handles, kernels)
//   cublas_workspace  = profile.cublas_workspace_bytes
//   activation_in     = tokens * max_in  * 2   (bf16 [tokens, in]; linears-only components)
//   activation_out    = tokens * max_out * 2   (bf16 [tokens, out])
//   activations: ITEM = each of forward_activations, as activation_items sized it (not rounded one
//                       by one: the runner holds them in one stack), then "activations: rounding"
//                       up to the granularity, with 64 KiB for the 256-byte start of each buffer
//   dequant_scratch   = max_dequant_numel * 2  (bf16 [out, in] of the largest non-bf16 linear)
//   device_slots      = n_slots * slot_bytes   (one allocation holding the ring)
//   pinned_page_tables = ceil(pinned_host_bytes / GiB) * profile.pinned_page_table_bytes_per_gib
//                        (not an allocation: the GPU's mapping of the pinned host memory)
// An unused GPU reserves nothing; items of 0 bytes are left out.
std::vector<ReserveItem> gpu_reserve(const DeviceProfile& profile, const GpuWork& work);
// The pinned_page_tables item for `pinned_host_bytes` of pinned host memory (0 for none).
uint64_t pinned_page_table_bytes(const DeviceProfile& profile, uint64_t pinned_host_bytes);
uint64_t round_up(uint64_t bytes, uint64_t granularity);
uint64_t sum_bytes(std::span<const ReserveItem> items);

// Offsets of tensors of the given sizes laid out back to back, each at a multiple of
// kArenaAlignment. `total` is the arena size (a multiple of kArenaAlignment).
struct ArenaLayout {
  std::vector<uint64_t> offsets;
  uint64_t total = 0;
};
ArenaLayout layout_arena(std::span<const uint64_t> sizes);

struct GroupTensor {
  std::string name;  // tensor name within the component
  uint64_t nbytes = 0;
  uint64_t arena_offset = 0;  // within the group's arena / slot
};

// Consecutive offloaded units (blocks, or single layers in leaf mode) moved by one copy.
struct OffloadGroup {
  uint32_t id = 0;                    // index in Plan::groups (= order of first use)
  uint32_t component = 0;             // index in Plan::components
  std::vector<std::string> modules;   // module prefixes, in execution order
  std::vector<GroupTensor> tensors;   // in arena order (= execution order of its modules)
  uint64_t bytes = 0;                 // sum of tensor bytes
  uint64_t arena_bytes = 0;           // layout_arena(...).total: what one slot must hold
  Location target = Location::cpu();  // cpu or disk
  int32_t gpu = 0;                    // the GPU whose slots receive it
  double copy_s = 0;                  // predicted copy time (host or disk to device)
};

// One linear layer the runner executes: y[tokens, out] = x[tokens, in] * W^T, W dequantized (or
// converted) to bf16 first unless it is bf16 already. Embeddings, norms, convolutions and biases
// are placed and moved but not executed.
struct LinearOp {
  std::string module;  // "transformer_blocks.0.attn.to_q"; a tied head: "lm_head"
  std::string weight;  // tensor holding W ("<module>.weight"; a tied head: the embedding's weight)
  int64_t out = 0;     // W is [out, in] (before quantization)
  int64_t in = 0;
  std::string kind;  // "bf16", "f16", "f32", or the scheme: "int8", "fp8_e4m3", "fp8_e5m2", "nf4", "fp4"
};

struct ScheduleStep {
  uint32_t component = 0;            // index in Plan::components
  std::vector<std::string> modules;  // units run in this step, in order
  int32_t gpu = 0;                   // the GPU that runs it
  int32_t group = -1;                // -1: resident; else the OffloadGroup streamed for it
  std::vector<std::string> tensors;  // the step's tensors in execution order (tied copies left out)
  std::vector<LinearOp> linears;     // the layers it runs, in order
  uint64_t flops = 0;                // 2 * tokens * in * out summed over its linears
  double compute_s = 0;              // predicted: GEMMs + dequant + launches
};

// Per device: GPUs first (by index), then "cpu", then "disk".
struct DevicePlan {
  std::string device;                // "cuda:0", "cpu", "disk"
  Location location;                 // on_gpu(i), cpu(), disk()
  uint64_t budget = 0;               // bytes this device may use (UINT64_MAX: unlimited disk)
  std::string budget_source;         // "--max-memory", "cudaMemGetInfo free", "/proc/meminfo MemAvailable"
  uint64_t weights_bytes = 0;        // exact tensor bytes placed here (resident or offloaded)
  uint64_t arena_bytes = 0;          // as laid out and rounded (GPU: resident arena; cpu: pinned arenas)
  std::vector<ReserveItem> reserve;  // GPU: gpu_reserve(); cpu: disk_staging; disk: none
  uint32_t n_slots = 0;              // GPU: device slots in its ring
  uint64_t slot_bytes = 0;           // GPU: bytes per slot
  uint64_t predicted_peak = 0;       // arena_bytes + sum(reserve)
};

// One entry of a component's accelerate-compatible device_map.
struct DeviceMapEntry {
  std::string prefix;  // module prefix ("" = the whole component), or a tensor name
  Location location;
  std::string reason;  // empty for GPUs; why it is not kept on a GPU otherwise
  uint64_t bytes = 0;  // exact bytes under this key (tied copies counted once)
};

struct TiedAlias {
  std::string alias;    // e.g. "lm_head.weight" (may be absent from the checkpoint)
  std::string primary;  // e.g. "model.embed_tokens.weight": the alias uses its memory
};

struct ComponentPlan {
  std::string name;           // "" for a single model
  std::string class_name;     // config's architectures[0] / _class_name, if any
  std::string template_name;  // model template used for the order ("" = heuristic)
  // The prefix the loader strips from every checkpoint name of this component (the template's
  // checkpoint_prefix, "" = none). Device map prefixes here are checkpoint names; the plan file
  // keys device_map, offload_reasons and module_bytes by the loader's module names (the prefix and
  // its dot removed, the prefix itself becoming "") and says "checkpoint_prefix".
  std::string checkpoint_prefix;
  std::string
      forward;  // architecture of the real forward the runner executes (planner::arch_of); "" = linears only
  uint64_t bytes = 0;  // exact bytes, tied copies counted once
  // In execution order; keys never overlap. JSON: "device_map" {prefix: location} (what
  // accelerate's dispatch_model takes), "offload_reasons" {prefix: reason} for keys not on a GPU,
  // "module_bytes" {prefix: bytes}.
  std::vector<DeviceMapEntry> device_map;
  std::vector<TiedAlias> tied;
  double step_s = 0;  // predicted time of this component's steps
};

// Bounds on the settings a user gives (command line) or a plan file holds; beyond them: exit 2
// naming the option or key.
inline constexpr uint64_t kMaxTokens = uint64_t{1} << 24;          // activation rows per linear
inline constexpr uint32_t kMaxPrefetch = 16;                       // device slots per streaming GPU
inline constexpr uint32_t kMaxBlocksPerGroup = uint32_t{1} << 16;  // blocks per offload group
// Denoising steps of a pipeline planned by phase (`--denoise-steps`; a phase whose template says
// "repeat": "denoise_steps"); the runner's limits are the same.
inline constexpr uint32_t kDefaultDenoiseSteps = 28;
inline constexpr uint32_t kMaxDenoiseSteps = 1000;

struct PlanSettings {
  std::string strategy;      // "sequential", "balanced", "balanced_low_0" ("auto" resolved)
  std::string offload_mode;  // "block" or "leaf" (resolved from "auto"), "none" when nothing is offloaded
  uint32_t blocks_per_group = 0;  // block mode: units per group
  uint32_t prefetch = 0;          // device slots per streaming GPU
  uint64_t tokens = 0;
  std::string profile_name;
  std::string budget_note;  // where the budget came from
};

// How a pipeline component's weights reach the GPU in a phased plan (Plan::phases):
//   Resident  loaded once at the job's start, kept on the GPUs for every phase (its arena is part
//             of every phase's peak);
//   Loaded    loaded whole at its phase's start and released after it (diffusers'
//             enable_model_cpu_offload);
//   Streamed  its resident units loaded at its phase's start and released after, its offloaded
//             groups streamed through device slots within the phase, every run (group offload).
enum class PhaseMode : uint8_t { Resident, Loaded, Streamed };
std::string_view phase_mode_name(PhaseMode mode);  // "resident", "loaded", "streamed"
PhaseMode parse_phase_mode(std::string_view text, std::string_view where);

struct PhaseComponent {
  uint32_t component = 0;  // index in Plan::components (JSON: its name)
  PhaseMode mode = PhaseMode::Loaded;
  std::string reason;        // why this mode, in one sentence
  uint64_t load_bytes = 0;   // weights copied to the GPUs when it is loaded (not its streamed groups)
  bool load_pinned = false;  // its host copy is pinned (h2d_pinned_gbps), else pageable (h2d_pageable_gbps)
  double load_s = 0;         // predicted: load_bytes / bandwidth + copy latency (0 when nothing loads)
};

// One GPU's memory during a phase: the arena of the job's resident components (every phase holds
// it), the arena of the phase's own loaded components and streamed components' resident units,
// and the phase's reserve (gpu_reserve for the work of the phase; pinned_page_tables for the
// whole job's pinned host memory).
struct PhaseDevice {
  Location location;            // a GPU
  uint64_t resident_bytes = 0;  // arena of the job-resident components on this GPU (rounded)
  uint64_t arena_bytes = 0;     // arena of this phase's loaded/streamed-resident weights (rounded)
  std::vector<ReserveItem> reserve;
  uint32_t n_slots = 0;
  uint64_t slot_bytes = 0;
  uint64_t predicted_peak = 0;  // resident_bytes + arena_bytes + sum(reserve)
};

// A phase of a pipeline job (the pipeline template's `phases`): its components run in turn, the
// phase's schedule [schedule_begin, schedule_end) `repeat` times (the denoising steps), then the
// next phase starts. Groups of its components are streamed only during it.
struct PhasePlan {
  std::string name;
  std::string note;  // from the template (e.g. what of the phase is not executed)
  uint32_t repeat = 1;
  std::vector<PhaseComponent> components;
  uint32_t schedule_begin = 0, schedule_end = 0;  // its steps in Plan::schedule
  std::string offload_mode = "none";              // "none", "block", "leaf" for this phase
  uint32_t blocks_per_group = 0;
  uint32_t prefetch = 0;
  std::vector<PhaseDevice> devices;  // every GPU of the budget, by index
  double load_s = 0;                 // loads at its start (its loaded and streamed components)
  double step_s = 0;                 // one run of its schedule (simulated: copies overlapped)
  double transfer_s = 0, compute_s = 0;
  double time_s = 0;  // load_s + repeat * step_s
};

struct Plan {
  std::string checkpoint;   // path as given
  std::string fingerprint;  // Checkpoint::fingerprint()
  std::string qtool_version;
  PlanSettings settings;
  DeviceProfile profile;
  std::vector<ComponentPlan> components;
  std::vector<DevicePlan> devices;
  std::vector<OffloadGroup> groups;
  std::vector<ScheduleStep> schedule;
  double predicted_step_s = 0;     // simulated: copies overlapped with compute through the slots
  double transfer_s = 0;           // sum of group copy times
  double compute_s = 0;            // sum of step compute times
  std::vector<std::string> notes;  // human remarks (assumptions, budget source)
  // A pipeline planned by phase (empty otherwise). Then `devices` holds per GPU the phase with the
  // largest peak (n_slots and slot_bytes: the largest of any phase), `predicted_step_s`,
  // `transfer_s` and `compute_s` one run of every phase's schedule, and the whole job's time is
  // predicted_job_s = job_load_s (resident components, at the start) + every phase's time_s.
  std::vector<PhasePlan> phases;
  uint32_t denoise_steps = 0;
  double job_load_s = 0;
  double predicted_job_s = 0;

  const DevicePlan* find_device(const Location& loc) const;
  uint64_t gpu_bytes() const;        // weights resident on GPUs
  uint64_t offloaded_bytes() const;  // weights on cpu or disk
};

nlohmann::json plan_to_json(const Plan& plan);
// Validates structure and version; Error(InvalidInput) naming `label` and the key.
Plan plan_from_json(const nlohmann::json& j, std::string_view label);
void write_plan(const std::filesystem::path& path, const Plan& plan);  // atomic (tmp + rename)
Plan read_plan(const std::filesystem::path& path);

}  // namespace qtool::planner
