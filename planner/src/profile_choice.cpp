#include "qtool/planner/profile_choice.hpp"

#include <algorithm>
#include <cstdlib>
#include <system_error>
#include <vector>

#include "qtool/formats/checkpoint.hpp"
#include "qtool/formats/error.hpp"

namespace fs = std::filesystem;

namespace qtool::planner {

std::string sanitize_device_name(std::string_view device_name) {
  std::string out;
  bool dash = false;
  for (const char c : device_name) {
    const char l = (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c;
    if ((l >= 'a' && l <= 'z') || (l >= '0' && l <= '9')) {
      if (dash && !out.empty()) out += '-';
      out += l;
      dash = false;
    } else {
      dash = true;
    }
  }
  return out.empty() ? std::string("unknown-gpu") : out;
}

bool profile_matches_device(const DeviceProfile& profile, std::string_view device_name) {
  const std::string want = sanitize_device_name(device_name);
  return std::any_of(profile.device_names.begin(), profile.device_names.end(),
                     [&](const std::string& n) { return sanitize_device_name(n) == want; });
}

fs::path profile_cache_dir() {
  const char* xdg = std::getenv("XDG_CACHE_HOME");
  if (xdg && *xdg && fs::path(xdg).is_absolute()) return fs::path(xdg) / "qtool" / "profiles";
  const char* home = std::getenv("HOME");
  if (home && *home && fs::path(home).is_absolute()) return fs::path(home) / ".cache" / "qtool" / "profiles";
  return {};
}

namespace {

void say(const std::function<void(std::string_view)>& fn, const std::string& line) {
  if (fn) fn(line);
}

// Profiles of `dir` in file-name order; files that do not load are skipped with a warning.
std::vector<std::pair<fs::path, DeviceProfile>> builtin_profiles(const fs::path& dir,
                                                                 const ProfileChoiceInputs& in) {
  std::vector<fs::path> files;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    if (e.path().extension() == ".json" && e.is_regular_file(ec)) files.push_back(e.path());
  }
  std::sort(files.begin(), files.end());
  std::vector<std::pair<fs::path, DeviceProfile>> out;
  for (const auto& f : files) {
    try {
      out.emplace_back(f, load_device_profile(f));
    } catch (const Error& e) {
      say(in.warn, str_cat("skipping device profile ", f.string(), ": ", e.what()));
    }
  }
  return out;
}

ProfileChoice default_choice(const ProfileChoiceInputs& in, const std::string& why) {
  if (in.devices_dir) {
    const fs::path p = *in.devices_dir / (std::string(kDefaultProfileName) + ".json");
    std::error_code ec;
    if (fs::is_regular_file(p, ec)) {
      return {load_device_profile(p),
              str_cat("device profile ", kDefaultProfileName, " (", p.string(), ", the default: ", why, ")")};
    }
  }
  return {DeviceProfile{}, str_cat("device profile ", kDefaultProfileName, " (built in, the default: ", why,
                                   "; no sample_configs/devices found)")};
}

// write_json_file goes through a temporary sibling: a reader never sees half a file.
void write_cache(const fs::path& path, const DeviceProfile& profile) {
  std::error_code ec;
  fs::create_directories(path.parent_path(), ec);
  if (ec) fail(ErrorKind::Io, path.parent_path().string(), ": cannot create folder: ", ec.message());
  write_json_file(path, device_profile_to_json(profile));
}

}  // namespace

ProfileChoice choose_device_profile(const ProfileChoiceInputs& in) {
  if (!in.device_name) return default_choice(in, "no GPU found");
  const std::string& name = *in.device_name;
  if (in.devices_dir) {
    for (auto& [file, profile] : builtin_profiles(*in.devices_dir, in)) {
      if (profile_matches_device(profile, name)) {
        std::string source = str_cat("device profile ", profile.name, " (", file.string(),
                                     ", built in for the GPU found, '", name, "')");
        return {std::move(profile), std::move(source)};
      }
    }
  }
  const fs::path cache =
      in.cache_dir.empty() ? fs::path() : in.cache_dir / (sanitize_device_name(name) + ".json");
  std::error_code ec;
  if (!cache.empty() && fs::exists(cache, ec)) {
    try {
      DeviceProfile p = load_device_profile(cache);
      if (profile_matches_device(p, name)) {
        return {std::move(p), str_cat("device profile ", cache.string(), " (for the GPU found, '", name,
                                      "': measured earlier on this machine and cached)")};
      }
      say(in.warn,
          str_cat(cache.string(), ": a cached profile for another device (", p.name, "): measuring again"));
    } catch (const Error& e) {
      say(in.warn, str_cat("unreadable cached device profile (", e.what(), "): measuring again"));
    }
  }
  if (!in.measure)
    return default_choice(in, str_cat("no profile for the GPU found, '", name, "', and none measured"));
  say(in.info,
      str_cat("no device profile for '", name, "': measuring one (once; `qtool profile` does the same)",
              cache.empty() ? std::string() : " into " + cache.string()));
  DeviceProfile p = in.measure();
  if (!profile_matches_device(p, name)) p.device_names.push_back(name);
  if (cache.empty()) {
    say(in.warn, "neither XDG_CACHE_HOME nor HOME is set: the measured device profile is not cached");
    return {std::move(p), str_cat("device profile measured now on the GPU found, '", name, "' (not cached)")};
  }
  try {
    write_cache(cache, p);
  } catch (const Error& e) {
    say(in.warn, str_cat("cannot cache the measured device profile: ", e.what()));
    return {std::move(p), str_cat("device profile measured now on the GPU found, '", name, "' (not cached)")};
  }
  return {std::move(p),
          str_cat("device profile measured now on the GPU found, '", name, "', cached at ", cache.string())};
}

}  // namespace qtool::planner
