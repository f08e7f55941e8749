#include "qtool/runner/verify.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <random>
#include <set>
#include <tuple>

#include "qtool/formats/checked.hpp"
#include "qtool/formats/checkpoint.hpp"
#include "qtool/formats/error.hpp"
#include "qtool/formats/size.hpp"
#include "qtool/formats/thread_pool.hpp"
#include "qtool/planner/plan.hpp"
#include "qtool/runner/cpu_kernels.hpp"
#include "qtool/runner/driver.hpp"
#include "qtool/runner/error_model.hpp"
#include "qtool/runner/kernel_math.hpp"
#include "qtool/runner/schedule.hpp"
#include "qtool/runner/tensor_compare.hpp"
#include "verify_forward.hpp"

namespace qtool::runner {

using nlohmann::json;

const char* check_status_name(CheckResult::Status status) {
  switch (status) {
    case CheckResult::Status::Pass: return "pass";
    case CheckResult::Status::Fail: return "FAIL";
    case CheckResult::Status::Skip: return "skip";
    case CheckResult::Status::Info: return "info";
  }
  return "?";
}

bool VerifyReport::passed() const {
  return std::none_of(checks.begin(), checks.end(),
                      [](const CheckResult& c) { return c.status == CheckResult::Status::Fail; });
}

std::vector<std::string> VerifyReport::failed_names() const {
  std::vector<std::string> names;
  for (const CheckResult& c : checks)
    if (c.status == CheckResult::Status::Fail) names.push_back(c.name);
  return names;
}

json trace_to_json(const std::vector<TraceEvent>& events) {
  json out = json::array();
  constexpr int kHostPid = 1000;             // host lanes (disk reads)
  std::map<std::pair<int, Lane>, int> tids;  // (pid, lane) -> tid
  const auto pid_of = [](const TraceEvent& e) { return e.lane == Lane::DiskRead ? kHostPid : e.device; };
  for (const TraceEvent& e : events) {
    const auto key = std::make_pair(pid_of(e), e.lane);
    if (tids.count(key)) continue;
    tids[key] = static_cast<int>(tids.size()) + 1;
    out.push_back({{"name", "thread_name"},
                   {"ph", "M"},
                   {"pid", key.first},
                   {"tid", tids[key]},
                   {"args", {{"name", e.lane_label()}}}});
  }
  std::set<int> pids;
  for (const auto& [key, tid] : tids) pids.insert(key.first);
  for (int pid : pids)
    out.push_back(
        {{"name", "process_name"},
         {"ph", "M"},
         {"pid", pid},
         {"tid", 0},
         {"args", {{"name", pid == kHostPid ? std::string("host") : "GPU " + std::to_string(pid)}}}});
  for (const TraceEvent& e : events) {
    json args = {{"step", e.step}, {"plan_step", e.plan_step}};
    if (e.bytes) {
      args["bytes"] = e.bytes;
      if (e.dur_us > 0) args["GB/s"] = static_cast<double>(e.bytes) / (e.dur_us * 1e3);
    }
    out.push_back({{"name", e.name},
                   {"cat", e.lane == Lane::Compute ? "compute" : "copy"},
                   {"ph", "X"},
                   {"ts", e.start_us},
                   {"dur", e.dur_us},
                   {"pid", pid_of(e)},
                   {"tid", tids.at({pid_of(e), e.lane})},
                   {"args", std::move(args)}});
  }
  return {{"traceEvents", std::move(out)}, {"displayTimeUnit", "ms"}};
}

namespace {

double overlap(double a0, double a1, double b0, double b1) {
  return std::max(0.0, std::min(a1, b1) - std::max(a0, b0));
}

struct PrefetchStats {
  size_t pairs = 0;        // streamed steps k followed by a streamed step k+1 on the same GPU
  size_t overlapping = 0;  // ... whose copy of k+1 overlaps the compute of k
};

PrefetchStats prefetch_stats(const std::vector<TraceEvent>& events, uint32_t step) {
  PrefetchStats s;
  std::map<int32_t, const TraceEvent*> copies, computes;
  for (const TraceEvent& e : events) {
    if (e.step != step || e.plan_step < 0) continue;
    if (e.lane == Lane::Copy)
      copies[e.plan_step] = &e;
    else if (e.lane == Lane::Compute)
      computes[e.plan_step] = &e;
  }
  // Streamed steps in order; pair each with the next streamed step on the same GPU lane.
  std::vector<const TraceEvent*> ordered;
  for (const auto& [k, e] : copies) ordered.push_back(e);
  for (size_t i = 0; i < ordered.size(); ++i) {
    for (size_t j = i + 1; j < ordered.size(); ++j) {
      if (ordered[j]->device != ordered[i]->device) continue;
      const auto c = computes.find(ordered[i]->plan_step);
      if (c != computes.end()) {
        ++s.pairs;
        if (overlap(ordered[j]->start_us, ordered[j]->start_us + ordered[j]->dur_us, c->second->start_us,
                    c->second->start_us + c->second->dur_us) > 0)
          ++s.overlapping;
      }
      break;
    }
  }
  return s;
}

std::string fmt(const char* f, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, f, v);
  return buf;
}

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

WeightKind plain_kind(DType dt) {
  switch (dt) {
    case DType::BF16: return WeightKind::Bf16;
    case DType::F16: return WeightKind::F16;
    case DType::F32: return WeightKind::F32;
    default: break;
  }
  fail(ErrorKind::Unsupported, "reference weight dtype ", dtype_name(dt), " is not bf16, f16 or f32");
}

// --reference: every tensor quantize copies must be the original's, byte for byte (tensor_compare.hpp).
template <typename Add>
void add_reference_tensors_check(const Checkpoint& checkpoint, const Checkpoint& ref, json& j,
                                 Add& add_check) {
  const ReferenceTensors rt = compare_with_reference(checkpoint, ref);
  j["reference_tensors"] = {{"compared", rt.n_compared},
                            {"bytes_compared", rt.bytes_compared},
                            {"quantized_checked", rt.n_quantized},
                            {"differences", rt.differences}};
  if (!rt.differences.empty())
    add_check(
        "reference tensors", CheckResult::Status::Fail,
        str_cat(rt.differences.size(), " difference(s) from the reference, first ", rt.differences.front()));
  else
    add_check("reference tensors", CheckResult::Status::Pass,
              str_cat(rt.n_compared, " unquantized tensors (", format_size(rt.bytes_compared),
                      ") identical to the reference; ", rt.n_quantized,
                      " quantized weights' recorded dtype and shape match it"));
}

using AddCheck = std::function<void(std::string, CheckResult::Status, std::string)>;

// Per linear: whether it ran linears-only (forward components' linears have no digest of their own).
std::vector<bool> linears_only_mask(const Schedule& schedule, const RunResult& run) {
  std::vector<bool> mask(schedule.linears.size(), true);
  for (size_t li = 0; li < schedule.linears.size(); ++li)
    for (const ComponentRun& c : run.components)
      if (c.forward && c.component == schedule.linears[li].component) mask[li] = false;
  return mask;
}

size_t count_linears_only(const Schedule& schedule, const RunResult& run) {
  const std::vector<bool> mask = linears_only_mask(schedule, run);
  return static_cast<size_t>(std::count(mask.begin(), mask.end(), true));
}

// The plan's bytes for a buffer class: its reserve item of that name; the resident arena; the
// forwards' activations are the reserve items named "activations: ...".
uint64_t planned_item_bytes(const planner::DevicePlan& dp, MemoryKind kind) {
  if (kind == MemoryKind::ResidentArena) return dp.arena_bytes;
  uint64_t bytes = 0;
  for (const planner::ReserveItem& ri : dp.reserve) {
    if (kind == MemoryKind::ForwardActivations ? ri.name.rfind(planner::kForwardActivationPrefix, 0) == 0
                                               : ri.name == memory_kind_name(kind))
      bytes += ri.bytes;
  }
  return bytes;
}

// A run's phases: its components in run order (a FluxPipeline's: CLIP, T5, the transformer, then
// the others), each with what the checks found in it.
struct Phase {
  std::string component;
  size_t outputs = 0;  // digests compared / checked
  uint64_t nonfinite = 0;
  size_t mismatches = 0;  // streamed vs all-resident
};

// The component of a digest name ("transformer[denoise 3]/x_embedder" -> "transformer").
std::string component_of_unit(const std::string& unit_name) {
  const size_t slash = unit_name.find('/');
  if (slash == std::string::npos) return "";
  return unit_name.substr(0, std::min(slash, unit_name.find('[')));
}

std::vector<Phase> make_phases(const RunResult& run) {
  std::vector<Phase> phases;
  if (run.pipeline.ran)
    for (const char* c : {"text_encoder", "text_encoder_2", "transformer"}) phases.push_back({c, 0, 0, 0});
  for (const ComponentRun& c : run.components) {
    bool have = false;
    for (const Phase& p : phases) have = have || p.component == c.component;
    if (!have) phases.push_back({c.component, 0, 0, 0});
  }
  return phases;
}

Phase& phase_of(std::vector<Phase>& phases, const std::string& component) {
  for (Phase& p : phases)
    if (p.component == component) return p;
  QTOOL_ASSERT(false);
  return phases.front();
}

// "text_encoder 14, text_encoder_2 12, ...": one figure per phase.
std::string per_phase(const std::vector<Phase>& phases,
                      const std::function<std::string(const Phase&)>& what) {
  if (phases.size() < 2) return "";
  std::string s;
  for (const Phase& p : phases) s += str_cat(s.empty() ? "" : ", ", p.component, " ", what(p));
  return " (per phase: " + s + ")";
}

// What each component ran, on stderr and in the report.
void report_components(const RunResult& run, json& j, const std::function<void(const std::string&)>& log) {
  json comps = json::array();
  for (const ComponentRun& c : run.components) {
    const std::string name = c.component.empty() ? "model" : c.component;
    json cj = {{"component", c.component}, {"ran", c.forward ? "forward" : "linears only"}};
    if (c.forward) {
      cj["architecture"] = c.architecture;
      cj["units"] = c.units;
      cj["output"] = {{"name", c.output.name}, {"shape", c.output.shape}, {"dtype", "F32"}};
      cj["activation_peak_bytes"] = c.activation_peak_bytes;
      std::string shape;
      for (int64_t d : c.output.shape) shape += (shape.empty() ? "" : ", ") + std::to_string(d);
      cj["passes"] = c.passes;
      log(str_cat("  ", name, ": ", c.architecture, " forward, ", c.units.size(), " units",
                  c.passes > 1 ? str_cat(" x ", c.passes, " passes") : std::string(), ", output ",
                  c.output.name, " [", shape, "], activations ", format_size(c.activation_peak_bytes)));
    } else {
      log(str_cat("  ", name, ": linears only (no forward for its architecture yet)"));
    }
    comps.push_back(std::move(cj));
  }
  j["components"] = std::move(comps);
}

// Every tensor of a component that ran its forward must have been read by it.
std::pair<CheckResult::Status, std::string> check_weights_read(const RunResult& run) {
  size_t n_forwards = 0, unread = 0;
  std::string first;
  for (const ComponentRun& c : run.components) {
    if (!c.forward) continue;
    ++n_forwards;
    unread += c.unread_tensors.size();
    for (size_t i = 0; i < c.unread_tensors.size() && i < 3; ++i)
      first +=
          (first.empty() ? "" : ", ") + (c.component.empty() ? "" : c.component + "/") + c.unread_tensors[i];
  }
  if (n_forwards == 0) return {CheckResult::Status::Skip, "no component ran a forward"};
  if (unread)
    return {CheckResult::Status::Fail, str_cat(unread, " tensors never read by the forward: ", first)};
  return {CheckResult::Status::Pass,
          str_cat("the forward of ", n_forwards, " component(s) read every tensor")};
}

// The quantized model's output against the original's forward on the same inputs.
void check_forward_references(const Checkpoint& checkpoint, const Checkpoint& ref, const RunResult& run,
                              const Schedule& schedule, uint64_t seed, ThreadPool& pool, json& j,
                              const AddCheck& add_check) {
  json out = json::array();
  size_t n = 0, fails = 0;
  std::string detail;
  for (const ComponentRun& c : run.components) {
    if (!c.forward) continue;
    const Component* qc = checkpoint.find_component(c.component);
    const Component* rc = ref.find_component(c.component);
    if (!rc)
      fail(ErrorKind::InvalidInput, "--reference ", ref.root().string(), ": no component '", c.component,
           "' to run the original forward of");
    const size_t ci = static_cast<size_t>(qc - checkpoint.components().data());
    const ForwardReference r = compare_forward_with_reference(*qc, *rc, c, schedule.tied[ci], seed, pool);
    ++n;
    if (!r.within()) ++fails;
    const std::string name = c.component.empty() ? r.output : c.component + "." + r.output;
    detail += str_cat(
        detail.empty() ? "" : "; ", name, ": relative error ", fmt("%.3g", r.rel_error),
        r.exact ? " (no quantized linear: must be 0)"
                : str_cat(", bound ", fmt("%.3g", r.bound), " (", kForwardBoundFactor, " x simulated ",
                          fmt("%.3g", r.simulated_rel_error), " + ", kForwardBoundFloor, "); ",
                          r.substituted ? "equal bit for bit to" : "DIFFERENT from",
                          " the original with its quantized linears dequantized"),
        r.nonfinite ? str_cat(", ", r.nonfinite, " non-finite") : "", r.within() ? "" : " OUTSIDE");
    out.push_back(r.to_json());
  }
  j["forward_reference"] = std::move(out);
  if (n == 0) return;
  add_check("reference output", fails ? CheckResult::Status::Fail : CheckResult::Status::Pass, detail);
}

// The CUDA forwards' outputs against the CPU backend's on the same inputs (verify --reference on a
// GPU): relative RMS error ||y_cuda - y_cpu|| / ||y_cpu|| of every output, each within
// kCudaForwardTolerance. The CUDA ops give the CPU's bits but for linear (cuBLAS) and attention
// (online softmax), whose float32 sums run in another order: about one rounding of the model
// dtype per GEMM output, carried through the blocks (tests/runner/test_cuda_driver.cpp).
constexpr double kCudaForwardTolerance = 2e-2;

template <typename Add>
void add_cuda_forward_check(const RunResult& cuda, const RunResult& cpu, json& j, Add& add_check) {
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
  {
    for (const auto& [name, ya, yb] : pairs) {
      double num = 0, den = 0;
      const size_t n = std::min(ya->bytes.size(), yb->bytes.size()) / 4;
      for (size_t i = 0; i < n; ++i) {
        float x, y;
        std::memcpy(&x, ya->bytes.data() + 4 * i, 4);
        std::memcpy(&y, yb->bytes.data() + 4 * i, 4);
        num += (static_cast<double>(x) - y) * (static_cast<double>(x) - y);
        den += static_cast<double>(y) * y;
      }
      const bool same_shape = ya->shape == yb->shape && ya->dtype == DType::F32 && yb->dtype == DType::F32;
      const double rel = !same_shape ? INFINITY : den > 0 ? std::sqrt(num / den) : std::sqrt(num);
      out.push_back({{"output", name}, {"rel_rms_error", rel}, {"tolerance", kCudaForwardTolerance}});
      detail += str_cat(detail.empty() ? "" : "; ", name, " ", fmt("%.3g", rel));
      if (!(rel <= kCudaForwardTolerance) && outside.empty()) outside = name;
    }
  }
  j["cuda_vs_cpu"] = std::move(out);
  if (detail.empty()) return;
  add_check("cuda forward vs cpu", outside.empty() ? CheckResult::Status::Pass : CheckResult::Status::Fail,
            str_cat("relative RMS error of the CUDA outputs against the CPU backend's on the same inputs (",
                    detail, "), tolerance ", kCudaForwardTolerance,
                    outside.empty() ? "" : str_cat("; ", outside, " OUTSIDE")));
}

// The row stride of the hidden state a linears-only component's linears read in a run (the
// driver's: its widest input), so that a layer run alone multiplies the same layout (a GPU GEMM
// may choose its algorithm by the stride).
uint64_t linears_only_ld(const Schedule& schedule, const LinearTask& l) {
  uint64_t ld = 0;
  for (const LinearTask& o : schedule.linears)
    if (o.component_index == l.component_index) ld = std::max(ld, o.in());
  return ld;
}

}  // namespace

