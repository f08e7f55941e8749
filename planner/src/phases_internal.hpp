// The phased planner (phases.cpp, phases_merge.cpp): a pipeline planned phase by phase.
#pragma once

#include <functional>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

#include "planner_impl.hpp"
#include "qtool/planner/planner.hpp"

namespace qtool::planner::detail {

using GpuBytes = std::map<int32_t, uint64_t>;  // per GPU index

struct PhaseSpec {
  std::string name;
  std::string note;
  uint32_t repeat = 1;
  std::vector<size_t> comps;  // indices into PipelineInput::components, in phase order
};

// The chosen resident set and each phase's final plan.
struct PhaseChoice {
  std::vector<size_t> resident;       // in the order accepted
  std::map<size_t, GpuBytes> placed;  // per resident component: its arena per GPU
  std::vector<Plan> plans;            // per phase
};

class PhasedPlanner {
 public:
  PhasedPlanner(const PipelineInput& in, const PlanOptions& opt, const ModelTemplate& t);
  Plan run();

 private:
  size_t comp_index(const Plan& sub, uint32_t sub_comp) const;
  GpuBytes arenas(const Plan& sub, const std::function<bool(size_t)>& pick) const;
  uint64_t resident_weights(const Plan& sub, size_t c) const;
  bool streams(const Plan& sub, size_t c) const;
  std::optional<Plan> plan_phase(size_t p, const std::set<size_t>& resident,
                                 const std::map<size_t, GpuBytes>& placed, uint64_t host, bool explain) const;
  double trial_time(size_t p, const Plan& sub) const;
  std::vector<Plan> alone_plans() const;
  std::optional<Plan> plan_job(bool drop_residents);
  PhaseChoice choose_resident(const std::vector<Plan>& alone);
  bool finalize(PhaseChoice& ch) const;
  std::vector<PhaseDevice> phase_devices(const PhaseChoice& ch, size_t p, uint64_t page_tables) const;
  std::string mode_reason(const PhaseChoice& ch, size_t c, PhaseMode mode) const;
  Plan merge(const PhaseChoice& ch) const;
  void merge_phase(const PhaseChoice& ch, size_t p, Plan& plan) const;
  void merge_devices(const PhaseChoice& ch, Plan& plan) const;

  const PipelineInput& in_;
  const PlanOptions& opt_;
  const ModelTemplate& tmpl_;
  std::vector<PhaseSpec> phases_;
  std::vector<size_t> phase_of_;                                  // per input component
  std::vector<std::unordered_map<std::string, uint64_t>> sizes_;  // per component: tensor bytes
  uint64_t host_budget_ = kUnlimited;
  std::string host_source_;
  uint64_t all_pinned_margin_ = 0;  // page tables of every weight pinned (within the cpu budget)
  uint64_t any_job_margin_ = 0;     // of the most pinned host memory any job can hold (staging rings)
  uint64_t page_margin_ = 0;        // the one planned with (run())
  std::map<size_t, std::string> not_resident_;  // why a component is not resident for the job
  // Filled by merge: per component its host copy's pinning and the job's page tables.
  mutable std::vector<bool> load_pinned_;
};

}  // namespace qtool::planner::detail
