// The schedule a backend executes, built from a plan (planner/plan.hpp) and its checkpoint: the
// plan's steps in execution order, the arenas their tensors live in, and the linear layers each
// step runs.
//
// Arenas: one per offload group of the plan (the image one copy moves into a device slot: the
// quantized data and all its quant state, each tensor at its 256-byte aligned arena_offset), and
// one resident arena per GPU (every tensor of that GPU's resident steps, laid out the same way).
// A step runs on one GPU from its resident arena (resident step) or from the device slot its
// group was copied into (streamed step). Every linear's tensors (weight and quant state) are in
// the arena of the step that runs it.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "qtool/formats/checkpoint.hpp"
#include "qtool/libquant/quant.hpp"
#include "qtool/planner/plan.hpp"
#include "qtool/runner/dequant.hpp"

namespace qtool::runner {

inline constexpr uint64_t kArenaAlign = planner::kArenaAlignment;

enum class Placement : uint8_t { Resident, Cpu, Disk };
const char* placement_name(Placement placement);  // "gpu", "cpu", "disk"

// One tensor inside an arena.
struct ArenaTensor {
  uint32_t component = 0;    // index into Checkpoint::components()
  Component::Entry entry{};  // the tensor in that component
  uint64_t offset = 0;       // byte offset in the arena (multiple of kArenaAlign)
  uint64_t nbytes = 0;
};

struct Arena {
  std::string name;  // "group 3 (transformer: transformer_blocks.6, transformer_blocks.7)" or "gpu0 resident"
  Placement placement = Placement::Resident;
  int device = 0;  // the GPU that holds it (resident) or receives it (cpu, disk)
  std::vector<ArenaTensor> tensors;
  uint64_t bytes = 0;          // arena size: offsets aligned, end rounded up to kArenaAlign
  uint64_t payload_bytes = 0;  // sum of tensor bytes
  // (component, tensor) -> offset, see Schedule::offset_in.
  std::unordered_map<uint64_t, uint64_t> index;
  bool streamed() const { return placement != Placement::Resident; }
};

// The parts of a linear (DequantParams pointers), as byte offsets in its arena.
enum LinearPart : int {  // (WeightRef's arrays are indexed by it too)
  kPartWeight = 0,
  kPartScale,
  kPartQuantMap,
  kPartNestedAbsmax,
  kPartNestedQuantMap,
  kNumParts
};
inline constexpr uint64_t kNoPart = UINT64_MAX;
// The runner's storage of a libquant scheme: the element functions (and CUDA kernels) that decode
// it, or Host for a scheme that has only libquant's dequantizer (dequant.cpp's table).
WeightKind weight_kind_of(quant::Scheme scheme);
// The kind of an unquantized linear weight of `dtype` (BF16, F16, F32); nullopt for another dtype.
std::optional<WeightKind> weight_kind_of(DType dtype);
// The slot of a quant part; -1 for parts no dequantizer reads (weight_format, quant_state).
int part_slot(quant::Part part);

// A tensor as a forward asks for it by name: a plain tensor (bf16, f16 or f32, viewed as [1, n]
// for 1-D, [rows, cols] for 2-D, [shape[0], rest] above), or a quantized linear's weight standing
// for every tensor of its quant state.
struct WeightRef {
  uint32_t component = 0;  // index into Checkpoint::components()
  DequantParams params;    // kind, shape and layout; pointers null (see Schedule::bind_weight)
  Component::Entry part_entry[kNumParts] = {};
  bool has_part[kNumParts] = {};
  std::vector<Component::Entry> tensors;  // every tensor it stands for (weight and quant state)
};

// `params` with its part pointers set: part k at at(k) (LinearPart order; null for none).
template <class At>
DequantParams with_parts(DequantParams params, At&& at) {
  params.weight = at(kPartWeight);
  params.scale = at(kPartScale);
  params.quant_map = at(kPartQuantMap);
  params.nested_absmax = at(kPartNestedAbsmax);
  params.nested_quant_map = at(kPartNestedQuantMap);
  return params;
}

struct LinearTask {
  uint32_t id = 0;    // position in Schedule::linears (execution order); digest index
  uint32_t step = 0;  // index into Schedule::steps
  std::string component;
  std::string module;    // "transformer_blocks.0.attn.to_q"
  std::string scheme;    // "nf4", "int8", ..., or the dtype of an unquantized weight ("bf16")
  DequantParams params;  // kind, shape and layout; pointers null (see Schedule::bind)
  uint64_t part_offset[kNumParts] = {kNoPart, kNoPart, kNoPart, kNoPart, kNoPart};
  uint64_t part_bytes[kNumParts] = {};
  std::vector<Component::Entry> part_entry = std::vector<Component::Entry>(kNumParts);
  uint32_t component_index = 0;
  uint64_t weight_bytes = 0;  // bytes of the weight and all its quant state

