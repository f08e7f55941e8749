// libquant_tool: drives libquant's schemes for the interop tests (libquant_interop.py).
//
//   libquant_tool quantize IN.safetensors OUT.safetensors SCHEME [--blocksize N] [--double-quant]
//                 [--per-tensor] [--threads N]
//       Quantizes every tensor of IN (2-D BF16/F16/F32, named <module>.weight) and writes the
//       layout quantized_decls describes.
//   libquant_tool dequantize IN.safetensors OUT.safetensors [--threads N]
//       Finds the quantized linears of IN and writes each dequantized weight as <module>.weight F32.
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "qtool/formats/checkpoint.hpp"
#include "qtool/formats/error.hpp"
#include "qtool/formats/safetensors.hpp"
#include "qtool/formats/thread_pool.hpp"
#include "qtool/libquant/quant.hpp"

using namespace qtool;

namespace {

int quantize(const std::string& in, const std::string& out, const quant::SchemeOptions& options,
             ThreadPool& pool) {
  const SafetensorsFile file = SafetensorsFile::open(in);
  std::vector<quant::OwnedTensor> tensors;
  for (const TensorInfo& t : file.tensors()) {
    const std::string module = quant::module_of_tensor(t.name);
    auto q = quant::quantize_weight(module, str_cat(in, ": tensor '", t.name, "'"), t.dtype, t.shape,
                                    file.data(t), options, pool);
    for (auto& x : q) tensors.push_back(std::move(x));
  }
  std::vector<TensorDecl> decls;
  for (const auto& t : tensors) decls.push_back(t.decl);
  SafetensorsWriter writer(out, decls);
  for (const auto& t : tensors) writer.write(t.decl.name, t.bytes);
  writer.commit();
  return 0;
}

int dequantize(const std::string& in, const std::string& out, ThreadPool& pool) {
  const Component comp = Component::open_file(in, "");
  const auto linears = quant::find_quantized_linears(comp);
  std::vector<TensorDecl> decls;
  std::vector<std::vector<float>> values;
  for (const auto& q : linears) {
    decls.push_back({q.module + ".weight", DType::F32, q.shape});
    values.emplace_back(q.numel());
    quant::dequantize_weight(q, comp, values.back().data(), pool);
  }
  SafetensorsWriter writer(out, decls);
  for (size_t i = 0; i < decls.size(); ++i)
    writer.write(decls[i].name, {reinterpret_cast<const uint8_t*>(values[i].data()), values[i].size() * 4});
  writer.commit();
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    std::vector<std::string> args(argv + 1, argv + argc);
    if (args.size() < 3) {
      std::fprintf(stderr, "usage: libquant_tool quantize|dequantize IN OUT [SCHEME] [options]\n");
      return 2;
    }
    quant::SchemeOptions options;
    size_t threads = 2;
    size_t i = args[0] == "quantize" ? 4 : 3;
    if (args[0] == "quantize") {
      const auto s = quant::parse_scheme(args.at(3));
      if (!s) fail(ErrorKind::Usage, "unknown scheme ", args[3]);
      options.scheme = *s;
    }
    for (; i < args.size(); ++i) {
      if (args[i] == "--blocksize")
        options.blocksize = static_cast<uint32_t>(std::stoul(args.at(++i)));
      else if (args[i] == "--double-quant")
        options.double_quant = true;
      else if (args[i] == "--per-tensor")
        options.per_tensor = true;
      else if (args[i] == "--threads")
        threads = std::stoul(args.at(++i));
      else
        fail(ErrorKind::Usage, "unknown option ", args[i]);
    }
    ThreadPool pool(threads);
    if (args[0] == "quantize") return quantize(args[1], args[2], options, pool);
    if (args[0] == "dequantize") return dequantize(args[1], args[2], pool);
    fail(ErrorKind::Usage, "unknown command ", args[0]);
  } catch (const Error& e) {
    std::fprintf(stderr, "libquant_tool: %s\n", e.what());
    return e.kind() == ErrorKind::Internal ? 3 : 2;
  }
}
