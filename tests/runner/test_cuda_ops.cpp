// GPU tests of the CUDA backend of ops.hpp (label `gpu`): every op against the CPU backend at odd
// sizes and strided views, in bf16 and f16 — bit for bit for all ops but linear and attention
// (those within a stated tolerance) and the transcendental activations (CUDA's expf/tanhf may
// differ from glibc's by an ulp of float32: the mismatch rate is printed and bounded) — the
// tensor-core attention (attention_mma.cu) against the CPU backend and the CUDA-core kernel at odd
// sizes (max |diff| and relative RMS printed per case), and timings of attention (Flux's and
// Llama's shapes, qtool's kernel and cuDNN's) and of a linear; cuDNN's fused attention
// (attention_cudnn.cpp, forced) against the CPU backend, with a check that it, not the fallback,
// ran (skipped with a note when cuDNN cannot be loaded; QTOOL_TEST_REQUIRE_CUDNN=1 makes that a
// failure). Without a device it prints why and
// exits 77 (skipped). The random data's seed is printed; QTOOL_TEST_SEED overrides it.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "attention_cudnn.hpp"  // runner/cuda: cuDNN's attention path, its choice and counts
#include "attention_mma.hpp"    // runner/cuda: the attention kernels, called directly below
#include "forward_args.hpp"     // runner/cuda: their arguments as the CUDA backend builds them
#include "forward_kernels.hpp"  // runner/cuda: the element-wise kernels' switch and count
#include "matmul_lt.hpp"        // runner/cuda: cuBLASLt's count of fused activations
#include "qtool/formats/dtype.hpp"
#include "qtool/formats/error.hpp"
#include "qtool/formats/thread_pool.hpp"
#include "qtool/runner/cpu_ops.hpp"
#include "qtool/runner/cuda_forward_ops.hpp"
#include "qtool/runner/cuda_resources.hpp"
#include "qtool/runner/driver.hpp"
#include "qtool/runner/kernel_math.hpp"

using namespace qtool;
using namespace qtool::runner;
namespace rc = qtool::runner::cuda;
namespace fwd = qtool::runner::cuda::fwd;

namespace {

uint64_t g_seed = 0;

std::string dn(DType dt) { return std::string(dtype_name(dt)); }

int64_t ceil8(int64_t n) { return (n + 7) / 8 * 8; }

// Host float -> the bytes of one element of dtype dt.
void put(DType dt, std::vector<uint8_t>& bytes, size_t i, float v) {
  if (dt == DType::BF16) {
    const uint16_t h = kmath::f32_to_bf16_bits(v);
    std::memcpy(bytes.data() + 2 * i, &h, 2);
  } else if (dt == DType::F16) {
    const uint16_t h = f32_to_f16(v);
    std::memcpy(bytes.data() + 2 * i, &h, 2);
  } else {
    std::memcpy(bytes.data() + 4 * i, &v, 4);
  }
}

float get(DType dt, const std::vector<uint8_t>& bytes, size_t i) {
  if (dt == DType::F32) {
    float v;
    std::memcpy(&v, bytes.data() + 4 * i, 4);
    return v;
  }
  uint16_t h;
  std::memcpy(&h, bytes.data() + 2 * i, 2);
  return dt == DType::BF16 ? kmath::bf16_bits_to_f32(h) : f16_to_f32(h);
}

// The two backends side by side.
struct Both {
  ThreadPool pool{2};
  std::unique_ptr<Ops> cpu;
  rc::Stream stream;
  std::unique_ptr<Ops> gpu;
  std::mt19937_64 rng;
  explicit Both(uint64_t capacity = uint64_t{256} << 20)
      : cpu(make_cpu_ops(pool, capacity)),
        stream(0),
        gpu(make_cuda_ops(0, stream.get(), capacity)),
        rng(g_seed) {}
};

struct Pair {
  Mat c, g;
};

// A [rows, cols] view with row stride cols + pad (pad > 0: strided) on both backends holding the
// same random values: normal * scale, with zeros, subnormals, ±Inf and NaN sprinkled when `specials`.
Pair random_pair(Both& b, int64_t rows, int64_t cols, DType dt, int64_t pad, float scale = 1.0f,
                 bool specials = true) {
  const int64_t ld = cols + pad;
  std::vector<uint8_t> host(static_cast<size_t>(rows * ld) * dtype_size(dt));
  std::normal_distribution<float> nd(0.0f, scale);
  std::uniform_int_distribution<int> pick(0, 199);
  for (size_t i = 0; i < static_cast<size_t>(rows * ld); ++i) {
    float v = nd(b.rng);
    if (specials) {
      const int p = pick(b.rng);
      if (p == 0) v = 0.0f;
      if (p == 1) v = -0.0f;
      if (p == 2) v = dt == DType::F16 ? 3.0e-6f : 1.0e-39f;  // subnormal in the dtype
      if (p == 3) v = INFINITY;
      if (p == 4) v = -INFINITY;
      if (p == 5) v = NAN;
    }
    put(dt, host, i, v);
  }
  Mat c = b.cpu->alloc(rows, ld, dt);
  Mat g = b.gpu->alloc(rows, ld, dt);
  b.cpu->upload(host.data(), c);
  b.gpu->upload(host.data(), g);
  // Strided views start at column 1 (pad >= 1 leaves room), so that they are also misaligned.
  return {c.cols_view(pad > 0 ? 1 : 0, cols), g.cols_view(pad > 0 ? 1 : 0, cols)};
}

Pair out_pair(Both& b, int64_t rows, int64_t cols, DType dt, int64_t pad) {
  Mat c = b.cpu->alloc(rows, cols + pad, dt);
  Mat g = b.gpu->alloc(rows, cols + pad, dt);
  return {c.cols_view(0, cols), g.cols_view(0, cols)};
}

std::vector<uint8_t> fetch(Ops& ops, const Mat& m) {
  std::vector<uint8_t> host(static_cast<size_t>(m.rows * m.cols) * m.elem_bytes());
  ops.download(m, host.data());
  return host;
}

// Elements whose bits differ between the backends' outputs; with nan_equal, any two NaNs are
// equal (the norms: a NaN in a row reaches every output through the row's statistics, summed in
// double, whose NaN payloads the GPU does not carry as x86 does; the activations and RoPE: where
// two NaNs meet in a commutative operation, which payload and sign the CPU keeps depends on the
// operand order its compiler chose, and expf of a NaN returns the GPU's own NaN). Where one side
// is NaN and the other is not, it is still a difference.
size_t mismatches(Both& b, const Pair& out, bool nan_equal = false) {
  const auto hc = fetch(*b.cpu, out.c);
  const auto hg = fetch(*b.gpu, out.g);
  const size_t eb = out.c.elem_bytes();
  size_t bad = 0;
  for (size_t i = 0; i < hc.size() / eb; ++i) {
    if (nan_equal && std::isnan(get(out.c.dtype, hc, i)) && std::isnan(get(out.c.dtype, hg, i))) continue;
    if (std::memcmp(hc.data() + i * eb, hg.data() + i * eb, eb) == 0) continue;
    if (++bad <= 3)
      std::printf("    element %zu: cpu %.9g, gpu %.9g\n", i, static_cast<double>(get(out.c.dtype, hc, i)),
                  static_cast<double>(get(out.c.dtype, hg, i)));
  }
  return bad;
}

void report(const char* op, DType dt, size_t bad, size_t n) {
  std::printf("  %-28s %-4s %zu / %zu elements differ\n", op, dn(dt).c_str(), bad, n);
}

// Within tol_rel * |cpu| + tol_abs (both NaN, or equal infinities, count as equal).
size_t beyond_tolerance(Both& b, const Pair& out, float tol_rel, float tol_abs, double* max_err) {
  const auto hc = fetch(*b.cpu, out.c);
  const auto hg = fetch(*b.gpu, out.g);
  size_t bad = 0;
  *max_err = 0.0;
  for (size_t i = 0; i < static_cast<size_t>(out.c.rows * out.c.cols); ++i) {
    const float c = get(out.c.dtype, hc, i), g = get(out.c.dtype, hg, i);
    if (std::isnan(c) && std::isnan(g)) continue;
    if (c == g) continue;
    const double e = std::fabs(static_cast<double>(c) - g);
    *max_err = std::max(*max_err, e);
    if (!(e <= tol_rel * std::fabs(c) + tol_abs)) ++bad;
  }
  return bad;
}

// A plain weight [rows, cols] of dtype dt in both backends' memories (as a DequantParams each).
struct PlainWeight {
  Mat c, g;
  DequantParams pc, pg;
};
PlainWeight plain_weight(Both& b, int64_t rows, int64_t cols, DType dt, float scale) {
  Pair p = random_pair(b, rows, cols, dt, 0, scale, false);
  PlainWeight w{p.c, p.g, {}, {}};
  const WeightKind kind = dt == DType::BF16  ? WeightKind::Bf16
                          : dt == DType::F16 ? WeightKind::F16
                                             : WeightKind::F32;
  for (auto* d : {&w.pc, &w.pg}) {
    d->kind = kind;
    d->rows = static_cast<uint64_t>(rows);
    d->cols = static_cast<uint64_t>(cols);
  }
  w.pc.weight = static_cast<const uint8_t*>(p.c.data);
  w.pg.weight = static_cast<const uint8_t*>(p.g.data);
  return w;
}

const DType kDtypes[] = {DType::BF16, DType::F16};

// The attention implementation for a scope (restored after).
struct ImplScope {
  rc::AttentionImpl prev;
  explicit ImplScope(rc::AttentionImpl impl) : prev(rc::attention_impl()) { rc::set_attention_impl(impl); }
  ~ImplScope() { rc::set_attention_impl(prev); }
  ImplScope(const ImplScope&) = delete;
  ImplScope& operator=(const ImplScope&) = delete;
};

}  // namespace

