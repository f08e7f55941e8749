// `qtool plan` as one library call: the device profile resolved (a file, a profile name of
// sample_configs/devices/, or chosen for the machine's GPU: profile_choice.hpp), the model
// templates loaded, the budget parsed or measured, the plan made and checked against the
// checkpoint (check_plan). The CLI only parses its options into a PlanRequest.
#pragma once

#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <string_view>

#include "qtool/planner/planner.hpp"
#include "qtool/planner/profile_choice.hpp"

namespace qtool::planner {

struct PlanRequest {
  std::string checkpoint;  // as given: opened, and recorded in the plan
  // Strategy, offload, tokens, blocks per group, prefetch and version; the profile, the
  // templates and the budget are filled in from the fields below.
  PlanOptions options;
  std::optional<ProfileChoice> profile;  // given (named_device_profile); none = chosen from `choice`
  ProfileChoiceInputs choice;
  std::string models_dir;                      // model templates; "" = sample_configs/models/ (if found)
  std::string max_memory;                      // parse_max_memory's text; "" = machine_budget()
  std::function<void(std::string_view)> info;  // which profile, which budget
  std::function<void(std::string_view)> warn;  // no templates found
};

// The profile of `spec`: an existing file, else sample_configs/devices/<spec>.json, else
// Error(Usage) naming `spec`. Returns it with a sentence saying which it is and, when `given_by`
// is not empty, where the spec came from (the CLI passes its option, "--device-profile").
ProfileChoice named_device_profile(const std::string& spec, std::string_view given_by = {});

// Error(InvalidInput) for bad input (the checkpoint, the budget, a profile, templates);
// Error(Internal) when the plan fails its own check.
Plan plan_checkpoint(const PlanRequest& request);

}  // namespace qtool::planner
