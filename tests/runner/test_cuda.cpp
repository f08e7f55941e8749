// GPU tests (label `gpu`): the CUDA kernels against the CPU reference bit for bit, and the CUDA
// backend's streamed schedule against its all-resident run. Without a CUDA device the program
// prints why and exits 77, which CTest reports as skipped.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cstdio>
#include <cstring>
#include <random>

#include "qtool/runner/cpu_kernels.hpp"
#include "qtool/runner/cuda_ops.hpp"
#include "qtool/runner/cuda_resources.hpp"
#include "qtool/runner/executor.hpp"
#include "qtool/runner/kernel_math.hpp"
#include "qtool/runner/schedule.hpp"
#include "qtool/runner/verify.hpp"
#include "runner_test_util.hpp"

using namespace qtool;
using namespace qtool::runner;
namespace rc = qtool::runner::cuda;

int main(int argc, char** argv) {
  if (rc::device_count() == 0) {
    std::printf("no CUDA device: GPU tests skipped\n");
    return 77;
  }
  std::printf("GPU: %s\n", rc::describe_device(0).c_str());
  doctest::Context ctx(argc, argv);
  return ctx.run();
}

namespace {

// A linear's parts copied into one device buffer at 256-byte aligned offsets, like an arena.
struct DeviceLinear {
  rc::DeviceBuffer mem;
  DequantParams params;
};

DeviceLinear upload(const DequantParams& hp) {
  const PartSizes sizes = part_sizes(hp);
  const uint8_t* parts[kNumParts] = {hp.weight, hp.scale, hp.quant_map, hp.nested_absmax,
                                     hp.nested_quant_map};
  uint64_t off[kNumParts] = {}, total = 0;
  for (int p = 0; p < kNumParts; ++p) {
    off[p] = total;
    if (parts[p]) total = (total + sizes.bytes[p] + 255) / 256 * 256;
  }
  DeviceLinear d;
  d.mem = rc::DeviceBuffer(0, std::max<uint64_t>(total, 256));
  for (int p = 0; p < kNumParts; ++p)
    if (parts[p] && sizes.bytes[p])
      QTOOL_CUDA_CHECK(
          cudaMemcpy(d.mem.as<uint8_t>() + off[p], parts[p], sizes.bytes[p], cudaMemcpyHostToDevice));
  d.params = hp;
  const auto at = [&](int p) -> const uint8_t* { return parts[p] ? d.mem.as<uint8_t>() + off[p] : nullptr; };
  d.params.weight = at(kPartWeight);
  d.params.scale = at(kPartScale);
  d.params.quant_map = at(kPartQuantMap);
  d.params.nested_absmax = at(kPartNestedAbsmax);
  d.params.nested_quant_map = at(kPartNestedQuantMap);
  return d;
}

std::vector<uint16_t> gpu_dequant(const DequantParams& hp) {
  rc::Stream stream(0);
  rc::DeviceBuffer tables_mem(0, rc::kDeviceTablesBytes);
  const rc::DeviceTables tables = rc::upload_tables(tables_mem.data(), stream.get());
  DeviceLinear d = upload(hp);
  rc::DeviceBuffer out(0, std::max<uint64_t>(hp.numel() * 2, 256));
  QTOOL_CUDA_CHECK(cudaMemsetAsync(out.data(), 0xFF, out.size(), stream.get()));  // poison
  rc::dequantize_to_bf16(d.params, tables, out.as<uint16_t>(), stream.get());
  std::vector<uint16_t> host(hp.numel());
  QTOOL_CUDA_CHECK(
      cudaMemcpyAsync(host.data(), out.data(), host.size() * 2, cudaMemcpyDeviceToHost, stream.get()));
  stream.synchronize();
  return host;
}

std::vector<quant::SchemeOptions> every_option() {
  std::vector<quant::SchemeOptions> v;
  for (const auto& c : test::all_scheme_cases()) {
    if (c.scheme.empty()) continue;
    quant::SchemeOptions so;
    so.scheme = *quant::parse_scheme(c.scheme);
    so.blocksize = c.blocksize;
    so.double_quant = c.double_quant;
    so.per_tensor = c.per_tensor;
    v.push_back(so);
  }
  return v;
}

}  // namespace

