// The CPU backend of the op vocabulary (cpu_ops.hpp) against scalar references written here from
// MODELS.md's equations: bit for bit for every op the frameworks round at known points (all but
// linear and attention), within a derived tolerance of a double-precision reference for linear
// and attention. Odd sizes, strided views (ld > cols, with a check that nothing outside a view
// is written), in place, BF16/F16/F32, special values (±0, subnormals, ±inf, NaN), random data
// from a printed seed.
#include <doctest/doctest.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "qtool/formats/dtype.hpp"
#include "qtool/formats/error.hpp"
#include "qtool/formats/thread_pool.hpp"
#include "qtool/libquant/quant.hpp"
#include "qtool/runner/cpu_ops.hpp"
#include "qtool/runner/dequant.hpp"

using namespace qtool;
using namespace qtool::runner;

namespace {

constexpr DType kDtypes[] = {DType::BF16, DType::F16, DType::F32};

uint64_t test_seed() {
  static const uint64_t seed = [] {
    const char* env = std::getenv("QTOOL_TEST_SEED");
    const uint64_t s = env ? std::strtoull(env, nullptr, 10) : std::random_device{}();
    std::fprintf(stderr, "[runner_ops_test] QTOOL_TEST_SEED=%llu\n", static_cast<unsigned long long>(s));
    return s;
  }();
  return seed;
}

// ⟦v⟧ in dtype dt, through the formats library's conversions (not the backend's).
float rnd(DType dt, float v) {
  if (dt == DType::BF16) return bf16_to_f32(f32_to_bf16(v));
  if (dt == DType::F16) return f16_to_f32(f32_to_f16(v));
  return v;
}

// finfo(dt).min, the additive mask value.
double finfo_min(DType dt) {
  return dt == DType::BF16 ? -0x1.FEp127 : dt == DType::F16 ? -65504.0 : -static_cast<double>(FLT_MAX);
}

// Unit roundoff of a dtype (half an ulp relative to the value).
double unit_roundoff(DType dt) { return dt == DType::BF16 ? 0x1p-8 : dt == DType::F16 ? 0x1p-11 : 0x1p-24; }
// Half the smallest subnormal spacing, the absolute part of rounding near zero.
double abs_roundoff(DType dt) { return dt == DType::BF16 ? 0x1p-134 : dt == DType::F16 ? 0x1p-25 : 0x1p-150; }

struct Gen {
  std::mt19937_64 rng;
  double special_rate = 0.02;
  double sigma = 2.0;
  explicit Gen(uint64_t salt) : rng(test_seed() * 0x9E3779B97F4A7C15ull + salt) {}

  float uniform(float lo, float hi) { return std::uniform_real_distribution<float>(lo, hi)(rng); }
  // A value representable in dt: mostly normal(0, sigma), sometimes a special one.
  float value(DType dt) {
    if (std::uniform_real_distribution<double>(0, 1)(rng) < special_rate) {
      const float tiny = dt == DType::BF16 ? 0x1p-130f : dt == DType::F16 ? 0x1p-20f : 0x1p-140f;
      const float specials[] = {0.0f,
                                -0.0f,
                                tiny,
                                -tiny,
                                300.0f,
                                -300.0f,
                                std::numeric_limits<float>::infinity(),
                                -std::numeric_limits<float>::infinity(),
                                std::numeric_limits<float>::quiet_NaN()};
      return rnd(dt, specials[rng() % std::size(specials)]);
    }
    return rnd(dt, static_cast<float>(std::normal_distribution<double>(0, sigma)(rng)));
  }
};

std::vector<uint8_t> to_bytes(const std::vector<float>& v, DType dt) {
  std::vector<uint8_t> b(v.size() * dtype_size(dt));
  convert_from_f32(dt, v.data(), b.data(), v.size());
  return b;
}

// A tensor in the backend's memory: a [rows, cols + pad] buffer and the view of columns
// [off, off + cols) in it. `all` is the buffer's contents as uploaded.
struct Tensor {
  Mat full;
  Mat view;
  std::vector<float> all;
  float at(int64_t r, int64_t c) const { return all[r * full.cols + (c + (view.cols == full.cols ? 0 : 1))]; }
};

Tensor make(Ops& ops, Gen& g, int64_t rows, int64_t cols, DType dt, bool strided) {
  const int64_t pad = strided ? 3 : 0;
  Tensor t;
  t.full = ops.alloc(rows, cols + pad, dt);
  t.view = strided ? t.full.cols_view(1, cols) : t.full;
  t.all.resize(static_cast<size_t>(rows * (cols + pad)));
  for (float& v : t.all) v = g.value(dt);
  ops.upload(to_bytes(t.all, dt).data(), t.full);
  return t;
}

std::vector<float> read(Ops& ops, const Mat& m) {
  std::vector<uint8_t> b(static_cast<size_t>(m.rows * m.cols) * m.elem_bytes());
  ops.download(m, b.data());
  std::vector<float> v(static_cast<size_t>(m.rows * m.cols));
  convert_to_f32(m.dtype, b.data(), v.data(), v.size());
  return v;
}

bool same_bits(float a, float b) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
  uint32_t ua, ub;
  std::memcpy(&ua, &a, 4);
  std::memcpy(&ub, &b, 4);
  return ua == ub;
}

// The view of `out` equals ref (rows x cols, values already rounded) bit for bit, and the
// columns of its buffer outside the view kept `out.all` (nothing written outside the view).
void expect_exact(Ops& ops, const Tensor& out, const std::vector<float>& ref, const std::string& what) {
  const std::vector<float> got = read(ops, out.full);
  const int64_t w = out.full.cols;
  const int64_t off = out.view.cols == w ? 0 : 1;
  int64_t bad = 0;
  for (int64_t r = 0; r < out.full.rows; ++r)
    for (int64_t c = 0; c < w; ++c) {
      const bool inside = c >= off && c < off + out.view.cols;
      const float want = inside ? ref[r * out.view.cols + (c - off)] : out.all[r * w + c];
      if (!same_bits(got[r * w + c], want)) {
        if (bad++ < 3)
          MESSAGE(what, ": [", r, ", ", c - off, "]", inside ? "" : " (outside the view)", " got ",
                  got[r * w + c], " want ", want);
      }
    }
  CHECK_MESSAGE(bad == 0, what, ": ", bad, " mismatches");
}