int main(int argc, char** argv) {
  if (rc::device_count() == 0) {
    std::printf("no CUDA device: GPU tests skipped\n");
    return 77;
  }
  const char* env = std::getenv("QTOOL_TEST_SEED");
  g_seed = env ? std::strtoull(env, nullptr, 10) : std::random_device{}();
  std::printf("GPU: %s\nseed %llu (QTOOL_TEST_SEED)\n", rc::describe_device(0).c_str(),
              static_cast<unsigned long long>(g_seed));
  doctest::Context ctx(argc, argv);
  return ctx.run();
}

TEST_CASE("cuda ops: element-wise ops equal the CPU backend's bits") {
  Both b;
  const int64_t rows = 37, cols = 131;
  for (DType dt : kDtypes) {
    const size_t n = static_cast<size_t>(rows * cols);
    const struct {
      Activation act;
      const char* name;
      bool transcendental;
    } acts[] = {{Activation::Identity, "activation Identity", false},
                {Activation::Relu, "activation Relu", false},
                {Activation::Silu, "activation Silu", true},
                {Activation::GeluTanh, "activation GeluTanh", true},
                {Activation::GeluNew, "activation GeluNew", true},
                {Activation::QuickGelu, "activation QuickGelu", true}};
    for (const auto& a : acts) {
      const size_t m = b.cpu->mark(), mg = b.gpu->mark();
      Pair x = random_pair(b, rows, cols, dt, 5, 2.0f);
      Pair out = out_pair(b, rows, cols, dt, 3);
      b.cpu->activation(a.act, x.c, out.c);
      b.gpu->activation(a.act, x.g, out.g);
      size_t bad = mismatches(b, out, true);
      report(a.name, dt, bad, n);
      if (a.transcendental)
        CHECK(bad * 1000 <= n);  // at most 0.1 %: an ulp of float32 crossing a rounding boundary
      else
        CHECK(bad == 0);
      // In place.
      b.cpu->activation(a.act, x.c, x.c);
      b.gpu->activation(a.act, x.g, x.g);
      bad = mismatches(b, x, true);
      if (a.transcendental)
        CHECK(bad * 1000 <= n);
      else
        CHECK(bad == 0);
      // Gated with the same activation.
      Pair g = random_pair(b, rows, cols, dt, 2, 2.0f);
      Pair u = random_pair(b, rows, cols, dt, 0, 2.0f);
      b.cpu->gated(a.act, g.c, u.c, out.c);
      b.gpu->gated(a.act, g.g, u.g, out.g);
      bad = mismatches(b, out, true);
      report((std::string("gated ") + a.name).c_str(), dt, bad, n);
      if (a.transcendental)
        CHECK(bad * 1000 <= n);
      else
        CHECK(bad == 0);
      b.cpu->release(m);
      b.gpu->release(mg);
    }
    Pair x = random_pair(b, rows, cols, dt, 4, 3.0f);
    Pair y = random_pair(b, rows, cols, dt, 0, 3.0f);
    Pair out = out_pair(b, rows, cols, dt, 6);
    b.cpu->add(x.c, y.c, out.c);
    b.gpu->add(x.g, y.g, out.g);
    size_t bad = mismatches(b, out);
    report("add", dt, bad, n);
    CHECK(bad == 0);
    b.cpu->residual(x.c, nullptr, y.c, 1, out.c);
    b.gpu->residual(x.g, nullptr, y.g, 1, out.g);
    bad = mismatches(b, out);
    report("residual", dt, bad, n);
    CHECK(bad == 0);
    for (int64_t batch : {1, 37}) {
      Pair gate = random_pair(b, batch, cols, dt, 3, 1.0f);
      b.cpu->residual(x.c, &gate.c, y.c, batch, out.c);
      b.gpu->residual(x.g, &gate.g, y.g, batch, out.g);
      bad = mismatches(b, out);
      report(batch == 1 ? "residual gated batch 1" : "residual gated batch 37", dt, bad, n);
      CHECK(bad == 0);
    }
    b.cpu->clamp(x.c, 1.5f, out.c);
    b.gpu->clamp(x.g, 1.5f, out.g);
    bad = mismatches(b, out);
    report("clamp", dt, bad, n);
    CHECK(bad == 0);
    for (DType to : {DType::BF16, DType::F16, DType::F32}) {
      Pair o = out_pair(b, rows, cols, to, 1);
      b.cpu->copy(x.c, o.c);
      b.gpu->copy(x.g, o.g);
      bad = mismatches(b, o);
      report(("copy to " + dn(to)).c_str(), dt, bad, n);
      CHECK(bad == 0);
    }
  }
  // F32 to the half types (rounding, overflow to inf, subnormals).
  Pair x = random_pair(b, rows, cols, DType::F32, 2, 3.0e4f);
  for (DType to : kDtypes) {
    Pair o = out_pair(b, rows, cols, to, 0);
    b.cpu->copy(x.c, o.c);
    b.gpu->copy(x.g, o.g);
    const size_t bad = mismatches(b, o);
    report("copy F32 to", to, bad, static_cast<size_t>(rows * cols));
    CHECK(bad == 0);
  }
}

TEST_CASE("cuda ops: bf16 element-wise ops through the 8-wide kernel equal the generic kernel and the CPU") {
  Both b;
  const DType dt = DType::BF16;
  // Rows 16-byte aligned (ld a multiple of 8) and widths multiples of 8: the 8-wide kernel; the
  // last shape (width 131) and the misaligned view must fall back to the generic one.
  const struct {
    int64_t rows, cols, extra;  // extra: ld = cols + extra, the views starting at column 0
    bool wide;
  } shapes[] = {
      {37, 136, 8, true}, {5, 8, 0, true}, {63, 3072, 0, true}, {3, 264, 16, true}, {7, 131, 5, false}};
  for (const auto& sh : shapes) {
    CAPTURE(sh.cols);
    const size_t m = b.cpu->mark(), mg = b.gpu->mark();
    const auto view = [&](Pair p) { return Pair{p.c.cols_view(0, sh.cols), p.g.cols_view(0, sh.cols)}; };
    const Pair x = view(random_pair(b, sh.rows, sh.cols + sh.extra, dt, 0, 2.0f));
    const Pair y = view(random_pair(b, sh.rows, sh.cols + sh.extra, dt, 0, 2.0f));
    const Pair gate = view(random_pair(b, 3, sh.cols + sh.extra, dt, 0, 1.0f));
    const Pair gate_rows = {gate.c.rows_view(0, 1), gate.g.rows_view(0, 1)};
    Pair out = view(random_pair(b, sh.rows, sh.cols + sh.extra, dt, 0, 1.0f, false));
    const size_t n = static_cast<size_t>(sh.rows * sh.cols);
    // Runs `op` on both backends (the GPU with the 8-wide kernel on, then off): the two GPU
    // results equal bit for bit, the CPU's as the generic kernel's test allows.
    const auto check = [&](const char* name, bool transcendental, auto&& op) {
      CAPTURE(name);
      op(*b.cpu, x.c, y.c, gate.c, gate_rows.c, out.c);
      const uint64_t before = fwd::elementwise_bf16x8_launches();
      op(*b.gpu, x.g, y.g, gate.g, gate_rows.g, out.g);
      const uint64_t wide = fwd::elementwise_bf16x8_launches() - before;
      const auto h_wide = fetch(*b.gpu, out.g);
      fwd::set_elementwise_bf16x8(false);
      op(*b.gpu, x.g, y.g, gate.g, gate_rows.g, out.g);
      fwd::set_elementwise_bf16x8(true);
      CHECK(fwd::elementwise_bf16x8_launches() - before == wide);  // off: the generic kernel only
      CHECK(wide == (sh.wide ? 1u : 0u));
      CHECK(fetch(*b.gpu, out.g) == h_wide);
      const size_t bad = mismatches(b, out, transcendental);
      if (transcendental)
        CHECK(bad * 1000 <= n + 999);
      else
        CHECK(bad == 0);
    };
    for (Activation act : {Activation::Identity, Activation::Relu, Activation::Silu, Activation::GeluTanh,
                           Activation::GeluNew, Activation::QuickGelu}) {
      const bool tr = act != Activation::Identity && act != Activation::Relu;
      check("activation", tr, [&](Ops& o, const Mat& a, const Mat&, const Mat&, const Mat&, const Mat& r) {
        o.activation(act, a, r);
      });
      check("gated", tr, [&](Ops& o, const Mat& a, const Mat& c, const Mat&, const Mat&, const Mat& r) {
        o.gated(act, a, c, r);
      });
    }
    check("add", false,
          [](Ops& o, const Mat& a, const Mat& c, const Mat&, const Mat&, const Mat& r) { o.add(a, c, r); });
    check("residual", false, [](Ops& o, const Mat& a, const Mat& c, const Mat&, const Mat&, const Mat& r) {
      o.residual(a, nullptr, c, 1, r);
    });
    check("residual gated, one gate row", false,
          [](Ops& o, const Mat& a, const Mat& c, const Mat&, const Mat& g1, const Mat& r) {
            o.residual(a, &g1, c, 1, r);
          });
    if (sh.rows % 3 == 0)  // a gate row per sample, 3 samples
      check("residual gated, per sample", false,
            [](Ops& o, const Mat& a, const Mat& c, const Mat& g3, const Mat&, const Mat& r) {
              o.residual(a, &g3, c, 3, r);
            });
    check("clamp", false, [](Ops& o, const Mat& a, const Mat&, const Mat&, const Mat&, const Mat& r) {
      o.clamp(a, 1.5f, r);
    });
    check("copy", false,
          [](Ops& o, const Mat& a, const Mat&, const Mat&, const Mat&, const Mat& r) { o.copy(a, r); });
    b.cpu->release(m);
    b.gpu->release(mg);
  }
  // A view starting one element in (2 bytes): not 16-byte aligned, the generic kernel.
  const Pair x = random_pair(b, 4, 64, dt, 8, 1.0f);  // pad > 0: starts at column 1
  Pair out = out_pair(b, 4, 64, dt, 0);
  const uint64_t before = fwd::elementwise_bf16x8_launches();
  b.gpu->activation(Activation::Relu, x.g, out.g);
  CHECK(fwd::elementwise_bf16x8_launches() == before);
  b.cpu->activation(Activation::Relu, x.c, out.c);
  CHECK(mismatches(b, out) == 0);
}

