// Parsing and checking of the quant-mapping config; the linear-weight rule and module patterns.
#include "qtool/libquant/config.hpp"

#include <fnmatch.h>

#include <algorithm>
#include <set>
#include <string>

#include "qtool/formats/error.hpp"

namespace qtool::quant {
namespace {

using nlohmann::json;

[[noreturn]] void config_error(std::string_view label, std::string_view key, std::string_view what) {
  // Keys and names come from the user's file: a control character in them must not cut or garble
  // the message.
  fail(ErrorKind::InvalidInput, label, ": ", escape_controls(key), ": ", escape_controls(what));
}

std::string type_name(const json& j) { return j.type_name(); }

std::string join_key(std::string_view prefix, std::string_view key) {
  return prefix.empty() ? std::string(key) : str_cat(prefix, ".", key);
}

std::string in_quotes(std::string_view s) { return str_cat("'", s, "'"); }

bool is_option_key(std::string_view key) {
  return key == "blocksize" || key == "double_quant" || key == "per_tensor" || key == "strategy";
}

// Reads the options of `scheme` from `obj`, skipping `skip` keys (handled by the caller).
// `where` is the key path of `obj` in the file.
SchemeOptions parse_options(const json& obj, Scheme scheme, std::string_view label, std::string_view where,
                            std::initializer_list<std::string_view> skip) {
  SchemeOptions options;
  options.scheme = scheme;
  std::optional<bool> per_tensor;
  std::optional<std::string> strategy;
  for (const auto& [key, value] : obj.items()) {
    if (std::find(skip.begin(), skip.end(), key) != skip.end()) continue;
    const std::string path = join_key(where, key);
    if (!is_option_key(key)) {
      config_error(
          label, path,
          str_cat("unknown key (options are blocksize, double_quant for nf4/fp4; per_tensor, strategy "
                  "for fp8)"));
    }
    if (!scheme_has_option(scheme, key)) {
      config_error(label, path, str_cat("is not an option of scheme '", scheme_name(scheme), "'"));
    }
    if (key == "blocksize") {
      if (!value.is_number_integer() || value.get<int64_t>() <= 0) {
        config_error(label, path, str_cat("must be a positive integer, got ", value.dump()));
      }
      const int64_t b = value.get<int64_t>();
      const bool pow2 = (b & (b - 1)) == 0;
      if (!pow2 || b < kMinBlocksize || b > kMaxBlocksize) {
        config_error(label, path,
                     str_cat("blocksize ", b, " is not allowed (a power of two from ", kMinBlocksize, " to ",
                             kMaxBlocksize, ", as bitsandbytes accepts)"));
      }
      options.blocksize = static_cast<uint32_t>(b);
    } else if (key == "double_quant") {
      if (!value.is_boolean())
        config_error(label, path, str_cat("must be true or false, got ", value.dump()));
      options.double_quant = value.get<bool>();
    } else if (key == "per_tensor") {
      if (!value.is_boolean())
        config_error(label, path, str_cat("must be true or false, got ", value.dump()));
      per_tensor = value.get<bool>();
    } else if (key == "strategy") {
      if (!value.is_string() ||
          (value.get<std::string>() != "channel" && value.get<std::string>() != "tensor")) {
        config_error(label, path, str_cat("must be \"channel\" or \"tensor\", got ", value.dump()));
      }
      strategy = value.get<std::string>();
    }
  }
  if (strategy) {
    const bool tensor = *strategy == "tensor";
    if (per_tensor && *per_tensor != tensor) {
      config_error(label, join_key(where, "strategy"),
                   str_cat("\"", *strategy, "\" contradicts per_tensor: ", *per_tensor ? "true" : "false"));
    }
    per_tensor = tensor;
  }
  options.per_tensor = per_tensor.value_or(false);
  validate_options(options, str_cat(label, ": ", where));
  return options;
}

Scheme parse_scheme_value(const json& value, std::string_view label, std::string_view key) {
  if (!value.is_string())
    config_error(label, key, str_cat("must be a scheme name (string), got ", value.dump()));
  const auto scheme = parse_scheme(value.get<std::string>());
  if (!scheme) {
    config_error(label, key,
                 str_cat("unknown scheme '", value.get<std::string>(), "' (expected one of ",
                         scheme_names_list(), ")"));
  }
  return *scheme;
}

std::vector<std::string> parse_patterns(const json& value, std::string_view label, std::string_view key) {
  if (!value.is_array())
    config_error(label, key, str_cat("must be a list of module patterns, got ", type_name(value)));
  std::vector<std::string> out;
  for (size_t i = 0; i < value.size(); ++i) {
    const std::string path = str_cat(key, "[", i, "]");
    if (!value[i].is_string() || value[i].get<std::string>().empty()) {
      config_error(label, path, str_cat("must be a non-empty string, got ", value[i].dump()));
    }
    out.push_back(value[i].get<std::string>());
  }
  return out;
}

bool glob_match(const std::string& pattern, const std::string& text) {
  return ::fnmatch(pattern.c_str(), text.c_str(), 0) == 0;
}

std::string_view leaf_of(std::string_view module) {
  const size_t dot = module.rfind('.');
  return dot == std::string_view::npos ? module : module.substr(dot + 1);
}

// transformers' should_convert_module: the key as a regex (its dots match any character) from
// the start, ending at a module boundary; or a plain suffix.
bool transformers_skips(std::string_view key, std::string_view module) {
  if (module.size() >= key.size() && module.substr(module.size() - key.size()) == key) return true;
  if (key.size() > module.size()) return false;
  for (size_t i = 0; i < key.size(); ++i) {
    if (key[i] != '.' && key[i] != module[i]) return false;
  }
  const size_t n = key.size();
  return n == module.size() || module[n] == '.' || (n > 0 && module[n - 1] == '.');
}

// diffusers' _replace_with_bnb_linear: the child's own name in the list, the key as an exact
// name, or the key followed by a dot anywhere in the name.
bool diffusers_skips(std::string_view key, std::string_view module) {
  if (leaf_of(module) == key || module == key) return true;
  return module.find(str_cat(key, ".")) != std::string_view::npos;
}

// "transformers", "diffusers" or "" (unknown), from model_index.json or config.json.
std::string loader_library(const Checkpoint& checkpoint, const Component& component) {
  const auto& index = checkpoint.model_index();
  if (index && index->is_object() && index->contains(component.name())) {
    const json& entry = (*index)[component.name()];
    if (entry.is_array() && !entry.empty() && entry[0].is_string()) return entry[0].get<std::string>();
  }
  const auto& config = component.config();
  if (config && config->is_object()) {
    if (config->contains("_class_name") || config->contains("_diffusers_version")) return "diffusers";
    if (config->contains("architectures") || config->contains("model_type")) return "transformers";
  }
  return "";
}

// Linear modules that a loader keeps in full precision whatever the quantization config says
// (transformers' _keep_in_fp32_modules, which its bitsandbytes and compressed-tensors quantizers
// never convert), by config.json model_type.
std::vector<std::string> loader_kept_modules(const Component& component) {
  const auto& config = component.config();
  if (!config || !config->is_object()) return {};
  const auto it = config->find("model_type");
  if (it == config->end() || !it->is_string()) return {};
  static const std::map<std::string, std::vector<std::string>> kKept = {
      {"t5", {"wo"}}, {"mt5", {"wo"}}, {"umt5", {"wo"}}, {"pop2piano", {"wo"}}, {"udop", {"wo"}}};
  const auto kept = kKept.find(it->get<std::string>());
  return kept == kKept.end() ? std::vector<std::string>{} : kept->second;
}

bool tied_embeddings(const Component& component) {
  const auto& config = component.config();
  if (!config || !config->is_object()) return false;
  auto it = config->find("tie_word_embeddings");
  return it != config->end() && it->is_boolean() && it->get<bool>();
}

std::string component_label(std::string_view name) {
  return name.empty() ? std::string("the model") : str_cat("component '", name, "'");
}

}  // namespace

QuantConfig parse_quant_config(const json& j, std::string_view label) {
  QuantConfig config;
  config.label = std::string(label);
  if (!j.is_object())
    fail(ErrorKind::InvalidInput, label, ": the config must be a JSON object, got ", j.type_name());
  static const std::set<std::string> kKeys = {"quant_backend",          "quant_kwargs",
                                              "components_to_quantize", "quant_mapping",
                                              "modules_to_not_convert", "description"};
  for (const auto& [key, value] : j.items()) {
    if (!kKeys.count(key)) {
      config_error(
          label, key,
          "unknown key (expected quant_backend, quant_kwargs, components_to_quantize, quant_mapping, "
          "modules_to_not_convert, description)");
    }
  }
  if (j.contains("quant_backend")) {
    const Scheme scheme = parse_scheme_value(j["quant_backend"], label, "quant_backend");
    json kwargs = json::object();
    if (j.contains("quant_kwargs")) {
      kwargs = j["quant_kwargs"];
      if (!kwargs.is_object())
        config_error(label, "quant_kwargs", str_cat("must be an object, got ", kwargs.type_name()));
    }
    config.backend = parse_options(kwargs, scheme, label, "quant_kwargs", {});
  } else if (j.contains("quant_kwargs")) {
    config_error(label, "quant_kwargs", "given without quant_backend (the scheme they apply to)");
  }
  if (j.contains("components_to_quantize")) {
    const json& list = j["components_to_quantize"];
    // diffusers also accepts a single name.
    std::vector<std::string> names;
    if (list.is_string()) {
      names.push_back(list.get<std::string>());
    } else if (list.is_array()) {
      for (size_t i = 0; i < list.size(); ++i) {
        if (!list[i].is_string()) {
          config_error(label, str_cat("components_to_quantize[", i, "]"),
                       str_cat("must be a component name, got ", list[i].dump()));
        }
        const std::string name = list[i].get<std::string>();
        if (std::find(names.begin(), names.end(), name) != names.end()) {
          config_error(label, str_cat("components_to_quantize[", i, "]"),
                       str_cat("'", name, "' is listed twice"));
        }
        names.push_back(name);
      }
    } else {
      config_error(label, "components_to_quantize",
                   str_cat("must be a list of component names, got ", list.type_name()));
    }
    config.components_to_quantize = std::move(names);
  }
  if (j.contains("quant_mapping")) {
    const json& mapping = j["quant_mapping"];
    if (!mapping.is_object())
      config_error(label, "quant_mapping", str_cat("must be an object, got ", mapping.type_name()));
    for (const auto& [component, entry] : mapping.items()) {
      const std::string where = str_cat("quant_mapping.", component);
      if (!entry.is_object()) {
        config_error(label, where,
                     str_cat("must be an object like {\"scheme\": \"int8\"}, got ", entry.dump()));
      }
      if (!entry.contains("scheme")) config_error(label, where, "has no \"scheme\"");
      MappingEntry parsed;
      const Scheme scheme = parse_scheme_value(entry["scheme"], label, join_key(where, "scheme"));
      parsed.options = parse_options(entry, scheme, label, where, {"scheme", "modules_to_not_convert"});
      if (entry.contains("modules_to_not_convert")) {
        parsed.modules_to_not_convert =
            parse_patterns(entry["modules_to_not_convert"], label, join_key(where, "modules_to_not_convert"));
      }
      config.quant_mapping.emplace(component, std::move(parsed));
    }
  }
  if (j.contains("modules_to_not_convert")) {
    config.modules_to_not_convert =
        parse_patterns(j["modules_to_not_convert"], label, "modules_to_not_convert");
  }
  if (config.components_to_quantize && !config.backend) {
    for (size_t i = 0; i < config.components_to_quantize->size(); ++i) {
      const std::string& name = (*config.components_to_quantize)[i];
      if (!config.quant_mapping.count(name)) {
        config_error(
            label, str_cat("components_to_quantize[", i, "]"),
            str_cat("'", name, "' has no scheme: set quant_backend or give it a quant_mapping entry"));
      }
    }
  }
  if (!config.backend && config.quant_mapping.empty()) {
    fail(ErrorKind::InvalidInput, label, ": nothing to quantize: give quant_backend or quant_mapping");
  }
  return config;
}

QuantConfig read_quant_config(const std::filesystem::path& path) {
  return parse_quant_config(read_json_file(path), path.string());
}

QuantConfig config_for_scheme(const SchemeOptions& options) {
  validate_options(options, "--scheme");
  QuantConfig config;
  config.label = "--scheme";
  config.backend = options;
  return config;
}

json options_to_json(const SchemeOptions& options) {
  json j = json::object();
  j["scheme"] = std::string(scheme_name(options.scheme));
  if (scheme_has_option(options.scheme, "blocksize")) j["blocksize"] = options.blocksize;
  if (scheme_has_option(options.scheme, "double_quant")) j["double_quant"] = options.double_quant;
  if (scheme_has_option(options.scheme, "per_tensor")) j["per_tensor"] = options.per_tensor;
  return j;
}

json config_to_json(const QuantConfig& config) {
  json j = json::object();
  if (config.backend) {
    j["quant_backend"] = std::string(scheme_name(config.backend->scheme));
    json kwargs = options_to_json(*config.backend);
    kwargs.erase("scheme");
    j["quant_kwargs"] = kwargs;
  }
  if (config.components_to_quantize) j["components_to_quantize"] = *config.components_to_quantize;
  if (!config.quant_mapping.empty()) {
    json mapping = json::object();
    for (const auto& [name, entry] : config.quant_mapping) {
      json e = options_to_json(entry.options);
      if (!entry.modules_to_not_convert.empty()) e["modules_to_not_convert"] = entry.modules_to_not_convert;
      mapping[name] = e;
    }
    j["quant_mapping"] = mapping;
  }
  if (!config.modules_to_not_convert.empty()) j["modules_to_not_convert"] = config.modules_to_not_convert;
  return j;
}

bool pattern_matches(std::string_view pattern, std::string_view module) {
  const std::string p(pattern);
  const std::string m(module);
  if (glob_match(p, m)) return true;
  // Ancestors: "a", "a.b" of "a.b.c"; dotted suffixes: "b.c", "c".
  for (size_t dot = m.find('.'); dot != std::string::npos; dot = m.find('.', dot + 1)) {
    if (glob_match(p, m.substr(0, dot)) || glob_match(p, m.substr(dot + 1))) return true;
  }
  return false;
}

bool is_embedding_module(std::string_view module) {
  const std::string leaf(leaf_of(module));
  static const char* const kEmbedding[] = {
      "embed_tokens", "embed_*", "shared", "wte", "wpe", "*embedding*", "relative_attention_bias"};
  for (const char* p : kEmbedding) {
    if (glob_match(p, leaf)) return true;
  }
  return false;
}

std::optional<std::string> linear_exclusion(std::string_view tensor_name, DType dtype,
                                            std::span<const int64_t> shape) {
  constexpr std::string_view kSuffix = ".weight";
  if (tensor_name.size() <= kSuffix.size() ||
      tensor_name.substr(tensor_name.size() - kSuffix.size()) != kSuffix) {
    return "not a .weight tensor";
  }
  if (shape.size() != 2) return str_cat(shape.size(), "-D (linear weights are 2-D)");
  if (shape[0] == 0 || shape[1] == 0) return "empty";
  if (!is_quantizable_dtype(dtype)) return str_cat("dtype ", dtype_name(dtype), " (not BF16, F16 or F32)");
  const std::string module(tensor_name.substr(0, tensor_name.size() - kSuffix.size()));
  if (is_embedding_module(module)) return "an embedding";
  const std::string leaf(leaf_of(module));
  if (glob_match("*norm*", leaf) || glob_match("ln_*", leaf)) return "a norm";
  if (leaf == "lm_head") return "the output head (kept in full precision as bitsandbytes loaders do)";
  return std::nullopt;
}

bool ComponentPlan::is_quantized(std::string_view module) const {
  return std::binary_search(quantized_modules.begin(), quantized_modules.end(), module);
}

const ComponentPlan* QuantPlan::find(std::string_view component) const {
  for (const auto& c : components) {
    if (c.component == component) return &c;
  }
  return nullptr;
}

namespace {

// Every component the config names must hold weights: Error(InvalidInput) naming the key.
void check_named_components(const QuantConfig& config, const Checkpoint& checkpoint) {
  auto known_components = [&] {
    std::string names;
    for (const auto& c : checkpoint.components()) {
      names += names.empty() ? "" : ", ";
      names += c.name().empty() ? std::string("\"\" (a single model)") : in_quotes(c.name());
    }
    return names;
  };
  auto check_component = [&](const std::string& name, const std::string& key) {
    if (checkpoint.find_component(name)) return;
    const auto& others = checkpoint.other_components();
    if (std::find(others.begin(), others.end(), name) != others.end()) {
      config_error(
          config.label, key,
          str_cat("component '", name, "' holds no weights (weight components: ", known_components(), ")"));
    }
    config_error(config.label, key,
                 str_cat("unknown component '", name, "' in ", checkpoint.root().string(), " (it has ",
                         known_components(), ")"));
  };
  if (config.components_to_quantize) {
    for (size_t i = 0; i < config.components_to_quantize->size(); ++i) {
      check_component((*config.components_to_quantize)[i], str_cat("components_to_quantize[", i, "]"));
    }
  }
  for (const auto& [name, entry] : config.quant_mapping)
    check_component(name, str_cat("quant_mapping.", name));
}

// The scheme of a component (its quant_mapping entry, else quant_backend if it is listed) and the
// config key it comes from; its own modules_to_not_convert patterns go to `own_patterns`.
ComponentPlan component_scheme(const QuantConfig& config, const Component& component,
                               std::vector<std::string>& own_patterns) {
  ComponentPlan cp;
  cp.component = component.name();
  const auto mapped = config.quant_mapping.find(component.name());
  const bool listed = !config.components_to_quantize ||
                      std::find(config.components_to_quantize->begin(), config.components_to_quantize->end(),
                                component.name()) != config.components_to_quantize->end();
  if (mapped != config.quant_mapping.end()) {
    cp.options = mapped->second.options;
    cp.source_key = str_cat("quant_mapping.", component.name());
    own_patterns = mapped->second.modules_to_not_convert;
  } else if (listed && config.backend) {
    cp.options = config.backend;
    cp.source_key = "quant_backend";
  }
  return cp;
}

// A component's modules split by what becomes of their 2-D float `.weight`.
struct ModuleSplit {
  std::set<std::string> quantized;
  std::set<std::string> unquantized;
  std::set<std::string> modules;  // every module with a tensor
  size_t n_pattern_excluded = 0;  // linears left out by a pattern
  std::string first_excluded;     // "'module' by 'pattern'"
};

ModuleSplit split_modules(const Component& component, const std::vector<std::string>& patterns) {
  ModuleSplit split;
  const std::vector<std::string> kept = loader_kept_modules(component);
  for (const auto& e : component.entries()) {
    const TensorInfo& t = component.info(e);
    split.modules.insert(module_of_tensor(t.name));
    const bool weight_2d = t.shape.size() == 2 && dtype_is_float(t.dtype) && t.name.size() > 7 &&
                           t.name.compare(t.name.size() - 7, 7, ".weight") == 0;
    if (!weight_2d) continue;
    const std::string module = t.name.substr(0, t.name.size() - 7);
    if (linear_exclusion(t.name, t.dtype, t.shape)) {
      split.unquantized.insert(module);
      continue;
    }
    bool skip = false;
    for (const auto& p : patterns) {
      if (skip || !pattern_matches(p, module)) continue;
      skip = true;
      ++split.n_pattern_excluded;
      if (split.first_excluded.empty()) split.first_excluded = str_cat("'", module, "' by '", p, "'");
    }
    for (const auto& p : kept) skip = skip || pattern_matches(p, module);
    (skip ? split.unquantized : split.quantized).insert(module);
  }
  return split;
}

// Sets matched[i] where patterns[i] matches one of `modules`.
void mark_matched(const std::vector<std::string>& patterns, const std::set<std::string>& modules,
                  std::vector<bool>& matched) {
  for (const auto& module : modules) {
    for (size_t i = 0; i < matched.size(); ++i) {
      if (!matched[i] && pattern_matches(patterns[i], module)) matched[i] = true;
    }
  }
}

// A loader reads the unquantized list with its own rule; warn where that rule would also catch a
// module that is quantized (the file would not load there).
void warn_loader_conflicts(const Checkpoint& checkpoint, const Component& component, const ComponentPlan& cp,
                           std::vector<std::string>& warnings) {
  const std::string library = loader_library(checkpoint, component);
  if (library != "transformers" && library != "diffusers") return;
  size_t n_conflicts = 0;
  std::string example;
  for (const auto& key : cp.unquantized_modules) {
    for (const auto& module : cp.quantized_modules) {
      const bool hit =
          library == "transformers" ? transformers_skips(key, module) : diffusers_skips(key, module);
      if (!hit) continue;
      if (n_conflicts++ == 0) example = str_cat("'", module, "' (by '", key, "')");
    }
  }
  if (n_conflicts > 0) {
    warnings.push_back(str_cat(component_label(cp.component), ": ", library, "' skip rule would also leave ",
                               n_conflicts, " quantized module(s) unconverted, e.g. ", example,
                               "; that loader will not read this component. Quantize or skip them alike."));
  }
}

// The plan of one component the config gives a scheme; `global_matched` collects which of the
// config's modules_to_not_convert patterns matched a module.
void plan_quantized_component(const QuantConfig& config, const Checkpoint& checkpoint,
                              const Component& component, ComponentPlan& cp,
                              const std::vector<std::string>& own_patterns, std::vector<bool>& global_matched,
                              std::vector<std::string>& warnings) {
  const std::string& label = config.label;
  const auto already = find_quantized_linears(component);
  if (!already.empty()) {
    fail(ErrorKind::InvalidInput, checkpoint.root().string(), ": ", component_label(component.name()),
         " is already quantized (module '", already.front().module, "' is ",
         scheme_name(already.front().options.scheme), "); run `qtool dequantize` first");
  }
  cp.patterns = config.modules_to_not_convert;
  cp.patterns.insert(cp.patterns.end(), own_patterns.begin(), own_patterns.end());
  ModuleSplit split = split_modules(component, cp.patterns);
  // Patterns that leave nothing to quantize are a mistake, not an empty component: say so
  // instead of copying the component unchanged under a quantized config.
  if (split.quantized.empty() && split.n_pattern_excluded > 0)
    fail(ErrorKind::InvalidInput, label, ": modules_to_not_convert: nothing would be quantized in ",
         component_label(cp.component), ": the patterns exclude all ", split.n_pattern_excluded,
         " of its linear weights (first ", split.first_excluded,
         "); narrow the patterns, or leave the component out of the config");
  std::vector<bool> own_matched(own_patterns.size(), false);
  mark_matched(config.modules_to_not_convert, split.modules, global_matched);
  mark_matched(own_patterns, split.modules, own_matched);
  for (size_t i = 0; i < own_matched.size(); ++i) {
    if (!own_matched[i]) {
      warnings.push_back(str_cat(label, ": ", cp.source_key, ".modules_to_not_convert[", i, "]: pattern '",
                                 own_patterns[i], "' matches no module of ", component_label(cp.component)));
    }
  }
  if (tied_embeddings(component) && !component.find("lm_head.weight")) split.unquantized.insert("lm_head");
  if (split.quantized.empty()) {
    warnings.push_back(str_cat(label, ": ", cp.source_key, ": ", component_label(cp.component),
                               " has no linear weight to quantize; it is copied unchanged"));
  }
  cp.quantized_modules.assign(split.quantized.begin(), split.quantized.end());
  cp.unquantized_modules.assign(split.unquantized.begin(), split.unquantized.end());
  warn_loader_conflicts(checkpoint, component, cp, warnings);
}

}  // namespace

QuantPlan plan_quantization(const QuantConfig& config, const Checkpoint& checkpoint) {
  check_named_components(config, checkpoint);
  QuantPlan plan;
  // Which patterns matched something, over the components they apply to.
  std::vector<bool> global_matched(config.modules_to_not_convert.size(), false);
  for (const Component& component : checkpoint.components()) {
    std::vector<std::string> own_patterns;
    ComponentPlan cp = component_scheme(config, component, own_patterns);
    if (cp.options)
      plan_quantized_component(config, checkpoint, component, cp, own_patterns, global_matched,
                               plan.warnings);
    plan.components.push_back(std::move(cp));
  }
  for (size_t i = 0; i < global_matched.size(); ++i) {
    if (!global_matched[i]) {
      plan.warnings.push_back(str_cat(config.label, ": modules_to_not_convert[", i, "]: pattern '",
                                      config.modules_to_not_convert[i],
                                      "' matches no module of the quantized components"));
    }
  }
  const bool any = std::any_of(plan.components.begin(), plan.components.end(),
                               [](const ComponentPlan& c) { return c.options.has_value(); });
  if (!any)
    fail(ErrorKind::InvalidInput, config.label, ": the config quantizes no component of ",
         checkpoint.root().string());
  return plan;
}

}  // namespace qtool::quant
