// verify --reference (verify_checks.hpp): each linear against the original weight, the tensors
// quantize copied, each forward's output and a pipeline's final latents against the original's,
// and on a GPU the CUDA forwards against the CPU backend's.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <tuple>

#include "qtool/formats/error.hpp"
#include "qtool/formats/size.hpp"
#include "qtool/runner/cpu_kernels.hpp"
#include "qtool/runner/error_model.hpp"
#include "qtool/runner/kernel_math.hpp"
#include "qtool/runner/tensor_compare.hpp"
#include "verify_checks.hpp"
#include "verify_forward.hpp"

namespace qtool::runner::verify_detail {

using nlohmann::json;

namespace {

WeightKind plain_kind(DType dt) {
  switch (dt) {
    case DType::BF16: return WeightKind::Bf16;
    case DType::F16: return WeightKind::F16;
    case DType::F32: return WeightKind::F32;
    default: break;
  }
  fail(ErrorKind::Unsupported, "reference weight dtype ", dtype_name(dt), " is not bf16, f16 or f32");
}

// The original weight of linear `l`, from the reference's mapped files.
DequantParams reference_weight(const Setup& s, const Checkpoint& ref, const LinearTask& l) {
  const Component* rc = ref.find_component(l.component);
  const std::string ref_name = l.module + ".weight";
  const auto re = rc ? rc->find(ref_name) : std::nullopt;
  if (!re)
    fail(ErrorKind::InvalidInput, s.options.reference.string(), ": no tensor '",
         l.component.empty() ? ref_name : l.component + "/" + ref_name, "' to compare linear '", l.module,
         "' with");
  const TensorInfo& ri = rc->info(*re);
  if (ri.shape.size() != 2 || static_cast<uint64_t>(ri.shape[0]) != l.out() ||
      static_cast<uint64_t>(ri.shape[1]) != l.in())
    fail(ErrorKind::InvalidInput, s.options.reference.string(), ": tensor '", ref_name, "' has shape [",
         ri.shape.empty() ? 0 : ri.shape[0], ", ", ri.shape.size() > 1 ? ri.shape[1] : 0,
         "] but the linear is [", l.out(), ", ", l.in(), "]");
  DequantParams rp;
  rp.kind = plain_kind(ri.dtype);
  rp.rows = l.out();
  rp.cols = l.in();
  rp.weight = rc->data(*re).data();
  return rp;
}

// One linear, quantized and original, each run alone on the same activations.
struct LayerResult {
  json row;  // the report's "layers" entry
  double rel_error = 0;
  double bound = 0;
  bool ok = true;
  bool exact_mismatch = false;   // unquantized and stored alike, yet not equal
  bool direct_mismatch = false;  // run alone, not the planned run's digest
};

LayerResult compare_layer(const Setup& s, const Checkpoint& ref, const RunResult& planned, size_t li,
                          bool compared, ThreadPool& pool) {
  const Schedule& schedule = s.schedule;
  const LinearTask& l = schedule.linears[li];
  const DequantParams rp = reference_weight(s, ref, l);
  const uint64_t seed = s.options.seed;
  const int dev = schedule.steps[l.step].device;
  const uint64_t ldx = linears_only_ld(schedule, l);
  const DequantParams qp = schedule.bind_mapped(l, s.checkpoint);
  const LayerRun yq = s.backend->run_layer(qp, s.tokens, ldx, seed, dev);
  const LayerRun yr = s.backend->run_layer(rp, s.tokens, ldx, seed, dev);
  LayerResult r;
  r.direct_mismatch = compared && !(yq.digest == planned.digests[0][li]);
  std::vector<uint16_t> x(s.tokens * ldx);
  cpu::generate_activation(kmath::activation_stream(seed), s.tokens, ldx, 0, l.in(), x.data(), pool);
  const ErrorVariance var = error_variance(qp, rp.kind, x, ldx, s.tokens, pool);
  const ErrorPrediction e =
      predict_and_measure(yq.y, yr.y, x, ldx, s.tokens, l.in(), var.col, var.spread_sq, l.params.kind);
  r.ok = e.within();
  const bool must_match = !l.quantized() && l.params.kind == rp.kind;
  if (must_match && yq.y != yr.y) {
    r.ok = false;
    r.exact_mismatch = true;
  }
  r.rel_error = e.rel_error();
  r.bound = e.bound();
  r.row = {{"component", l.component},
           {"module", l.module},
           {"scheme", l.scheme},
           {"gpu", dev},
           {"streamed", schedule.steps[l.step].streamed},
           {"rel_error", e.rel_error()},
           {"predicted_rel_error", e.predicted_rel()},
           {"bound", e.bound()},
           {"within", r.ok},
           {"digest_matches_planned", compared ? json(yq.digest == planned.digests[0][li]) : json()}};
  return r;
}

// "reference error" and "planned == direct": every linear against the original weight.
json check_reference_linears(const Setup& s, const Checkpoint& ref, const RunResult& planned,
                             ThreadPool& pool, Checks& checks) {
  const Schedule& schedule = s.schedule;
  const size_t n_linears = schedule.linears.size();
  const std::vector<bool> compared = linears_only_mask(schedule, planned);
  json layers = json::array();
  size_t fails = 0, direct_mismatch = 0, exact_mismatch = 0;
  std::map<std::string, std::pair<double, double>> worst;  // scheme -> (max rel error, max error/bound)
  std::string first_fail;
  for (size_t li = 0; li < n_linears; ++li) {
    const LinearTask& l = schedule.linears[li];
    LayerResult r = compare_layer(s, ref, planned, li, compared[li], pool);
    direct_mismatch += r.direct_mismatch;
    exact_mismatch += r.exact_mismatch;
    if (!r.ok) {
      if (!fails)
        first_fail =
            str_cat(l.component.empty() ? "" : l.component + "/", l.module, " (", l.scheme,
                    ": relative error ", fmt("%.3g", r.rel_error), ", bound ", fmt("%.3g", r.bound), ")");
      ++fails;
    }
    auto& w = worst[l.scheme];
    w.first = std::max(w.first, r.rel_error);
    w.second = std::max(w.second, r.bound > 0 ? r.rel_error / r.bound : 0.0);
    layers.push_back(std::move(r.row));
  }
  std::string summary;
  for (const auto& [scheme, w] : worst)
    summary += str_cat(summary.empty() ? "" : "; ", scheme, " max rel error ", fmt("%.3g", w.first), " (",
                       fmt("%.2f", w.second), " of its bound)");
  checks.add(
      "reference error", fails ? CheckResult::Status::Fail : CheckResult::Status::Pass,
      fails ? str_cat(fails, " of ", n_linears, " linears outside their bound",
                      exact_mismatch ? str_cat(" (", exact_mismatch, " unquantized ones not exact)") : "",
                      "; first ", first_fail)
            : str_cat(n_linears, " linears within their bound: ", summary));
  checks.add("planned == direct", direct_mismatch ? CheckResult::Status::Fail : CheckResult::Status::Pass,
             direct_mismatch
                 ? str_cat(direct_mismatch, " planned outputs differ from the same layer run alone")
                 : str_cat("each layer run alone from the mapped checkpoint gives the planned run's output "
                           "bit for bit (linears-only components)"));
  return layers;
}

// --reference: every tensor quantize copies must be the original's, byte for byte (tensor_compare.hpp).
void check_reference_tensors(const Checkpoint& checkpoint, const Checkpoint& ref, Checks& checks) {
  const ReferenceTensors rt = compare_with_reference(checkpoint, ref);
  checks.json()["reference_tensors"] = {{"compared", rt.n_compared},
                                        {"bytes_compared", rt.bytes_compared},
                                        {"quantized_checked", rt.n_quantized},
                                        {"differences", rt.differences}};
  if (!rt.differences.empty())
    checks.add(
        "reference tensors", CheckResult::Status::Fail,
        str_cat(rt.differences.size(), " difference(s) from the reference, first ", rt.differences.front()));
  else
    checks.add("reference tensors", CheckResult::Status::Pass,
               str_cat(rt.n_compared, " unquantized tensors (", format_size(rt.bytes_compared),
                       ") identical to the reference; ", rt.n_quantized,
                       " quantized weights' recorded dtype and shape match it"));
}

// "relative error 0.0639, bound 0.19 (3 x simulated ...); equal bit for bit to <original> ...".
std::string against_bound(const ForwardReference& r, const char* original) {
  return str_cat("relative error ", fmt("%.3g", r.rel_error),
                 r.exact
                     ? " (no quantized linear: must be 0)"
                     : str_cat(", bound ", fmt("%.3g", r.bound), " (", kForwardBoundFactor, " x simulated ",
                               fmt("%.3g", r.simulated_rel_error), " + ", kForwardBoundFloor, "); ",
                               r.substituted ? "equal bit for bit to" : "DIFFERENT from", " ", original,
                               " with its quantized linears dequantized"),
                 r.nonfinite ? str_cat(", ", r.nonfinite, " non-finite") : "", r.within() ? "" : " OUTSIDE");
}

// The quantized model's output against the original's forward on the same inputs.
void check_forward_references(const Setup& s, const Checkpoint& ref, const RunResult& run, ThreadPool& pool,
                              Checks& checks) {
  json out = json::array();
  size_t n = 0, fails = 0;
  std::string detail;
  for (const ComponentRun& c : run.components) {
    if (!c.forward) continue;
    const Component* qc = s.checkpoint.find_component(c.component);
    const Component* rc = ref.find_component(c.component);
    if (!rc)
      fail(ErrorKind::InvalidInput, "--reference ", ref.root().string(), ": no component '", c.component,
           "' to run the original forward of");
    const size_t ci = static_cast<size_t>(qc - s.checkpoint.components().data());
    const ForwardReference r =
        compare_forward_with_reference(*qc, *rc, c, s.schedule.tied[ci], s.options.seed, pool);
    ++n;
    if (!r.within()) ++fails;
    const std::string name = c.component.empty() ? r.output : c.component + "." + r.output;
    detail += str_cat(detail.empty() ? "" : "; ", name, ": ", against_bound(r, "the original"));
    out.push_back(r.to_json());
  }
  checks.json()["forward_reference"] = std::move(out);
  if (n == 0) return;
  checks.add("reference output", fails ? CheckResult::Status::Fail : CheckResult::Status::Pass, detail);
}

// A pipeline's final latents against the original pipeline's.
void check_reference_latents(const Setup& s, const Checkpoint& ref, const RunResult& run,
                             const RunResult& planned, ThreadPool& pool, Checks& checks) {
  const ForwardReference r =
      compare_pipeline_with_reference(s.checkpoint, ref, run, s.schedule, s.tokens, s.options.seed, pool);
  checks.json()["pipeline_reference"] = r.to_json();
  checks.add("reference latents", r.within() ? CheckResult::Status::Pass : CheckResult::Status::Fail,
             str_cat("the final latents after ", planned.pipeline.denoise_steps,
                     " steps against the original pipeline's from the same ids and latents: ",
                     against_bound(r, "the original pipeline")));
}

// The CUDA forwards' outputs against the CPU backend's on the same inputs (verify --reference on a
// GPU): relative RMS error ||y_cuda - y_cpu|| / ||y_cpu|| of every output, each within
// kCudaForwardTolerance. The CUDA ops give the CPU's bits but for linear (cuBLAS) and attention
// (online softmax), whose float32 sums run in another order: about one rounding of the model
// dtype per GEMM output, carried through the blocks (tests/runner/test_cuda_driver.cpp).
constexpr double kCudaForwardTolerance = 2e-2;

// ||a - b|| / ||b|| of two F32 tensors (||a - b|| when b is zero; infinite when their shapes differ).
double rel_rms_error(const HostTensor& a, const HostTensor& b) {
  double num = 0, den = 0;
  const size_t n = std::min(a.bytes.size(), b.bytes.size()) / 4;
  for (size_t i = 0; i < n; ++i) {
    float x, y;
    std::memcpy(&x, a.bytes.data() + 4 * i, 4);
    std::memcpy(&y, b.bytes.data() + 4 * i, 4);
    num += (static_cast<double>(x) - y) * (static_cast<double>(x) - y);
    den += static_cast<double>(y) * y;
  }
  const bool same_shape = a.shape == b.shape && a.dtype == DType::F32 && b.dtype == DType::F32;
  return !same_shape ? INFINITY : den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

void check_cuda_forwards(const RunResult& cuda, const RunResult& cpu, Checks& checks) {
  json out = json::array();
  std::string detail, outside;
  // (output name, CUDA's, CPU's): every forward's outputs, and a pipeline's final latents.
  std::vector<std::tuple<std::string, const HostTensor*, const HostTensor*>> pairs;
  for (size_t ci = 0; ci < cuda.components.size() && ci < cpu.components.size(); ++ci) {
    const ComponentRun& a = cuda.components[ci];
    const ComponentRun& b = cpu.components[ci];
    if (!a.forward || !b.forward) continue;
    const auto name = [&](const HostTensor& t) {
      return a.component.empty() ? t.name : a.component + "." + t.name;
    };
    pairs.emplace_back(name(a.output), &a.output, &b.output);
    for (size_t k = 0; k < a.more_outputs.size() && k < b.more_outputs.size(); ++k)
      pairs.emplace_back(name(a.more_outputs[k]), &a.more_outputs[k], &b.more_outputs[k]);
  }
  if (cuda.pipeline.ran && cpu.pipeline.ran)
    pairs.emplace_back(cuda.pipeline.images.name, &cuda.pipeline.images, &cpu.pipeline.images);
  for (const auto& [name, ya, yb] : pairs) {
    const double rel = rel_rms_error(*ya, *yb);
    out.push_back({{"output", name}, {"rel_rms_error", rel}, {"tolerance", kCudaForwardTolerance}});
    detail += str_cat(detail.empty() ? "" : "; ", name, " ", fmt("%.3g", rel));
    if (!(rel <= kCudaForwardTolerance) && outside.empty()) outside = name;
  }
  checks.json()["cuda_vs_cpu"] = std::move(out);
  if (detail.empty()) return;
  checks.add("cuda forward vs cpu", outside.empty() ? CheckResult::Status::Pass : CheckResult::Status::Fail,
             str_cat("relative RMS error of the CUDA outputs against the CPU backend's on the same inputs (",
                     detail, "), tolerance ", kCudaForwardTolerance,
                     outside.empty() ? "" : str_cat("; ", outside, " OUTSIDE")));
}

// The forwards (and a pipeline) against the original's. The reference forwards run on the CPU
// ops, which round where the frameworks round; the CUDA ops sum GEMMs and attention in another
// order. So on a GPU the quantized model's forward (or pipeline) runs once more on the CPU backend
// on the same inputs: the reference checks hold that run to the original bit for bit, and the
// CUDA outputs must lie within a tolerance of it.
void check_reference_forwards(const Setup& s, const Checkpoint& ref, const RunResult& planned,
                              ThreadPool& pool, Checks& checks) {
  RunResult on_cpu;
  const RunResult* forward_run = &planned;
  if (s.on_gpu) {
    RunOptions c = s.run_opts;
    c.steps = 1;
    c.trace = false;
    on_cpu = make_cpu_backend(s.options.threads)->run(s.checkpoint, s.schedule, c);
    check_cuda_forwards(planned, on_cpu, checks);
    forward_run = &on_cpu;
  }
  check_forward_references(s, ref, *forward_run, pool, checks);
  if (forward_run->pipeline.ran) check_reference_latents(s, ref, *forward_run, planned, pool, checks);
}

}  // namespace

json check_reference(const Setup& s, const RunResult& planned, Checks& checks) {
  const Checkpoint ref = Checkpoint::open(s.options.reference);
  ThreadPool pool(s.options.threads);
  json layers = check_reference_linears(s, ref, planned, pool, checks);
  check_reference_tensors(s.checkpoint, ref, checks);
  check_reference_forwards(s, ref, planned, pool, checks);
  return layers;
}

}  // namespace qtool::runner::verify_detail