TEST_CASE("cuda ops: a view's digest on the device equals the host digest of its bytes") {
  Both b;
  // Dense and aligned bf16 (the 16-byte kernel), strided and misaligned views, odd element counts
  // (a last half word), every dtype; NaN, Inf, zeros and subnormals among the values.
  for (DType dt : {DType::BF16, DType::F16, DType::F32})
    for (int64_t pad : {0, 3})
      for (const auto& [rows, cols] : {std::pair<int64_t, int64_t>{1, 1}, {3, 5}, {17, 64}, {129, 333}}) {
        const Pair p = random_pair(b, rows, cols, dt, pad);
        const auto host = fetch(*b.gpu, p.g);
        const LayerDigest want = host_digest(host.data(), static_cast<uint64_t>(rows * cols), dt);
        LayerDigest got;
        REQUIRE(b.gpu->digest(p.g, &got.hash, &got.nonfinite));
        INFO(dn(dt) << " [" << rows << ", " << cols << "] pad " << pad);
        CHECK(got.hash == want.hash);
        CHECK(got.nonfinite == want.nonfinite);
      }
}

TEST_CASE("cuda ops: embedding equals the CPU backend's bits") {
  Both b;
  const int64_t vocab = 53, dim = 97, n = 41;
  for (DType dt : kDtypes) {
    PlainWeight table = plain_weight(b, vocab, dim, DType::BF16, 1.0f);
    for (DType id_dt : {DType::I64, DType::I32}) {
      std::vector<uint8_t> ids(static_cast<size_t>(n) * dtype_size(id_dt));
      std::uniform_int_distribution<int64_t> pick(0, vocab - 1);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t id = pick(b.rng);
        if (id_dt == DType::I64) {
          std::memcpy(ids.data() + 8 * i, &id, 8);
        } else {
          const int32_t v = static_cast<int32_t>(id);
          std::memcpy(ids.data() + 4 * i, &v, 4);
        }
      }
      Mat ic = b.cpu->alloc(n, 1, id_dt), ig = b.gpu->alloc(n, 1, id_dt);
      b.cpu->upload(ids.data(), ic);
      b.gpu->upload(ids.data(), ig);
      Pair out = out_pair(b, n, dim, dt, 3);
      b.cpu->embedding(ic, table.pc, out.c);
      b.gpu->embedding(ig, table.pg, out.g);
      const size_t bad = mismatches(b, out);
      report(id_dt == DType::I64 ? "embedding I64 ids" : "embedding I32 ids", dt, bad,
             static_cast<size_t>(n * dim));
      CHECK(bad == 0);
    }
  }
}

// Strided views at column 1 take the generic path; dense bf16 views whose width is a multiple of 8
// (aligned) the 8-wide one (16-byte loads and stores), which must run and give the same bits.
TEST_CASE("cuda ops: norms equal the CPU backend's bits") {
  Both b;
  const int64_t rows = 29;
  for (DType dt : kDtypes) {
    for (int64_t cols : {int64_t{192}, int64_t{3071}, int64_t{3072}}) {
      for (bool aligned : {false, true}) {
        if (aligned && cols % 8 != 0) continue;
        CAPTURE(aligned);
        const auto pad = [&](int64_t p) { return aligned ? int64_t{0} : p; };
        const bool wide = aligned && dt == DType::BF16;
        const uint64_t launches = fwd::elementwise_bf16x8_launches();
        const size_t n = static_cast<size_t>(rows * cols);
        for (RmsRounding rr : {RmsRounding::Once, RmsRounding::Twice}) {
          for (int64_t hd : {int64_t{0}, int64_t{64}}) {
            if (hd > 0 && cols % hd != 0) continue;
            PlainWeight w = plain_weight(b, 1, hd > 0 ? hd : cols, dt, 1.0f);
            Pair x = random_pair(b, rows, cols, dt, pad(3), 2.0f);
            Pair out = out_pair(b, rows, cols, dt, pad(2));
            b.cpu->rms_norm(x.c, w.pc, 1e-6f, rr, hd, out.c);
            b.gpu->rms_norm(x.g, w.pg, 1e-6f, rr, hd, out.g);
            const size_t bad = mismatches(b, out, true);
            const std::string name = std::string("rms_norm ") + (rr == RmsRounding::Once ? "Once" : "Twice") +
                                     (hd > 0 ? " per-head" : "") + " cols " + std::to_string(cols);
            report((name + (aligned ? " aligned" : "")).c_str(), dt, bad, n);
            CHECK(bad == 0);
            // In place.
            b.cpu->rms_norm(x.c, w.pc, 1e-6f, rr, hd, x.c);
            b.gpu->rms_norm(x.g, w.pg, 1e-6f, rr, hd, x.g);
            CHECK(mismatches(b, x, true) == 0);
          }
        }
        for (bool affine : {false, true}) {
          PlainWeight w = plain_weight(b, 1, cols, DType::F32, 1.0f);
          PlainWeight bias = plain_weight(b, 1, cols, DType::F32, 1.0f);
          Pair x = random_pair(b, rows, cols, dt, pad(1), 2.0f);
          Pair out = out_pair(b, rows, cols, dt, 0);
          b.cpu->layer_norm(x.c, affine ? &w.pc : nullptr, affine ? &bias.pc : nullptr, 1e-5f, out.c);
          b.gpu->layer_norm(x.g, affine ? &w.pg : nullptr, affine ? &bias.pg : nullptr, 1e-5f, out.g);
          const size_t bad = mismatches(b, out, true);
          report((std::string("layer_norm") + (affine ? " affine" : " no affine") + " cols " +
                  std::to_string(cols))
                     .c_str(),
                 dt, bad, n);
          CHECK(bad == 0);
        }
        for (int64_t bt : {int64_t{1}, int64_t{29}}) {
          Pair x = random_pair(b, rows, cols, dt, pad(2), 2.0f, false);
          Pair shift = random_pair(b, bt, cols, dt, pad(1), 1.0f, false);
          Pair scale = random_pair(b, bt, cols, dt, 0, 1.0f, false);
          Pair out = out_pair(b, rows, cols, dt, pad(1));
          b.cpu->modulate(x.c, shift.c, scale.c, bt, 1e-6f, out.c);
          b.gpu->modulate(x.g, shift.g, scale.g, bt, 1e-6f, out.g);
          const size_t bad = mismatches(b, out, true);
          report(
              (std::string("modulate batch ") + std::to_string(bt) + " cols " + std::to_string(cols)).c_str(),
              dt, bad, n);
          CHECK(bad == 0);
        }
        // Every norm above (4 rms_norm cases and their in-place runs, 2 layer norms, 2 modulations)
        // took the 8-wide path, or none did.
        const uint64_t took = fwd::elementwise_bf16x8_launches() - launches;
        CHECK(took == (wide ? uint64_t{(cols % 64 == 0 ? 8u : 4u) + 4u} : uint64_t{0}));
      }
    }
  }
}

