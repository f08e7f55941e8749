// verify --trace (verify.hpp, verify_checks.hpp): the planned run's trace as Chrome trace-event
// JSON, and how well its copies hide behind compute.
#include <algorithm>
#include <map>
#include <set>

#include "qtool/formats/error.hpp"
#include "qtool/formats/json.hpp"
#include "verify_checks.hpp"

namespace qtool::runner {

using nlohmann::json;

namespace {

double overlap(double a0, double a1, double b0, double b1) {
  return std::max(0.0, std::min(a1, b1) - std::max(a0, b0));
}

struct PrefetchStats {
  size_t pairs = 0;        // streamed steps k followed by a streamed step k+1 on the same GPU
  size_t overlapping = 0;  // ... whose copy of k+1 overlaps the compute of k
};

PrefetchStats prefetch_stats(const std::vector<TraceEvent>& events, uint32_t step) {
  PrefetchStats s;
  std::map<int32_t, const TraceEvent*> copies, computes;
  for (const TraceEvent& e : events) {
    if (e.step != step || e.plan_step < 0) continue;
    if (e.lane == Lane::Copy)
      copies[e.plan_step] = &e;
    else if (e.lane == Lane::Compute)
      computes[e.plan_step] = &e;
  }
  // Streamed steps in order; pair each with the next streamed step on the same GPU lane.
  std::vector<const TraceEvent*> ordered;
  for (const auto& [k, e] : copies) ordered.push_back(e);
  for (size_t i = 0; i < ordered.size(); ++i) {
    for (size_t j = i + 1; j < ordered.size(); ++j) {
      if (ordered[j]->device != ordered[i]->device) continue;
      const auto c = computes.find(ordered[i]->plan_step);
      if (c != computes.end()) {
        ++s.pairs;
        if (overlap(ordered[j]->start_us, ordered[j]->start_us + ordered[j]->dur_us, c->second->start_us,
                    c->second->start_us + c->second->dur_us) > 0)
          ++s.overlapping;
      }
      break;
    }
  }
  return s;
}

}  // namespace

json trace_to_json(const std::vector<TraceEvent>& events) {
  json out = json::array();
  constexpr int kHostPid = 1000;             // host lanes (disk reads)
  std::map<std::pair<int, Lane>, int> tids;  // (pid, lane) -> tid
  const auto pid_of = [](const TraceEvent& e) { return e.lane == Lane::DiskRead ? kHostPid : e.device; };
  for (const TraceEvent& e : events) {
    const auto key = std::make_pair(pid_of(e), e.lane);
    if (tids.count(key)) continue;
    tids[key] = static_cast<int>(tids.size()) + 1;
    out.push_back({{"name", "thread_name"},
                   {"ph", "M"},
                   {"pid", key.first},
                   {"tid", tids[key]},
                   {"args", {{"name", e.lane_label()}}}});
  }
  std::set<int> pids;
  for (const auto& [key, tid] : tids) pids.insert(key.first);
  for (int pid : pids)
    out.push_back(
        {{"name", "process_name"},
         {"ph", "M"},
         {"pid", pid},
         {"tid", 0},
         {"args", {{"name", pid == kHostPid ? std::string("host") : "GPU " + std::to_string(pid)}}}});
  for (const TraceEvent& e : events) {
    json args = {{"step", e.step}, {"plan_step", e.plan_step}};
    if (e.bytes) {
      args["bytes"] = e.bytes;
      if (e.dur_us > 0) args["GB/s"] = static_cast<double>(e.bytes) / (e.dur_us * 1e3);
    }
    out.push_back({{"name", e.name},
                   {"cat", e.lane == Lane::Compute ? "compute" : "copy"},
                   {"ph", "X"},
                   {"ts", e.start_us},
                   {"dur", e.dur_us},
                   {"pid", pid_of(e)},
                   {"tid", tids.at({pid_of(e), e.lane})},
                   {"args", std::move(args)}});
  }
  return {{"traceEvents", std::move(out)}, {"displayTimeUnit", "ms"}};
}

double copy_compute_overlap(const std::vector<TraceEvent>& events, uint32_t step) {
  double copy_total = 0, hidden = 0;
  for (const TraceEvent& c : events) {
    if (c.step != step || c.lane != Lane::Copy) continue;
    copy_total += c.dur_us;
    // Compute intervals of other plan steps on that GPU (they do not overlap each other).
    for (const TraceEvent& k : events) {
      if (k.lane != Lane::Compute || k.device != c.device || k.plan_step == c.plan_step || k.plan_step < 0)
        continue;
      hidden += overlap(c.start_us, c.start_us + c.dur_us, k.start_us, k.start_us + k.dur_us);
    }
  }
  return copy_total > 0 ? std::min(1.0, hidden / copy_total) : 0.0;
}

namespace verify_detail {

void report_trace(const Setup& s, const RunResult& planned, Checks& checks) {
  const VerifyOptions& o = s.options;
  write_json_file(o.trace, trace_to_json(planned.trace));
  const uint32_t last = o.steps - 1;
  const PrefetchStats ps = prefetch_stats(planned.trace, last);
  const double hidden = copy_compute_overlap(planned.trace, last);
  checks.json()["trace"] = {{"file", o.trace.string()},
                            {"events", planned.trace.size()},
                            {"step", last},
                            {"copy_hidden_fraction", hidden},
                            {"prefetch_pairs", ps.pairs},
                            {"prefetch_overlapping", ps.overlapping}};
  checks.log(str_cat("  trace: ", planned.trace.size(), " events to ", o.trace.string(), "; step ", last,
                     ": ", ps.overlapping, " of ", ps.pairs,
                     " copies of group k+1 overlap the compute of group k, ", fmt("%.0f", 100 * hidden),
                     "% of copy time hidden behind compute"));
}

}  // namespace verify_detail
}  // namespace qtool::runner
