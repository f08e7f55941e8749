#include "qtool/planner/planner.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <numeric>
#include <unordered_map>

#include "planner_internal.hpp"
#include "qtool/formats/checked.hpp"
#include "qtool/formats/error.hpp"
#include "qtool/formats/size.hpp"
#include "qtool/libquant/config.hpp"
#include "qtool/libquant/quant.hpp"

namespace qtool::planner {

Strategy parse_strategy(std::string_view text) {
  if (text == "sequential") return Strategy::Sequential;
  if (text == "balanced") return Strategy::Balanced;
  if (text == "balanced_low_0") return Strategy::BalancedLow0;
  if (text == "auto") return Strategy::Auto;
  fail(ErrorKind::Usage, "--device-map: unknown strategy '", text, "' (sequential, balanced, balanced_low_0, auto)");
}

std::string_view strategy_name(Strategy s) {
  switch (s) {
    case Strategy::Sequential: return "sequential";
    case Strategy::Balanced: return "balanced";
    case Strategy::BalancedLow0: return "balanced_low_0";
    case Strategy::Auto: return "auto";
  }
  return "?";
}

OffloadMode parse_offload_mode(std::string_view text) {
  if (text == "auto") return OffloadMode::Auto;
  if (text == "block") return OffloadMode::Block;
  if (text == "leaf") return OffloadMode::Leaf;
  fail(ErrorKind::Usage, "--offload: unknown mode '", text, "' (auto, block, leaf)");
}

PipelineInput plan_input_of(const Checkpoint& checkpoint) {
  PipelineInput in;
  in.path = checkpoint.root().string();
  in.fingerprint = checkpoint.fingerprint();
  in.model_index = checkpoint.model_index();
  for (const Component& c : checkpoint.components()) {
    ComponentInput ci;
    ci.name = c.name();
    ci.config = c.config();
    ci.tensors = tensor_descs(c);
    for (const quant::QuantizedLinear& q : quant::find_quantized_linears(c)) {
      ci.quantized.push_back({q.module, q.rows(), q.cols(), std::string(quant::scheme_name(q.options.scheme))});
    }
    ci.arch = arch_of(c);
    if (ci.arch) ci.activation_dtype = model_dtype(*ci.arch, c);
    in.components.push_back(std::move(ci));
  }
  return in;
}

namespace {

std::string dtype_kind(DType dt) {
  switch (dt) {
    case DType::BF16: return "bf16";
    case DType::F16: return "f16";
    case DType::F32: return "f32";
    default: return "";
  }
}

}  // namespace

uint64_t linear_rows(const Arch& arch, std::string_view module, uint64_t tokens) {
  const auto* flux = std::get_if<FluxArch>(&arch);
  if (!flux) return tokens;  // Llama: every linear on every token
  const auto ends = [&](std::string_view suffix) { return module.ends_with(suffix); };
  const uint64_t text = static_cast<uint64_t>(flux->text_tokens);
  if (module.starts_with("time_text_embed.") || ends("norm1.linear") || ends("norm1_context.linear") ||
      ends(".norm.linear") || module == "norm_out.linear")
    return 1;  // per sample: timestep / text embeddings and modulation vectors
  if (module.starts_with("single_transformer_blocks.")) return tokens + text;
  if (module == "context_embedder" || module.find(".add_") != std::string_view::npos || ends(".to_add_out") ||
      module.find(".ff_context.") != std::string_view::npos)
    return text;
  return tokens;
}

double copy_seconds(uint64_t bytes, const Location& target, const DeviceProfile& p) {
  double s = static_cast<double>(bytes) / (p.h2d_pinned_gbps * 1e9) + p.copy_latency_us * 1e-6;
  if (target.kind == Location::Kind::Disk) s += static_cast<double>(bytes) / (p.disk_read_gbps * 1e9);
  return s;
}

// 2 * tokens * out * in, checked: tokens and shapes come from the command line and the files.
static uint64_t linear_flops(uint64_t tokens, const LinearOp& op) {
  const auto f = checked_mul(2 * tokens, static_cast<uint64_t>(op.out), static_cast<uint64_t>(op.in));
  if (!f) {
    fail(ErrorKind::InvalidInput, "linear '", op.module, "' [", op.out, ", ", op.in, "] at ", tokens,
         " tokens: its FLOP count overflows 64 bits (lower --tokens)");
  }
  return *f;
}

double linear_seconds(const LinearOp& l, uint64_t tokens, const DeviceProfile& p) {
  const double numel = static_cast<double>(l.out) * static_cast<double>(l.in);
  double s = 2.0 * static_cast<double>(tokens) * numel / (p.bf16_tflops * 1e12) + p.kernel_launch_us * 1e-6;
  if (l.kind != "bf16") s += numel / p.dequant_rate(l.kind) + p.kernel_launch_us * 1e-6;
  return s;
}

// ---- Contiguous partitions ---------------------------------------------------------------------

size_t greedy_fill(const std::vector<uint32_t>& seq, size_t from, const std::vector<uint64_t>& size,
                   const std::vector<size_t>& order, const std::vector<uint64_t>& limit, std::vector<uint64_t>& load,
                   std::vector<int32_t>& gpu_of) {
  size_t i = from;
  for (size_t pos : order) {
    while (i < seq.size() && load[pos] + size[seq[i]] <= limit[pos]) {
      load[pos] += size[seq[i]];
      gpu_of[seq[i]] = static_cast<int32_t>(pos);
      ++i;
    }
    if (i == seq.size()) break;
  }
  return i;
}

namespace {

// Leftover units seq[from..] go first fit to the GPUs in `order`: a GPU skipped by the
// contiguous fill is revisited.
bool revisit(const std::vector<uint32_t>& seq, size_t from, const std::vector<uint64_t>& size,
             const std::vector<size_t>& order, const std::vector<uint64_t>& cap, std::vector<uint64_t>& load,
             std::vector<int32_t>& gpu_of) {
  for (size_t i = from; i < seq.size(); ++i) {
    bool placed = false;
    for (size_t pos : order) {
      if (load[pos] + size[seq[i]] <= cap[pos]) {
        load[pos] += size[seq[i]];
        gpu_of[seq[i]] = static_cast<int32_t>(pos);
        placed = true;
        break;
      }
    }
    if (!placed) return false;
  }
  return true;
}

}  // namespace

bool partition(Strategy strategy, const std::vector<uint32_t>& seq, const std::vector<uint64_t>& size,
               const std::vector<uint64_t>& cap, std::vector<int32_t>& gpu_of) {
  const size_t k = cap.size();
  if (seq.empty()) return true;
  if (k == 0) return false;
  std::vector<size_t> all(k);
  std::iota(all.begin(), all.end(), 0);
  auto run_sequential = [&](const std::vector<size_t>& order) {
    std::vector<uint64_t> load(k, 0);
    const size_t stop = greedy_fill(seq, 0, size, order, cap, load, gpu_of);
    return stop == seq.size() || revisit(seq, stop, size, order, cap, load, gpu_of);
  };
  // The smallest largest-load L for which a contiguous fill of seq[from..] over `order` with
  // limits min(L, cap) covers everything (greedy is optimal for a fixed device order).
  auto balance = [&](const std::vector<size_t>& order, size_t from) -> bool {
    uint64_t rest = 0, big = 0, hi = 0;
    for (size_t i = from; i < seq.size(); ++i) {
      rest += size[seq[i]];
      big = std::max(big, size[seq[i]]);
    }
    if (from == seq.size()) return true;
    for (size_t pos : order) hi = std::max(hi, cap[pos]);
    uint64_t lo = std::max<uint64_t>(big, order.empty() ? 0 : rest / order.size());
    if (lo > hi) return false;
    std::vector<uint64_t> limit(k), load(k);
    std::vector<int32_t> scratch = gpu_of;
    auto fits = [&](uint64_t L) {
      for (size_t pos = 0; pos < k; ++pos) limit[pos] = std::min(L, cap[pos]);
      std::fill(load.begin(), load.end(), 0);
      return greedy_fill(seq, from, size, order, limit, load, scratch) == seq.size();
    };
    if (!fits(hi)) return false;
    while (lo < hi) {
      const uint64_t mid = lo + (hi - lo) / 2;
      if (fits(mid)) hi = mid;
      else lo = mid + 1;
    }
    fits(lo);
    for (size_t i = from; i < seq.size(); ++i) gpu_of[seq[i]] = scratch[seq[i]];
    return true;
  };
  switch (strategy) {
    case Strategy::Sequential:
      return run_sequential(all);
    case Strategy::Balanced:
    case Strategy::Auto:
      if (balance(all, 0)) return true;
      return run_sequential(all);
    case Strategy::BalancedLow0: {
      if (k == 1) return run_sequential(all);
      const std::vector<size_t> rest(all.begin() + 1, all.end());
      // Shortest prefix for GPU 0 such that the suffix fits contiguously on GPUs 1..k-1
      // (monotone in the prefix length), then the suffix balanced over them.
      auto suffix_fits = [&](size_t p) {
        std::vector<uint64_t> load(k, 0);
        std::vector<int32_t> scratch = gpu_of;
        return greedy_fill(seq, p, size, rest, cap, load, scratch) == seq.size();
      };
      size_t lo = 0, hi = seq.size();
      while (lo < hi) {
        const size_t mid = (lo + hi) / 2;
        if (suffix_fits(mid)) hi = mid;
        else lo = mid + 1;
      }
      uint64_t prefix = 0;
      for (size_t i = 0; i < lo; ++i) prefix += size[seq[i]];
      if (prefix <= cap[0]) {
        for (size_t i = 0; i < lo; ++i) gpu_of[seq[i]] = 0;
        if (balance(rest, lo)) return true;
      }
      std::vector<size_t> order = rest;
      order.push_back(0);
      return run_sequential(order);
    }
  }
  return false;
}

// ---- The planner -------------------------------------------------------------------------------

namespace {

struct Leaf {
  std::string prefix;
  std::vector<uint32_t> tensors;  // component tensor indices, tied copies excluded
  uint64_t bytes = 0;
  uint64_t arena = 0;
  double compute_s = 0;   // its linear, if it runs one
  uint64_t first_in = 0;  // that linear's input features (0: none)
};

struct UnitInfo {
  uint32_t comp = 0;
  int32_t node = -1;
  std::string prefix;
  bool is_block = false;
  std::vector<uint32_t> tensors;  // every tensor, execution order (tied copies included)
  uint64_t bytes = 0;             // counted bytes
  uint64_t arena = 0;             // layout_arena of the tensors it holds
  std::vector<Leaf> leaves;       // modules holding tensors, in order
  std::vector<LinearOp> linears;
  uint64_t flops = 0;
  double compute_s = 0;
  uint64_t max_in = 0, max_out = 0, max_dq = 0;
  int32_t follow = -1;            // a pure tied alias: takes this unit's place
};

struct CompData {
  std::string name;
  std::string class_name;
  const ModelTemplate* tmpl = nullptr;
  ModuleTree tree;
  std::vector<uint32_t> units;       // global unit ids in execution order
  std::vector<int32_t> tensor_unit;  // per tensor: global unit id
  uint64_t bytes = 0;
  std::optional<Arch> arch;                // a real forward runs (else linears only)
  std::vector<ReserveItem> activations;    // its activation items at the plan's tokens
  uint64_t activation_bytes = 0;
  double attention_s_per_block = 0;        // its attention, shared by its blocks
};

struct Candidate {
  OffloadMode mode = OffloadMode::Block;  // Block or Leaf; meaningless when m == 0
  uint32_t n = 1;                         // units per group (block mode)
  uint32_t k = 0;                         // slots per streaming GPU
  // -1: each GPU streams the offloaded units that fall in its part of the order; p >= 0: only GPU
  // position p streams (holds slots) and runs every offloaded unit, the others hold no slots.
  int32_t stream = -1;
};

struct GroupDraft {
  std::vector<uint32_t> units;  // block mode: the units; leaf mode: the one unit
  int32_t leaf = -1;            // leaf mode: index into units_[units[0]].leaves
  int32_t exec = 0;             // GPU position
  uint64_t arena = 0;
  uint64_t bytes = 0;
  Location target = Location::cpu();
};

struct StepDraft {
  std::vector<uint32_t> units;
  int32_t leaf = -1;  // leaf-mode group step: the one leaf run
  int32_t group = -1;
  int32_t exec = 0;
};

struct Outcome {
  bool ok = false;
  size_t m = 0;
  Candidate cand;
  std::vector<int32_t> gpu_of;   // per unit: GPU position, -1 offloaded
  std::vector<int32_t> exec_of;  // per unit: GPU position that runs it
  std::vector<GroupDraft> groups;
  std::vector<int32_t> unit_group;  // per unit: first group holding it (-1 resident)
  std::vector<StepDraft> steps;
  std::vector<GpuWork> work;        // per GPU position
  uint64_t host_pinned = 0, host_staging = 0, host_needed = 0;
  bool host_ok = true;
  double step_s = std::numeric_limits<double>::infinity();
  double transfer_s = 0, compute_s = 0;
  uint64_t offloaded = 0;
  uint64_t peak_sum = 0;
};

class Planner {
 public:
  Planner(const PipelineInput& in, const PlanOptions& opt) : in_(in), opt_(opt) {}
  Plan run();