TEST_CASE("cuda ops: rope equals the CPU backend's bits") {
  Both b;
  const int64_t rows = 23;
  for (DType dt : kDtypes) {
    for (int64_t hd : {int64_t{64}, int64_t{22}}) {
      const int64_t cols = 3 * hd;
      for (RopeStyle st : {RopeStyle::Adjacent, RopeStyle::Halves}) {
        const DType tdt = st == RopeStyle::Adjacent ? DType::F32 : dt;
        Pair cs = random_pair(b, rows, hd, tdt, 0, 1.0f, false);
        Pair sn = random_pair(b, rows, hd, tdt, 1, 1.0f, false);
        Pair x = random_pair(b, rows, cols, dt, 4, 2.0f);
        Pair out = out_pair(b, rows, cols, dt, 2);
        b.cpu->rope(st, x.c, hd, cs.c, sn.c, out.c);
        b.gpu->rope(st, x.g, hd, cs.g, sn.g, out.g);
        size_t bad = mismatches(b, out, true);
        const std::string name = std::string("rope ") + (st == RopeStyle::Adjacent ? "Adjacent" : "Halves") +
                                 " hd " + std::to_string(hd);
        report(name.c_str(), dt, bad, static_cast<size_t>(rows * cols));
        CHECK(bad == 0);
        b.cpu->rope(st, x.c, hd, cs.c, sn.c, x.c);
        b.gpu->rope(st, x.g, hd, cs.g, sn.g, x.g);
        bad = mismatches(b, x, true);
        CHECK(bad == 0);
      }
    }
  }
}

// Bias: none, F32 (an fp32 accumulator, the bias added by our kernel), or in the activation dtype
// (cuBLASLt's epilogue; with cuBLAS, broadcast into the output and added with beta = 1), aligned or
// at an odd element (cuBLASLt picks kernels by the bias's alignment).
TEST_CASE(
    "cuda ops: linear through cuBLASLt and through cuBLAS, aligned or not, within one rounding of the CPU") {
  Both b;
  CudaOpsConfig cfg;
  cfg.activation_bytes = uint64_t{64} << 20;
  cfg.cublaslt = false;
  auto cublas_ops = make_cuda_ops(0, b.stream.get(), cfg);
  for (DType dt : {DType::BF16, DType::F16, DType::F32}) {
    for (int64_t in : {int64_t{203}, int64_t{256}}) {
      for (int64_t tokens : {int64_t{1}, int64_t{37}, int64_t{300}}) {
        for (int bias_kind : {0, 1, 2, 3}) {
          const int64_t out_f = 77;
          PlainWeight w = plain_weight(b, out_f, in, dt, 0.1f);
          // bias_kind 3: the bias one element into a row (2- or 4-byte aligned).
          Pair braw = random_pair(b, 1, out_f + 1, bias_kind == 1 ? DType::F32 : dt, 0, 1.0f, false);
          DequantParams bias_c, bias_g;
          for (auto* d : {&bias_c, &bias_g}) {
            d->kind = bias_kind == 1 || dt == DType::F32 ? WeightKind::F32
                      : dt == DType::BF16                ? WeightKind::Bf16
                                                         : WeightKind::F16;
            d->rows = 1;
            d->cols = static_cast<uint64_t>(out_f);
          }
          const size_t off = bias_kind == 3 ? dtype_size(braw.c.dtype) : 0;
          bias_c.weight = static_cast<const uint8_t*>(braw.c.data) + off;
          bias_g.weight = static_cast<const uint8_t*>(braw.g.data) + off;
          const bool with_bias = bias_kind != 0;
          Pair x = random_pair(b, tokens, in, dt, 3, 1.0f, false);
          Pair out = out_pair(b, tokens, out_f, dt, 5);
          Pair out2 = out_pair(b, tokens, out_f, dt, 0);
          b.cpu->linear(x.c, w.pc, with_bias ? &bias_c : nullptr, out.c);
          b.cpu->linear(x.c, w.pc, with_bias ? &bias_c : nullptr, out2.c);
          b.gpu->linear(x.g, w.pg, with_bias ? &bias_g : nullptr, out.g);
          cublas_ops->linear(x.g, w.pg, with_bias ? &bias_g : nullptr, out2.g);
          const float rel = dt == DType::BF16 ? 1.0f / 128 : dt == DType::F16 ? 1.0f / 1024 : 1e-5f;
          double e1 = 0.0, e2 = 0.0;
          const size_t bad1 = beyond_tolerance(b, out, rel, 1e-4f, &e1);
          const size_t bad2 = beyond_tolerance(b, out2, rel, 1e-4f, &e2);
          std::printf(
              "  linear %-4s in %lld tokens %lld bias %d: cuBLASLt %zu beyond (max %.3g), cuBLAS %zu (max "
              "%.3g)\n",
              dn(dt).c_str(), static_cast<long long>(in), static_cast<long long>(tokens), bias_kind, bad1, e1,
              bad2, e2);
          CHECK(bad1 == 0);
          CHECK(bad2 == 0);
        }
      }
    }
  }
}

// linear_act(GeluTanh) takes cuBLASLt's GELU epilogue: one rounding of GELU(sums + bias) where the
// CPU rounds the linear, then the GELU. One-hot inputs make the sums exact (each output is one
// weight, a bf16/f16 value in [-6, 6]) and the bias is zero, so both compute GELU-tanh of the same
// value. cuBLASLt evaluates it with fast intrinsics: on an H100 about a fifth of the outputs are an
// ulp or two from the CPU's (bf16; f16 has 3 more bits: up to 4 of its ulps), and values below
// about 1e-6 in magnitude (x < -5) come out as 0. Within two bf16 ulps (f16: 2^-8) relative plus
// 2^-14 it must be the tanh form (the erf form is 4.1e-4 off at -3: 10 %). Random
// inputs: within one rounding of the pre-activation (GELU's slope is at most 1.13) of the CPU's.
TEST_CASE("cuda ops: linear_act's GELU-tanh in cuBLASLt's epilogue against the CPU's linear + GELU") {
  Both b;
  for (DType dt : kDtypes) {
    const float ulp = dt == DType::BF16 ? 1.0f / 128 : 1.0f / 1024;
    {
      const int64_t n = 96;
      std::vector<uint8_t> xh(static_cast<size_t>(n * n) * 2, 0), wh(static_cast<size_t>(n * n) * 2);
      for (int64_t t = 0; t < n; ++t) put(dt, xh, static_cast<size_t>(t * n + t), 1.0f);
      std::uniform_real_distribution<float> u(-6.0f, 6.0f);
      for (size_t i = 0; i < static_cast<size_t>(n * n); ++i) put(dt, wh, i, u(b.rng));
      PlainWeight w = plain_weight(b, n, n, dt, 1.0f);
      b.cpu->upload(wh.data(), w.c);
      b.gpu->upload(wh.data(), w.g);
      PlainWeight zero = plain_weight(b, 1, n, dt, 1.0f);
      const std::vector<uint8_t> zh(static_cast<size_t>(n) * 2, 0);
      b.cpu->upload(zh.data(), zero.c);
      b.gpu->upload(zh.data(), zero.g);
      Pair x = out_pair(b, n, n, dt, 0);
      b.cpu->upload(xh.data(), x.c);
      b.gpu->upload(xh.data(), x.g);
      Pair out = out_pair(b, n, n, dt, 0);
      const uint64_t fused0 = rc::lt_fused_activations();
      b.cpu->linear_act(Activation::GeluTanh, x.c, w.pc, &zero.pc, out.c);
      b.gpu->linear_act(Activation::GeluTanh, x.g, w.pg, &zero.pg, out.g);
      CHECK(rc::lt_fused_activations() == fused0 + 1);  // the epilogue, not the fallback, ran
      double max_err = 0.0;
      const size_t bad =
          beyond_tolerance(b, out, dt == DType::BF16 ? 2 * ulp : 1.0f / 256, 0x1p-14f, &max_err);
      const size_t differ = mismatches(b, out);
      std::printf(
          "  linear_act gelu %-4s one-hot: %zu beyond tolerance, %zu of %lld differ, max |diff| %.3g\n",
          dn(dt).c_str(), bad, differ, static_cast<long long>(n * n), max_err);
      CHECK(bad == 0);
    }
    for (int64_t tokens : {int64_t{1}, int64_t{300}}) {
      const int64_t in = 256, out_f = 136;
      PlainWeight w = plain_weight(b, out_f, in, dt, 0.15f);
      PlainWeight bias = plain_weight(b, 1, out_f, dt, 1.0f);
      Pair x = random_pair(b, tokens, in, dt, 0, 1.0f, false);
      Pair pre = out_pair(b, tokens, out_f, dt, 0);
      Pair out = out_pair(b, tokens, out_f, dt, 0);
      b.cpu->linear(x.c, w.pc, &bias.pc, pre.c);
      b.cpu->linear_act(Activation::GeluTanh, x.c, w.pc, &bias.pc, out.c);
      b.gpu->linear_act(Activation::GeluTanh, x.g, w.pg, &bias.pg, out.g);
      const auto hp = fetch(*b.cpu, pre.c), hc = fetch(*b.cpu, out.c), hg = fetch(*b.gpu, out.g);
      size_t bad = 0;
      for (size_t i = 0; i < static_cast<size_t>(tokens * out_f); ++i) {
        const float p = get(dt, hp, i), c = get(dt, hc, i), g = get(dt, hg, i);
        const float tol = ulp * (std::fabs(c) + 1.2f * std::fabs(p)) + 1e-4f;
        if (!(std::fabs(c - g) <= tol) && ++bad <= 3)
          std::printf("    element %zu: pre %.6g, cpu %.6g, gpu %.6g\n", i, static_cast<double>(p),
                      static_cast<double>(c), static_cast<double>(g));
      }
      std::printf("  linear_act gelu %-4s tokens %lld: %zu beyond one rounding of the pre-activation\n",
                  dn(dt).c_str(), static_cast<long long>(tokens), bad);
      CHECK(bad == 0);
    }
  }
}

