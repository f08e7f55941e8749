// What the GPU benchmarks share: their set-up (work folder, device, date, device profile,
// templates, the synthetic data), medians, the warm-up step dropped, a plan that streams, the
// result table's rows.
#pragma once

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include "qtool/formats/checkpoint.hpp"
#include "qtool/formats/error.hpp"
#include "qtool/formats/json.hpp"
#include "qtool/formats/synth.hpp"
#include "qtool/libquant/config.hpp"
#include "qtool/libquant/convert.hpp"
#include "qtool/planner/planner.hpp"
#include "qtool/planner/templates.hpp"
#include "qtool/runner/cuda_resources.hpp"
#include "qtool/runner/profile.hpp"

namespace qtool::bench {

// The benchmarks' command line, flag by flag: `for (ArgCursor c(argc, argv); c.next();)`, then
// flag() and, for a flag that takes one, value() (a missing value exits with 2).
class ArgCursor {
 public:
  ArgCursor(int argc, char** argv) : argc_(argc), argv_(argv) {}
  bool next() {
    if (++i_ >= argc_) return false;
    flag_ = argv_[i_];
    return true;
  }
  const std::string& flag() const { return flag_; }
  std::string value() {
    if (i_ + 1 >= argc_) {
      std::fprintf(stderr, "%s needs a value\n", flag_.c_str());
      std::exit(2);
    }
    return argv_[++i_];
  }

 private:
  int argc_;
  char** argv_;
  int i_ = 0;
  std::string flag_;
};

// A benchmark's set-up: its work folder `work` (a fresh one under the temp folder when empty),
// emptied now and removed with the set-up; "device", "date" and "profile" in `out`; the device
// profile every plan is made with, measured on GPU 0 (its log on stderr); the model templates of
// `models_dir` when that folder exists.
class BenchSetup {
 public:
  BenchSetup(const char* bench, std::filesystem::path& work, const std::filesystem::path& models_dir,
             nlohmann::json& out)
      : work_(work.empty() ? std::filesystem::temp_directory_path() /
                                 (std::string("qtool-") + bench + "-" + std::to_string(::getpid()))
                           : work) {
    work = work_;
    std::filesystem::remove_all(work_);
    std::filesystem::create_directories(work_);
    const std::string device = runner::cuda::describe_device(0);
    std::fprintf(stderr, "%s on %s\n", bench, device.c_str());
    out["device"] = device;
    const std::time_t now = std::time(nullptr);
    char date[32];
    std::strftime(date, sizeof date, "%Y-%m-%d", std::gmtime(&now));
    out["date"] = date;
    runner::ProfileOptions po;
    po.device = 0;
    po.tmp_dir = work_;
    po.log = [](std::string_view s) { std::fprintf(stderr, "%.*s\n", static_cast<int>(s.size()), s.data()); };
    profile = runner::measure_cuda_profile(po);
    out["profile"] = planner::device_profile_to_json(profile);
    if (std::filesystem::exists(models_dir)) {
      library_.load_dir(models_dir);
      templates = &library_;
    }
  }
  ~BenchSetup() {
    std::error_code ec;
    std::filesystem::remove_all(work_, ec);
  }
  BenchSetup(const BenchSetup&) = delete;
  BenchSetup& operator=(const BenchSetup&) = delete;

  planner::DeviceProfile profile;
  const planner::TemplateLibrary* templates = nullptr;

