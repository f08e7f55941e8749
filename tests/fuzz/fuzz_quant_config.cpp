// libFuzzer entry point for the quant-config parser: the input is a quant config file (`qtool
// quantize --config FILE`), written to tmpfs and read with read_quant_config, then resolved against
// a fixed tiny checkpoint (the tiny-flux pipeline, synthesized once at start-up) as quantize does
// before converting anything. A config that parses must survive its own round trip
// (config_to_json, then parse_quant_config again, gives the same JSON). The same bytes are also
// read as the other small JSON files a user hands qtool: a --max-memory budget file and a device
// profile. Whatever the bytes, each reader either works or throws a bad-input qtool::Error that
// names the file (or, for the budget, the option --max-memory) (fuzz_util.hpp).
#include <cstdint>
#include <string>

#include "fuzz_util.hpp"
#include "qtool/formats/checkpoint.hpp"
#include "qtool/formats/synth.hpp"
#include "qtool/libquant/config.hpp"
#include "qtool/planner/device_profile.hpp"
#include "qtool/planner/planner.hpp"

namespace {

using namespace qtool;

const Checkpoint& tiny_flux() {
  static const Checkpoint ck = [] {
    const std::filesystem::path dir = qtool::fuzz::scratch_root() / "tiny-flux";
    SynthSpec spec;
    spec.preset = "tiny-flux";
    SynthWriteOptions options;
    options.threads = 1;
    write_synth_model(make_synth_model(spec), dir, options);
    return Checkpoint::open(dir);
  }();
  return ck;
}

void read_as_config(const std::filesystem::path& path) {
  const std::string label = path.string();
  try {
    const quant::QuantConfig config = quant::read_quant_config(path);
    const nlohmann::json once = quant::config_to_json(config);
    const nlohmann::json twice = quant::config_to_json(quant::parse_quant_config(once, label));
    QTOOL_ASSERT_MSG(once == twice, "the config does not survive its round trip: ", once.dump(), " -> ",
                     twice.dump());
    (void)quant::plan_quantization(config, tiny_flux());
  } catch (const Error& e) {
    fuzz::check_bad_input_error(e, {label, tiny_flux().root().string()});
  }
}

void read_as_budget(const std::filesystem::path& path) {
  try {
    (void)planner::parse_max_memory(path.string());
  } catch (const Error& e) {
    fuzz::check_bad_input_error(e, {path.string(), "--max-memory"});
  }
}

void read_as_device_profile(const std::filesystem::path& path) {
  try {
    const planner::DeviceProfile p = planner::load_device_profile(path);
    (void)planner::device_profile_from_json(planner::device_profile_to_json(p), path.string());
  } catch (const Error& e) {
    fuzz::check_bad_input_error(e, {path.string()});
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  (void)tiny_flux();
  const std::filesystem::path path = fuzz::scratch_root() / "config.json";
  fuzz::write_file(path, std::span<const uint8_t>(data, size));
  read_as_config(path);
  read_as_budget(path);
  read_as_device_profile(path);
  return 0;
}