// Random bytes [n] (U8) on both backends.
Pair random_bytes(Both& b, int64_t n) {
  std::vector<uint8_t> host(static_cast<size_t>(n));
  for (auto& v : host) v = static_cast<uint8_t>(b.rng());
  Mat c = b.cpu->alloc(1, n, DType::U8), g = b.gpu->alloc(1, n, DType::U8);
  b.cpu->upload(host.data(), c);
  b.gpu->upload(host.data(), g);
  return {c, g};
}

TEST_CASE("cuda ops: linear with int8 and nf4 weights within one rounding of the CPU backend") {
  Both b;
  const int64_t in = 192, out_f = 77;
  for (DType dt : {DType::BF16, DType::F16, DType::F32}) {
    for (WeightKind kind : {WeightKind::Int8, WeightKind::Nf4}) {
      const bool nf4 = kind == WeightKind::Nf4;
      Pair codes = random_bytes(b, nf4 ? out_f * in / 2 : out_f * in);
      const int64_t n_scales = nf4 ? out_f * in / 64 : out_f;
      Pair scales = random_pair(b, 1, n_scales, DType::F32, 0, 0.05f, false);
      DequantParams pc, pg;
      for (auto* d : {&pc, &pg}) {
        d->kind = kind;
        d->rows = static_cast<uint64_t>(out_f);
        d->cols = static_cast<uint64_t>(in);
        d->blocksize = 64;
      }
      pc.weight = static_cast<const uint8_t*>(codes.c.data);
      pg.weight = static_cast<const uint8_t*>(codes.g.data);
      pc.scale = static_cast<const uint8_t*>(scales.c.data);
      pg.scale = static_cast<const uint8_t*>(scales.g.data);
      Pair x = random_pair(b, 29, in, dt, 2, 1.0f, false);
      Pair out = out_pair(b, 29, out_f, dt, 1);
      b.cpu->linear(x.c, pc, nullptr, out.c);
      b.gpu->linear(x.g, pg, nullptr, out.g);
      const float rel = dt == DType::BF16 ? 1.0f / 128 : dt == DType::F16 ? 1.0f / 1024 : 1e-5f;
      double max_err = 0.0;
      const size_t bad = beyond_tolerance(b, out, rel, 1e-4f, &max_err);
      std::printf("  linear %-4s %s weight: %zu beyond tolerance, %zu bits differ, max |diff| %.3g\n",
                  dn(dt).c_str(), nf4 ? "nf4" : "int8", bad, mismatches(b, out), max_err);
      CHECK(bad == 0);
    }
  }
}

TEST_CASE("cuda ops: attention within tolerance of the CPU backend") {
  Both b;
  for (DType dt : kDtypes) {
    for (int64_t hd : {int64_t{64}, int64_t{128}, int64_t{80}, int64_t{256}}) {
      for (int variant = 0; variant < 4; ++variant) {
        const bool causal = variant == 1;
        const bool with_bias = variant == 2;
        const bool with_mask = variant == 3;
        AttentionShape s;
        s.batch = 2;
        s.q_len = 37;
        s.kv_len = causal ? 37 : 45;
        s.heads = 4;
        s.kv_heads = 2;
        s.head_dim = hd;
        s.scale = 1.0f / std::sqrt(static_cast<float>(hd));
        s.causal = causal;
        const size_t m = b.cpu->mark(), mg = b.gpu->mark();
        Pair q = random_pair(b, s.batch * s.q_len, s.heads * hd, dt, 3, 1.0f, false);
        Pair k = random_pair(b, s.batch * s.kv_len, s.kv_heads * hd, dt, 0, 1.0f, false);
        Pair v = random_pair(b, s.batch * s.kv_len, s.kv_heads * hd, dt, 5, 1.0f, false);
        Pair out = out_pair(b, s.batch * s.q_len, s.heads * hd, dt, 1);
        Pair bias = random_pair(b, s.heads * s.q_len, s.kv_len, DType::F32, 0, 1.0f, false);
        std::vector<int64_t> keep(static_cast<size_t>(s.batch * s.kv_len), 1);
        for (int64_t u = 0; u < s.kv_len; u += 3) keep[static_cast<size_t>(u)] = 0;
        for (int64_t u = 0; u < s.kv_len; ++u)
          keep[static_cast<size_t>(s.kv_len + u)] = 0;  // fully masked sample
        Mat mc = b.cpu->alloc(s.batch, s.kv_len, DType::I64),
            mgm = b.gpu->alloc(s.batch, s.kv_len, DType::I64);
        b.cpu->upload(keep.data(), mc);
        b.gpu->upload(keep.data(), mgm);
        AttentionShape sc = s, sg = s;
        if (with_bias) {
          sc.bias = &bias.c;
          sg.bias = &bias.g;
        }
        if (with_mask) {
          sc.key_mask = &mc;
          sg.key_mask = &mgm;
        }
        b.cpu->attention(q.c, k.c, v.c, sc, out.c);
        b.gpu->attention(q.g, k.g, v.g, sg, out.g);
        // float32 everywhere, summation orders differ: within two roundings of the dtype.
        const float rel = dt == DType::BF16 ? 1.0f / 64 : 1.0f / 512;
        double max_err = 0.0;
        const size_t bad = beyond_tolerance(b, out, rel, 2e-3f, &max_err);
        std::printf(
            "  attention %-4s hd %3lld %-6s: %zu beyond tolerance, %zu bits differ, max |diff| %.3g\n",
            dn(dt).c_str(), static_cast<long long>(hd),
            causal      ? "causal"
            : with_bias ? "bias"
            : with_mask ? "mask"
                        : "plain",
            bad, mismatches(b, out), max_err);
        CHECK(bad == 0);
        b.cpu->release(m);
        b.gpu->release(mg);
      }
    }
  }
}

// --- the tensor-core attention (attention_mma.cu) -----------------------------------------------

// A [rows, cols] view at column 8 of a [rows, cols + 16] buffer on both backends (strided, its
// rows 16-byte aligned: the layout the tensor-core kernel takes), holding `host` (rows * cols
// floats, rounded to dt).
Pair aligned_pair(Both& b, const std::vector<float>& host, int64_t rows, int64_t cols, DType dt) {
  const int64_t ld = cols + 16;
  std::vector<uint8_t> bytes(static_cast<size_t>(rows * ld) * dtype_size(dt), 0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c)
      put(dt, bytes, static_cast<size_t>(r * ld + 8 + c), host[r * cols + c]);
  Mat c = b.cpu->alloc(rows, ld, dt), g = b.gpu->alloc(rows, ld, dt);
  b.cpu->upload(bytes.data(), c);
  b.gpu->upload(bytes.data(), g);
  return {c.cols_view(8, cols), g.cols_view(8, cols)};
}

std::vector<float> normal_floats(Both& b, int64_t n, float stddev) {
  std::normal_distribution<float> nd(0.0f, stddev);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = nd(b.rng);
  return v;
}

struct AttnStats {
  double max_abs = 0.0;     // over elements where neither is NaN
  double rel_rms = 0.0;     // sqrt(sum (x - ref)^2 / sum ref^2) over the same elements
  size_t nan_mismatch = 0;  // one NaN, the other not
  size_t beyond = 0;        // |x - ref| > rel * (|ref| + w) + 1e-6
};

