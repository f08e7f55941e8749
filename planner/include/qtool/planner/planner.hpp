// Planning: from a checkpoint (or its description), a memory budget and a device profile to a
// Plan (plan.hpp).
//
// Placement. The units of every component (blocks, never split, and the modules outside blocks)
// are put in execution order: components in pipeline order, units by the model template
// (templates.hpp). Resident units are placed on the GPUs by an optimal contiguous partition of
// that order for the strategy (accelerate's meanings):
//   sequential      fill GPU 0, then GPU 1, ...: each GPU takes the longest prefix that fits;
//   balanced        minimise the largest GPU load (binary search on the load, greedy check);
//   balanced_low_0  GPU 0 takes only the shortest prefix the other GPUs cannot hold, and the
//                   rest is balanced over GPUs 1..n-1 (GPU 0 stays light for generation);
//   auto            balanced with several GPUs, sequential with one.
// When a partition leaves units over because a unit did not fit the space a GPU had left, those
// units revisit earlier GPUs with room (first fit) before anything is offloaded: a device skipped
// is not lost. Each GPU's reserve (plan.hpp gpu_reserve) is charged only for what it runs: the
// device slots exist only where groups are streamed, so nothing is held back when everything fits.
//
// Offload. When the GPUs cannot hold every unit, blocks are offloaded, components in the
// pipeline template's offload_priority, spread evenly along each component's blocks (so copies
// overlap the compute of the resident blocks between them), then non-block units, largest first.
// The fewest offloaded units that make the GPUs fit are found by binary search. Offloaded units
// form groups: `block` mode, runs of up to N consecutive offloaded units; `leaf` mode, one group
// per module with tensors (a linear with its quant state, a norm). A streaming GPU holds a ring of
// K slots of its largest group. Unless given, the mode, N and K are chosen by simulating one step
// for each candidate and keeping the fastest (ties: fewer offloaded bytes, less memory). Groups
// go to pinned host memory ("cpu") in execution order while the cpu budget lasts, then to "disk"
// (read from the checkpoint through a pinned staging ring of K buffers).
//
// Cost model: copy = bytes / h2d_pinned (disk: + bytes / disk_read) + copy latency; compute per
// linear = 2 * rows * in * out / bf16 rate + dequant (numel / scheme rate) + kernel launches, where
// rows = tokens, or for a component with a real forward the rows that linear really runs on
// (linear_rows: Flux's modulation linears one per sample, its text-stream linears the text tokens,
// its single blocks both streams); such a component's blocks add their attention FLOPs
// (forward_flops(...).attention shared equally among its blocks) at the bf16 rate;
// step time = a simulation of the copy stream (slots freed as steps finish) and the compute
// stream (a step waits for its group's copy and the previous step, plus a peer copy when the GPU
// changes inside a component: its forward's state, handover_bytes, or a linears-only component's
// input).
//
// Infeasible budgets throw Error(InvalidInput) with the shortfall in bytes and the smallest
// budget that would fit.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "qtool/formats/checkpoint.hpp"
#include "qtool/planner/arch.hpp"
#include "qtool/planner/device_profile.hpp"
#include "qtool/planner/module_tree.hpp"
#include "qtool/planner/plan.hpp"
#include "qtool/planner/templates.hpp"