TEST_CASE("GPU dequantization equals libquant's CPU reference bit for bit, tails, garbage and all") {
  const uint64_t seed = 424242;
  std::printf("seed %llu\n", static_cast<unsigned long long>(seed));
  std::mt19937_64 rng(seed);
  ThreadPool pool(4);
  const std::vector<std::pair<uint64_t, uint64_t>> shapes = {{1, 1},    {3, 5},     {2, 16},     {17, 31},
                                                             {33, 257}, {64, 4096}, {257, 1024}, {5, 48}};
  for (const quant::SchemeOptions& so : every_option()) {
    for (DType dtype : {DType::BF16, DType::F16, DType::F32}) {
      for (bool garbage : {false, true}) {
        for (const auto& [rows, cols] : shapes) {
          CAPTURE(std::string(quant::scheme_name(so.scheme)));
          CAPTURE(so.double_quant);
          CAPTURE(dtype_name(dtype));
          CAPTURE(garbage);
          CAPTURE(rows);
          CAPTURE(cols);
          std::vector<uint8_t> w = test::random_weight(rows, cols, dtype, rng);
          const std::vector<int64_t> shape = {static_cast<int64_t>(rows), static_cast<int64_t>(cols)};
          auto tensors = quant::quantize_weight("m", "m.weight", dtype, shape, w, so, pool);
          std::vector<TensorDecl> decls;
          for (auto& t : tensors) decls.push_back(t.decl);
          test::TempDir dir("gpu-dq");
          {
            SafetensorsWriter writer(dir.path / "w.safetensors", decls);
            for (auto& t : tensors) {
              const std::string& n = t.decl.name;
              const bool is_data = n == "m.weight" || n == "m.SCB" || n == "m.weight_scale" ||
                                   n == "m.weight.absmax" || n == "m.weight.nested_absmax";
              if (garbage && is_data)
                for (auto& b : t.bytes) b = static_cast<uint8_t>(rng());
              writer.write(n, t.bytes);
            }
            writer.commit();
          }
          const Component comp = Component::open_file(dir.path / "w.safetensors", "");
          const quant::QuantizedLinear ql = quant::find_quantized_linears(comp).at(0);
          const DequantParams hp = quantized_params(ql, comp);
          std::vector<uint16_t> ref(hp.numel());
          quant::dequantize_rows_bf16(ql, quant::tensor_bytes(ql, comp), ref.data(), 0, rows);
          const std::vector<uint16_t> got = gpu_dequant(hp);
          size_t first = SIZE_MAX;
          for (size_t i = 0; i < got.size() && first == SIZE_MAX; ++i)
            if (got[i] != ref[i]) first = i;
          CAPTURE(first);
          CHECK(first == SIZE_MAX);
        }
      }
    }
  }
  // Unquantized f16 / f32 weights converted to bf16.
  for (DType dtype : {DType::F16, DType::F32}) {
    std::vector<uint8_t> w = test::random_weight(19, 77, dtype, rng);
    DequantParams hp;
    hp.kind = dtype == DType::F16 ? WeightKind::F16 : WeightKind::F32;
    hp.rows = 19;
    hp.cols = 77;
    hp.weight = w.data();
    std::vector<uint16_t> ref(hp.numel());
    dequantize_to_bf16_cpu(hp, ref.data(), 0, hp.numel());
    CHECK(gpu_dequant(hp) == ref);
  }
}

TEST_CASE("GPU activations and digests equal the CPU's; the GEMM agrees with the CPU GEMM") {
  rc::Stream stream(0);
  ThreadPool pool(4);
  const uint64_t tokens = 33, ld = 4100, in = 4096, out = 1031;
  const uint64_t s = kmath::activation_stream(99);
  rc::DeviceBuffer x(0, tokens * ld * 2);
  rc::generate_activation(s, tokens, ld, 0, 1000, x.as<uint16_t>(), stream.get());
  rc::generate_activation(s, tokens, ld, 1000, ld, x.as<uint16_t>(), stream.get());
  std::vector<uint16_t> xg(tokens * ld), xc(tokens * ld);
  QTOOL_CUDA_CHECK(cudaMemcpyAsync(xg.data(), x.data(), xg.size() * 2, cudaMemcpyDeviceToHost, stream.get()));
  cpu::generate_activation(s, tokens, ld, 0, ld, xc.data(), pool);
  stream.synchronize();
  CHECK(xg == xc);

  std::mt19937_64 rng(5);
  std::vector<uint8_t> wb = test::random_weight(out, in, DType::BF16, rng);
  std::vector<uint16_t> w(out * in);
  std::memcpy(w.data(), wb.data(), wb.size());
  rc::DeviceBuffer wd(0, w.size() * 2), y(0, tokens * out * 2), ws(0, 32 << 20), dg(0, 16);
  QTOOL_CUDA_CHECK(cudaMemcpy(wd.data(), w.data(), w.size() * 2, cudaMemcpyHostToDevice));
  rc::CublasHandle h(0);
  h.set_workspace(ws.data(), ws.size());
  h.set_stream(stream.get());
  rc::gemm_bf16(h, x.as<uint16_t>(), ld, wd.as<uint16_t>(), y.as<uint16_t>(), tokens, in, out);
  QTOOL_CUDA_CHECK(cudaMemsetAsync(dg.data(), 0, 16, stream.get()));
  rc::accumulate_digest(y.as<uint16_t>(), tokens * out, dg.as<unsigned long long>(), stream.get());
  std::vector<uint16_t> yg(tokens * out), yc(tokens * out);
  unsigned long long d[2];
  QTOOL_CUDA_CHECK(cudaMemcpyAsync(yg.data(), y.data(), yg.size() * 2, cudaMemcpyDeviceToHost, stream.get()));
  QTOOL_CUDA_CHECK(cudaMemcpyAsync(d, dg.data(), 16, cudaMemcpyDeviceToHost, stream.get()));
  stream.synchronize();
  const cpu::Digest dc = cpu::digest(yg.data(), yg.size());
  CHECK(d[0] == dc.hash);
  CHECK(d[1] == dc.nonfinite);
  cpu::gemm_bf16(xc.data(), ld, w.data(), yc.data(), tokens, in, out, pool);
  double err = 0, ref = 0;
  for (size_t i = 0; i < yg.size(); ++i) {
    const double a = kmath::bf16_bits_to_f32(yg[i]), b = kmath::bf16_bits_to_f32(yc[i]);
    err += (a - b) * (a - b);
    ref += b * b;
  }
  // Both accumulate in fp32 and round once to bf16: they differ by bf16 rounding at most.
  CHECK(std::sqrt(err / ref) < 4e-3);
}