 private:
  void build_units();
  void set_forward(CompData& cd, const ComponentInput& input) const;
  void unit_work(UnitInfo& u, const CompData& cd,
                 const std::unordered_map<std::string, const QuantizedShape*>& quantized) const;
  std::vector<uint8_t> offload_set(size_t m, uint32_t n) const;
  // full == false: only whether it fits (partition, groups, host budget), for the searches.
  Outcome place(const Candidate& c, size_t m, bool full = true) const;
  void make_groups(Outcome& o) const;
  void make_steps(Outcome& o) const;
  void assign_targets(Outcome& o) const;
  size_t decide_targets(Outcome& o, const std::vector<uint64_t>& bundle_pinned,
                        const std::vector<uint64_t>& bundle_max) const;
  void simulate(Outcome& o) const;
  GpuWork base_work() const;
  uint64_t page_tables_bound() const;
  struct SearchResult {
    Outcome best;
    bool host_short = false;       // some plan fit the GPUs but not the cpu budget
    uint64_t host_needed = kUnlimited;
  };
  SearchResult search() const;
  [[noreturn]] void infeasible_gpu();
  [[noreturn]] void infeasible_host(uint64_t needed) const;
  Plan assemble(const Outcome& o) const;
  std::string unit_reason(const Outcome& o, uint32_t u) const;

