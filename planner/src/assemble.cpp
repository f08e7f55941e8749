// The plan file from the chosen outcome.
#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <numeric>
#include <unordered_map>

#include "planner_impl.hpp"
#include "qtool/formats/checked.hpp"
#include "qtool/formats/error.hpp"
#include "qtool/formats/size.hpp"
#include "qtool/libquant/config.hpp"
#include "qtool/libquant/quant.hpp"

namespace qtool::planner {

using namespace detail;

std::string Planner::unit_reason(const Outcome& o, uint32_t id) const {
  const int32_t g = o.unit_group[id];
  const GroupDraft& gd = o.groups[static_cast<size_t>(g)];
  uint64_t resident = 0;
  for (uint32_t u = 0; u < units_.size(); ++u) {
    if (o.gpu_of[u] >= 0 && units_[u].follow < 0) resident += units_[u].bytes;
  }
  std::string gpus;
  for (size_t pos = 0; pos < gpu_budget_.size(); ++pos) {
    gpus += str_cat(pos ? "; " : "", "GPU ", gpu_index_[pos], ": budget ", format_size(gpu_budget_[pos]),
                    ", reserve ", format_size(sum_bytes(gpu_reserve(opt_.profile, o.work[pos]))));
  }
  std::string why = str_cat(
      "does not fit: the GPUs keep ", format_size(resident), " of the ", format_size(total_bytes_),
      " of weights (", gpus, "); streamed to GPU ", gpu_index_[static_cast<size_t>(gd.exec)], " in group ", g,
      " (",
      o.cand.mode == OffloadMode::Leaf ? "one layer per group" : str_cat(o.cand.n, " unit(s) per group"),
      ", ", o.cand.k, " slot(s))");
  if (gd.target.kind == Location::Kind::Disk) {
    why += str_cat(" from disk: the cpu budget (", format_size(host_budget_), ") is full with pinned groups");
  } else {
    why += " from pinned host memory";
  }
  return why;
}

Plan Planner::assemble(const Outcome& o) const {
  Plan plan;
  const DeviceProfile& prof = opt_.profile;
  plan.checkpoint = in_.path;
  plan.fingerprint = in_.fingerprint;
  plan.qtool_version = opt_.qtool_version;
  Strategy strategy = opt_.strategy;
  if (strategy == Strategy::Auto)
    strategy = gpu_budget_.size() > 1 ? Strategy::Balanced : Strategy::Sequential;
  plan.settings.strategy = std::string(strategy_name(strategy));
  plan.settings.offload_mode =
      o.groups.empty() ? "none" : (o.cand.mode == OffloadMode::Leaf ? "leaf" : "block");
  plan.settings.blocks_per_group = o.groups.empty() ? 0 : (o.cand.mode == OffloadMode::Leaf ? 1 : o.cand.n);
  plan.settings.prefetch = o.groups.empty() ? 0 : o.cand.k;
  plan.settings.tokens = opt_.tokens;
  plan.settings.profile_name = prof.name;
  plan.settings.budget_note = opt_.budget.note;
  plan.profile = prof;

  for (size_t ci = 0; ci < comps_.size(); ++ci) plan.components.push_back(component_plan(ci, o, plan.notes));
  for (size_t g = 0; g < o.groups.size(); ++g) plan.groups.push_back(group_plan(g, o));
  std::vector<double> comp_time(comps_.size(), 0.0);
  for (const StepDraft& s : o.steps) {
    plan.schedule.push_back(schedule_step(s));
    comp_time[plan.schedule.back().component] += plan.schedule.back().compute_s;
  }
  for (size_t ci = 0; ci < comps_.size(); ++ci) plan.components[ci].step_s = comp_time[ci];
  order_components(plan);
  device_plans(o, plan);
  plan.predicted_step_s = o.step_s;
  plan.transfer_s = o.transfer_s;
  plan.compute_s = o.compute_s;
  plan_notes(plan);
  return plan;
}

ComponentPlan Planner::component_plan(size_t ci, const Outcome& o, std::vector<std::string>& notes) const {
  const CompData& cd = comps_[ci];
  ComponentPlan cp;
  cp.name = cd.name;
  cp.class_name = cd.class_name;
  cp.template_name = cd.tmpl ? cd.tmpl->name : std::string();
  cp.forward = cd.arch ? arch_name(*cd.arch) : std::string();
  cp.bytes = cd.bytes;
  const ModuleTree& tree = cd.tree;
  // The loader's module names drop the template's checkpoint prefix; only when every tensor has it
  // (a checkpoint laid out otherwise keeps its own names).
  if (cd.tmpl && !cd.tmpl->checkpoint_prefix.empty()) {
    const std::string& pre = cd.tmpl->checkpoint_prefix;
    const bool all = std::all_of(tree.tensors().begin(), tree.tensors().end(), [&](const TensorDesc& t) {
      return t.name.size() > pre.size() && t.name.starts_with(pre) && t.name[pre.size()] == '.';
    });
    if (all) {
      cp.checkpoint_prefix = pre;
      notes.push_back(str_cat(
          "component '", cd.name, "' (", cd.class_name,
          "): device_map keys are the module names of transformers >= 5, which loads the checkpoint's '", pre,
          ".*' into the model's root; for transformers 4.x, which keeps the '", pre,
          "' level, prefix every key with '", pre, ".' ('' becomes '", pre, "')"));
    }
  }
  for (size_t t = 0; t < tree.tensors().size(); ++t) {
    if (tree.tied_to()[t] >= 0)
      cp.tied.push_back(
          {tree.tensors()[t].name, tree.tensors()[static_cast<size_t>(tree.tied_to()[t])].name});
  }
  cp.device_map = device_map(cd, o);
  return cp;
}

// The device map of one component: a module whose tensors all live in one place is one entry,
// else its tensors and children are; entries in execution order, offloaded ones with their reason.
std::vector<DeviceMapEntry> Planner::device_map(const CompData& cd, const Outcome& o) const {
  const ModuleTree& tree = cd.tree;
  // Location code per unit: the GPU index, or kCpu / kDisk.
  constexpr int64_t kCpu = -1, kDisk = -2;
  auto unit_code = [&](uint32_t id) -> int64_t {
    const int32_t g = o.gpu_of[id];
    if (g >= 0) return gpu_index_[static_cast<size_t>(g)];
    const uint32_t owner = units_[id].follow >= 0 ? static_cast<uint32_t>(units_[id].follow) : id;
    const GroupDraft& gd = o.groups[static_cast<size_t>(o.unit_group[owner])];
    return gd.target.kind == Location::Kind::Disk ? kDisk : kCpu;
  };
  auto to_loc = [&](int64_t code) {
    if (code >= 0) return Location::on_gpu(static_cast<int32_t>(code));
    return code == kCpu ? Location::cpu() : Location::disk();
  };
  constexpr int64_t kNone = std::numeric_limits<int64_t>::min(), kMixed = std::numeric_limits<int64_t>::max();
  std::vector<int64_t> code(tree.nodes().size(), kNone);
  std::vector<int64_t> first_unit(tree.nodes().size(), std::numeric_limits<int64_t>::max());
  auto merge = [&](int64_t a, int64_t b) {
    if (a == kNone) return b;
    if (b == kNone) return a;
    return a == b ? a : kMixed;
  };
  for (size_t t = 0; t < tree.tensors().size(); ++t) {
    const int32_t u = cd.tensor_unit[t];
    const int32_t n = tree.tensor_module()[t];
    code[static_cast<size_t>(n)] = merge(code[static_cast<size_t>(n)], unit_code(static_cast<uint32_t>(u)));
    first_unit[static_cast<size_t>(n)] = std::min<int64_t>(first_unit[static_cast<size_t>(n)], u);
  }
  // Own tensors only so far; fold children in (children have larger ids).
  for (size_t k = tree.nodes().size(); k-- > 1;) {
    const size_t p = static_cast<size_t>(tree.node(static_cast<int32_t>(k)).parent);
    code[p] = merge(code[p], code[k]);
    first_unit[p] = std::min(first_unit[p], first_unit[k]);
  }
  std::vector<std::pair<int64_t, DeviceMapEntry>> entries;
  std::vector<int32_t> stack = {0};
  while (!stack.empty()) {
    const int32_t id = stack.back();
    stack.pop_back();
    const ModuleNode& n = tree.node(id);
    if (code[static_cast<size_t>(id)] != kMixed) {
      entries.push_back({first_unit[static_cast<size_t>(id)],
                         {n.prefix, to_loc(code[static_cast<size_t>(id)]), "", n.bytes}});
      continue;
    }
    for (uint32_t t : n.tensors) {
      entries.push_back({cd.tensor_unit[t],
                         {tree.tensors()[t].name, to_loc(unit_code(static_cast<uint32_t>(cd.tensor_unit[t]))),
                          "", tree.counted_bytes()[t]}});
    }
    for (int32_t c : n.children) stack.push_back(c);
  }
  std::vector<DeviceMapEntry> map;
  std::stable_sort(entries.begin(), entries.end(),
                   [](const auto& a, const auto& b) { return a.first < b.first; });
  for (auto& [u, e] : entries) {
    if (!e.location.is_gpu()) {
      const uint32_t owner = units_[static_cast<size_t>(u)].follow >= 0
                                 ? static_cast<uint32_t>(units_[static_cast<size_t>(u)].follow)
                                 : static_cast<uint32_t>(u);
      e.reason = unit_reason(o, owner);
    }
    map.push_back(std::move(e));
  }
  return map;
}

std::vector<DraftModule> Planner::draft_modules(const std::vector<uint32_t>& units, int32_t leaf) const {
  std::vector<DraftModule> out;
  for (uint32_t id : units) {
    const UnitInfo& u = units_[id];
    out.push_back({&u, leaf >= 0 ? &u.leaves[static_cast<size_t>(leaf)] : nullptr});
  }
  return out;
}

OffloadGroup Planner::group_plan(size_t g, const Outcome& o) const {
  const GroupDraft& gd = o.groups[g];
  OffloadGroup og;
  og.id = static_cast<uint32_t>(g);
  og.component = units_[gd.units.front()].comp;
  std::vector<uint64_t> sizes;
  const ModuleTree& tree = comps_[og.component].tree;
  const auto add = [&](const Leaf& l) {
    for (uint32_t t : l.tensors) og.tensors.push_back({tree.tensors()[t].name, tree.tensors()[t].nbytes, 0});
  };
  for (const DraftModule& m : draft_modules(gd.units, gd.leaf)) {
    og.modules.push_back(m.prefix());
    if (m.leaf) {
      add(*m.leaf);
    } else {
      for (const Leaf& l : m.unit->leaves) add(l);
    }
  }
  for (const GroupTensor& t : og.tensors) sizes.push_back(t.nbytes);
  const ArenaLayout layout = layout_arena(sizes);
  for (size_t i = 0; i < og.tensors.size(); ++i) og.tensors[i].arena_offset = layout.offsets[i];
  og.bytes = gd.bytes;
  og.arena_bytes = layout.total;
  og.target = gd.target;
  og.gpu = gpu_index_[static_cast<size_t>(gd.exec)];
  og.copy_s = copy_seconds(og.arena_bytes, og.target, opt_.profile);
  return og;
}

ScheduleStep Planner::schedule_step(const StepDraft& s) const {
  ScheduleStep st;
  const UnitInfo& first = units_[s.units.front()];
  st.component = first.comp;
  st.gpu = gpu_index_[static_cast<size_t>(s.exec)];
  st.group = s.group;
  const ModuleTree& tree = comps_[st.component].tree;
  for (const DraftModule& m : draft_modules(s.units, s.leaf)) {
    const UnitInfo& u = *m.unit;
    st.modules.push_back(m.prefix());
    if (m.leaf) {
      for (uint32_t t : m.leaf->tensors) st.tensors.push_back(tree.tensors()[t].name);
      for (const LinearOp& op : u.linears) {
        if (op.module == m.leaf->prefix) st.linears.push_back(op);
      }
    } else {
      for (uint32_t t : u.tensors) {
        if (tree.tied_to()[t] < 0 && !tree.tensors()[t].absent) st.tensors.push_back(tree.tensors()[t].name);
      }
      st.linears.insert(st.linears.end(), u.linears.begin(), u.linears.end());
    }
  }
  const CompData& cd = comps_[st.component];
  for (const LinearOp& op : st.linears) {
    const uint64_t rows = cd.arch ? linear_rows(*cd.arch, op.module, cd.tokens) : opt_.tokens;
    st.flops += linear_flops(rows, op);
    st.compute_s += linear_seconds(op, rows, opt_.profile);
  }
  for (uint32_t id : s.units)
    if (cd.arch && units_[id].is_block && s.leaf <= 0) st.compute_s += cd.forward_ops_s_per_block;
  return st;
}

// Components in execution order in the file (groups and steps renumbered).
void Planner::order_components(Plan& plan) const {
  std::vector<ComponentPlan> ordered;
  std::vector<uint32_t> new_index(comps_.size());
  for (size_t i = 0; i < comp_order_.size(); ++i) {
    new_index[comp_order_[i]] = static_cast<uint32_t>(i);
    ordered.push_back(std::move(plan.components[comp_order_[i]]));
  }
  plan.components = std::move(ordered);
  for (OffloadGroup& g : plan.groups) g.component = new_index[g.component];
  for (ScheduleStep& s : plan.schedule) s.component = new_index[s.component];
}

void Planner::device_plans(const Outcome& o, Plan& plan) const {
  const uint64_t gran = opt_.profile.alloc_granularity_bytes;
  uint64_t cpu_weights = 0, disk_weights = 0;
  for (const GroupDraft& g : o.groups)
    (g.target.kind == Location::Kind::Disk ? disk_weights : cpu_weights) += g.bytes;
  for (size_t pos = 0; pos < gpu_budget_.size(); ++pos) {
    DevicePlan d;
    d.device = str_cat("cuda:", gpu_index_[pos]);
    d.location = Location::on_gpu(gpu_index_[pos]);
    d.budget = gpu_budget_[pos];
    d.budget_source = gpu_source_[pos];
    uint64_t arena = 0;
    for (uint32_t id = 0; id < units_.size(); ++id) {
      if (o.gpu_of[id] == static_cast<int32_t>(pos) && units_[id].follow < 0) {
        d.weights_bytes += units_[id].bytes;
        arena += arena_[id];
      }
    }
    d.arena_bytes = round_up(arena, gran);
    d.reserve = gpu_reserve(opt_.profile, o.work[pos]);
    d.n_slots = o.work[pos].n_slots;
    d.slot_bytes = o.work[pos].slot_bytes;
    d.predicted_peak = d.arena_bytes + sum_bytes(d.reserve);
    plan.devices.push_back(std::move(d));
  }
  {
    DevicePlan d;
    d.device = "cpu";
    d.location = Location::cpu();
    d.budget = host_budget_;
    d.budget_source = host_source_;
    d.weights_bytes = cpu_weights;
    d.arena_bytes = o.host_pinned;
    if (o.host_staging) {
      d.reserve.push_back(
          {"disk_staging", o.host_staging,
           str_cat(std::max<uint32_t>(o.cand.k, 1), " pinned staging buffers for groups read from disk")});
    }
    d.predicted_peak = d.arena_bytes + sum_bytes(d.reserve);
    plan.devices.push_back(std::move(d));
  }
  if (disk_weights) {
    DevicePlan d;
    d.device = "disk";
    d.location = Location::disk();
    d.budget = kUnlimited;
    d.budget_source = "the checkpoint files (read in place)";
    d.weights_bytes = disk_weights;
    plan.devices.push_back(std::move(d));
  }
}

void Planner::plan_notes(Plan& plan) const {
  const DeviceProfile& prof = opt_.profile;
  if (!opt_.budget.note.empty()) plan.notes.push_back(opt_.budget.note);
  if (!opt_.budget.cpu) plan.notes.push_back(str_cat("cpu budget: ", host_source_));
  plan.notes.push_back(str_cat("device profile '", prof.name, "': h2d ", prof.h2d_pinned_gbps,
                               " GB/s pinned, bf16 ", prof.bf16_tflops, " TFLOP/s, context ",
                               format_size(prof.context_bytes)));
  for (const CompData& cd : comps_) {
    if (!cd.tmpl) {
      plan.notes.push_back(str_cat("component '", cd.name, "' (",
                                   cd.class_name.empty() ? "no class name" : cd.class_name,
                                   "): no model template, heuristic execution order"));
    }
  }
}

}  // namespace qtool::planner
