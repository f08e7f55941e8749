#include "qtool/runner/schedule.hpp"

#include <algorithm>
#include <cstring>
#include <set>
#include <unordered_map>
#include <unordered_set>

#include "qtool/formats/checked.hpp"
#include "qtool/formats/error.hpp"
#include "qtool/libquant/config.hpp"
#include "qtool/libquant/quant.hpp"
#include "qtool/runner/plan_checks.hpp"
#include "run_support.hpp"

namespace qtool::runner {
namespace {

std::string label(const std::string& component, std::string_view name) {
  return component.empty() ? std::string(name) : component + "/" + std::string(name);
}

std::string join_modules(const std::string& component, const std::vector<std::string>& modules) {
  std::string s = component.empty() ? std::string() : component + ": ";
  const size_t shown = std::min<size_t>(modules.size(), 3);
  for (size_t i = 0; i < shown; ++i)
    s += (i ? ", " : "") + (modules[i].empty() ? std::string("(root)") : modules[i]);
  if (modules.size() > shown) s += str_cat(" ... (", modules.size(), " units)");
  return s;
}

// A linear of a component before it is placed: its kind, shape and part tensors by name.
struct LinearDesc {
  std::string module;
  std::string scheme;
  DequantParams params;
  std::string part_name[kNumParts];
  std::vector<std::string> all_tensors;  // weight and every quant-state tensor
};

std::unordered_map<std::string, LinearDesc> linears_of(const Component& comp) {
  std::unordered_map<std::string, LinearDesc> by_weight;
  std::unordered_set<std::string> quantized_tensors;
  for (const quant::QuantizedLinear& ql : quant::find_quantized_linears(comp)) {
    LinearDesc d;
    d.module = ql.module;
    d.scheme = std::string(quant::scheme_name(ql.options.scheme));
    d.params = quantized_params(ql, comp);
    d.params.weight = d.params.scale = d.params.quant_map = d.params.nested_absmax =
        d.params.nested_quant_map = nullptr;
    std::string weight;
    for (size_t k = 0; k < ql.tensor_names.size(); ++k) {
      quantized_tensors.insert(ql.tensor_names[k]);
      d.all_tensors.push_back(ql.tensor_names[k]);
      const int slot = part_slot(ql.tensor_parts[k]);
      if (slot >= 0) d.part_name[slot] = ql.tensor_names[k];
      if (ql.tensor_parts[k] == quant::Part::Weight) weight = ql.tensor_names[k];
    }
    QTOOL_ASSERT(!weight.empty());
    by_weight.emplace(weight, std::move(d));
  }
  for (const auto& e : comp.entries()) {
    const TensorInfo& info = comp.info(e);
    if (quantized_tensors.count(info.name)) continue;
    // libquant's rule for what is a linear, plus the output head: it runs as a GEMM although
    // loaders keep it unquantized (the planner's cost model counts it too).
    const std::string module = quant::module_of_tensor(info.name);
    const bool head = module.size() >= 7 && module.compare(module.size() - 7, 7, "lm_head") == 0 &&
                      (module.size() == 7 || module[module.size() - 8] == '.') && info.shape.size() == 2 &&
                      info.name == module + ".weight";
    if (!head && quant::linear_exclusion(info.name, info.dtype, info.shape)) continue;
    const auto kind = weight_kind_of(info.dtype);
    if (!kind) continue;
    LinearDesc d;
    d.module = quant::module_of_tensor(info.name);
    d.scheme = *kind == WeightKind::Bf16 ? "bf16" : *kind == WeightKind::F16 ? "f16" : "f32";
    d.params.kind = *kind;
    d.params.rows = static_cast<uint64_t>(info.shape[0]);
    d.params.cols = static_cast<uint64_t>(info.shape[1]);
    d.part_name[kPartWeight] = info.name;
    d.all_tensors.push_back(info.name);
    by_weight.emplace(info.name, std::move(d));
  }
  return by_weight;
}

uint64_t key_of(uint32_t ci, Component::Entry e) {
  return (static_cast<uint64_t>(ci) << 48) | (static_cast<uint64_t>(e.shard) << 32) | e.index;
}

// Every tensor of every component as a forward asks for it (Schedule::weights), and the plan's
// tied aliases.
void index_weights(const Checkpoint& checkpoint, const planner::Plan& plan,
                   const std::vector<uint32_t>& comp_of, Schedule& s) {
  const auto& comps = checkpoint.components();
  s.weights.assign(comps.size(), {});
  s.tied.assign(comps.size(), {});
  for (size_t pi = 0; pi < plan.components.size(); ++pi)
    for (const planner::TiedAlias& t : plan.components[pi].tied) s.tied[comp_of[pi]][t.alias] = t.primary;
  for (size_t ci = 0; ci < comps.size(); ++ci) {
    const Component& comp = comps[ci];
    auto& map = s.weights[ci];
    std::unordered_set<std::string> in_linears;
    for (const quant::QuantizedLinear& ql : quant::find_quantized_linears(comp)) {
      WeightRef w;
      w.component = static_cast<uint32_t>(ci);
      w.params = quantized_params(ql, comp);
      w.params.weight = w.params.scale = w.params.quant_map = w.params.nested_absmax =
          w.params.nested_quant_map = nullptr;
      std::string weight;
      for (size_t k = 0; k < ql.tensor_names.size(); ++k) {
        const Component::Entry e = *comp.find(ql.tensor_names[k]);
        in_linears.insert(ql.tensor_names[k]);
        w.tensors.push_back(e);
        const int slot = part_slot(ql.tensor_parts[k]);
        if (slot >= 0) {
          w.part_entry[slot] = e;
          w.has_part[slot] = true;
        }
        if (ql.tensor_parts[k] == quant::Part::Weight) weight = ql.tensor_names[k];
      }
      map.emplace(weight, std::move(w));
    }
    for (const Component::Entry& e : comp.entries()) {
      const TensorInfo& info = comp.info(e);
      if (in_linears.count(info.name)) continue;
      const auto kind = weight_kind_of(info.dtype);
      if (!kind) continue;
      WeightRef w;
      w.component = static_cast<uint32_t>(ci);
      w.params.kind = *kind;
      const auto& sh = info.shape;
      w.params.rows = sh.size() >= 2 ? static_cast<uint64_t>(sh[0]) : 1;
      w.params.cols = sh.empty() ? 1 : static_cast<uint64_t>(sh.size() == 1 ? sh[0] : 1);
      if (sh.size() >= 2) {
        w.params.cols = 1;
        for (size_t d = 1; d < sh.size(); ++d) w.params.cols *= static_cast<uint64_t>(sh[d]);
      }
      w.part_entry[kPartWeight] = e;
      w.has_part[kPartWeight] = true;
      w.tensors.push_back(e);
      map.emplace(info.name, std::move(w));
    }
  }
}

}  // namespace

int part_slot(quant::Part part) {
  switch (part) {
    case quant::Part::Weight: return kPartWeight;
    case quant::Part::Scale: return kPartScale;
    case quant::Part::QuantMap: return kPartQuantMap;
    case quant::Part::NestedAbsmax: return kPartNestedAbsmax;
    case quant::Part::NestedQuantMap: return kPartNestedQuantMap;
    case quant::Part::WeightFormat:
    case quant::Part::QuantState: return -1;
  }
  return -1;
}

uint64_t Schedule::offset_in(uint32_t arena, uint32_t component, Component::Entry entry) const {
  const auto& index = arenas[arena].index;
  const auto it = index.find(key_of(component, entry));
  return it == index.end() ? kNoPart : it->second;
}

const WeightRef* Schedule::find_weight(uint32_t component, std::string_view name) const {
  const auto& map = weights.at(component);
  std::string key(name);
  if (const auto t = tied.at(component).find(key); t != tied.at(component).end() && !map.count(key))
    key = t->second;
  const auto it = map.find(key);
  return it == map.end() ? nullptr : &it->second;
}

DequantParams Schedule::bind_weight(const WeightRef& w, uint32_t arena, const uint8_t* base) const {
  const uint8_t* ptr[kNumParts] = {};
  for (int k = 0; k < kNumParts; ++k) {
    if (!w.has_part[k]) continue;
    const uint64_t off = offset_in(arena, w.component, w.part_entry[k]);
    if (off == kNoPart) return DequantParams{};
    ptr[k] = base + off;
  }
  return with_parts(w.params, [&](int k) { return ptr[k]; });
}

DequantParams quantized_params(const quant::QuantizedLinear& ql, const Component& comp) {
  DequantParams p;
  p.kind = weight_kind_of(ql.options.scheme);
  p.scheme = static_cast<uint8_t>(ql.options.scheme);
  p.orig_dtype = static_cast<uint8_t>(ql.orig_dtype);
  p.rows = static_cast<uint64_t>(ql.rows());
  p.cols = static_cast<uint64_t>(ql.cols());
  p.blocksize = ql.options.blocksize;
  p.double_quant = ql.options.double_quant;
  p.per_tensor = ql.options.per_tensor;
  p.nested_offset = ql.nested_offset;
  for (size_t k = 0; k < ql.tensor_names.size(); ++k) {
    const auto e = comp.find(ql.tensor_names[k]);
    QTOOL_ASSERT(e.has_value());
    const uint8_t* data = comp.data(*e).data();
    switch (ql.tensor_parts[k]) {
      case quant::Part::Weight: p.weight = data; break;
      case quant::Part::Scale:
        p.scale = data;
        if (const DType dt = comp.info(*e).dtype;
            dt == DType::BF16 || dt == DType::F16)  // fp8's weight_scale
          p.scale_type = dt == DType::BF16 ? ScaleType::Bf16 : ScaleType::F16;
        break;
      case quant::Part::QuantMap: p.quant_map = data; break;
      case quant::Part::NestedAbsmax: p.nested_absmax = data; break;
      case quant::Part::NestedQuantMap: p.nested_quant_map = data; break;
      case quant::Part::WeightFormat:
      case quant::Part::QuantState: break;
    }
  }
  return p;
}

const char* placement_name(Placement placement) {
  static constexpr std::array<const char*, 3> kNames = {"gpu", "cpu", "disk"};
  static_assert(kNames.size() == static_cast<size_t>(Placement::Disk) + 1);
  return enum_name(placement, kNames);
}

namespace {

// What build_schedule learns from the plan as it goes: the checkpoint's components by the plan's
// index, and where each tensor (component, shard, index) was placed.
struct PlanPlacement {
  const Checkpoint& checkpoint;
  std::vector<uint32_t> comp_of;                                          // plan component -> checkpoint's
  std::vector<std::unordered_map<uint64_t, uint64_t>> group_offset;       // per group id: tensor -> offset
  std::map<int, std::unordered_map<uint64_t, uint64_t>> resident_offset;  // per GPU: tensor -> offset
  std::unordered_set<uint64_t> placed;  // every tensor must end up somewhere
  std::set<int> devices;