 private:
  std::filesystem::path work_;
  planner::TemplateLibrary library_;
};

// The benchmark's checkpoints under `work`: the synthetic `preset` at `scale` (only `components`
// when not empty) in bf16 as work/bf16, and each scheme of `schemes` but bf16 quantized from it as
// work/<scheme>. Logs the time it took.
inline void write_bench_data(const std::filesystem::path& work, const std::string& preset, double scale,
                             const std::vector<std::string>& components,
                             const std::vector<std::string>& schemes) {
  const auto t0 = std::chrono::steady_clock::now();
  SynthSpec spec;
  spec.preset = preset;
  spec.scale = scale;
  spec.components = components;
  SynthWriteOptions sw;
  sw.seed = 1;
  write_synth_model(make_synth_model(spec), work / "bf16", sw);
  for (const std::string& scheme : schemes) {
    if (scheme == "bf16") continue;
    quant::SchemeOptions so;
    so.scheme = *quant::parse_scheme(scheme);
    quant::ConvertOptions co;
    quant::quantize_checkpoint(work / "bf16", quant::config_for_scheme(so), work / scheme, co);
  }
  std::fprintf(stderr, "data ready in %.1f s\n",
               std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
}

inline double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

inline std::vector<double> tail(std::vector<double> v) {  // drop the warm-up step
  if (v.size() > 1) v.erase(v.begin());
  return v;
}

// The smallest GPU budget (1 MiB steps) any plan of `o` fits in.
inline uint64_t smallest_budget(const Checkpoint& ckpt, planner::PlanOptions o) {
  uint64_t total = 0;
  for (const Component& c : ckpt.components()) total += c.total_bytes();
  const auto feasible = [&](uint64_t b) {
    o.budget.gpus[0] = b;
    try {
      planner::make_plan(ckpt, o);
      return true;
    } catch (const Error&) {
      return false;
    }
  };
  uint64_t lo = 1 << 20, hi = total + (64ull << 30);
  while (hi - lo > (1 << 20)) {
    const uint64_t mid = lo + (hi - lo) / 2;
    (feasible(mid) ? hi : lo) = mid;
  }
  return hi;
}

// A plan on GPU 0 that streams: the smallest budget any plan fits in plus `resident_fraction` of
// the weights, or `budget` when it is not 0 (and fits).
inline planner::Plan plan_streaming(const Checkpoint& ckpt, const planner::DeviceProfile& profile,
                                    uint64_t tokens, double resident_fraction,
                                    const planner::TemplateLibrary* templates,
                                    planner::OffloadMode mode = planner::OffloadMode::Auto,
                                    uint64_t budget = 0) {
  planner::PlanOptions o;
  o.offload = mode;
  if (mode == planner::OffloadMode::Block) o.blocks_per_group = 1;
  o.profile = profile;
  o.tokens = tokens;
  o.templates = templates;
  o.strategy = planner::Strategy::Sequential;
  o.budget.cpu = 1ull << 40;
  uint64_t total = 0;
  for (const Component& c : ckpt.components()) total += c.total_bytes();
  o.budget.gpus[0] = budget ? budget
                            : smallest_budget(ckpt, o) +
                                  static_cast<uint64_t>(resident_fraction * static_cast<double>(total));
  return planner::make_plan(ckpt, o);
}

// The result table on stdout, and (with `json_out`) `out` with the table to that file.
inline void print_results(const std::vector<std::string>& table, nlohmann::json& out,
                          const std::filesystem::path& json_out) {
  std::printf("\n| measurement | ratio | target | met |\n|---|---|---|---|\n");
  for (const std::string& l : table) std::printf("%s\n", l.c_str());
  out["table"] = table;
  if (!json_out.empty()) write_json_file(json_out, out);
}

// "| what | value | op target | met |": op ">=", "<=", or "+-" (|value - 1| <= target).
inline std::string ratio_line(const char* what, double value, const char* op, double target) {
  const bool ok = std::string(op) == ">="   ? value >= target
                  : std::string(op) == "<=" ? value <= target
                                            : std::fabs(value - 1) <= target;
  char buf[256];
  if (std::string(op) == "+-")
    std::snprintf(buf, sizeof buf, "| %s | %.3f | within +-%.0f%% | %s |", what, value, target * 100,
                  ok ? "yes" : "NO");
  else
    std::snprintf(buf, sizeof buf, "| %s | %.3f | %s %.2f | %s |", what, value, op, target,
                  ok ? "yes" : "NO");
  return buf;
}

}  // namespace qtool::bench
