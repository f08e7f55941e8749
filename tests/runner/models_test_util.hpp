// Running a real forward (runner/forward.hpp) on a checkpoint in the tests: a WeightSource over
// the mapped checkpoint (plain tensors as they are, quantized linears through libquant's
// recognisers), test vectors written by tests/interop/forward_models.py, the whole forward on the
// CPU ops in exactly the activation memory the planner reserves, and the error measures.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>
#include <string>
#include <unordered_map>
#include <vector>

#include "models.hpp"
#include "qtool/formats/checkpoint.hpp"
#include "qtool/formats/error.hpp"
#include "qtool/formats/safetensors.hpp"
#include "qtool/formats/thread_pool.hpp"
#include "qtool/libquant/quant.hpp"
#include "qtool/planner/arch.hpp"
#include "qtool/runner/cpu_ops.hpp"
#include "qtool/runner/forward.hpp"
#include "qtool/runner/schedule.hpp"

namespace qtool::test {

// The tensors of one component, bound where the checkpoint is mapped. "lm_head.weight" of a tied
// Llama resolves to model.embed_tokens.weight. Records the order of get() calls.
class CheckpointWeights final : public runner::WeightSource {
 public:
  explicit CheckpointWeights(const Component& c) : comp_(c) {
    for (const quant::QuantizedLinear& ql : quant::find_quantized_linears(c)) {
      for (size_t k = 0; k < ql.tensor_names.size(); ++k)
        if (ql.tensor_parts[k] == quant::Part::Weight) quantized_.emplace(ql.tensor_names[k], ql);
    }
    if (!c.find("lm_head.weight") && c.find("model.embed_tokens.weight"))
      aliases_["lm_head.weight"] = "model.embed_tokens.weight";
  }

  runner::DequantParams get(std::string_view tensor) override {
    fetched.emplace_back(tensor);
    std::string name(tensor);
    if (auto a = aliases_.find(name); a != aliases_.end()) name = a->second;
    if (auto q = quantized_.find(name); q != quantized_.end())
      return runner::quantized_params(q->second, comp_);
    const auto e = comp_.find(name);
    if (!e) fail(ErrorKind::InvalidInput, "tensor '", name, "' is not in the checkpoint");
    const TensorInfo& info = comp_.info(*e);
    runner::DequantParams p;
    switch (info.dtype) {
      case DType::BF16: p.kind = runner::WeightKind::Bf16; break;
      case DType::F16: p.kind = runner::WeightKind::F16; break;
      case DType::F32: p.kind = runner::WeightKind::F32; break;
      default: fail(ErrorKind::InvalidInput, "tensor '", name, "' is ", dtype_name(info.dtype));
    }
    p.rows = info.shape.size() == 2 ? static_cast<uint64_t>(info.shape[0]) : 1;
    p.cols = info.shape.size() == 2 ? static_cast<uint64_t>(info.shape[1]) : info.numel();
    p.weight = comp_.data(*e).data();
    return p;
  }
  bool has(std::string_view tensor) const override {
    return aliases_.count(std::string(tensor)) || comp_.find(tensor).has_value();
  }

  std::vector<std::string> fetched;

 private:
  const Component& comp_;
  std::unordered_map<std::string, quant::QuantizedLinear> quantized_;
  std::unordered_map<std::string, std::string> aliases_;
};

// Every tensor of a safetensors file as a HostTensor.
inline std::map<std::string, runner::HostTensor> read_vectors(const std::filesystem::path& file) {
  const SafetensorsFile f = SafetensorsFile::open(file);
  std::map<std::string, runner::HostTensor> out;
  for (const TensorInfo& t : f.tensors()) {
    const auto data = f.data(t);
    out[t.name] =
        runner::HostTensor{t.name, t.dtype, t.shape, std::vector<uint8_t>(data.begin(), data.end())};
  }
  return out;
}

// The forward's inputs among the vectors (the names input_specs lists).
inline std::vector<runner::HostTensor> inputs_of(const runner::Forward& fwd,
                                                 const std::map<std::string, runner::HostTensor>& vectors) {
  std::vector<runner::HostTensor> in;
  for (const runner::InputSpec& s : fwd.input_specs(1, 1))
    if (auto it = vectors.find(s.name); it != vectors.end()) in.push_back(it->second);
  return in;
}

inline std::vector<float> as_floats(const runner::HostTensor& t) {
  const size_t n = t.bytes.size() / dtype_size(t.dtype);
  std::vector<float> v(n);
  convert_to_f32(t.dtype, t.bytes.data(), v.data(), n);
  return v;
}

// Errors of `got` against `want`, relative to want's RMS: max |d| / rms(want), rms(d) / rms(want).
struct Deviation {
  double max_rel = 0, rms_rel = 0;
  size_t n = 0;
  bool finite = true;
};
inline Deviation deviation(const std::vector<float>& got, const std::vector<float>& want) {
  QTOOL_ASSERT(got.size() == want.size());
  Deviation d;
  double sw = 0, sd = 0, md = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (!std::isfinite(got[i])) d.finite = false;
    const double e = static_cast<double>(got[i]) - want[i];
    sw += static_cast<double>(want[i]) * want[i];
    sd += e * e;
    md = std::max(md, std::fabs(e));
  }
  const double rms = std::sqrt(sw / static_cast<double>(got.size()));
  d.n = got.size();
  d.max_rel = md / rms;
  d.rms_rel = std::sqrt(sd / static_cast<double>(got.size())) / rms;
  return d;
}