// A plain weight vector or matrix of dtype dt ([rows, cols]).
struct Weight {
  std::vector<uint8_t> bytes;
  std::vector<uint8_t> scale;
  std::vector<float> v;  // the values the op must use (as float32)
  DequantParams p;
};

Weight plain_weight(Gen& g, uint64_t rows, uint64_t cols, DType dt) {
  Weight w;
  w.v.resize(rows * cols);
  for (float& x : w.v) x = g.value(dt);
  w.bytes = to_bytes(w.v, dt);
  w.p.kind = dt == DType::BF16 ? WeightKind::Bf16 : dt == DType::F16 ? WeightKind::F16 : WeightKind::F32;
  w.p.rows = rows;
  w.p.cols = cols;
  w.p.weight = w.bytes.data();
  return w;
}

std::string name(DType dt) { return std::string(dtype_name(dt)); }

}  // namespace

TEST_CASE("cpu ops: activation memory is a 256-byte aligned stack with a high-water mark and a bound") {
  ThreadPool pool(2);
  auto ops = make_cpu_ops(pool, 4096);
  CHECK(ops->peak_bytes() == 0);
  const Mat a = ops->alloc(3, 5, DType::BF16);  // 30 bytes
  CHECK(reinterpret_cast<uintptr_t>(a.data) % 256 == 0);
  CHECK((a.rows == 3 && a.cols == 5 && a.ld == 5 && a.dtype == DType::BF16));
  const size_t m = ops->mark();
  const Mat b = ops->alloc(7, 1, DType::F32);
  CHECK(reinterpret_cast<uintptr_t>(b.data) % 256 == 0);
  CHECK(static_cast<uint8_t*>(b.data) - static_cast<uint8_t*>(a.data) == 256);
  CHECK(ops->peak_bytes() == 256 + 28);
  ops->release(m);
  const Mat c = ops->alloc(1, 1, DType::F16);
  CHECK(c.data == b.data);  // released memory is reused
  CHECK(ops->peak_bytes() == 256 + 28);
  ops->reset_peak();
  CHECK(ops->peak_bytes() == 256 + 2);
  // 4096 - 512 bytes are left: 3584 fit, 3585 do not.
  const size_t before = ops->mark();
  CHECK_NOTHROW(ops->alloc(1, 3584, DType::U8));
  ops->release(before);
  try {
    ops->alloc(1, 3585, DType::U8);
    FAIL("an allocation past the capacity was accepted");
  } catch (const Error& e) {
    CHECK(e.kind() == ErrorKind::InvalidInput);
    const std::string msg = e.what();
    CHECK_MESSAGE(msg.find("3585 bytes") != std::string::npos, msg);
    CHECK_MESSAGE(msg.find("258 of 4096") != std::string::npos, msg);
  }
  CHECK(ops->mark() == before);  // a refused allocation holds nothing
}

TEST_CASE("cpu ops: upload, download and copy between dtypes and strided views") {
  ThreadPool pool(3);
  auto ops = make_cpu_ops(pool, 1 << 20);
  Gen g(1);
  for (DType src_dt : kDtypes)
    for (DType dst_dt : kDtypes)
      for (int64_t rows : {1, 3, 17})
        for (int64_t cols : {1, 5, 33}) {
          const size_t m = ops->mark();
          const Tensor src = make(*ops, g, rows, cols, src_dt, true);
          const Tensor dst = make(*ops, g, rows, cols, dst_dt, (rows + cols) % 2 == 0);
          ops->copy(src.view, dst.view);
          std::vector<float> ref(static_cast<size_t>(rows * cols));
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t c = 0; c < cols; ++c) ref[r * cols + c] = rnd(dst_dt, src.at(r, c));
          expect_exact(*ops, dst, ref, "copy " + name(src_dt) + " -> " + name(dst_dt));
          ops->release(m);
        }
}

TEST_CASE("cpu ops: embedding gathers table rows, converted once") {
  ThreadPool pool(2);
  auto ops = make_cpu_ops(pool, 1 << 20);
  Gen g(2);
  for (DType table_dt : kDtypes)
    for (DType out_dt : kDtypes)
      for (DType id_dt : {DType::I64, DType::I32}) {
        const uint64_t vocab = 37, dim = 19;
        const int64_t n = 23;
        const Weight table = plain_weight(g, vocab, dim, table_dt);
        const size_t m = ops->mark();
        std::vector<int64_t> ids(n);
        for (auto& id : ids) id = static_cast<int64_t>(g.rng() % vocab);
        ids[0] = 0;
        ids[1] = vocab - 1;
        const Mat idm = ops->alloc(n, 1, id_dt);
        if (id_dt == DType::I64) {
          ops->upload(ids.data(), idm);
        } else {
          std::vector<int32_t> i32(ids.begin(), ids.end());
          ops->upload(i32.data(), idm);
        }
        const Tensor out = make(*ops, g, n, dim, out_dt, true);
        ops->embedding(idm, table.p, out.view);
        std::vector<float> ref(n * dim);
        for (int64_t i = 0; i < n; ++i)
          for (uint64_t c = 0; c < dim; ++c) ref[i * dim + c] = rnd(out_dt, table.v[ids[i] * dim + c]);
        expect_exact(*ops, out, ref, "embedding " + name(table_dt) + " -> " + name(out_dt));
        ops->release(m);
      }
}

TEST_CASE("cpu ops: RMSNorm rounds once (torch) or twice (Llama), per row or per head") {
  ThreadPool pool(3);
  auto ops = make_cpu_ops(pool, 1 << 22);
  Gen g(3);
  for (DType dt : kDtypes)
    for (RmsRounding rounding : {RmsRounding::Once, RmsRounding::Twice})
      for (auto [cols, head_dim] :
           {std::pair<int64_t, int64_t>{1, 0}, {7, 0}, {65, 0}, {130, 0}, {12, 4}, {39, 13}})
        for (bool in_place : {false, true}) {
          const int64_t rows = 17;
          const float eps = cols == 65 ? 1e-5f : 1e-6f;
          const int64_t group = head_dim ? head_dim : cols;
          const Weight w = plain_weight(g, 1, group, dt);
          const size_t m = ops->mark();
          const Tensor x = make(*ops, g, rows, cols, dt, true);
          const Tensor out = in_place ? x : make(*ops, g, rows, cols, dt, false);
          std::vector<float> ref(rows * cols);
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t g0 = 0; g0 < cols; g0 += group) {
              double ss = 0;
              for (int64_t i = 0; i < group; ++i) ss += x.at(r, g0 + i) * x.at(r, g0 + i);
              const float inv = 1.0f / std::sqrt(static_cast<float>(ss / group) + eps);
              for (int64_t i = 0; i < group; ++i) {
                const float xv = x.at(r, g0 + i), wv = w.v[i];
                ref[r * cols + g0 + i] =
                    rounding == RmsRounding::Once ? rnd(dt, xv * inv * wv) : rnd(dt, wv * rnd(dt, xv * inv));
              }
            }
          ops->rms_norm(x.view, w.p, eps, rounding, head_dim, out.view);
          expect_exact(*ops, out, ref,
                       "rms_norm " + name(dt) + (rounding == RmsRounding::Once ? " once" : " twice") +
                           " cols " + std::to_string(cols) + " head_dim " + std::to_string(head_dim));
          ops->release(m);
        }
}

