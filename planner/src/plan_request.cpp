#include "qtool/planner/plan_request.hpp"

#include "qtool/formats/checkpoint.hpp"
#include "qtool/formats/error.hpp"
#include "qtool/planner/templates.hpp"

namespace qtool::planner {

ProfileChoice named_device_profile(const std::string& spec, std::string_view given_by) {
  namespace fs = std::filesystem;
  // "device profile <spec> (<where>, <given_by>)", the parenthesis left out when empty.
  const auto source = [&](const std::string& where) {
    const std::string why = where.empty() || given_by.empty() ? where + std::string(given_by)
                                                              : where + ", " + std::string(given_by);
    return "device profile " + spec + (why.empty() ? "" : " (" + why + ")");
  };
  std::error_code ec;
  if (fs::is_regular_file(spec, ec)) return {load_device_profile(spec), source("")};
  if (auto dir = find_data_subdir("devices")) {
    const fs::path p = *dir / (spec + ".json");
    if (fs::is_regular_file(p, ec)) return {load_device_profile(p), source(p.string())};
  }
  fail(ErrorKind::Usage, "device profile '", spec,
       "' is neither a file nor a profile in sample_configs/devices/");
}

Plan plan_checkpoint(const PlanRequest& request) {
  const auto say = [](const std::function<void(std::string_view)>& f, std::string_view line) {
    if (f) f(line);
  };
  PlanOptions opt = request.options;
  if (opt.tokens == 0) fail(ErrorKind::Usage, "tokens must be positive");
  const ProfileChoice profile = request.profile ? *request.profile : choose_device_profile(request.choice);
  opt.profile = profile.profile;
  say(request.info, "using " + profile.source);
  TemplateLibrary templates;
  if (!request.models_dir.empty()) {
    templates.load_dir(request.models_dir);
  } else if (auto dir = find_data_subdir("models")) {
    templates.load_dir(*dir);
  } else {
    say(request.warn,
        "no sample_configs/models found (set QTOOL_DATA_DIR or --models-dir): heuristic execution order");
  }
  opt.templates = &templates;
  if (!request.max_memory.empty()) {
    opt.budget = parse_max_memory(request.max_memory);
  } else {
    opt.budget = machine_budget();
    say(request.info, opt.budget.note);
  }
  const Checkpoint ck = Checkpoint::open(request.checkpoint);
  const PipelineInput input = plan_input_of(ck);
  Plan plan = make_plan(input, opt);
  plan.checkpoint = request.checkpoint;
  plan.notes.insert(plan.notes.begin(), "using " + profile.source);
  const std::vector<std::string> problems = check_plan(plan, input);
  if (!problems.empty())
    fail(ErrorKind::Internal, "the plan failed its own check: ", problems.front(), " (", problems.size(),
         " problem(s))");
  return plan;
}

}  // namespace qtool::planner