  const PipelineInput& in_;
  const PlanOptions& opt_;
  std::vector<CompData> comps_;       // in input order
  std::vector<uint32_t> comp_order_;  // execution order of components
  std::vector<UnitInfo> units_;       // global execution order
  std::vector<uint64_t> arena_;       // per unit
  std::vector<uint64_t> leaf_pinned_; // per unit: its leaves' arenas, each rounded to host pages
  std::vector<uint64_t> leaf_max_;    // per unit: its largest leaf arena
  std::vector<int32_t> gpu_index_;    // per position: the GPU's index
  std::vector<uint64_t> gpu_budget_;  // per position
  std::vector<std::string> gpu_source_;
  std::vector<uint64_t> fixed_;       // per position: reserve without slots, global maxima
  uint64_t host_budget_ = kUnlimited;
  std::string host_source_;
  uint64_t page_tables_bound_ = 0;    // pinned page tables for the most host memory a plan can pin
  const ModelTemplate* pipeline_tmpl_ = nullptr;
  // Offload preference: blocks per component (in offload priority), then other units.
  std::vector<std::vector<uint32_t>> offload_blocks_;
  std::vector<uint32_t> offload_others_;
  size_t n_offloadable_ = 0;
  uint64_t total_bytes_ = 0;
};

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
    const uint64_t rows = cd.arch ? linear_rows(*cd.arch, op.module, opt_.tokens) : opt_.tokens;
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
    u.compute_s += cd.attention_s_per_block;
    if (!u.leaves.empty()) u.leaves.front().compute_s += cd.attention_s_per_block;
  }
}