TEST_CASE(
    "cpu ops: LayerNorm (biased variance, fp32, one rounding) and Flux's modulated norm (four roundings)") {
  ThreadPool pool(2);
  auto ops = make_cpu_ops(pool, 1 << 22);
  Gen g(4);
  for (DType dt : kDtypes)
    for (int64_t cols : {1, 3, 33, 130})
      for (int affine = 0; affine < 3; ++affine) {
        const int64_t rows = 13, batch = 1 + affine;  // rows % batch: 13 % 1, then 12 rows below
        const int64_t n_rows = affine == 0 ? rows : 12;
        const Weight gamma = plain_weight(g, 1, cols, dt), beta = plain_weight(g, 1, cols, dt);
        const size_t m = ops->mark();
        const Tensor x = make(*ops, g, n_rows, cols, dt, true);
        const Tensor out = make(*ops, g, n_rows, cols, dt, true);
        const Tensor shift = make(*ops, g, batch, cols, dt, true),
                     scale = make(*ops, g, batch, cols, dt, false);
        std::vector<float> ref_ln(n_rows * cols), ref_mod(n_rows * cols);
        for (int64_t r = 0; r < n_rows; ++r) {
          double s = 0, v = 0;
          for (int64_t i = 0; i < cols; ++i) s += x.at(r, i);
          const double mu = s / cols;
          for (int64_t i = 0; i < cols; ++i) v += (x.at(r, i) - mu) * (x.at(r, i) - mu);
          const float muf = static_cast<float>(mu);
          const float inv = 1.0f / std::sqrt(static_cast<float>(v / cols) + 1e-6f);
          const int64_t b = r / (n_rows / batch);
          for (int64_t i = 0; i < cols; ++i) {
            const float norm = (x.at(r, i) - muf) * inv;
            ref_ln[r * cols + i] = rnd(dt, affine ? norm * gamma.v[i] + beta.v[i] : norm);
            const float s1 = rnd(dt, 1.0f + scale.at(b, i));
            ref_mod[r * cols + i] = rnd(dt, rnd(dt, rnd(dt, norm) * s1) + shift.at(b, i));
          }
        }
        ops->layer_norm(x.view, affine ? &gamma.p : nullptr, affine ? &beta.p : nullptr, 1e-6f, out.view);
        expect_exact(*ops, out, ref_ln, "layer_norm " + name(dt) + " cols " + std::to_string(cols));
        ops->copy(x.view, out.view);
        ops->layer_norm(out.view, affine ? &gamma.p : nullptr, affine ? &beta.p : nullptr, 1e-6f, out.view);
        expect_exact(*ops, out, ref_ln, "layer_norm in place " + name(dt) + " cols " + std::to_string(cols));
        ops->modulate(x.view, shift.view, scale.view, batch, 1e-6f, out.view);
        expect_exact(*ops, out, ref_mod, "modulate " + name(dt) + " cols " + std::to_string(cols));
        ops->modulate(x.view, shift.view, scale.view, batch, 1e-6f, x.view);  // in place
        expect_exact(*ops, x, ref_mod, "modulate in place " + name(dt));
        ops->release(m);
      }
}

namespace {

// MODELS.md §0, written out: the one-rounding activations and the op-by-op ones.
float ref_activation(Activation act, float x, DType dt) {
  const float beta = 0.7978845608028654f, kappa = 0.044715f;
  switch (act) {
    case Activation::Identity: return rnd(dt, x);
    case Activation::Relu: return rnd(dt, x <= 0.0f ? 0.0f : x);
    case Activation::Silu: return rnd(dt, x / (1.0f + std::exp(-x)));
    case Activation::GeluTanh:
      return rnd(dt, 0.5f * x * (1.0f + std::tanh(beta * (x + kappa * (x * x * x)))));
    case Activation::GeluNew: {
      const float a = rnd(dt, 0.5f * x), b = rnd(dt, x * x * x), c = rnd(dt, kappa * b), d = rnd(dt, x + c);
      const float e = rnd(dt, beta * d), f = rnd(dt, std::tanh(e)), gg = rnd(dt, 1.0f + f);
      return rnd(dt, a * gg);
    }
    case Activation::QuickGelu: {
      const float a = rnd(dt, 1.702f * x), s = rnd(dt, 1.0f / (1.0f + std::exp(-a)));
      return rnd(dt, x * s);
    }
  }
  return x;
}

const char* act_name(Activation a) {
  switch (a) {
    case Activation::Identity: return "identity";
    case Activation::Silu: return "silu";
    case Activation::GeluTanh: return "gelu_tanh";
    case Activation::GeluNew: return "gelu_new";
    case Activation::QuickGelu: return "quick_gelu";
    case Activation::Relu: return "relu";
  }
  return "?";
}

constexpr Activation kActs[] = {Activation::Identity, Activation::Silu,      Activation::GeluTanh,
                                Activation::GeluNew,  Activation::QuickGelu, Activation::Relu};

}  // namespace

