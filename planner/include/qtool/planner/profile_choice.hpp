// Which device profile `qtool plan` uses when no --device-profile is given.
//
//   - No GPU: the default, sample_configs/devices/h100-pcie-gen5.json (the built-in H100 values
//     when that folder is missing), as before.
//   - A GPU: a profile of sample_configs/devices/ whose "device_names" holds the GPU's CUDA name
//     (compared with sanitize_device_name); else the profile cached for that name under
//     profile_cache_dir() (<sanitized name>.json); else one measured now (`measure`, the code of
//     `qtool profile`) and written to that cache, so that a GPU is measured once.
//
// The choice's `source` says which, for the command's output and the plan's notes.
#pragma once

#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <string_view>

#include "qtool/planner/device_profile.hpp"

namespace qtool::planner {

inline constexpr std::string_view kDefaultProfileName = "h100-pcie-gen5";

// A device name as a file name and a key: lower case, every run of other characters than
// [a-z0-9] one '-', none at either end ("NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3");
// "unknown-gpu" when nothing is left.
std::string sanitize_device_name(std::string_view device_name);

// Whether one of the profile's device_names is `device_name` (both sanitized).
bool profile_matches_device(const DeviceProfile& profile, std::string_view device_name);

// $XDG_CACHE_HOME/qtool/profiles, else $HOME/.cache/qtool/profiles; empty when neither is set
// (absolute paths only, as the XDG spec says).
std::filesystem::path profile_cache_dir();

struct ProfileChoice {
  DeviceProfile profile;
  std::string source;  // one sentence: which profile and why
};

struct ProfileChoiceInputs {
  std::optional<std::string> device_name;            // the GPU's CUDA name; nullopt: no GPU
  std::optional<std::filesystem::path> devices_dir;  // sample_configs/devices, if found
  std::filesystem::path cache_dir;                   // "" = no cache (measure every time)
  std::function<DeviceProfile()> measure;            // measures this machine's GPU
  std::function<void(std::string_view)> warn;        // non-fatal problems (a bad cache file)
  std::function<void(std::string_view)> info;        // progress ("measuring ... once")
};

ProfileChoice choose_device_profile(const ProfileChoiceInputs& in);

}  // namespace qtool::planner
