// Micro benchmark of the quant kernels: input GB/s per scheme on one weight (default 4096 x 4096
// bf16) with N threads, the fast path against the scalar reference, and against reading the same
// bytes (a memory-bandwidth floor for "cat" of a cached file).
//
//   quant_kernels [--rows R] [--cols C] [--dtype bf16|f16|f32] [--threads N] [--reps K]
//                 [--clock wall|cpu] [--ref 0|1]
//
// --clock cpu divides by the CPU time of the whole process (all threads) instead of the wall
// time: GB per CPU-second, a per-core rate that stays comparable on a machine shared with other
// work (where wall-clock rates mostly measure the load). --ref 0 skips the slow scalar references.
//
// With --checkpoint, the in-memory rate on the weights of a real checkpoint instead, for comparing
// with a reference quantizer on the same tensors (bench/quantize.py): the weights a `qtool
// quantize --report` run quantized, in the report's order, up to --max-bytes, read into memory
// first; one JSON line {"bytes": B, "seconds": S, "gbps": G} (best of --reps).
//
//   quant_kernels --checkpoint DIR --report REPORT.json --scheme S [--double-quant] [--max-bytes N]
//                 [--threads N] [--reps K]
#include <time.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "qtool/formats/checkpoint.hpp"
#include "qtool/formats/dtype.hpp"
#include "qtool/formats/error.hpp"
#include "qtool/formats/thread_pool.hpp"
#include "qtool/libquant/quant.hpp"
#include "scheme.hpp"

using namespace qtool;
using namespace qtool::quant;