TEST_CASE("cpu ops: activations and gated products round as the frameworks do") {
  ThreadPool pool(2);
  auto ops = make_cpu_ops(pool, 1 << 22);
  Gen g(5);
  g.sigma = 4.0;
  for (DType dt : kDtypes)
    for (Activation act : kActs)
      for (auto [rows, cols] : {std::pair<int64_t, int64_t>{1, 1}, {5, 7}, {33, 65}, {3, 1031}}) {
        const size_t m = ops->mark();
        const Tensor x = make(*ops, g, rows, cols, dt, true);
        const Tensor up = make(*ops, g, rows, cols, dt, false);
        const Tensor out = make(*ops, g, rows, cols, dt, true);
        std::vector<float> ref(rows * cols), ref_gated(rows * cols);
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t c = 0; c < cols; ++c) {
            const float a = ref_activation(act, x.at(r, c), dt);
            ref[r * cols + c] = a;
            ref_gated[r * cols + c] = rnd(dt, a * up.at(r, c));
          }
        const std::string what = std::string(act_name(act)) + " " + name(dt) + " [" + std::to_string(rows) +
                                 ", " + std::to_string(cols) + "]";
        ops->activation(act, x.view, out.view);
        expect_exact(*ops, out, ref, what);
        ops->gated(act, x.view, up.view, out.view);
        expect_exact(*ops, out, ref_gated, "gated " + what);
        ops->gated(act, x.view, up.view, x.view);  // in place of gate
        expect_exact(*ops, x, ref_gated, "gated in place " + what);
        ops->activation(act, up.view, up.view);  // in place
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t c = 0; c < cols; ++c) ref[r * cols + c] = ref_activation(act, up.at(r, c), dt);
        expect_exact(*ops, up, ref, "in place " + what);
        ops->release(m);
      }
}

TEST_CASE("cpu ops: add, gated residual and clamp") {
  ThreadPool pool(3);
  auto ops = make_cpu_ops(pool, 1 << 22);
  Gen g(6);
  for (DType dt : kDtypes)
    for (auto [batch, seq, cols] :
         {std::tuple<int64_t, int64_t, int64_t>{1, 1, 1}, {1, 7, 5}, {3, 5, 33}, {2, 9, 130}}) {
      const int64_t rows = batch * seq;
      const size_t m = ops->mark();
      const Tensor h = make(*ops, g, rows, cols, dt, true), y = make(*ops, g, rows, cols, dt, false);
      const Tensor gate = make(*ops, g, batch, cols, dt, true), out = make(*ops, g, rows, cols, dt, true);
      std::vector<float> ref_add(rows * cols), ref_res(rows * cols), ref_clamp(rows * cols);
      const float bound = dt == DType::F16 ? 65504.0f : 5.0f;
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c) {
          const float hv = h.at(r, c), yv = y.at(r, c);
          ref_add[r * cols + c] = rnd(dt, hv + yv);
          ref_res[r * cols + c] = rnd(dt, hv + rnd(dt, gate.at(r / seq, c) * yv));
          ref_clamp[r * cols + c] = std::isnan(hv) ? hv : std::min(std::max(hv, -bound), bound);
        }
      const std::string what = name(dt) + " cols " + std::to_string(cols);
      ops->add(h.view, y.view, out.view);
      expect_exact(*ops, out, ref_add, "add " + what);
      ops->residual(h.view, nullptr, y.view, batch, out.view);
      expect_exact(*ops, out, ref_add, "residual " + what);
      ops->residual(h.view, &gate.view, y.view, batch, out.view);
      expect_exact(*ops, out, ref_res, "gated residual " + what);
      ops->clamp(h.view, bound, out.view);
      expect_exact(*ops, out, ref_clamp, "clamp " + what);
      ops->residual(h.view, &gate.view, y.view, batch, h.view);  // in place of h
      expect_exact(*ops, h, ref_res, "gated residual in place " + what);
      ops->add(y.view, y.view, y.view);  // in place, both operands
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c) ref_add[r * cols + c] = rnd(dt, y.at(r, c) + y.at(r, c));
      expect_exact(*ops, y, ref_add, "add in place " + what);
      ops->clamp(y.view, bound, y.view);
      for (float& v : ref_add) v = std::isnan(v) ? v : std::min(std::max(v, -bound), bound);
      expect_exact(*ops, y, ref_add, "clamp in place " + what);
      ops->release(m);
    }
}

TEST_CASE(
    "cpu ops: RoPE, Flux's adjacent pairs (fp32 tables, one rounding) and Llama's halves (three roundings)") {
  ThreadPool pool(2);
  auto ops = make_cpu_ops(pool, 1 << 22);
  Gen g(7);
  for (DType dt : kDtypes)
    for (RopeStyle style : {RopeStyle::Adjacent, RopeStyle::Halves})
      for (auto [rows, heads, hd] :
           {std::tuple<int64_t, int64_t, int64_t>{1, 1, 2}, {5, 3, 6}, {17, 2, 22}, {9, 5, 128}})
        for (bool in_place : {false, true}) {
          const DType table_dt = style == RopeStyle::Adjacent ? DType::F32 : dt;
          const int64_t cols = heads * hd;
          const size_t m = ops->mark();
          const Tensor x = make(*ops, g, rows, cols, dt, true);
          const Tensor out = in_place ? x : make(*ops, g, rows, cols, dt, true);
          // Tables as the models make them: cos/sin of angles (a few special entries stay).
          Gen tg(g.rng());
          tg.special_rate = 0.0;
          tg.sigma = 40.0;
          Tensor cs = make(*ops, tg, rows, hd, table_dt, true),
                 sn = make(*ops, tg, rows, hd, table_dt, false);
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t d = 0; d < hd; ++d) {
              const float a = cs.at(r, d);
              cs.all[r * cs.full.cols + d + 1] = rnd(table_dt, std::cos(a));
              sn.all[r * hd + d] = rnd(table_dt, std::sin(a));
            }
          ops->upload(to_bytes(cs.all, table_dt).data(), cs.full);
          ops->upload(to_bytes(sn.all, table_dt).data(), sn.full);
          std::vector<float> ref(rows * cols);
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t h0 = 0; h0 < cols; h0 += hd)
              for (int64_t d = 0; d < hd; ++d) {
                const float xv = x.at(r, h0 + d), c = cs.at(r, d), s = sn.at(r, d);
                float v;
                if (style == RopeStyle::Adjacent) {
                  const float other = d % 2 == 0 ? -x.at(r, h0 + d + 1) : x.at(r, h0 + d - 1);
                  const float p1 = xv * c, p2 = other * s;
                  v = rnd(dt, p1 + p2);
                } else {
                  const float rot = d < hd / 2 ? -x.at(r, h0 + d + hd / 2) : x.at(r, h0 + d - hd / 2);
                  v = rnd(dt, rnd(dt, xv * c) + rnd(dt, rot * s));
                }
                ref[r * cols + h0 + d] = v;
              }
          ops->rope(style, x.view, hd, cs.view, sn.view, out.view);
          expect_exact(*ops, out, ref,
                       std::string(style == RopeStyle::Adjacent ? "rope adjacent " : "rope halves ") +
                           name(dt) + " hd " + std::to_string(hd) + (in_place ? " in place" : ""));
          ops->release(m);
        }
}