TEST_CASE("CUDA backend: streamed == all-resident for every scheme, disk groups, poisoned arenas") {
  test::TempDir dir("gpu-exec");
  const auto bf16 = test::synth(dir.path, "tiny", 9);
  auto backend = make_cuda_backend();
  for (const test::SchemeCase& c : test::all_scheme_cases()) {
    CAPTURE(c.label);
    test::TempDir q("gpu-q");
    const auto path = test::quantize(bf16, q.path / "model", c);
    const Checkpoint ckpt = Checkpoint::open(path);
    Schedule s;
    size_t n_cpu = 0, n_disk = 0;
    for (double cpu = 0.05; cpu < 0.95; cpu += 0.05) {
      s = build_schedule(ckpt, test::plan_streamed(ckpt, 0.3, cpu, 16, 2));
      n_cpu = n_disk = 0;
      for (const ExecStep& st : s.steps)
        if (st.streamed) (s.arenas[st.arena].placement == Placement::Disk ? n_disk : n_cpu)++;
      if (n_cpu && n_disk) break;
    }
    REQUIRE(n_cpu > 0);
    REQUIRE(n_disk > 0);
    RunOptions o;
    o.forwards = false;  // every linear on its own activations (test_cuda_driver.cpp runs the forwards)
    o.tokens = 16;
    o.steps = 3;
    o.seed = 3;
    o.trace = true;
    o.sizing.staging_buffers = s.n_slots;
    const auto [planned, resident] = test::run_planned_and_resident(*backend, ckpt, s, o);
    CHECK(planned.digests == resident.digests);
    for (const auto& st : planned.digests)
      for (const LayerDigest& d : st) CHECK(d.nonfinite == 0);
    CHECK(!planned.trace.empty());
    // The CPU backend computes the same function: its outputs are close (not bitwise: the order of
    // additions differs), and its own streamed run is bitwise its own resident run.
    // Each layer run alone gives the planned digest.
    for (size_t li = 0; li < s.linears.size(); li += 3) {
      const LinearTask& l = s.linears[li];
      const LayerRun r = backend->run_layer(s.bind_mapped(l, ckpt), 16, s.max_in(0), 3, 0);
      CHECK(r.digest == planned.digests[0][li]);
    }
    // No quant state left behind.
    o.mode = Mode::Planned;
    o.steps = 1;
    std::mt19937_64 rng(11);
    size_t poisoned = 0;
    o.after_copy = [&](size_t, std::span<uint8_t> host) {
      for (auto& b : host) b = static_cast<uint8_t>(rng());
      ++poisoned;
    };
    const RunResult dirty = backend->run(ckpt, s, o);
    CHECK(poisoned == n_cpu + n_disk);
    CHECK(dirty.digests[0] == planned.digests[0]);
  }
}

TEST_CASE("CUDA backend on two GPUs: weights on both, read by the forward through peer access") {
  if (rc::device_count() < 2) {
    MESSAGE("one GPU: two-GPU test skipped");
    return;
  }
  test::TempDir dir("gpu2");
  const auto bf16 = test::synth(dir.path, "tiny", 13);
  test::TempDir q("gpu2-q");
  const Checkpoint ckpt = Checkpoint::open(test::quantize(bf16, q.path / "model", {"nf4", "nf4"}));
  const Schedule s = build_schedule(ckpt, test::plan_streamed(ckpt, 0.3, 0.5, 16, 2, 2));
  REQUIRE(s.devices.size() == 2);
  auto backend = make_cuda_backend();
  RunOptions o;
  o.tokens = 16;
  o.steps = 2;
  const auto [planned, resident] = test::run_planned_and_resident(*backend, ckpt, s, o);
  CHECK(planned.unit_digests == resident.unit_digests);
  REQUIRE(planned.memory.size() == 2);
  for (const DeviceMemory& m : planned.memory) CHECK(m.allocated_bytes > 0);
  o.forwards = false;
  const auto [lp, lr] = test::run_planned_and_resident(*backend, ckpt, s, o);
  CHECK(lp.digests == lr.digests);
}