namespace {

bool g_cpu_clock = false;  // --clock cpu

// Seconds on the chosen clock: wall time, or the CPU time of every thread of the process.
double clock_now() {
  if (g_cpu_clock) {
    timespec ts{};
    ::clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Best of `reps` runs of fn, in seconds.
template <typename F>
double best_of(int reps, F fn) {
  double best = 1e30;
  for (int i = 0; i < reps; ++i) {
    const double t0 = clock_now();
    fn();
    best = std::min(best, clock_now() - t0);
  }
  return best;
}

struct Weight {
  DType dtype;
  std::vector<int64_t> shape;
  std::vector<uint8_t> data;
  std::vector<std::vector<uint8_t>> outs;
};

int same_tensors(const std::string& dir, const std::string& report_path, const SchemeOptions& options,
                 uint64_t max_bytes, size_t threads, int reps) {
  const Checkpoint checkpoint = Checkpoint::open(dir);
  std::ifstream in(report_path);
  if (!in) fail(ErrorKind::Io, report_path, ": cannot open");
  const nlohmann::json report = nlohmann::json::parse(in);
  std::vector<Weight> weights;
  uint64_t total = 0;
  for (const auto& t : report.at("tensors")) {
    if (total >= max_bytes) break;
    if (t.at("scheme").is_null()) continue;
    const std::string comp = t.at("component"), name = t.at("name");
    for (const Component& c : checkpoint.components()) {
      if (c.name() != comp) continue;
      const auto e = c.find(name);
      if (!e) fail(ErrorKind::InvalidInput, dir, ": no tensor '", name, "' in component '", comp, "'");
      const TensorInfo& info = c.info(*e);
      const auto bytes = c.data(*e);
      Weight w{info.dtype, info.shape, std::vector<uint8_t>(bytes.begin(), bytes.end()), {}};
      for (const auto& d : quantized_decls("m", w.dtype, w.shape, options)) w.outs.emplace_back(d.nbytes());
      total += w.data.size();
      weights.push_back(std::move(w));
    }
  }
  ThreadPool pool(threads);
  const double t = best_of(reps, [&] {
    for (Weight& w : weights) {
      std::vector<std::span<uint8_t>> spans(w.outs.begin(), w.outs.end());
      quantize_weight_into("bench", w.dtype, w.shape, w.data, options, spans, pool);
    }
  });
  std::printf("{\"bytes\": %llu, \"seconds\": %.6f, \"gbps\": %.4f, \"tensors\": %zu}\n",
              static_cast<unsigned long long>(total), t, static_cast<double>(total) / t / 1e9,
              weights.size());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::string checkpoint, report;
  SchemeOptions file_options{Scheme::Int8};
  uint64_t max_bytes = 256ull << 20;
  int64_t rows = 4096, cols = 4096;
  DType dtype = DType::BF16;
  size_t threads = 2;
  int reps = 5;
  bool with_ref = true;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i], v = argv[i + 1];
    if (a == "--rows")
      rows = std::stoll(v);
    else if (a == "--cols")
      cols = std::stoll(v);
    else if (a == "--threads")
      threads = std::stoul(v);
    else if (a == "--reps")
      reps = std::stoi(v);
    else if (a == "--dtype")
      dtype = *parse_dtype_cli(v);
    else if (a == "--clock" && (v == "cpu" || v == "wall"))
      g_cpu_clock = v == "cpu";
    else if (a == "--ref")
      with_ref = v != "0";
    else if (a == "--checkpoint")
      checkpoint = v;
    else if (a == "--report")
      report = v;
    else if (a == "--max-bytes")
      max_bytes = std::stoull(v);
    else if (a == "--scheme") {
      const auto sc = parse_scheme(v);
      if (!sc) {
        std::fprintf(stderr, "unknown scheme %s\n", v.c_str());
        return 2;
      }
      file_options.scheme = *sc;
    } else if (a == "--double-quant" && v == "1")
      file_options.double_quant = true;
    else {
      std::fprintf(stderr, "unknown option %s\n", a.c_str());
      return 2;
    }
  }
  if (!checkpoint.empty()) {
    try {
      return same_tensors(checkpoint, report, file_options, max_bytes, threads, reps);
    } catch (const Error& e) {
      std::fprintf(stderr, "quant_kernels: %s\n", e.what());
      return 2;
    }
  }
  const uint64_t n = static_cast<uint64_t>(rows * cols);
  std::vector<uint8_t> data(n * dtype_size(dtype));
  {
    std::mt19937_64 rng(42);
    std::normal_distribution<float> nd(0.0f, 0.02f);
    std::vector<float> row(static_cast<size_t>(cols));
    for (int64_t r = 0; r < rows; ++r) {
      for (auto& x : row) x = nd(rng);
      convert_from_f32(dtype, row.data(), data.data() + static_cast<uint64_t>(r * cols) * dtype_size(dtype),
                       row.size());
    }
  }
  ThreadPool pool(threads);
  const std::vector<int64_t> shape{rows, cols};
  const double gb = static_cast<double>(data.size()) / 1e9;
  std::printf("weight [%lld, %lld] %s (%.1f MiB), %zu threads, SIMD %s, best of %d, %s\n",
              static_cast<long long>(rows), static_cast<long long>(cols),
              std::string(dtype_name(dtype)).c_str(), data.size() / 1048576.0, threads,
              detail::cpu_features().avx512 ? "AVX-512"
              : detail::have_simd()         ? "AVX2+F16C"
                                            : "off",
              reps, g_cpu_clock ? "GB per CPU-second" : "GB per wall-clock second");

  // Floor: read every byte once across the pool (what `cat` of a cached file costs at least).
  std::vector<uint64_t> sink(threads * 8);
  const double t_read = best_of(reps, [&] {
    pool.parallel_for(data.size() / 64, 1024, [&](size_t b, size_t e) {
      uint64_t acc = 0;
      for (size_t i = b; i < e; ++i) {
        uint64_t v;
        std::memcpy(&v, data.data() + i * 64, 8);
        acc ^= v;
        std::memcpy(&v, data.data() + i * 64 + 32, 8);
        acc += v;
      }
      sink[b % sink.size()] += acc;
    });
  });
  std::printf("%-14s %8.2f GB/s\n", "read (floor)", gb / t_read);

  struct Case {
    const char* name;
    SchemeOptions options;
  };
  const Case cases[] = {
      {"int8", {Scheme::Int8}}, {"fp8_e4m3", {Scheme::Fp8E4M3}},     {"fp8_e5m2", {Scheme::Fp8E5M2}},
      {"nf4", {Scheme::Nf4}},   {"nf4 dq", {Scheme::Nf4, 64, true}}, {"fp4", {Scheme::Fp4}}};
  std::printf("%-14s %10s %10s %10s %12s\n", "scheme", "fast GB/s", "ref GB/s", "fast/ref", "fast/read");
  for (const auto& c : cases) {
    const auto decls = quantized_decls("m", dtype, shape, c.options);
    std::vector<std::vector<uint8_t>> outs;
    for (const auto& d : decls) outs.emplace_back(d.nbytes());
    std::vector<std::span<uint8_t>> spans(outs.begin(), outs.end());
    auto run = [&](detail::Impl impl) {
      detail::quantize_weight_impl("bench", dtype, shape, data, c.options, spans, pool, impl);
    };
    const double t_fast = best_of(reps, [&] { run(detail::Impl::Fast); });
    const double t_ref =
        with_ref ? best_of(std::max(1, reps / 2), [&] { run(detail::Impl::Reference); }) : 0.0;
    std::printf("%-14s %10.2f %10.2f %9.1fx %11.2fx\n", c.name, gb / t_fast, gb / t_ref, t_ref / t_fast,
                t_read / t_fast);
  }
  return 0;
}
