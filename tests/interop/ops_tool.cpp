// ops_tool: runs one op of the CPU backend (runner/cpu_ops.hpp) on tensors from a safetensors file,
// for the interop test that compares the ops with torch on the CPU (ops_interop.py).
//
//   ops_tool OP IN.safetensors OUT.safetensors [--eps E] [--heads H] [--kv-heads K]
//            [--head-dim D] [--batch B] [--causal] [--threads N]
//
// Inputs by name (2-D, BF16/F16/F32; a weight vector 1-D): x, w, b (rms_once, rms_twice,
// layer_norm, silu, gelu_tanh, gelu_new, quick_gelu, linear with w [out, in] and optional b);
// x, shift, scale (modulate, --batch); x, cos, sin (rope_halves, rope_adjacent, --head-dim);
// q, k, v ([B·T, H·hd], [B·S, K·hd]: attention, --batch, --heads, --kv-heads, --causal, scale
// 1/sqrt(hd)). Writes `y` with x's (or q's) dtype and shape.
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "qtool/formats/error.hpp"
#include "qtool/formats/safetensors.hpp"
#include "qtool/formats/thread_pool.hpp"
#include "qtool/runner/cpu_ops.hpp"

using namespace qtool;
using namespace qtool::runner;

namespace {

struct Options {
  float eps = 1e-6f;
  int64_t heads = 1, kv_heads = 1, head_dim = 0, batch = 1;
  bool causal = false;
  size_t threads = 2;
};

struct Io {
  const SafetensorsFile& file;
  Ops& ops;
  // The tensor as a [rows, cols] view in the ops' memory (1-D: [1, n]).
  Mat mat(const std::string& name) {
    const TensorInfo& t = file.at(name);
    if (t.shape.empty() || t.shape.size() > 2)
      fail(ErrorKind::InvalidInput, file.path().string(), ": tensor '", name, "' is not 1-D or 2-D");
    const int64_t rows = t.shape.size() == 2 ? t.shape[0] : 1;
    const Mat m = ops.alloc(rows, t.shape.back(), t.dtype);
    ops.upload(file.data(t).data(), m);
    return m;
  }
  // A plain weight bound to the file's bytes.
  DequantParams weight(const std::string& name) {
    const TensorInfo& t = file.at(name);
    DequantParams p;
    p.kind = t.dtype == DType::BF16  ? WeightKind::Bf16
             : t.dtype == DType::F16 ? WeightKind::F16
                                     : WeightKind::F32;
    p.rows = t.shape.size() == 2 ? static_cast<uint64_t>(t.shape[0]) : 1;
    p.cols = static_cast<uint64_t>(t.shape.back());
    p.weight = file.data(t).data();
    return p;
  }
  bool has(const std::string& name) const { return file.find(name) != nullptr; }
};

Activation activation_of(const std::string& op) {
  if (op == "silu") return Activation::Silu;
  if (op == "gelu_tanh") return Activation::GeluTanh;
  if (op == "gelu_new") return Activation::GeluNew;
  return Activation::QuickGelu;
}

// Runs `op` and returns its output view.
Mat run(const std::string& op, Io& io, const Options& o) {
  Ops& ops = io.ops;
  if (op == "attention") {
    const Mat q = io.mat("q"), k = io.mat("k"), v = io.mat("v");
    const int64_t hd = q.cols / o.heads;
    AttentionShape s{o.batch,
                     q.rows / o.batch,
                     k.rows / o.batch,
                     o.heads,
                     o.kv_heads,
                     hd,
                     static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd))),
                     o.causal};
    const Mat y = ops.alloc(q.rows, q.cols, q.dtype);
    ops.attention(q, k, v, s, y);
    return y;
  }
  const Mat x = io.mat("x");
  const Mat y = op == "linear" ? ops.alloc(x.rows, static_cast<int64_t>(io.weight("w").rows), x.dtype)
                               : ops.alloc(x.rows, x.cols, x.dtype);
  if (op == "rms_once" || op == "rms_twice") {
    ops.rms_norm(x, io.weight("w"), o.eps, op == "rms_once" ? RmsRounding::Once : RmsRounding::Twice,
                 o.head_dim, y);
  } else if (op == "layer_norm") {
    const DequantParams w = io.has("w") ? io.weight("w") : DequantParams{};
    const DequantParams b = io.has("b") ? io.weight("b") : DequantParams{};
    ops.layer_norm(x, io.has("w") ? &w : nullptr, io.has("b") ? &b : nullptr, o.eps, y);
  } else if (op == "modulate") {
    ops.modulate(x, io.mat("shift"), io.mat("scale"), o.batch, o.eps, y);
  } else if (op == "rope_halves" || op == "rope_adjacent") {
    ops.rope(op == "rope_halves" ? RopeStyle::Halves : RopeStyle::Adjacent, x, o.head_dim, io.mat("cos"),
             io.mat("sin"), y);
  } else if (op == "linear") {
    const DequantParams b = io.has("b") ? io.weight("b") : DequantParams{};
    ops.linear(x, io.weight("w"), io.has("b") ? &b : nullptr, y);
  } else if (op == "silu" || op == "gelu_tanh" || op == "gelu_new" || op == "quick_gelu") {
    ops.activation(activation_of(op), x, y);
  } else {
    fail(ErrorKind::Usage, "unknown op ", op);
  }
  return y;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    std::vector<std::string> args(argv + 1, argv + argc);
    if (args.size() < 3)
      fail(ErrorKind::Usage, "usage: ops_tool OP IN.safetensors OUT.safetensors [options]");
    Options o;
    for (size_t i = 3; i < args.size(); ++i) {
      const auto next = [&]() -> const std::string& {
        if (i + 1 >= args.size()) fail(ErrorKind::Usage, args[i], " needs a value");
        return args[++i];
      };
      if (args[i] == "--eps")
        o.eps = std::stof(next());
      else if (args[i] == "--heads")
        o.heads = std::stoll(next());
      else if (args[i] == "--kv-heads")
        o.kv_heads = std::stoll(next());
      else if (args[i] == "--head-dim")
        o.head_dim = std::stoll(next());
      else if (args[i] == "--batch")
        o.batch = std::stoll(next());
      else if (args[i] == "--threads")
        o.threads = std::stoull(next());
      else if (args[i] == "--causal")
        o.causal = true;
      else
        fail(ErrorKind::Usage, "unknown option ", args[i]);
    }
    const SafetensorsFile file = SafetensorsFile::open(args[1]);
    ThreadPool pool(o.threads);
    auto ops = make_cpu_ops(pool, uint64_t{1} << 30);
    Io io{file, *ops};
    const Mat y = run(args[0], io, o);
    std::vector<uint8_t> bytes(static_cast<size_t>(y.rows * y.cols) * y.elem_bytes());
    ops->download(y, bytes.data());
    SafetensorsWriter writer(args[2], {TensorDecl{"y", y.dtype, {y.rows, y.cols}}});
    writer.write("y", bytes);
    writer.commit();
    return 0;
  } catch (const Error& e) {
    std::fprintf(stderr, "ops_tool: %s\n", e.what());
    return e.kind() == ErrorKind::Internal ? 3 : 2;
  }
}
