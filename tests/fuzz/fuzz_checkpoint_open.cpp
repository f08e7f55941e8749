// libFuzzer entry point for the whole checkpoint open path: one fuzz input is a small checkpoint
// folder, written to tmpfs and opened as every command opens its input.
//
// Input: a flags byte, then files separated by fuzz_util.hpp's kFileSeparator, in this order:
//   0 config.json   1 the weight index (<base>.safetensors.index.json)   2 shard 1   3 shard 2
//   4 model_index.json
// Flags: bit 0 a diffusers pipeline (model_index.json at the root, the files in transformer/);
// bit 1 sharded (the index and <base>-0000k-of-00002.safetensors; else shard 1 is <base>.safetensors
// and shard 2, when given, a stray second .safetensors file); bit 2 no config.json; bit 3 a single
// .safetensors file (shard 1) opened as the checkpoint; bit 4 <base> is diffusion_pytorch_model
// (else model). A missing or empty section writes no file.
//
// Then what the commands read before converting or planning anything: Checkpoint::open,
// describe_checkpoint (inspect), the fingerprint, every tensor's first and last byte, the
// quantized linears and their tensors' sizes (dequantize, plan, verify), a row of each small one
// dequantized, the first small weight quantized (quantize), quantize's resolution of `--scheme nf4`
// (plan_quantization) and the planner's input and a plan within a fixed budget (plan), which must
// pass its own check. Whatever the bytes, each step either works or throws a bad-input
// qtool::Error naming a file of the input (fuzz_util.hpp).
#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "fuzz_util.hpp"
#include "qtool/formats/checkpoint.hpp"
#include "qtool/formats/thread_pool.hpp"
#include "qtool/libquant/config.hpp"
#include "qtool/libquant/quant.hpp"
#include "qtool/planner/planner.hpp"

namespace {

using namespace qtool;

constexpr uint64_t kMaxWorkElements = uint64_t{1} << 16;  // larger tensors are only looked at

void write_checkpoint(std::span<const uint8_t> data, std::filesystem::path& open_path, std::string& named) {
  const std::filesystem::path root = fuzz::fresh_dir("checkpoint");
  named = root.string();
  const uint8_t flags = data.empty() ? 0 : data[0];
  const auto sections = fuzz::split_sections(data.empty() ? data : data.subspan(1));
  // Writes section i to `path` when the input has it (an empty section writes nothing).
  auto put = [&](size_t i, const std::filesystem::path& path) {
    if (i < sections.size() && !sections[i].empty()) fuzz::write_file(path, sections[i]);
  };
  const std::string base = (flags & 16) ? "diffusion_pytorch_model" : "model";
  if (flags & 8) {
    open_path = root / "weights.safetensors";
    put(2, open_path);
    return;
  }
  open_path = root;
  std::filesystem::path dir = root;
  if (flags & 1) {
    dir = root / "transformer";
    std::filesystem::create_directories(dir);
    put(4, root / "model_index.json");
  }
  if (!(flags & 4)) put(0, dir / "config.json");
  if (flags & 2) {
    put(1, dir / (base + ".safetensors.index.json"));
    put(2, dir / (base + "-00001-of-00002.safetensors"));
    put(3, dir / (base + "-00002-of-00002.safetensors"));
  } else {
    put(2, dir / (base + ".safetensors"));
    put(3, dir / "extra.safetensors");
  }
}

// Reads every tensor's first and last byte: the mapping covers what the header promised.
uint32_t touch_tensors(const Checkpoint& ck) {
  uint32_t sum = 0;
  for (const Component& c : ck.components()) {
    for (const auto& e : c.entries()) {
      const auto bytes = c.data(e);
      QTOOL_ASSERT(bytes.size() == c.info(e).nbytes());
      if (!bytes.empty()) sum += bytes.front() + bytes.back();
    }
  }
  return sum;
}

// What dequantize and the planner read of a quantized component; a few rows of the small ones.
void read_quantized(const Component& c, ThreadPool& pool) {
  for (const quant::QuantizedLinear& l : quant::find_quantized_linears(c)) {
    const quant::TensorBytes tb = quant::tensor_bytes(l, c);
    quant::check_tensor_bytes(l, tb);
    const uint64_t rows = static_cast<uint64_t>(l.rows()), cols = static_cast<uint64_t>(l.cols());
    if (rows == 0 || cols == 0 || cols > kMaxWorkElements) continue;
    std::vector<float> out(cols);
    quant::dequantize_rows_f32(l, tb, out.data(), 0, 1);
    if (rows * cols <= kMaxWorkElements) {
      std::vector<float> all(rows * cols);
      quant::dequantize_weight(l, tb, all.data(), pool);
    }
  }
}

// Quantizes the first small linear weight the way quantize does (NaN/Inf are bad input).
void quantize_first_small_weight(const Component& c, ThreadPool& pool) {
  for (const auto& e : c.entries()) {
    const TensorInfo& t = c.info(e);
    if (quant::linear_exclusion(t.name, t.dtype, t.shape)) continue;
    if (t.numel() == 0 || t.numel() > kMaxWorkElements) continue;
    const quant::SchemeOptions nf4{quant::Scheme::Nf4, 64, true, false};
    const std::string label = c.shard_of(e).path().string() + ": tensor '" + t.name + "'";
    const auto outs = quant::quantize_weight(quant::module_of_tensor(t.name), label, t.dtype, t.shape,
                                             c.data(e), nf4, pool);
    QTOOL_ASSERT(!outs.empty());
    return;
  }
}

void plan_within_budget(const planner::PipelineInput& input) {
  planner::PlanOptions opt;
  opt.budget = planner::parse_max_memory("0=64MiB,cpu=1GiB");
  opt.tokens = 16;
  try {
    const planner::Plan plan = planner::make_plan(input, opt);
    const std::vector<std::string> problems = planner::check_plan(plan, input);
    QTOOL_ASSERT_MSG(problems.empty(), "the plan failed its own check: ", problems.front());
  } catch (const Error& e) {
    // A checkpoint too large for the budget is the user's problem, said as such.
    QTOOL_ASSERT_MSG(e.kind() == ErrorKind::InvalidInput, "planning failed: ", e.what());
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::filesystem::path open_path;
  std::string named;
  write_checkpoint(std::span<const uint8_t>(data, size), open_path, named);
  static ThreadPool pool(2);
  try {
    const Checkpoint ck = Checkpoint::open(open_path);
    const nlohmann::json described = describe_checkpoint(ck);
    QTOOL_ASSERT(described.at("fingerprint").get<std::string>() == ck.fingerprint());
    (void)touch_tensors(ck);
    for (const Component& c : ck.components()) read_quantized(c, pool);
    (void)quant::plan_quantization(quant::config_for_scheme({quant::Scheme::Nf4, 64, false, false}), ck);
    for (const Component& c : ck.components()) quantize_first_small_weight(c, pool);
    plan_within_budget(planner::plan_input_of(ck));
  } catch (const Error& e) {
    fuzz::check_bad_input_error(e, {named});
  }
  return 0;
}
