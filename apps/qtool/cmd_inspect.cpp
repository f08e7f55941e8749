// qtool inspect PATH [--json]: what a checkpoint holds, from its headers alone (no tensor data is
// read): layout, components, and per component tensors, dtypes, parameters, bytes, shards, the
// config's class and the block lists of its module tree.
#include <cstdio>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "cli.hpp"
#include "qtool/formats/checkpoint.hpp"
#include "qtool/formats/error.hpp"
#include "qtool/formats/json.hpp"
#include "qtool/formats/size.hpp"

#if __has_include("qtool/planner/module_tree.hpp")
#include "qtool/planner/module_tree.hpp"
#define QTOOL_INSPECT_HAVE_MODULE_TREE 1
#endif

namespace qtool::cli {
namespace {

struct InspectOptions {
  std::string path;
  bool json = false;
};

std::string json_text(const nlohmann::json& j) {
  return j.is_string() ? j.get<std::string>() : std::string();
}

std::string pad(std::string s, size_t width) {
  if (s.size() < width) s.append(width - s.size(), ' ');
  return s;
}
std::string lpad(std::string s, size_t width) {
  if (s.size() < width) s.insert(0, width - s.size(), ' ');
  return s;
}

// The class a component declares: model_index.json's entry, else config.json's.
std::string component_class(const nlohmann::json& c) {
  if (c["class"].is_string()) return c["class"].get<std::string>();
  const auto& cfg = c["config"];
  if (cfg.is_object()) {
    if (cfg["architecture"].is_string()) return cfg["architecture"].get<std::string>();
    if (cfg["class_name"].is_string()) return cfg["class_name"].get<std::string>();
  }
  return "-";
}

void print_table(const GlobalOptions& global, const nlohmann::json& d) {
  const auto& totals = d["totals"];
  std::string title = d["path"].get<std::string>() + ": " + d["layout"].get<std::string>();
  if (d["pipeline_class"].is_string()) title += " " + d["pipeline_class"].get<std::string>();
  title += ", " + std::to_string(d["components"].size()) + " component" +
           (d["components"].size() == 1 ? "" : "s") + ", " + format_count(totals["parameters"]) +
           " parameters, " + format_size(totals["bytes"]) + " in " +
           std::to_string(totals["files"].get<uint64_t>()) + " file" + (totals["files"] == 1 ? "" : "s");
  info(global, title);
  info(global, "fingerprint " + d["fingerprint"].get<std::string>());
  info(global, "");
  info(global, pad("component", 18) + pad("class", 30) + lpad("tensors", 9) + lpad("params", 10) +
                   lpad("bytes", 12) + lpad("shards", 8));
  for (const auto& c : d["components"]) {
    const std::string name = c["name"].get<std::string>().empty() ? "(model)" : c["name"].get<std::string>();
    info(global, pad(name, 18) + pad(component_class(c), 30) +
                     lpad(std::to_string(c["tensors"].get<uint64_t>()), 9) +
                     lpad(format_count(c["parameters"]), 10) + lpad(format_size(c["bytes"]), 12) +
                     lpad(std::to_string(c["shards"].size()), 8));
  }
  for (const auto& c : d["components"]) {
    const std::string name = c["name"].get<std::string>().empty() ? "(model)" : c["name"].get<std::string>();
    info(global, "");
    std::string head = name + ": " + component_class(c);
    if (c["library"].is_string()) head += " (" + c["library"].get<std::string>() + ")";
    head += ", " + c["dir"].get<std::string>();
    info(global, head);
    const auto& cfg = c["config"];
    if (cfg.is_object()) {
      std::string line = "  config:";
      if (cfg["architecture"].is_string()) line += " architecture " + json_text(cfg["architecture"]);
      if (cfg["class_name"].is_string()) line += " _class_name " + json_text(cfg["class_name"]);
      if (cfg["model_type"].is_string()) line += " model_type " + json_text(cfg["model_type"]);
      if (cfg["quant_method"].is_string()) line += ", quantized: " + json_text(cfg["quant_method"]);
      info(global, line);
    } else {
      info(global, "  config: none");
    }
    info(global, "  tensors " + std::to_string(c["tensors"].get<uint64_t>()) + ", parameters " +
                     format_count(c["parameters"]) + " (" + std::to_string(c["parameters"].get<uint64_t>()) +
                     "), " + format_size(c["bytes"]));
    std::string dtypes = "  dtypes:";
    bool first = true;
    for (const auto& [dt, k] : c["dtypes"].items()) {
      dtypes += (first ? " " : "; ") + dt + " " + std::to_string(k["tensors"].get<uint64_t>()) + " tensors " +
                format_size(k["bytes"]);
      first = false;
    }
    info(global, dtypes);
    std::string shards = "  shards:";
    if (c["index"].is_string()) shards += " (index " + c["index"].get<std::string>() + ")";
    info(global, shards);
    for (const auto& s : c["shards"])
      info(global, "    " + pad(s["file"].get<std::string>(), 56) + lpad(format_size(s["file_bytes"]), 12) +
                       lpad(std::to_string(s["tensors"].get<uint64_t>()), 8) + " tensors");
    if (c.contains("block_lists")) {
      std::string blocks = "  block lists:";
      if (c["block_lists"].empty()) blocks += " none";
      bool first_block = true;
      for (const auto& b : c["block_lists"]) {
        blocks += std::string(first_block ? " " : ", ") + b["prefix"].get<std::string>() + " x" +
                  std::to_string(b["length"].get<uint64_t>()) + " (" + format_size(b["bytes"]) + ")";
        first_block = false;
      }
      info(global, blocks);
    }
  }
  if (!d["other_components"].empty()) {
    std::string others = "other components (no weights):";
    for (const auto& o : d["other_components"]) others += " " + o.get<std::string>();
    info(global, "");
    info(global, others);
  }
}

int run_inspect(const InspectOptions& o, const GlobalOptions& global) {
  const Checkpoint ck = Checkpoint::open(o.path);
  nlohmann::json d = describe_checkpoint(ck);
#ifdef QTOOL_INSPECT_HAVE_MODULE_TREE
  for (size_t i = 0; i < ck.components().size(); ++i) {
    nlohmann::json lists = nlohmann::json::array();
    for (const auto& b : planner::block_lists(ck.components()[i]))
      lists.push_back({{"prefix", b.prefix}, {"length", b.length}, {"bytes", b.bytes}});
    d["components"][i]["block_lists"] = std::move(lists);
  }
#endif
  print_table(global, d);
  if (o.json) std::cout << dump_json(d, 2) << std::endl;
  return 0;
}

void declare_inspect(CLI::App* cmd, InspectOptions& o) {
  cmd->add_option("PATH", o.path, "A .safetensors file, a model folder or a pipeline folder")->required();
  cmd->add_flag("--json", o.json, "Print the summary as JSON on stdout (the table still goes to stderr)");
}

const CommandRegistrar kRegistrar(
    10, "inspect",
    "Show what a checkpoint holds, from its headers alone (no tensor data is read): its layout "
    "(a .safetensors file, a model folder, a diffusers pipeline folder), and per component the "
    "tensors, dtypes, parameters, bytes, shards, config class and block lists (e.g. "
    "transformer_blocks x19). Every file header and index is validated.",
    declare_inspect, run_inspect);

}  // namespace
}  // namespace qtool::cli
