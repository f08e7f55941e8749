#include "verify_forward.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <random>
#include <set>

#include "models/model_util.hpp"
#include "qtool/formats/error.hpp"
#include "qtool/formats/safetensors.hpp"
#include "qtool/libquant/quant.hpp"
#include "qtool/runner/cpu_ops.hpp"
#include "qtool/runner/dequant.hpp"
#include "qtool/runner/driver.hpp"
#include "qtool/runner/error_model.hpp"
#include "qtool/runner/pipeline.hpp"
#include "qtool/runner/schedule.hpp"

namespace qtool::runner {

std::string io_name(const Checkpoint& checkpoint, const std::string& component, const std::string& tensor) {
  return checkpoint.layout() == Checkpoint::Layout::Pipeline ? component + "." + tensor : tensor;
}

namespace {

// A FluxPipeline run's --inputs: the encoders' inputs (text_encoder.input_ids ...) and the
// pipeline's latents; the outputs of an --outputs file are skipped; the whole checked by building
// the run's data flow.
std::map<std::string, std::vector<HostTensor>> read_pipeline_inputs(const SafetensorsFile& in,
                                                                    const std::filesystem::path& file,
                                                                    const Checkpoint& checkpoint,
                                                                    int64_t max_tokens,
                                                                    uint32_t denoise_steps) {
  std::map<std::string, std::unique_ptr<Forward>> forwards;
  for (const Component& c : checkpoint.components())
    if (auto f = make_forward(c)) forwards.emplace(c.name(), std::move(f));
  std::string expected = kLatentsInput;
  for (const char* enc : {"text_encoder", "text_encoder_2"})
    if (forwards.count(enc))
      for (const InputSpec& spec : forwards.at(enc)->input_specs(1, max_tokens))
        expected += str_cat(", ", enc, ".", spec.name);
  std::map<std::string, std::vector<HostTensor>> by_component;
  for (const TensorInfo& t : in.tensors()) {
    bool is_output = t.name == kImagesOutput;
    for (const auto& [name, f] : forwards)
      for (const std::string& out : f->output_names()) is_output = is_output || t.name == name + "." + out;
    if (is_output) continue;
    std::string owner = "-";
    if (t.name == kLatentsInput) owner = "";
    for (const char* enc : {"text_encoder", "text_encoder_2"})
      if (forwards.count(enc))
        for (const InputSpec& spec : forwards.at(enc)->input_specs(1, max_tokens))
          if (t.name == str_cat(enc, ".", spec.name)) owner = enc;
    if (owner == "-")
      fail(ErrorKind::InvalidInput, "--inputs ", file.string(), ": tensor '", t.name,
           "' is not an input of the FluxPipeline run (expected: ", expected,
           "; the transformer's inputs come from the encoders, the latents and the scheduler)");
    HostTensor h;
    h.name = owner.empty() ? t.name : t.name.substr(owner.size() + 1);
    h.dtype = t.dtype;
    h.shape = t.shape;
    const auto bytes = in.data(t);
    h.bytes.assign(bytes.begin(), bytes.end());
    by_component[owner].push_back(std::move(h));
  }
  try {
    for (const char* enc : {"text_encoder", "text_encoder_2"}) {
      if (!by_component.count(enc)) fail(ErrorKind::InvalidInput, "input '", enc, ".input_ids' is missing");
      if (forwards.count(enc)) {
        try {
          forwards.at(enc)->check_inputs(by_component[enc], max_tokens);
        } catch (const Error& e) {
          if (e.kind() != ErrorKind::InvalidInput) throw;
          fail(ErrorKind::InvalidInput, "component '", enc, "', inputs named '", enc,
               ".<input>': ", e.what());
        }
      }
    }
    if (!by_component.count("") || !models::find_input(by_component[""], kLatentsInput))
      fail(ErrorKind::InvalidInput, "input '", kLatentsInput, "' is missing");
    const FluxPipelineFlow check(checkpoint, denoise_steps, max_tokens, 0, by_component);
  } catch (const Error& e) {
    if (e.kind() != ErrorKind::InvalidInput) throw;
    fail(ErrorKind::InvalidInput, "--inputs ", file.string(), ": ", e.what());
  }
  return by_component;
}

// Error(InvalidInput) for --inputs or --outputs `file` when no component of the checkpoint has a
// forward: "<option> <file>: no component of <checkpoint><what>".
[[noreturn]] void fail_no_forward(const char* option, const std::filesystem::path& file,
                                  const Checkpoint& checkpoint, const char* what) {
  fail(ErrorKind::InvalidInput, option, " ", file.string(), ": no component of ", checkpoint.root().string(),
       what);
}

}  // namespace

std::map<std::string, std::vector<HostTensor>> read_inputs(const std::filesystem::path& file,
                                                           const Checkpoint& checkpoint, int64_t max_tokens,
                                                           uint32_t denoise_steps) {
  const SafetensorsFile in = SafetensorsFile::open(file);
  if (denoise_steps > 0 && is_flux_pipeline(checkpoint))
    return read_pipeline_inputs(in, file, checkpoint, max_tokens, denoise_steps);
  std::map<std::string, std::vector<HostTensor>> by_component;
  std::map<std::string, std::unique_ptr<Forward>> forwards;
  std::string expected;
  for (const Component& c : checkpoint.components()) {
    auto f = make_forward(c);
    if (!f) continue;
    for (const InputSpec& spec : f->input_specs(1, max_tokens))
      expected += (expected.empty() ? "" : ", ") + io_name(checkpoint, c.name(), spec.name);
    by_component[c.name()];
    forwards.emplace(c.name(), std::move(f));
  }
  if (forwards.empty())
    fail_no_forward("--inputs", file, checkpoint,
                    " has a forward the runner executes (LlamaForCausalLM, FluxTransformer2DModel, "
                    "T5EncoderModel, CLIPTextModel): it runs linears only and takes no inputs");
  for (const TensorInfo& t : in.tensors()) {
    // An --outputs file replays: its outputs are not inputs.
    bool is_output = false;
    for (const auto& [name, f] : forwards)
      for (const std::string& out : f->output_names())
        is_output = is_output || t.name == io_name(checkpoint, name, out);
    if (is_output) continue;
    std::string owner;
    for (const auto& [name, f] : forwards)
      for (const InputSpec& spec : f->input_specs(1, max_tokens))
        if (io_name(checkpoint, name, spec.name) == t.name) owner = name;
    if (!forwards.count(owner) || (owner.empty() && checkpoint.layout() == Checkpoint::Layout::Pipeline))
      fail(ErrorKind::InvalidInput, "--inputs ", file.string(), ": tensor '", t.name,
           "' is not an input of the forward (expected: ", expected, ")");
    HostTensor h;
    const std::string prefix = io_name(checkpoint, owner, "");
    h.name = t.name.substr(prefix.size());
    h.dtype = t.dtype;
    h.shape = t.shape;
    const auto bytes = in.data(t);
    h.bytes.assign(bytes.begin(), bytes.end());
    by_component[owner].push_back(std::move(h));
  }
  for (const auto& [name, f] : forwards) {
    try {
      f->check_inputs(by_component[name], max_tokens);
    } catch (const Error& e) {
      if (e.kind() != ErrorKind::InvalidInput) throw;
      fail(ErrorKind::InvalidInput, "--inputs ", file.string(),
           name.empty() ? std::string() : " (component '" + name + "', inputs named '" + name + ".<input>')",
           ": ", e.what());
    }
  }
  return by_component;
}

void write_outputs(const std::filesystem::path& file, const Checkpoint& checkpoint, const RunResult& run,
                   bool with_inputs) {
  std::vector<TensorDecl> decls;
  std::vector<std::pair<std::string, const HostTensor*>> tensors;
  const bool pipeline = run.pipeline.ran;
  for (const ComponentRun& c : run.components) {
    if (!c.forward) continue;
    tensors.emplace_back(io_name(checkpoint, c.component, c.output.name), &c.output);
    for (const HostTensor& t : c.more_outputs)
      tensors.emplace_back(io_name(checkpoint, c.component, t.name), &t);
    // A pipeline's transformer inputs are the flow's, not the run's: only the encoders' ids replay.
    if (with_inputs && (!pipeline || c.component == "text_encoder" || c.component == "text_encoder_2"))
      for (const HostTensor& t : c.inputs) tensors.emplace_back(io_name(checkpoint, c.component, t.name), &t);
  }
  if (pipeline) {
    tensors.emplace_back(kImagesOutput, &run.pipeline.images);
    if (with_inputs) tensors.emplace_back(kLatentsInput, &run.pipeline.latents);
  }
  if (tensors.empty())
    fail_no_forward(
        "--outputs", file, checkpoint,
        " ran a forward (LlamaForCausalLM, FluxTransformer2DModel, T5EncoderModel and CLIPTextModel "
        "have one, on either backend)");
  for (const auto& [name, t] : tensors) decls.push_back({name, t->dtype, t->shape});
  SafetensorsWriter w(file, decls, {{"producer", "qtool verify"}});
  for (const auto& [name, t] : tensors) w.write(name, t->bytes);
  w.commit();
}

bool ForwardReference::within() const {
  if (nonfinite) return false;
  return exact ? rel_error == 0 && max_abs_error == 0 : substituted && rel_error <= bound;
}

nlohmann::json ForwardReference::to_json() const {
  return {{"component", component},
          {"output", output},
          {"exact", exact},
          {"rel_error", rel_error},
          {"max_abs_error", max_abs_error},
          {"simulated_rel_error", simulated_rel_error},
          {"bound", bound},
          {"bound_rule", exact ? "no quantized linear: bit for bit"
                               : str_cat(kForwardBoundFactor, " x simulated_rel_error (the largest of ",
                                         kNoiseDraws, " noise draws) + ", kForwardBoundFloor)},
          {"noise_seed", noise_seed},
          {"substituted", substituted},
          {"nonfinite", nonfinite},
          {"within", within()}};
}

namespace {

std::vector<float> as_f32(const HostTensor& t) {
  QTOOL_ASSERT(t.dtype == DType::F32);
  std::vector<float> v(t.bytes.size() / 4);
  std::memcpy(v.data(), t.bytes.data(), v.size() * 4);
  return v;
}

// ||a - b|| / ||b|| and max |a - b|.
std::pair<double, double> compare(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0, mx = 0;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) {
    const double d = static_cast<double>(a[i]) - b[i];
    num += d * d;
    den += static_cast<double>(b[i]) * b[i];
    mx = std::max(mx, std::fabs(d));
  }
  if (num == 0) return {0.0, mx};
  return {den > 0 ? std::sqrt(num / den) : INFINITY, mx};
}

// r's measured error: the non-finite values of the quantized output y_q, its relative and largest
// absolute error against the original's y_ref.
void measure(ForwardReference& r, const std::vector<float>& y_q, const std::vector<float>& y_ref) {
  for (float v : y_q) r.nonfinite += std::isfinite(v) ? 0 : 1;
  std::tie(r.rel_error, r.max_abs_error) = compare(y_q, y_ref);
}

// The seed of the simulated noise, from verify's seed.
uint64_t noise_seed(uint64_t seed) { return seed ^ 0x5EEDF0D5ull; }

// r's bound from kNoiseDraws runs of simulate(rng): the original's output with the error model's
// noise in its quantized linears, each draw from the same generator in turn.
template <typename Simulate>
void bound_by(ForwardReference& r, const Simulate& simulate, const std::vector<float>& y_ref) {
  std::mt19937_64 rng(r.noise_seed);
  r.simulated_rel_error = 0;
  for (int d = 0; d < kNoiseDraws; ++d)
    r.simulated_rel_error = std::max(r.simulated_rel_error, compare(simulate(rng), y_ref).first);
  r.bound = kForwardBoundFactor * r.simulated_rel_error + kForwardBoundFloor;
}

// Per quantized linear of `quantized`: its weight's name and the error variance of each column.
std::map<std::string, std::vector<double>> predicted_variance(const Component& quantized,
                                                              const Component& reference, ThreadPool& pool) {
  std::map<std::string, std::vector<double>> out;
  for (const quant::QuantizedLinear& ql : quant::find_quantized_linears(quantized)) {
    const std::string name = ql.module + ".weight";
    const auto re = reference.find(name);
    if (!re) continue;
    const DType dt = reference.info(*re).dtype;
    const WeightKind ref_kind = weight_kind_of(dt).value_or(WeightKind::F32);
    out[name] = column_error_variance(quantized_params(ql, quantized), ref_kind, pool);
  }
  return out;
}

// The original's forward with each quantized linear's weight replaced by the quantized file's,
// dequantized: the quantized model must give exactly this output, so any other difference (an
// embedding, a norm, a bias, an unquantized head) shows bit for bit.
using Perturb = std::function<void(std::string_view name, const DequantParams& params, uint8_t* bytes)>;

// A MappedWeights perturbation: each quantized linear's weight replaced by the quantized file's,
// dequantized.
Perturb substitute_dequantized(const Component& quantized) {
  std::map<std::string, DequantParams> dequantized;
  for (const quant::QuantizedLinear& ql : quant::find_quantized_linears(quantized))
    dequantized[ql.module + ".weight"] = quantized_params(ql, quantized);
  return
      [dequantized = std::move(dequantized)](std::string_view name, const DequantParams& p, uint8_t* bytes) {
        const auto it = dequantized.find(std::string(name));
        if (it == dequantized.end() || p.numel() != it->second.numel()) return;
        std::vector<uint16_t> w(p.numel());
        dequantize_to_bf16_cpu(it->second, w.data(), 0, w.size());
        if (p.kind == WeightKind::Bf16) {
          std::memcpy(bytes, w.data(), w.size() * 2);
          return;
        }
        std::vector<float> f(w.size());
        for (size_t i = 0; i < w.size(); ++i) f[i] = bf16_to_f32(w[i]);
        convert_from_f32(p.kind == WeightKind::F16 ? DType::F16 : DType::F32, f.data(), bytes, f.size());
      };
}

bool substituted_forward_equal(Forward& fwd, Ops& ops, const Component& quantized, const Component& reference,
                               const ComponentRun& run,
                               const std::unordered_map<std::string, std::string>& tied) {
  MappedWeights weights(reference, tied, substitute_dequantized(quantized));
  return run_forward(fwd, ops, weights, run.inputs).bytes == run.output.bytes;
}

// A MappedWeights perturbation: zero-mean Gaussian noise of the predicted variance of its column
// added to each element of a quantized linear's (bf16) weight.
Perturb add_predicted_noise(const std::map<std::string, std::vector<double>>& variance,
                            std::mt19937_64& rng) {
  return [&variance, &rng](std::string_view name, const DequantParams& p, uint8_t* bytes) {
    const auto it = variance.find(std::string(name));
    if (it == variance.end() || p.kind != WeightKind::Bf16) return;
    std::normal_distribution<double> normal(0.0, 1.0);
    for (uint64_t row = 0; row < p.rows; ++row)
      for (uint64_t col = 0; col < p.cols; ++col) {
        uint16_t h;
        std::memcpy(&h, bytes + 2 * (row * p.cols + col), 2);
        const double sd = std::sqrt(it->second[col] / static_cast<double>(p.rows));
        h = f32_to_bf16(static_cast<float>(bf16_to_f32(h) + sd * normal(rng)));
        std::memcpy(bytes + 2 * (row * p.cols + col), &h, 2);
      }
  };
}

}  // namespace

