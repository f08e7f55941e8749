// The planner's internal model (planner.cpp, units.cpp, groups.cpp, place.cpp, search.cpp,
// assemble.cpp): execution units, candidates, groups, steps and the outcome of placing a candidate.
#pragma once

#include <limits>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "planner_internal.hpp"
#include "qtool/planner/planner.hpp"

namespace qtool::planner {

// The planner's kind string of an unquantized weight dtype ("bf16", "f16", "f32"; "" otherwise).
std::string dtype_kind(DType dt);
// 2 * tokens * out * in, checked: tokens and shapes come from the command line and the files.
uint64_t linear_flops(uint64_t tokens, const LinearOp& op);

namespace detail {

struct Leaf {
  std::string prefix;
  std::vector<uint32_t> tensors;  // component tensor indices, tied copies excluded
  uint64_t bytes = 0;
  uint64_t arena = 0;
  double compute_s = 0;   // its linear, if it runs one
  uint64_t first_in = 0;  // that linear's input features (0: none)
};

struct UnitInfo {
  uint32_t comp = 0;
  int32_t node = -1;
  std::string prefix;
  bool is_block = false;
  std::vector<uint32_t> tensors;  // every tensor, execution order (tied copies included)
  uint64_t bytes = 0;             // counted bytes
  uint64_t arena = 0;             // layout_arena of the tensors it holds
  std::vector<Leaf> leaves;       // modules holding tensors, in order
  std::vector<LinearOp> linears;
  uint64_t flops = 0;
  double compute_s = 0;
  uint64_t max_in = 0, max_out = 0, max_dq = 0;
  int32_t follow = -1;  // a pure tied alias: takes this unit's place
};

struct CompData {
  std::string name;
  std::string class_name;
  const ModelTemplate* tmpl = nullptr;
  ModuleTree tree;
  std::vector<uint32_t> units;       // global unit ids in execution order
  std::vector<int32_t> tensor_unit;  // per tensor: global unit id
  uint64_t bytes = 0;
  std::optional<Arch> arch;              // a real forward runs (else linears only)
  uint64_t tokens = 0;                   // its forward's tokens (--tokens, or a FluxPipeline encoder's)
  std::vector<ReserveItem> activations;  // its activation items at the plan's tokens
  uint64_t activation_bytes = 0;
  double forward_ops_s_per_block = 0;  // its attention and memory-bound ops, shared by its blocks
  uint64_t handover_bytes = 0;         // its forward's state crossing to another GPU (handover_bytes)
};

// A module a group or step holds: a whole unit, or one leaf of it (leaf mode).
struct DraftModule {
  const UnitInfo* unit = nullptr;
  const Leaf* leaf = nullptr;
  const std::string& prefix() const { return leaf ? leaf->prefix : unit->prefix; }
};

struct Candidate {
  OffloadMode mode = OffloadMode::Block;  // Block or Leaf; meaningless when m == 0
  uint32_t n = 1;                         // units per group (block mode)
  uint32_t k = 0;                         // slots per streaming GPU
  // -1: each GPU streams the offloaded units that fall in its part of the order; p >= 0: only GPU
  // position p streams (holds slots) and runs every offloaded unit, the others hold no slots.
  int32_t stream = -1;
};

struct GroupDraft {
  std::vector<uint32_t> units;  // block mode: the units; leaf mode: the one unit
  int32_t leaf = -1;            // leaf mode: index into units_[units[0]].leaves
  int32_t exec = 0;             // GPU position
  uint64_t arena = 0;
  uint64_t bytes = 0;
  Location target = Location::cpu();
};

struct StepDraft {
  std::vector<uint32_t> units;
  int32_t leaf = -1;  // leaf-mode group step: the one leaf run
  int32_t group = -1;
  int32_t exec = 0;
};

struct Outcome {
  bool ok = false;
  size_t m = 0;
  Candidate cand;
  std::vector<int32_t> gpu_of;   // per unit: GPU position, -1 offloaded
  std::vector<int32_t> exec_of;  // per unit: GPU position that runs it
  std::vector<GroupDraft> groups;
  std::vector<int32_t> unit_group;  // per unit: first group holding it (-1 resident)
  std::vector<StepDraft> steps;
  std::vector<GpuWork> work;  // per GPU position
  uint64_t host_pinned = 0, host_staging = 0, host_needed = 0;
  bool host_ok = true;
  double step_s = std::numeric_limits<double>::infinity();
  double transfer_s = 0, compute_s = 0;
  uint64_t offloaded = 0;
  uint64_t peak_sum = 0;
};

class Planner {
 public:
  Planner(const PipelineInput& in, const PlanOptions& opt) : in_(in), opt_(opt) {}
  Plan run();