namespace {

// A linear weight [rows, cols] stored as `kind`, with the float32 values its dequantization
// gives (FORMATS.md's formulas, written here independently of the runner's).
Weight linear_weight(Gen& g, uint64_t rows, uint64_t cols, WeightKind kind) {
  if (kind == WeightKind::Bf16) return plain_weight(g, rows, cols, DType::BF16);
  if (kind == WeightKind::F16) return plain_weight(g, rows, cols, DType::F16);
  if (kind == WeightKind::F32) return plain_weight(g, rows, cols, DType::F32);
  Weight w;
  w.p.kind = kind;
  w.p.rows = rows;
  w.p.cols = cols;
  w.v.resize(rows * cols);
  std::vector<float> scales;
  if (kind == WeightKind::Nf4) {
    w.p.blocksize = 64;
    const uint64_t n_blocks = (rows * cols + 63) / 64;
    w.bytes.assign((rows * cols + 1) / 2, 0);
    for (uint64_t b = 0; b < n_blocks; ++b) scales.push_back(g.uniform(0.01f, 3.0f));
    const auto codes = quant::code_table(quant::Scheme::Nf4);
    for (uint64_t i = 0; i < rows * cols; ++i) {
      const uint8_t q = static_cast<uint8_t>(g.rng() % 16);
      w.bytes[i / 2] |= i % 2 ? q : static_cast<uint8_t>(q << 4);
      w.v[i] = codes[q] * scales[i / 64];
    }
  } else {
    w.bytes.resize(rows * cols);
    for (uint64_t r = 0; r < rows; ++r) scales.push_back(g.uniform(0.01f, 3.0f));
    for (uint64_t i = 0; i < rows * cols; ++i) {
      uint8_t q = static_cast<uint8_t>(g.rng());
      if (kind == WeightKind::Fp8E4M3 && (q & 0x7F) == 0x7F) q = 0x42;
      w.bytes[i] = q;
      const float s = scales[i / cols];
      w.v[i] = kind == WeightKind::Int8
                   ? static_cast<float>(static_cast<int8_t>(q)) * s * 7.874015718698502e-3f
                   : fp8_e4m3_to_f32(q) * s;
    }
  }
  w.scale.resize(scales.size() * 4);
  std::memcpy(w.scale.data(), scales.data(), w.scale.size());
  w.p.weight = w.bytes.data();
  w.p.scale = w.scale.data();
  return w;
}

const char* kind_name(WeightKind k) {
  switch (k) {
    case WeightKind::Bf16: return "bf16";
    case WeightKind::F16: return "f16";
    case WeightKind::F32: return "f32";
    case WeightKind::Int8: return "int8";
    case WeightKind::Nf4: return "nf4";
    case WeightKind::Fp8E4M3: return "fp8_e4m3";
    default: return "?";
  }
}

}  // namespace

// Tolerance of linear against the double-precision sum y* = Σ x_k·w_k + b: float32 products are
// exact for bf16/f16 inputs and within u32 = 2^-24 relative otherwise; a lane sums n/8 terms in
// order and three levels combine the lanes, then the bias is added, so the float32 sum is within
// E = (n/8 + 5)·u32·(Σ|x_k·w_k| + |b|) of y*; the one rounding to the output adds
// u_dt·(|y*| + E) (u_dt = 2^-8 bf16, 2^-11 f16, 2^-24 f32) plus half a subnormal step.
TEST_CASE("cpu ops: linear = dequant + GEMM with fp32 accumulation and the bias before one rounding") {
  ThreadPool pool(3);
  auto ops = make_cpu_ops(pool, 1 << 22);
  Gen g(8);
  g.special_rate = 0.0;
  g.sigma = 1.0;
  const WeightKind kinds[] = {WeightKind::Bf16, WeightKind::F16, WeightKind::F32,
                              WeightKind::Int8, WeightKind::Nf4, WeightKind::Fp8E4M3};
  const std::tuple<int64_t, int64_t, int64_t> shapes[] = {
      {1, 1, 1}, {3, 7, 5}, {5, 17, 3}, {17, 65, 33}, {33, 130, 70}, {7, 9, 129}, {65, 33, 7}, {2, 257, 1}};
  int64_t checked = 0;
  double worst = 0;
  for (DType dt : kDtypes)
    for (WeightKind kind : kinds)
      for (auto [tokens, in, n_out] : shapes) {
        const bool with_bias = (tokens + in) % 2 == 1 || kind == WeightKind::Bf16;
        const Weight w = linear_weight(g, n_out, in, kind);
        const Weight b = plain_weight(g, 1, n_out, dt);
        const size_t m = ops->mark();
        const Tensor x = make(*ops, g, tokens, in, dt, in % 2 == 1);
        const Tensor out = make(*ops, g, tokens, n_out, dt, n_out % 2 == 1);
        ops->linear(x.view, w.p, with_bias ? &b.p : nullptr, out.view);
        std::vector<float> exact(tokens * n_out);
        const std::vector<float> got_all = read(*ops, out.view);
        for (int64_t t = 0; t < tokens; ++t)
          for (int64_t o = 0; o < n_out; ++o) {
            float lane[8] = {};
            double sum = 0, mag = 0;
            for (int64_t k = 0; k < in; ++k) {
              const float xv = x.at(t, k), wv = rnd(dt, w.v[o * in + k]);
              lane[k % 8] += xv * wv;
              sum += static_cast<double>(xv) * wv;
              mag += std::fabs(static_cast<double>(xv) * wv);
            }
            float s =
                ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
            if (with_bias) {
              s = s + b.v[o];
              sum += b.v[o];
              mag += std::fabs(b.v[o]);
            }
            exact[t * n_out + o] = rnd(dt, s);
            const double e = (in / 8.0 + 5) * 0x1p-24 * mag;
            const double tol = e + unit_roundoff(dt) * (std::fabs(sum) + e) + abs_roundoff(dt);
            const double err = std::fabs(got_all[t * n_out + o] - sum);
            worst = std::max(worst, err / tol);
            ++checked;
            if (!(err <= tol))
              FAIL_CHECK("linear ", kind_name(kind), " ", name(dt), " [", t, ", ", o,
                         "]: ", got_all[t * n_out + o], " vs ", sum, " tolerance ", tol);
          }
        expect_exact(*ops, out, exact,
                     std::string("linear (documented order) ") + kind_name(kind) + " " + name(dt) + " " +
                         std::to_string(tokens) + "x" + std::to_string(in) + "->" + std::to_string(n_out));
        ops->release(m);
      }
  MESSAGE("linear: ", checked, " outputs within tolerance, worst error/tolerance ", worst);
}

