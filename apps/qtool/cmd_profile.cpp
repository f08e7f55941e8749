// qtool profile [-o FILE]: measures the device profile (rates, fixed costs, context size) that
// `qtool plan --device-profile FILE` uses, on the machine it runs on.
#include <cstdio>
#include <memory>
#include <string>

#include "cli.hpp"
#include "qtool/formats/checkpoint.hpp"
#include "qtool/formats/json.hpp"
#include "qtool/formats/size.hpp"
#include "qtool/formats/thread_pool.hpp"
#include "qtool/planner/device_profile.hpp"
#include "qtool/runner/profile.hpp"

namespace qtool::cli {
namespace {

struct ProfileCliOptions {
  std::string output;
  std::string backend = "auto";
  int device = 0;
  std::string copy_size = "256MiB";
  uint64_t tokens = 4096;
  uint32_t repeats = 7;
  std::string tmp_dir;
  size_t threads = 0;
  std::string name;
};

int run_profile(const ProfileCliOptions& o, const GlobalOptions& global) {
  runner::ProfileOptions p;
  p.backend = o.backend;
  p.device = o.device;
  p.copy_bytes = parse_size(o.copy_size, "--copy-size");
  p.gemm_tokens = o.tokens;
  p.repeats = o.repeats;
  p.tmp_dir = o.tmp_dir;
  p.threads = o.threads;
  p.log = [&global](std::string_view line) { info(global, line); };
  planner::DeviceProfile profile = runner::measure_profile(p);
  if (!o.name.empty()) profile.name = o.name;
  const nlohmann::json j = planner::device_profile_to_json(profile);
  if (o.output.empty() || o.output == "-") {
    std::printf("%s\n", dump_json(j, 2).c_str());
  } else {
    write_json_file(o.output, j);
    info(global, "wrote " + o.output);
  }
  return 0;
}

void declare_profile(CLI::App* cmd, ProfileCliOptions& o) {
  cmd->add_option("-o,--output", o.output, "Write the profile JSON here (default: stdout)");
  add_backend_option(cmd, o.backend);
  cmd->add_option("--device", o.device, "The GPU to measure (default 0)");
  cmd->add_option("--copy-size", o.copy_size, "Bytes per bandwidth measurement (default 256MiB)");
  cmd->add_option("--tokens", o.tokens, "GEMM rate measured at [tokens, 4096] x [4096, 4096] (default 4096)")
      ->check(count_range(1, 1 << 20));
  cmd->add_option("--repeats", o.repeats, "Timed repeats per measurement; the median is kept (default 7)")
      ->check(CLI::Range(1u, 1000u));
  cmd->add_option("--tmp-dir", o.tmp_dir,
                  "Folder for the disk-read test file (default: the system's temp dir)");
  add_threads_option(cmd, o.threads, "CPU threads for the CPU backend (default: every core)");
  cmd->add_option("--name", o.name, "The profile's name (default: the device's)");
}

const CommandRegistrar kRegistrar(
    60, "profile",
    "Measure this machine's device profile for the planner: host-to-device bandwidth (pinned, pageable), "
    "GEMM rate, dequant rates, context and workspace bytes",
    declare_profile, run_profile);

}  // namespace
}  // namespace qtool::cli
