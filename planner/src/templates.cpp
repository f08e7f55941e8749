#include "qtool/planner/templates.hpp"

#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <system_error>

#include "qtool/formats/checkpoint.hpp"
#include "qtool/formats/error.hpp"

namespace qtool::planner {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

std::vector<std::string> string_list(const json& t, std::string_view key, const fs::path& file, size_t i) {
  std::vector<std::string> out;
  auto it = t.find(std::string(key));
  if (it == t.end()) return out;
  if (!it->is_array())
    fail(ErrorKind::InvalidInput, file.string(), ": templates[", i, "].", key,
         " must be an array of strings");
  for (const json& v : *it) {
    if (!v.is_string() || v.get<std::string>().empty()) {
      fail(ErrorKind::InvalidInput, file.string(), ": templates[", i, "].", key,
           " must hold non-empty strings");
    }
    out.push_back(v.get<std::string>());
  }
  return out;
}

bool glob(std::string_view p, std::string_view s) {
  // '*' only; enough for the heuristic's fixed patterns.
  size_t pi = 0, si = 0, star = std::string_view::npos, mark = 0;
  while (si < s.size()) {
    if (pi < p.size() && p[pi] == s[si]) {
      ++pi;
      ++si;
    } else if (pi < p.size() && p[pi] == '*') {
      star = pi++;
      mark = si;
    } else if (star != std::string_view::npos) {
      pi = star + 1;
      si = ++mark;
    } else {
      return false;
    }
  }
  while (pi < p.size() && p[pi] == '*') ++pi;
  return pi == p.size();
}

bool is_prefix_path(std::string_view ancestor, std::string_view path) {
  if (ancestor.empty()) return true;
  return path.size() > ancestor.size() && path.starts_with(ancestor) && path[ancestor.size()] == '.';
}

int heuristic_category(const ModuleTree& tree, const Unit& u) {
  const ModuleNode& node = tree.node(u.node);
  std::string_view path = node.prefix;
  size_t pos = 0;
  std::string_view last;
  while (pos <= path.size()) {
    const size_t dot = path.find('.', pos);
    const size_t end = dot == std::string_view::npos ? path.size() : dot;
    const std::string_view el = path.substr(pos, end - pos);
    last = el;
    if (glob("*embed*", el) || el == "wte" || el == "wpe" || el == "shared" || glob("*patch*", el) ||
        el == "conv_in") {
      return 0;
    }
    pos = end + 1;
  }
  if (u.is_block) return 1;
  if (glob("*norm*", last) || last == "ln_f" || glob("*head*", last) || last == "proj_out" ||
      last == "conv_out" || last == "classifier") {
    return 3;
  }
  return 2;
}

TemplatePhase parse_phase(const json& p, const std::string& where) {
  if (!p.is_object()) fail(ErrorKind::InvalidInput, where, " must be an object");
  TemplatePhase ph;
  for (const auto& [key, v] : p.items()) {
    if (key == "name" && v.is_string() && !v.get<std::string>().empty()) {
      ph.name = v.get<std::string>();
    } else if (key == "note" && v.is_string()) {
      ph.note = v.get<std::string>();
    } else if (key == "repeat" && v.is_string() && v.get<std::string>() == "denoise_steps") {
      ph.repeat_denoise_steps = true;
    } else if (key == "repeat" && v.is_number_unsigned() && v.get<uint64_t>() >= 1 &&
               v.get<uint64_t>() <= 1000000) {
      ph.repeat = static_cast<uint32_t>(v.get<uint64_t>());
    } else if (key == "components" && v.is_array() && !v.empty()) {
      for (const json& c : v) {
        if (!c.is_string() || c.get<std::string>().empty())
          fail(ErrorKind::InvalidInput, where, ".components must hold non-empty strings");
        ph.components.push_back(c.get<std::string>());
      }
    } else {
      fail(ErrorKind::InvalidInput, where, ": bad key '", key,
           "' (name: a string, components: a non-empty array of names, repeat: 1 to 1000000 or "
           "\"denoise_steps\", note: a string)");
    }
  }
  if (ph.name.empty() || ph.components.empty())
    fail(ErrorKind::InvalidInput, where, " needs 'name' and 'components'");
  return ph;
}

std::vector<TemplatePhase> parse_phases(const json& arr, const ModelTemplate& m, const std::string& label,
                                        size_t i) {
  const std::string base = str_cat(label, ": templates[", i, "].phases");
  if (!arr.is_array() || arr.empty()) fail(ErrorKind::InvalidInput, base, " must be a non-empty array");
  if (m.components.empty()) fail(ErrorKind::InvalidInput, base, ": only a pipeline template has phases");
  std::vector<TemplatePhase> out;
  for (size_t k = 0; k < arr.size(); ++k) {
    TemplatePhase ph = parse_phase(arr[k], str_cat(base, "[", k, "]"));
    for (const std::string& c : ph.components) {
      if (std::find(m.components.begin(), m.components.end(), c) == m.components.end())
        fail(ErrorKind::InvalidInput, base, "[", k, "]: component '", c, "' is not in 'components'");
      for (const TemplatePhase& prev : out) {
        if (std::find(prev.components.begin(), prev.components.end(), c) != prev.components.end())
          fail(ErrorKind::InvalidInput, base, "[", k, "]: component '", c, "' is in two phases");
      }
    }
    for (const TemplatePhase& prev : out) {
      if (prev.name == ph.name) fail(ErrorKind::InvalidInput, base, "[", k, "]: phase '", ph.name, "' twice");
    }
    out.push_back(std::move(ph));
  }
  return out;
}

}  // namespace

