#include "qtool/runner/tensor_compare.hpp"

#include <cstring>
#include <unordered_set>

#include "qtool/formats/error.hpp"
#include "qtool/libquant/quant.hpp"

namespace qtool::runner {
namespace {

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += str_cat(i ? ", " : "", shape[i]);
  return s + "]";
}

std::string label(const Component& c, std::string_view name) {
  return c.name().empty() ? str_cat("'", name, "'") : str_cat("'", c.name(), "/", name, "'");
}

}  // namespace

ReferenceTensors compare_with_reference(const Checkpoint& checkpoint, const Checkpoint& reference) {
  ReferenceTensors r;
  const auto differ = [&](std::string line) { r.differences.push_back(std::move(line)); };
  for (const Component& c : checkpoint.components()) {
    const Component* rc = reference.find_component(c.name());
    if (!rc) {
      differ(str_cat("component '", c.name(), "' is not in the reference ", reference.root().string()));
      continue;
    }
    std::unordered_set<std::string> quant_tensors, quant_weights;
    for (const quant::QuantizedLinear& q : quant::find_quantized_linears(c)) {
      ++r.n_quantized;
      for (const std::string& n : q.tensor_names) quant_tensors.insert(n);
      const std::string weight = q.module.empty() ? std::string("weight") : q.module + ".weight";
      quant_weights.insert(weight);
      const auto re = rc->find(weight);
      if (!re) {
        differ(str_cat(label(c, weight), ": quantized here, but the reference has no such tensor"));
        continue;
      }
      const TensorInfo& ri = rc->info(*re);
      if (ri.shape != q.shape)
        differ(str_cat(label(c, weight), ": quantized from shape ", shape_str(q.shape),
                       ", the reference's is ", shape_str(ri.shape)));
      // int8 records no original dtype (LLM.int8 quantizes the weight cast to float16).
      const quant::SchemeInfo& si = quant::scheme_info(q.options.scheme);
      if (si.records_orig_dtype && ri.dtype != q.orig_dtype)
        differ(str_cat(label(c, weight), ": the quant state records original dtype ",
                       dtype_name(q.orig_dtype), " (", si.orig_dtype_source, "), the reference's weight is ",
                       dtype_name(ri.dtype)));
    }
    for (const Component::Entry& e : c.entries()) {
      const TensorInfo& t = c.info(e);
      if (quant_tensors.count(t.name)) continue;
      const auto re = rc->find(t.name);
      if (!re) {
        differ(str_cat(label(c, t.name), ": not in the reference ", reference.root().string()));
        continue;
      }
      const TensorInfo& ri = rc->info(*re);
      if (ri.dtype != t.dtype || ri.shape != t.shape) {
        differ(str_cat(label(c, t.name), ": ", dtype_name(t.dtype), " ", shape_str(t.shape),
                       ", the reference's is ", dtype_name(ri.dtype), " ", shape_str(ri.shape)));
        continue;
      }
      const auto a = c.data(e), b = rc->data(*re);
      ++r.n_compared;
      r.bytes_compared += a.size();
      if (a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size()) == 0)) continue;
      size_t i = 0;
      while (i < a.size() && a[i] == b[i]) ++i;
      const size_t esize = dtype_size(t.dtype);
      differ(str_cat(label(c, t.name), ": differs from the reference's copy at byte ", i, " (element ",
                     esize ? i / esize : 0, "); an unquantized tensor must be copied unchanged"));
    }
    for (const Component::Entry& e : rc->entries()) {
      const std::string& name = rc->info(e).name;
      if (!c.find(name) && !quant_weights.count(name))
        differ(str_cat(label(c, name), ": in the reference but missing from the checkpoint"));
    }
  }
  return r;
}

}  // namespace qtool::runner
