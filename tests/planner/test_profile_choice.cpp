// Which device profile `qtool plan` uses without --device-profile (planner/profile_choice.hpp),
// with the GPU's name injected: no GPU gives the default; a built-in profile is matched by the
// CUDA device name; any other GPU is measured once and its profile cached, and later runs read the
// cache; a cache that is unreadable or for another device is measured again.
#include <doctest/doctest.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "qtool/formats/checkpoint.hpp"
#include "qtool/formats/error.hpp"
#include "qtool/planner/device_profile.hpp"
#include "qtool/planner/profile_choice.hpp"

using namespace qtool;
using namespace qtool::planner;
namespace fs = std::filesystem;

namespace {

struct Dir {
  fs::path path;
  Dir() {
    static int n = 0;
    path = fs::temp_directory_path() /
           ("qtool-profile-choice-" + std::to_string(::getpid()) + "-" + std::to_string(n++));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~Dir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

DeviceProfile profile_named(const std::string& name, std::vector<std::string> device_names, double tflops) {
  DeviceProfile p;
  p.name = name;
  p.device_names = std::move(device_names);
  p.bf16_tflops = tflops;
  return p;
}

// A devices folder like sample_configs/devices: the default, and one built in for an H100.
fs::path devices_dir(const fs::path& root) {
  const fs::path d = root / "devices";
  fs::create_directories(d);
  write_json_file(d / "h100-pcie-gen5.json",
                  device_profile_to_json(profile_named("h100-pcie-gen5", {"NVIDIA H100 80GB HBM3"}, 650)));
  write_json_file(d / "h200.json",
                  device_profile_to_json(profile_named("h200", {}, 750)));  // assumed: names no device
  return d;
}

struct Recorder {
  int n_measured = 0;
  std::vector<std::string> warnings, infos;
  ProfileChoiceInputs inputs(std::optional<std::string> name, std::optional<fs::path> devices,
                             fs::path cache) {
    ProfileChoiceInputs in;
    in.device_name = std::move(name);
    in.devices_dir = std::move(devices);
    in.cache_dir = std::move(cache);
    in.measure = [this] {
      ++n_measured;
      DeviceProfile p = profile_named("NVIDIA H200", {"NVIDIA H200"}, 800 + n_measured);
      return p;
    };
    in.warn = [this](std::string_view s) { warnings.emplace_back(s); };
    in.info = [this](std::string_view s) { infos.emplace_back(s); };
    return in;
  }
};

bool has(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

}  // namespace

TEST_CASE("profile choice: device names sanitize to file names") {
  CHECK(sanitize_device_name("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3");
  CHECK(sanitize_device_name("NVIDIA H200") == "nvidia-h200");
  CHECK(sanitize_device_name("  NVIDIA  GeForce RTX 4090 ") == "nvidia-geforce-rtx-4090");
  CHECK(sanitize_device_name("../../etc/passwd") == "etc-passwd");
  CHECK(sanitize_device_name("Tesla V100-SXM2-16GB") == "tesla-v100-sxm2-16gb");
  CHECK(sanitize_device_name("") == "unknown-gpu");
  CHECK(sanitize_device_name("///") == "unknown-gpu");
  CHECK(profile_matches_device(profile_named("x", {"NVIDIA H100 80GB HBM3"}, 1), "nvidia h100 80gb  hbm3"));
  CHECK_FALSE(profile_matches_device(profile_named("x", {"NVIDIA H100 80GB HBM3"}, 1), "NVIDIA H100 PCIe"));
  CHECK_FALSE(profile_matches_device(profile_named("x", {}, 1), "NVIDIA H100 80GB HBM3"));
}

TEST_CASE("profile choice: without a GPU the default, as before; nothing is measured") {
  Dir root;
  Recorder r;
  const ProfileChoice c =
      choose_device_profile(r.inputs(std::nullopt, devices_dir(root.path), root.path / "cache"));
  CHECK(c.profile.name == "h100-pcie-gen5");
  CHECK(has(c.source, "no GPU found"));
  CHECK(r.n_measured == 0);
  CHECK_FALSE(fs::exists(root.path / "cache"));
  // No devices folder either: the built-in values.
  const ProfileChoice b = choose_device_profile(r.inputs(std::nullopt, std::nullopt, root.path / "cache"));
  CHECK(b.profile.name == "h100-pcie-gen5");
  CHECK(b.profile.bf16_tflops == DeviceProfile{}.bf16_tflops);
  CHECK(has(b.source, "built in"));
  CHECK(r.n_measured == 0);
}

TEST_CASE("profile choice: a built-in profile matched by the GPU's name is used without measuring") {
  Dir root;
  Recorder r;
  const ProfileChoice c = choose_device_profile(
      r.inputs(std::string("NVIDIA H100 80GB HBM3"), devices_dir(root.path), root.path / "cache"));
  CHECK(c.profile.name == "h100-pcie-gen5");
  CHECK(c.profile.bf16_tflops == 650);
  CHECK(has(c.source, "h100-pcie-gen5.json"));
  CHECK(has(c.source, "NVIDIA H100 80GB HBM3"));
  CHECK(r.n_measured == 0);
  CHECK_FALSE(fs::exists(root.path / "cache"));
}

TEST_CASE("profile choice: another GPU is measured once, cached, and read from the cache after") {
  Dir root;
  const fs::path devices = devices_dir(root.path);
  const fs::path cache = root.path / "cache" / "qtool" / "profiles";
  Recorder r;
  const ProfileChoice first = choose_device_profile(r.inputs(std::string("NVIDIA H200"), devices, cache));
  CHECK(r.n_measured == 1);
  CHECK(first.profile.bf16_tflops == 801);
  CHECK(has(first.source, "measured now"));
  CHECK(has(first.source, (cache / "nvidia-h200.json").string()));
  REQUIRE(fs::is_regular_file(cache / "nvidia-h200.json"));
  CHECK(r.infos.size() == 1);
  // The assumed h200.json names no device, so it is not taken for the GPU.
  CHECK(first.profile.name == "NVIDIA H200");

  const ProfileChoice again = choose_device_profile(r.inputs(std::string("NVIDIA H200"), devices, cache));
  CHECK(r.n_measured == 1);
  CHECK(again.profile.bf16_tflops == 801);
  CHECK(has(again.source, "cached"));
  CHECK(device_profile_to_json(again.profile) == device_profile_to_json(first.profile));
  CHECK(r.warnings.empty());
  // Nothing but the profile in the cache folder (no temporaries).
  size_t n = 0;
  for ([[maybe_unused]] const auto& e : fs::directory_iterator(cache)) ++n;
  CHECK(n == 1);
}

TEST_CASE("profile choice: a bad cache file, or one for another device, is measured again and replaced") {
  Dir root;
  const fs::path cache = root.path / "cache";
  fs::create_directories(cache);
  Recorder r;
  {
    std::FILE* f = std::fopen((cache / "nvidia-h200.json").c_str(), "w");
    REQUIRE(f);
    std::fputs("{\"format\": \"qtool-device-profile\", \"version\": 1, \"bf16_tflops\": -3}", f);
    std::fclose(f);
  }
  const ProfileChoice c = choose_device_profile(r.inputs(std::string("NVIDIA H200"), std::nullopt, cache));
  CHECK(r.n_measured == 1);
  CHECK(r.warnings.size() == 1);
  CHECK(has(r.warnings[0], "nvidia-h200.json"));
  CHECK(load_device_profile(cache / "nvidia-h200.json").bf16_tflops == 801);
  CHECK(c.profile.bf16_tflops == 801);

  // A cached file for a device whose name sanitizes alike but is not listed in it.
  write_json_file(cache / "nvidia-h200.json",
                  device_profile_to_json(profile_named("other", {"Some Other GPU"}, 5)));
  const ProfileChoice d = choose_device_profile(r.inputs(std::string("NVIDIA H200"), std::nullopt, cache));
  CHECK(r.n_measured == 2);
  CHECK(d.profile.bf16_tflops == 802);
  CHECK(profile_matches_device(load_device_profile(cache / "nvidia-h200.json"), "NVIDIA H200"));
}

TEST_CASE("profile choice: no cache folder, or one that cannot be written: measured, used, and said so") {
  Dir root;
  Recorder r;
  const ProfileChoice c =
      choose_device_profile(r.inputs(std::string("NVIDIA H200"), std::nullopt, fs::path()));
  CHECK(r.n_measured == 1);
  CHECK(has(c.source, "not cached"));
  CHECK(r.warnings.size() == 1);
  // A file where the cache folder should be.
  std::FILE* f = std::fopen((root.path / "blocked").c_str(), "w");
  REQUIRE(f);
  std::fclose(f);
  const ProfileChoice d = choose_device_profile(
      r.inputs(std::string("NVIDIA H200"), std::nullopt, root.path / "blocked" / "profiles"));
  CHECK(r.n_measured == 2);
  CHECK(has(d.source, "not cached"));
  CHECK(d.profile.bf16_tflops == 802);
}

TEST_CASE("profile choice: the cache folder follows XDG_CACHE_HOME, then HOME") {
  const char* old_xdg = std::getenv("XDG_CACHE_HOME");
  const char* old_home = std::getenv("HOME");
  const std::string saved_xdg = old_xdg ? old_xdg : "", saved_home = old_home ? old_home : "";
  ::setenv("XDG_CACHE_HOME", "/x/cache", 1);
  ::setenv("HOME", "/h", 1);
  CHECK(profile_cache_dir() == fs::path("/x/cache/qtool/profiles"));
  ::setenv("XDG_CACHE_HOME", "relative", 1);  // not absolute: ignored, as the XDG spec says
  CHECK(profile_cache_dir() == fs::path("/h/.cache/qtool/profiles"));
  ::unsetenv("XDG_CACHE_HOME");
  CHECK(profile_cache_dir() == fs::path("/h/.cache/qtool/profiles"));
  ::unsetenv("HOME");
  CHECK(profile_cache_dir().empty());
  if (old_xdg) ::setenv("XDG_CACHE_HOME", saved_xdg.c_str(), 1);
  if (old_home) ::setenv("HOME", saved_home.c_str(), 1);
}

TEST_CASE("device profile: device_names round-trips and is checked") {
  const DeviceProfile p = profile_named("x", {"NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe"}, 1);
  CHECK(device_profile_from_json(device_profile_to_json(p), "t").device_names == p.device_names);
  CHECK_FALSE(device_profile_to_json(profile_named("x", {}, 1)).contains("device_names"));
  for (const char* bad :
       {R"({"device_names": "NVIDIA H200"})", R"({"device_names": [1]})", R"({"device_names": [""]})"}) {
    CAPTURE(bad);
    CHECK_THROWS_AS(device_profile_from_json(nlohmann::json::parse(bad), "t"), Error);
  }
}