namespace {

struct AttnCase {
  int64_t batch, q_len, kv_len, heads, kv_heads, hd;
  bool causal, bias, mask;
};

// q, k, v as column views of one fused [rows, (H + 2·Hkv)·hd] buffer when q_len == kv_len (the
// layout a fused QKV projection leaves), separate buffers otherwise.
struct AttnData {
  Tensor qkv, q_own, kv_own, bias, out;
  Mat q, k, v, maskm;
  std::vector<int32_t> mask;
  float at_q(int64_t r, int64_t c) const { return fused ? qkv.at(r, c) : q_own.at(r, c); }
  float at_k(int64_t r, int64_t c) const { return fused ? qkv.at(r, hq + c) : kv_own.at(r, c); }
  float at_v(int64_t r, int64_t c) const { return fused ? qkv.at(r, hq + hkv + c) : kv_own.at(r, hkv + c); }
  bool fused = false;
  int64_t hq = 0, hkv = 0;
};

AttnData make_attention(Ops& ops, Gen& g, const AttnCase& c, DType dt) {
  AttnData d;
  d.hq = c.heads * c.hd;
  d.hkv = c.kv_heads * c.hd;
  d.fused = c.q_len == c.kv_len;
  if (d.fused) {
    d.qkv = make(ops, g, c.batch * c.q_len, d.hq + 2 * d.hkv, dt, true);
    d.q = d.qkv.view.cols_view(0, d.hq);
    d.k = d.qkv.view.cols_view(d.hq, d.hkv);
    d.v = d.qkv.view.cols_view(d.hq + d.hkv, d.hkv);
  } else {
    d.q_own = make(ops, g, c.batch * c.q_len, d.hq, dt, false);
    d.kv_own = make(ops, g, c.batch * c.kv_len, 2 * d.hkv, dt, true);
    d.q = d.q_own.view;
    d.k = d.kv_own.view.cols_view(0, d.hkv);
    d.v = d.kv_own.view.cols_view(d.hkv, d.hkv);
  }
  if (c.bias) d.bias = make(ops, g, c.heads * c.q_len, c.kv_len, dt, true);
  if (c.mask) {
    d.mask.resize(c.batch * c.kv_len);
    for (auto& m : d.mask) m = g.rng() % 4 != 0;
    for (int64_t u = 0; u < c.kv_len; ++u) d.mask[u] = 0;  // sample 0: every key dropped
    d.maskm = ops.alloc(c.batch, c.kv_len, DType::I32);
    ops.upload(d.mask.data(), d.maskm);
  }
  d.out = make(ops, g, c.batch * c.q_len, d.hq, dt, true);
  return d;
}

// The double-precision SDPA of one (sample, head, query) and the tolerance derived for the
// float32 kernel: scores within δ_u = (hd + 5)·u32·scale·Σ_d|q_d·k_d| + 3·u32·|s_u| (a dot
// product summed in order, scale, bias and mask additions); each weight p_u = exp(s_u − m) then within
// 2δ + u32·|s_u − m| + 2·u32 relative (expf's error included), the sum l within n·u32, the
// weighted sum within n·u32 per term; finally the one rounding.
struct AttnRef {
  std::vector<double> y, tol;
};

AttnRef ref_attention(const AttnData& d, const AttnCase& c, DType dt, int64_t b, int64_t j, int64_t t) {
  const int64_t kvh = j / (c.heads / c.kv_heads);
  const int64_t n = c.causal ? std::min(t + 1, c.kv_len) : c.kv_len;
  const double u32 = 0x1p-24, scale = 1.0 / std::sqrt(static_cast<double>(c.hd));
  const float fscale = static_cast<float>(scale);
  std::vector<double> s(n), delta(n);
  for (int64_t u = 0; u < n; ++u) {
    double dot = 0, mag = 0;
    for (int64_t e = 0; e < c.hd; ++e) {
      const double p = static_cast<double>(d.at_q(b * c.q_len + t, j * c.hd + e)) *
                       d.at_k(b * c.kv_len + u, kvh * c.hd + e);
      dot += p;
      mag += std::fabs(p);
    }
    s[u] = dot * fscale;
    if (c.bias) s[u] += d.bias.at(j * c.q_len + t, u);
    delta[u] = (c.hd + 5) * u32 * fscale * mag + 3 * u32 * std::fabs(s[u]);
    // A dropped key's score: bf16's and f32's finfo.min swallow the score exactly in float32 and
    // in double (|s| is far below min's ulp), so its weight is 0, or 1 like every other key's
    // when all are dropped; f16's -65504 does not, and adding it costs up to u32·65504.
    if (c.mask && d.mask[b * c.kv_len + u] == 0) {
      s[u] += finfo_min(dt);
      delta[u] = dt == DType::F16 ? delta[u] + u32 * std::fabs(s[u]) : 0.0;
    }
  }
  double m = -std::numeric_limits<double>::infinity();
  for (double x : s) m = std::max(m, x);
  double l = 0, dmax = 0;
  std::vector<double> p(n);
  for (int64_t u = 0; u < n; ++u) {
    p[u] = std::exp(s[u] - m);
    l += p[u];
    if (p[u] > 0) dmax = std::max(dmax, delta[u]);
  }
  AttnRef r;
  r.y.assign(c.hd, 0.0);
  r.tol.assign(c.hd, 0.0);
  for (int64_t e = 0; e < c.hd; ++e) {
    double y = 0, mag = 0;
    for (int64_t u = 0; u < n; ++u) {
      const double vv = d.at_v(b * c.kv_len + u, kvh * c.hd + e);
      y += p[u] * vv;
      mag += p[u] * std::fabs(vv) * (2 * dmax + u32 * std::fabs(s[u] - m) + (2.0 * n + 4) * u32);
    }
    r.y[e] = y / l;
    const double err = mag / l + n * u32 * std::fabs(r.y[e]);
    r.tol[e] = 1.5 * err + unit_roundoff(dt) * (std::fabs(r.y[e]) + err) + abs_roundoff(dt);
  }
  return r;
}

}  // namespace

