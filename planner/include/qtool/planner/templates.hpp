// Model templates: the execution order of a known architecture's top-level modules, its tied
// weights, and for pipelines the order of their components. Templates are JSON files in
// sample_configs/models/ (found at run time, see data_dirs()):
//
//   {
//     "format": "qtool-model-template", "version": 1,
//     "templates": [
//       {"name": "llama", "class_names": ["LlamaForCausalLM", "LlamaModel"],
//        "order": ["model.embed_tokens", "model.layers", "model.norm", "lm_head"],
//        "ties": [{"primary": "model.embed_tokens.weight", "alias": "lm_head.weight",
//                  "when_config": "tie_word_embeddings", "default": false}]},
//       {"name": "flux-pipeline", "class_names": ["FluxPipeline"],
//        "components": ["text_encoder", "text_encoder_2", "transformer", "vae"],
//        "offload_priority": ["text_encoder_2", "text_encoder", "vae", "transformer"]}
//     ]
//   }
//
// `checkpoint_prefix` (optional, model templates): a prefix the loader strips from checkpoint
// names to get its module names. transformers 5 builds CLIPTextModel without the `text_model`
// level its checkpoints keep (`text_model.encoder.layers.0...` loads into `encoder.layers.0`), so
// a device_map for it must be keyed by `encoder.layers.0`; the plan file keys it so (see
// ComponentPlan::checkpoint_prefix).
//
// A model template's `order` lists module prefixes in execution order; an entry may name a module
// at any depth (`encoder.mid_block.resnets.0`). A unit (a block, or the tensors of one module
// outside blocks) takes the position of the first entry that names it, one of its ancestors, or
// one of its descendants; units no entry names fall back to the heuristic below. Blocks of a
// block list always run in numeric order. `units` names modules outside the block lists that are
// placement units as a whole, like a block (the units the model's forward runs: Flux's
// time_text_embed and norm_out), instead of one unit per module that owns tensors.
//
// Heuristic order (no template, or units a template does not name), by the unit's path:
//   0. embeddings: a path element matching *embed*, wte, wpe, shared, *patch*, conv_in
//   1. blocks, block lists in natural name order
//   2. other modules, natural name order
//   3. norms and heads: last element matching *norm*, ln_f, *head*, proj_out, conv_out, classifier
//
// Pipelines: components run in the template's `components` order (unknown pipelines: names
// containing "text_encoder" first, then "transformer"/"unet"/"prior", then the rest, each in
// natural order). `offload_priority` lists the components whose blocks are offloaded first
// (diffusers' model offload keeps the denoiser, which runs every step, on the GPU longest).
// `phases` (optional) plans the pipeline by phase (planner.hpp, plan.hpp PhasePlan):
//   "phases": [{"name": "text_encoder", "components": ["text_encoder"]},
//              {"name": "denoise", "components": ["transformer"], "repeat": "denoise_steps"},
//              {"name": "vae", "components": ["vae"], "note": "..."}]
// `repeat` is a positive integer (default 1) or "denoise_steps"; a component is in one phase.
#pragma once

#include <cstdint>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "qtool/planner/module_tree.hpp"

namespace qtool::planner {

inline constexpr int kTemplateVersion = 1;

struct TemplateTie {
  std::string primary;
  std::string alias;
  std::string when_config;     // config key that enables the tie ("" = always tied)
  bool default_value = false;  // the config key's default when the config lacks it
};

// A phase of a pipeline job (pipeline templates, `phases`): its components, how many times its
// schedule runs per job (an integer, or "denoise_steps": `--denoise-steps`), and a note the plan
// repeats (what of it is not executed).
struct TemplatePhase {
  std::string name;
  std::vector<std::string> components;
  uint32_t repeat = 1;
  bool repeat_denoise_steps = false;
  std::string note;
};

struct ModelTemplate {
  std::string name;
  std::filesystem::path file;
  std::vector<std::string> class_names;
  std::vector<std::string> order;             // model templates
  std::vector<std::string> units;             // model templates: modules outside block lists placed whole
  std::vector<TemplateTie> ties;              // model templates
  std::string checkpoint_prefix;              // model templates: stripped by the loader ("" = none)
  std::vector<std::string> components;        // pipeline templates
  std::vector<std::string> offload_priority;  // pipeline templates
  std::vector<TemplatePhase> phases;          // pipeline templates: planned by phase when given
  bool is_pipeline() const { return !components.empty(); }
};

class TemplateLibrary {
 public:
  // Reads every *.json in `dir` (sorted by file name). Error(InvalidInput) naming the file and
  // key for malformed templates; Error(Io) when `dir` is not a folder.
  void load_dir(const std::filesystem::path& dir);
  void add(ModelTemplate t);
  // The template whose class_names holds `class_name` (first loaded wins), or nullptr.
  const ModelTemplate* find(std::string_view class_name) const;
  const std::vector<ModelTemplate>& templates() const { return templates_; }
  const std::vector<std::filesystem::path>& dirs() const { return dirs_; }

 private:
  std::vector<ModelTemplate> templates_;
  std::vector<std::filesystem::path> dirs_;
};

// Parses one template file's JSON.
std::vector<ModelTemplate> parse_templates(const nlohmann::json& j, const std::filesystem::path& file);

// Folders that may hold sample_configs (models/, devices/), most specific first:
// $QTOOL_DATA_DIR; <exe>/../share/qtool/sample_configs (install layout); the source tree's
// sample_configs compiled in as QTOOL_SOURCE_DATA_DIR (build tree on a clean clone).
std::vector<std::filesystem::path> data_dirs();
// The first of data_dirs()/<sub> that exists, or nullopt.
std::optional<std::filesystem::path> find_data_subdir(std::string_view sub);

// The model's class name from its config: architectures[0], else _class_name; "" when absent.
std::string class_name_of(const std::optional<nlohmann::json>& config);

// The ties a template declares that the config enables.
std::vector<TiedPair> tied_pairs_for(const ModelTemplate* tmpl, const std::optional<nlohmann::json>& config);

// A placement unit: a block (never split), a module the template names in `units` (whole), or
// the tensors owned directly by one module outside every block.
struct Unit {
  int32_t node = -1;  // tree node: the block, or the module owning the tensors
  bool is_block = false;
  std::vector<uint32_t> tensors;  // tensor indices, in execution order (natural module order)
};

// The units of a tree in execution order (see the file comment). `tmpl` may be null.
std::vector<Unit> execution_units(const ModuleTree& tree, const ModelTemplate* tmpl);

// Component names in execution order for a pipeline (template or heuristic).
std::vector<size_t> component_order(const std::vector<std::string>& names, const ModelTemplate* pipeline);

}  // namespace qtool::planner
