// What the GPU benchmarks share: medians, the warm-up step dropped, a plan that streams, the
// result table's rows.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "qtool/formats/checkpoint.hpp"
#include "qtool/formats/error.hpp"
#include "qtool/planner/planner.hpp"

namespace qtool::bench {

inline double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

inline std::vector<double> tail(std::vector<double> v) {  // drop the warm-up step
  if (v.size() > 1) v.erase(v.begin());
  return v;
}

// The smallest GPU budget (1 MiB steps) any plan of `o` fits in.
inline uint64_t smallest_budget(const Checkpoint& ckpt, planner::PlanOptions o) {
  uint64_t total = 0;
  for (const Component& c : ckpt.components()) total += c.total_bytes();
  const auto feasible = [&](uint64_t b) {
    o.budget.gpus[0] = b;
    try {
      planner::make_plan(ckpt, o);
      return true;
    } catch (const Error&) {
      return false;
    }
  };
  uint64_t lo = 1 << 20, hi = total + (64ull << 30);
  while (hi - lo > (1 << 20)) {
    const uint64_t mid = lo + (hi - lo) / 2;
    (feasible(mid) ? hi : lo) = mid;
  }
  return hi;
}

// A plan on GPU 0 that streams: the smallest budget any plan fits in plus `resident_fraction` of
// the weights, or `budget` when it is not 0 (and fits).
inline planner::Plan plan_streaming(const Checkpoint& ckpt, const planner::DeviceProfile& profile,
                                    uint64_t tokens, double resident_fraction,
                                    const planner::TemplateLibrary* templates,
                                    planner::OffloadMode mode = planner::OffloadMode::Auto,
                                    uint64_t budget = 0) {
  planner::PlanOptions o;
  o.offload = mode;
  if (mode == planner::OffloadMode::Block) o.blocks_per_group = 1;
  o.profile = profile;
  o.tokens = tokens;
  o.templates = templates;
  o.strategy = planner::Strategy::Sequential;
  o.budget.cpu = 1ull << 40;
  uint64_t total = 0;
  for (const Component& c : ckpt.components()) total += c.total_bytes();
  o.budget.gpus[0] = budget ? budget
                            : smallest_budget(ckpt, o) +
                                  static_cast<uint64_t>(resident_fraction * static_cast<double>(total));
  return planner::make_plan(ckpt, o);
}

// "| what | value | op target | met |": op ">=", "<=", or "+-" (|value - 1| <= target).
inline std::string ratio_line(const char* what, double value, const char* op, double target) {
  const bool ok = std::string(op) == ">="   ? value >= target
                  : std::string(op) == "<=" ? value <= target
                                            : std::fabs(value - 1) <= target;
  char buf[256];
  if (std::string(op) == "+-")
    std::snprintf(buf, sizeof buf, "| %s | %.3f | within +-%.0f%% | %s |", what, value, target * 100,
                  ok ? "yes" : "NO");
  else
    std::snprintf(buf, sizeof buf, "| %s | %.3f | %s %.2f | %s |", what, value, op, target,
                  ok ? "yes" : "NO");
  return buf;
}

}  // namespace qtool::bench