  const Component& comp(uint32_t ci) const { return checkpoint.components()[ci]; }
  // The entry of tensor `name` of component `ci`; Error(InvalidInput) naming `where` if absent.
  Component::Entry lookup(uint32_t ci, const std::string& name, const std::string& where) const {
    const auto e = comp(ci).find(name);
    if (!e)
      fail(ErrorKind::InvalidInput, where, ": tensor '", label(comp(ci).name(), name),
           "' is not in the checkpoint ", checkpoint.root().string());
    return *e;
  }
};

PlanPlacement map_components(const Checkpoint& checkpoint, const planner::Plan& plan) {
  PlanPlacement pp{checkpoint, std::vector<uint32_t>(plan.components.size()), {}, {}, {}, {}};
  pp.group_offset.resize(plan.groups.size());
  const auto& comps = checkpoint.components();
  for (size_t i = 0; i < plan.components.size(); ++i) {
    const Component* c = checkpoint.find_component(plan.components[i].name);
    if (!c)
      fail(ErrorKind::InvalidInput, "the plan's component '", plan.components[i].name,
           "' is not in the checkpoint ", checkpoint.root().string());
    pp.comp_of[i] = static_cast<uint32_t>(c - comps.data());
  }
  return pp;
}

// One arena per offload group, its tensors where the plan puts them.
void add_group_arenas(const planner::Plan& plan, PlanPlacement& pp, Schedule& s) {
  for (const planner::OffloadGroup& g : plan.groups) {
    const std::string where = str_cat("plan group ", g.id);
    if (g.gpu < 0) fail(ErrorKind::InvalidInput, where, ": gpu ", g.gpu, " is not a GPU index");
    const uint32_t ci = pp.comp_of.at(g.component);
    const Component& comp = pp.comp(ci);
    Arena a;
    a.name = str_cat("group ", g.id, " (", join_modules(comp.name(), g.modules), ")");
    a.placement = g.target.kind == planner::Location::Kind::Disk ? Placement::Disk : Placement::Cpu;
    a.device = g.gpu;
    a.bytes = g.arena_bytes;
    for (const planner::GroupTensor& t : g.tensors) {
      const Component::Entry e = pp.lookup(ci, t.name, where);
      const uint64_t nbytes = comp.info(e).nbytes();
      if (nbytes != t.nbytes)
        fail(ErrorKind::InvalidInput, where, ": tensor '", label(comp.name(), t.name), "' has ", nbytes,
             " bytes in the checkpoint but ", t.nbytes, " in the plan");
      const auto tensor_end = checked_add(t.arena_offset, nbytes);
      if (t.arena_offset % kArenaAlign != 0 || !tensor_end || *tensor_end > g.arena_bytes)
        fail(ErrorKind::InvalidInput, where, ": tensor '", t.name, "' at arena_offset ", t.arena_offset,
             " is misaligned or ends past arena_bytes ", g.arena_bytes);
      a.tensors.push_back({ci, e, t.arena_offset, nbytes});
      a.index.emplace(key_of(ci, e), t.arena_offset);
      a.payload_bytes += nbytes;
      pp.group_offset[g.id].emplace(key_of(ci, e), t.arena_offset);
      pp.placed.insert(key_of(ci, e));
    }
    pp.devices.insert(g.gpu);
    s.arenas.push_back(std::move(a));
  }
}

// Resident arenas: the tensors of each GPU's resident steps, in schedule order, laid out as the
// planner lays them out.
void add_resident_arenas(const planner::Plan& plan, PlanPlacement& pp, Schedule& s) {
  std::map<int, std::vector<std::pair<uint32_t, Component::Entry>>> resident_tensors;
  for (size_t si = 0; si < plan.schedule.size(); ++si) {
    const planner::ScheduleStep& st = plan.schedule[si];
    if (st.gpu < 0)
      fail(ErrorKind::InvalidInput, "plan schedule[", si, "]: gpu ", st.gpu, " is not a GPU index");
    pp.devices.insert(st.gpu);
    if (st.group >= 0) continue;
    const uint32_t ci = pp.comp_of.at(st.component);
    auto& list = resident_tensors[st.gpu];
    auto& offs = pp.resident_offset[st.gpu];
    for (const std::string& name : st.tensors) {
      const Component::Entry e = pp.lookup(ci, name, str_cat("plan schedule[", si, "]"));
      if (offs.emplace(key_of(ci, e), 0).second) list.emplace_back(ci, e);
    }
  }
  for (auto& [gpu, list] : resident_tensors) {
    std::vector<uint64_t> sizes;
    for (const auto& [ci, e] : list) sizes.push_back(pp.comp(ci).info(e).nbytes());
    const planner::ArenaLayout layout = planner::layout_arena(sizes);
    Arena a;
    a.name = str_cat("gpu", gpu, " resident");
    a.placement = Placement::Resident;
    a.device = gpu;
    a.bytes = layout.total;
    for (size_t i = 0; i < list.size(); ++i) {
      const uint64_t key = key_of(list[i].first, list[i].second);
      a.tensors.push_back({list[i].first, list[i].second, layout.offsets[i], sizes[i]});
      a.index.emplace(key, layout.offsets[i]);
      a.payload_bytes += sizes[i];
      pp.resident_offset[gpu][key] = layout.offsets[i];
      pp.placed.insert(key);
    }
    s.resident_arena[gpu] = static_cast<uint32_t>(s.arenas.size());
    s.arenas.push_back(std::move(a));
  }
}

// The device slots per streaming GPU: the plan's prefetch, or more where a device asks for more.
uint32_t slots_of(const planner::Plan& plan) {
  uint32_t n = std::max<uint32_t>(1, plan.settings.prefetch);
  for (const planner::DevicePlan& d : plan.devices)
    if (d.location.is_gpu() && d.n_slots > 0) n = std::max(n, d.n_slots);
  if (n > planner::kMaxPrefetch)
    fail(ErrorKind::InvalidInput, "the plan asks for ", n, " device slots per GPU (settings.prefetch, ",
         "devices[].n_slots); at most ", planner::kMaxPrefetch);
  return n;
}

// Everything must be placed: tied aliases excepted (they use their primary's memory).
void check_all_placed(const planner::Plan& plan, const PlanPlacement& pp) {
  for (size_t pi = 0; pi < plan.components.size(); ++pi) {
    const uint32_t ci = pp.comp_of[pi];
    std::unordered_set<std::string> aliases;
    for (const planner::TiedAlias& t : plan.components[pi].tied) aliases.insert(t.alias);
    for (const auto& e : pp.comp(ci).entries()) {
      const std::string& name = pp.comp(ci).info(e).name;
      if (!pp.placed.count(key_of(ci, e)) && !aliases.count(name))
        fail(ErrorKind::InvalidInput, "the plan places no group or resident step holding tensor '",
             label(pp.comp(ci).name(), name), "' of ", pp.checkpoint.root().string(),
             " (was the plan made for another checkpoint?)");
    }
  }
}

// Schedule step `si`'s tensors: where each is in the step's arena.
struct StepTensors {
  const PlanPlacement& pp;
  const planner::ScheduleStep& st;
  uint32_t ci;
  bool streamed;
  std::string where;  // "plan schedule[3]"
  std::optional<uint64_t> offset_of(const std::string& name) const {
    const uint64_t k = key_of(ci, pp.lookup(ci, name, where));
    const auto& m = streamed ? pp.group_offset[static_cast<size_t>(st.group)] : pp.resident_offset.at(st.gpu);
    const auto it = m.find(k);
    if (it == m.end()) return std::nullopt;
    return it->second;
  }
};

// The linear of weight `d` run by the step, every part of it in the step's arena.
LinearTask make_linear_task(const StepTensors& t, const LinearDesc& d, const Schedule& s) {
  const Component& comp = t.pp.comp(t.ci);
  LinearTask task;
  task.id = static_cast<uint32_t>(s.linears.size());
  task.step = static_cast<uint32_t>(s.steps.size());
  task.component = comp.name();
  task.component_index = t.ci;
  task.module = d.module;
  task.scheme = d.scheme;
  task.params = d.params;
  for (const std::string& part : d.all_tensors) {
    if (!t.offset_of(part))
      fail(ErrorKind::InvalidInput, t.where, ": the quant state '", label(comp.name(), part), "' of linear '",
           d.module, "' is not in the same ", t.streamed ? "group" : "resident arena",
           " as its weight: a weight and its quant state must travel together");
    task.weight_bytes += comp.info(t.pp.lookup(t.ci, part, t.where)).nbytes();
  }
  for (int p = 0; p < kNumParts; ++p) {
    if (d.part_name[p].empty()) continue;
    const Component::Entry e = t.pp.lookup(t.ci, d.part_name[p], t.where);
    task.part_offset[p] = *t.offset_of(d.part_name[p]);
    task.part_bytes[p] = comp.info(e).nbytes();
    task.part_entry[static_cast<size_t>(p)] = e;
  }
  return task;
}

// The plan's steps in order, and the linears each runs.
void add_steps(const planner::Plan& plan, const PlanPlacement& pp, Schedule& s) {
  const size_t n_comps = pp.checkpoint.components().size();
  std::vector<std::unordered_map<std::string, LinearDesc>> linears_by_comp(n_comps);
  std::vector<bool> have_linears(n_comps, false);
  for (size_t si = 0; si < plan.schedule.size(); ++si) {
    const planner::ScheduleStep& st = plan.schedule[si];
    const uint32_t ci = pp.comp_of.at(st.component);
    if (!have_linears[ci]) {
      linears_by_comp[ci] = linears_of(pp.comp(ci));
      have_linears[ci] = true;
    }
    ExecStep x;
    x.name = join_modules(pp.comp(ci).name(), st.modules);
    x.modules = st.modules;
    x.component = ci;
    x.device = st.gpu;
    x.streamed = st.group >= 0;
    x.arena = x.streamed ? static_cast<uint32_t>(st.group) : s.resident_arena.at(st.gpu);
    x.predicted_compute_s = st.compute_s;
    const StepTensors tensors{pp, st, ci, x.streamed, str_cat("plan schedule[", si, "]")};
    if (x.streamed && plan.groups[static_cast<size_t>(st.group)].gpu != st.gpu)
      fail(ErrorKind::InvalidInput, tensors.where, ": runs on gpu ", st.gpu, " but its group ", st.group,
           " is streamed to gpu ", plan.groups[static_cast<size_t>(st.group)].gpu);
    for (const std::string& name : st.tensors) {
      if (!tensors.offset_of(name))
        fail(ErrorKind::InvalidInput, tensors.where, ": tensor '", label(pp.comp(ci).name(), name),
             "' is not in ",
             x.streamed ? str_cat("its group ", st.group) : str_cat("gpu ", st.gpu, "'s resident arena"));
      const auto it = linears_by_comp[ci].find(name);
      if (it == linears_by_comp[ci].end()) continue;
      LinearTask task = make_linear_task(tensors, it->second, s);
      x.flops_per_token += 2 * task.params.rows * task.params.cols;
      x.linears.push_back(task.id);
      s.linears.push_back(std::move(task));
    }
    s.steps.push_back(std::move(x));
  }
}

}  // namespace

Schedule build_schedule(const Checkpoint& checkpoint, const planner::Plan& plan) {
  Schedule s;
  PlanPlacement pp = map_components(checkpoint, plan);
  add_group_arenas(plan, pp, s);
  add_resident_arenas(plan, pp, s);
  s.devices.assign(pp.devices.begin(), pp.devices.end());
  s.n_slots = slots_of(plan);
  check_all_placed(plan, pp);
  add_steps(plan, pp, s);
  check_plan_consistency(checkpoint, plan, s);
  index_weights(checkpoint, plan, pp.comp_of, s);
  return s;
}

DequantParams Schedule::bind(const LinearTask& linear, const uint8_t* base) const {
  return with_parts(linear.params, [&](int slot) -> const uint8_t* {
    return linear.part_offset[slot] == kNoPart ? nullptr : base + linear.part_offset[slot];
  });
}

DequantParams Schedule::bind_mapped(const LinearTask& linear, const Checkpoint& checkpoint) const {
  const Component& comp = checkpoint.components()[linear.component_index];
  return with_parts(linear.params, [&](int slot) -> const uint8_t* {
    if (linear.part_offset[slot] == kNoPart) return nullptr;
    return comp.data(linear.part_entry[static_cast<size_t>(slot)]).data();
  });
}

bool Schedule::arena_used(size_t arena) const {
  if (!arenas[arena].streamed()) return true;
  for (const ExecStep& st : steps)
    if (st.arena == arena) return true;
  return false;
}

uint64_t Schedule::slot_bytes(int device) const {
  uint64_t m = 0;
  for (const ExecStep& st : steps)
    if (st.device == device && st.streamed) m = std::max(m, arenas[st.arena].bytes);
  return m;
}

uint64_t Schedule::max_in(int device) const {
  uint64_t m = 0;
  for (const LinearTask& l : linears)
    if (steps[l.step].device == device) m = std::max(m, l.in());
  return m;
}

uint64_t Schedule::max_out(int device) const {
  uint64_t m = 0;
  for (const LinearTask& l : linears)
    if (steps[l.step].device == device) m = std::max(m, l.out());
  return m;
}

size_t Schedule::n_linears(int device) const {
  size_t n = 0;
  for (const LinearTask& l : linears)
    if (steps[l.step].device == device) ++n;
  return n;
}

uint64_t Schedule::streamed_bytes() const {
  uint64_t sum = 0;
  for (const ExecStep& st : steps)
    if (st.streamed) sum += arenas[st.arena].bytes;
  return sum;
}

uint64_t Schedule::max_staging_bytes() const {
  uint64_t m = 0;
  for (const ExecStep& st : steps)
    if (st.streamed && arenas[st.arena].placement == Placement::Disk) m = std::max(m, arenas[st.arena].bytes);
  return m;
}

void fill_arena(const Checkpoint& checkpoint, const Arena& arena, uint8_t* dst) {
  std::vector<const ArenaTensor*> order;
  for (const ArenaTensor& t : arena.tensors) order.push_back(&t);
  std::sort(order.begin(), order.end(),
            [](const ArenaTensor* a, const ArenaTensor* b) { return a->offset < b->offset; });
  uint64_t pos = 0;
  for (const ArenaTensor* t : order) {
    if (t->offset > pos) std::memset(dst + pos, 0, t->offset - pos);
    const auto src = checkpoint.components()[t->component].data(t->entry);
    QTOOL_ASSERT(src.size() == t->nbytes);
    if (t->nbytes) std::memcpy(dst + t->offset, src.data(), t->nbytes);
    pos = t->offset + t->nbytes;
  }
  if (arena.bytes > pos) std::memset(dst + pos, 0, arena.bytes - pos);
}

}  // namespace qtool::runner
