// Pieces of the report (report.cpp: check_plan, the table, the SVG; report_phases.cpp: the same
// for a plan by phase).
#pragma once

#include <cstdio>
#include <string>
#include <string_view>
#include <vector>

#include "qtool/planner/plan.hpp"

namespace qtool::planner::detail {

inline std::string fmt(double v, const char* f = "%.3f") {
  char buf[64];
  std::snprintf(buf, sizeof buf, f, v);
  return buf;
}

inline std::string pad(std::string s, size_t w, bool right = false) {
  if (s.size() >= w) return s;
  return right ? std::string(w - s.size(), ' ') + s : s + std::string(w - s.size(), ' ');
}

inline std::string xml_escape(std::string_view s) {
  std::string o;
  for (char c : s) {
    switch (c) {
      case '<': o += "&lt;"; break;
      case '>': o += "&gt;"; break;
      case '&': o += "&amp;"; break;
      case '"': o += "&quot;"; break;
      default: o += c;
    }
  }
  return o;
}

// Each component's device_map summary and the offloaded modules (the end of plan_table).
std::string components_text(const Plan& plan);
// The phases' checks (check_plan of a phased plan), appended to `problems`.
void check_phases(const Plan& plan, std::vector<std::string>& problems);
// The table of a phased plan: the job, per phase its components' modes and reasons and its GPUs.
std::string phases_table(const Plan& plan);
// The SVG of a phased plan: a bar per phase and GPU, with a legend.
std::string phases_svg(const Plan& plan);

}  // namespace qtool::planner::detail
