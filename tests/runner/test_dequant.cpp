// The runner's dequantization (the element functions its CUDA kernels run) against libquant's CPU
// reference, bit for bit: every scheme and option, odd sizes, all-zero rows and blocks, and weights
// whose bytes were overwritten with garbage (NaN codes, NaN and negative scales).
#include <doctest/doctest.h>

#include <cstdio>
#include <cstring>
#include <functional>
#include <random>

#include "qtool/runner/cpu_kernels.hpp"
#include "qtool/runner/dequant.hpp"
#include "qtool/runner/error_model.hpp"
#include "qtool/runner/executor.hpp"
#include "qtool/runner/kernel_math.hpp"
#include "qtool/runner/schedule.hpp"
#include "runner_test_util.hpp"

using namespace qtool;
using namespace qtool::runner;

namespace {

struct Built {
  test::TempDir dir{"dq"};
  std::filesystem::path file;
};

// Writes one quantized linear per shape into a safetensors file and opens it.
Component write_linears(const std::filesystem::path& file, const quant::SchemeOptions& so, DType dtype,
                        const std::vector<std::pair<uint64_t, uint64_t>>& shapes, std::mt19937_64& rng,
                        bool zero_rows, std::vector<std::vector<uint8_t>>* originals = nullptr,
                        const std::function<void(std::vector<uint8_t>&)>& edit = {}) {
  ThreadPool pool(2);
  std::vector<quant::OwnedTensor> all;
  for (size_t i = 0; i < shapes.size(); ++i) {
    const auto [rows, cols] = shapes[i];
    std::vector<uint8_t> w = test::random_weight(rows, cols, dtype, rng);
    if (zero_rows && rows > 1) {
      std::memset(w.data(), 0, cols * dtype_size(dtype));  // an all-zero first row (and its blocks)
    }
    if (edit) edit(w);
    if (originals) originals->push_back(w);
    const std::vector<int64_t> shape = {static_cast<int64_t>(rows), static_cast<int64_t>(cols)};
    auto t = quant::quantize_weight("l" + std::to_string(i), "l" + std::to_string(i) + ".weight", dtype,
                                    shape, w, so, pool);
    for (auto& x : t) all.push_back(std::move(x));
  }
  std::vector<TensorDecl> decls;
  for (const auto& t : all) decls.push_back(t.decl);
  {
    SafetensorsWriter writer(file, decls);
    for (const auto& t : all) writer.write(t.decl.name, t.bytes);
    writer.commit();
  }
  return Component::open_file(file, "");
}

void check_equal_to_libquant(const Component& comp, const std::string& what) {
  CAPTURE(what);
  const auto linears = quant::find_quantized_linears(comp);
  REQUIRE(!linears.empty());
  for (const quant::QuantizedLinear& ql : linears) {
    CAPTURE(ql.module);
    const DequantParams p = quantized_params(ql, comp);
    std::vector<uint16_t> ours(p.numel()), ref(p.numel());
    dequantize_to_bf16_cpu(p, ours.data(), 0, p.numel());
    quant::dequantize_rows_bf16(ql, quant::tensor_bytes(ql, comp), ref.data(), 0,
                                static_cast<size_t>(ql.rows()));
    size_t first_diff = SIZE_MAX;
    for (size_t i = 0; i < ours.size() && first_diff == SIZE_MAX; ++i)
      if (ours[i] != ref[i]) first_diff = i;
    CAPTURE(first_diff);
    CHECK(first_diff == SIZE_MAX);
  }
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
  quant::SchemeOptions fp8_tensor_e5m2;
  fp8_tensor_e5m2.scheme = quant::Scheme::Fp8E5M2;
  fp8_tensor_e5m2.per_tensor = true;
  v.push_back(fp8_tensor_e5m2);
  quant::SchemeOptions nf4_32;
  nf4_32.scheme = quant::Scheme::Nf4;
  nf4_32.blocksize = 32;
  v.push_back(nf4_32);
  return v;
}

const std::vector<std::pair<uint64_t, uint64_t>> kShapes = {
    {1, 1}, {1, 7}, {3, 5}, {2, 16}, {5, 33}, {7, 64}, {17, 31}, {16, 128}, {33, 257}, {64, 300}};

}  // namespace

TEST_CASE("dequantization equals libquant's for every scheme, dtype and odd shape") {
  const uint64_t seed = 20261122;
  std::printf("seed %llu\n", static_cast<unsigned long long>(seed));
  std::mt19937_64 rng(seed);
  for (const quant::SchemeOptions& so : every_option()) {
    for (DType dtype : {DType::BF16, DType::F16, DType::F32}) {
      Built b;
      const Component comp = write_linears(b.dir.path / "w.safetensors", so, dtype, kShapes, rng, true);
      check_equal_to_libquant(comp, str_cat(quant::scheme_name(so.scheme), " bs ", so.blocksize, " dq ",
                                            so.double_quant, " pt ", so.per_tensor, " ", dtype_name(dtype)));
    }
  }
}