ForwardReference compare_forward_with_reference(const Component& quantized, const Component& reference,
                                                const ComponentRun& run,
                                                const std::unordered_map<std::string, std::string>& tied,
                                                uint64_t seed, ThreadPool& pool) {
  ForwardReference r;
  r.component = run.component;
  r.output = run.output.name;
  std::unique_ptr<Forward> fwd = make_forward(reference);
  if (!fwd || fwd->architecture() != run.architecture)
    fail(ErrorKind::InvalidInput, "--reference: component '", reference.name(), "' in ",
         reference.dir().string(), " is not a ", run.architecture, " (its config.json)");
  auto ops = make_cpu_ops(pool, 2 * run.activation_peak_bytes() + (16u << 20));
  MappedWeights ref_weights(reference, tied);
  const std::vector<float> y_ref = as_f32(run_forward(*fwd, *ops, ref_weights, run.inputs));
  const std::vector<float> y_q = as_f32(run.output);
  if (y_ref.size() != y_q.size())
    fail(ErrorKind::InvalidInput, "--reference: the original's ", r.output, " has ", y_ref.size(),
         " values, the quantized model's ", y_q.size(), ": not the same model");
  measure(r, y_q, y_ref);

  const std::map<std::string, std::vector<double>> variance = predicted_variance(quantized, reference, pool);
  r.exact = variance.empty();
  if (r.exact) return r;
  r.substituted = substituted_forward_equal(*fwd, *ops, quantized, reference, run, tied);
  r.noise_seed = noise_seed(seed);
  bound_by(
      r,
      [&](std::mt19937_64& rng) {
        MappedWeights noisy(reference, tied, add_predicted_noise(variance, rng));
        return as_f32(run_forward(*fwd, *ops, noisy, run.inputs));
      },
      y_ref);
  return r;
}