std::vector<ModelTemplate> parse_templates(const json& j, const fs::path& file) {
  const std::string label = file.string();
  if (!j.is_object()) fail(ErrorKind::InvalidInput, label, ": a template file must be a JSON object");
  for (const auto& [key, v] : j.items()) {
    if (key != "format" && key != "version" && key != "templates" && key != "description") {
      fail(ErrorKind::InvalidInput, label, ": unknown key '", key, "'");
    }
  }
  // Not j.value("format", ...): it throws when the value is not a string.
  if (!j.contains("format") || j["format"] != "qtool-model-template") {
    fail(ErrorKind::InvalidInput, label, ": key 'format' must be \"qtool-model-template\"");
  }
  if (!j.contains("version") || !j["version"].is_number_integer() ||
      j["version"].get<int64_t>() != kTemplateVersion) {
    fail(ErrorKind::InvalidInput, label, ": key 'version' must be ", kTemplateVersion);
  }
  if (!j.contains("templates") || !j["templates"].is_array()) {
    fail(ErrorKind::InvalidInput, label, ": key 'templates' must be an array");
  }
  std::vector<ModelTemplate> out;
  const json& arr = j["templates"];
  for (size_t i = 0; i < arr.size(); ++i) {
    const json& t = arr[i];
    if (!t.is_object()) fail(ErrorKind::InvalidInput, label, ": templates[", i, "] must be an object");
    for (const auto& [key, v] : t.items()) {
      static const char* const kKeys[] = {
          "name",        "class_names",       "order", "units", "ties", "components", "offload_priority",
          "description", "checkpoint_prefix", "phases"};
      if (std::find(std::begin(kKeys), std::end(kKeys), key) == std::end(kKeys)) {
        fail(ErrorKind::InvalidInput, label, ": templates[", i, "]: unknown key '", key, "'");
      }
    }
    ModelTemplate m;
    m.file = file;
    if (!t.contains("name") || !t["name"].is_string()) {
      fail(ErrorKind::InvalidInput, label, ": templates[", i, "].name must be a string");
    }
    m.name = t["name"].get<std::string>();
    m.class_names = string_list(t, "class_names", file, i);
    if (m.class_names.empty())
      fail(ErrorKind::InvalidInput, label, ": templates[", i, "].class_names is empty");
    m.order = string_list(t, "order", file, i);
    m.units = string_list(t, "units", file, i);
    m.components = string_list(t, "components", file, i);
    m.offload_priority = string_list(t, "offload_priority", file, i);
    if (auto it = t.find("checkpoint_prefix"); it != t.end()) {
      if (!it->is_string() || it->get<std::string>().empty() || it->get<std::string>().back() == '.') {
        fail(ErrorKind::InvalidInput, label, ": templates[", i,
             "].checkpoint_prefix must be a non-empty module path without a trailing dot");
      }
      m.checkpoint_prefix = it->get<std::string>();
    }
    if (auto it = t.find("phases"); it != t.end()) m.phases = parse_phases(*it, m, label, i);
    if (m.order.empty() == m.components.empty()) {
      fail(ErrorKind::InvalidInput, label, ": templates[", i,
           "] needs exactly one of 'order' (a model) or 'components' (a pipeline)");
    }
    if (auto it = t.find("ties"); it != t.end()) {
      if (!it->is_array()) fail(ErrorKind::InvalidInput, label, ": templates[", i, "].ties must be an array");
      for (size_t k = 0; k < it->size(); ++k) {
        const json& tie = (*it)[k];
        if (!tie.is_object() || !tie.contains("primary") || !tie.contains("alias") ||
            !tie["primary"].is_string() || !tie["alias"].is_string()) {
          fail(ErrorKind::InvalidInput, label, ": templates[", i, "].ties[", k,
               "] needs string keys 'primary' and 'alias'");
        }
        TemplateTie tt;
        tt.primary = tie["primary"].get<std::string>();
        tt.alias = tie["alias"].get<std::string>();
        for (const auto& [key, v] : tie.items()) {
          if (key == "primary" || key == "alias") continue;
          if (key == "when_config" && v.is_string()) {
            tt.when_config = v.get<std::string>();
          } else if (key == "default" && v.is_boolean()) {
            tt.default_value = v.get<bool>();
          } else {
            fail(ErrorKind::InvalidInput, label, ": templates[", i, "].ties[", k, "]: bad key '", key, "'");
          }
        }
        m.ties.push_back(std::move(tt));
      }
    }
    out.push_back(std::move(m));
  }
  return out;
}