// qtool's output judged against the framework's. The tolerance is derived from the framework's
// own rounding noise: `noise` = the framework's bf16 output against the same model run in float32
// (`<output>.f32`). qtool's bf16 forward is another computation of the same function with the
// same roundings and a different GEMM / attention summation order, so it must lie within twice
// that noise of the framework's bf16 output (max and RMS), and no farther from the float32 output
// than 1.25 x the framework's RMS distance (a systematic mistake moves it farther).
struct Judgement {
  Deviation vs_framework, noise, vs_f32;
  bool ok = false;
};
inline Judgement judge(const runner::HostTensor& ours,
                       const std::map<std::string, runner::HostTensor>& vectors) {
  Judgement j;
  const auto got = as_floats(ours);
  const auto bf16 = as_floats(vectors.at(ours.name));
  const auto f32 = as_floats(vectors.at(ours.name + ".f32"));
  j.vs_framework = deviation(got, bf16);
  j.noise = deviation(bf16, f32);
  j.vs_f32 = deviation(got, f32);
  j.ok = j.vs_framework.finite && j.vs_framework.max_rel <= 2 * j.noise.max_rel &&
         j.vs_framework.rms_rel <= 2 * j.noise.rms_rel && j.vs_f32.rms_rel <= 1.25 * j.noise.rms_rel;
  return j;
}

// Whether the ops' activation peak is the reserve: the reserve counts every allocation rounded up
// to planner::kActivationAlignment, the peak the top of the stack (the last allocation unpadded).
inline bool peak_matches(uint64_t peak, uint64_t reserved) {
  return peak <= reserved && reserved - peak < planner::kActivationAlignment;
}

// The forward's activation reserve at these inputs' sizes (the plan's, with the text tokens of
// the inputs for Flux).
inline uint64_t reserve_for(const runner::Forward& fwd, const std::vector<runner::HostTensor>& inputs,
                            DType dtype, int64_t* tokens_out = nullptr) {
  planner::Arch arch = fwd.arch();
  int64_t batch = 0, tokens = 0;
  for (const runner::HostTensor& t : inputs) {
    if (t.name == "input_ids" || t.name == "hidden_states") {
      batch = t.shape[0];
      tokens = t.shape[1];
    }
    if (t.name == "encoder_hidden_states") std::get<planner::FluxArch>(arch).text_tokens = t.shape[1];
  }
  if (tokens_out) *tokens_out = tokens;
  uint64_t sum = 0;
  for (const planner::ActivationItem& i : planner::activation_items(arch, batch, tokens, dtype))
    sum += i.bytes;
  return sum;
}

struct ForwardRun {
  runner::HostTensor output;                // outputs[0]
  std::vector<runner::HostTensor> outputs;  // Forward::outputs (CLIP adds pooler_output)
  uint64_t peak = 0;
  uint64_t reserved = 0;
  std::vector<std::string> fetched;
  std::vector<runner::HostTensor> stages;  // the state after each unit (StagedForward)
};

// The whole forward on the CPU ops whose activation memory is exactly the planner's reserve.
inline ForwardRun run_forward(runner::Forward& fwd, const Component& comp,
                              const std::vector<runner::HostTensor>& inputs, DType dtype, ThreadPool& pool) {
  ForwardRun r;
  int64_t tokens = 0;
  r.reserved = reserve_for(fwd, inputs, dtype, &tokens);
  fwd.check_inputs(inputs, tokens);
  const auto ops = runner::make_cpu_ops(pool, r.reserved);
  CheckpointWeights weights(comp);
  fwd.begin(*ops, inputs);
  auto* staged = dynamic_cast<runner::models::StagedForward*>(&fwd);
  for (size_t u = 0; u < fwd.units().size(); ++u) {
    fwd.run_unit(u, *ops, weights);
    if (staged)
      for (runner::HostTensor& t : staged->stages(*ops, u)) r.stages.push_back(std::move(t));
  }
  r.outputs = fwd.outputs(*ops);
  r.output = r.outputs.at(0);
  r.peak = ops->peak_bytes();
  r.fetched = weights.fetched;
  return r;
}

}  // namespace qtool::test