 private:
  void build_units();
  void build_component(uint32_t ci);
  void offload_preference();
  void set_forward(CompData& cd, const ComponentInput& input) const;
  void unit_work(UnitInfo& u, const CompData& cd,
                 const std::unordered_map<std::string, const QuantizedShape*>& quantized) const;
  std::vector<uint8_t> offload_set(size_t m, uint32_t n) const;
  // full == false: only whether it fits (partition, groups, host budget), for the searches.
  Outcome place(const Candidate& c, size_t m, bool full = true) const;
  uint64_t slot_estimate(const Candidate& c, const std::vector<uint8_t>& off) const;
  bool assign_exec(Outcome& o, const Candidate& c, const std::vector<uint32_t>& seq,
                   uint64_t stream_bytes) const;
  void host_bundles(const Outcome& o, std::vector<uint64_t>& pinned, std::vector<uint64_t>& largest) const;
  bool reserve_fits(Outcome& o) const;
  void make_groups(Outcome& o) const;
  void make_steps(Outcome& o) const;
  void assign_targets(Outcome& o) const;
  size_t decide_targets(Outcome& o, const std::vector<uint64_t>& bundle_pinned,
                        const std::vector<uint64_t>& bundle_max) const;
  void simulate(Outcome& o) const;
  GpuWork base_work() const;
  uint64_t page_tables_bound() const;
  struct SearchResult {
    Outcome best;
    bool host_short = false;  // some plan fit the GPUs but not the cpu budget
    uint64_t host_needed = kUnlimited;
  };
  SearchResult search() const;
  [[noreturn]] void infeasible_gpu();
  [[noreturn]] void infeasible_host(uint64_t needed) const;
  Plan assemble(const Outcome& o) const;
  ComponentPlan component_plan(size_t ci, const Outcome& o, std::vector<std::string>& notes) const;
  std::vector<DeviceMapEntry> device_map(const CompData& cd, const Outcome& o) const;
  std::vector<DraftModule> draft_modules(const std::vector<uint32_t>& units, int32_t leaf) const;
  OffloadGroup group_plan(size_t g, const Outcome& o) const;
  ScheduleStep schedule_step(const StepDraft& s) const;
  void order_components(Plan& plan) const;
  void device_plans(const Outcome& o, Plan& plan) const;
  void plan_notes(Plan& plan) const;
  std::string unit_reason(const Outcome& o, uint32_t u) const;

  const PipelineInput& in_;
  const PlanOptions& opt_;
  std::vector<CompData> comps_;        // in input order
  std::vector<uint32_t> comp_order_;   // execution order of components
  std::vector<UnitInfo> units_;        // global execution order
  std::vector<uint64_t> arena_;        // per unit
  std::vector<uint64_t> leaf_pinned_;  // per unit: its leaves' arenas, each rounded to host pages
  std::vector<uint64_t> leaf_max_;     // per unit: its largest leaf arena
  std::vector<int32_t> gpu_index_;     // per position: the GPU's index
  std::vector<uint64_t> gpu_budget_;   // per position
  std::vector<std::string> gpu_source_;
  std::vector<uint64_t> fixed_;  // per position: reserve without slots, global maxima
  uint64_t host_budget_ = kUnlimited;
  std::string host_source_;
  uint64_t page_tables_bound_ = 0;  // pinned page tables for the most host memory a plan can pin
  const ModelTemplate* pipeline_tmpl_ = nullptr;
  // Offload preference: blocks per component (in offload priority), then other units.
  std::vector<std::vector<uint32_t>> offload_blocks_;
  std::vector<uint32_t> offload_others_;
  size_t n_offloadable_ = 0;
  uint64_t total_bytes_ = 0;
};

}  // namespace detail
}  // namespace qtool::planner
