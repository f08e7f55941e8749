// MappedWeights (driver.hpp): a component's tensors straight from the mapped checkpoint, each
// copied once into 256-byte aligned host memory (a quantized linear's parts side by side).
#include <cstdlib>
#include <cstring>
#include <unordered_map>

#include "qtool/formats/error.hpp"
#include "qtool/libquant/quant.hpp"
#include "qtool/runner/driver.hpp"
#include "qtool/runner/executor.hpp"

namespace qtool::runner {

struct MappedWeights::Impl {
  const Component& comp;
  std::unordered_map<std::string, std::string> tied;  // alias -> primary
  std::function<void(std::string_view, const DequantParams&, uint8_t*)> perturb;
  std::unordered_map<std::string, quant::QuantizedLinear> quantized;  // by weight tensor name
  std::unordered_map<std::string, std::pair<DequantParams, uint8_t*>> cache;

  Impl(const Component& c, std::unordered_map<std::string, std::string> t,
       std::function<void(std::string_view, const DequantParams&, uint8_t*)> p)
      : comp(c), tied(std::move(t)), perturb(std::move(p)) {
    for (quant::QuantizedLinear& ql : quant::find_quantized_linears(c))
      for (size_t k = 0; k < ql.tensor_names.size(); ++k)
        if (ql.tensor_parts[k] == quant::Part::Weight) {
          quantized.emplace(ql.tensor_names[k], ql);
          break;
        }
  }
  ~Impl() {
    for (auto& [name, entry] : cache) std::free(entry.second);
  }

  static uint8_t* aligned(uint64_t bytes) {
    const uint64_t n = std::max<uint64_t>(kArenaAlign, (bytes + kArenaAlign - 1) / kArenaAlign * kArenaAlign);
    auto* p = static_cast<uint8_t*>(std::aligned_alloc(kArenaAlign, n));
    if (!p)
      fail(ErrorKind::InvalidInput, "cannot allocate ", bytes,
           " bytes of host memory for a reference weight");
    return p;
  }

  std::pair<DequantParams, uint8_t*> load(const std::string& name) {
    if (const auto q = quantized.find(name); q != quantized.end()) {
      const DequantParams mapped = quantized_params(q->second, comp);
      const PartLayout layout = part_layout(mapped);
      uint8_t* mem = aligned(layout.total);
      for (int k = 0; k < kNumParts; ++k)
        if (layout.source[k]) std::memcpy(mem + layout.offset[k], layout.source[k], layout.sizes.bytes[k]);
      const DequantParams p = rebase_parts(mapped, layout, mem);
      return {p, mem};
    }
    const auto e = comp.find(name);
    QTOOL_ASSERT(e.has_value());
    const TensorInfo& info = comp.info(*e);
    DequantParams p;
    p.kind = weight_kind_of(info.dtype).value_or(WeightKind::F32);
    p.rows = info.shape.size() >= 2 ? static_cast<uint64_t>(info.shape[0]) : 1;
    p.cols = 1;
    for (size_t d = info.shape.size() >= 2 ? 1 : 0; d < info.shape.size(); ++d)
      p.cols *= static_cast<uint64_t>(info.shape[d]);
    uint8_t* mem = aligned(info.nbytes());
    std::memcpy(mem, comp.data(*e).data(), info.nbytes());
    p.weight = mem;
    if (perturb) perturb(name, p, mem);
    return {p, mem};
  }

  // The tensor `name` stands for: itself, or the primary of a tied alias the file lacks.
  std::string resolve(std::string_view name) const {
    const auto t = tied.find(std::string(name));
    return t != tied.end() && !comp.find(name) ? t->second : std::string(name);
  }

  bool known(std::string_view name) const {
    if (quantized.count(std::string(name))) return true;
    const auto e = comp.find(name);
    if (!e) return false;
    const DType dt = comp.info(*e).dtype;
    return dt == DType::BF16 || dt == DType::F16 || dt == DType::F32;
  }
};

MappedWeights::MappedWeights(const Component& component, std::unordered_map<std::string, std::string> tied,
                             std::function<void(std::string_view, const DequantParams&, uint8_t*)> perturb)
    : impl_(std::make_unique<Impl>(component, std::move(tied), std::move(perturb))) {}

MappedWeights::~MappedWeights() = default;

DequantParams MappedWeights::get(std::string_view requested) {
  const std::string name = impl_->resolve(requested);
  const std::string_view tensor = name;
  if (const auto it = impl_->cache.find(name); it != impl_->cache.end()) return it->second.first;
  if (!impl_->known(tensor))
    fail(ErrorKind::InvalidInput, "the forward needs tensor '", tensor, "', which ",
         impl_->comp.name().empty() ? std::string("the model") : "component '" + impl_->comp.name() + "'",
         " in ", impl_->comp.dir().string(), " lacks (or holds in a dtype the runner cannot read)");
  read_.push_back(name);
  return impl_->cache.emplace(name, impl_->load(name)).first->second.first;
}

bool MappedWeights::has(std::string_view tensor) const { return impl_->known(impl_->resolve(tensor)); }

}  // namespace qtool::runner
