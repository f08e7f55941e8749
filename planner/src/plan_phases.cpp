// The phases of a plan file (version 3): written after "notes", read and checked against the
// plan's components and schedule.
#include <algorithm>

#include "plan_reader.hpp"
#include "qtool/formats/error.hpp"

namespace qtool::planner {

std::string_view phase_mode_name(PhaseMode mode) {
  switch (mode) {
    case PhaseMode::Resident: return "resident";
    case PhaseMode::Loaded: return "loaded";
    case PhaseMode::Streamed: return "streamed";
  }
  return "?";
}

PhaseMode parse_phase_mode(std::string_view text, std::string_view where) {
  if (text == "resident") return PhaseMode::Resident;
  if (text == "loaded") return PhaseMode::Loaded;
  if (text == "streamed") return PhaseMode::Streamed;
  fail(ErrorKind::InvalidInput, where, ": mode '", text, "' is not resident, loaded or streamed");
}

namespace detail {

namespace {

ojson phase_json(const Plan& p, const PhasePlan& ph) {
  ojson j;
  j["name"] = ph.name;
  j["note"] = ph.note;
  j["repeat"] = ph.repeat;
  j["schedule"] = {ph.schedule_begin, ph.schedule_end};
  j["offload"] = ph.offload_mode;
  j["blocks_per_group"] = ph.blocks_per_group;
  j["prefetch"] = ph.prefetch;
  j["load_s"] = ph.load_s;
  j["step_s"] = ph.step_s;
  j["transfer_s"] = ph.transfer_s;
  j["compute_s"] = ph.compute_s;
  j["time_s"] = ph.time_s;
  j["components"] = json_array(ph.components, [&p](const PhaseComponent& c) {
    return ojson{{"name", p.components[c.component].name},
                 {"mode", phase_mode_name(c.mode)},
                 {"reason", c.reason},
                 {"load_bytes", c.load_bytes},
                 {"load_from", c.load_pinned ? "pinned" : "pageable"},
                 {"load_s", c.load_s}};
  });
  j["devices"] = json_array(ph.devices, [](const PhaseDevice& d) {
    ojson dj = {{"device", str_cat("cuda:", d.location.gpu)},
                {"location", d.location.gpu},
                {"resident_bytes", d.resident_bytes}};
    gpu_memory_to_json(d, dj);
    return dj;
  });
  return j;
}

PhaseComponent phase_component_from_json(Reader& r, const json& cj, const std::string& path, const Plan& p) {
  PhaseComponent c;
  const std::string name = r.str(cj, "name", path);
  auto it = std::find_if(p.components.begin(), p.components.end(),
                         [&](const ComponentPlan& cp) { return cp.name == name; });
  if (it == p.components.end())
    fail(ErrorKind::InvalidInput, r.label, ": key '", path, ".name': no component '", name, "' in the plan");
  c.component = static_cast<uint32_t>(it - p.components.begin());
  c.mode = parse_phase_mode(r.str(cj, "mode", path), str_cat(r.label, ": key '", path, ".mode'"));
  c.reason = r.str(cj, "reason", path);
  c.load_bytes = r.u64(cj, "load_bytes", path);
  const std::string from = r.str(cj, "load_from", path);
  if (from != "pinned" && from != "pageable")
    fail(ErrorKind::InvalidInput, r.label, ": key '", path, ".load_from' must be \"pinned\" or \"pageable\"");
  c.load_pinned = from == "pinned";
  c.load_s = r.num(cj, "load_s", path);
  return c;
}

PhaseDevice phase_device_from_json(Reader& r, const json& dj, const std::string& path) {
  PhaseDevice d;
  d.location = location_from_json(r.at(dj, "location", path), str_cat(r.label, ": ", path, ".location"));
  if (!d.location.is_gpu())
    fail(ErrorKind::InvalidInput, r.label, ": key '", path, ".location' must be a GPU");
  d.resident_bytes = r.u64(dj, "resident_bytes", path);
  r.gpu_memory(dj, path, d);
  return d;
}

PhasePlan phase_from_json(Reader& r, const json& pj, const std::string& path, const Plan& p) {
  PhasePlan ph;
  ph.name = r.str(pj, "name", path);
  ph.note = r.str(pj, "note", path);
  ph.repeat = static_cast<uint32_t>(r.bounded(pj, "repeat", path, 1000000));
  const json& sched = r.arr(pj, "schedule", path);
  if (sched.size() != 2 || !sched[0].is_number_unsigned() || !sched[1].is_number_unsigned() ||
      sched[0].get<uint64_t>() > sched[1].get<uint64_t>() || sched[1].get<uint64_t>() > p.schedule.size()) {
    fail(ErrorKind::InvalidInput, r.label, ": key '", path, ".schedule' must be [begin, end] within the ",
         p.schedule.size(), " steps of the schedule");
  }
  ph.schedule_begin = sched[0].get<uint32_t>();
  ph.schedule_end = sched[1].get<uint32_t>();
  ph.offload_mode = r.str(pj, "offload", path);
  ph.blocks_per_group = static_cast<uint32_t>(r.bounded(pj, "blocks_per_group", path, kMaxBlocksPerGroup));
  ph.prefetch = static_cast<uint32_t>(r.bounded(pj, "prefetch", path, kMaxPrefetch));
  ph.load_s = r.num(pj, "load_s", path);
  ph.step_s = r.num(pj, "step_s", path);
  ph.transfer_s = r.num(pj, "transfer_s", path);
  ph.compute_s = r.num(pj, "compute_s", path);
  ph.time_s = r.num(pj, "time_s", path);
  const json& comps = r.arr(pj, "components", path);
  for (size_t i = 0; i < comps.size(); ++i)
    ph.components.push_back(phase_component_from_json(r, comps[i], str_cat(path, ".components[", i, "]"), p));
  const json& devs = r.arr(pj, "devices", path);
  for (size_t i = 0; i < devs.size(); ++i)
    ph.devices.push_back(phase_device_from_json(r, devs[i], str_cat(path, ".devices[", i, "]")));
  return ph;
}

}  // namespace

void phases_to_json(const Plan& p, ojson& j) {
  j["denoise_steps"] = p.denoise_steps;
  j["job_load_s"] = p.job_load_s;
  j["predicted_job_s"] = p.predicted_job_s;
  j["phases"] = json_array(p.phases, [&p](const PhasePlan& ph) { return phase_json(p, ph); });
}

void phases_from_json(Reader& r, const json& j, Plan& p) {
  p.denoise_steps = static_cast<uint32_t>(r.bounded(j, "denoise_steps", "", kMaxDenoiseSteps));
  p.job_load_s = r.num(j, "job_load_s", "");
  p.predicted_job_s = r.num(j, "predicted_job_s", "");
  const json& phases = r.arr(j, "phases", "");
  if (phases.empty())
    fail(ErrorKind::InvalidInput, r.label, ": key 'phases' is empty (a version 3 plan has phases)");
  for (size_t i = 0; i < phases.size(); ++i)
    p.phases.push_back(phase_from_json(r, phases[i], str_cat("phases[", i, "]"), p));
}

}  // namespace detail
}  // namespace qtool::planner