void TemplateLibrary::load_dir(const fs::path& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) fail(ErrorKind::Io, dir.string(), ": not a folder of model templates");
  std::vector<fs::path> files;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    if (e.path().extension() == ".json") files.push_back(e.path());
  }
  if (ec) fail(ErrorKind::Io, dir.string(), ": cannot list: ", ec.message());
  std::sort(files.begin(), files.end());
  for (const fs::path& f : files) {
    for (ModelTemplate& t : parse_templates(read_json_file(f), f)) add(std::move(t));
  }
  dirs_.push_back(dir);
}

void TemplateLibrary::add(ModelTemplate t) { templates_.push_back(std::move(t)); }

const ModelTemplate* TemplateLibrary::find(std::string_view class_name) const {
  if (class_name.empty()) return nullptr;
  for (const ModelTemplate& t : templates_) {
    if (std::find(t.class_names.begin(), t.class_names.end(), class_name) != t.class_names.end()) return &t;
  }
  return nullptr;
}

std::vector<fs::path> data_dirs() {
  std::vector<fs::path> out;
  if (const char* env = std::getenv("QTOOL_DATA_DIR"); env && *env) out.emplace_back(env);
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (!ec) out.push_back(exe.parent_path().parent_path() / "share" / "qtool" / "sample_configs");
#ifdef QTOOL_SOURCE_DATA_DIR
  out.emplace_back(QTOOL_SOURCE_DATA_DIR);
#endif
  return out;
}

std::optional<fs::path> find_data_subdir(std::string_view sub) {
  for (const fs::path& d : data_dirs()) {
    std::error_code ec;
    if (fs::is_directory(d / sub, ec)) return d / sub;
  }
  return std::nullopt;
}

std::string class_name_of(const std::optional<json>& config) {
  if (!config || !config->is_object()) return std::string();
  if (auto it = config->find("architectures");
      it != config->end() && it->is_array() && !it->empty() && (*it)[0].is_string()) {
    return (*it)[0].get<std::string>();
  }
  if (auto it = config->find("_class_name"); it != config->end() && it->is_string())
    return it->get<std::string>();
  return std::string();
}

std::vector<TiedPair> tied_pairs_for(const ModelTemplate* tmpl, const std::optional<json>& config) {
  std::vector<TiedPair> out;
  if (!tmpl) return out;
  for (const TemplateTie& t : tmpl->ties) {
    bool on = true;
    if (!t.when_config.empty()) {
      on = t.default_value;
      if (config && config->is_object()) {
        if (auto it = config->find(t.when_config); it != config->end() && it->is_boolean())
          on = it->get<bool>();
      }
    }
    if (on) out.push_back({t.primary, t.alias});
  }
  return out;
}