  uint64_t in() const { return params.cols; }
  uint64_t out() const { return params.rows; }
  uint64_t flops(uint64_t tokens) const { return 2 * tokens * params.rows * params.cols; }
  bool quantized() const {
    return params.kind != WeightKind::Bf16 && params.kind != WeightKind::F16 &&
           params.kind != WeightKind::F32;
  }
  // Needs a bf16 scratch copy of its weight before the GEMM (every kind but bf16).
  bool needs_scratch() const { return params.kind != WeightKind::Bf16; }
};

struct ExecStep {
  std::string name;                  // "transformer: transformer_blocks.0, transformer_blocks.1"
  std::vector<std::string> modules;  // the plan's units run in this step, in order
  uint32_t component = 0;
  int device = 0;
  uint32_t arena = 0;              // index into Schedule::arenas
  bool streamed = false;           // its arena is copied into a device slot before it runs
  std::vector<uint32_t> linears;   // into Schedule::linears, in execution order
  uint64_t flops_per_token = 0;    // 2 * in * out summed over its linears
  double predicted_compute_s = 0;  // the plan's prediction (at the plan's tokens)
};

struct Schedule {
  std::vector<Arena> arenas;        // the plan's groups (same indices), then one resident arena per GPU
  std::vector<ExecStep> steps;      // execution order
  std::vector<LinearTask> linears;  // execution order
  std::vector<int> devices;         // the GPUs the plan uses, ascending
  std::map<int, uint32_t> resident_arena;  // GPU -> index into arenas
  uint32_t n_slots = 2;                    // device slots per streaming GPU (the plan's prefetch)
  // Per checkpoint component: its tensors by name as a forward asks for them, and its tied
  // aliases (alias -> primary; an alias resolves to its primary's bytes).
  std::vector<std::unordered_map<std::string, WeightRef>> weights;
  std::vector<std::unordered_map<std::string, std::string>> tied;

  // The offset of `entry` of `component` in arena `arena`, or kNoPart when it is not there.
  uint64_t offset_in(uint32_t arena, uint32_t component, Component::Entry entry) const;
  // The WeightRef `name` of `component` resolves to (aliases followed), or null.
  const WeightRef* find_weight(uint32_t component, std::string_view name) const;
  // Its DequantParams bound into a copy of arena `arena` at `base`; null weight when the arena
  // lacks a part (a weight and its quant state always travel together, see build_schedule).
  DequantParams bind_weight(const WeightRef& weight, uint32_t arena, const uint8_t* base) const;

  // The DequantParams of `linear` with its pointers set into a copy of its arena at `base`.
  DequantParams bind(const LinearTask& linear, const uint8_t* base) const;
  // The same, pointing into the mapped checkpoint (the reference path).
  DequantParams bind_mapped(const LinearTask& linear, const Checkpoint& checkpoint) const;

  // Per GPU: the largest arena streamed to it (one slot), its largest input and output widths,
  // and whether it runs anything.
  uint64_t slot_bytes(int device) const;
  uint64_t max_in(int device) const;
  uint64_t max_out(int device) const;
  size_t n_linears(int device) const;
  uint64_t streamed_bytes() const;      // bytes copied host-to-device in one step (all GPUs)
  bool arena_used(size_t arena) const;  // resident, or streamed by some step
  uint64_t max_staging_bytes() const;   // the largest disk arena
};

// Builds the schedule. Error(InvalidInput) naming the plan item and the tensor for: a tensor the
// checkpoint lacks or whose size differs from the plan's, a step naming a tensor that is in
// neither its group nor resident, a linear whose quant state is not in the arena of its weight,
// and a checkpoint tensor the plan places nowhere (tied aliases excepted).
Schedule build_schedule(const Checkpoint& checkpoint, const planner::Plan& plan);

// The DequantParams of a quantized linear of `component`, pointing into its mapped tensors.
DequantParams quantized_params(const quant::QuantizedLinear& linear, const Component& component);

// Fills arena `arena` (arena.bytes bytes at `dst`) from the mapped checkpoint; gaps are zeroed.
void fill_arena(const Checkpoint& checkpoint, const Arena& arena, uint8_t* dst);

}  // namespace qtool::runner