TEST_CASE("cpu ops: attention (GQA, causal, bias, key mask) against a double-precision SDPA") {
  ThreadPool pool(3);
  auto ops = make_cpu_ops(pool, 1 << 23);
  Gen g(9);
  g.special_rate = 0.0;
  g.sigma = 1.5;
  const AttnCase cases[] = {
      {1, 1, 1, 1, 1, 8, false, false, false},  {1, 6, 6, 4, 2, 3, true, false, false},
      {2, 17, 17, 6, 3, 13, true, false, true}, {1, 40, 40, 3, 1, 16, false, true, false},
      {2, 7, 33, 4, 4, 5, false, true, true},   {1, 65, 65, 2, 1, 64, true, false, false},
      {3, 1, 9, 2, 1, 7, false, false, true},   {1, 33, 1, 5, 5, 9, false, false, false},
  };
  int64_t checked = 0;
  double worst = 0;
  for (DType dt : kDtypes)
    for (const AttnCase& c : cases) {
      const size_t m = ops->mark();
      AttnData d = make_attention(*ops, g, c, dt);
      AttentionShape shape{c.batch,
                           c.q_len,
                           c.kv_len,
                           c.heads,
                           c.kv_heads,
                           c.hd,
                           static_cast<float>(1.0 / std::sqrt(static_cast<double>(c.hd))),
                           c.causal};
      if (c.bias) shape.bias = &d.bias.view;
      if (c.mask) shape.key_mask = &d.maskm;
      ops->attention(d.q, d.k, d.v, shape, d.out.view);
      const std::vector<float> got = read(*ops, d.out.view);
      for (int64_t b = 0; b < c.batch; ++b)
        for (int64_t j = 0; j < c.heads; ++j)
          for (int64_t t = 0; t < c.q_len; ++t) {
            const AttnRef r = ref_attention(d, c, dt, b, j, t);
            for (int64_t e = 0; e < c.hd; ++e) {
              const double v = got[(b * c.q_len + t) * d.hq + j * c.hd + e];
              const double err = std::fabs(v - r.y[e]);
              worst = std::max(worst, err / r.tol[e]);
              ++checked;
              if (!(err <= r.tol[e]))
                FAIL_CHECK("attention ", name(dt), " case b", c.batch, " q", c.q_len, " kv", c.kv_len, " h",
                           c.heads, "/", c.kv_heads, " hd", c.hd, ": [", b, ", ", j, ", ", t, ", ", e, "] ",
                           v, " vs ", r.y[e], " tolerance ", r.tol[e]);
            }
          }
      // Nothing written outside the output view.
      std::vector<float> same(got.begin(), got.end());
      expect_exact(*ops, d.out, same, "attention output padding");
      ops->release(m);
    }
  MESSAGE("attention: ", checked, " outputs within tolerance, worst error/tolerance ", worst);
}

TEST_CASE("cpu ops: attention edge cases (one key, causal first row, fully masked, huge scores, NaN)") {
  ThreadPool pool(2);
  auto ops = make_cpu_ops(pool, 1 << 22);
  Gen g(10);
  g.special_rate = 0.0;
  for (DType dt : kDtypes) {
    const int64_t T = 6, H = 2, hd = 5;
    const size_t m = ops->mark();
    const Tensor q = make(*ops, g, T, H * hd, dt, false), k = make(*ops, g, T, H * hd, dt, true);
    const Tensor v = make(*ops, g, T, H * hd, dt, false), out = make(*ops, g, T, H * hd, dt, false);
    AttentionShape shape{1, T, T, H, H, hd, 0.5f, true};
    // Causal: the first query sees key 0 only, so its output is v_0 exactly.
    ops->attention(q.view, k.view, v.view, shape, out.view);
    std::vector<float> got = read(*ops, out.view);
    for (int64_t c = 0; c < H * hd; ++c) CHECK(same_bits(got[c], v.at(0, c)));
    // One key: every output is that key's value.
    AttentionShape one{T, 1, 1, H, H, hd, 0.5f, false};
    ops->attention(q.view, k.view, v.view, one, out.view);
    got = read(*ops, out.view);
    for (int64_t r = 0; r < T; ++r)
      for (int64_t c = 0; c < H * hd; ++c) CHECK(same_bits(got[r * H * hd + c], v.at(r, c)));
    // Every key dropped: finfo.min (bf16, f32) swallows the scores, so the weights are uniform
    // and the output is the mean of v, not NaN. f16's -65504 shifts every score alike (up to
    // float32 rounding, 2^-8 at 65504), so the output stays that of the unmasked row.
    const Mat mask = ops->alloc(1, T, DType::I64);
    const std::vector<int64_t> zeros(T, 0);
    ops->upload(zeros.data(), mask);
    AttentionShape masked{1, T, T, H, H, hd, 0.5f, false};
    masked.key_mask = &mask;
    ops->attention(q.view, k.view, v.view, AttentionShape{1, T, T, H, H, hd, 0.5f, false}, out.view);
    const std::vector<float> unmasked = read(*ops, out.view);
    ops->attention(q.view, k.view, v.view, masked, out.view);
    got = read(*ops, out.view);
    for (int64_t r = 0; r < T; ++r)
      for (int64_t c = 0; c < H * hd; ++c) {
        double mean = 0, mag = 0;
        for (int64_t u = 0; u < T; ++u) mean += v.at(u, c) / T, mag += std::fabs(v.at(u, c)) / T;
        const float y = got[r * H * hd + c];
        if (dt == DType::F16)
          CHECK(std::fabs(y - unmasked[r * H * hd + c]) <= 0.02 * mag + 0x1p-10 * std::fabs(y));
        else
          CHECK(std::fabs(y - mean) <= unit_roundoff(dt) * std::fabs(mean) + 20 * 0x1p-24 * mag);
      }
    // Huge scores (|q·k| ~ 1e4 and more): the max is subtracted before exp, outputs stay finite.
    std::vector<float> big(T * H * hd);
    for (size_t i = 0; i < big.size(); ++i)
      big[i] = rnd(dt, (i % 3 ? 200.0f : -150.0f) + static_cast<float>(i % 7));
    ops->upload(to_bytes(big, dt).data(), q.full);
    ops->attention(q.view, k.view, v.view, AttentionShape{1, T, T, H, H, hd, 10.0f, false}, out.view);
    got = read(*ops, out.view);
    for (float x : got) CHECK(std::isfinite(x));
    // A NaN in one query makes that row of its head NaN and nothing else.
    std::vector<float> qv = q.all;
    for (size_t i = 0; i < qv.size(); ++i)
      qv[i] = rnd(dt, 0.25f * static_cast<float>(static_cast<int>(i % 9) - 4));
    qv[2 * H * hd + hd + 1] = std::numeric_limits<float>::quiet_NaN();  // row 2, head 1
    ops->upload(to_bytes(qv, dt).data(), q.full);
    ops->attention(q.view, k.view, v.view, AttentionShape{1, T, T, H, H, hd, 0.5f, false}, out.view);
    got = read(*ops, out.view);
    for (int64_t r = 0; r < T; ++r)
      for (int64_t c = 0; c < H * hd; ++c)
        CHECK_MESSAGE(std::isnan(got[r * H * hd + c]) == (r == 2 && c >= hd), "row ", r, " col ", c);
    ops->release(m);
  }
}

