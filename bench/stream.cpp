// bench_stream: the runner's streaming on one GPU, each result a ratio measured in this run.
//
//   1. streamed bf16 groups: effective host-to-device bandwidth (bytes of the streamed groups of a
//      step, linears only at --stream-tokens, over the step's time) against one plain pinned
//      cudaMemcpyAsync of the same bytes (target >= 0.9);
//   2. a streamed nf4 step and a streamed int8 step against max(transfer time of their quantized
//      bytes at the plain pinned rate, the all-resident step) (target <= 1.15);
//   3. each dequant kernel's bandwidth (bytes read + bytes written) against a device-to-device
//      copy's (target >= 0.6);
//   4. each measured step time against the plan's prediction made with the profile measured at
//      the start of this run (target within +-20%).
//
// Data: the flux transformer synthesized at --scale (bf16), quantized to nf4 and int8 in a work
// folder that is removed afterwards. Plans stream most blocks: GPU budget = the smallest budget
// any plan fits in + --resident-fraction of the weights.
//
//   bench_stream [--scale 0.5] [--tokens 4096] [--stream-tokens 256] [--work DIR] [--json FILE]
//                [--data DIR]   (DIR/bf16, DIR/nf4, DIR/int8 already made: no synthesis)
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "bench_util.hpp"
#include "qtool/formats/checkpoint.hpp"
#include "qtool/formats/error.hpp"
#include "qtool/formats/size.hpp"
#include "qtool/formats/synth.hpp"
#include "qtool/libquant/config.hpp"
#include "qtool/libquant/convert.hpp"
#include "qtool/planner/planner.hpp"
#include "qtool/planner/templates.hpp"
#include "qtool/runner/cuda_ops.hpp"
#include "qtool/runner/cuda_resources.hpp"
#include "qtool/runner/executor.hpp"
#include "qtool/runner/profile.hpp"
#include "qtool/runner/schedule.hpp"

using namespace qtool;
using namespace qtool::runner;
using nlohmann::json;
namespace rc = qtool::runner::cuda;
using bench::median;
using bench::plan_streaming;
using bench::ratio_line;
using bench::tail;

namespace {

struct Args {
  double scale = 0.5;
  uint64_t tokens = 4096;        // quantized steps: compute comparable with transfer
  uint64_t stream_tokens = 256;  // bf16 streaming: copy-bound
  double resident_fraction = 0.1;
  uint32_t steps = 6;
  std::filesystem::path work;
  std::filesystem::path json_out;
  std::filesystem::path models_dir = "sample_configs/models";
  std::filesystem::path data;  // reuse DIR/bf16, DIR/nf4, DIR/int8 instead of synthesizing
};

template <typename Fn>
double median_ms(const rc::Stream& s, int repeats, Fn&& fn) {
  rc::Event a(s.device(), rc::Event::Timing::On), b(s.device(), rc::Event::Timing::On);
  fn();
  s.synchronize();
  std::vector<double> t;
  for (int i = 0; i < repeats; ++i) {
    a.record(s.get());
    fn();
    b.record(s.get());
    b.synchronize();
    t.push_back(b.elapsed_ms_since(a));
  }
  return median(t);
}

}  // namespace