TEST_CASE("dequantization equals libquant's on garbage bytes: NaN codes, NaN and negative scales") {
  const uint64_t seed = 77;
  std::printf("seed %llu\n", static_cast<unsigned long long>(seed));
  std::mt19937_64 rng(seed);
  for (const quant::SchemeOptions& so : every_option()) {
    Built b;
    Component comp = write_linears(b.dir.path / "w.safetensors", so, DType::BF16, kShapes, rng, false);
    // Overwrite every weight and scale tensor with random bytes (the quant_state JSON and tables are
    // left alone, so libquant still reads the layout).
    const auto linears = quant::find_quantized_linears(comp);
    std::vector<std::pair<uint64_t, uint64_t>> ranges;  // file offsets to garble
    for (const auto& ql : linears)
      for (size_t k = 0; k < ql.tensor_names.size(); ++k)
        if (ql.tensor_parts[k] == quant::Part::Weight || ql.tensor_parts[k] == quant::Part::Scale ||
            ql.tensor_parts[k] == quant::Part::NestedAbsmax) {
          const auto e = comp.find(ql.tensor_names[k]);
          const SafetensorsFile& f = comp.shard_of(*e);
          ranges.emplace_back(f.file_offset(comp.info(*e)), comp.info(*e).nbytes());
        }
    const auto path = comp.shards()[0].path();
    {
      std::vector<uint8_t> bytes(std::filesystem::file_size(path));
      FILE* fp = std::fopen(path.c_str(), "r+b");
      REQUIRE(fp);
      REQUIRE(std::fread(bytes.data(), 1, bytes.size(), fp) == bytes.size());
      for (const auto& [off, n] : ranges)
        for (uint64_t i = 0; i < n; ++i) bytes[off + i] = static_cast<uint8_t>(rng());
      std::fseek(fp, 0, SEEK_SET);
      REQUIRE(std::fwrite(bytes.data(), 1, bytes.size(), fp) == bytes.size());
      std::fclose(fp);
    }
    comp = Component::open_file(path, "");
    check_equal_to_libquant(comp,
                            str_cat("garbage ", quant::scheme_name(so.scheme), " dq ", so.double_quant));
  }
}

namespace {

// A plain bf16 weight [rows, cols] over `bytes`: the original a quantized one is compared with.
DequantParams bf16_weight(uint64_t rows, uint64_t cols, const std::vector<uint8_t>& bytes) {
  DequantParams p;
  p.kind = WeightKind::Bf16;
  p.rows = rows;
  p.cols = cols;
  p.weight = bytes.data();
  return p;
}

// `run` and the original `ref` on the activations of `seed` (tokens x ref.cols), compared by the
// error model of the quantized weight `model` (`run` itself, or a corrupted copy of it).
ErrorPrediction compare(Backend& backend, const DequantParams& run, const DequantParams& model,
                        const DequantParams& ref, uint64_t tokens, uint64_t seed, ThreadPool& pool) {
  const uint64_t cols = ref.cols;
  const LayerRun yq = backend.run_layer(run, tokens, cols, seed, 0);
  const LayerRun yr = backend.run_layer(ref, tokens, cols, seed, 0);
  std::vector<uint16_t> x(tokens * cols);
  cpu::generate_activation(kmath::activation_stream(seed), tokens, cols, 0, cols, x.data(), pool);
  const ErrorVariance var = error_variance(model, WeightKind::Bf16, x, cols, tokens, pool);
  return predict_and_measure(yq.y, yr.y, x, cols, tokens, cols, var.col, var.spread_sq, model.kind);
}

}  // namespace