namespace qtool::planner {

enum class Strategy : uint8_t { Sequential, Balanced, BalancedLow0, Auto };
enum class OffloadMode : uint8_t { Auto, Block, Leaf };

// "sequential", "balanced", "balanced_low_0", "auto"; Error(Usage) naming --device-map otherwise.
Strategy parse_strategy(std::string_view text);
std::string_view strategy_name(Strategy s);
// "auto", "block", "leaf"; Error(Usage) naming --offload otherwise.
OffloadMode parse_offload_mode(std::string_view text);

inline constexpr uint64_t kUnlimited = UINT64_MAX;

// A memory budget per device.
struct Budget {
  std::map<int32_t, uint64_t> gpus;            // GPU index -> bytes
  std::optional<uint64_t> cpu;                 // pinned host memory for offloaded groups; nullopt: none given
  std::map<int32_t, std::string> gpu_sources;  // where each GPU's number came from
  std::string cpu_source;
  std::string note;  // one line saying where the budget came from
};

// --max-memory: "0=20GiB,1=20GiB,cpu=64GiB", accelerate's JSON dict ({"0": "20GiB", 1: 20e9,
// "cpu": "64GiB"}, keys as strings or ints, values as sizes or byte counts), or a file holding
// either. Error(Usage) naming --max-memory, the key and the value otherwise.
Budget parse_max_memory(std::string_view text);
// The machine's budget: every GPU's free memory (cudaMemGetInfo; only when built with CUDA and a
// device is present) and MemAvailable from /proc/meminfo for cpu.
Budget machine_budget();
// MemAvailable from /proc/meminfo (0 when unreadable).
uint64_t host_available_memory();

// A linear layer whose weight is quantized: its original shape and scheme (the checkpoint holds
// the packed weight and its quant state).
struct QuantizedShape {
  std::string module;
  int64_t out = 0;
  int64_t in = 0;
  std::string kind;  // "int8", "fp8_e4m3", "fp8_e5m2", "nf4", "fp4"
};

// One component as the planner needs it: headers only.
struct ComponentInput {
  std::string name;                      // "" for a single model
  std::optional<nlohmann::json> config;  // config.json
  std::vector<TensorDesc> tensors;
  std::vector<QuantizedShape> quantized;  // quantized linears (find_quantized_linears)
  // The architecture whose real forward the runner executes (arch_of), if any: its activation
  // items are reserved and its FLOPs predicted instead of the linears-only model's.
  std::optional<Arch> arch;
  DType activation_dtype = DType::BF16;  // its forward's (model_dtype)
};

struct PipelineInput {
  std::string path;  // for the plan file
  std::string fingerprint;
  std::optional<nlohmann::json> model_index;  // pipelines
  std::vector<ComponentInput> components;     // in model_index order
};

// From an opened checkpoint: tensor headers and, for quantized linears, their shapes from the
// quant state (libquant).
PipelineInput plan_input_of(const Checkpoint& checkpoint);

struct PlanOptions {
  Strategy strategy = Strategy::Auto;
  Budget budget;
  uint64_t tokens = 4096;  // activation rows per linear
  OffloadMode offload = OffloadMode::Auto;
  std::optional<uint32_t> blocks_per_group;  // block mode N
  std::optional<uint32_t> prefetch;          // slots K per streaming GPU
  DeviceProfile profile;
  const TemplateLibrary* templates = nullptr;  // null: heuristic order only
  std::string qtool_version;
  uint32_t denoise_steps = kDefaultDenoiseSteps;  // pipelines planned by phase; 1..kMaxDenoiseSteps
  bool by_phase = true;  // false (`--no-phases`): a pipeline with phases is planned as one sequence
  // false: an infeasible budget throws at once, without searching for the smallest budget that
  // fits (the phased planner's trial plans).
  bool explain_infeasible = true;
  // Added to the GPU budgets an infeasible-budget error reports: the phased planner plans each
  // phase on what the job's other needs leave of the budget the user gave.
  uint64_t reported_budget_offset = 0;
};

// The rows (tokens) linear `module` of a component of architecture `arch` runs on in one forward
// at the plan's `tokens` (batch 1); summed over the linears, 2 * rows * in * out gives
// forward_flops(arch, 1, tokens).linear.
uint64_t linear_rows(const Arch& arch, std::string_view module, uint64_t tokens);

// A pipeline whose template (options.templates) has `phases` is planned by phase
// (make_phased_plan) unless options.by_phase is false; everything else as one sequence.
Plan make_plan(const PipelineInput& input, const PlanOptions& options);
// Planning by phase. Each phase's components are planned alone (the sequence planner above) on
// the budget left by the components resident for the whole job; a component is
//   resident  when keeping it on the GPUs slows no other phase (tried by the phase's repeat
//             count, then size: the denoiser first), and the plans of all phases still fit;
//   streamed  when its phase does not fit with all of it on the GPUs (group offload);
//   loaded    otherwise: at its phase's start, released after it.
// Loads copy at h2d_pinned_gbps when the cpu budget left after the streamed groups holds the
// component's host copy (in phase order), else at h2d_pageable_gbps. Predicted job time =
// resident loads + per phase (its loads + repeat x its simulated step). Host memory goes to the
// streamed groups of the phases with the largest repeat first. Error(InvalidInput) naming the
// phase when one does not fit even alone; Error(Usage) for denoise_steps out of range.
Plan make_phased_plan(const PipelineInput& input, const PlanOptions& options, const ModelTemplate& pipeline);
Plan make_plan(const Checkpoint& checkpoint, const PlanOptions& options);

// Checks a plan against its own invariants and budget (used by tests and by `plan` before
// writing): every tensor of `input` covered by exactly one device_map key of its component;
// no block split across locations; each device's predicted peak within its budget; groups and
// schedule consistent. Returns the problems found (empty: valid).
std::vector<std::string> check_plan(const Plan& plan, const PipelineInput& input);
// The phases' part of check_plan (every component in one phase, the phases' steps in order and of
// their components, streamed iff it has groups, each phase's peak the sum of its parts and within
// the budget, the times adding up); each problem starts "phase 'NAME': " when it is one phase's.
std::vector<std::string> check_plan_phases(const Plan& plan);

// A readable table (devices, reserve, groups, offloaded modules; for a phased plan the phases,
// each component's mode and why, per phase and GPU the memory, the job's time) for stderr.
std::string plan_table(const Plan& plan);
// An SVG drawing each device's memory as a bar of its modules, reserve items and slots; for a
// phased plan one bar per phase and GPU (resident / loaded at phase start / streamed slots /
// reserve / free) with a legend.
std::string plan_svg(const Plan& plan);

}  // namespace qtool::planner