// x against ref; w: the CPU's attention with |V| (sum p|v| / l, what the rounding of P scales with).
AttnStats compare_attn(DType dt, const std::vector<uint8_t>& x, const std::vector<uint8_t>& ref,
                       const std::vector<uint8_t>& w, float rel) {
  AttnStats st;
  double num = 0.0, den = 0.0;
  for (size_t i = 0; i < x.size() / dtype_size(dt); ++i) {
    const float a = get(dt, x, i), r = get(dt, ref, i);
    if (std::isnan(a) || std::isnan(r)) {
      st.nan_mismatch += std::isnan(a) != std::isnan(r);
      continue;
    }
    if (a == r) {  // equal infinities too
      if (std::isfinite(r)) den += static_cast<double>(r) * r;
      continue;
    }
    const double e = std::fabs(static_cast<double>(a) - r);
    st.max_abs = std::max(st.max_abs, e);
    num += e * e;
    den += static_cast<double>(r) * r;
    const float wi = get(dt, w, i);
    if (!(e <= rel * (std::fabs(r) + (std::isnan(wi) ? 0.0f : wi)) + 1e-6)) ++st.beyond;
  }
  st.rel_rms = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
  return st;
}

struct AttnCase {
  const char* name;
  int64_t batch, q_len, kv_len, heads, kv_heads, hd;
  bool causal;
  float scale;  // 0: 1/sqrt(hd)
  DType dt = DType::BF16;
  bool bias = false, mask = false;
  float qk_std = 1.0f;  // 30: logits of about 1e4
  int special = 0;      // 1: a NaN in q and an Inf in k; 2: a bias row of -inf (a row with no finite score)
};

// A case's shape and its inputs on both backends: q, k, v and |v| (whose output bounds the error).
struct AttnInputs {
  AttentionShape s;
  int64_t qrows, kvrows, qcols, kvcols;
  Pair q, k, v, va;
};

AttnInputs attn_inputs(Both& b, const AttnCase& c) {
  AttnInputs in;
  const float scale = c.scale > 0 ? c.scale : 1.0f / std::sqrt(static_cast<float>(c.hd));
  in.s = AttentionShape{c.batch, c.q_len, c.kv_len, c.heads, c.kv_heads, c.hd, scale, c.causal};
  in.qrows = c.batch * c.q_len;
  in.kvrows = c.batch * c.kv_len;
  in.qcols = c.heads * c.hd;
  in.kvcols = c.kv_heads * c.hd;
  std::vector<float> hq = normal_floats(b, in.qrows * in.qcols, c.qk_std);
  std::vector<float> hk = normal_floats(b, in.kvrows * in.kvcols, c.qk_std);
  std::vector<float> hv = normal_floats(b, in.kvrows * in.kvcols, 1.0f);
  if (c.special == 1) {
    hq[static_cast<size_t>(3 * in.qcols + 5)] = NAN;               // row 3, head 0: NaN
    hk[static_cast<size_t>(7 * in.kvcols + c.hd + 2)] = INFINITY;  // key 7, kv head 1: +-Inf scores
  }
  std::vector<float> hv_abs(hv.size());
  for (size_t i = 0; i < hv.size(); ++i) hv_abs[i] = std::fabs(hv[i]);
  in.q = aligned_pair(b, hq, in.qrows, in.qcols, c.dt);
  in.k = aligned_pair(b, hk, in.kvrows, in.kvcols, c.dt);
  in.v = aligned_pair(b, hv, in.kvrows, in.kvcols, c.dt);
  in.va = aligned_pair(b, hv_abs, in.kvrows, in.kvcols, c.dt);
  return in;
}

TEST_CASE("cuda ops: tensor-core attention against the CPU backend and the CUDA-core kernel") {
  Both b;
  ImplScope own(rc::AttentionImpl::Own);  // Ops::attention below is our kernel, not cuDNN's
  // Fallback rule: head dims other than 64/128, float32, and rows that are not 16-byte aligned go to
  // the CUDA-core kernel (the other attention test covers those against the CPU).
  {
    Mat q = b.gpu->alloc(8, 2 * 128, DType::BF16), k = b.gpu->alloc(8, 2 * 128, DType::BF16);
    AttentionShape s;
    s.q_len = s.kv_len = 8;
    s.heads = s.kv_heads = 2;
    s.head_dim = 128;
    CHECK(fwd::attention_mma_supported(fwd::attention_args(q, k, k, s, q)));
    CHECK_FALSE(fwd::attention_mma_supported(fwd::attention_args(q.cols_view(1, 255), k, k, s, q)));
    Mat q80 = b.gpu->alloc(8, 2 * 80, DType::BF16);
    s.head_dim = 80;
    CHECK_FALSE(fwd::attention_mma_supported(fwd::attention_args(q80, q80, q80, s, q80)));
    Mat f = b.gpu->alloc(8, 2 * 64, DType::F32);
    s.head_dim = 64;
    CHECK_FALSE(fwd::attention_mma_supported(fwd::attention_args(f, f, f, s, f)));
  }
  const AttnCase cases[] = {
      {"T 1", 1, 1, 1, 2, 2, 64, false, 0},
      {"T 1 causal", 1, 1, 1, 2, 2, 128, true, 0},
      {"T 17 causal GQA 4", 2, 17, 17, 8, 2, 64, true, 0},
      {"T 63", 1, 63, 63, 3, 3, 128, false, 0},
      {"T 65 causal GQA 4", 1, 65, 65, 4, 1, 128, true, 0},
      {"T 200 causal GQA 2", 1, 200, 200, 6, 3, 64, true, 0},
      {"q 17 kv 200", 2, 17, 200, 4, 4, 128, false, 0},
      {"q 200 kv 65 scale 1 GQA 2", 1, 200, 65, 2, 1, 64, false, 1.0f},
      {"T 4608 (4096+512), 2 heads", 1, 4608, 4608, 2, 2, 128, false, 0},
      {"T 4097 causal GQA 4", 1, 4097, 4097, 4, 1, 128, true, 0},
      {"T5-like T 77 scale 1 bias mask", 2, 77, 77, 4, 4, 64, false, 1.0f, DType::BF16, true, true},
      {"CLIP-like T 77 causal mask", 2, 77, 77, 4, 4, 64, true, 0, DType::BF16, false, true},
      {"T 130 causal bias", 1, 130, 130, 2, 2, 128, true, 0, DType::BF16, true},
      {"f16 T 200 causal GQA 4", 1, 200, 200, 4, 1, 128, true, 0, DType::F16},
      {"f16 T 65 scale 1 bias mask", 2, 65, 65, 2, 2, 64, false, 1.0f, DType::F16, true, true},
      {"logits ~1e4 T 300", 1, 300, 300, 2, 2, 128, false, 1.0f, DType::BF16, false, false, 30.0f},
      {"logits ~1e4 T 129 causal", 1, 129, 129, 2, 1, 64, true, 1.0f, DType::BF16, false, false, 30.0f},
      {"NaN in q, Inf in k, causal", 1, 70, 70, 2, 2, 128, true, 0, DType::BF16, false, false, 1.0f, 1},
      {"bias row of -inf", 1, 33, 90, 2, 2, 64, false, 0, DType::BF16, true, false, 1.0f, 2},
  };
  for (const AttnCase& c : cases) {
    CAPTURE(c.name);
    const size_t mc = b.cpu->mark(), mg = b.gpu->mark();
    const AttnInputs in = attn_inputs(b, c);
    const AttentionShape& s = in.s;
    const int64_t qrows = in.qrows, qcols = in.qcols;
    const Pair &q = in.q, &k = in.k, &v = in.v, &va = in.va;
    std::vector<float> hbias;
    if (c.bias) {
      hbias = normal_floats(b, c.heads * c.q_len * c.kv_len, 2.0f);
      if (c.special == 2)
        for (int64_t u = 0; u < c.kv_len; ++u)
          hbias[static_cast<size_t>((c.q_len + 4) * c.kv_len + u)] = -INFINITY;
    }
    Pair bias = c.bias ? aligned_pair(b, hbias, c.heads * c.q_len, c.kv_len, DType::F32) : Pair{};
    std::vector<int64_t> keep(static_cast<size_t>(c.batch * c.kv_len), 1);
    for (int64_t u = 1; u < c.kv_len; u += 3) keep[static_cast<size_t>(u)] = 0;
    if (c.batch > 1)
      for (int64_t u = 0; u < c.kv_len; ++u)
        keep[static_cast<size_t>(c.kv_len + u)] = 0;  // fully masked sample
    Mat mask_c = b.cpu->alloc(c.batch, c.kv_len, DType::I64),
        mask_g = b.gpu->alloc(c.batch, c.kv_len, DType::I64);
    b.cpu->upload(keep.data(), mask_c);
    b.gpu->upload(keep.data(), mask_g);
    AttentionShape sc = s, sg = s;
    if (c.bias) {
      sc.bias = &bias.c;
      sg.bias = &bias.g;
    }
    if (c.mask) {
      sc.key_mask = &mask_c;
      sg.key_mask = &mask_g;
    }
    Pair out = out_pair(b, qrows, qcols, c.dt, 8);
    Pair w = out_pair(b, qrows, qcols, c.dt, 0);
    Mat out_simt = b.gpu->alloc(qrows, qcols, c.dt), out_w4 = b.gpu->alloc(qrows, qcols, c.dt);
    b.cpu->attention(q.c, k.c, v.c, sc, out.c);
    b.cpu->attention(q.c, k.c, va.c, sc, w.c);
    const fwd::AttnArgs args = fwd::attention_args(q.g, k.g, v.g, sg, out.g);
    REQUIRE(fwd::attention_mma_supported(args));
    b.gpu->attention(q.g, k.g, v.g, sg, out.g);  // the tensor-core kernel, 8 warps
    fwd::AttnArgs a4 = args, as = args;
    a4.out = fwd::view(out_w4);
    as.out = fwd::view(out_simt);
    fwd::launch_attention_mma(a4, b.stream.get(), 4);
    fwd::launch_attention_simt(as, b.stream.get());
    const auto h_cpu = fetch(*b.cpu, out.c), h_w = fetch(*b.cpu, w.c);
    const auto h_mma = fetch(*b.gpu, out.g), h_w4 = fetch(*b.gpu, out_w4), h_simt = fetch(*b.gpu, out_simt);
    const float rel = c.dt == DType::BF16 ? 1.0f / 64 : 1.0f / 256;
    const AttnStats st = compare_attn(c.dt, h_mma, h_cpu, h_w, rel);
    const AttnStats ss = compare_attn(c.dt, h_simt, h_cpu, h_w, rel);
    const AttnStats sm = compare_attn(c.dt, h_mma, h_simt, h_w, rel);
    std::printf(
        "  attention mma %-4s hd %3lld %-32s: vs cpu max|d| %.3g rel rms %.3g (%zu beyond, %zu NaN differ) | "
        "simt vs cpu max|d| %.3g rel rms %.3g | mma vs simt max|d| %.3g | 4 warps == 8 warps: %s\n",
        dn(c.dt).c_str(), static_cast<long long>(c.hd), c.name, st.max_abs, st.rel_rms, st.beyond,
        st.nan_mismatch, ss.max_abs, ss.rel_rms, sm.max_abs, h_mma == h_w4 ? "yes" : "NO");
    CHECK(st.beyond == 0);
    CHECK(st.nan_mismatch == 0);
    CHECK(st.rel_rms <= (c.dt == DType::BF16 ? 8e-3 : 2e-3));
    CHECK(sm.nan_mismatch == 0);
    CHECK(h_mma == h_w4);  // a row's arithmetic does not depend on the block's height
    if (c.special == 1) {
      // Row 3 of head 0 is NaN; a row whose score against key 7 is +Inf is NaN; the others finite.
      CHECK(std::isnan(get(c.dt, h_mma, static_cast<size_t>(3 * qcols))));
    }
    if (c.special == 2) CHECK(std::isnan(get(c.dt, h_mma, static_cast<size_t>(4 * qcols + c.hd))));
    b.cpu->release(mc);
    b.gpu->release(mg);
  }
}