// A component with a real forward: its activation items and its attention time per block.
void Planner::set_forward(CompData& cd, const ComponentInput& input) const {
  cd.arch = input.arch;
  if (!cd.arch) return;
  const auto tokens = static_cast<int64_t>(opt_.tokens);
  for (const ActivationItem& item : activation_items(*cd.arch, 1, tokens, input.activation_dtype)) {
    cd.activations.push_back({item.name, item.bytes, item.detail});
    cd.activation_bytes += item.bytes;
  }
  uint64_t blocks = 0;
  if (const auto* l = std::get_if<LlamaArch>(&*cd.arch)) blocks = static_cast<uint64_t>(l->n_layers);
  if (const auto* f = std::get_if<FluxArch>(&*cd.arch)) blocks = static_cast<uint64_t>(f->n_double + f->n_single);
  const double attention = static_cast<double>(forward_flops(*cd.arch, 1, tokens).attention);
  if (blocks) cd.attention_s_per_block = attention / static_cast<double>(blocks) / (opt_.profile.bf16_tflops * 1e12);
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
  for (uint32_t ci : comp_order_) {
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

  // Offload preference.
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
    std::stable_sort(others.begin(), others.end(), [&](uint32_t a, uint32_t b) { return arena_[a] > arena_[b]; });
    offload_others_.insert(offload_others_.end(), others.begin(), others.end());
  }
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
      const double centre = (static_cast<double>(r) + 0.5) * static_cast<double>(B) / static_cast<double>(runs);
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

// The page tables of the most pinned host memory any plan can use: every unit's leaves pinned
// (each rounded to host pages) plus a staging ring, but no more than the cpu budget.
uint64_t Planner::page_tables_bound() const {
  uint64_t pinned = 0, largest = 0;
  for (size_t i = 0; i < units_.size(); ++i) {
    pinned += std::max(leaf_pinned_[i], round_up(arena_[i], opt_.profile.host_alloc_granularity_bytes));
    largest = std::max(largest, arena_[i]);
  }
  uint32_t max_k = 8;
  if (opt_.prefetch) max_k = *opt_.prefetch;
  uint32_t max_n = 4;  // the largest blocks-per-group candidate
  if (opt_.blocks_per_group) max_n = *opt_.blocks_per_group;
  const uint64_t ring = checked_mul(max_k, max_n, largest).value_or(UINT64_MAX);
  return pinned_page_table_bytes(opt_.profile,
                                 std::min(checked_add(pinned, ring).value_or(UINT64_MAX), host_budget_));
}

GpuWork Planner::base_work() const {
  GpuWork w;
  w.tokens = opt_.tokens;
  for (const UnitInfo& u : units_) {
    w.max_in = std::max(w.max_in, u.max_in);
    w.max_out = std::max(w.max_out, u.max_out);
    w.max_dequant_numel = std::max(w.max_dequant_numel, u.max_dq);
  }
  for (const CompData& cd : comps_) {
    uint64_t have = 0;
    for (const ReserveItem& it : w.forward_activations) have += it.bytes;
    if (cd.activation_bytes > have) w.forward_activations = cd.activations;
  }
  w.used = true;
  return w;
}

void Planner::make_groups(Outcome& o) const {
  const Candidate& c = o.cand;
  o.groups.clear();
  o.unit_group.assign(units_.size(), -1);
  GroupDraft cur;
  int32_t last = -2;  // the previous unit id in order that was offloaded into cur
  auto flush = [&]() {
    if (cur.units.empty()) return;
    // Tensors laid out back to back at 256-byte boundaries: the group's arena is the sum of its
    // units' arenas.
    for (uint32_t u : cur.units) {
      cur.bytes += units_[u].bytes;
      cur.arena += arena_[u];
    }
    for (uint32_t u : cur.units) {
      if (o.unit_group[u] < 0) o.unit_group[u] = static_cast<int32_t>(o.groups.size());
    }
    o.groups.push_back(std::move(cur));
    cur = GroupDraft();
  };
  for (uint32_t id = 0; id < units_.size(); ++id) {
    if (o.gpu_of[id] >= 0 || units_[id].follow >= 0) continue;
    if (c.mode == OffloadMode::Leaf) {
      flush();
      const UnitInfo& u = units_[id];
      for (size_t l = 0; l < u.leaves.size(); ++l) {
        GroupDraft g;
        g.units = {id};
        g.leaf = static_cast<int32_t>(l);
        g.exec = o.exec_of[id];
        g.arena = u.leaves[l].arena;
        g.bytes = u.leaves[l].bytes;
        if (o.unit_group[id] < 0) o.unit_group[id] = static_cast<int32_t>(o.groups.size());
        o.groups.push_back(std::move(g));
      }
      if (u.leaves.empty()) {
        // A unit without stored tensors (should not happen for an offloaded unit): nothing to move.
        o.gpu_of[id] = o.exec_of[id];
      }
      continue;
    }
    const bool extend = !cur.units.empty() && last == static_cast<int32_t>(id) - 1 &&
                        units_[cur.units.back()].comp == units_[id].comp && cur.exec == o.exec_of[id] &&
                        cur.units.size() < c.n;
    if (!extend) {
      flush();
      cur.exec = o.exec_of[id];
    }
    cur.units.push_back(id);
    last = static_cast<int32_t>(id);
  }
  flush();
}

void Planner::make_steps(Outcome& o) const {
  o.steps.clear();
  std::vector<uint8_t> done(o.groups.size(), 0);
  for (uint32_t id = 0; id < units_.size(); ++id) {
    const UnitInfo& u = units_[id];
    if (u.follow >= 0) {
      // A tied alias runs where its primary is: resident there, or from the primary's group.
      // Right after its primary's step (T5's encoder.embed_tokens after `shared`) it joins that
      // step: the bytes are on the GPU already, a second copy of the group would be waste.
      const uint32_t p = static_cast<uint32_t>(u.follow);
      StepDraft s;
      s.units = {id};
      s.exec = o.exec_of[id];
      if (o.gpu_of[p] < 0) s.group = o.unit_group[p];
      if (!o.steps.empty()) {
        StepDraft& prev = o.steps.back();
        if (prev.group == s.group && prev.exec == s.exec && prev.leaf < 0 &&
            std::find(prev.units.begin(), prev.units.end(), p) != prev.units.end()) {
          prev.units.push_back(id);
          continue;
        }
      }
      o.steps.push_back(std::move(s));
      continue;
    }
    if (o.gpu_of[id] >= 0) {
      o.steps.push_back({{id}, -1, -1, o.gpu_of[id]});
      continue;
    }
    // Offloaded: one step per group at its first unit.
    for (int32_t g = o.unit_group[id]; g >= 0 && g < static_cast<int32_t>(o.groups.size()); ++g) {
      const GroupDraft& gd = o.groups[static_cast<size_t>(g)];
      if (std::find(gd.units.begin(), gd.units.end(), id) == gd.units.end()) break;
      if (done[static_cast<size_t>(g)]) break;
      done[static_cast<size_t>(g)] = 1;
      o.steps.push_back({gd.units, gd.leaf, g, gd.exec});
    }
  }
}

// cpu (pinned) while the host budget lasts, in execution order, the rest to disk; all groups of
// one unit share a target.
void Planner::assign_targets(Outcome& o) const {
  const uint64_t hg = opt_.profile.host_alloc_granularity_bytes;
  // Bundles: runs of groups sharing a unit.
  std::vector<std::pair<size_t, size_t>> bundles;
  for (size_t g = 0; g < o.groups.size();) {
    size_t e = g + 1;
    while (e < o.groups.size() && o.groups[e].units.front() == o.groups[g].units.back()) ++e;
    bundles.push_back({g, e});
    g = e;
  }
  std::vector<uint64_t> bundle_pinned(bundles.size(), 0), bundle_max(bundles.size(), 0);
  for (size_t b = 0; b < bundles.size(); ++b) {
    for (size_t g = bundles[b].first; g < bundles[b].second; ++g) {
      bundle_pinned[b] += round_up(o.groups[g].arena, hg);
      bundle_max[b] = std::max(bundle_max[b], o.groups[g].arena);
    }
  }
  const size_t n_cpu = decide_targets(o, bundle_pinned, bundle_max);
  for (size_t b = 0; b < bundles.size(); ++b) {
    for (size_t g = bundles[b].first; g < bundles[b].second; ++g) {
      o.groups[g].target = b < n_cpu ? Location::cpu() : Location::disk();
    }
  }
}

// The first bundles (in execution order) pinned in host memory while the cpu budget lasts, the
// rest read from disk through a staging ring of K buffers of the largest of them. Returns the
// number of pinned bundles and sets the outcome's host figures.
size_t Planner::decide_targets(Outcome& o, const std::vector<uint64_t>& bundle_pinned,
                               const std::vector<uint64_t>& bundle_max) const {
  const uint64_t hg = opt_.profile.host_alloc_granularity_bytes;
  const size_t n_bundles = bundle_pinned.size();
  uint64_t total_pinned = 0;
  for (uint64_t b : bundle_pinned) total_pinned += b;
  const uint64_t k = std::max<uint32_t>(o.cand.k, 1);
  // The largest arena among the bundles from b on, for the staging ring.
  std::vector<uint64_t> suffix_max(n_bundles + 1, 0);
  for (size_t b = n_bundles; b-- > 0;) suffix_max[b] = std::max(suffix_max[b + 1], bundle_max[b]);
  size_t n_cpu = n_bundles;
  uint64_t pinned = total_pinned;
  auto need = [&](size_t ncpu, uint64_t pin) {
    const uint64_t staging = ncpu < n_bundles ? round_up(k * suffix_max[ncpu], hg) : 0;
    return pin + staging;
  };
  while (need(n_cpu, pinned) > host_budget_ && n_cpu > 0) {
    --n_cpu;
    pinned -= bundle_pinned[n_cpu];
  }
  o.host_pinned = pinned;
  o.host_staging = n_cpu < n_bundles ? round_up(k * suffix_max[n_cpu], hg) : 0;
  o.host_needed = need(n_cpu, pinned);
  o.host_ok = o.host_needed <= host_budget_;
  return n_cpu;
}

void Planner::simulate(Outcome& o) const {
  const DeviceProfile& p = opt_.profile;
  const size_t ngpu = gpu_budget_.size();
  std::vector<double> copy_free(ngpu, 0.0);
  std::vector<std::vector<double>> slot_free(ngpu);  // per GPU: release time of each copy's slot
  const size_t k = std::max<uint32_t>(o.cand.k, 1);
  double t = 0;
  int32_t prev_exec = -1;
  o.transfer_s = 0;
  o.compute_s = 0;
  for (const StepDraft& s : o.steps) {
    double compute = 0;
    uint64_t first_in = 0;
    for (uint32_t id : s.units) {
      const UnitInfo& u = units_[id];
      if (s.leaf >= 0) {
        const Leaf& l = u.leaves[static_cast<size_t>(s.leaf)];
        compute += l.compute_s;
        if (!first_in) first_in = l.first_in;
      } else {
        compute += u.compute_s;
        if (!first_in && !u.linears.empty()) first_in = static_cast<uint64_t>(u.linears.front().in);
      }
    }
    double start = t;
    if (prev_exec >= 0 && s.exec != prev_exec && first_in) {
      start += static_cast<double>(opt_.tokens) * static_cast<double>(first_in) * 2.0 / (p.p2p_gbps * 1e9);
    }
    if (s.group >= 0) {
      const GroupDraft& g = o.groups[static_cast<size_t>(s.group)];
      const size_t e = static_cast<size_t>(s.exec);
      std::vector<double>& ring = slot_free[e];
      double copy_start = copy_free[e];
      if (ring.size() >= k) copy_start = std::max(copy_start, ring[ring.size() - k]);
      const double dur = copy_seconds(g.arena, g.target, p);
      const double copy_end = copy_start + dur;
      copy_free[e] = copy_end;
      o.transfer_s += dur;
      start = std::max(start, copy_end);
      ring.push_back(start + compute);
    }
    t = start + compute;
    o.compute_s += compute;
    prev_exec = s.exec;
  }
  o.step_s = t;
}

Outcome Planner::place(const Candidate& c, size_t m, bool full) const {
  Outcome o;
  o.cand = c;
  o.m = m;
  const size_t ngpu = gpu_budget_.size();
  const uint64_t gran = opt_.profile.alloc_granularity_bytes;
  const std::vector<uint8_t> off = m ? offload_set(m, c.mode == OffloadMode::Block ? c.n : 1) : std::vector<uint8_t>(units_.size(), 0);
  // Slot size estimate: the largest group these units can form (a GPU boundary only splits groups).
  uint64_t slot = 0;
  if (m) {
    if (c.mode == OffloadMode::Leaf) {
      for (uint32_t id = 0; id < units_.size(); ++id) {
        if (off[id]) slot = std::max(slot, leaf_max_[id]);
      }
    } else {
      uint64_t run_arena = 0;
      uint32_t run = 0;
      uint32_t prev = 0;
      auto close = [&]() {
        slot = std::max(slot, run_arena);
        run_arena = 0;
        run = 0;
      };
      for (uint32_t id = 0; id < units_.size(); ++id) {
        if (!off[id]) continue;
        if (run > 0 && (prev + 1 != id || run == c.n || units_[prev].comp != units_[id].comp)) close();
        run_arena += arena_[id];
        ++run;
        prev = id;
      }
      if (run) close();
    }
  }
  // A real forward holds every tensor of a unit while it runs: in leaf mode all the leaves of an
  // offloaded unit of such a component must fit the ring at once.
  if (m && c.mode == OffloadMode::Leaf) {
    for (uint32_t id = 0; id < units_.size(); ++id)
      if (off[id] && comps_[units_[id].comp].arch && units_[id].leaves.size() > c.k) return o;
  }
  const uint64_t slots = m ? round_up(static_cast<uint64_t>(c.k) * slot, gran) : 0;
  auto slots_on = [&](size_t pos) { return c.stream < 0 || static_cast<size_t>(c.stream) == pos ? slots : 0; };
  // Page tables of the pinned host memory, at most what the host budget or the model allow.
  const uint64_t page_tables = m ? page_tables_bound_ : 0;
  std::vector<uint64_t> cap(ngpu, 0);
  for (size_t pos = 0; pos < ngpu; ++pos) {
    const uint64_t need = fixed_[pos] + slots_on(pos) + page_tables;
    cap[pos] = gpu_budget_[pos] > need ? (gpu_budget_[pos] - need) / gran * gran : 0;
  }
  if (m && c.stream >= 0 &&
      gpu_budget_[static_cast<size_t>(c.stream)] < fixed_[static_cast<size_t>(c.stream)] + slots + page_tables) {
    return o;
  }
  std::vector<uint32_t> seq;
  for (uint32_t id = 0; id < units_.size(); ++id) {
    if (!off[id] && units_[id].follow < 0) seq.push_back(id);
  }
  o.gpu_of.assign(units_.size(), -1);
  Strategy strategy = opt_.strategy;
  if (strategy == Strategy::Auto) strategy = ngpu > 1 ? Strategy::Balanced : Strategy::Sequential;
  if (!partition(strategy, seq, arena_, cap, o.gpu_of)) return o;
  // Where offloaded units run: the GPU of the previous resident unit (else the next one, else the
  // first GPU that can hold the reserve and the slots).
  o.exec_of.assign(units_.size(), -1);
  int32_t fallback = c.stream;
  for (size_t pos = 0; pos < ngpu && fallback < 0; ++pos) {
    if (gpu_budget_[pos] >= fixed_[pos] + slots + page_tables) fallback = static_cast<int32_t>(pos);
  }
  int32_t first_resident = -1;
  for (uint32_t id : seq) {
    if (o.gpu_of[id] >= 0) {
      first_resident = o.gpu_of[id];
      break;
    }
  }
  int32_t cur = first_resident >= 0 ? first_resident : fallback;
  if (cur < 0) return o;
  for (uint32_t id = 0; id < units_.size(); ++id) {
    if (units_[id].follow >= 0) continue;
    if (o.gpu_of[id] >= 0) cur = o.gpu_of[id];
    o.exec_of[id] = o.gpu_of[id] < 0 && c.stream >= 0 ? c.stream : cur;
  }
  if (!full) {
    // The host budget from per-unit sums, without building the groups.
    std::vector<uint64_t> pinned, largest;
    const uint64_t hg = opt_.profile.host_alloc_granularity_bytes;
    uint64_t run_arena = 0;
    uint32_t run = 0, prev = 0;
    auto close = [&]() {
      if (run) {
        pinned.push_back(round_up(run_arena, hg));
        largest.push_back(run_arena);
      }
      run = 0;
      run_arena = 0;
    };
    for (uint32_t id = 0; id < units_.size(); ++id) {
      if (o.gpu_of[id] >= 0 || units_[id].follow >= 0 || units_[id].leaves.empty()) continue;
      if (c.mode == OffloadMode::Leaf) {
        pinned.push_back(leaf_pinned_[id]);
        largest.push_back(leaf_max_[id]);
        continue;
      }
      if (run > 0 && (prev + 1 != id || run == c.n || units_[prev].comp != units_[id].comp ||
                      o.exec_of[prev] != o.exec_of[id])) {
        close();
      }
      run_arena += arena_[id];
      ++run;
      prev = id;
    }
    close();
    decide_targets(o, pinned, largest);
    o.ok = o.host_ok;
    return o;
  }
  make_groups(o);
  for (uint32_t id = 0; id < units_.size(); ++id) {
    const UnitInfo& u = units_[id];
    if (u.follow < 0) continue;
    const uint32_t p = static_cast<uint32_t>(u.follow);
    o.gpu_of[id] = o.gpu_of[p];
    o.exec_of[id] = o.gpu_of[p] >= 0 ? o.gpu_of[p]
                                     : o.groups[static_cast<size_t>(o.unit_group[p])].exec;
  }
  assign_targets(o);
  make_steps(o);
  // Exact reserve per GPU, and the check against the budget.
  o.work.assign(ngpu, GpuWork{});
  std::vector<uint64_t> resident(ngpu, 0);
  for (size_t pos = 0; pos < ngpu; ++pos) o.work[pos].tokens = opt_.tokens;
  for (uint32_t id = 0; id < units_.size(); ++id) {
    const int32_t e = o.exec_of[id];
    if (e < 0) continue;
    GpuWork& w = o.work[static_cast<size_t>(e)];
    const UnitInfo& u = units_[id];
    w.used = true;
    w.max_in = std::max(w.max_in, u.max_in);
    w.max_out = std::max(w.max_out, u.max_out);
    w.max_dequant_numel = std::max(w.max_dequant_numel, u.max_dq);
    const CompData& cd = comps_[u.comp];
    uint64_t have = 0;
    for (const ReserveItem& it : w.forward_activations) have += it.bytes;
    if (cd.activation_bytes > have) w.forward_activations = cd.activations;
    if (o.gpu_of[id] >= 0 && u.follow < 0) resident[static_cast<size_t>(o.gpu_of[id])] += arena_[id];
    if (o.gpu_of[id] < 0 && u.follow < 0) o.offloaded += u.bytes;
  }
  for (const GroupDraft& g : o.groups) {
    GpuWork& w = o.work[static_cast<size_t>(g.exec)];
    w.n_slots = c.k;
    w.slot_bytes = std::max(w.slot_bytes, g.arena);
  }
  for (GpuWork& w : o.work) w.pinned_host_bytes = o.host_pinned + o.host_staging;
  for (size_t pos = 0; pos < ngpu; ++pos) {
    const uint64_t peak = round_up(resident[pos], gran) + sum_bytes(gpu_reserve(opt_.profile, o.work[pos]));
    if (peak > gpu_budget_[pos]) return o;  // cannot happen with the conservative caps
    o.peak_sum += peak;
  }
  if (!o.host_ok) return o;
  simulate(o);
  o.ok = true;
  return o;
}

[[noreturn]] void Planner::infeasible_gpu() {
  // The smallest budget for the GPU with the largest budget (the others as given) that admits a
  // plan, by binary search over the planner itself (host memory taken as unlimited here).
  size_t best = 0;
  for (size_t pos = 1; pos < gpu_budget_.size(); ++pos) {
    if (gpu_budget_[pos] > gpu_budget_[best]) best = pos;
  }
  const uint64_t have = gpu_budget_[best];
  const uint64_t saved_host = host_budget_;
  host_budget_ = kUnlimited;
  uint64_t lo = have, hi = std::max<uint64_t>(have, 1);
  bool found = false;
  for (int i = 0; i < 48 && !found; ++i) {
    hi = hi > kUnlimited / 2 ? kUnlimited : hi * 2;
    gpu_budget_[best] = hi;
    found = search().best.ok;
  }
  if (!found) {
    fail(ErrorKind::InvalidInput, "--max-memory: no GPU budget admits a plan for this checkpoint");
  }
  while (lo + 1 < hi) {
    const uint64_t mid = lo + (hi - lo) / 2;
    gpu_budget_[best] = mid;
    if (search().best.ok) hi = mid;
    else lo = mid;
  }
  gpu_budget_[best] = hi;
  const Outcome o = search().best;
  host_budget_ = saved_host;
  std::string parts;
  const std::vector<ReserveItem> items = gpu_reserve(opt_.profile, o.work[best]);
  for (const ReserveItem& r : items) parts += str_cat(", ", r.name, " ", r.bytes);
  uint64_t resident = 0;
  for (uint32_t id = 0; id < units_.size(); ++id) {
    if (o.gpu_of[id] == static_cast<int32_t>(best) && units_[id].follow < 0) resident += arena_[id];
  }
  fail(ErrorKind::InvalidInput, "--max-memory: GPU ", gpu_index_[best], " has ", have, " bytes (", format_size(have),
       "), too little for any plan: the smallest plan needs ", hi, " bytes (", format_size(hi), ": resident weights ",
       round_up(resident, opt_.profile.alloc_granularity_bytes), parts, "): short by ", hi - have,
       " bytes. Smallest budget that fits: --max-memory ", gpu_index_[best], "=", hi);
}

[[noreturn]] void Planner::infeasible_host(uint64_t needed) const {
  fail(ErrorKind::InvalidInput, "--max-memory: the cpu budget (", host_budget_, " bytes, ", host_source_,
       ") is too small: even with every offloaded group read from disk, the pinned staging ring needs ", needed,
       " bytes: short by ", needed - std::min(needed, host_budget_), " bytes. Smallest budget that fits: cpu=", needed);
}

Plan Planner::run() {
  if (opt_.tokens == 0 || opt_.tokens > kMaxTokens)
    fail(ErrorKind::Usage, "--tokens: ", opt_.tokens, " is not from 1 to ", kMaxTokens);
  if (opt_.prefetch && (*opt_.prefetch == 0 || *opt_.prefetch > kMaxPrefetch))
    fail(ErrorKind::Usage, "--prefetch: ", *opt_.prefetch, " is not from 1 to ", kMaxPrefetch);
  if (opt_.blocks_per_group && (*opt_.blocks_per_group == 0 || *opt_.blocks_per_group > kMaxBlocksPerGroup))
    fail(ErrorKind::Usage, "--blocks-per-group: ", *opt_.blocks_per_group, " is not from 1 to ",
         kMaxBlocksPerGroup);
  if (opt_.budget.gpus.empty()) {
    fail(ErrorKind::InvalidInput, "no GPU to plan for: ", opt_.budget.note.empty() ? "the budget names none" : opt_.budget.note,
         "; give one with --max-memory (e.g. 0=20GiB,cpu=64GiB)");
  }
  if (in_.components.empty()) fail(ErrorKind::InvalidInput, in_.path, ": the checkpoint holds no weights");
  for (const auto& [idx, bytes] : opt_.budget.gpus) {
    gpu_index_.push_back(idx);
    gpu_budget_.push_back(bytes);
    auto it = opt_.budget.gpu_sources.find(idx);
    gpu_source_.push_back(it == opt_.budget.gpu_sources.end() ? std::string() : it->second);
  }
  if (opt_.budget.cpu) {
    host_budget_ = *opt_.budget.cpu;
    host_source_ = opt_.budget.cpu_source;
  } else if (const uint64_t avail = host_available_memory(); avail > 0) {
    host_budget_ = avail;
    host_source_ = "/proc/meminfo MemAvailable";
  } else {
    host_source_ = "unlimited (no cpu budget and /proc/meminfo unreadable)";
  }
  build_units();
  const uint64_t fixed = sum_bytes(gpu_reserve(opt_.profile, base_work()));
  fixed_.assign(gpu_budget_.size(), fixed);
  page_tables_bound_ = page_tables_bound();

  SearchResult r = search();
  if (!r.best.ok) {
    if (r.host_short) infeasible_host(r.host_needed);
    infeasible_gpu();
  }
  return assemble(r.best);
}

Planner::SearchResult Planner::search() const {
  SearchResult r;
  // Everything resident, if it fits: no slots, nothing held back for streaming.
  r.best = place(Candidate{OffloadMode::Block, 0, 0}, 0);
  if (r.best.ok) return r;
  std::vector<Candidate> cands;
  const bool block = opt_.offload != OffloadMode::Leaf;
  const bool leaf = opt_.offload != OffloadMode::Block;
  const std::vector<uint32_t> ns = opt_.blocks_per_group ? std::vector<uint32_t>{*opt_.blocks_per_group}
                                                         : std::vector<uint32_t>{1, 2, 4};
  const std::vector<uint32_t> ks_block =
      opt_.prefetch ? std::vector<uint32_t>{*opt_.prefetch} : std::vector<uint32_t>{1, 2, 3, 4};
  const std::vector<uint32_t> ks_leaf = opt_.prefetch ? std::vector<uint32_t>{*opt_.prefetch} : std::vector<uint32_t>{1, 2, 4, 8};
  // With several GPUs, streaming through every GPU's slots or through one GPU only (the others
  // then hold no slots at all).
  std::vector<int32_t> streams = {-1};
  if (gpu_budget_.size() > 1) {
    for (size_t pos = 0; pos < gpu_budget_.size(); ++pos) streams.push_back(static_cast<int32_t>(pos));
  }
  for (int32_t st : streams) {
    if (block) {
      for (uint32_t n : ns) {
        for (uint32_t k : ks_block) cands.push_back({OffloadMode::Block, n, k, st});
      }
    }
    if (leaf) {
      for (uint32_t k : ks_leaf) cands.push_back({OffloadMode::Leaf, 1, k, st});
    }
  }
  auto better = [](const Outcome& a, const Outcome& b) {
    if (!b.ok) return true;
    const double tol = 1e-3 * std::max(a.step_s, b.step_s);
    if (std::abs(a.step_s - b.step_s) > tol) return a.step_s < b.step_s;
    if (a.offloaded != b.offloaded) return a.offloaded < b.offloaded;
    return a.peak_sum < b.peak_sum;
  };
  for (const Candidate& c : cands) {
    const size_t M = n_offloadable_;
    const Outcome all = place(c, M, false);
    if (!all.ok) {
      if (!all.host_ok && all.host_needed > 0) {
        r.host_short = true;
        r.host_needed = std::min(r.host_needed, all.host_needed);
      }
      continue;
    }
    // The fewest offloaded units that fit (binary search; the count is nearly monotone, as slot
    // sizes change with the set, so a few counts below are tried as well).
    size_t lo = 1, hi = M;
    while (lo < hi) {
      const size_t mid = lo + (hi - lo) / 2;
      if (place(c, mid, false).ok) hi = mid;
      else lo = mid + 1;
    }
    size_t chosen = lo;
    for (size_t m = lo; m-- > 1 && m + 4 > lo;) {
      if (place(c, m, false).ok) chosen = m;
    }
    Outcome o = place(c, chosen);
    if (!o.ok) o = place(c, M);
    if (better(o, r.best)) r.best = std::move(o);
  }
  if (r.best.ok) r.host_short = false;
  return r;
}

std::string Planner::unit_reason(const Outcome& o, uint32_t id) const {
  const int32_t g = o.unit_group[id];
  const GroupDraft& gd = o.groups[static_cast<size_t>(g)];
  uint64_t resident = 0;
  for (uint32_t u = 0; u < units_.size(); ++u) {
    if (o.gpu_of[u] >= 0 && units_[u].follow < 0) resident += units_[u].bytes;
  }
  std::string gpus;
  for (size_t pos = 0; pos < gpu_budget_.size(); ++pos) {
    gpus += str_cat(pos ? "; " : "", "GPU ", gpu_index_[pos], ": budget ", format_size(gpu_budget_[pos]), ", reserve ",
                    format_size(sum_bytes(gpu_reserve(opt_.profile, o.work[pos]))));
  }
  std::string why = str_cat("does not fit: the GPUs keep ", format_size(resident), " of the ", format_size(total_bytes_),
                            " of weights (", gpus, "); streamed to GPU ", gpu_index_[static_cast<size_t>(gd.exec)],
                            " in group ", g, " (", o.cand.mode == OffloadMode::Leaf ? "one layer per group" : str_cat(o.cand.n, " unit(s) per group"),
                            ", ", o.cand.k, " slot(s))");
  if (gd.target.kind == Location::Kind::Disk) {
    why += str_cat(" from disk: the cpu budget (", format_size(host_budget_), ") is full with pinned groups");
  } else {
    why += " from pinned host memory";
  }
  return why;
}

Plan Planner::assemble(const Outcome& o) const {
  Plan plan;
  const DeviceProfile& prof = opt_.profile;
  const uint64_t gran = prof.alloc_granularity_bytes;
  plan.checkpoint = in_.path;
  plan.fingerprint = in_.fingerprint;
  plan.qtool_version = opt_.qtool_version;
  Strategy strategy = opt_.strategy;
  if (strategy == Strategy::Auto) strategy = gpu_budget_.size() > 1 ? Strategy::Balanced : Strategy::Sequential;
  plan.settings.strategy = std::string(strategy_name(strategy));
  plan.settings.offload_mode = o.groups.empty() ? "none" : (o.cand.mode == OffloadMode::Leaf ? "leaf" : "block");
  plan.settings.blocks_per_group = o.groups.empty() ? 0 : (o.cand.mode == OffloadMode::Leaf ? 1 : o.cand.n);
  plan.settings.prefetch = o.groups.empty() ? 0 : o.cand.k;
  plan.settings.tokens = opt_.tokens;
  plan.settings.profile_name = prof.name;
  plan.settings.budget_note = opt_.budget.note;
  plan.profile = prof;

  // Components and their device maps.
  for (size_t ci = 0; ci < comps_.size(); ++ci) {
    const CompData& cd = comps_[ci];
    ComponentPlan cp;
    cp.name = cd.name;
    cp.class_name = cd.class_name;
    cp.template_name = cd.tmpl ? cd.tmpl->name : std::string();
    cp.forward = cd.arch ? arch_name(*cd.arch) : std::string();
    cp.bytes = cd.bytes;
    const ModuleTree& tree = cd.tree;
    // The loader's module names drop the template's checkpoint prefix; only when every tensor has it
    // (a checkpoint laid out otherwise keeps its own names).
    if (cd.tmpl && !cd.tmpl->checkpoint_prefix.empty()) {
      const std::string& pre = cd.tmpl->checkpoint_prefix;
      const bool all = std::all_of(tree.tensors().begin(), tree.tensors().end(), [&](const TensorDesc& t) {
        return t.name.size() > pre.size() && t.name.starts_with(pre) && t.name[pre.size()] == '.';
      });
      if (all) {
        cp.checkpoint_prefix = pre;
        plan.notes.push_back(str_cat(
            "component '", cd.name, "' (", cd.class_name,
            "): device_map keys are the module names of transformers >= 5, which loads the checkpoint's '",
            pre, ".*' into the model's root; for transformers 4.x, which keeps the '", pre,
            "' level, prefix every key with '", pre, ".' ('' becomes '", pre, "')"));
      }
    }
    for (size_t t = 0; t < tree.tensors().size(); ++t) {
      if (tree.tied_to()[t] >= 0) cp.tied.push_back({tree.tensors()[t].name, tree.tensors()[static_cast<size_t>(tree.tied_to()[t])].name});
    }
    // Location code per unit: GPU index >= 0, -1 cpu, -2 disk.
    auto unit_code = [&](uint32_t id) -> int64_t {
      const int32_t g = o.gpu_of[id];
      if (g >= 0) return gpu_index_[static_cast<size_t>(g)];
      const uint32_t owner = units_[id].follow >= 0 ? static_cast<uint32_t>(units_[id].follow) : id;
      const GroupDraft& gd = o.groups[static_cast<size_t>(o.unit_group[owner])];
      return gd.target.kind == Location::Kind::Disk ? -2 : -1;
    };
    auto to_loc = [](int64_t code) {
      if (code >= 0) return Location::on_gpu(static_cast<int32_t>(code));
      return code == -1 ? Location::cpu() : Location::disk();
    };
    constexpr int64_t kNone = std::numeric_limits<int64_t>::min(), kMixed = std::numeric_limits<int64_t>::max();
    std::vector<int64_t> code(tree.nodes().size(), kNone);
    std::vector<int64_t> first_unit(tree.nodes().size(), std::numeric_limits<int64_t>::max());
    auto merge = [&](int64_t a, int64_t b) {
      if (a == kNone) return b;
      if (b == kNone) return a;
      return a == b ? a : kMixed;
    };
    for (size_t t = 0; t < tree.tensors().size(); ++t) {
      const int32_t u = cd.tensor_unit[t];
      const int32_t n = tree.tensor_module()[t];
      code[static_cast<size_t>(n)] = merge(code[static_cast<size_t>(n)], unit_code(static_cast<uint32_t>(u)));
      first_unit[static_cast<size_t>(n)] = std::min<int64_t>(first_unit[static_cast<size_t>(n)], u);
    }
    // Own tensors only so far; fold children in (children have larger ids).
    std::vector<int64_t> own = code;
    for (size_t k = tree.nodes().size(); k-- > 1;) {
      const size_t p = static_cast<size_t>(tree.node(static_cast<int32_t>(k)).parent);
      code[p] = merge(code[p], code[k]);
      first_unit[p] = std::min(first_unit[p], first_unit[k]);
    }
    std::vector<std::pair<int64_t, DeviceMapEntry>> entries;
    std::vector<int32_t> stack = {0};
    while (!stack.empty()) {
      const int32_t id = stack.back();
      stack.pop_back();
      const ModuleNode& n = tree.node(id);
      if (code[static_cast<size_t>(id)] != kMixed) {
        entries.push_back({first_unit[static_cast<size_t>(id)], {n.prefix, to_loc(code[static_cast<size_t>(id)]), "", n.bytes}});
        continue;
      }
      for (uint32_t t : n.tensors) {
        entries.push_back({cd.tensor_unit[t], {tree.tensors()[t].name, to_loc(unit_code(static_cast<uint32_t>(cd.tensor_unit[t]))), "",
                                               tree.counted_bytes()[t]}});
      }
      (void)own;
      for (int32_t c : n.children) stack.push_back(c);
    }
    std::stable_sort(entries.begin(), entries.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
    for (auto& [u, e] : entries) {
      if (!e.location.is_gpu()) {
        const uint32_t owner = units_[static_cast<size_t>(u)].follow >= 0 ? static_cast<uint32_t>(units_[static_cast<size_t>(u)].follow)
                                                                          : static_cast<uint32_t>(u);
        e.reason = unit_reason(o, owner);
      }
      cp.device_map.push_back(std::move(e));
    }
    plan.components.push_back(std::move(cp));
  }

  // Groups.
  for (size_t g = 0; g < o.groups.size(); ++g) {
    const GroupDraft& gd = o.groups[g];
    OffloadGroup og;
    og.id = static_cast<uint32_t>(g);
    og.component = units_[gd.units.front()].comp;
    std::vector<uint64_t> sizes;
    const ModuleTree& tree = comps_[og.component].tree;
    for (uint32_t id : gd.units) {
      const UnitInfo& u = units_[id];
      if (gd.leaf >= 0) {
        const Leaf& l = u.leaves[static_cast<size_t>(gd.leaf)];
        og.modules.push_back(l.prefix);
        for (uint32_t t : l.tensors) og.tensors.push_back({tree.tensors()[t].name, tree.tensors()[t].nbytes, 0});
      } else {
        og.modules.push_back(u.prefix);
        for (const Leaf& l : u.leaves) {
          for (uint32_t t : l.tensors) og.tensors.push_back({tree.tensors()[t].name, tree.tensors()[t].nbytes, 0});
        }
      }
    }
    for (const GroupTensor& t : og.tensors) sizes.push_back(t.nbytes);
    const ArenaLayout layout = layout_arena(sizes);
    for (size_t i = 0; i < og.tensors.size(); ++i) og.tensors[i].arena_offset = layout.offsets[i];
    og.bytes = gd.bytes;
    og.arena_bytes = layout.total;
    og.target = gd.target;
    og.gpu = gpu_index_[static_cast<size_t>(gd.exec)];
    og.copy_s = copy_seconds(og.arena_bytes, og.target, prof);
    plan.groups.push_back(std::move(og));
  }

  // Schedule.
  std::vector<double> comp_time(comps_.size(), 0.0);
  for (const StepDraft& s : o.steps) {
    ScheduleStep st;
    const UnitInfo& first = units_[s.units.front()];
    st.component = first.comp;
    st.gpu = gpu_index_[static_cast<size_t>(s.exec)];
    st.group = s.group;
    const ModuleTree& tree = comps_[st.component].tree;
    for (uint32_t id : s.units) {
      const UnitInfo& u = units_[id];
      if (s.leaf >= 0) {
        const Leaf& l = u.leaves[static_cast<size_t>(s.leaf)];
        st.modules.push_back(l.prefix);
        for (uint32_t t : l.tensors) st.tensors.push_back(tree.tensors()[t].name);
        for (const LinearOp& op : u.linears) {
          if (op.module == l.prefix) st.linears.push_back(op);
        }
      } else {
        st.modules.push_back(u.prefix);
        for (uint32_t t : u.tensors) {
          if (tree.tied_to()[t] < 0 && !tree.tensors()[t].absent) st.tensors.push_back(tree.tensors()[t].name);
        }
        st.linears.insert(st.linears.end(), u.linears.begin(), u.linears.end());
      }
    }
    const CompData& cd = comps_[st.component];
    for (const LinearOp& op : st.linears) {
      const uint64_t rows = cd.arch ? linear_rows(*cd.arch, op.module, opt_.tokens) : opt_.tokens;
      st.flops += linear_flops(rows, op);
      st.compute_s += linear_seconds(op, rows, prof);
    }
    for (uint32_t id : s.units)
      if (cd.arch && units_[id].is_block && s.leaf <= 0) st.compute_s += cd.attention_s_per_block;
    comp_time[st.component] += st.compute_s + (st.group >= 0 ? 0.0 : 0.0);
    plan.schedule.push_back(std::move(st));
  }
  for (size_t ci = 0; ci < comps_.size(); ++ci) plan.components[ci].step_s = comp_time[ci];
  // Components in execution order in the file.
  {
    std::vector<ComponentPlan> ordered;
    std::vector<uint32_t> new_index(comps_.size());
    for (size_t i = 0; i < comp_order_.size(); ++i) {
      new_index[comp_order_[i]] = static_cast<uint32_t>(i);
      ordered.push_back(std::move(plan.components[comp_order_[i]]));
    }
    plan.components = std::move(ordered);
    for (OffloadGroup& g : plan.groups) g.component = new_index[g.component];
    for (ScheduleStep& s : plan.schedule) s.component = new_index[s.component];
  }

  // Devices.
  uint64_t cpu_weights = 0, disk_weights = 0;
  for (const GroupDraft& g : o.groups) (g.target.kind == Location::Kind::Disk ? disk_weights : cpu_weights) += g.bytes;
  for (size_t pos = 0; pos < gpu_budget_.size(); ++pos) {
    DevicePlan d;
    d.device = str_cat("cuda:", gpu_index_[pos]);
    d.location = Location::on_gpu(gpu_index_[pos]);
    d.budget = gpu_budget_[pos];
    d.budget_source = gpu_source_[pos];
    uint64_t arena = 0;
    for (uint32_t id = 0; id < units_.size(); ++id) {
      if (o.gpu_of[id] == static_cast<int32_t>(pos) && units_[id].follow < 0) {
        d.weights_bytes += units_[id].bytes;
        arena += arena_[id];
      }
    }
    d.arena_bytes = round_up(arena, gran);
    d.reserve = gpu_reserve(prof, o.work[pos]);
    d.n_slots = o.work[pos].n_slots;
    d.slot_bytes = o.work[pos].slot_bytes;
    d.predicted_peak = d.arena_bytes + sum_bytes(d.reserve);
    plan.devices.push_back(std::move(d));
  }
  {
    DevicePlan d;
    d.device = "cpu";
    d.location = Location::cpu();
    d.budget = host_budget_;
    d.budget_source = host_source_;
    d.weights_bytes = cpu_weights;
    d.arena_bytes = o.host_pinned;
    if (o.host_staging) {
      d.reserve.push_back({"disk_staging", o.host_staging,
                           str_cat(std::max<uint32_t>(o.cand.k, 1), " pinned staging buffers for groups read from disk")});
    }
    d.predicted_peak = d.arena_bytes + sum_bytes(d.reserve);
    plan.devices.push_back(std::move(d));
  }
  if (disk_weights) {
    DevicePlan d;
    d.device = "disk";
    d.location = Location::disk();
    d.budget = kUnlimited;
    d.budget_source = "the checkpoint files (read in place)";
    d.weights_bytes = disk_weights;
    plan.devices.push_back(std::move(d));
  }
  plan.predicted_step_s = o.step_s;
  plan.transfer_s = o.transfer_s;
  plan.compute_s = o.compute_s;
  if (!opt_.budget.note.empty()) plan.notes.push_back(opt_.budget.note);
  if (!opt_.budget.cpu) plan.notes.push_back(str_cat("cpu budget: ", host_source_));
  plan.notes.push_back(str_cat("device profile '", prof.name, "': h2d ", prof.h2d_pinned_gbps, " GB/s pinned, bf16 ",
                               prof.bf16_tflops, " TFLOP/s, context ", format_size(prof.context_bytes)));
  for (const CompData& cd : comps_) {
    if (!cd.tmpl) {
      plan.notes.push_back(str_cat("component '", cd.name, "' (", cd.class_name.empty() ? "no class name" : cd.class_name,
                                   "): no model template, heuristic execution order"));
    }
  }
  return plan;
}

}  // namespace

Plan make_plan(const PipelineInput& input, const PlanOptions& options) { return Planner(input, options).run(); }

Plan make_plan(const Checkpoint& checkpoint, const PlanOptions& options) {
  return make_plan(plan_input_of(checkpoint), options);
}

}  // namespace qtool::planner
