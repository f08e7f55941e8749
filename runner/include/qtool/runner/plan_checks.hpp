// Consistency of a plan with itself and with its checkpoint, checked before anything runs. A plan
// file can be edited by hand; `qtool verify` must verify the plan a user deploys, all of it, or
// refuse it. build_schedule() calls this on the schedule it built.
//
// Error(InvalidInput) naming the plan item ("plan schedule[3]", "plan groups[2]", "plan
// components[0].device_map['model.layers.1']", "plan components[0].tied[0]") and the tensor for:
//   components  a checkpoint component the plan leaves out, or lists twice;
//   placement   a tensor listed twice (in one group, in two groups, in two steps, resident and in a
//               group); a group tensor that no step streaming the group lists (it would never
//               run); a group no step uses;
//   order       components not in the order the plan lists them; groups not first used in the
//               order of their ids; the blocks of a block list not in numeric order; a module run
//               by two steps (a reversed or duplicated schedule);
//   device map  overlapping keys; a key naming nothing of the checkpoint; a tensor no key covers;
//               a key whose location differs from where the groups and the schedule put a tensor
//               under it (the map a loader deploys must be the plan verified);
//   ties        an alias listed twice or tied to itself; a primary the checkpoint lacks; an alias
//               the checkpoint holds that is not an identical copy of its primary (dtype, shape,
//               bytes) — else a real tensor could be skipped as a "tied copy";
//   linears     a declared linear whose [out, in] or kind differs from the checkpoint's weight,
//               whose own weight is not among its step's tensors, or that reads another tensor
//               than its own without being a tied alias of it; a linear declared twice; a linear
//               the runner would run in a step that the plan does not declare there;
//   phases      (a pipeline planned by phase, check_plan_phases) a phase whose parts do not add up
//               (planner::check_plan_phases), a plan by phase of a checkpoint that is not a
//               FluxPipeline, phases whose components are not in the order the pipeline runs them
//               (CLIP, T5, the transformer, the VAE), a denoising phase whose repeat is not the
//               plan's denoise_steps, or another phase repeated; and, until the driver loads and
//               releases components between phases, a component that is not resident for the job
//               (plan with `--no-phases` or a budget that keeps every component). Each names the phase.
#pragma once

#include "qtool/formats/checkpoint.hpp"
#include "qtool/planner/plan.hpp"
#include "qtool/runner/schedule.hpp"

namespace qtool::runner {

void check_plan_consistency(const Checkpoint& checkpoint, const planner::Plan& plan,
                            const Schedule& schedule);
// The phases of a plan by phase (none: nothing to check); check_plan_consistency calls it.
void check_plan_phases(const Checkpoint& checkpoint, const planner::Plan& plan);

}  // namespace qtool::runner
