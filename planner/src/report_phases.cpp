// A plan by phase: its checks, its table and its SVG (a bar per phase and GPU, with a legend).
#include <algorithm>
#include <cmath>
#include <map>

#include "qtool/formats/error.hpp"
#include "qtool/formats/size.hpp"
#include "qtool/planner/planner.hpp"
#include "report_internal.hpp"

namespace qtool::planner::detail {

namespace {

bool near(double a, double b) { return std::abs(a - b) <= 1e-9 * std::max({1.0, std::abs(a), std::abs(b)}); }

uint64_t budget_of(const Plan& plan, const Location& loc) {
  const DevicePlan* d = plan.find_device(loc);
  return d ? d->budget : 0;
}

// The colours of the SVG and what each means (the legend).
struct Swatch {
  const char* fill;
  const char* label;
};
constexpr Swatch kResident{"#4e79a7", "resident for the whole job"};
constexpr Swatch kLoaded{"#59a14f", "loaded at the phase's start, released after it"};
constexpr Swatch kSlots{"#f28e2b", "streamed: device slots the groups are copied into"};
constexpr Swatch kReserve{"#bab0ac", "reserve: context, workspace, activations, scratch, page tables"};
constexpr Swatch kFree{"#ffffff", "free (budget not used)"};

}  // namespace

void check_phases(const Plan& plan, std::vector<std::string>& problems) {
  std::vector<int> in_phase(plan.components.size(), 0);
  std::vector<bool> has_groups(plan.components.size(), false);
  for (const OffloadGroup& g : plan.groups)
    if (g.component < has_groups.size()) has_groups[g.component] = true;
  uint32_t next = 0;
  double job = plan.job_load_s;
  for (const PhasePlan& ph : plan.phases) {
    if (ph.schedule_begin != next || ph.schedule_end < ph.schedule_begin)
      problems.push_back(str_cat("phase '", ph.name, "': its steps do not follow the previous phase's"));
    next = ph.schedule_end;
    std::vector<bool> mine(plan.components.size(), false);
    for (const PhaseComponent& c : ph.components) {
      if (c.component >= plan.components.size()) {
        problems.push_back(str_cat("phase '", ph.name, "': component out of range"));
        continue;
      }
      mine[c.component] = true;
      ++in_phase[c.component];
      if ((c.mode == PhaseMode::Streamed) != has_groups[c.component])
        problems.push_back(str_cat("phase '", ph.name, "': component '", plan.components[c.component].name,
                                   "' is ", phase_mode_name(c.mode),
                                   has_groups[c.component] ? " but has" : " but has no", " offload groups"));
    }
    for (uint32_t s = ph.schedule_begin; s < std::min<size_t>(ph.schedule_end, plan.schedule.size()); ++s) {
      if (plan.schedule[s].component >= mine.size() || !mine[plan.schedule[s].component])
        problems.push_back(str_cat("phase '", ph.name, "': step ", s, " runs a component of another phase"));
    }
    for (const PhaseDevice& d : ph.devices) {
      if (d.predicted_peak != d.resident_bytes + d.arena_bytes + sum_bytes(d.reserve))
        problems.push_back(str_cat("phase '", ph.name, "': cuda:", d.location.gpu, ": peak does not add up"));
      if (d.predicted_peak > budget_of(plan, d.location))
        problems.push_back(str_cat("phase '", ph.name, "': cuda:", d.location.gpu, ": predicted peak ",
                                   d.predicted_peak, " exceeds the budget ", budget_of(plan, d.location)));
    }
    if (ph.repeat == 0 || !near(ph.time_s, ph.load_s + ph.repeat * ph.step_s))
      problems.push_back(
          str_cat("phase '", ph.name, "': time ", ph.time_s, " != loads + ", ph.repeat, " x step"));
    job += ph.time_s;
  }
  if (next != plan.schedule.size()) problems.push_back("phases: the schedule has steps in no phase");
  for (size_t c = 0; c < in_phase.size(); ++c) {
    if (in_phase[c] != 1)
      problems.push_back(str_cat("component '", plan.components[c].name, "' is in ", in_phase[c], " phases"));
  }
  if (!near(job, plan.predicted_job_s))
    problems.push_back(str_cat("predicted job time ", plan.predicted_job_s, " != loads + phases ", job));
}

std::string phases_table(const Plan& plan) {
  std::string o = str_cat("plan for ", plan.checkpoint, ": a pipeline job by phase, ", plan.denoise_steps,
                          " denoising step(s)\n");
  o += str_cat("  strategy ", plan.settings.strategy, ", tokens ", plan.settings.tokens, ", device profile ",
               plan.settings.profile_name, "\n");
  for (const std::string& n : plan.notes) o += "  note: " + n + "\n";
  o += str_cat("\npredicted job ", fmt(plan.predicted_job_s * 1e3, "%.2f"), " ms = loads at the job's start ",
               fmt(plan.job_load_s * 1e3, "%.2f"), " ms");
  for (const PhasePlan& ph : plan.phases)
    o += str_cat(" + ", ph.name, " ", fmt(ph.time_s * 1e3, "%.2f"), " ms");
  o += "\n";
  for (size_t i = 0; i < plan.phases.size(); ++i) {
    const PhasePlan& ph = plan.phases[i];
    o += str_cat("\nphase ", i + 1, " '", ph.name, "': ", fmt(ph.time_s * 1e3, "%.2f"), " ms = loads ",
                 fmt(ph.load_s * 1e3, "%.2f"), " ms + ", ph.repeat, " x ", fmt(ph.step_s * 1e3, "%.3f"),
                 " ms (compute ", fmt(ph.compute_s * 1e3, "%.3f"), " ms, copies ",
                 fmt(ph.transfer_s * 1e3, "%.3f"), " ms)");
    if (ph.offload_mode != "none")
      o += str_cat(", offload ", ph.offload_mode, " (", ph.blocks_per_group, " unit(s) per group, ",
                   ph.prefetch, " slot(s))");
    o += "\n";
    if (!ph.note.empty()) o += "  note: " + ph.note + "\n";
    for (const PhaseComponent& c : ph.components) {
      const ComponentPlan& cp = plan.components[c.component];
      o += str_cat("  ", cp.name, cp.class_name.empty() ? "" : " (" + cp.class_name + ")", ", ",
                   format_size(cp.bytes), ": ", phase_mode_name(c.mode));
      if (c.load_bytes)
        o += str_cat(", loads ", format_size(c.load_bytes), " from ", c.load_pinned ? "pinned" : "pageable",
                     " host memory in ", fmt(c.load_s * 1e3, "%.3f"), " ms",
                     c.mode == PhaseMode::Resident ? " at the job's start" : " at the phase's start");
      o += "\n    why: " + c.reason + "\n";
    }
    o += "  " + pad("device", 8) + pad("budget", 12, true) + pad("resident", 12, true) +
         pad("loaded", 12, true) + pad("slots", 12, true) + pad("reserve", 12, true) + pad("peak", 12, true) +
         pad("free", 12, true) + "\n";
    for (const PhaseDevice& d : ph.devices) {
      uint64_t slots = 0;
      for (const ReserveItem& r : d.reserve)
        if (r.name == "device_slots") slots += r.bytes;
      const uint64_t budget = budget_of(plan, d.location);
      o += "  " + pad(str_cat("cuda:", d.location.gpu), 8) + pad(format_size(budget), 12, true) +
           pad(format_size(d.resident_bytes), 12, true) + pad(format_size(d.arena_bytes), 12, true) +
           pad(format_size(slots), 12, true) + pad(format_size(sum_bytes(d.reserve) - slots), 12, true) +
           pad(format_size(d.predicted_peak), 12, true) +
           pad(format_size(budget - std::min(budget, d.predicted_peak)), 12, true) + "\n";
      for (const ReserveItem& r : d.reserve)
        o += "            " + pad(r.name, 18) + pad(format_size(r.bytes), 12, true) + "  " + r.detail + "\n";
    }
  }
  o += "\n";
  return o;
}

std::string phases_svg(const Plan& plan) {
  const double width = 960, bar_h = 24, left = 230, right = 20, row = 52, legend_h = 96;
  const double bar_w = width - left - right;
  size_t rows = 0;
  for (const PhasePlan& ph : plan.phases) rows += ph.devices.size();
  std::string o = str_cat("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"", width, "\" height=\"",
                          legend_h + row * static_cast<double>(rows) + 20,
                          "\" font-family=\"sans-serif\" font-size=\"11\">\n");
  o += str_cat("<text x=\"10\" y=\"18\" font-size=\"14\">", xml_escape(plan.checkpoint), ": by phase, ",
               plan.denoise_steps, " denoising step(s), predicted job ",
               fmt(plan.predicted_job_s * 1e3, "%.2f"), " ms (loads at the start ",
               fmt(plan.job_load_s * 1e3, "%.2f"), " ms)</text>\n");
  const Swatch legend[] = {kResident, kLoaded, kSlots, kReserve, kFree};
  for (size_t i = 0; i < 5; ++i) {
    const double lx = 10 + static_cast<double>(i % 3) * 310, ly = 32 + static_cast<double>(i / 3) * 18;
    o += str_cat("<g class=\"legend\"><rect x=\"", lx, "\" y=\"", ly, "\" width=\"12\" height=\"12\" fill=\"",
                 legend[i].fill, "\" stroke=\"#333\"/><text x=\"", lx + 16, "\" y=\"", ly + 10, "\">",
                 xml_escape(legend[i].label), "</text></g>\n");
  }
  double y = legend_h - 20;
  for (size_t i = 0; i < plan.phases.size(); ++i) {
    const PhasePlan& ph = plan.phases[i];
    std::string modes;
    for (const PhaseComponent& c : ph.components)
      modes +=
          str_cat(modes.empty() ? "" : ", ", plan.components[c.component].name, " ", phase_mode_name(c.mode));
    for (const PhaseDevice& d : ph.devices) {
      const uint64_t budget = std::max<uint64_t>({budget_of(plan, d.location), d.predicted_peak, 1});
      const double px = bar_w / static_cast<double>(budget);
      o += str_cat("<text x=\"10\" y=\"", y + 10, "\">phase ", i + 1, " ", xml_escape(ph.name), " (x",
                   ph.repeat, ")</text><text x=\"10\" y=\"", y + 23, "\">cuda:", d.location.gpu, "</text>\n");
      o += str_cat("<rect x=\"", left, "\" y=\"", y, "\" width=\"", bar_w, "\" height=\"", bar_h,
                   "\" fill=\"", kFree.fill, "\" stroke=\"#333\"><title>free</title></rect>\n");
      double x = left;
      auto seg = [&](uint64_t bytes, const Swatch& s, const std::string& title) {
        const double w = static_cast<double>(bytes) * px;
        if (w <= 0) return;
        o +=
            str_cat("<rect x=\"", fmt(x, "%.2f"), "\" y=\"", y, "\" width=\"", fmt(w, "%.2f"), "\" height=\"",
                    bar_h, "\" fill=\"", s.fill, "\" stroke=\"#fff\" stroke-width=\"0.3\"><title>",
                    xml_escape(title), " (", format_size(bytes), ")</title></rect>\n");
        x += w;
      };
      seg(d.resident_bytes, kResident, kResident.label);
      seg(d.arena_bytes, kLoaded, kLoaded.label);
      for (const ReserveItem& r : d.reserve)
        seg(r.bytes, r.name == "device_slots" ? kSlots : kReserve, r.name + ": " + r.detail);
      o += str_cat("<text x=\"", left, "\" y=\"", y + bar_h + 12, "\">", xml_escape(modes), "; peak ",
                   format_size(d.predicted_peak), " of ", format_size(budget_of(plan, d.location)), "; ",
                   fmt(ph.time_s * 1e3, "%.2f"), " ms = loads ", fmt(ph.load_s * 1e3, "%.2f"), " ms + ",
                   ph.repeat, " x ", fmt(ph.step_s * 1e3, "%.3f"), " ms</text>\n");
      y += row;
    }
  }
  o += "</svg>\n";
  return o;
}

}  // namespace qtool::planner::detail
