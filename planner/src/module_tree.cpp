#include "qtool/planner/module_tree.hpp"

#include <algorithm>
#include <charconv>
#include <map>
#include <numeric>
#include <unordered_map>

#include "qtool/formats/error.hpp"
#include "qtool/libquant/quant.hpp"

namespace qtool::planner {
namespace {

// The integer value of a path element made only of digits, or -1.
int64_t parse_index(std::string_view s) {
  if (s.empty() || s.size() > 18) return -1;
  int64_t v = 0;
  const auto [ptr, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || ptr != s.data() + s.size() || v < 0) return -1;
  return v;
}

std::string_view next_element(std::string_view s, size_t& pos) {
  const size_t dot = s.find('.', pos);
  const size_t end = dot == std::string_view::npos ? s.size() : dot;
  std::string_view el = s.substr(pos, end - pos);
  pos = dot == std::string_view::npos ? s.size() + 1 : dot + 1;
  return el;
}

}  // namespace

bool natural_less(std::string_view a, std::string_view b) {
  size_t pa = 0, pb = 0;
  while (pa <= a.size() && pb <= b.size()) {
    const std::string_view ea = next_element(a, pa);
    const std::string_view eb = next_element(b, pb);
    const int64_t ia = parse_index(ea), ib = parse_index(eb);
    if (ia >= 0 && ib >= 0) {
      if (ia != ib) return ia < ib;
      if (ea != eb) return ea < eb;  // "01" vs "1"
    } else if (ia >= 0 || ib >= 0) {
      return ia >= 0;  // numbers before names
    } else if (ea != eb) {
      return ea < eb;
    }
  }
  // One is a prefix of the other: the shorter first.
  return pa > a.size() && pb <= b.size();
}

std::vector<TensorDesc> tensor_descs(const Component& component) {
  std::vector<TensorDesc> out;
  out.reserve(component.entries().size());
  // Identical storage: same shard and same [begin, end). A validated file never has it, but a
  // file written by other tools may alias two names; count such bytes once.
  std::map<std::tuple<uint32_t, uint64_t, uint64_t>, int64_t> storage_ids;
  for (const Component::Entry& e : component.entries()) {
    const TensorInfo& info = component.info(e);
    TensorDesc d;
    d.name = info.name;
    d.nbytes = info.nbytes();
    d.dtype = info.dtype;
    d.shape = info.shape;
    if (d.nbytes > 0) {
      auto [it, inserted] =
          storage_ids.try_emplace({e.shard, info.begin, info.end}, static_cast<int64_t>(storage_ids.size()));
      d.storage = it->second;
    }
    out.push_back(std::move(d));
  }
  return out;
}

namespace {

// Tensors sorted by name through an index (moving 100k descriptors around in a sort is slow); a
// name twice is an error.
std::vector<TensorDesc> sorted_by_name(std::vector<TensorDesc> tensors) {
  std::vector<uint32_t> order(tensors.size());
  std::iota(order.begin(), order.end(), 0u);
  std::stable_sort(order.begin(), order.end(),
                   [&](uint32_t a, uint32_t b) { return tensors[a].name < tensors[b].name; });
  std::vector<TensorDesc> sorted;
  sorted.reserve(tensors.size());
  for (uint32_t i : order) sorted.push_back(std::move(tensors[i]));
  tensors = std::move(sorted);
  for (size_t i = 1; i < tensors.size(); ++i) {
    if (tensors[i].name == tensors[i - 1].name) {
      fail(ErrorKind::InvalidInput, "tensor '", tensors[i].name, "' appears twice");
    }
  }
  return tensors;
}

}  // namespace

ModuleTree ModuleTree::build(const Component& component, const std::vector<TiedPair>& ties) {
  return build(tensor_descs(component), ties);
}

// The module nodes of every tensor's module and their ancestors; tensor_module_.
void ModuleTree::make_nodes() {
  const size_t n = tensors_.size();

  std::unordered_map<std::string, int32_t> by_prefix;
  by_prefix.reserve(n + 1);
  nodes_.reserve(n + 1);
  nodes_.emplace_back();
  by_prefix.emplace("", 0);
  // Returns the node for `prefix`, creating it and its missing ancestors.
  auto node_for = [&](const std::string& prefix) -> int32_t {
    if (auto it = by_prefix.find(prefix); it != by_prefix.end()) return it->second;
    // Find the deepest existing ancestor, then create downward.
    std::vector<size_t> dots;
    for (size_t p = prefix.find('.'); p != std::string::npos; p = prefix.find('.', p + 1)) dots.push_back(p);
    int32_t parent = 0;
    size_t start = 0;  // position in prefix where the first missing element begins
    for (size_t k = dots.size(); k-- > 0;) {
      if (auto it = by_prefix.find(prefix.substr(0, dots[k])); it != by_prefix.end()) {
        parent = it->second;
        start = dots[k] + 1;
        break;
      }
    }
    size_t pos = start;
    while (true) {
      const size_t dot = prefix.find('.', pos);
      const size_t end = dot == std::string::npos ? prefix.size() : dot;
      ModuleNode node;
      node.name = prefix.substr(pos, end - pos);
      node.prefix = prefix.substr(0, end);
      node.parent = parent;
      node.index = parse_index(node.name);
      const auto id = static_cast<int32_t>(nodes_.size());
      nodes_[static_cast<size_t>(parent)].children.push_back(id);
      by_prefix.emplace(node.prefix, id);
      nodes_.push_back(std::move(node));
      parent = id;
      if (dot == std::string::npos) return id;
      pos = dot + 1;
    }
  };

  tensor_module_.resize(n);
  std::string last_module;
  int32_t last_id = -1;
  for (size_t i = 0; i < n; ++i) {
    // A module's tensors are adjacent in name order (weight, bias, quant state): look it up once.
    std::string module = quant::module_of_tensor(tensors_[i].name);
    if (last_id < 0 || module != last_module) {
      last_id = node_for(module);
      last_module = std::move(module);
    }
    const int32_t id = last_id;
    tensor_module_[i] = id;
    nodes_[static_cast<size_t>(id)].tensors.push_back(static_cast<uint32_t>(i));
  }
}

void ModuleTree::apply_ties(const std::vector<TiedPair>& ties) {
  const size_t n = tensors_.size();
  // Ties: identical storage first, then declared pairs. The first name owns the bytes.
  counted_.resize(n);
  tied_to_.assign(n, -1);
  std::unordered_map<int64_t, uint32_t> first_of_storage;
  for (size_t i = 0; i < n; ++i) {
    counted_[i] = tensors_[i].nbytes;
    if (tensors_[i].storage < 0) continue;
    auto [it, inserted] = first_of_storage.try_emplace(tensors_[i].storage, static_cast<uint32_t>(i));
    if (!inserted) {
      tied_to_[i] = it->second;
      counted_[i] = 0;
    }
  }
  for (const TiedPair& tie : ties) {
    const int64_t p = find_tensor(tie.primary);
    const int64_t a = find_tensor(tie.alias);
    if (p < 0) continue;  // nothing to tie to: the alias (if any) owns its bytes
    if (a < 0 || tensors_[static_cast<size_t>(a)].absent) {
      absent_aliases_.emplace_back(tie.alias, static_cast<uint32_t>(p));
      if (a < 0) continue;
    }
    if (a == p || tied_to_[static_cast<size_t>(a)] >= 0) continue;
    if (tied_to_[static_cast<size_t>(p)] == a) continue;
    tied_to_[static_cast<size_t>(a)] = p;
    counted_[static_cast<size_t>(a)] = 0;
  }
}

void ModuleTree::finish_nodes() {
  // Children order, block lists, sizes (children are created after their parents, so a reverse
  // sweep sees every child before its parent).
  for (ModuleNode& node : nodes_) {
    bool all_int = !node.children.empty() && node.tensors.empty();
    for (int32_t c : node.children) all_int = all_int && nodes_[static_cast<size_t>(c)].index >= 0;
    node.is_block_list = all_int;
    // natural_less on single path elements: numbers by value, before names.
    std::sort(node.children.begin(), node.children.end(), [&](int32_t a, int32_t b) {
      const ModuleNode& na = nodes_[static_cast<size_t>(a)];
      const ModuleNode& nb = nodes_[static_cast<size_t>(b)];
      if (na.index >= 0 && nb.index >= 0)
        return na.index != nb.index ? na.index < nb.index : na.name < nb.name;
      if (na.index >= 0 || nb.index >= 0) return na.index >= 0;
      return na.name < nb.name;
    });
  }
  for (size_t k = nodes_.size(); k-- > 0;) {
    ModuleNode& node = nodes_[k];
    for (uint32_t ti : node.tensors) node.own_bytes += counted_[ti];
    node.bytes += node.own_bytes;
    node.n_tensors += static_cast<uint32_t>(node.tensors.size());
    if (node.parent >= 0) {
      ModuleNode& parent = nodes_[static_cast<size_t>(node.parent)];
      parent.bytes += node.bytes;
      parent.n_tensors += node.n_tensors;
    }
  }
  // Top-most block lists: a pre-order sweep (parents have smaller ids than their children).
  for (size_t k = 1; k < nodes_.size(); ++k) {
    ModuleNode& node = nodes_[k];
    const ModuleNode& parent = nodes_[static_cast<size_t>(node.parent)];
    if (parent.in_block) {
      node.in_block = true;
    } else if (parent.is_block_list) {
      node.is_block = true;
      node.in_block = true;
    }
  }
}

ModuleTree ModuleTree::build(std::vector<TensorDesc> tensors, const std::vector<TiedPair>& ties) {
  ModuleTree t;
  t.tensors_ = sorted_by_name(std::move(tensors));
  t.make_nodes();
  t.apply_ties(ties);
  t.finish_nodes();
  return t;
}

int32_t ModuleTree::find(std::string_view prefix) const {
  if (prefix.empty()) return 0;
  int32_t cur = 0;
  size_t pos = 0;
  while (pos <= prefix.size()) {
    const std::string_view el = next_element(prefix, pos);
    int32_t next = -1;
    for (int32_t c : nodes_[static_cast<size_t>(cur)].children) {
      if (nodes_[static_cast<size_t>(c)].name == el) {
        next = c;
        break;
      }
    }
    if (next < 0) return -1;
    cur = next;
  }
  return cur;
}

int64_t ModuleTree::find_tensor(std::string_view name) const {
  const auto it = std::lower_bound(tensors_.begin(), tensors_.end(), name,
                                   [](const TensorDesc& d, std::string_view v) { return d.name < v; });
  if (it == tensors_.end() || it->name != name) return -1;
  return it - tensors_.begin();
}

std::vector<BlockListInfo> ModuleTree::block_lists() const {
  std::vector<BlockListInfo> out;
  for (const ModuleNode& node : nodes_) {
    if (!node.is_block_list || node.in_block) continue;
    out.push_back({node.prefix, node.children.size(), node.bytes});
  }
  std::sort(out.begin(), out.end(),
            [](const BlockListInfo& a, const BlockListInfo& b) { return natural_less(a.prefix, b.prefix); });
  return out;
}

int32_t ModuleTree::block_of(int32_t id) const {
  while (id >= 0) {
    const ModuleNode& node = nodes_[static_cast<size_t>(id)];
    if (node.is_block) return id;
    if (!node.in_block) return -1;
    id = node.parent;
  }
  return -1;
}

std::vector<BlockListInfo> block_lists(const Component& component) {
  return ModuleTree::build(component).block_lists();
}

}  // namespace qtool::planner