int main(int argc, char** argv) {
  Args a;
  for (bench::ArgCursor args(argc, argv); args.next();) {
    const std::string& k = args.flag();
    if (k == "--scale")
      a.scale = std::stod(args.value());
    else if (k == "--tokens")
      a.tokens = std::stoull(args.value());
    else if (k == "--stream-tokens")
      a.stream_tokens = std::stoull(args.value());
    else if (k == "--resident-fraction")
      a.resident_fraction = std::stod(args.value());
    else if (k == "--steps")
      a.steps = static_cast<uint32_t>(std::stoul(args.value()));
    else if (k == "--work")
      a.work = args.value();
    else if (k == "--json")
      a.json_out = args.value();
    else if (k == "--models-dir")
      a.models_dir = args.value();
    else if (k == "--data")
      a.data = args.value();
    else {
      std::fprintf(stderr,
                   "usage: bench_stream [--scale S] [--tokens N] [--stream-tokens N] [--resident-fraction F] "
                   "[--steps K] [--work DIR] [--json FILE] [--models-dir DIR] [--data DIR]\n");
      return 2;
    }
  }
  if (rc::device_count() == 0) {
    std::fprintf(stderr, "bench_stream: no CUDA device\n");
    return 77;
  }
  try {
    json out;
    std::vector<std::string> table;
    const bench::BenchSetup setup("bench_stream", a.work, a.models_dir, out);
    const planner::DeviceProfile& profile = setup.profile;
    const planner::TemplateLibrary* tl = setup.templates;

    // Data.
    const std::filesystem::path data = a.data.empty() ? a.work : a.data;
    if (a.data.empty()) bench::write_bench_data(a.work, "flux", a.scale, {"transformer"}, {"nf4", "int8"});

    rc::Stream stream(0);
    // Peers: a device-to-device copy and dequant kernels on an 8192 x 8192 weight.
    {
      const uint64_t n = 1ull << 30;
      rc::DeviceBuffer x(0, n), y(0, n);
      QTOOL_CUDA_CHECK(cudaMemset(x.data(), 1, n));
      const double ms = median_ms(stream, 10, [&] {
        QTOOL_CUDA_CHECK(cudaMemcpyAsync(y.data(), x.data(), n, cudaMemcpyDeviceToDevice, stream.get()));
      });
      const double d2d = 2.0 * static_cast<double>(n) / (ms * 1e6);
      out["d2d_gbps"] = d2d;
      const uint64_t rows = 8192, cols = 8192, numel = rows * cols;
      rc::DeviceBuffer q(0, numel * 4), scales(0, (numel / 64 + rows) * 4), o(0, numel * 2),
          tables_mem(0, rc::kDeviceTablesBytes);
      const rc::DeviceTables tables = rc::upload_tables(tables_mem.data(), stream.get());
      {
        const std::vector<uint8_t> host = runner::random_finite_codes(numel * 4, 3);
        std::mt19937_64 rng(3);
        QTOOL_CUDA_CHECK(cudaMemcpy(q.data(), host.data(), host.size(), cudaMemcpyHostToDevice));
        std::vector<float> s(numel / 64 + rows);
        for (auto& v : s) v = 0.001f + static_cast<float>(rng() % 1000) * 1e-5f;
        QTOOL_CUDA_CHECK(cudaMemcpy(scales.data(), s.data(), s.size() * 4, cudaMemcpyHostToDevice));
      }
      json dq = json::object();
      struct K {
        const char* name;
        WeightKind kind;
        bool dq;
        double in_bytes_per_elem;
      };
      for (const K& k :
           {K{"int8", WeightKind::Int8, false, 1.0}, K{"fp8_e4m3", WeightKind::Fp8E4M3, false, 1.0},
            K{"fp8_e5m2", WeightKind::Fp8E5M2, false, 1.0}, K{"nf4", WeightKind::Nf4, false, 0.5},
            K{"nf4 double quant", WeightKind::Nf4, true, 0.5}, K{"fp4", WeightKind::Fp4, false, 0.5}}) {
        DequantParams p;
        p.kind = k.kind;
        p.rows = rows;
        p.cols = cols;
        p.weight = q.as<uint8_t>();
        p.scale = scales.as<uint8_t>();
        p.double_quant = k.dq;
        if (k.dq) {
          p.nested_absmax = scales.as<uint8_t>();
          p.nested_offset = 0.01f;
        }
        const double kms =
            median_ms(stream, 20, [&] { rc::dequantize_to_bf16(p, tables, o.as<uint16_t>(), stream.get()); });
        const double bytes = static_cast<double>(numel) * (k.in_bytes_per_elem + 2.0);
        const double gbps = bytes / (kms * 1e6);
        dq[k.name] = {{"ms", kms}, {"gbps", gbps}, {"ratio_to_d2d", gbps / d2d}};
        table.push_back(ratio_line((std::string("dequant ") + k.name + " bandwidth / d2d copy").c_str(),
                                   gbps / d2d, ">=", 0.6));
      }
      out["dequant"] = dq;
      std::fprintf(stderr, "d2d %.0f GB/s (read + write)\n", d2d);
    }

    auto backend = make_cuda_backend();
    // Plain pinned copy of `bytes` (the peer of every streamed run).
    const auto plain_pinned_gbps = [&](uint64_t bytes) {
      rc::PinnedBuffer h(bytes);
      std::memset(h.data(), 3, bytes);
      rc::DeviceBuffer d(0, bytes);
      const double ms = median_ms(stream, 5, [&] {
        QTOOL_CUDA_CHECK(cudaMemcpyAsync(d.data(), h.data(), bytes, cudaMemcpyHostToDevice, stream.get()));
      });
      return static_cast<double>(bytes) / (ms * 1e6);
    };

    // 1. bf16 streaming bandwidth.
    {
      const Checkpoint ckpt = Checkpoint::open(data / "bf16");
      // Stream everything it can, a block per group (what a user streaming a bf16 model runs).
      const planner::Plan plan =
          plan_streaming(ckpt, profile, a.stream_tokens, 0.0, tl, planner::OffloadMode::Block);
      const Schedule s = build_schedule(ckpt, plan);
      RunOptions o;
      o.forwards = false;  // the linears alone: a copy-bound step (bench_forward runs the real forward)
      o.tokens = a.stream_tokens;
      o.steps = a.steps;
      o.digests = false;
      o.sizing.alloc_granularity_bytes = profile.alloc_granularity_bytes;
      o.sizing.cublas_workspace_bytes = profile.cublas_workspace_bytes;
      o.sizing.staging_buffers = s.n_slots;
      const RunResult r = backend->run(ckpt, s, o);
      // Steady state: the streamed bytes of a step over the step's time (a step cannot end before
      // its last copy; the trace's host-clock intervals would add the host's waits).
      const double step_ms = median(tail(r.step_ms));
      const double eff = static_cast<double>(r.h2d_bytes_per_step) / (step_ms * 1e6);
      const double plain = plain_pinned_gbps(r.h2d_bytes_per_step);
      out["bf16_stream"] = {{"streamed_bytes_per_step", r.h2d_bytes_per_step},
                            {"groups_per_step", plan.groups.size()},
                            {"slots", s.n_slots},
                            {"effective_gbps", eff},
                            {"plain_pinned_gbps", plain},
                            {"ratio", eff / plain},
                            {"step_ms", step_ms},
                            {"predicted_step_ms", plan.predicted_step_s * 1e3}};
      table.push_back(ratio_line("streamed bf16 groups bandwidth / plain pinned cudaMemcpyAsync", eff / plain,
                                 ">=", 0.9));
      table.push_back(ratio_line("bf16 streamed step: measured / predicted",
                                 step_ms / (plan.predicted_step_s * 1e3), "+-", 0.2));
      std::fprintf(stderr,
                   "bf16: %s streamed per step in %zu groups, %.1f GB/s effective vs %.1f GB/s plain\n",
                   format_size(r.h2d_bytes_per_step).c_str(), plan.groups.size(), eff, plain);
    }

    // 2. nf4 and int8 steps against transfer and all-resident.
    for (const char* scheme : {"nf4", "int8"}) {
      const Checkpoint ckpt = Checkpoint::open(data / scheme);
      const planner::Plan plan = plan_streaming(ckpt, profile, a.tokens, a.resident_fraction, tl);
      const Schedule s = build_schedule(ckpt, plan);
      RunOptions o;
      o.forwards = false;
      o.tokens = a.tokens;
      o.steps = 2;
      o.sizing.cublas_workspace_bytes = profile.cublas_workspace_bytes;
      o.sizing.alloc_granularity_bytes = profile.alloc_granularity_bytes;
      o.sizing.staging_buffers = s.n_slots;
      // Outputs first (digests on), then the timed runs (digests off: only the model's work).
      const RunResult checked = backend->run(ckpt, s, o);
      o.mode = Mode::AllResident;
      const bool same = checked.digests == backend->run(ckpt, s, o).digests;
      o.digests = false;
      o.steps = a.steps;
      const RunResult resident = backend->run(ckpt, s, o);
      o.mode = Mode::Planned;
      const RunResult streamed = backend->run(ckpt, s, o);
      const double plain = plain_pinned_gbps(streamed.h2d_bytes_per_step);
      const double transfer_ms = static_cast<double>(streamed.h2d_bytes_per_step) / (plain * 1e6);
      const double st_ms = median(tail(streamed.step_ms));
      const double res_ms = median(tail(resident.step_ms));
      const double ratio = st_ms / std::max(transfer_ms, res_ms);
      const double pred_ms = plan.predicted_step_s * 1e3;
      out[scheme] = {{"streamed_bytes_per_step", streamed.h2d_bytes_per_step},
                     {"slots", s.n_slots},
                     {"groups", plan.groups.size()},
                     {"streamed_step_ms", st_ms},
                     {"resident_step_ms", res_ms},
                     {"transfer_ms", transfer_ms},
                     {"ratio", ratio},
                     {"predicted_step_ms", pred_ms},
                     {"measured_over_predicted", st_ms / pred_ms},
                     {"bitwise_equal", same},
                     {"peak_bytes", streamed.memory.at(0).measured_peak_bytes},
                     {"predicted_peak_bytes", plan.devices.at(0).predicted_peak}};
      table.push_back(
          ratio_line((std::string("streamed ") + scheme + " step / max(transfer, all-resident)").c_str(),
                     ratio, "<=", 1.15));
      table.push_back(ratio_line((std::string(scheme) + " streamed step: measured / predicted").c_str(),
                                 st_ms / pred_ms, "+-", 0.2));
      std::fprintf(stderr,
                   "%s: streamed %.2f ms, resident %.2f ms, transfer %.2f ms, predicted %.2f ms, %s\n",
                   scheme, st_ms, res_ms, transfer_ms, pred_ms, same ? "bitwise equal" : "OUTPUTS DIFFER");
    }

    bench::print_results(table, out, a.json_out);
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_stream: %s\n", e.what());
    return 1;
  }
}