std::vector<Unit> execution_units(const ModuleTree& tree, const ModelTemplate* tmpl) {
  // Depth-first in the tree's (natural) child order: this fixes blocks' numeric order and the
  // tie-break among units with the same rank.
  std::vector<Unit> units;
  std::vector<int32_t> stack = {0};
  // Collects the tensors of a block subtree in natural module order.
  auto block_tensors = [&](int32_t block, std::vector<uint32_t>& out) {
    std::vector<int32_t> st = {block};
    while (!st.empty()) {
      const int32_t id = st.back();
      st.pop_back();
      const ModuleNode& n = tree.node(id);
      out.insert(out.end(), n.tensors.begin(), n.tensors.end());
      for (auto it = n.children.rbegin(); it != n.children.rend(); ++it) st.push_back(*it);
    }
  };
  while (!stack.empty()) {
    const int32_t id = stack.back();
    stack.pop_back();
    const ModuleNode& n = tree.node(id);
    const bool whole = tmpl && !n.prefix.empty() &&
                       std::find(tmpl->units.begin(), tmpl->units.end(), n.prefix) != tmpl->units.end();
    if (n.is_block || whole) {
      Unit u;
      u.node = id;
      u.is_block = n.is_block;
      block_tensors(id, u.tensors);
      if (!u.tensors.empty()) units.push_back(std::move(u));
      continue;
    }
    if (!n.tensors.empty()) {
      Unit u;
      u.node = id;
      u.tensors = n.tensors;
      units.push_back(std::move(u));
    }
    for (auto it = n.children.rbegin(); it != n.children.rend(); ++it) stack.push_back(*it);
  }
  // Rank: template entry index, or the heuristic category placed before (0) or after all entries.
  const int64_t n_entries = tmpl ? static_cast<int64_t>(tmpl->order.size()) : 0;
  std::vector<std::pair<int64_t, size_t>> keys(units.size());
  for (size_t i = 0; i < units.size(); ++i) {
    const std::string& prefix = tree.node(units[i].node).prefix;
    int64_t rank = -1;
    for (int64_t e = 0; e < n_entries && rank < 0; ++e) {
      const std::string& entry = tmpl->order[static_cast<size_t>(e)];
      if (entry == prefix || is_prefix_path(entry, prefix) || is_prefix_path(prefix, entry)) rank = e;
    }
    if (rank < 0) {
      const int cat = heuristic_category(tree, units[i]);
      rank = cat == 0 ? -1 : (n_entries + cat);
    }
    keys[i] = {rank, i};
  }
  std::vector<size_t> idx(units.size());
  for (size_t i = 0; i < idx.size(); ++i) idx[i] = i;
  std::stable_sort(idx.begin(), idx.end(), [&](size_t a, size_t b) { return keys[a] < keys[b]; });
  std::vector<Unit> out;
  out.reserve(units.size());
  for (size_t i : idx) out.push_back(std::move(units[i]));
  return out;
}

std::vector<size_t> component_order(const std::vector<std::string>& names, const ModelTemplate* pipeline) {
  std::vector<std::pair<std::pair<int64_t, int>, size_t>> keys;
  for (size_t i = 0; i < names.size(); ++i) {
    int64_t rank = std::numeric_limits<int32_t>::max();
    if (pipeline) {
      auto it = std::find(pipeline->components.begin(), pipeline->components.end(), names[i]);
      if (it != pipeline->components.end()) rank = it - pipeline->components.begin();
    }
    int cat = 2;
    if (names[i].find("text_encoder") != std::string::npos)
      cat = 0;
    else if (names[i].find("transformer") != std::string::npos ||
             names[i].find("unet") != std::string::npos || names[i].find("prior") != std::string::npos)
      cat = 1;
    keys.push_back({{rank, cat}, i});
  }
  std::stable_sort(keys.begin(), keys.end(), [&](const auto& a, const auto& b) {
    if (a.first != b.first) return a.first < b.first;
    return natural_less(names[a.second], names[b.second]);
  });
  std::vector<size_t> out;
  for (const auto& k : keys) out.push_back(k.second);
  return out;
}

}  // namespace qtool::planner
