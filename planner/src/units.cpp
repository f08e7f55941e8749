// Execution units: what each unit of each component holds, runs and costs.
#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <numeric>
#include <unordered_map>

#include "planner_impl.hpp"
#include "qtool/formats/checked.hpp"
#include "qtool/formats/error.hpp"
#include "qtool/formats/size.hpp"
#include "qtool/libquant/config.hpp"
#include "qtool/libquant/quant.hpp"

namespace qtool::planner {

using namespace detail;

void Planner::unit_work(UnitInfo& u, const CompData& cd,
                        const std::unordered_map<std::string, const QuantizedShape*>& quantized) const {
  const ModuleTree& tree = cd.tree;
  std::vector<int32_t> modules;
  // A unit's tensors come module by module (execution_units), so a module starts where the
  // previous tensor's module differs.
  for (uint32_t t : u.tensors) {
    const int32_t m = tree.tensor_module()[t];
    if (modules.empty() || modules.back() != m) modules.push_back(m);
  }
  std::vector<uint64_t> all_sizes;
  for (int32_t m : modules) {
    const ModuleNode& node = tree.node(m);
    Leaf leaf;
    leaf.prefix = node.prefix;
    std::vector<uint64_t> sizes;
    for (uint32_t t : node.tensors) {
      if (tree.tied_to()[t] >= 0 || tree.tensors()[t].absent) continue;
      leaf.tensors.push_back(t);
      leaf.bytes += tree.counted_bytes()[t];
      sizes.push_back(tree.tensors()[t].nbytes);
    }
    all_sizes.insert(all_sizes.end(), sizes.begin(), sizes.end());
    leaf.arena = layout_arena(sizes).total;
    if (!leaf.tensors.empty()) u.leaves.push_back(std::move(leaf));
    if (node.prefix.empty()) continue;
    LinearOp op;
    op.module = node.prefix;
    if (auto q = quantized.find(node.prefix); q != quantized.end()) {
      op.weight = node.prefix + ".weight";
      op.out = q->second->out;
      op.in = q->second->in;
      op.kind = q->second->kind;
    } else {
      int64_t w = -1;
      for (uint32_t t : node.tensors) {
        const std::string& name = tree.tensors()[t].name;
        if (name.size() == node.prefix.size() + 7 && name.ends_with(".weight")) w = t;
      }
      if (w < 0) continue;
      const int64_t tied = tree.tied_to()[static_cast<size_t>(w)];
      const TensorDesc& wd = tree.tensors()[static_cast<size_t>(tied >= 0 ? tied : w)];
      if (wd.shape.size() != 2 || wd.shape[0] <= 0 || wd.shape[1] <= 0) continue;
      if (quant::is_embedding_module(node.prefix)) continue;
      op.kind = dtype_kind(wd.dtype);
      if (op.kind.empty()) continue;
      op.weight = wd.name;
      op.out = wd.shape[0];
      op.in = wd.shape[1];
    }
    if (op.out <= 0 || op.in <= 0) continue;
    const uint64_t rows = cd.arch ? linear_rows(*cd.arch, op.module, cd.tokens) : opt_.tokens;
    u.flops += linear_flops(rows, op);
    const double secs = linear_seconds(op, rows, opt_.profile);
    u.compute_s += secs;
    if (!u.leaves.empty() && u.leaves.back().prefix == node.prefix) {
      u.leaves.back().compute_s += secs;
      if (!u.leaves.back().first_in) u.leaves.back().first_in = static_cast<uint64_t>(op.in);
    }
    if (!cd.arch) {  // a forward's activations are its own reserve items
      u.max_in = std::max<uint64_t>(u.max_in, static_cast<uint64_t>(op.in));
      u.max_out = std::max<uint64_t>(u.max_out, static_cast<uint64_t>(op.out));
    }
    if (op.kind != "bf16") u.max_dq = std::max<uint64_t>(u.max_dq, static_cast<uint64_t>(op.out * op.in));
    u.linears.push_back(std::move(op));
  }
  u.arena = layout_arena(all_sizes).total;
  if (cd.arch && u.is_block) {
    u.compute_s += cd.forward_ops_s_per_block;
    if (!u.leaves.empty()) u.leaves.front().compute_s += cd.forward_ops_s_per_block;
  }
}

// A component with a real forward: its activation items and its attention time per block.
void Planner::set_forward(CompData& cd, const ComponentInput& input) const {
  cd.arch = input.arch;
  cd.tokens = opt_.tokens;
  if (!cd.arch) return;
  // A FluxPipeline's text encoders run on the prompt's tokens, not the image's.
  if (class_name_of(in_.model_index) == "FluxPipeline")
    cd.tokens = static_cast<uint64_t>(flux_pipeline_tokens(*cd.arch, static_cast<int64_t>(opt_.tokens)));
  const auto tokens = static_cast<int64_t>(cd.tokens);
  for (const ActivationItem& item : activation_items(*cd.arch, 1, tokens, input.activation_dtype)) {
    cd.activations.push_back({item.name, item.bytes, item.detail});
    cd.activation_bytes += item.bytes;
  }
  uint64_t blocks = 0;
  if (const auto* l = std::get_if<LlamaArch>(&*cd.arch)) blocks = static_cast<uint64_t>(l->n_layers);
  if (const auto* f = std::get_if<FluxArch>(&*cd.arch))
    blocks = static_cast<uint64_t>(f->n_double + f->n_single);
  if (const auto* t = std::get_if<T5EncoderArch>(&*cd.arch)) blocks = static_cast<uint64_t>(t->n_layers);
  if (const auto* c = std::get_if<ClipTextArch>(&*cd.arch)) blocks = static_cast<uint64_t>(c->n_layers);
  cd.handover_bytes = handover_bytes(*cd.arch, 1, tokens, input.activation_dtype);
  const ForwardFlops f = forward_flops(*cd.arch, 1, tokens, dtype_size(input.activation_dtype));
  const double seconds = static_cast<double>(f.attention) / (opt_.profile.attention_tflops * 1e12) +
                         static_cast<double>(f.activation_bytes) / (opt_.profile.activation_gbps * 1e9);
  if (blocks) cd.forward_ops_s_per_block = seconds / static_cast<double>(blocks);
}

// One component's tree, forward and execution units (appended to units_).
void Planner::build_component(uint32_t ci) {
  const ComponentInput& input = in_.components[ci];
  CompData& cd = comps_[ci];
  cd.name = input.name;
  cd.class_name = class_name_of(input.config);
  if (opt_.templates) {
    const ModelTemplate* t = opt_.templates->find(cd.class_name);
    if (t && !t->is_pipeline()) cd.tmpl = t;
  }
  const std::vector<TiedPair> ties = tied_pairs_for(cd.tmpl, input.config);
  std::vector<TensorDesc> tensors = input.tensors;
  // A tied alias the checkpoint dropped still gets a place (0 bytes) so the device map covers it.
  std::unordered_map<std::string_view, size_t> by_name;
  if (!ties.empty()) {
    for (size_t i = 0; i < tensors.size(); ++i) by_name.emplace(tensors[i].name, i);
  }
  std::vector<TensorDesc> extra;
  for (const TiedPair& t : ties) {
    auto p = by_name.find(t.primary);
    if (p == by_name.end() || by_name.count(t.alias)) continue;
    TensorDesc d;
    d.name = t.alias;
    d.dtype = tensors[p->second].dtype;
    d.shape = tensors[p->second].shape;
    d.absent = true;
    extra.push_back(std::move(d));
  }
  for (TensorDesc& d : extra) tensors.push_back(std::move(d));
  cd.tree = ModuleTree::build(std::move(tensors), ties);
  cd.bytes = cd.tree.total_bytes();
  total_bytes_ += cd.bytes;
  std::unordered_map<std::string, const QuantizedShape*> quantized;
  for (const QuantizedShape& q : input.quantized) quantized.emplace(q.module, &q);
  set_forward(cd, input);

  cd.tensor_unit.assign(cd.tree.tensors().size(), -1);
  for (Unit& unit : execution_units(cd.tree, cd.tmpl)) {
    UnitInfo u;
    u.comp = ci;
    u.node = unit.node;
    u.prefix = cd.tree.node(unit.node).prefix;
    u.is_block = unit.is_block;
    u.tensors = std::move(unit.tensors);
    for (uint32_t t : u.tensors) u.bytes += cd.tree.counted_bytes()[t];
    unit_work(u, cd, quantized);
    const auto id = static_cast<uint32_t>(units_.size());
    for (uint32_t t : u.tensors) cd.tensor_unit[t] = static_cast<int32_t>(id);
    cd.units.push_back(id);
    units_.push_back(std::move(u));
  }
  // Pure tied aliases follow the unit holding their primary.
  for (uint32_t id : cd.units) {
    UnitInfo& u = units_[id];
    if (u.bytes != 0 || u.tensors.empty()) continue;
    int32_t follow = -1;
    bool all_tied = true;
    for (uint32_t t : u.tensors) {
      const int64_t p = cd.tree.tied_to()[t];
      if (p < 0) {
        all_tied = false;
        break;
      }
      follow = cd.tensor_unit[static_cast<size_t>(p)];
    }
    if (all_tied && follow >= 0 && follow != static_cast<int32_t>(id)) u.follow = follow;
  }
}

// Offload preference: blocks per component in offload priority, then the other units, largest first.
void Planner::offload_preference() {
  std::vector<uint32_t> prio = comp_order_;
  std::stable_sort(prio.begin(), prio.end(), [&](uint32_t a, uint32_t b) {
    auto rank = [&](uint32_t c) -> int64_t {
      const std::string& n = comps_[c].name;
      if (pipeline_tmpl_) {
        const auto& op = pipeline_tmpl_->offload_priority;
        auto it = std::find(op.begin(), op.end(), n);
        if (it != op.end()) return it - op.begin();
      }
      // Without a template: text encoders (run once) first, the denoiser (runs every step) last.
      if (n.find("text_encoder") != std::string::npos) return 1000;
      if (n.find("transformer") != std::string::npos || n.find("unet") != std::string::npos) return 3000;
      return 2000;
    };
    return rank(a) < rank(b);
  });
  for (uint32_t c : prio) {
    std::vector<uint32_t> blocks;
    for (uint32_t id : comps_[c].units) {
      if (units_[id].follow >= 0) continue;
      if (units_[id].is_block) blocks.push_back(id);
    }
    if (!blocks.empty()) offload_blocks_.push_back(std::move(blocks));
  }
  for (uint32_t c : prio) {
    std::vector<uint32_t> others;
    for (uint32_t id : comps_[c].units) {
      if (units_[id].follow < 0 && !units_[id].is_block) others.push_back(id);
    }
    std::stable_sort(others.begin(), others.end(),
                     [&](uint32_t a, uint32_t b) { return arena_[a] > arena_[b]; });
    offload_others_.insert(offload_others_.end(), others.begin(), others.end());
  }
}

void Planner::build_units() {
  const std::string pipeline_class = class_name_of(in_.model_index);
  if (opt_.templates && !pipeline_class.empty()) {
    const ModelTemplate* t = opt_.templates->find(pipeline_class);
    if (t && t->is_pipeline()) pipeline_tmpl_ = t;
  }
  std::vector<std::string> names;
  for (const ComponentInput& c : in_.components) names.push_back(c.name);
  for (size_t i : component_order(names, pipeline_tmpl_)) comp_order_.push_back(static_cast<uint32_t>(i));

  comps_.resize(in_.components.size());
  for (uint32_t ci : comp_order_) build_component(ci);
  arena_.resize(units_.size());
  for (size_t i = 0; i < units_.size(); ++i) arena_[i] = units_[i].follow >= 0 ? 0 : units_[i].arena;
  leaf_pinned_.assign(units_.size(), 0);
  leaf_max_.assign(units_.size(), 0);
  for (size_t i = 0; i < units_.size(); ++i) {
    for (const Leaf& l : units_[i].leaves) {
      leaf_pinned_[i] += round_up(l.arena, opt_.profile.host_alloc_granularity_bytes);
      leaf_max_[i] = std::max(leaf_max_[i], l.arena);
    }
  }

  offload_preference();
  n_offloadable_ = offload_others_.size();
  for (const auto& b : offload_blocks_) n_offloadable_ += b.size();
}

// The first m units by offload preference: blocks of the first component spread evenly in runs
// of n, then the next component's, then non-block units largest first.
std::vector<uint8_t> Planner::offload_set(size_t m, uint32_t n) const {
  std::vector<uint8_t> off(units_.size(), 0);
  size_t left = m;
  for (const std::vector<uint32_t>& blocks : offload_blocks_) {
    if (left == 0) break;
    const size_t B = blocks.size();
    const size_t b = std::min(left, B);
    left -= b;
    if (b == B) {
      for (uint32_t id : blocks) off[id] = 1;
      continue;
    }
    const size_t runs = (b + n - 1) / n;
    size_t taken = 0, prev_end = 0;
    for (size_t r = 0; r < runs; ++r) {
      const size_t len = std::min<size_t>(n, b - taken);
      // Centre of the r-th of `runs` equal stretches; clamp so every run fits after the previous.
      const double centre =
          (static_cast<double>(r) + 0.5) * static_cast<double>(B) / static_cast<double>(runs);
      size_t start = static_cast<size_t>(std::max(0.0, std::round(centre - static_cast<double>(len) / 2.0)));
      start = std::max(start, prev_end);
      start = std::min(start, B - (b - taken));
      for (size_t i = start; i < start + len; ++i) off[blocks[i]] = 1;
      prev_end = start + len;
      taken += len;
    }
  }
  for (size_t i = 0; i < left && i < offload_others_.size(); ++i) off[offload_others_[i]] = 1;
  return off;
}

}  // namespace qtool::planner
