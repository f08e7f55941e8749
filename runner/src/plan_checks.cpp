#include "qtool/runner/plan_checks.hpp"

#include <algorithm>
#include <cstring>
#include <map>
#include <optional>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "qtool/formats/error.hpp"
#include "qtool/libquant/quant.hpp"
#include "qtool/planner/module_tree.hpp"

namespace qtool::runner {
namespace {

using planner::Location;

// Where the groups and the schedule put one tensor.
struct Where {
  int32_t group = -1;  // >= 0: in this group
  int32_t step = -1;   // the step that lists it (-1: none yet)
  int32_t gpu = -1;    // resident: its GPU
  Location location() const {
    return gpu >= 0 ? Location::on_gpu(gpu) : Location::cpu();  // groups: replaced by their target
  }
};

std::string shape_str(int64_t out, int64_t in) { return str_cat("[", out, ", ", in, "]"); }

std::optional<std::string> dtype_kind(DType dt) {
  switch (dt) {
    case DType::BF16: return "bf16";
    case DType::F16: return "f16";
    case DType::F32: return "f32";
    default: return std::nullopt;
  }
}

// "a.b.c" -> "a.b" -> "a" -> "": the keys that could cover a tensor, longest first.
template <typename F>
void for_each_ancestor(std::string_view name, F&& f) {
  std::string_view s = name;
  while (true) {
    if (f(s)) return;
    if (s.empty()) return;
    const size_t dot = s.rfind('.');
    s = dot == std::string_view::npos ? std::string_view() : s.substr(0, dot);
  }
}

class Checker {
 public:
  Checker(const Checkpoint& checkpoint, const planner::Plan& plan, const Schedule& schedule)
      : ck_(checkpoint), plan_(plan), schedule_(schedule) {}

  void run() {
    map_components();
    for (size_t pi = 0; pi < plan_.components.size(); ++pi) check_ties(pi);
    place_tensors();
    check_order();
    for (size_t pi = 0; pi < plan_.components.size(); ++pi) check_device_map(pi);
    check_linears();
  }

 private:
  const Component& comp(size_t pi) const { return ck_.components()[comp_of_[pi]]; }
  std::string tensor(size_t pi, std::string_view name) const {
    const std::string& c = plan_.components[pi].name;
    return c.empty() ? str_cat("'", name, "'") : str_cat("'", c, "/", name, "'");
  }

  void map_components() {
    std::vector<int> seen(ck_.components().size(), -1);
    for (size_t pi = 0; pi < plan_.components.size(); ++pi) {
      const Component* c = ck_.find_component(plan_.components[pi].name);
      if (!c)
        fail(ErrorKind::InvalidInput, "plan components[", pi, "]: component '", plan_.components[pi].name,
             "' is not in the checkpoint ", ck_.root().string());
      const auto ci = static_cast<size_t>(c - ck_.components().data());
      if (seen[ci] >= 0)
        fail(ErrorKind::InvalidInput, "plan components[", pi, "]: component '", c->name(),
             "' is listed twice (also components[", seen[ci], "])");
      seen[ci] = static_cast<int>(pi);
      comp_of_.push_back(ci);
    }
    for (size_t ci = 0; ci < seen.size(); ++ci)
      if (seen[ci] < 0)
        fail(ErrorKind::InvalidInput, "the plan has no component '", ck_.components()[ci].name(), "' of ",
             ck_.root().string(), ": its tensors would never be placed or run");
    aliases_.resize(plan_.components.size());
    where_.resize(plan_.components.size());
    quantized_.resize(plan_.components.size());
    for (size_t pi = 0; pi < plan_.components.size(); ++pi)
      for (quant::QuantizedLinear& q : quant::find_quantized_linears(comp(pi)))
        quantized_[pi].emplace(q.module, std::move(q));
  }

