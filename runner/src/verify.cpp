// `qtool verify` (verify.hpp): the checks in order over the planned run. Each piece is in
// verify_checks.hpp.
#include "qtool/runner/verify.hpp"

#include <algorithm>
#include <cstdio>

#include "qtool/formats/error.hpp"
#include "run_support.hpp"
#include "verify_checks.hpp"

namespace qtool::runner {

const char* check_status_name(CheckResult::Status status) {
  static constexpr std::array<const char*, 4> kNames = {"pass", "FAIL", "skip", "info"};
  static_assert(kNames.size() == static_cast<size_t>(CheckResult::Status::Info) + 1);
  return enum_name(status, kNames);
}

bool VerifyReport::passed() const {
  return std::none_of(checks.begin(), checks.end(),
                      [](const CheckResult& c) { return c.status == CheckResult::Status::Fail; });
}

std::vector<std::string> VerifyReport::failed_names() const {
  std::vector<std::string> names;
  for (const CheckResult& c : checks)
    if (c.status == CheckResult::Status::Fail) names.push_back(c.name);
  return names;
}

namespace verify_detail {

void Checks::add(std::string name, CheckResult::Status status, std::string detail) {
  log(str_cat("  [", check_status_name(status), "] ", name, ": ", detail));
  report_.checks.push_back({std::move(name), status, std::move(detail)});
}

std::string fmt(const char* f, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, f, v);
  return buf;
}

std::vector<bool> linears_only_mask(const Schedule& schedule, const RunResult& run) {
  std::vector<bool> mask(schedule.linears.size(), true);
  for (size_t li = 0; li < schedule.linears.size(); ++li)
    for (const ComponentRun& c : run.components)
      if (c.forward && c.component == schedule.linears[li].component) mask[li] = false;
  return mask;
}

uint64_t linears_only_ld(const Schedule& schedule, const LinearTask& l) {
  uint64_t ld = 0;
  for (const LinearTask& o : schedule.linears)
    if (o.component_index == l.component_index) ld = std::max(ld, o.in());
  return ld;
}

std::vector<Phase> make_phases(const RunResult& run) {
  std::vector<Phase> phases;
  if (run.pipeline.ran)
    for (const char* c : {"text_encoder", "text_encoder_2", "transformer"}) phases.push_back({c, 0, 0, 0});
  for (const ComponentRun& c : run.components) {
    bool have = false;
    for (const Phase& p : phases) have = have || p.component == c.component;
    if (!have) phases.push_back({c.component, 0, 0, 0});
  }
  return phases;
}

}  // namespace verify_detail

VerifyReport verify(const VerifyOptions& options) {
  using namespace verify_detail;
  VerifyReport report;
  Checks checks(report, options);
  const Setup s(options, checks);
  report_setup(s, checks);

  const RunResult planned = s.backend->run(s.checkpoint, s.schedule, s.run_opts);
  std::vector<Phase> phases = make_phases(planned);
  check_finite_outputs(s, planned, phases, checks);
  report_pipeline(planned, checks);
  report_components(planned, checks);
  check_weights_read(planned, checks);
  const ResidentRun resident = run_all_resident(s, checks);
  check_streamed_vs_resident(s, planned, resident, phases, checks);
  if (options.poison) check_no_state_left_behind(s, planned, checks);
  report.json["layers"] =
      options.reference.empty() ? nlohmann::json::array() : check_reference(s, planned, checks);

  check_peak_memory(s, planned, phases, checks);
  report_phases(planned, phases, checks);
  check_step_time(s, planned, resident.step_ms, checks);
  if (!options.trace.empty()) report_trace(s, planned, checks);
  finish_report(s, planned, checks);
  return report;
}

}  // namespace qtool::runner