TEST_CASE("the error model predicts the measured error of every scheme and flags corruption") {
  const uint64_t seed = 31337;
  std::printf("seed %llu\n", static_cast<unsigned long long>(seed));
  std::mt19937_64 rng(seed);
  ThreadPool pool(2);
  auto backend = make_cpu_backend(2);
  const uint64_t tokens = 32, rows = 96, cols = 256;
  for (const quant::SchemeOptions& so : every_option()) {
    CAPTURE(quant::scheme_name(so.scheme));
    CAPTURE(so.double_quant);
    CAPTURE(so.per_tensor);
    Built b;
    std::vector<std::vector<uint8_t>> originals;
    const Component comp =
        write_linears(b.dir.path / "w.safetensors", so, DType::BF16, {{rows, cols}}, rng, false, &originals);
    const quant::QuantizedLinear ql = quant::find_quantized_linears(comp).at(0);
    const DequantParams qp = quantized_params(ql, comp);
    const DequantParams rp = bf16_weight(rows, cols, originals[0]);
    // One pass gives the columns' variances as column_error_variance does.
    std::vector<uint16_t> x(tokens * cols);
    cpu::generate_activation(kmath::activation_stream(5), tokens, cols, 0, cols, x.data(), pool);
    CHECK(error_variance(qp, WeightKind::Bf16, x, cols, tokens, pool).col ==
          column_error_variance(qp, WeightKind::Bf16, pool));
    const ErrorPrediction e = compare(*backend, qp, qp, rp, tokens, 5, pool);
    std::printf("%s%s%s: measured %.4f predicted %.4f\n", std::string(quant::scheme_name(so.scheme)).c_str(),
                so.double_quant ? " dq" : "", so.per_tensor ? " per-tensor" : "", e.rel_error(),
                e.predicted_rel());
    CHECK(e.within());
    // The model is close, not merely an upper bound.
    CHECK(e.rel_error() > 0.5 * e.predicted_rel());
    // One weight byte in ten overwritten: far outside the bound.
    std::vector<uint8_t> corrupt(qp.weight, qp.weight + part_sizes(qp).bytes[kPartWeight]);
    for (size_t i = 0; i < corrupt.size(); i += 10) corrupt[i] = static_cast<uint8_t>(corrupt[i] ^ 0x5A);
    DequantParams cp = qp;
    cp.weight = corrupt.data();
    CHECK_FALSE(compare(*backend, cp, qp, rp, tokens, 5, pool).within());
  }
}

TEST_CASE("the error bound covers the spread of a layer whose error sits in one row") {
  // An int8 layer shaped like tiny-flux's single-block proj_out (64 x 320, 16 tokens) with one
  // weight 60x the others' scale: its row's grid is 60x coarser and carries most of the error, so
  // the measured error is close to one draw per token and scatters widely around the prediction.
  const uint64_t seed = 10595;
  std::printf("seed %llu\n", static_cast<unsigned long long>(seed));
  std::mt19937_64 rng(seed);
  ThreadPool pool(2);
  auto backend = make_cpu_backend(2);
  const uint64_t tokens = 16, rows = 64, cols = 320;
  quant::SchemeOptions so;
  so.scheme = *quant::parse_scheme("int8");
  Built b;
  std::vector<std::vector<uint8_t>> originals;
  const Component comp = write_linears(b.dir.path / "w.safetensors", so, DType::BF16, {{rows, cols}}, rng,
                                       false, &originals, [&](std::vector<uint8_t>& w) {
                                         const uint16_t big = 0x408A;  // 4.3125 in bf16
                                         std::memcpy(w.data() + (5 * cols + 7) * 2, &big, 2);
                                       });
  const DequantParams qp = quantized_params(quant::find_quantized_linears(comp).at(0), comp);
  const DequantParams rp = bf16_weight(rows, cols, originals[0]);
  double worst = 0, widest = 0, sum_err = 0, sum_err_sq = 0, sum_spread = 0;
  int outside_without_spread = 0;
  for (uint64_t s = 0; s < 200; ++s) {
    CAPTURE(s);
    const ErrorPrediction e = compare(*backend, qp, qp, rp, tokens, s, pool);
    CHECK(e.within());
    worst = std::max(worst, e.rel_error() / e.predicted_rel());
    widest = std::max(widest, e.bound() / (e.factor * e.predicted_rel()));
    if (e.rel_error() > e.factor * e.predicted_rel() + kErrorFloor) ++outside_without_spread;
    sum_err += e.sum_sq_err;
    sum_err_sq += e.sum_sq_err * e.sum_sq_err;
    sum_spread += e.spread_sq;
  }
  const double mean = sum_err / 200, sd = std::sqrt(sum_err_sq / 200 - mean * mean);
  std::printf("squared error over the draws: mean %.4g, sd %.4g, modelled sd %.4g\n", mean, sd,
              sum_spread / 200);
  // The spread models the scatter of the draws (the sd of 200 draws is itself good to about 5%).
  CHECK(sd > 0.75 * sum_spread / 200);
  CHECK(sd < 1.33 * sum_spread / 200);
  std::printf(
      "measured/predicted up to %.3f; bound up to %.3f x factor x predicted; %d of 200 outside "
      "without the spread\n",
      worst, widest, outside_without_spread);
  // The draws do scatter: the largest measured/predicted is well above the typical 0.9-1.1.
  CHECK(worst > 1.25);
  // A weight of the outlier row off by 40 grid steps is still caught.
  std::vector<uint8_t> corrupt(qp.weight, qp.weight + part_sizes(qp).bytes[kPartWeight]);
  corrupt[5 * cols + 100] = static_cast<uint8_t>(static_cast<int8_t>(corrupt[5 * cols + 100]) + 40);
  DequantParams cp = qp;
  cp.weight = corrupt.data();
  CHECK_FALSE(compare(*backend, cp, qp, rp, tokens, 0, pool).within());
}
