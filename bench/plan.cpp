// bench_plan: time to plan (planner::make_plan) the full-scale FLUX.1-dev-like pipeline (11.9B
// transformer, T5-XXL, CLIP-L, VAE: described in memory with the synthetic preset's real names and
// shapes, in bf16 and with the flux-nf4 mapping's exact quantized tensors) and a synthetic model of
// 100,000 tensors, for budgets where everything fits and where most of it is streamed, on one and
// two GPUs. Prints the median of several runs (this thread's CPU time, and wall time) against the
// limits (50 ms, 500 ms) as a ratio.
//   bench_plan [--repeat N] [--case SUBSTRING]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <string>
#include <vector>

#include "qtool/formats/error.hpp"
#include "qtool/formats/synth.hpp"
#include "qtool/libquant/config.hpp"
#include "qtool/libquant/quant.hpp"
#include "qtool/planner/planner.hpp"

using namespace qtool;
using namespace qtool::planner;

namespace {

PipelineInput flux(bool nf4) {
  const SynthModel m = make_synth_model({"flux", 1.0, DType::BF16, {}});
  quant::SchemeOptions q4;
  q4.scheme = quant::Scheme::Nf4;
  quant::SchemeOptions q8;
  q8.scheme = quant::Scheme::Int8;
  PipelineInput in;
  in.path = "flux (scale 1, in memory)";
  in.model_index = m.model_index;
  for (const SynthComponent& c : m.components) {
    if (c.tensors.empty()) continue;
    ComponentInput ci;
    ci.name = c.name;
    if (const auto* cfg = c.config()) ci.config = *cfg;
    const quant::SchemeOptions* opt = !nf4                         ? nullptr
                                      : c.name == "transformer"    ? &q4
                                      : c.name == "text_encoder_2" ? &q8
                                                                   : nullptr;
    for (const SynthTensor& t : c.tensors) {
      const TensorDecl& d = t.decl;
      std::string module = d.name.size() > 7 ? d.name.substr(0, d.name.size() - 7) : d.name;
      bool quantize = opt && !quant::linear_exclusion(d.name, d.dtype, d.shape);
      for (const char* p : {"x_embedder", "context_embedder", "norm_out.linear"}) {
        quantize = quantize && !quant::pattern_matches(p, module);
      }
      if (!quantize) {
        ci.tensors.push_back({d.name, d.nbytes(), d.dtype, d.shape, -1, false});
        continue;
      }
      for (const TensorDecl& qd : quant::quantized_decls(module, d.dtype, d.shape, *opt)) {
        ci.tensors.push_back({qd.name, qd.nbytes(), qd.dtype, qd.shape, -1, false});
      }
      ci.quantized.push_back({module, d.shape[0], d.shape[1], std::string(quant::scheme_name(opt->scheme))});
    }
    in.components.push_back(std::move(ci));
  }
  return in;
}

// 1,000 blocks of 25 linears (weight + bias) and 50 norms, plus embeddings: 100,002 tensors.
PipelineInput many_tensors() {
  ComponentInput c;
  auto add = [&](std::string name, std::vector<int64_t> shape) {
    uint64_t n = 2;
    for (int64_t d : shape) n *= static_cast<uint64_t>(d);
    c.tensors.push_back({std::move(name), n, DType::BF16, std::move(shape), -1, false});
  };
  add("embed.weight", {32000, 512});
  add("head.weight", {32000, 512});
  for (int b = 0; b < 1000; ++b) {
    for (int l = 0; l < 25; ++l) {
      const std::string p = "blocks." + std::to_string(b) + ".lin" + std::to_string(l);
      add(p + ".weight", {512, 512});
      add(p + ".bias", {512});
    }
    for (int n = 0; n < 50; ++n)
      add("blocks." + std::to_string(b) + ".norm" + std::to_string(n) + ".weight", {512});
  }
  PipelineInput in;
  in.path = "100k tensors (in memory)";
  in.components.push_back(std::move(c));
  return in;
}

struct Case {
  std::string name;
  const PipelineInput* input;
  std::string budget;
  Strategy strategy;
  double limit_ms;
};

}  // namespace

