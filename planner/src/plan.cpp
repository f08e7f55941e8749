#include "qtool/planner/plan.hpp"

#include <algorithm>
#include <limits>
#include <optional>

#include "plan_reader.hpp"
#include "qtool/formats/checked.hpp"
#include "qtool/formats/error.hpp"
#include "qtool/formats/json.hpp"

namespace qtool::planner {

using detail::gpu_memory_to_json;
using detail::json_array;
using detail::ojson;
using detail::Reader;
using nlohmann::json;

std::string Location::str() const {
  switch (kind) {
    case Kind::Gpu: return std::to_string(gpu);
    case Kind::Cpu: return "cpu";
    case Kind::Disk: return "disk";
  }
  return "?";
}

json location_to_json(const Location& loc) {
  if (loc.is_gpu()) return json(loc.gpu);
  return json(loc.str());
}

Location location_from_json(const json& j, std::string_view where) {
  if (j.is_number_integer()) {
    const int64_t v = j.get<int64_t>();
    if (v < 0 || v > 1024) fail(ErrorKind::InvalidInput, where, ": GPU index ", v, " out of range");
    return Location::on_gpu(static_cast<int32_t>(v));
  }
  if (j.is_string()) {
    const std::string s = j.get<std::string>();
    if (s == "cpu") return Location::cpu();
    if (s == "disk") return Location::disk();
  }
  fail(ErrorKind::InvalidInput, where, ": a location is a GPU index, \"cpu\" or \"disk\" (got ", j.dump(),
       ")");
}

uint64_t round_up(uint64_t bytes, uint64_t granularity) {
  if (granularity <= 1) return bytes;
  return (bytes + granularity - 1) / granularity * granularity;
}

uint64_t sum_bytes(std::span<const ReserveItem> items) {
  uint64_t s = 0;
  for (const ReserveItem& i : items) s += i.bytes;
  return s;
}

std::vector<ReserveItem> gpu_reserve(const DeviceProfile& profile, const GpuWork& w) {
  std::vector<ReserveItem> out;
  if (!w.used) return out;
  const uint64_t g = profile.alloc_granularity_bytes;
  // Every size is checked: tokens, shapes and slot counts come from the command line or a file.
  auto product = [&](std::string_view name, std::optional<uint64_t> bytes) -> uint64_t {
    if (!bytes || *bytes > UINT64_MAX - std::max<uint64_t>(g, 1))
      fail(ErrorKind::InvalidInput, "the ", name, " buffer of ", w.tokens, " tokens (largest linear in ",
           w.max_in, ", out ", w.max_out, "; ", w.n_slots, " slots of ", w.slot_bytes,
           " bytes) overflows 64 bits: lower --tokens");
    return *bytes;
  };
  auto add = [&](std::string name, uint64_t bytes, std::string detail, bool allocation = true) {
    if (bytes == 0) return;
    out.push_back({std::move(name), allocation ? round_up(bytes, g) : bytes, std::move(detail)});
  };
  add("cuda_context", profile.context_bytes, "device profile '" + profile.name + "' context_bytes", false);
  add("cublas_workspace", profile.cublas_workspace_bytes, "cublasSetWorkspace size from the device profile");
  add("activation_in", product("activation_in", checked_mul(w.tokens, w.max_in, 2)),
      str_cat("bf16 [tokens ", w.tokens, ", in ", w.max_in, "]"));
  add("activation_out", product("activation_out", checked_mul(w.tokens, w.max_out, 2)),
      str_cat("bf16 [tokens ", w.tokens, ", out ", w.max_out, "]"));
  add("dequant_scratch", product("dequant_scratch", checked_mul(w.max_dequant_numel, 2)),
      str_cat("bf16 weight of the largest non-bf16 linear (", w.max_dequant_numel, " elements)"));
  add("pinned_page_tables", pinned_page_table_bytes(profile, w.pinned_host_bytes),
      str_cat("mapping of ", w.pinned_host_bytes, " bytes of pinned host memory (",
              (w.pinned_host_bytes >> 30) + ((w.pinned_host_bytes & ((1ull << 30) - 1)) != 0),
              " GiB started)"),
      false);
  uint64_t forward_bytes = 0;
  for (const ReserveItem& item : w.forward_activations) {
    add(std::string(kForwardActivationPrefix) + item.name, item.bytes, item.detail, false);
    forward_bytes += item.bytes;
  }
  if (forward_bytes)
    add(std::string(kForwardActivationPrefix) + "rounding",
        round_up(forward_bytes + (64u << 10), g) - forward_bytes,
        "the runner's activation stack: 256-byte start per buffer, one allocation", false);
  if (w.n_slots > 0) {
    add("device_slots", product("device_slots", checked_mul(w.n_slots, w.slot_bytes)),
        str_cat(w.n_slots, " slots x ", w.slot_bytes, " bytes (largest group arena)"));
  }
  for (const ReserveItem& r : out) {
    if (r.bytes > UINT64_MAX / 64)
      fail(ErrorKind::InvalidInput, "reserve item '", r.name, "' of ", r.bytes, " bytes (", r.detail,
           ") is beyond any device");
  }
  return out;
}

uint64_t pinned_page_table_bytes(const DeviceProfile& profile, uint64_t pinned_host_bytes) {
  const uint64_t gib_started = (pinned_host_bytes >> 30) + ((pinned_host_bytes & ((1ull << 30) - 1)) != 0);
  // Saturates: a bound this large only says "does not fit".
  return checked_mul(gib_started, profile.pinned_page_table_bytes_per_gib).value_or(UINT64_MAX / 64);
}

ArenaLayout layout_arena(std::span<const uint64_t> sizes) {
  ArenaLayout a;
  a.offsets.reserve(sizes.size());
  uint64_t off = 0;
  for (uint64_t s : sizes) {
    a.offsets.push_back(off);
    off = round_up(off + s, kArenaAlignment);
  }
  a.total = off;
  return a;
}

const DevicePlan* Plan::find_device(const Location& loc) const {
  for (const DevicePlan& d : devices) {
    if (d.location == loc) return &d;
  }
  return nullptr;
}

uint64_t Plan::gpu_bytes() const {
  uint64_t s = 0;
  for (const DevicePlan& d : devices) {
    if (d.location.is_gpu()) s += d.weights_bytes;
  }
  return s;
}

uint64_t Plan::offloaded_bytes() const {
  uint64_t s = 0;
  for (const DevicePlan& d : devices) {
    if (!d.location.is_gpu()) s += d.weights_bytes;
  }
  return s;
}

// ---- JSON ---------------------------------------------------------------------------------------

namespace {

ojson loc_oj(const Location& l) {
  if (l.is_gpu()) return ojson(l.gpu);
  return ojson(l.str());
}

// A checkpoint prefix as the loader's module name: `checkpoint_prefix` and its dot removed.
std::string module_key(const std::string& checkpoint_prefix, const std::string& prefix) {
  if (checkpoint_prefix.empty() || prefix.empty()) return prefix;
  if (prefix == checkpoint_prefix) return "";
  if (prefix.size() > checkpoint_prefix.size() && prefix.starts_with(checkpoint_prefix) &&
      prefix[checkpoint_prefix.size()] == '.')
    return prefix.substr(checkpoint_prefix.size() + 1);
  return prefix;
}

// The inverse: a module name of the plan file as the checkpoint prefix it stands for.
std::string checkpoint_key(const std::string& checkpoint_prefix, const std::string& key) {
  if (checkpoint_prefix.empty() || key.empty()) return key;
  return checkpoint_prefix + "." + key;
}

}  // namespace

json plan_to_json(const Plan& p) {
  ojson j;
  j["format"] = kPlanFormat;
  j["version"] = p.phases.empty() ? kPlanVersionNoPhases : kPlanVersion;
  j["qtool_version"] = p.qtool_version;
  j["checkpoint"] = p.checkpoint;
  j["fingerprint"] = p.fingerprint;
  j["settings"] = {{"strategy", p.settings.strategy},
                   {"offload", p.settings.offload_mode},
                   {"blocks_per_group", p.settings.blocks_per_group},
                   {"prefetch", p.settings.prefetch},
                   {"tokens", p.settings.tokens},
                   {"device_profile", p.settings.profile_name},
                   {"budget_note", p.settings.budget_note}};
  j["device_profile"] = ojson::parse(dump_json(device_profile_to_json(p.profile)));
  j["predicted_step_s"] = p.predicted_step_s;
  j["transfer_s"] = p.transfer_s;
  j["compute_s"] = p.compute_s;
  j["gpu_bytes"] = p.gpu_bytes();
  j["offloaded_bytes"] = p.offloaded_bytes();
  j["devices"] = json_array(p.devices, [](const DevicePlan& d) {
    ojson dj;
    dj["device"] = d.device;
    dj["location"] = loc_oj(d.location);
    if (d.budget == std::numeric_limits<uint64_t>::max())
      dj["budget"] = nullptr;
    else
      dj["budget"] = d.budget;
    dj["budget_source"] = d.budget_source;
    dj["weights_bytes"] = d.weights_bytes;
    gpu_memory_to_json(d, dj);
    return dj;
  });
  j["components"] = json_array(p.components, [](const ComponentPlan& c) {
    ojson cj = {{"name", c.name}, {"class_name", c.class_name}, {"template", c.template_name}};
    if (!c.checkpoint_prefix.empty()) cj["checkpoint_prefix"] = c.checkpoint_prefix;
    cj.update(ojson{{"forward", c.forward}, {"bytes", c.bytes}, {"step_s", c.step_s}});
    ojson dm = ojson::object();
    ojson reasons = ojson::object();
    ojson mbytes = ojson::object();
    for (const DeviceMapEntry& e : c.device_map) {
      const std::string key = module_key(c.checkpoint_prefix, e.prefix);
      dm[key] = loc_oj(e.location);
      if (!e.reason.empty()) reasons[key] = e.reason;
      mbytes[key] = e.bytes;
    }
    cj["device_map"] = std::move(dm);
    cj["offload_reasons"] = std::move(reasons);
    cj["module_bytes"] = std::move(mbytes);
    cj["tied"] = json_array(c.tied, [](const TiedAlias& t) {
      return ojson{{"alias", t.alias}, {"primary", t.primary}};
    });
    return cj;
  });
  j["groups"] = json_array(p.groups, [](const OffloadGroup& g) {
    return ojson{
        {"id", g.id},
        {"component", g.component},
        {"modules", g.modules},
        {"tensors",
         json_array(g.tensors,
                    [](const GroupTensor& t) {
                      return ojson{{"name", t.name}, {"nbytes", t.nbytes}, {"arena_offset", t.arena_offset}};
                    })},
        {"bytes", g.bytes},
        {"arena_bytes", g.arena_bytes},
        {"target", loc_oj(g.target)},
        {"gpu", g.gpu},
        {"copy_s", g.copy_s}};
  });
  j["schedule"] = json_array(p.schedule, [](const ScheduleStep& s) {
    return ojson{{"component", s.component},
                 {"modules", s.modules},
                 {"gpu", s.gpu},
                 {"group", s.group},
                 {"tensors", s.tensors},
                 {"linears", json_array(s.linears,
                                        [](const LinearOp& l) {
                                          return ojson{{"module", l.module},
                                                       {"weight", l.weight},
                                                       {"out", l.out},
                                                       {"in", l.in},
                                                       {"kind", l.kind}};
                                        })},
                 {"flops", s.flops},
                 {"compute_s", s.compute_s}};
  });
  j["notes"] = p.notes;
  if (!p.phases.empty()) detail::phases_to_json(p, j);
  // Strings that are not UTF-8 (a checkpoint path from the command line) become U+FFFD here.
  return json::parse(dump_json(j));
}

namespace {

DevicePlan device_from_json(Reader& r, const json& dj, size_t i, std::string_view label) {
  const std::string path = str_cat("devices[", i, "]");
  DevicePlan d;
  d.device = r.str(dj, "device", path);
  d.location = location_from_json(r.at(dj, "location", path), str_cat(label, ": ", path, ".location"));
  const json& b = r.at(dj, "budget", path);
  d.budget = b.is_null() ? std::numeric_limits<uint64_t>::max() : r.u64(dj, "budget", path);
  d.budget_source = r.str(dj, "budget_source", path);
  d.weights_bytes = r.u64(dj, "weights_bytes", path);
  r.gpu_memory(dj, path, d);
  return d;
}

ComponentPlan component_from_json(Reader& r, const json& cj, size_t i, std::string_view label) {
  const std::string path = str_cat("components[", i, "]");
  ComponentPlan c;
  c.name = r.str(cj, "name", path);
  c.class_name = r.str(cj, "class_name", path);
  c.template_name = r.str(cj, "template", path);
  if (auto it = cj.find("checkpoint_prefix"); it != cj.end()) {
    if (!it->is_string() || it->get<std::string>().empty())
      fail(ErrorKind::InvalidInput, label, ": ", path, ".checkpoint_prefix must be a non-empty string");
    c.checkpoint_prefix = it->get<std::string>();
  }
  c.forward = r.str(cj, "forward", path);
  c.bytes = r.u64(cj, "bytes", path);
  c.step_s = r.num(cj, "step_s", path);
  const json& dm = r.at(cj, "device_map", path);
  const json& reasons = r.at(cj, "offload_reasons", path);
  if (!dm.is_object() || !reasons.is_object()) {
    fail(ErrorKind::InvalidInput, label, ": ", path, ".device_map and offload_reasons must be objects");
  }
  for (const auto& [key, v] : dm.items()) {
    DeviceMapEntry e;
    e.prefix = checkpoint_key(c.checkpoint_prefix, key);
    e.location = location_from_json(v, str_cat(label, ": ", path, ".device_map['", key, "']"));
    if (auto it = reasons.find(key); it != reasons.end() && it->is_string())
      e.reason = it->get<std::string>();
    if (auto it = cj.find("module_bytes"); it != cj.end() && it->is_object()) {
      if (auto b = it->find(key); b != it->end() && b->is_number_unsigned()) e.bytes = b->get<uint64_t>();
    }
    c.device_map.push_back(std::move(e));
  }
  for (const json& t : r.arr(cj, "tied", path)) {
    c.tied.push_back({r.str(t, "alias", path + ".tied"), r.str(t, "primary", path + ".tied")});
  }
  return c;
}

OffloadGroup group_from_json(Reader& r, const json& gj, size_t i, std::string_view label, const Plan& p) {
  const std::string path = str_cat("groups[", i, "]");
  OffloadGroup g;
  const uint64_t id = r.u64(gj, "id", path);
  if (id != i) fail(ErrorKind::InvalidInput, label, ": ", path, ".id is ", id, ", expected ", i);
  g.id = static_cast<uint32_t>(id);
  g.component = static_cast<uint32_t>(r.bounded(gj, "component", path, UINT32_MAX));
  if (g.component >= p.components.size()) {
    fail(ErrorKind::InvalidInput, label, ": ", path, ".component ", g.component, " out of range");
  }
  g.modules = r.strs(gj, "modules", path);
  const json& ts = r.arr(gj, "tensors", path);
  for (size_t k = 0; k < ts.size(); ++k) {
    const std::string tp = str_cat(path, ".tensors[", k, "]");
    g.tensors.push_back(
        {r.str(ts[k], "name", tp), r.u64(ts[k], "nbytes", tp), r.u64(ts[k], "arena_offset", tp)});
  }
  g.bytes = r.u64(gj, "bytes", path);
  g.arena_bytes = r.u64(gj, "arena_bytes", path);
  g.target = location_from_json(r.at(gj, "target", path), str_cat(label, ": ", path, ".target"));
  if (g.target.is_gpu())
    fail(ErrorKind::InvalidInput, label, ": ", path, ".target must be \"cpu\" or \"disk\"");
  const int64_t group_gpu = r.i64(gj, "gpu", path);
  if (group_gpu < -1 || group_gpu > 1024)
    fail(ErrorKind::InvalidInput, label, ": ", path, ".gpu ", group_gpu, " out of range");
  g.gpu = static_cast<int32_t>(group_gpu);
  g.copy_s = r.num(gj, "copy_s", path);
  uint64_t end = 0;
  for (const GroupTensor& t : g.tensors) {
    if (t.arena_offset < end || t.arena_offset % kArenaAlignment != 0) {
      fail(ErrorKind::InvalidInput, label, ": ", path, ": tensor '", t.name, "' arena_offset ",
           t.arena_offset, " overlaps the previous tensor or is not ", kArenaAlignment, "-byte aligned");
    }
    const auto tensor_end = checked_add(t.arena_offset, t.nbytes);
    if (!tensor_end) {
      fail(ErrorKind::InvalidInput, label, ": ", path, ": tensor '", t.name, "' arena_offset ",
           t.arena_offset, " + nbytes ", t.nbytes, " is past 2^64");
    }
    end = *tensor_end;
  }
  if (end > g.arena_bytes) {
    fail(ErrorKind::InvalidInput, label, ": ", path, ": tensors end at byte ", end, " beyond arena_bytes ",
         g.arena_bytes);
  }
  // layout_arena's total: the end rounded up to the alignment, never more (the runner allocates it).
  if (g.arena_bytes != round_up(end, kArenaAlignment)) {
    fail(ErrorKind::InvalidInput, label, ": ", path, ": arena_bytes ", g.arena_bytes,
         " is not the tensors' end ", end, " rounded up to ", kArenaAlignment, " bytes");
  }
  return g;
}

ScheduleStep step_from_json(Reader& r, const json& sj, size_t i, std::string_view label, const Plan& p) {
  const std::string path = str_cat("schedule[", i, "]");
  ScheduleStep st;
  st.component = static_cast<uint32_t>(r.bounded(sj, "component", path, UINT32_MAX));
  if (st.component >= p.components.size()) {
    fail(ErrorKind::InvalidInput, label, ": ", path, ".component ", st.component, " out of range");
  }
  st.modules = r.strs(sj, "modules", path);
  const int64_t step_gpu = r.i64(sj, "gpu", path);
  if (step_gpu < 0 || step_gpu > 1024)
    fail(ErrorKind::InvalidInput, label, ": ", path, ".gpu ", step_gpu, " out of range");
  st.gpu = static_cast<int32_t>(step_gpu);
  const int64_t group = r.i64(sj, "group", path);
  if (group < -1 || group >= static_cast<int64_t>(p.groups.size())) {
    fail(ErrorKind::InvalidInput, label, ": ", path, ".group ", group, " out of range");
  }
  st.group = static_cast<int32_t>(group);
  st.tensors = r.strs(sj, "tensors", path);
  const json& lin = r.arr(sj, "linears", path);
  for (size_t k = 0; k < lin.size(); ++k) {
    const std::string lp = str_cat(path, ".linears[", k, "]");
    LinearOp l;
    l.module = r.str(lin[k], "module", lp);
    l.weight = r.str(lin[k], "weight", lp);
    l.out = r.i64(lin[k], "out", lp);
    l.in = r.i64(lin[k], "in", lp);
    l.kind = r.str(lin[k], "kind", lp);
    if (l.out <= 0 || l.in <= 0) fail(ErrorKind::InvalidInput, label, ": ", lp, ": shape must be positive");
    // A weight of out x in elements, 4 bytes each at most, must have a size.
    if (!checked_mul(static_cast<uint64_t>(l.out), static_cast<uint64_t>(l.in), 4)) {
      fail(ErrorKind::InvalidInput, label, ": ", lp, ": shape [", l.out, ", ", l.in,
           "] has more elements than fit in 64 bits");
    }
    st.linears.push_back(std::move(l));
  }
  st.flops = r.u64(sj, "flops", path);
  st.compute_s = r.num(sj, "compute_s", path);
  return st;
}

}  // namespace

Plan plan_from_json(const json& j, std::string_view label) {
  Reader r{label};
  if (!j.is_object()) fail(ErrorKind::InvalidInput, label, ": a plan must be a JSON object");
  if (r.str(j, "format", "") != kPlanFormat) {
    fail(ErrorKind::InvalidInput, label, ": not a qtool plan (key 'format' is not \"", kPlanFormat, "\")");
  }
  const int64_t version = r.i64(j, "version", "");
  if (version != kPlanVersion && version != kPlanVersionNoPhases) {
    fail(ErrorKind::InvalidInput, label, ": plan version ", version,
         " is not supported (this qtool reads versions ", kPlanVersionNoPhases, " and ", kPlanVersion, ")");
  }
  Plan p;
  p.qtool_version = r.str(j, "qtool_version", "");
  p.checkpoint = r.str(j, "checkpoint", "");
  p.fingerprint = r.str(j, "fingerprint", "");
  const json& s = r.at(j, "settings", "");
  p.settings.strategy = r.str(s, "strategy", "settings");
  p.settings.offload_mode = r.str(s, "offload", "settings");
  p.settings.blocks_per_group =
      static_cast<uint32_t>(r.bounded(s, "blocks_per_group", "settings", kMaxBlocksPerGroup));
  p.settings.prefetch = static_cast<uint32_t>(r.bounded(s, "prefetch", "settings", kMaxPrefetch));
  p.settings.tokens = r.bounded(s, "tokens", "settings", kMaxTokens);
  p.settings.profile_name = r.str(s, "device_profile", "settings");
  p.settings.budget_note = r.str(s, "budget_note", "settings");
  p.profile = device_profile_from_json(r.at(j, "device_profile", ""), str_cat(label, ": device_profile"));
  p.predicted_step_s = r.num(j, "predicted_step_s", "");
  p.transfer_s = r.num(j, "transfer_s", "");
  p.compute_s = r.num(j, "compute_s", "");
  const json& devs = r.arr(j, "devices", "");
  for (size_t i = 0; i < devs.size(); ++i) p.devices.push_back(device_from_json(r, devs[i], i, label));
  const json& comps = r.arr(j, "components", "");
  for (size_t i = 0; i < comps.size(); ++i)
    p.components.push_back(component_from_json(r, comps[i], i, label));
  const json& groups = r.arr(j, "groups", "");
  for (size_t i = 0; i < groups.size(); ++i) p.groups.push_back(group_from_json(r, groups[i], i, label, p));
  const json& sched = r.arr(j, "schedule", "");
  for (size_t i = 0; i < sched.size(); ++i) p.schedule.push_back(step_from_json(r, sched[i], i, label, p));
  p.notes = r.strs(j, "notes", "");
  if (version == kPlanVersion) detail::phases_from_json(r, j, p);
  return p;
}

void write_plan(const std::filesystem::path& path, const Plan& plan) {
  write_json_file(path, plan_to_json(plan));
}

Plan read_plan(const std::filesystem::path& path) {
  return plan_from_json(read_json_file(path), path.string());
}

}  // namespace qtool::planner
