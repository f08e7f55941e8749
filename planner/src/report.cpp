// check_plan, the table printed by `qtool plan`, and its SVG drawing.
#include <algorithm>
#include <cstdio>
#include <map>
#include <set>
#include <unordered_map>
#include <unordered_set>

#include "qtool/formats/error.hpp"
#include "qtool/formats/size.hpp"
#include "qtool/planner/planner.hpp"
#include "report_internal.hpp"

namespace qtool::planner {
namespace {

using detail::fmt;
using detail::pad;
using detail::xml_escape;

bool covers(std::string_view key, std::string_view name) {
  return key.empty() || key == name ||
         (name.size() > key.size() && name.starts_with(key) && name[key.size()] == '.');
}

// check_plan's checks, one method each, collecting problems.
class PlanCheck {
 public:
  PlanCheck(const Plan& plan, const PipelineInput& input) : plan_(plan), input_(input) {}
  std::vector<std::string> run();

 private:
  template <class... Args>
  void problem(Args&&... args) {
    problems_.push_back(str_cat(std::forward<Args>(args)...));
  }
  void device_map(const ComponentInput& ci, size_t index);
  void blocks_unsplit(const ComponentInput& ci, size_t index);
  void devices();
  void groups();
  void schedule();

  const Plan& plan_;
  const PipelineInput& input_;
  std::unordered_map<std::string, size_t> comp_index_;
  // Location of every stored tensor by the device map, per component.
  std::vector<std::unordered_map<std::string, Location>> loc_of_;
  std::vector<std::string> problems_;
};

std::vector<std::string> PlanCheck::run() {
  if (plan_.components.size() != input_.components.size()) {
    problem("plan has ", plan_.components.size(), " components, the checkpoint ", input_.components.size());
    return problems_;
  }
  for (size_t i = 0; i < plan_.components.size(); ++i) comp_index_[plan_.components[i].name] = i;
  loc_of_.resize(plan_.components.size());
  for (const ComponentInput& ci : input_.components) {
    auto it = comp_index_.find(ci.name);
    if (it == comp_index_.end()) {
      problem("component '", ci.name, "' missing from the plan");
      continue;
    }
    device_map(ci, it->second);
    blocks_unsplit(ci, it->second);
  }
  devices();
  groups();
  schedule();
  if (!plan_.phases.empty()) detail::check_phases(plan_, problems_);
  return problems_;
}

// Every stored tensor covered by exactly one device_map key; every key covers something.
void PlanCheck::device_map(const ComponentInput& ci, size_t index) {
  const ComponentPlan& cp = plan_.components[index];
  std::set<std::string> aliases;
  for (const TiedAlias& t : cp.tied) aliases.insert(t.alias);
  // Sort keys to find covering keys quickly: a key covers a name when it is the name or a
  // dotted ancestor of it, so walk the name's ancestors.
  std::unordered_map<std::string, const DeviceMapEntry*> keys;
  for (const DeviceMapEntry& e : cp.device_map) {
    if (!keys.emplace(e.prefix, &e).second)
      problem("component '", ci.name, "': device_map key '", e.prefix, "' twice");
  }
  std::unordered_set<std::string> used_keys;
  for (const TensorDesc& t : ci.tensors) {
    int hits = 0;
    const DeviceMapEntry* hit = nullptr;
    std::string_view name = t.name;
    for (size_t end = name.size();;) {
      auto k = keys.find(std::string(name.substr(0, end)));
      if (k != keys.end()) {
        ++hits;
        hit = k->second;
      }
      if (end == 0) break;
      const size_t dot = name.rfind('.', end - 1);
      end = dot == std::string_view::npos ? 0 : dot;
    }
    if (hits != 1) {
      problem("component '", ci.name, "': tensor '", t.name, "' is covered by ", hits, " device_map keys");
      continue;
    }
    used_keys.insert(hit->prefix);
    loc_of_[index][t.name] = hit->location;
  }
  for (const DeviceMapEntry& e : cp.device_map) {
    if (used_keys.count(e.prefix)) continue;
    bool alias = false;
    for (const std::string& a : aliases) alias = alias || covers(e.prefix, a);
    if (!alias) problem("component '", ci.name, "': device_map key '", e.prefix, "' covers no tensor");
  }
}

void PlanCheck::blocks_unsplit(const ComponentInput& ci, size_t index) {
  // Blocks are never split.
  const ModuleTree tree = ModuleTree::build(ci.tensors);
  for (size_t n = 0; n < tree.nodes().size(); ++n) {
    const ModuleNode& node = tree.nodes()[n];
    if (!node.is_block) continue;
    std::optional<Location> first;
    std::vector<int32_t> stack = {static_cast<int32_t>(n)};
    bool split = false;
    while (!stack.empty() && !split) {
      const ModuleNode& m = tree.node(stack.back());
      stack.pop_back();
      for (uint32_t t : m.tensors) {
        auto l = loc_of_[index].find(tree.tensors()[t].name);
        if (l == loc_of_[index].end()) continue;
        if (!first)
          first = l->second;
        else if (!(*first == l->second))
          split = true;
      }
      for (int32_t c : m.children) stack.push_back(c);
    }
    if (split) problem("component '", ci.name, "': block '", node.prefix, "' is split across devices");
  }
}

void PlanCheck::devices() {
  // Devices within budget, peaks add up.
  for (const DevicePlan& d : plan_.devices) {
    if (d.predicted_peak != d.arena_bytes + sum_bytes(d.reserve)) {
      problem(d.device, ": predicted peak ", d.predicted_peak, " != arena ", d.arena_bytes, " + reserve ",
              sum_bytes(d.reserve));
    }
    if (d.location.kind != Location::Kind::Disk && d.predicted_peak > d.budget) {
      problem(d.device, ": predicted peak ", d.predicted_peak, " exceeds the budget ", d.budget);
    }
  }
}

void PlanCheck::groups() {
  // Groups: targets agree with the device map; each stored tensor in at most one group; slots
  // hold every group.
  std::unordered_set<std::string> in_group;
  for (const OffloadGroup& g : plan_.groups) {
    if (g.component >= plan_.components.size()) {
      problem("group ", g.id, ": component out of range");
      continue;
    }
    const DevicePlan* gpu = plan_.find_device(Location::on_gpu(g.gpu));
    if (!gpu)
      problem("group ", g.id, ": GPU ", g.gpu, " has no device entry");
    else if (gpu->n_slots == 0 || gpu->slot_bytes < g.arena_bytes) {
      problem("group ", g.id, ": arena ", g.arena_bytes, " does not fit GPU ", g.gpu, "'s slots (",
              gpu->n_slots, " x ", gpu->slot_bytes, ")");
    }
    for (const GroupTensor& t : g.tensors) {
      const std::string key = str_cat(g.component, '/', t.name);
      if (!in_group.insert(key).second) problem("group ", g.id, ": tensor '", t.name, "' is in two groups");
      auto& locs = loc_of_[g.component];
      auto l = locs.find(t.name);
      if (l != locs.end() && !(l->second == g.target)) {
        problem("group ", g.id, ": tensor '", t.name, "' goes to ", g.target.str(),
                " but the device map says ", l->second.str());
      }
    }
  }
}

void PlanCheck::schedule() {
  // Schedule: every stored tensor runs exactly once (tied copies are not stored).
  std::unordered_map<std::string, int> runs;
  for (const ScheduleStep& s : plan_.schedule) {
    for (const std::string& t : s.tensors) ++runs[str_cat(s.component, '/', t)];
    if (s.group >= 0) {
      const OffloadGroup& g = plan_.groups[static_cast<size_t>(s.group)];
      if (g.gpu != s.gpu)
        problem("schedule: group ", s.group, " runs on GPU ", s.gpu, " but is streamed to GPU ", g.gpu);
    } else {
      for (const std::string& t : s.tensors) {
        auto& locs = loc_of_[s.component];
        auto l = locs.find(t);
        if (l != locs.end() && !(l->second == Location::on_gpu(s.gpu))) {
          problem("schedule: resident tensor '", t, "' runs on GPU ", s.gpu, " but the device map says ",
                  l->second.str());
        }
      }
    }
  }
  for (const ComponentInput& ci : input_.components) {
    auto it = comp_index_.find(ci.name);
    if (it == comp_index_.end()) continue;
    const size_t index = it->second;
    const ComponentPlan& cp = plan_.components[index];
    std::set<std::string> tied;
    for (const TiedAlias& t : cp.tied) tied.insert(t.alias);
    for (const TensorDesc& t : ci.tensors) {
      const int n = runs[str_cat(index, '/', t.name)];
      const int want = tied.count(t.name) ? 0 : 1;
      if (n != want)
        problem("schedule: tensor '", t.name, "' of component '", ci.name, "' runs ", n, " times");
    }
  }
}

}  // namespace

std::vector<std::string> check_plan(const Plan& plan, const PipelineInput& input) {
  return PlanCheck(plan, input).run();
}

std::vector<std::string> check_plan_phases(const Plan& plan) {
  std::vector<std::string> problems;
  detail::check_phases(plan, problems);
  return problems;
}

std::string detail::components_text(const Plan& plan) {
  std::string o;
  for (const ComponentPlan& c : plan.components) {
    std::map<std::string, uint64_t> per;
    for (const DeviceMapEntry& e : c.device_map) per[e.location.str()] += e.bytes;
    o += str_cat("  component '", c.name, "'", c.class_name.empty() ? "" : " (" + c.class_name + ")",
                 c.template_name.empty() ? ", heuristic order" : ", template " + c.template_name, ": ",
                 format_size(c.bytes), ", ", c.device_map.size(), " device_map key(s):");
    for (const auto& [loc, b] : per) o += str_cat(" ", loc, "=", format_size(b));
    o += "\n";
  }
  size_t shown = 0, offloaded = 0;
  for (const ComponentPlan& c : plan.components) {
    for (const DeviceMapEntry& e : c.device_map) {
      if (e.location.is_gpu()) continue;
      ++offloaded;
      if (shown == 0) o += "offloaded modules:\n";
      if (shown < 12) {
        o += str_cat("  ", c.name.empty() ? "" : c.name + ": ", e.prefix.empty() ? "(all)" : e.prefix, " -> ",
                     e.location.str(), " (", format_size(e.bytes), ")\n");
        ++shown;
      }
    }
  }
  if (offloaded > shown) o += str_cat("  ... and ", offloaded - shown, " more (reasons in the plan file)\n");
  if (offloaded > 0) {
    for (const ComponentPlan& c : plan.components) {
      for (const DeviceMapEntry& e : c.device_map) {
        if (!e.location.is_gpu()) {
          o += "reason: " + e.reason + "\n";
          return o;
        }
      }
    }
  }
  return o;
}

std::string plan_table(const Plan& plan) {
  if (!plan.phases.empty()) return detail::phases_table(plan) + detail::components_text(plan);
  std::string o;
  o += str_cat("plan for ", plan.checkpoint, "\n");
  o += str_cat("  strategy ", plan.settings.strategy, ", offload ", plan.settings.offload_mode);
  if (plan.settings.offload_mode == "block")
    o += str_cat(" (", plan.settings.blocks_per_group, " unit(s) per group)");
  if (plan.settings.prefetch) o += str_cat(", ", plan.settings.prefetch, " slot(s) per streaming GPU");
  o += str_cat(", tokens ", plan.settings.tokens, ", device profile ", plan.settings.profile_name, "\n");
  for (const std::string& n : plan.notes) o += "  note: " + n + "\n";
  o += "\n" + pad("device", 8) + pad("budget", 12, true) + pad("weights", 12, true) + pad("arena", 12, true) +
       pad("reserve", 12, true) + pad("peak", 12, true) + pad("free", 12, true) + "\n";
  for (const DevicePlan& d : plan.devices) {
    const uint64_t res = sum_bytes(d.reserve);
    const bool unlimited = d.budget == kUnlimited;
    o += pad(d.device, 8) + pad(unlimited ? "-" : format_size(d.budget), 12, true) +
         pad(format_size(d.weights_bytes), 12, true) + pad(format_size(d.arena_bytes), 12, true) +
         pad(format_size(res), 12, true) + pad(format_size(d.predicted_peak), 12, true) +
         pad(unlimited ? "-" : format_size(d.budget - std::min(d.budget, d.predicted_peak)), 12, true) + "\n";
    for (const ReserveItem& r : d.reserve) {
      o += "          " + pad(r.name, 18) + pad(format_size(r.bytes), 12, true) + "  " + r.detail + "\n";
    }
  }
  uint64_t cpu_groups = 0, disk_groups = 0, largest = 0;
  for (const OffloadGroup& g : plan.groups) {
    (g.target.kind == Location::Kind::Disk ? disk_groups : cpu_groups) += 1;
    largest = std::max(largest, g.arena_bytes);
  }
  o += str_cat("\non GPUs ", format_size(plan.gpu_bytes()), ", offloaded ",
               format_size(plan.offloaded_bytes()), " in ", plan.groups.size(), " group(s) (", cpu_groups,
               " cpu, ", disk_groups, " disk",
               plan.groups.empty() ? "" : str_cat(", largest ", format_size(largest)), ")\n");
  o += str_cat("predicted step ", fmt(plan.predicted_step_s * 1e3, "%.2f"), " ms (compute ",
               fmt(plan.compute_s * 1e3, "%.2f"), " ms, copies ", fmt(plan.transfer_s * 1e3, "%.2f"),
               " ms, overlapped through the slots)\n");
  return o + detail::components_text(plan);
}

std::string plan_svg(const Plan& plan) {
  if (!plan.phases.empty()) return detail::phases_svg(plan);
  const double width = 960, bar_h = 28, left = 90, right = 20, row = 64, top = 40;
  const double bar_w = width - left - right;
  std::string o;
  const size_t n = plan.devices.size();
  o += str_cat("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"", width, "\" height=\"",
               top + row * static_cast<double>(n) + 40, "\" font-family=\"sans-serif\" font-size=\"11\">\n");
  o += str_cat("<text x=\"10\" y=\"20\" font-size=\"14\">", xml_escape(plan.checkpoint), ": ",
               plan.settings.strategy, ", offload ", plan.settings.offload_mode, ", predicted step ",
               fmt(plan.predicted_step_s * 1e3, "%.1f"), " ms</text>\n");
  static const char* const kComponentColors[] = {"#4e79a7", "#59a14f", "#9c755f",
                                                 "#76b7b2", "#edc948", "#b07aa1"};
  // Module segments per location, in execution order.
  std::map<std::string, std::vector<std::pair<std::string, std::pair<uint64_t, size_t>>>> modules;
  for (size_t ci = 0; ci < plan.components.size(); ++ci) {
    for (const DeviceMapEntry& e : plan.components[ci].device_map) {
      const std::string label =
          plan.components[ci].name.empty() ? e.prefix : plan.components[ci].name + ":" + e.prefix;
      modules[e.location.str()].push_back({label, {e.bytes, ci}});
    }
  }
  for (size_t i = 0; i < n; ++i) {
    const DevicePlan& d = plan.devices[i];
    const double y = top + row * static_cast<double>(i);
    uint64_t scale_total =
        d.budget == kUnlimited ? std::max<uint64_t>(d.weights_bytes, 1) : std::max<uint64_t>(d.budget, 1);
    scale_total = std::max(scale_total, std::max<uint64_t>(d.predicted_peak, d.weights_bytes));
    const double px_per_byte = bar_w / static_cast<double>(scale_total);
    o += str_cat("<text x=\"10\" y=\"", y + bar_h / 2 + 4, "\">", xml_escape(d.device), "</text>\n");
    o += str_cat("<rect x=\"", left, "\" y=\"", y, "\" width=\"", bar_w, "\" height=\"", bar_h,
                 "\" fill=\"#ffffff\" stroke=\"#333\"/>\n");
    double x = left;
    auto seg = [&](uint64_t bytes, const std::string& fill, const std::string& title) {
      const double w = static_cast<double>(bytes) * px_per_byte;
      if (w <= 0) return;
      o += str_cat("<rect x=\"", fmt(x, "%.2f"), "\" y=\"", y, "\" width=\"", fmt(w, "%.2f"), "\" height=\"",
                   bar_h, "\" fill=\"", fill, "\" stroke=\"#fff\" stroke-width=\"0.3\"><title>",
                   xml_escape(title), " (", format_size(bytes), ")</title></rect>\n");
      x += w;
    };
    const std::string key = d.location.str();
    for (const auto& [label, v] : modules[key]) seg(v.first, kComponentColors[v.second % 6], label);
    if (d.location.is_gpu()) {
      // The resident arena's alignment and rounding.
      if (d.arena_bytes > d.weights_bytes)
        seg(d.arena_bytes - d.weights_bytes, "#cccccc", "alignment and allocation rounding");
    }
    for (const ReserveItem& r : d.reserve) {
      const std::string fill =
          r.name == "device_slots" ? "#f28e2b" : (r.name == "disk_staging" ? "#ff9da7" : "#bab0ac");
      seg(r.bytes, fill, r.name + ": " + r.detail);
    }
    o += str_cat("<text x=\"", left, "\" y=\"", y + bar_h + 14, "\">weights ", format_size(d.weights_bytes),
                 ", peak ", format_size(d.predicted_peak),
                 d.budget == kUnlimited ? std::string() : str_cat(" of ", format_size(d.budget)),
                 d.n_slots ? str_cat(", ", d.n_slots, " slots x ", format_size(d.slot_bytes)) : std::string(),
                 "</text>\n");
  }
  o += "</svg>\n";
  return o;
}

}  // namespace qtool::planner