  // Ties: each alias once, its primary in the checkpoint, and an alias the checkpoint holds an
  // identical copy of its primary.
  void check_ties(size_t pi) {
    const Component& c = comp(pi);
    const auto& tied = plan_.components[pi].tied;
    for (size_t k = 0; k < tied.size(); ++k) {
      const std::string where = str_cat("plan components[", pi, "].tied[", k, "]");
      const planner::TiedAlias& t = tied[k];
      if (t.alias == t.primary)
        fail(ErrorKind::InvalidInput, where, ": tensor ", tensor(pi, t.alias), " is tied to itself");
      if (!aliases_[pi].emplace(t.alias, t.primary).second)
        fail(ErrorKind::InvalidInput, where, ": alias ", tensor(pi, t.alias), " is listed twice");
      const auto p = c.find(t.primary);
      if (!p)
        fail(ErrorKind::InvalidInput, where, ": the primary ", tensor(pi, t.primary), " of tied alias ",
             tensor(pi, t.alias), " is not in the checkpoint ", ck_.root().string());
      const auto a = c.find(t.alias);
      if (!a) continue;  // dropped from the checkpoint, as transformers saves tied weights
      const TensorInfo& ai = c.info(*a);
      const TensorInfo& pinfo = c.info(*p);
      const auto ad = c.data(*a), pd = c.data(*p);
      if (ai.dtype != pinfo.dtype || ai.shape != pinfo.shape || ad.size() != pd.size() ||
          (!ad.empty() && std::memcmp(ad.data(), pd.data(), ad.size()) != 0))
        fail(ErrorKind::InvalidInput, where, ": ", tensor(pi, t.alias),
             " is a tensor of the checkpoint that differs from its declared primary ", tensor(pi, t.primary),
             " (", dtype_name(ai.dtype), " vs ", dtype_name(pinfo.dtype),
             ai.shape == pinfo.shape ? ", same shape, different bytes" : ", different shapes",
             "): it is not a tied copy, and the plan would neither place nor run it");
    }
  }

  void place_tensors() {
    for (const planner::OffloadGroup& g : plan_.groups) {
      const size_t pi = g.component;
      for (const planner::GroupTensor& t : g.tensors) {
        auto [it, inserted] = where_[pi].try_emplace(t.name);
        if (!inserted)
          fail(ErrorKind::InvalidInput, "plan groups[", g.id, "]: tensor ", tensor(pi, t.name),
               it->second.group == static_cast<int32_t>(g.id)
                   ? " is listed twice in the group"
                   : str_cat(" is also in groups[", it->second.group, "]"));
        it->second.group = static_cast<int32_t>(g.id);
      }
    }
    std::vector<bool> group_used(plan_.groups.size(), false);
    for (size_t si = 0; si < plan_.schedule.size(); ++si) {
      const planner::ScheduleStep& st = plan_.schedule[si];
      const size_t pi = st.component;
      if (st.group >= 0) group_used[static_cast<size_t>(st.group)] = true;
      for (const std::string& name : st.tensors) {
        auto [it, inserted] = where_[pi].try_emplace(name);
        Where& w = it->second;
        if (w.step >= 0)
          fail(ErrorKind::InvalidInput, "plan schedule[", si, "]: tensor ", tensor(pi, name),
               w.step == static_cast<int32_t>(si) ? " is listed twice in the step"
                                                  : str_cat(" is also listed by schedule[", w.step, "]"));
        if (st.group < 0 && w.group >= 0)
          fail(ErrorKind::InvalidInput, "plan schedule[", si, "]: tensor ", tensor(pi, name),
               " is resident on gpu ", st.gpu, " in this step but also offloaded in groups[", w.group, "]");
        if (st.group >= 0 && w.group != st.group)
          fail(ErrorKind::InvalidInput, "plan schedule[", si, "]: tensor ", tensor(pi, name),
               " is not in groups[", st.group, "], which the step streams");
        w.step = static_cast<int32_t>(si);
        if (st.group < 0) w.gpu = st.gpu;
      }
    }
    for (const planner::OffloadGroup& g : plan_.groups) {
      if (!group_used[g.id])
        fail(ErrorKind::InvalidInput, "plan groups[", g.id, "]: no step of the schedule streams this group");
      for (const planner::GroupTensor& t : g.tensors)
        if (where_[g.component].at(t.name).step < 0)
          fail(ErrorKind::InvalidInput, "plan groups[", g.id, "]: tensor ", tensor(g.component, t.name),
               " is copied but no step that streams the group lists it: it would never run");
    }
  }

