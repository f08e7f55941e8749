// The phases of a plan by phase against the pipeline the runner executes (plan_checks.hpp).
#include <algorithm>
#include <string>
#include <vector>

#include "qtool/formats/error.hpp"
#include "qtool/planner/planner.hpp"
#include "qtool/runner/pipeline.hpp"
#include "qtool/runner/plan_checks.hpp"

namespace qtool::runner {

void check_plan_phases(const Checkpoint& checkpoint, const planner::Plan& plan) {
  if (plan.phases.empty()) return;
  const std::vector<std::string> problems = planner::check_plan_phases(plan);
  if (!problems.empty()) fail(ErrorKind::InvalidInput, "plan phases: ", problems.front());
  if (!is_flux_pipeline(checkpoint))
    fail(ErrorKind::InvalidInput, "plan phases: the plan is by phase (phase '", plan.phases.front().name,
         "', ...) but ", checkpoint.root().string(),
         " is not a FluxPipeline folder, the one pipeline qtool runs by phase");
  // The FluxPipeline runs its components in this order (pipeline.hpp); the phases must follow it.
  const std::vector<std::string> order = {"text_encoder", "text_encoder_2", "transformer", "vae"};
  size_t at = 0;
  for (const planner::PhasePlan& ph : plan.phases) {
    bool denoise = false;
    for (const planner::PhaseComponent& c : ph.components) {
      const std::string& name = plan.components[c.component].name;
      const auto it = std::find(order.begin() + static_cast<std::ptrdiff_t>(at), order.end(), name);
      if (it == order.end())
        fail(ErrorKind::InvalidInput, "plan phase '", ph.name, "': component '", name,
             "' does not run here in a FluxPipeline (its order: text_encoder, text_encoder_2, transformer, "
             "vae)");
      at = static_cast<size_t>(it - order.begin()) + 1;
      denoise = denoise || name == "transformer";
    }
    const uint32_t want = denoise ? plan.denoise_steps : 1;
    if (ph.repeat != want)
      fail(ErrorKind::InvalidInput, "plan phase '", ph.name, "': repeat ", ph.repeat,
           " but the pipeline runs it ", want, denoise ? " times (the plan's denoise_steps)" : " time");
  }
}

}  // namespace qtool::runner