int main(int argc, char** argv) {
  int repeat = 7;
  std::string only;
  for (int i = 1; i + 1 < argc; ++i) {
    if (std::strcmp(argv[i], "--repeat") == 0) repeat = std::max(1, std::atoi(argv[i + 1]));
    if (std::strcmp(argv[i], "--case") == 0) only = argv[i + 1];
  }
  TemplateLibrary lib;
  if (auto dir = find_data_subdir("models")) lib.load_dir(*dir);
  const PipelineInput flux_bf16 = flux(false);
  const PipelineInput flux_nf4 = flux(true);
  const PipelineInput many = many_tensors();
  size_t n_flux = 0, n_many = many.components[0].tensors.size();
  for (const auto& c : flux_bf16.components) n_flux += c.tensors.size();
  std::printf("flux: %zu tensors (bf16), 100k model: %zu tensors\n", n_flux, n_many);
  const std::vector<Case> cases = {
      {"flux bf16, 0=80GiB (fits)", &flux_bf16, "0=80GiB,cpu=128GiB", Strategy::Auto, 50},
      {"flux bf16, 0=24GiB (streams)", &flux_bf16, "0=24GiB,cpu=128GiB", Strategy::Auto, 50},
      {"flux bf16, 0=20GiB,1=20GiB balanced", &flux_bf16, "0=20GiB,1=20GiB,cpu=128GiB", Strategy::Balanced,
       50},
      {"flux nf4, 0=8GiB (streams)", &flux_nf4, "0=8GiB,cpu=128GiB", Strategy::Auto, 50},
      {"100k tensors, 0=80GiB (fits)", &many, "0=80GiB,cpu=128GiB", Strategy::Auto, 500},
      {"100k tensors, 0=4GiB (streams)", &many, "0=4GiB,cpu=128GiB", Strategy::Auto, 500},
      {"100k tensors, 0=3GiB,1=3GiB balanced", &many, "0=3GiB,1=3GiB,cpu=128GiB", Strategy::Balanced, 500},
  };
  int over = 0;
  std::printf(
      "| case | CPU ms (median) | wall ms (median) | limit ms | CPU / limit | offloaded | groups | predicted "
      "step ms |\n"
      "|---|---|---|---|---|---|---|---|\n");
  for (const Case& c : cases) {
    if (!only.empty() && c.name.find(only) == std::string::npos) continue;
    PlanOptions o;
    o.strategy = c.strategy;
    o.budget = parse_max_memory(c.budget);
    o.templates = &lib;
    // Wall time and this thread's CPU time (the machine may be shared: CPU time is what planning
    // costs on an idle core); the limit applies to the CPU time.
    std::vector<double> ms, cpu_ms;
    std::vector<Plan> plans(static_cast<size_t>(repeat));  // destroyed outside the timed region
    for (int r = 0; r < repeat; ++r) {
      timespec c0{}, c1{};
      clock_gettime(CLOCK_THREAD_CPUTIME_ID, &c0);
      const auto t0 = std::chrono::steady_clock::now();
      plans[static_cast<size_t>(r)] = make_plan(*c.input, o);
      ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
      clock_gettime(CLOCK_THREAD_CPUTIME_ID, &c1);
      cpu_ms.push_back((c1.tv_sec - c0.tv_sec) * 1e3 + (c1.tv_nsec - c0.tv_nsec) * 1e-6);
    }
    std::sort(ms.begin(), ms.end());
    std::sort(cpu_ms.begin(), cpu_ms.end());
    const double med = ms[ms.size() / 2];
    const double cpu = cpu_ms[cpu_ms.size() / 2];
    const Plan& p = plans.back();
    if (cpu > c.limit_ms) ++over;
    std::printf("| %s | %.1f | %.1f | %.0f | %.2f | %.2f GiB | %zu | %.1f |\n", c.name.c_str(), cpu, med,
                c.limit_ms, cpu / c.limit_ms, static_cast<double>(p.offloaded_bytes()) / (1ull << 30),
                p.groups.size(), p.predicted_step_s * 1e3);
    if (!check_plan(p, *c.input).empty()) {
      std::printf("plan failed its check\n");
      return 1;
    }
  }
  return over ? 1 : 0;
}