  void check_order() {
    // Block lists of each component, to find a module's block index.
    std::vector<std::vector<planner::BlockListInfo>> lists(plan_.components.size());
    for (size_t pi = 0; pi < plan_.components.size(); ++pi) lists[pi] = planner::block_lists(comp(pi));
    std::map<std::pair<size_t, std::string>, std::pair<int64_t, size_t>> last_block;  // -> (index, step)
    std::vector<std::unordered_map<std::string, size_t>> module_step(plan_.components.size());
    int64_t last_group = -1;
    for (size_t si = 0; si < plan_.schedule.size(); ++si) {
      const planner::ScheduleStep& st = plan_.schedule[si];
      const std::string where = str_cat("plan schedule[", si, "]");
      if (si > 0 && st.component < plan_.schedule[si - 1].component)
        fail(ErrorKind::InvalidInput, where, ": runs component '", plan_.components[st.component].name,
             "' (components[", st.component, "]) after components[", plan_.schedule[si - 1].component,
             "]: components run in the order the plan lists them (is the schedule reordered?)");
      // A step without tensors of its own (a tied alias run from its primary's group) reuses a group.
      if (!st.tensors.empty() && st.group > last_group + 1)
        fail(ErrorKind::InvalidInput, where, ": streams groups[", st.group, "] before groups[",
             last_group + 1,
             "] was used: groups are numbered in the order the schedule first uses them (is the schedule "
             "reordered?)");
      if (!st.tensors.empty()) last_group = std::max<int64_t>(last_group, st.group);
      for (const std::string& m : st.modules) {
        if (const auto [it, inserted] = module_step[st.component].emplace(m, si); !inserted)
          fail(ErrorKind::InvalidInput, where, ": module '", m, "' also runs in schedule[", it->second,
               "] (a duplicated step?)");
        for (const planner::BlockListInfo& bl : lists[st.component]) {
          const std::string prefix = bl.prefix.empty() ? std::string() : bl.prefix + ".";
          if (m.size() <= prefix.size() || m.compare(0, prefix.size(), prefix) != 0) continue;
          const std::string rest = m.substr(prefix.size(), m.find('.', prefix.size()) - prefix.size());
          if (rest.empty() || rest.find_first_not_of("0123456789") != std::string::npos) continue;
          const int64_t index = std::stoll(rest);
          auto [it, inserted] = last_block.try_emplace({st.component, bl.prefix}, index, si);
          if (!inserted) {
            if (index < it->second.first)
              fail(ErrorKind::InvalidInput, where, ": runs block ", prefix, index, " after block ", prefix,
                   it->second.first, " (schedule[", it->second.second,
                   "]): the blocks of a block list run in numeric order (a reversed or reordered schedule)");
            it->second = {index, si};
          }
          break;
        }
      }
    }
  }

  void check_device_map(size_t pi) {
    const Component& c = comp(pi);
    const auto& map = plan_.components[pi].device_map;
    const std::string base = str_cat("plan components[", pi, "].device_map");
    std::unordered_map<std::string_view, size_t> keys;
    for (size_t k = 0; k < map.size(); ++k) keys.emplace(map[k].prefix, k);
    for (size_t k = 0; k < map.size(); ++k) {
      const std::string& key = map[k].prefix;
      if (key.empty()) {
        if (map.size() > 1)
          fail(ErrorKind::InvalidInput, base,
               "['']: the whole component is mapped, yet other keys overlap it ('",
               map[k == 0 ? 1 : 0].prefix, "')");
        continue;
      }
      for_each_ancestor(key, [&](std::string_view a) {
        // A key that names a tensor ("a.weight" beside "a.weight.absmax", as the planner writes the
        // own tensors of a module whose children live elsewhere) covers that tensor only.
        if (a == key || c.find(a)) return false;
        if (keys.count(a) && !a.empty())
          fail(ErrorKind::InvalidInput, base, "['", key, "']: overlaps key '", a,
               "' (keys must not contain one another)");
        return false;
      });
    }
    // The key covering a name: the longest key that is the name or a dotted ancestor of it.
    const auto covering = [&](std::string_view name) -> std::optional<size_t> {
      std::optional<size_t> found;
      for_each_ancestor(name, [&](std::string_view a) {
        const auto it = keys.find(a);
        if (it == keys.end()) return false;
        found = it->second;
        return true;
      });
      return found;
    };
    std::vector<bool> used(map.size(), false);
    for (const auto& [alias, primary] : aliases_[pi])
      if (const auto k = covering(alias)) used[*k] = true;
    for (const Component::Entry& e : c.entries()) {
      const std::string& name = c.info(e).name;
      const auto k = covering(name);
      if (k) used[*k] = true;
      if (aliases_[pi].count(name)) continue;  // an alias lives where its primary is
      if (!k)
        fail(ErrorKind::InvalidInput, base, ": no key covers tensor ", tensor(pi, name),
             ": a loader given this map would not place it");
      const auto w = where_[pi].find(name);
      if (w == where_[pi].end()) continue;  // build_schedule reports unplaced tensors
      const Location actual = w->second.group >= 0 ? plan_.groups[static_cast<size_t>(w->second.group)].target
                                                   : w->second.location();
      const Location mapped = map[*k].location;
      if (!(mapped == actual))
        fail(ErrorKind::InvalidInput, base, "['", map[*k].prefix, "'] = ", mapped.str(), ", but tensor ",
             tensor(pi, name), " is ",
             w->second.group >= 0
                 ? str_cat("in groups[", w->second.group, "] (target ", actual.str(), ")")
                 : str_cat("resident on gpu ", actual.gpu, " (schedule[", w->second.step, "])"),
             ": the device map a loader deploys must be the plan verified");
    }
    for (size_t k = 0; k < map.size(); ++k)
      if (!used[k])
        fail(ErrorKind::InvalidInput, base, "['", map[k].prefix,
             "']: names no module or tensor of the checkpoint's component '", c.name(), "'");
  }