double copy_compute_overlap(const std::vector<TraceEvent>& events, uint32_t step) {
  double copy_total = 0, hidden = 0;
  for (const TraceEvent& c : events) {
    if (c.step != step || c.lane != Lane::Copy) continue;
    copy_total += c.dur_us;
    // Compute intervals of other plan steps on that GPU (they do not overlap each other).
    for (const TraceEvent& k : events) {
      if (k.lane != Lane::Compute || k.device != c.device || k.plan_step == c.plan_step || k.plan_step < 0)
        continue;
      hidden += overlap(c.start_us, c.start_us + c.dur_us, k.start_us, k.start_us + k.dur_us);
    }
  }
  return copy_total > 0 ? std::min(1.0, hidden / copy_total) : 0.0;
}

VerifyReport verify(const VerifyOptions& options) {
  const auto log = [&](const std::string& line) {
    if (options.log) options.log(line);
  };
  VerifyReport report;
  json& j = report.json;
  const auto add_check = [&](std::string name, CheckResult::Status st, std::string detail) {
    log(str_cat("  [", check_status_name(st), "] ", name, ": ", detail));
    report.checks.push_back({std::move(name), st, std::move(detail)});
  };

  const Checkpoint checkpoint = Checkpoint::open(options.checkpoint);
  const planner::Plan plan = planner::read_plan(options.plan);
  const std::string fingerprint = checkpoint.fingerprint();
  if (plan.fingerprint != fingerprint)
    fail(ErrorKind::InvalidInput, options.plan.string(),
         ": the plan was made for a checkpoint with fingerprint ", plan.fingerprint, " (", plan.checkpoint,
         ") but ", options.checkpoint.string(), " has fingerprint ", fingerprint, ": plan it again");
  const Schedule schedule = build_schedule(checkpoint, plan);

  std::unique_ptr<Backend> backend;
  if (options.backend == "cpu") {
    backend = make_cpu_backend(options.threads);
  } else if (options.backend == "cuda") {
    backend = make_cuda_backend();
  } else if (options.backend == "auto") {
    if (cuda_backend_available())
      backend = make_cuda_backend();
    else {
      log("no CUDA device: using the CPU backend");
      backend = make_cpu_backend(options.threads);
    }
  } else {
    fail(ErrorKind::Usage, "--backend: '", options.backend, "' is not auto, cuda or cpu");
  }
  const bool on_gpu = backend->name() == "cuda";
  const uint64_t tokens = options.tokens.value_or(plan.settings.tokens ? plan.settings.tokens : 16);
  if (tokens == 0 || tokens > planner::kMaxTokens)
    fail(ErrorKind::Usage, "--tokens: ", tokens, " is not from 1 to ", planner::kMaxTokens);
  // Every buffer the backends size from tokens (activations [tokens, in or out], 2 or 4 bytes an
  // element) stays below this product, so none of their multiplications wraps.
  for (int dev : schedule.devices) {
    if (!checked_mul(tokens, std::max(schedule.max_in(dev), schedule.max_out(dev)), 8))
      fail(ErrorKind::Usage, "--tokens: ", tokens, " rows of ",
           std::max(schedule.max_in(dev), schedule.max_out(dev)), " values overflow 64 bits");
  }
  if (options.steps == 0) fail(ErrorKind::Usage, "--steps must be at least 1");
  const bool plan_tokens = tokens == plan.settings.tokens;
  const bool flux_pipeline = is_flux_pipeline(checkpoint);
  if (options.denoise_steps && !flux_pipeline)
    fail(ErrorKind::Usage, "--denoise-steps: ", options.checkpoint.string(),
         " is not a pipeline folder whose model_index.json names FluxPipeline");
  const uint32_t denoise_steps = options.denoise_steps.value_or(kDefaultDenoiseSteps);
  if (denoise_steps < 1 || denoise_steps > kMaxDenoiseSteps)
    fail(ErrorKind::Usage, "--denoise-steps: ", denoise_steps, " is not from 1 to ", kMaxDenoiseSteps);
  const uint32_t run_denoise = flux_pipeline ? denoise_steps : 0;
  // Bad inputs stop here (exit 2), before anything runs or is written.
  std::map<std::string, std::vector<HostTensor>> inputs;
  if (!options.inputs.empty())
    inputs =
        read_inputs(options.inputs, checkpoint,
                    static_cast<int64_t>(plan.settings.tokens ? plan.settings.tokens : tokens), run_denoise);

  size_t n_streamed = 0, n_disk = 0;
  for (const ExecStep& st : schedule.steps) {
    if (!st.streamed) continue;
    ++n_streamed;
    if (schedule.arenas[st.arena].placement == Placement::Disk) ++n_disk;
  }
  log(str_cat("verify ", options.checkpoint.string(), " with ", options.plan.string(), " on ",
              backend->device_names()));
  log(str_cat("  ", schedule.steps.size(), " steps (", n_streamed, " streamed, ", n_disk, " from disk), ",
              schedule.linears.size(), " linears, ", schedule.devices.size(), " GPU(s), ", schedule.n_slots,
              " slots, tokens ", tokens, ", ", options.steps, " run steps"));

  j["checkpoint"] = options.checkpoint.string();
  j["plan"] = options.plan.string();
  j["fingerprint"] = fingerprint;
  j["backend"] = backend->name();
  j["devices"] = backend->device_names();
  j["tokens"] = tokens;
  j["steps"] = options.steps;
  j["seed"] = options.seed;
  add_check(
      "plan matches checkpoint", CheckResult::Status::Pass,
      str_cat("fingerprint ", fingerprint,
              "; device map, groups, schedule, linears and tied aliases agree with it (plan_checks.hpp)"));

  RunOptions run_opts;
  run_opts.tokens = tokens;
  run_opts.steps = options.steps;
  run_opts.seed = options.seed;
  run_opts.trace = !options.trace.empty();
  run_opts.sizing.cublas_workspace_bytes = plan.profile.cublas_workspace_bytes;
  run_opts.sizing.alloc_granularity_bytes = plan.profile.alloc_granularity_bytes;
  run_opts.sizing.staging_buffers = schedule.n_slots;  // the planner's staging ring: K buffers
  run_opts.inputs = inputs;
  run_opts.denoise_steps = run_denoise;

  // --- The planned run. ------------------------------------------------------------------------
  const RunResult planned = backend->run(checkpoint, schedule, run_opts);
  const size_t n_linears = schedule.linears.size();
  std::vector<Phase> phases = make_phases(planned);
  const std::vector<bool> linears_only = linears_only_mask(schedule, planned);
  {
    uint64_t bad = 0;
    std::string first;
    for (uint32_t s = 0; s < planned.digests.size(); ++s)
      for (size_t li = 0; li < n_linears; ++li) {
        if (!linears_only[li]) continue;
        Phase& ph = phase_of(phases, schedule.linears[li].component);
        ++ph.outputs;
        if (planned.digests[s][li].nonfinite) {
          bad += planned.digests[s][li].nonfinite;
          ph.nonfinite += planned.digests[s][li].nonfinite;
          if (first.empty())
            first =
                str_cat(schedule.linears[li].component.empty() ? "" : schedule.linears[li].component + "/",
                        schedule.linears[li].module, " (step ", s, ")");
        }
      }
    for (uint32_t s = 0; s < planned.unit_digests.size(); ++s)
      for (size_t u = 0; u < planned.unit_names.size(); ++u) {
        Phase& ph = phase_of(phases, component_of_unit(planned.unit_names[u]));
        ++ph.outputs;
        if (planned.unit_digests[s][u].nonfinite) {
          bad += planned.unit_digests[s][u].nonfinite;
          ph.nonfinite += planned.unit_digests[s][u].nonfinite;
          if (first.empty()) first = str_cat(planned.unit_names[u], " (step ", s, ")");
        }
      }
    // The final latents are not a unit's output: checked on their own.
    uint64_t bad_latents = 0;
    if (planned.pipeline.ran) {
      const HostTensor& img = planned.pipeline.images;
      bad_latents = host_digest(img.bytes.data(), img.bytes.size() / 4, DType::F32).nonfinite;
      bad += bad_latents;
      phase_of(phases, "transformer").nonfinite += bad_latents;
      if (bad_latents && first.empty()) first = "the final latents";
    }
    const std::string phase_detail = per_phase(phases, [](const Phase& p) {
      return p.nonfinite ? str_cat(p.nonfinite, " non-finite") : std::string("finite");
    });
    add_check("finite outputs", bad ? CheckResult::Status::Fail : CheckResult::Status::Pass,
              bad ? str_cat(bad, " non-finite output values, first in ", first, phase_detail)
                  : str_cat(count_linears_only(schedule, planned), " linears and ", planned.unit_names.size(),
                            " forward unit outputs", planned.pipeline.ran ? " and the final latents" : "",
                            " x ", options.steps, " steps, every value finite", phase_detail));
  }
  if (planned.pipeline.ran) {
    const PipelineRun& pr = planned.pipeline;
    j["pipeline"] = {{"class", "FluxPipeline"},
                     {"denoise_steps", pr.denoise_steps},
                     {"mu", pr.schedule.mu},
                     {"sigmas", pr.schedule.sigmas},
                     {"timesteps", pr.schedule.timesteps},
                     {"timestep_inputs", pr.timestep_inputs},
                     {"guidance", pr.guidance},
                     {"latent_grid", {pr.grid_rows, pr.grid_cols}},
                     {"latents_shape", pr.latents.shape},
                     {"phases",
                      {"text_encoder (CLIP): pooler_output -> pooled_projections",
                       "text_encoder_2 (T5): last_hidden_state -> encoder_hidden_states",
                       str_cat("transformer x ", pr.denoise_steps, " (flow-matching Euler)"),
                       "vae: linears only (its convolutions are not executed)"}}};
    log(str_cat(
        "  FluxPipeline: text_encoder -> text_encoder_2 -> transformer x ", pr.denoise_steps,
        " denoising steps (sigmas ", fmt("%.4f", pr.schedule.sigmas.front()), " .. ",
        fmt("%.4f", pr.schedule.sigmas[pr.schedule.sigmas.size() - 2]), ", mu ", fmt("%.4f", pr.schedule.mu),
        pr.guidance > 0 ? str_cat(", guidance ", fmt("%.2f", pr.guidance)) : std::string(), ", latents [",
        pr.latents.shape[0], ", ", pr.latents.shape[1], ", ", pr.latents.shape[2], "] on a ", pr.grid_rows,
        "x", pr.grid_cols, " grid) -> vae (linears only: its convolutions are not executed)"));
  }
  report_components(planned, j, log);
  {
    const auto [status, detail] = check_weights_read(planned);
    add_check("every tensor read", status, detail);
  }

  // --- Streamed against all-resident. ----------------------------------------------------------
  std::string resident_how;
  std::vector<std::vector<LayerDigest>> resident_digests, resident_units;
  std::vector<double> resident_ms;
  HostTensor resident_images;
  const std::vector<bool> compared = linears_only_mask(schedule, planned);
  {
    RunOptions r = run_opts;
    r.mode = Mode::AllResident;
    r.trace = false;
    try {
      const RunResult res = backend->run(checkpoint, schedule, r);
      resident_digests = res.digests;
      resident_units = res.unit_digests;
      resident_ms = res.step_ms;
      resident_images = res.pipeline.images;
      resident_how = "an all-resident run";
    } catch (const Error& e) {
      if (e.kind() != ErrorKind::InvalidInput) throw;
      log(str_cat("  all-resident run impossible (", e.what(), "); comparing each layer run alone instead"));
      resident_how = "each layer run alone from the mapped checkpoint (all-resident does not fit)";
      resident_digests.assign(1, std::vector<LayerDigest>(n_linears));
      for (size_t li = 0; li < n_linears; ++li) {
        const LinearTask& l = schedule.linears[li];
        const int dev = schedule.steps[l.step].device;
        resident_digests[0][li] = backend
                                      ->run_layer(schedule.bind_mapped(l, checkpoint), tokens,
                                                  linears_only_ld(schedule, l), options.seed, dev)
                                      .digest;
      }
    }
    size_t mismatches = 0;
    std::string first;
    const size_t n_cmp = std::min(resident_digests.size(), planned.digests.size());
    size_t n_outputs = 0;
    for (size_t s = 0; s < n_cmp; ++s)
      for (size_t li = 0; li < n_linears; ++li) {
        if (!compared[li]) continue;
        ++n_outputs;
        if (!(resident_digests[s][li] == planned.digests[s][li])) {
          if (!mismatches) first = str_cat(schedule.linears[li].module, " (step ", s, ")");
          ++mismatches;
          ++phase_of(phases, schedule.linears[li].component).mismatches;
        }
      }
    const size_t n_units = std::min(resident_units.size(), planned.unit_digests.size());
    for (size_t s = 0; s < n_units; ++s)
      for (size_t u = 0; u < planned.unit_names.size(); ++u) {
        ++n_outputs;
        if (!(resident_units[s][u] == planned.unit_digests[s][u])) {
          if (!mismatches) first = str_cat(planned.unit_names[u], " (step ", s, ")");
          ++mismatches;
          ++phase_of(phases, component_of_unit(planned.unit_names[u])).mismatches;
        }
      }
    // A pipeline's final latents: the last run step's, bit for bit.
    if (planned.pipeline.ran && !resident_images.bytes.empty()) {
      ++n_outputs;
      if (resident_images.bytes != planned.pipeline.images.bytes) {
        if (!mismatches) first = "the final latents";
        ++mismatches;
        ++phase_of(phases, "transformer").mismatches;
      }
    }
    const std::string phase_detail = per_phase(phases, [](const Phase& p) {
      return p.mismatches ? str_cat(p.mismatches, " differ") : std::string("identical");
    });
    add_check(
        "streamed == resident", mismatches ? CheckResult::Status::Fail : CheckResult::Status::Pass,
        mismatches
            ? str_cat(mismatches, " outputs differ from ", resident_how, ", first ", first, phase_detail)
            : str_cat(n_outputs, " outputs (linears, forward units: every op's output",
                      planned.pipeline.ran ? "; the final latents" : "", ") bitwise identical to ",
                      resident_how, n_streamed ? "" : " (nothing is streamed in this plan)", phase_detail));
  }

  // --- No quant state left behind: poison each host arena right after its (last) copy. -------------
  if (options.poison) {
    if (n_streamed == 0) {
      add_check("no state left behind", CheckResult::Status::Skip, "nothing is streamed");
    } else {
      std::vector<size_t> last_use(schedule.arenas.size(), SIZE_MAX);
      for (size_t si = 0; si < schedule.steps.size(); ++si)
        if (schedule.steps[si].streamed) last_use[schedule.steps[si].arena] = si;
      RunOptions r = run_opts;
      r.steps = 1;
      r.trace = false;
      size_t poisoned = 0;
      std::mt19937_64 rng(options.seed ^ 0xBADC0FFEEull);
      // A pinned (cpu) arena is copied again by a later pass (a pipeline's next denoising step):
      // poisoned after its last copy of the run step only.
      std::vector<uint32_t> copied(schedule.steps.size(), 0);
      r.after_copy = [&](size_t step, std::span<uint8_t> host) {
        const ExecStep& st = schedule.steps[step];
        ++copied[step];
        if (schedule.arenas[st.arena].placement == Placement::Cpu &&
            (last_use[st.arena] != step ||
             (step < planned.copies_per_step.size() && copied[step] < planned.copies_per_step[step])))
          return;
        for (size_t i = 0; i + 8 <= host.size(); i += 8) {
          const uint64_t v = rng();
          std::memcpy(host.data() + i, &v, 8);
        }
        ++poisoned;
      };
      const RunResult res = backend->run(checkpoint, schedule, r);
      size_t mismatches = 0;
      for (size_t li = 0; li < n_linears; ++li)
        mismatches += res.digests[0][li] == planned.digests[0][li] ? 0 : 1;
      for (size_t u = 0; u < planned.unit_names.size(); ++u)
        mismatches += res.unit_digests[0][u] == planned.unit_digests[0][u] ? 0 : 1;
      if (planned.pipeline.ran && res.pipeline.images.bytes != planned.pipeline.images.bytes) ++mismatches;
      add_check("no state left behind", mismatches ? CheckResult::Status::Fail : CheckResult::Status::Pass,
                mismatches
                    ? str_cat(mismatches, " outputs changed after host arenas were overwritten post-copy")
                    : str_cat(poisoned, " host arenas overwritten with random bytes right after their copy; ",
                              n_linears + planned.unit_names.size(), " outputs unchanged"));
    }
  }

  // --- Against the original weights. -------------------------------------------------------------
  json layers = json::array();
  if (!options.reference.empty()) {
    const Checkpoint ref = Checkpoint::open(options.reference);
    ThreadPool pool(options.threads);
    size_t fails = 0, direct_mismatch = 0, exact_mismatch = 0;
    std::map<std::string, std::pair<double, double>> worst;  // scheme -> (max rel error, max error/bound)
    std::string first_fail;
    for (size_t li = 0; li < n_linears; ++li) {
      const LinearTask& l = schedule.linears[li];
      const Component* rc = ref.find_component(l.component);
      const std::string ref_name = l.module + ".weight";
      const auto re = rc ? rc->find(ref_name) : std::nullopt;
      if (!re)
        fail(ErrorKind::InvalidInput, options.reference.string(), ": no tensor '",
             l.component.empty() ? ref_name : l.component + "/" + ref_name, "' to compare linear '", l.module,
             "' with");
      const TensorInfo& ri = rc->info(*re);
      if (ri.shape.size() != 2 || static_cast<uint64_t>(ri.shape[0]) != l.out() ||
          static_cast<uint64_t>(ri.shape[1]) != l.in())
        fail(ErrorKind::InvalidInput, options.reference.string(), ": tensor '", ref_name, "' has shape [",
             ri.shape.empty() ? 0 : ri.shape[0], ", ", ri.shape.size() > 1 ? ri.shape[1] : 0,
             "] but the linear is [", l.out(), ", ", l.in(), "]");
      DequantParams rp;
      rp.kind = plain_kind(ri.dtype);
      rp.rows = l.out();
      rp.cols = l.in();
      rp.weight = rc->data(*re).data();
      const int dev = schedule.steps[l.step].device;
      const uint64_t ldx = linears_only_ld(schedule, l);
      const DequantParams qp = schedule.bind_mapped(l, checkpoint);
      const LayerRun yq = backend->run_layer(qp, tokens, ldx, options.seed, dev);
      const LayerRun yr = backend->run_layer(rp, tokens, ldx, options.seed, dev);
      if (compared[li] && !(yq.digest == planned.digests[0][li])) ++direct_mismatch;
      std::vector<uint16_t> x(tokens * ldx);
      cpu::generate_activation(kmath::activation_stream(options.seed), tokens, ldx, 0, l.in(), x.data(),
                               pool);
      const std::vector<double> col_var = column_error_variance(qp, rp.kind, pool);
      const ErrorPrediction e =
          predict_and_measure(yq.y, yr.y, x, ldx, tokens, l.in(), col_var, l.params.kind);
      bool ok = e.within();
      const bool must_match = !l.quantized() && l.params.kind == rp.kind;
      if (must_match && yq.y != yr.y) {
        ok = false;
        ++exact_mismatch;
      }
      if (!ok) {
        if (!fails)
          first_fail = str_cat(l.component.empty() ? "" : l.component + "/", l.module, " (", l.scheme,
                               ": relative error ", fmt("%.3g", e.rel_error()), ", bound ",
                               fmt("%.3g", e.bound()), ")");
        ++fails;
      }
      auto& w = worst[l.scheme];
      w.first = std::max(w.first, e.rel_error());
      w.second = std::max(w.second, e.bound() > 0 ? e.rel_error() / e.bound() : 0.0);
      layers.push_back(
          {{"component", l.component},
           {"module", l.module},
           {"scheme", l.scheme},
           {"gpu", dev},
           {"streamed", schedule.steps[l.step].streamed},
           {"rel_error", e.rel_error()},
           {"predicted_rel_error", e.predicted_rel()},
           {"bound", e.bound()},
           {"within", ok},
           {"digest_matches_planned", compared[li] ? json(yq.digest == planned.digests[0][li]) : json()}});
    }
    std::string summary;
    for (const auto& [scheme, w] : worst)
      summary += str_cat(summary.empty() ? "" : "; ", scheme, " max rel error ", fmt("%.3g", w.first), " (",
                         fmt("%.2f", w.second), " of its bound)");
    add_check(
        "reference error", fails ? CheckResult::Status::Fail : CheckResult::Status::Pass,
        fails ? str_cat(fails, " of ", n_linears, " linears outside their bound",
                        exact_mismatch ? str_cat(" (", exact_mismatch, " unquantized ones not exact)") : "",
                        "; first ", first_fail)
              : str_cat(n_linears, " linears within their bound: ", summary));
    add_check("planned == direct", direct_mismatch ? CheckResult::Status::Fail : CheckResult::Status::Pass,
              direct_mismatch
                  ? str_cat(direct_mismatch, " planned outputs differ from the same layer run alone")
                  : str_cat("each layer run alone from the mapped checkpoint gives the planned run's output "
                            "bit for bit (linears-only components)"));
    add_reference_tensors_check(checkpoint, ref, j, add_check);
    // The reference forwards run on the CPU ops, which round where the frameworks round; the CUDA
    // ops sum GEMMs and attention in another order. So on a GPU the quantized model's forward (or
    // pipeline) runs once more on the CPU backend on the same inputs: the reference checks hold
    // that run to the original bit for bit, and the CUDA outputs must lie within a tolerance of it.
    RunResult on_cpu;
    const RunResult* forward_run = &planned;
    if (on_gpu) {
      RunOptions c = run_opts;
      c.steps = 1;
      c.trace = false;
      on_cpu = make_cpu_backend(options.threads)->run(checkpoint, schedule, c);
      add_cuda_forward_check(planned, on_cpu, j, add_check);
      forward_run = &on_cpu;
    }
    check_forward_references(checkpoint, ref, *forward_run, schedule, options.seed, pool, j, add_check);
    if (forward_run->pipeline.ran) {
      const ForwardReference r = compare_pipeline_with_reference(checkpoint, ref, *forward_run, schedule,
                                                                 tokens, options.seed, pool);
      j["pipeline_reference"] = r.to_json();
      add_check(
          "reference latents", r.within() ? CheckResult::Status::Pass : CheckResult::Status::Fail,
          str_cat(
              "the final latents after ", planned.pipeline.denoise_steps,
              " steps against the original pipeline's from the same ids and latents: relative error ",
              fmt("%.3g", r.rel_error),
              r.exact ? " (no quantized linear: must be 0)"
                      : str_cat(", bound ", fmt("%.3g", r.bound), " (", kForwardBoundFactor, " x simulated ",
                                fmt("%.3g", r.simulated_rel_error), " + ", kForwardBoundFloor, "); ",
                                r.substituted ? "equal bit for bit to" : "DIFFERENT from",
                                " the original pipeline with its quantized linears dequantized"),
              r.nonfinite ? str_cat(", ", r.nonfinite, " non-finite") : "", r.within() ? "" : " OUTSIDE"));
    }
  }
  j["layers"] = std::move(layers);

  // --- Peak memory per GPU. --------------------------------------------------------------------------
  json memory = json::array();
  {
    size_t over = 0;
    std::string detail;
    for (const DeviceMemory& m : planned.memory) {
      const planner::DevicePlan* dp = plan.find_device(planner::Location::on_gpu(m.device));
      json mj = {{"gpu", m.device},
                 {"allocated_bytes", m.allocated_bytes},
                 {"measured_peak_bytes", m.measured_peak_bytes},
                 {"baseline_bytes", m.baseline_bytes},
                 {"pinned_host_bytes", m.pinned_host_bytes},
                 {"how", m.how}};
      json items = json::array();
      uint64_t modelled = 0;  // plan items the CPU backend has no counterpart for
      std::string item_over;
      for (const MemoryItem& it : m.items) {
        const uint64_t planned_bytes = dp ? planned_item_bytes(*dp, it.kind) : 0;
        items.push_back(
            {{"name", memory_kind_name(it.kind)}, {"allocated", it.bytes}, {"planned", planned_bytes}});
        // The forwards' activations are a model of the plan's own: each must hold on its own.
        if (dp && it.kind == MemoryKind::ForwardActivations && it.bytes > planned_bytes)
          item_over = str_cat(", forward activations ", format_size(it.bytes), " over the plan's ",
                              format_size(planned_bytes), " OVER");
      }
      if (dp)
        for (const planner::ReserveItem& ri : dp->reserve)
          if (ri.name == "cuda_context" || ri.name == "cublas_workspace") modelled += ri.bytes;
      mj["items"] = std::move(items);
      if (!dp) {
        detail += str_cat(detail.empty() ? "" : "; ", "gpu ", m.device, ": not in the plan");
        ++over;
      } else {
        const uint64_t measured = on_gpu ? m.measured_peak_bytes : m.measured_peak_bytes + modelled;
        mj["predicted_peak_bytes"] = dp->predicted_peak;
        mj["compared_bytes"] = measured;
        const bool ok = measured <= dp->predicted_peak && item_over.empty();
        if (!ok) ++over;
        detail += str_cat(
            detail.empty() ? "" : "; ", "gpu ", m.device, " ", format_size(measured),
            on_gpu ? " measured" : " (buffers, the ops' activation peak, the plan's context and workspace)",
            " vs ", format_size(dp->predicted_peak), " predicted",
            measured <= dp->predicted_peak ? "" : " OVER", item_over);
      }
      memory.push_back(std::move(mj));
    }
    std::string phase_peaks;
    if (phases.size() > 1)
      for (const ComponentRun& c : planned.components)
        if (c.forward)
          phase_peaks += str_cat(phase_peaks.empty() ? "; forward activations per phase: " : ", ",
                                 c.component, " ", format_size(c.activation_peak_bytes));
    detail += phase_peaks;
    if (!plan_tokens)
      add_check("peak memory", CheckResult::Status::Skip,
                str_cat("the plan was made for ", plan.settings.tokens, " tokens, this run used ", tokens,
                        ": ", detail));
    else
      add_check("peak memory", over ? CheckResult::Status::Fail : CheckResult::Status::Pass, detail);
  }
  j["memory"] = std::move(memory);

  // --- Per phase, what the checks found. --------------------------------------------------------------
  {
    json pj = json::array();
    for (const Phase& p : phases) {
      const ComponentRun* c = nullptr;
      for (const ComponentRun& r : planned.components)
        if (r.component == p.component) c = &r;
      json one = {{"component", p.component},
                  {"ran", c && c->forward ? "forward" : "linears only"},
                  {"passes", c ? c->passes : 0},
                  {"outputs_checked", p.outputs},
                  {"nonfinite", p.nonfinite},
                  {"streamed_vs_resident_mismatches", p.mismatches},
                  {"unread_tensors", c ? c->unread_tensors.size() : 0},
                  {"activation_peak_bytes", c ? c->activation_peak_bytes : 0}};
      if (j.contains("forward_reference"))
        for (const json& fr : j["forward_reference"])
          if (fr["component"] == p.component) one["reference"] = fr;
      pj.push_back(std::move(one));
    }
    j["phases"] = std::move(pj);
  }

  // --- Step time. -----------------------------------------------------------------------------------
  // On a GPU, timed in runs of their own without digests: a step then does only a model's work.
  std::vector<double> planned_ms = planned.step_ms;
  if (on_gpu) {
    RunOptions t = run_opts;
    t.digests = false;
    t.trace = false;
    planned_ms = backend->run(checkpoint, schedule, t).step_ms;
    if (!resident_ms.empty()) {
      t.mode = Mode::AllResident;
      resident_ms = backend->run(checkpoint, schedule, t).step_ms;
    }
  }
  {
    std::vector<double> ms = planned_ms;
    if (ms.size() >= 2) ms.erase(ms.begin());  // the first step warms caches and loads kernels
    const double measured = median(ms);
    const double predicted = plan.predicted_step_s * 1000.0;
    const double ratio = predicted > 0 ? measured / predicted : 0.0;
    std::vector<double> rms = resident_ms;
    if (rms.size() >= 2) rms.erase(rms.begin());
    const double resident_median = median(rms);
    const double gbps =
        measured > 0 ? static_cast<double>(planned.h2d_bytes_per_step) / (measured * 1e6) : 0.0;
    j["timing"] = {{"step_ms", planned_ms},
                   {"timed_without_digests", on_gpu},
                   {"median_step_ms", measured},
                   {"predicted_step_ms", predicted},
                   {"ratio", ratio},
                   {"all_resident_step_ms", resident_ms},
                   {"all_resident_median_ms", resident_median},
                   {"h2d_bytes_per_step", planned.h2d_bytes_per_step},
                   {"peer_bytes_per_step", planned.peer_bytes_per_step},
                   {"effective_h2d_gbps", gbps}};
    std::string detail = str_cat(fmt("%.3f", measured), " ms measured (median), ", fmt("%.3f", predicted),
                                 " ms predicted, ratio ", fmt("%.2f", ratio));
    if (resident_median > 0) detail += str_cat("; all-resident ", fmt("%.3f", resident_median), " ms");
    if (planned.h2d_bytes_per_step)
      detail += str_cat("; ", format_size(planned.h2d_bytes_per_step), " streamed per step (",
                        fmt("%.1f", gbps), " GB/s)");
    if (planned.pipeline.ran)
      detail += str_cat("; a run step is the whole pipeline (the encoders once, the transformer ",
                        planned.pipeline.denoise_steps,
                        " times), the plan's prediction one pass of each component");
    if (!on_gpu) {
      add_check("step time", CheckResult::Status::Info, detail + " (CPU backend: the plan predicts a GPU)");
    } else if (!plan_tokens) {
      add_check("step time", CheckResult::Status::Skip,
                detail + str_cat(" (the plan was made for ", plan.settings.tokens, " tokens)"));
    } else if (options.time_tolerance) {
      const bool ok = std::fabs(ratio - 1.0) <= *options.time_tolerance;
      add_check("step time", ok ? CheckResult::Status::Pass : CheckResult::Status::Fail,
                detail + str_cat(" (tolerance ", fmt("%.0f", *options.time_tolerance * 100), "%)"));
    } else {
      add_check("step time", CheckResult::Status::Info, detail);
    }
  }

  // --- Trace. ----------------------------------------------------------------------------------------
  if (!options.trace.empty()) {
    write_json_file(options.trace, trace_to_json(planned.trace));
    const uint32_t last = options.steps - 1;
    const PrefetchStats ps = prefetch_stats(planned.trace, last);
    const double hidden = copy_compute_overlap(planned.trace, last);
    j["trace"] = {{"file", options.trace.string()},
                  {"events", planned.trace.size()},
                  {"step", last},
                  {"copy_hidden_fraction", hidden},
                  {"prefetch_pairs", ps.pairs},
                  {"prefetch_overlapping", ps.overlapping}};
    log(str_cat("  trace: ", planned.trace.size(), " events to ", options.trace.string(), "; step ", last,
                ": ", ps.overlapping, " of ", ps.pairs,
                " copies of group k+1 overlap the compute of group k, ", fmt("%.0f", 100 * hidden),
                "% of copy time hidden behind compute"));
  }

  json checks = json::array();
  for (const CheckResult& c : report.checks)
    checks.push_back({{"name", c.name}, {"status", check_status_name(c.status)}, {"detail", c.detail}});
  j["checks"] = std::move(checks);
  j["passed"] = report.passed();
  j["notes"] = planned.notes;
  if (!options.outputs.empty()) {
    write_outputs(options.outputs, checkpoint, planned, options.inputs.empty());
    j["outputs"] = options.outputs.string();
    log(str_cat("  outputs: ", options.outputs.string(),
                options.inputs.empty() ? " (with the inputs drawn from the seed, to replay the run)" : ""));
  }
  if (!options.report.empty()) write_json_file(options.report, j);
  return report;
}

}  // namespace qtool::runner
