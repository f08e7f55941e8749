// The plan file's typed JSON accessors (plan.cpp, plan_phases.cpp): every error names the file
// and the key path; and the writers the two files share.
#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "qtool/formats/error.hpp"
#include "qtool/planner/plan.hpp"

namespace qtool::planner::detail {

using nlohmann::json;

// Typed accessors that name the file and the key path in every error.
struct Reader {
  std::string_view label;

  const json& at(const json& obj, std::string_view key, const std::string& path) const {
    if (!obj.is_object()) fail(ErrorKind::InvalidInput, label, ": '", path, "' must be an object");
    auto it = obj.find(std::string(key));
    if (it == obj.end())
      fail(ErrorKind::InvalidInput, label, ": missing key '", path.empty() ? "" : path + ".", key, "'");
    return *it;
  }
  std::string str(const json& obj, std::string_view key, const std::string& path) const {
    const json& v = at(obj, key, path);
    if (!v.is_string()) fail(ErrorKind::InvalidInput, label, ": key '", path, ".", key, "' must be a string");
    return v.get<std::string>();
  }
  uint64_t u64(const json& obj, std::string_view key, const std::string& path) const {
    const json& v = at(obj, key, path);
    if (!v.is_number_unsigned() && !(v.is_number_integer() && v.get<int64_t>() >= 0)) {
      fail(ErrorKind::InvalidInput, label, ": key '", path, ".", key, "' must be a non-negative integer");
    }
    return v.get<uint64_t>();
  }
  // A non-negative integer at most `max`.
  uint64_t bounded(const json& obj, std::string_view key, const std::string& path, uint64_t max) const {
    const uint64_t v = u64(obj, key, path);
    if (v > max) {
      fail(ErrorKind::InvalidInput, label, ": key '", path, path.empty() ? "" : ".", key, "' is ", v,
           ", more than ", max);
    }
    return v;
  }
  int64_t i64(const json& obj, std::string_view key, const std::string& path) const {
    const json& v = at(obj, key, path);
    if (!v.is_number_integer())
      fail(ErrorKind::InvalidInput, label, ": key '", path, ".", key, "' must be an integer");
    return v.get<int64_t>();
  }
  double num(const json& obj, std::string_view key, const std::string& path) const {
    const json& v = at(obj, key, path);
    if (!v.is_number()) fail(ErrorKind::InvalidInput, label, ": key '", path, ".", key, "' must be a number");
    return v.get<double>();
  }
  const json& arr(const json& obj, std::string_view key, const std::string& path) const {
    const json& v = at(obj, key, path);
    if (!v.is_array()) fail(ErrorKind::InvalidInput, label, ": key '", path, ".", key, "' must be an array");
    return v;
  }
  std::vector<std::string> strs(const json& obj, std::string_view key, const std::string& path) const {
    std::vector<std::string> out;
    for (const json& v : arr(obj, key, path)) {
      if (!v.is_string())
        fail(ErrorKind::InvalidInput, label, ": key '", path, ".", key, "' must hold strings");
      out.push_back(v.get<std::string>());
    }
    return out;
  }
  std::vector<ReserveItem> reserve(const json& obj, const std::string& path) const {
    std::vector<ReserveItem> out;
    const json& a = arr(obj, "reserve", path);
    for (size_t i = 0; i < a.size(); ++i) {
      const std::string p = str_cat(path, ".reserve[", i, "]");
      out.push_back({str(a[i], "name", p), u64(a[i], "bytes", p), str(a[i], "detail", p)});
    }
    return out;
  }
  // The memory layout a GPU's entry and a phase's GPU entry share: arena, reserve, slots, peak.
  template <typename Gpu>
  void gpu_memory(const json& obj, const std::string& path, Gpu& d) const {
    d.arena_bytes = u64(obj, "arena_bytes", path);
    d.reserve = reserve(obj, path);
    d.n_slots = static_cast<uint32_t>(bounded(obj, "n_slots", path, kMaxPrefetch));
    d.slot_bytes = u64(obj, "slot_bytes", path);
    d.predicted_peak = u64(obj, "predicted_peak", path);
  }
};

using ojson = nlohmann::ordered_json;

// A JSON array of to_json(item) for each of `items`.
template <typename T, typename F>
ojson json_array(const std::vector<T>& items, F to_json) {
  ojson a = ojson::array();
  for (const T& item : items) a.push_back(to_json(item));
  return a;
}

// What Reader::gpu_memory reads, appended to `j` in the plan file's order.
template <typename Gpu>
void gpu_memory_to_json(const Gpu& d, ojson& j) {
  j["arena_bytes"] = d.arena_bytes;
  j["reserve"] = json_array(d.reserve, [](const ReserveItem& r) {
    return ojson{{"name", r.name}, {"bytes", r.bytes}, {"detail", r.detail}};
  });
  j["n_slots"] = d.n_slots;
  j["slot_bytes"] = d.slot_bytes;
  j["predicted_peak"] = d.predicted_peak;
}

// The phases of a version 3 plan (plan_phases.cpp); `p` holds its components and schedule.
void phases_to_json(const Plan& p, ojson& j);
void phases_from_json(Reader& r, const json& j, Plan& p);

}  // namespace qtool::planner::detail