  // The [out, in] and kind of the weight a linear reads, from the checkpoint.
  struct WeightFacts {
    int64_t out = 0, in = 0;
    std::string kind;
  };
  std::optional<WeightFacts> facts(size_t pi, const std::string& weight) const {
    const std::string module = quant::module_of_tensor(weight);
    if (const auto q = quantized_[pi].find(module);
        q != quantized_[pi].end() && weight == (module.empty() ? "weight" : module + ".weight"))
      return WeightFacts{q->second.rows(), q->second.cols(),
                         std::string(quant::scheme_name(q->second.options.scheme))};
    const auto e = comp(pi).find(weight);
    if (!e) return std::nullopt;
    const TensorInfo& t = comp(pi).info(*e);
    WeightFacts f;
    if (t.shape.size() == 2) {
      f.out = t.shape[0];
      f.in = t.shape[1];
    }
    f.kind = dtype_kind(t.dtype).value_or(std::string(dtype_name(t.dtype)));
    return f;
  }

  void check_linears() {
    for (size_t si = 0; si < plan_.schedule.size(); ++si) {
      const planner::ScheduleStep& st = plan_.schedule[si];
      const size_t pi = st.component;
      std::unordered_set<std::string> declared;
      std::unordered_set<std::string_view> step_tensors(st.tensors.begin(), st.tensors.end());
      for (size_t k = 0; k < st.linears.size(); ++k) {
        const planner::LinearOp& op = st.linears[k];
        const std::string where = str_cat("plan schedule[", si, "].linears[", k, "] ('", op.module, "')");
        if (!declared.insert(op.module).second)
          fail(ErrorKind::InvalidInput, where, ": declared twice in the step");
        const std::string own = op.module.empty() ? std::string("weight") : op.module + ".weight";
        if (op.weight == own) {
          if (!step_tensors.count(op.weight))
            fail(ErrorKind::InvalidInput, where, ": its weight ", tensor(pi, op.weight),
                 " is not among the step's tensors, so the runner would not run it");
        } else {
          const auto a = aliases_[pi].find(own);
          if (a == aliases_[pi].end() || a->second != op.weight)
            fail(ErrorKind::InvalidInput, where, ": reads ", tensor(pi, op.weight),
                 ", which is neither its own weight ", tensor(pi, own), " nor the primary it is tied to");
        }
        const auto f = facts(pi, op.weight);
        if (!f)
          fail(ErrorKind::InvalidInput, where, ": its weight ", tensor(pi, op.weight),
               " is not in the checkpoint ", ck_.root().string());
        if (f->out != op.out || f->in != op.in)
          fail(ErrorKind::InvalidInput, where, ": the plan says ", shape_str(op.out, op.in),
               " but the checkpoint's ", tensor(pi, op.weight), " is ", shape_str(f->out, f->in));
        if (f->kind != op.kind)
          fail(ErrorKind::InvalidInput, where, ": the plan says kind '", op.kind, "' but the checkpoint's ",
               tensor(pi, op.weight), " is '", f->kind, "'");
      }
      // What the runner will run in this step must be what the plan declares there.
      for (const uint32_t li : schedule_.steps.at(si).linears) {
        const LinearTask& l = schedule_.linears[li];
        if (!declared.count(l.module))
          fail(ErrorKind::InvalidInput, "plan schedule[", si, "]: runs linear '", l.module,
               "' (its weight is among the step's tensors), but the step's linears do not declare it");
      }
    }
  }

  const Checkpoint& ck_;
  const planner::Plan& plan_;
  const Schedule& schedule_;
  std::vector<size_t> comp_of_;                                           // plan component -> checkpoint
  std::vector<std::unordered_map<std::string, std::string>> aliases_;     // alias -> primary
  std::vector<std::unordered_map<std::string, Where>> where_;             // tensor -> placement
  std::vector<std::map<std::string, quant::QuantizedLinear>> quantized_;  // module -> linear
};

}  // namespace

void check_plan_consistency(const Checkpoint& checkpoint, const planner::Plan& plan,
                            const Schedule& schedule) {
  Checker(checkpoint, plan, schedule).run();
  check_plan_phases(checkpoint, plan);
}

}  // namespace qtool::runner
