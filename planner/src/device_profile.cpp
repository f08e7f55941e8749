#include "qtool/planner/device_profile.hpp"

#include <set>

#include "qtool/formats/error.hpp"
#include "qtool/formats/json.hpp"
#include "qtool/libquant/quant.hpp"

namespace qtool::planner {

double DeviceProfile::dequant_rate(std::string_view key) const {
  if (const auto it = dequant_gelems_per_s.find(std::string(key)); it != dequant_gelems_per_s.end())
    return it->second * 1e9;
  // A scheme the profile does not list: its row of the scheme table.
  const auto scheme = quant::parse_scheme(key);
  if (!scheme) fail(ErrorKind::Internal, "dequant_rate: '", key, "' is neither a scheme nor f16/f32");
  return quant::scheme_info(*scheme).dequant_gelems_per_s * 1e9;
}

nlohmann::json device_profile_to_json(const DeviceProfile& p) {
  nlohmann::ordered_json j;
  j["format"] = "qtool-device-profile";
  j["version"] = kDeviceProfileVersion;
  j["name"] = p.name;
  j["description"] = p.description;
  if (!p.device_names.empty()) j["device_names"] = p.device_names;
  j["memory_bytes"] = p.memory_bytes;
  j["h2d_pinned_gbps"] = p.h2d_pinned_gbps;
  j["h2d_pageable_gbps"] = p.h2d_pageable_gbps;
  j["p2p_gbps"] = p.p2p_gbps;
  j["disk_read_gbps"] = p.disk_read_gbps;
  j["device_bandwidth_gbps"] = p.device_bandwidth_gbps;
  j["bf16_tflops"] = p.bf16_tflops;
  j["attention_tflops"] = p.attention_tflops;
  j["activation_gbps"] = p.activation_gbps;
  j["dequant_gelems_per_s"] = p.dequant_gelems_per_s;
  j["context_bytes"] = p.context_bytes;
  j["cublas_workspace_bytes"] = p.cublas_workspace_bytes;
  j["alloc_granularity_bytes"] = p.alloc_granularity_bytes;
  j["host_alloc_granularity_bytes"] = p.host_alloc_granularity_bytes;
  j["pinned_page_table_bytes_per_gib"] = p.pinned_page_table_bytes_per_gib;
  j["kernel_launch_us"] = p.kernel_launch_us;
  j["copy_latency_us"] = p.copy_latency_us;
  return nlohmann::json(j);
}

namespace {

double positive_number(const nlohmann::json& v, std::string_view label, std::string_view key,
                       bool allow_zero) {
  if (!v.is_number()) fail(ErrorKind::InvalidInput, label, ": key '", key, "' must be a number");
  const double d = v.get<double>();
  if (!(d > 0.0 || (allow_zero && d == 0.0)) || d > 1e18) {
    fail(ErrorKind::InvalidInput, label, ": key '", key, "' must be ",
         allow_zero ? "non-negative" : "positive", " (got ", v.dump(), ")");
  }
  return d;
}

// At most 1 PiB: sums and roundings of these stay far from 2^64.
constexpr uint64_t kMaxProfileBytes = uint64_t{1} << 50;

uint64_t byte_count(const nlohmann::json& v, std::string_view label, std::string_view key, bool allow_zero) {
  if (!v.is_number_integer())
    fail(ErrorKind::InvalidInput, label, ": key '", key, "' must be an integer byte count");
  if (v.is_number_unsigned()) {
    const uint64_t b = v.get<uint64_t>();
    if (b == 0 && !allow_zero) fail(ErrorKind::InvalidInput, label, ": key '", key, "' must be positive");
    if (b > kMaxProfileBytes)
      fail(ErrorKind::InvalidInput, label, ": key '", key, "' is ", b, " bytes, more than 1 PiB (",
           kMaxProfileBytes, ")");
    return b;
  }
  const int64_t b = v.get<int64_t>();
  if (b < 0 || (b == 0 && !allow_zero))
    fail(ErrorKind::InvalidInput, label, ": key '", key, "' must be positive");
  return static_cast<uint64_t>(b);
}

}  // namespace

DeviceProfile device_profile_from_json(const nlohmann::json& j, std::string_view label) {
  if (!j.is_object()) fail(ErrorKind::InvalidInput, label, ": a device profile must be a JSON object");
  DeviceProfile p;
  for (const auto& [key, v] : j.items()) {
    if (key == "format") {
      if (v != "qtool-device-profile")
        fail(ErrorKind::InvalidInput, label, ": key 'format' must be \"qtool-device-profile\"");
    } else if (key == "version") {
      if (!v.is_number_integer() || v.get<int64_t>() != kDeviceProfileVersion) {
        fail(ErrorKind::InvalidInput, label, ": unsupported device profile version ", v.dump(),
             " (this qtool reads ", kDeviceProfileVersion, ")");
      }
    } else if (key == "name" || key == "description") {
      if (!v.is_string()) fail(ErrorKind::InvalidInput, label, ": key '", key, "' must be a string");
      (key == "name" ? p.name : p.description) = v.get<std::string>();
    } else if (key == "device_names") {
      if (!v.is_array())
        fail(ErrorKind::InvalidInput, label, ": key 'device_names' must be an array of strings");
      for (const auto& n : v) {
        if (!n.is_string() || n.get<std::string>().empty())
          fail(ErrorKind::InvalidInput, label, ": key 'device_names' must hold non-empty strings");
        p.device_names.push_back(n.get<std::string>());
      }
    } else if (key == "memory_bytes") {
      p.memory_bytes = byte_count(v, label, key, true);
    } else if (key == "h2d_pinned_gbps") {
      p.h2d_pinned_gbps = positive_number(v, label, key, false);
    } else if (key == "h2d_pageable_gbps") {
      p.h2d_pageable_gbps = positive_number(v, label, key, false);
    } else if (key == "p2p_gbps") {
      p.p2p_gbps = positive_number(v, label, key, false);
    } else if (key == "disk_read_gbps") {
      p.disk_read_gbps = positive_number(v, label, key, false);
    } else if (key == "device_bandwidth_gbps") {
      p.device_bandwidth_gbps = positive_number(v, label, key, false);
    } else if (key == "bf16_tflops") {
      p.bf16_tflops = positive_number(v, label, key, false);
    } else if (key == "attention_tflops") {
      p.attention_tflops = positive_number(v, label, key, false);
    } else if (key == "activation_gbps") {
      p.activation_gbps = positive_number(v, label, key, false);
    } else if (key == "dequant_gelems_per_s") {
      if (!v.is_object())
        fail(ErrorKind::InvalidInput, label, ": key 'dequant_gelems_per_s' must be an object");
      // The scheme table's names, and the unquantized dtypes converted to bf16.
      std::set<std::string> keys = {"f16", "f32"};
      std::string names;
      for (const quant::Scheme s : quant::all_schemes()) {
        keys.emplace(quant::scheme_name(s));
        names += str_cat(quant::scheme_name(s), ", ");
      }
      for (const auto& [scheme, rate] : v.items()) {
        if (!keys.count(scheme)) {
          fail(ErrorKind::InvalidInput, label, ": key 'dequant_gelems_per_s.", scheme, "' is not a scheme (",
               names, "f16, f32)");
        }
        p.dequant_gelems_per_s[scheme] =
            positive_number(rate, label, "dequant_gelems_per_s." + scheme, false);
      }
    } else if (key == "context_bytes") {
      p.context_bytes = byte_count(v, label, key, true);
    } else if (key == "cublas_workspace_bytes") {
      p.cublas_workspace_bytes = byte_count(v, label, key, true);
    } else if (key == "alloc_granularity_bytes") {
      p.alloc_granularity_bytes = byte_count(v, label, key, false);
    } else if (key == "host_alloc_granularity_bytes") {
      p.host_alloc_granularity_bytes = byte_count(v, label, key, false);
    } else if (key == "pinned_page_table_bytes_per_gib") {
      p.pinned_page_table_bytes_per_gib = byte_count(v, label, key, true);
    } else if (key == "kernel_launch_us") {
      p.kernel_launch_us = positive_number(v, label, key, true);
    } else if (key == "copy_latency_us") {
      p.copy_latency_us = positive_number(v, label, key, true);
    } else {
      fail(ErrorKind::InvalidInput, label, ": unknown key '", key, "' in device profile");
    }
  }
  return p;
}

DeviceProfile load_device_profile(const std::filesystem::path& path) {
  return device_profile_from_json(read_json_file(path), path.string());
}

}  // namespace qtool::planner