namespace {

// A quantized weight in one of the layouts the runner binds, with random codes and scales
// (any bytes: NaN and infinite codes included, as corrupted files hold).
struct RawWeight {
  std::vector<uint8_t> weight, scale, nested, map;
  DequantParams p;
};

RawWeight raw_weight(std::mt19937_64& rng, WeightKind kind, uint64_t rows, uint64_t cols, int layout) {
  RawWeight w;
  w.p.kind = kind;
  w.p.rows = rows;
  w.p.cols = cols;
  const uint64_t numel = rows * cols;
  const auto floats = [&](std::vector<uint8_t>& dst, size_t n, float lo, float hi) {
    std::vector<float> v(n);
    for (float& x : v) x = std::uniform_real_distribution<float>(lo, hi)(rng);
    dst.resize(n * 4);
    std::memcpy(dst.data(), v.data(), dst.size());
  };
  if (is_4bit(kind)) {
    w.p.blocksize = layout == 0 ? 64 : 32;
    const uint64_t n_blocks = (numel + w.p.blocksize - 1) / w.p.blocksize;
    w.weight.resize((numel + 1) / 2);
    for (auto& b : w.weight) b = static_cast<uint8_t>(rng());
    if (layout == 0) {
      floats(w.scale, n_blocks, 0.01f, 2.0f);
    } else {
      w.p.double_quant = true;
      w.p.nested_offset = 0.03125f;
      w.scale.resize(n_blocks);
      for (auto& b : w.scale) b = static_cast<uint8_t>(rng());
      floats(w.nested, (n_blocks + 255) / 256, 0.001f, 0.02f);
      floats(w.map, 16, -1.0f, 1.0f);  // a file's own quant_map
      w.p.nested_absmax = w.nested.data();
      w.p.quant_map = w.map.data();
    }
  } else {
    w.weight.resize(numel);
    for (auto& b : w.weight) b = static_cast<uint8_t>(rng());
    if (kind == WeightKind::Int8 || layout == 0) {
      floats(w.scale, rows, 0.01f, 3.0f);
    } else {
      w.p.per_tensor = layout == 1;
      w.p.scale_type = layout == 1 ? ScaleType::Bf16 : ScaleType::F16;
      const size_t n = layout == 1 ? 1 : rows;
      w.scale.resize(2 * n);
      for (size_t i = 0; i < n; ++i) {
        const float v = std::uniform_real_distribution<float>(0.01f, 3.0f)(rng);
        const uint16_t h = layout == 1 ? f32_to_bf16(v) : f32_to_f16(v);
        std::memcpy(w.scale.data() + 2 * i, &h, 2);
      }
    }
  }
  w.p.weight = w.weight.data();
  w.p.scale = w.scale.data();
  return w;
}

}  // namespace

TEST_CASE(
    "cpu ops: linear of a quantized weight equals linear of the runner's dequantized weight, every layout") {
  ThreadPool pool(2);
  auto ops = make_cpu_ops(pool, 1 << 22);
  Gen g(11);
  g.special_rate = 0.0;
  struct Variant {
    WeightKind kind;
    int layout;
    const char* what;
  };
  const Variant variants[] = {{WeightKind::Nf4, 0, "nf4 blocksize 64"},
                              {WeightKind::Nf4, 1, "nf4 double quant, blocksize 32, file quant_map"},
                              {WeightKind::Fp4, 0, "fp4"},
                              {WeightKind::Int8, 0, "int8"},
                              {WeightKind::Fp8E4M3, 1, "fp8 e4m3 per tensor, bf16 scale"},
                              {WeightKind::Fp8E5M2, 2, "fp8 e5m2 per row, f16 scales"}};
  for (DType dt : kDtypes)
    for (const Variant& v : variants) {
      const uint64_t rows = 37, cols = 45;  // blocks straddle rows
      const RawWeight w = raw_weight(g.rng, v.kind, rows, cols, v.layout);
      // The plain weight the op must see: the runner's dequantization (dequantize_to_bf16_cpu for
      // bf16 activations; the same element values rounded to f16, or kept in f32, otherwise).
      std::vector<uint8_t> plain(rows * cols * dtype_size(dt));
      if (dt == DType::BF16) {
        dequantize_to_bf16_cpu(w.p, reinterpret_cast<uint16_t*>(plain.data()), 0, rows * cols);
      } else {
        float code_table[16], nested_map[256];
        resolve_tables(w.p, code_table, nested_map);
        std::vector<float> f(rows * cols);
        for (uint64_t i = 0; i < rows * cols; ++i) f[i] = dq::element_f32(w.p, i, code_table, nested_map);
        convert_from_f32(dt, f.data(), plain.data(), f.size());
      }
      DequantParams pp;
      pp.kind = dt == DType::BF16 ? WeightKind::Bf16 : dt == DType::F16 ? WeightKind::F16 : WeightKind::F32;
      pp.rows = rows;
      pp.cols = cols;
      pp.weight = plain.data();
      const size_t m = ops->mark();
      const Tensor x = make(*ops, g, 9, cols, dt, true);
      const Tensor out = make(*ops, g, 9, rows, dt, false);
      ops->linear(x.view, pp, nullptr, out.view);
      const std::vector<float> want = read(*ops, out.view);
      ops->linear(x.view, w.p, nullptr, out.view);
      expect_exact(*ops, out, want, std::string("linear ") + v.what + " " + name(dt));
      ops->release(m);
    }
}
