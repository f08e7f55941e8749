#include <doctest/doctest.h>

#include "qtool/formats/error.hpp"
#include "qtool/libquant/quant.hpp"
#include "qtool/planner/module_tree.hpp"

using namespace qtool;
using namespace qtool::planner;
using qtool::quant::module_of_tensor;  // the tree groups tensors by it

namespace {

TensorDesc t(std::string name, uint64_t nbytes, int64_t storage = -1) {
  TensorDesc d;
  d.name = std::move(name);
  d.nbytes = nbytes;
  d.dtype = DType::BF16;
  d.shape = {static_cast<int64_t>(nbytes / 2)};
  d.storage = storage;
  return d;
}

}  // namespace

TEST_CASE("module_of_tensor keeps quant state with its weight") {
  CHECK(module_of_tensor("transformer_blocks.3.attn.to_q.weight") == "transformer_blocks.3.attn.to_q");
  CHECK(module_of_tensor("a.b.weight.absmax") == "a.b");
  CHECK(module_of_tensor("a.b.weight.quant_map") == "a.b");
  CHECK(module_of_tensor("a.b.weight.nested_absmax") == "a.b");
  CHECK(module_of_tensor("a.b.weight.quant_state.bitsandbytes__nf4") == "a.b");
  CHECK(module_of_tensor("a.b.SCB") == "a.b");
  CHECK(module_of_tensor("a.b.weight_scale") == "a.b");
  CHECK(module_of_tensor("a.b.bias") == "a.b");
  CHECK(module_of_tensor("cls_token") == "");
}

TEST_CASE("natural order compares numeric elements as numbers") {
  CHECK(natural_less("blocks.2.x", "blocks.10.x"));
  CHECK_FALSE(natural_less("blocks.10.x", "blocks.2.x"));
  CHECK(natural_less("a", "a.b"));
  CHECK_FALSE(natural_less("a.b", "a"));
  CHECK(natural_less("a.b", "a.c"));
  CHECK_FALSE(natural_less("a.b", "a.b"));
}

TEST_CASE("tree: block lists, exact subtree bytes, quant state in its module") {
  std::vector<TensorDesc> ts = {
      t("embed.weight", 100),
      t("blocks.0.attn.q.weight", 40),
      t("blocks.0.attn.q.weight.absmax", 4),
      t("blocks.0.attn.q.weight.quant_map", 64),
      t("blocks.0.attn.q.weight.quant_state.bitsandbytes__nf4", 30),
      t("blocks.0.norm.weight", 8),
      t("blocks.1.attn.q.weight", 40),
      t("blocks.1.attn.q.weight.absmax", 4),
      t("blocks.1.attn.q.weight.quant_map", 64),
      t("blocks.1.attn.q.weight.quant_state.bitsandbytes__nf4", 30),
      t("blocks.1.norm.weight", 8),
      t("blocks.10.ff.0.weight", 12),
      t("blocks.10.ff.2.weight", 12),
      t("blocks.2.ff.0.weight", 12),
      t("norm.weight", 6),
      t("head.weight", 50),
      t("head.bias", 2),
  };
  const ModuleTree tree = ModuleTree::build(ts);
  CHECK(tree.total_bytes() == 100 + 2 * (40 + 4 + 64 + 30 + 8) + 24 + 12 + 6 + 50 + 2);
  const int32_t q0 = tree.find("blocks.0.attn.q");
  REQUIRE(q0 > 0);
  CHECK(tree.node(q0).tensors.size() == 4);
  CHECK(tree.node(q0).own_bytes == 40 + 4 + 64 + 30);
  const int32_t blocks = tree.find("blocks");
  REQUIRE(blocks > 0);
  CHECK(tree.node(blocks).is_block_list);
  // numeric order: 0, 1, 2, 10
  std::vector<std::string> names;
  for (int32_t c : tree.node(blocks).children) names.push_back(tree.node(c).name);
  CHECK(names == std::vector<std::string>{"0", "1", "2", "10"});
  CHECK(tree.node(tree.find("blocks.10")).is_block);
  CHECK(tree.node(tree.find("blocks.10")).bytes == 24);
  // A block list inside a block is part of the block, not a top-most block list.
  const int32_t ff = tree.find("blocks.10.ff");
  CHECK(tree.node(ff).is_block_list);
  CHECK(tree.node(ff).in_block);
  CHECK_FALSE(tree.node(tree.find("blocks.10.ff.0")).is_block);
  CHECK(tree.block_of(tree.find("blocks.10.ff.2")) == tree.find("blocks.10"));
  CHECK(tree.block_of(tree.find("head")) == -1);
  const auto lists = tree.block_lists();
  REQUIRE(lists.size() == 1);
  CHECK(lists[0].prefix == "blocks");
  CHECK(lists[0].length == 4);
  CHECK(lists[0].bytes == 2 * (40 + 4 + 64 + 30 + 8) + 24 + 12);
  CHECK(tree.node(tree.find("head")).n_tensors == 2);
}

TEST_CASE("tree: tied weights are counted once") {
  SUBCASE("declared pair, both present") {
    const ModuleTree tree = ModuleTree::build(
        {t("model.embed_tokens.weight", 1000), t("model.layers.0.mlp.weight", 10), t("lm_head.weight", 1000)},
        {{"model.embed_tokens.weight", "lm_head.weight"}});
    CHECK(tree.total_bytes() == 1010);
    const int64_t alias = tree.find_tensor("lm_head.weight");
    CHECK(tree.counted_bytes()[static_cast<size_t>(alias)] == 0);
    CHECK(tree.tied_to()[static_cast<size_t>(alias)] == tree.find_tensor("model.embed_tokens.weight"));
    CHECK(tree.absent_aliases().empty());
  }
  SUBCASE("declared pair, alias absent") {
    const ModuleTree tree =
        ModuleTree::build({t("model.embed_tokens.weight", 1000), t("model.norm.weight", 8)},
                          {{"model.embed_tokens.weight", "lm_head.weight"}});
    CHECK(tree.total_bytes() == 1008);
    REQUIRE(tree.absent_aliases().size() == 1);
    CHECK(tree.absent_aliases()[0].first == "lm_head.weight");
  }
  SUBCASE("identical storage") {
    const ModuleTree tree =
        ModuleTree::build({t("shared.weight", 500, 7), t("encoder.embed_tokens.weight", 500, 7),
                           t("encoder.final_layer_norm.weight", 4, 8)});
    CHECK(tree.total_bytes() == 504);
    // the first in name order owns the bytes
    CHECK(tree.counted_bytes()[static_cast<size_t>(tree.find_tensor("encoder.embed_tokens.weight"))] == 500);
    CHECK(tree.counted_bytes()[static_cast<size_t>(tree.find_tensor("shared.weight"))] == 0);
  }
}

TEST_CASE("tree: duplicate tensor names are rejected") {
  CHECK_THROWS_AS(ModuleTree::build({t("a.weight", 2), t("a.weight", 2)}), qtool::Error);
}