// --- cuDNN's fused attention (attention_cudnn.cpp) ------------------------------------------------

// True when cuDNN can be loaded; else prints why and fails only under QTOOL_TEST_REQUIRE_CUDNN=1.
bool cudnn_or_skip() {
  std::string why;
  if (rc::cudnn_available(&why)) return true;
  std::printf("  cuDNN not available (%s): cuDNN attention cases skipped\n", why.c_str());
  const char* req = std::getenv("QTOOL_TEST_REQUIRE_CUDNN");
  CHECK_MESSAGE(!(req && std::strcmp(req, "1") == 0), "QTOOL_TEST_REQUIRE_CUDNN=1 but cuDNN: ", why);
  return false;
}

TEST_CASE("cuda ops: cuDNN attention against the CPU backend") {
  if (!cudnn_or_skip()) return;
  std::printf("  %s\n", rc::cudnn_description().c_str());
  Both b;
  ImplScope forced(rc::AttentionImpl::Cudnn);
  const AttnCase cases[] = {
      {"T 1", 1, 1, 1, 2, 2, 64, false, 0},
      {"T 1 causal", 1, 1, 1, 2, 2, 128, true, 0},
      {"q 1 kv 333 GQA 4", 2, 1, 333, 4, 1, 128, false, 0},
      {"T 77", 2, 77, 77, 4, 4, 64, false, 0},
      {"T 77 causal GQA 4", 2, 77, 77, 8, 2, 128, true, 0},
      {"f16 T 77 causal", 1, 77, 77, 4, 4, 64, true, 0, DType::F16},
      {"T 333 causal GQA 4", 1, 333, 333, 8, 2, 128, true, 0},
      {"f16 T 333 GQA 4", 1, 333, 333, 8, 2, 64, false, 0, DType::F16},
      {"q 77 kv 333 scale 1", 2, 77, 333, 2, 2, 128, false, 1.0f},
      {"Flux-like T 1152 (1024+128), 3 heads", 1, 1152, 1152, 3, 3, 128, false, 0},
      {"f16 Flux-like T 1152, 3 heads", 1, 1152, 1152, 3, 3, 128, false, 0, DType::F16},
      {"Llama-like T 1024 causal 8/2", 1, 1024, 1024, 8, 2, 128, true, 0},
      {"f16 Llama-like T 1024 causal 8/2 hd 64", 1, 1024, 1024, 8, 2, 64, true, 0, DType::F16},
      {"logits ~1e4 T 300", 1, 300, 300, 2, 2, 128, false, 1.0f, DType::BF16, false, false, 30.0f},
      {"logits ~1e4 T 129 causal GQA 2", 1, 129, 129, 2, 1, 64, true, 1.0f, DType::BF16, false, false, 30.0f},
  };
  for (const AttnCase& c : cases) {
    CAPTURE(c.name);
    const size_t mc = b.cpu->mark(), mg = b.gpu->mark();
    const AttnInputs in = attn_inputs(b, c);
    const AttentionShape& s = in.s;
    const int64_t qrows = in.qrows, qcols = in.qcols;
    const Pair &q = in.q, &k = in.k, &v = in.v, &va = in.va;
    Pair out = out_pair(b, qrows, qcols, c.dt, 8);
    Pair w = out_pair(b, qrows, qcols, c.dt, 0);
    Mat out2 = b.gpu->alloc(qrows, qcols, c.dt), out_mma = b.gpu->alloc(qrows, qcols, c.dt);
    b.cpu->attention(q.c, k.c, v.c, s, out.c);
    b.cpu->attention(q.c, k.c, va.c, s, w.c);
    const fwd::AttnArgs args = fwd::attention_args(q.g, k.g, v.g, s, out.g);
    REQUIRE(rc::CudnnAttention::covers(args));
    const rc::AttentionCounts before = rc::attention_counts();
    try {
      b.gpu->attention(q.g, k.g, v.g, s, out.g);  // cuDNN (forced: Error(Unsupported) if it refuses)
      b.gpu->attention(q.g, k.g, v.g, s, out2);   // again: the cached plan
    } catch (const Error& e) {
      std::printf("  attention cudnn %-4s hd %3lld %-40s: %s\n", dn(c.dt).c_str(),
                  static_cast<long long>(c.hd), c.name, e.what());
      FAIL_CHECK(e.what());  // and on to the next case
      b.cpu->release(mc);
      b.gpu->release(mg);
      continue;
    }
    const rc::AttentionCounts after = rc::attention_counts();
    CHECK(after.cudnn == before.cudnn + 2);  // cuDNN ran, not the fallback
    CHECK(after.own == before.own);
    fwd::AttnArgs am = args;
    am.out = fwd::view(out_mma);
    fwd::launch_attention_mma(am, b.stream.get());
    const auto h_cpu = fetch(*b.cpu, out.c), h_w = fetch(*b.cpu, w.c);
    const auto h_dnn = fetch(*b.gpu, out.g), h_dnn2 = fetch(*b.gpu, out2), h_mma = fetch(*b.gpu, out_mma);
    const float rel = c.dt == DType::BF16 ? 1.0f / 64 : 1.0f / 256;
    const AttnStats st = compare_attn(c.dt, h_dnn, h_cpu, h_w, rel);
    const AttnStats sm = compare_attn(c.dt, h_mma, h_cpu, h_w, rel);
    const AttnStats sd = compare_attn(c.dt, h_dnn, h_mma, h_w, rel);
    std::printf(
        "  attention cudnn %-4s hd %3lld %-40s: vs cpu max|d| %.3g rel rms %.3g (%zu beyond, %zu NaN differ) "
        "| "
        "mma vs cpu max|d| %.3g rel rms %.3g | cudnn vs mma max|d| %.3g | deterministic: %s\n",
        dn(c.dt).c_str(), static_cast<long long>(c.hd), c.name, st.max_abs, st.rel_rms, st.beyond,
        st.nan_mismatch, sm.max_abs, sm.rel_rms, sd.max_abs, h_dnn == h_dnn2 ? "yes" : "NO");
    CHECK(st.beyond == 0);
    CHECK(st.nan_mismatch == 0);
    CHECK(st.rel_rms <= (c.dt == DType::BF16 ? 8e-3 : 2e-3));
    CHECK(h_dnn == h_dnn2);  // streamed == resident bit for bit relies on it
    b.cpu->release(mc);
    b.gpu->release(mg);
  }
}

