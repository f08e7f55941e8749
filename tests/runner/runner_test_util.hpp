// Helpers for the runner tests: small synthetic checkpoints, quantized with libquant and planned
// with the planner under budgets that force streaming (and disk), and hand-made quantized linears.
#pragma once

#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "qtool/formats/checkpoint.hpp"
#include "qtool/formats/dtype.hpp"
#include "qtool/formats/error.hpp"
#include "qtool/formats/safetensors.hpp"
#include "qtool/formats/synth.hpp"
#include "qtool/formats/thread_pool.hpp"
#include "qtool/libquant/config.hpp"
#include "qtool/libquant/convert.hpp"
#include "qtool/libquant/quant.hpp"
#include "qtool/planner/planner.hpp"
#include "qtool/runner/executor.hpp"
#include "qtool/runner/schedule.hpp"

namespace qtool::test {

// A temporary folder removed at the end of the test.
struct TempDir {
  std::filesystem::path path;
  explicit TempDir(const std::string& tag) {
    path = std::filesystem::temp_directory_path() /
           ("qtool-runner-" + tag + "-" + std::to_string(::getpid()) + "-" + std::to_string(counter()++));
    std::filesystem::remove_all(path);
    std::filesystem::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  static int& counter() {
    static int n = 0;
    return n;
  }
};

inline std::filesystem::path synth(const std::filesystem::path& dir, const std::string& preset, uint64_t seed,
                                   DType dtype = DType::BF16) {
  SynthSpec spec;
  spec.preset = preset;
  spec.dtype = dtype;
  const SynthModel model = make_synth_model(spec);
  SynthWriteOptions w;
  w.seed = seed;
  w.threads = 2;
  const auto out = dir / (preset + "-" + std::string(dtype_name(dtype)));
  write_synth_model(model, out, w);
  return out;
}

// `scheme`: "bf16" (a copy, unquantized), or a libquant scheme with options.
struct SchemeCase {
  std::string label;
  std::string scheme;  // "" = leave unquantized
  uint32_t blocksize = 64;
  bool double_quant = false;
  bool per_tensor = false;
};

inline std::vector<SchemeCase> all_scheme_cases() {
  return {{"bf16", ""},
          {"int8", "int8"},
          {"fp8_e4m3", "fp8_e4m3"},
          {"fp8_e5m2", "fp8_e5m2"},
          {"fp8_e4m3 per tensor", "fp8_e4m3", 64, false, true},
          {"nf4", "nf4"},
          {"nf4 double quant", "nf4", 64, true},
          {"fp4 blocksize 128", "fp4", 128},
          {"fp4 double quant", "fp4", 64, true}};
}

inline std::filesystem::path quantize(const std::filesystem::path& input, const std::filesystem::path& out,
                                      const SchemeCase& c) {
  if (c.scheme.empty()) return input;
  quant::SchemeOptions so;
  so.scheme = *quant::parse_scheme(c.scheme);
  so.blocksize = c.blocksize;
  so.double_quant = c.double_quant;
  so.per_tensor = c.per_tensor;
  quant::ConvertOptions co;
  co.n_threads = 2;
  if (so.scheme != quant::Scheme::Fp8E5M2) {
    quant::quantize_checkpoint(input, quant::config_for_scheme(so), out, co);
    return out;
  }
  // quantize refuses fp8_e5m2 for a folder (compressed-tensors' config cannot say e5m2) but writes
  // a single file: quantize each weights file of the folder, copy the rest, and list the new
  // tensors in the shard index.
  namespace fs = std::filesystem;
  fs::create_directories(out);
  std::vector<fs::path> indexes;
  for (const auto& e : fs::directory_iterator(input)) {
    const std::string name = e.path().filename().string();
    if (e.path().extension() == ".safetensors")
      quant::quantize_checkpoint(e.path(), quant::config_for_scheme(so), out / name, co);
    else
      fs::copy(e.path(), out / name, fs::copy_options::recursive);
    if (name.ends_with(".safetensors.index.json")) indexes.push_back(out / name);
  }
  for (const fs::path& index_path : indexes) {
    nlohmann::json index = read_json_file(index_path);
    nlohmann::json weight_map = nlohmann::json::object();
    uint64_t total = 0;
    std::set<std::string> shards;
    for (const auto& [tensor, shard] : index.at("weight_map").items())
      shards.insert(shard.get<std::string>());
    for (const std::string& shard : shards) {
      const SafetensorsFile f = SafetensorsFile::open(out / shard);
      for (const TensorInfo& t : f.tensors()) {
        weight_map[t.name] = shard;
        total += t.nbytes();
      }
    }
    write_json_file(index_path, {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}});
  }
  return out;
}

// A profile with small fixed costs, so that budgets of a few MiB make sense for tiny models.
inline planner::DeviceProfile small_profile() {
  planner::DeviceProfile p;
  p.name = "test";
  p.context_bytes = 1 << 20;
  p.cublas_workspace_bytes = 1 << 20;
  p.alloc_granularity_bytes = 4096;
  p.pinned_page_table_bytes_per_gib = 4096;
  return p;
}

// A plan that streams: GPU budgets of the least any plan fits in (found by bisection) plus
// `gpu_fraction` of the weights; `cpu_fraction` of the weights may go to pinned host memory, the
// rest of what is offloaded to disk.
// The model templates of sample_configs (the forwards' execution order).
inline const planner::TemplateLibrary& templates() {
  static const planner::TemplateLibrary lib = [] {
    planner::TemplateLibrary l;
    if (const auto dir = planner::find_data_subdir("models")) l.load_dir(*dir);
    return l;
  }();
  return lib;
}

inline planner::Plan plan_streamed(const Checkpoint& ckpt, double gpu_fraction, double cpu_fraction,
                                   uint64_t tokens = 8, uint32_t prefetch = 2, int n_gpus = 1,
                                   planner::OffloadMode mode = planner::OffloadMode::Auto) {
  planner::PlanOptions o;
  o.templates = &templates();
  o.offload = mode;
  o.profile = small_profile();
  o.tokens = tokens;
  o.prefetch = prefetch;
  o.by_phase = false;  // a pipeline as one sequence: the driver keeps every component on the GPUs
  o.strategy = n_gpus > 1 ? planner::Strategy::Balanced : planner::Strategy::Sequential;
  uint64_t total = 0;
  for (const Component& c : ckpt.components()) total += c.total_bytes();
  o.budget.cpu = static_cast<uint64_t>(cpu_fraction * static_cast<double>(total));
  const auto feasible = [&](uint64_t per_gpu) {
    for (int g = 0; g < n_gpus; ++g) o.budget.gpus[g] = per_gpu;
    try {
      planner::make_plan(ckpt, o);
      return true;
    } catch (const Error&) {
      return false;
    }
  };
  uint64_t lo = 1 << 20, hi = 4 * total + (64ull << 20);
  while (hi - lo > 4096) {
    const uint64_t mid = lo + (hi - lo) / 2;
    (feasible(mid) ? hi : lo) = mid;
  }
  const uint64_t per_gpu = hi + static_cast<uint64_t>(gpu_fraction * static_cast<double>(total) / n_gpus);
  for (int g = 0; g < n_gpus; ++g) o.budget.gpus[g] = per_gpu;
  return planner::make_plan(ckpt, o);
}

// Random weight data as a synthetic checkpoint would hold: normal with per-row scales and a few
// outliers, as raw bytes of `dtype`.
inline std::vector<uint8_t> random_weight(uint64_t rows, uint64_t cols, DType dtype, std::mt19937_64& rng) {
  std::normal_distribution<float> nd;
  std::vector<float> f(rows * cols);
  for (uint64_t r = 0; r < rows; ++r) {
    const float s = std::exp(nd(rng) * 0.5f) * 0.02f;
    for (uint64_t c = 0; c < cols; ++c) {
      float v = nd(rng) * s;
      if ((rng() & 1023) == 0) v *= 20;
      f[r * cols + c] = v;
    }
  }
  std::vector<uint8_t> bytes(rows * cols * dtype_size(dtype));
  convert_from_f32(dtype, f.data(), bytes.data(), f.size());
  return bytes;
}

// A run as the plan says, then an all-resident run of the same schedule with the same options
// (no trace): the reference that streamed outputs must equal bit for bit.
struct PlannedAndResident {
  runner::RunResult planned, resident;
};
inline PlannedAndResident run_planned_and_resident(runner::Backend& backend, const Checkpoint& ckpt,
                                                   const runner::Schedule& s, runner::RunOptions o) {
  o.mode = runner::Mode::Planned;
  PlannedAndResident r{backend.run(ckpt, s, o), {}};
  o.mode = runner::Mode::AllResident;
  o.trace = false;
  r.resident = backend.run(ckpt, s, o);
  return r;
}

}  // namespace qtool::test
