// The module tree of one component, built from its tensor names alone
// (`transformer_blocks.3.attn.to_q.weight` -> root / transformer_blocks / 3 / attn / to_q), with
// exact byte sizes of the checkpoint as it is (quantized or not, quant state included).
//
// - A tensor belongs to the module qtool::quant::module_of_tensor names: `a.weight`, `a.bias`,
//   `a.SCB`, `a.weight_scale`, `a.weight.absmax`, `a.weight.quant_state.bitsandbytes__nf4` all
//   belong to module `a`, so a weight and its quant state are never separated.
// - A module whose children are all integers (and which holds no tensor itself) is a block list
//   (a torch ModuleList); its items are blocks, the units placement never splits (accelerate's
//   no_split_module_classes). Only top-most block lists count: a block list inside a block (T5's
//   `encoder.block.3.layer`) is part of its block.
// - Tied weights (a pair declared by the model's template and enabled by its config, e.g.
//   `tie_word_embeddings`, or two names on identical storage: same shard and same data offsets)
//   are counted once: the first of the pair in name order owns the bytes, the other counts 0.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "qtool/formats/checkpoint.hpp"
#include "qtool/formats/dtype.hpp"

namespace qtool::planner {

// One tensor as the planner sees it: a name, its exact bytes in the checkpoint, dtype and shape.
struct TensorDesc {
  std::string name;     // full tensor name within the component
  uint64_t nbytes = 0;  // bytes in the checkpoint (end - begin)
  DType dtype = DType::U8;
  std::vector<int64_t> shape;
  // Tensors with the same storage id >= 0 share their bytes (identical storage); -1: its own.
  int64_t storage = -1;
  // A tied alias the checkpoint does not hold (added by the planner so that the device map covers
  // it): 0 bytes, never read.
  bool absent = false;
};

// Two tensor names that hold the same weight once loaded (the alias is tied to the primary).
// The alias may be absent from the checkpoint (transformers drops tied copies when saving); it is
// still placed with its primary so that the device map covers the model's state dict.
struct TiedPair {
  std::string primary;  // e.g. "model.embed_tokens.weight"
  std::string alias;    // e.g. "lm_head.weight"
};

struct ModuleNode {
  std::string name;    // last path element: "to_q", "3"; "" for the root
  std::string prefix;  // dotted path: "transformer_blocks.3.attn.to_q"; "" for the root
  int32_t parent = -1;
  std::vector<int32_t> children;  // block lists: numeric order; others: natural name order
  std::vector<uint32_t> tensors;  // tensors whose module is exactly this one (indices, name order)
  uint64_t own_bytes = 0;         // bytes of `tensors`, tied copies counted 0
  uint64_t bytes = 0;             // bytes of the whole subtree, tied copies counted 0
  uint32_t n_tensors = 0;         // tensors in the whole subtree
  bool is_block_list = false;     // children all integers, no own tensors
  bool is_block = false;          // an item of a top-most block list (never split)
  bool in_block = false;          // a block or inside one
  int64_t index = -1;             // the integer value of `name` when it is one
};

struct BlockListInfo {
  std::string prefix;  // "transformer_blocks"
  size_t length = 0;   // number of blocks
  uint64_t bytes = 0;  // bytes of all its blocks, tied copies counted once
};

class ModuleTree {
 public:
  // From a component's tensor headers (no tensor data is read). Identical storage (same shard,
  // same data offsets) is detected here; `ties` adds declared pairs (see tied_pairs_for()).
  static ModuleTree build(const Component& component, const std::vector<TiedPair>& ties = {});
  // From tensor descriptions (tests, benchmarks, planning a model described in memory).
  // Duplicate names throw Error(InvalidInput).
  static ModuleTree build(std::vector<TensorDesc> tensors, const std::vector<TiedPair>& ties = {});

  const std::vector<ModuleNode>& nodes() const { return nodes_; }
  const ModuleNode& node(int32_t id) const { return nodes_[static_cast<size_t>(id)]; }
  const ModuleNode& root() const { return nodes_[0]; }
  const std::vector<TensorDesc>& tensors() const { return tensors_; }

  // The module each tensor belongs to (node id), parallel to tensors().
  const std::vector<int32_t>& tensor_module() const { return tensor_module_; }
  // The bytes a tensor counts for: nbytes, or 0 for a tied copy. Parallel to tensors().
  const std::vector<uint64_t>& counted_bytes() const { return counted_; }
  // For a tied copy, the index of the tensor that owns the bytes; -1 otherwise.
  const std::vector<int64_t>& tied_to() const { return tied_to_; }
  // Declared ties whose alias is not in the checkpoint (alias name, index of the primary tensor).
  const std::vector<std::pair<std::string, uint32_t>>& absent_aliases() const { return absent_aliases_; }

  int32_t find(std::string_view prefix) const;       // node id, -1 when absent
  int64_t find_tensor(std::string_view name) const;  // tensor index, -1 when absent
  uint64_t total_bytes() const { return nodes_[0].bytes; }

  // Top-most block lists, in name order.
  std::vector<BlockListInfo> block_lists() const;
  // The block (is_block node) containing node `id`, or -1.
  int32_t block_of(int32_t id) const;

 private:
  void make_nodes();
  void apply_ties(const std::vector<TiedPair>& ties);
  void finish_nodes();
  std::vector<ModuleNode> nodes_;
  std::vector<TensorDesc> tensors_;
  std::vector<int32_t> tensor_module_;
  std::vector<uint64_t> counted_;
  std::vector<int64_t> tied_to_;
  std::vector<std::pair<std::string, uint32_t>> absent_aliases_;
};

// Natural order of dotted names: numeric path elements compare as numbers ("2" < "10").
bool natural_less(std::string_view a, std::string_view b);

// The tensors of a component as TensorDesc (headers only); identical storage gets one storage id.
std::vector<TensorDesc> tensor_descs(const Component& component);

// The top-most block lists of a component (what `qtool inspect` prints).
std::vector<BlockListInfo> block_lists(const Component& component);

}  // namespace qtool::planner