TEST_CASE("cuda ops: which attention serves which case (QTOOL_ATTENTION, fallbacks, plan cache)") {
  if (!cudnn_or_skip()) return;
  Both b;
  AttentionShape s;
  s.batch = 1;
  s.q_len = s.kv_len = 40;
  s.heads = s.kv_heads = 2;
  s.head_dim = 64;
  s.scale = 0.125f;
  const int64_t rows = 40, cols = 128;
  std::vector<float> hx = normal_floats(b, rows * cols, 1.0f);
  Pair x = aligned_pair(b, hx, rows, cols, DType::BF16);
  Mat o = b.gpu->alloc(rows, cols, DType::BF16);
  Pair bias = random_pair(b, s.heads * s.q_len, s.kv_len, DType::F32, 0, 1.0f, false);
  Pair odd = random_pair(b, rows, cols, DType::BF16, 3, 1.0f, false);  // rows not 16-byte aligned
  const auto served = [&](rc::AttentionImpl impl, const Mat& q, const AttentionShape& sh) {
    ImplScope scope(impl);
    const rc::AttentionCounts before = rc::attention_counts();
    b.gpu->attention(q, q, q, sh, o);
    const rc::AttentionCounts after = rc::attention_counts();
    CHECK(after.own + after.cudnn == before.own + before.cudnn + 1);
    return after.cudnn > before.cudnn ? "cudnn" : "own";
  };
  CHECK(std::string(served(rc::AttentionImpl::Cudnn, x.g, s)) == "cudnn");
  CHECK(std::string(served(rc::AttentionImpl::Own, x.g, s)) == "own");
  AttentionShape with_bias = s;
  with_bias.bias = &bias.g;  // T5: always qtool's kernel, even when cuDNN is forced
  CHECK(std::string(served(rc::AttentionImpl::Cudnn, x.g, with_bias)) == "own");
  CHECK(std::string(served(rc::AttentionImpl::Cudnn, odd.g, s)) == "own");  // not covered: misaligned
  // One plan per shape, built at the first call.
  rc::CudnnAttention dnn(0, b.stream.get());
  fwd::AttnArgs a = fwd::attention_args(x.g, x.g, x.g, s, o);
  std::string why;
  const auto no_workspace = [](uint64_t) -> void* { return nullptr; };
  const bool ran1 = dnn.run(a, no_workspace, &why);
  const bool ran2 = dnn.run(a, no_workspace, &why);
  INFO(why);
  CHECK(ran1 == ran2);
  CHECK(dnn.plans_built() + dnn.shapes_refused() == 1);
  a.causal = true;
  (void)dnn.run(a, no_workspace, &why);
  CHECK(dnn.plans_built() + dnn.shapes_refused() == 2);
  QTOOL_CUDA_CHECK(cudaStreamSynchronize(b.stream.get()));
}

TEST_CASE("cuda ops: the activation stack") {
  rc::Stream stream(0);
  auto ops = make_cuda_ops(0, stream.get(), 4096);
  const size_t m0 = ops->mark();
  Mat a = ops->alloc(3, 5, DType::BF16);
  CHECK(reinterpret_cast<uintptr_t>(a.data) % 256 == 0);
  Mat c = ops->alloc(1, 1, DType::F32);
  CHECK(reinterpret_cast<uintptr_t>(c.data) % 256 == 0);
  CHECK(ops->peak_bytes() == 256 + 4);
  CHECK_THROWS_AS(ops->alloc(64, 64, DType::F32), Error);
  ops->release(m0);
  CHECK(ops->mark() == m0);
  ops->reset_peak();
  CHECK(ops->peak_bytes() == 0);
}

TEST_CASE("cuda ops: timings (attention at Flux's and Llama's shapes, a linear)") {
  rc::Stream stream(0);
  auto ops = make_cuda_ops(0, stream.get(), uint64_t{1} << 30);
  rc::Event t0(0, rc::Event::Timing::On), t1(0, rc::Event::Timing::On);
  struct Case {
    const char* name;
    int64_t heads, kv_heads, hd, t;
    bool causal;
  } cases[] = {{"Flux (H 24, hd 128, T 4608)", 24, 24, 128, 4608, false},
               {"Llama (H 32/8, hd 128, T 4096, causal)", 32, 8, 128, 4096, true}};
  for (const auto& c : cases) {
    const size_t m = ops->mark();
    Mat q = ops->alloc(c.t, c.heads * c.hd, DType::BF16);
    Mat k = ops->alloc(c.t, c.kv_heads * c.hd, DType::BF16);
    Mat v = ops->alloc(c.t, c.kv_heads * c.hd, DType::BF16);
    Mat o = ops->alloc(c.t, c.heads * c.hd, DType::BF16);
    for (Mat* x : {&q, &k, &v})
      QTOOL_CUDA_CHECK(cudaMemsetAsync(x->data, 0x3c, x->rows * x->cols * 2, stream.get()));
    AttentionShape s;
    s.q_len = s.kv_len = c.t;
    s.heads = c.heads;
    s.kv_heads = c.kv_heads;
    s.head_dim = c.hd;
    s.scale = 0.088f;
    s.causal = c.causal;
    for (const rc::AttentionImpl impl : {rc::AttentionImpl::Own, rc::AttentionImpl::Cudnn}) {
      if (impl == rc::AttentionImpl::Cudnn && !rc::cudnn_available()) continue;
      ImplScope scope(impl);
      ops->attention(q, k, v, s, o);  // warm-up (and cuDNN's plan)
      const int reps = 3;
      t0.record(stream.get());
      for (int i = 0; i < reps; ++i) ops->attention(q, k, v, s, o);
      t1.record(stream.get());
      t1.synchronize();
      const double ms = t1.elapsed_ms_since(t0) / reps;
      const double flop = 4.0 * c.heads * static_cast<double>(c.t) * c.t * c.hd * (c.causal ? 0.5 : 1.0);
      std::printf("  attention %-5s %s: %.3f ms, %.1f TFLOP/s\n", rc::attention_impl_name(impl), c.name, ms,
                  flop / ms / 1e9);
    }
    ops->release(m);
  }
  {
    const int64_t tokens = 4608, in = 3072, out_f = 12288;
    Mat x = ops->alloc(tokens, in, DType::BF16);
    Mat w = ops->alloc(out_f, in, DType::BF16);
    Mat bias = ops->alloc(1, out_f, DType::F32);
    Mat y = ops->alloc(tokens, out_f, DType::BF16);
    QTOOL_CUDA_CHECK(cudaMemsetAsync(x.data, 0x3c, x.rows * x.cols * 2, stream.get()));
    QTOOL_CUDA_CHECK(cudaMemsetAsync(w.data, 0x3c, w.rows * w.cols * 2, stream.get()));
    QTOOL_CUDA_CHECK(cudaMemsetAsync(bias.data, 0, out_f * 4, stream.get()));
    DequantParams wp, bp;
    wp.kind = WeightKind::Bf16;
    wp.rows = out_f;
    wp.cols = in;
    wp.weight = static_cast<const uint8_t*>(w.data);
    bp.kind = WeightKind::F32;
    bp.rows = 1;
    bp.cols = out_f;
    bp.weight = static_cast<const uint8_t*>(bias.data);
    const DequantParams* biases[] = {nullptr, &bp};
    for (const DequantParams* bb : biases) {
      ops->linear(x, wp, bb, y);
      const int reps = 5;
      t0.record(stream.get());
      for (int i = 0; i < reps; ++i) ops->linear(x, wp, bb, y);
      t1.record(stream.get());
      t1.synchronize();
      const double ms = t1.elapsed_ms_since(t0) / reps;
      std::printf("  linear bf16 [%lld x %lld] -> %lld%s: %.3f ms, %.1f TFLOP/s\n",
                  static_cast<long long>(tokens), static_cast<long long>(in), static_cast<long long>(out_f),
                  bb ? " + bias" : "", ms, 2.0 * tokens * in * out_f / ms / 1e9);
    }
  }
}
