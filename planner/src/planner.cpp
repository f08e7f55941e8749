#include "qtool/planner/planner.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <numeric>
#include <string>
#include <unordered_map>
#include <utility>

#include "planner_impl.hpp"
#include "qtool/formats/checked.hpp"
#include "qtool/formats/error.hpp"
#include "qtool/formats/size.hpp"
#include "qtool/libquant/config.hpp"
#include "qtool/libquant/quant.hpp"

namespace qtool::planner {

// Each strategy with its --device-map name.
constexpr std::pair<Strategy, std::string_view> kStrategyNames[] = {
    {Strategy::Sequential, "sequential"},
    {Strategy::Balanced, "balanced"},
    {Strategy::BalancedLow0, "balanced_low_0"},
    {Strategy::Auto, "auto"},
};

Strategy parse_strategy(std::string_view text) {
  std::string all;
  for (const auto& [strategy, name] : kStrategyNames) {
    if (text == name) return strategy;
    all += str_cat(all.empty() ? "" : ", ", name);
  }
  fail(ErrorKind::Usage, "--device-map: unknown strategy '", text, "' (", all, ")");
}

std::string_view strategy_name(Strategy s) {
  for (const auto& [strategy, name] : kStrategyNames)
    if (strategy == s) return name;
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
      ci.quantized.push_back(
          {q.module, q.rows(), q.cols(), std::string(quant::scheme_name(q.options.scheme))});
    }
    ci.arch = arch_of(c);
    if (ci.arch) ci.activation_dtype = model_dtype(*ci.arch, c);
    in.components.push_back(std::move(ci));
  }
  return in;
}

Plan make_plan(const PipelineInput& input, const PlanOptions& options) {
  if (options.by_phase && options.templates && input.model_index) {
    const ModelTemplate* t = options.templates->find(class_name_of(input.model_index));
    if (t && t->is_pipeline() && !t->phases.empty()) return make_phased_plan(input, options, *t);
  }
  return detail::Planner(input, options).run();
}

Plan make_plan(const Checkpoint& checkpoint, const PlanOptions& options) {
  return make_plan(plan_input_of(checkpoint), options);
}

}  // namespace qtool::planner