namespace {

// The pipeline run again on the original's weights (CPU ops): each pass's forward on `weights` of
// its component, the flow between them. Returns the final latents.
std::vector<float> run_pipeline(
    const Checkpoint& ref, const RunResult& run, uint64_t tokens, Ops& ops,
    const std::function<std::unique_ptr<WeightSource>(const Component&)>& weights_of) {
  std::map<std::string, std::vector<HostTensor>> given;
  for (const ComponentRun& c : run.components)
    if (c.component == "text_encoder" || c.component == "text_encoder_2") given[c.component] = c.inputs;
  given[""] = {run.pipeline.latents};
  FluxPipelineFlow flow(ref, run.pipeline.denoise_steps, static_cast<int64_t>(tokens), 0, given);
  std::map<uint32_t, std::pair<std::unique_ptr<Forward>, std::unique_ptr<WeightSource>>> parts;
  for (size_t p = 0; p < flow.passes().size(); ++p) {
    const uint32_t ci = flow.passes()[p].component;
    auto& [fwd, weights] = parts[ci];
    if (!fwd) {
      fwd = make_forward(ref.components()[ci]);
      weights = weights_of(ref.components()[ci]);
    }
    const size_t mark = ops.mark();
    fwd->begin(ops, flow.inputs(p));
    for (size_t u = 0; u < fwd->units().size(); ++u) fwd->run_unit(u, ops, *weights);
    const std::vector<HostTensor> outs = fwd->outputs(ops);
    ops.release(mark);
    flow.take(p, outs);
  }
  return as_f32(flow.result().images);
}

}  // namespace

ForwardReference compare_pipeline_with_reference(const Checkpoint& quantized, const Checkpoint& reference,
                                                 const RunResult& run, const Schedule& schedule,
                                                 uint64_t tokens, uint64_t seed, ThreadPool& pool) {
  QTOOL_ASSERT(run.pipeline.ran);
  ForwardReference r;
  r.component = "pipeline";
  r.output = kImagesOutput;
  const auto tied_of = [&](const Component& c) {
    const Component* qc = quantized.find_component(c.name());
    if (!qc)
      fail(ErrorKind::InvalidInput, "--reference ", reference.root().string(), ": component '", c.name(),
           "' is not in ", quantized.root().string());
    return schedule.tied[static_cast<size_t>(qc - quantized.components().data())];
  };
  uint64_t peak = 0;
  for (const ComponentRun& c : run.components) peak = std::max(peak, c.activation_peak_bytes());
  auto ops = make_cpu_ops(pool, 2 * peak + (16u << 20));
  const std::vector<float> y_q = as_f32(run.pipeline.images);
  const std::vector<float> y_ref = run_pipeline(reference, run, tokens, *ops, [&](const Component& c) {
    return std::make_unique<MappedWeights>(c, tied_of(c));
  });
  if (y_ref.size() != y_q.size())
    fail(ErrorKind::InvalidInput, "--reference: the original pipeline's latents have ", y_ref.size(),
         " values, the quantized one's ", y_q.size(), ": not the same pipeline");
  measure(r, y_q, y_ref);

  // Per component of the flow: its quantized linears' predicted error variance.
  std::map<std::string, std::map<std::string, std::vector<double>>> variance;
  for (const char* name : {"text_encoder", "text_encoder_2", "transformer"}) {
    const Component* qc = quantized.find_component(name);
    const Component* rc = reference.find_component(name);
    if (qc && rc) variance[name] = predicted_variance(*qc, *rc, pool);
  }
  r.exact = true;
  for (const auto& [name, v] : variance) r.exact = r.exact && v.empty();
  if (r.exact) return r;
  const std::vector<float> y_sub = run_pipeline(reference, run, tokens, *ops, [&](const Component& c) {
    const Component* qc = quantized.find_component(c.name());
    return std::make_unique<MappedWeights>(c, tied_of(c), substitute_dequantized(*qc));
  });
  r.substituted = y_sub.size() == y_q.size() && std::memcmp(y_sub.data(), y_q.data(), y_q.size() * 4) == 0;
  r.noise_seed = noise_seed(seed);
  bound_by(
      r,
      [&](std::mt19937_64& rng) {
        return run_pipeline(reference, run, tokens, *ops, [&](const Component& c) {
          return std::make_unique<MappedWeights>(c, tied_of(c), add_predicted_noise(variance[c.name()], rng));
        });
      },
      y_ref);
  return r;
}

}  // namespace qtool::runner
