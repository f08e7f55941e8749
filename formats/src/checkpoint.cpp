// Components and checkpoints: single files, model folders (config.json + one file or shards with
// an index) and diffusers pipeline folders (model_index.json + one folder per component).
#include "qtool/formats/checkpoint.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <set>
#include <sstream>

#include "qtool/formats/error.hpp"

namespace fs = std::filesystem;

namespace qtool {
namespace {

constexpr const char* kWeightBases[] = {"model", "diffusion_pytorch_model"};
constexpr std::string_view kIndexSuffix = ".safetensors.index.json";
constexpr std::string_view kSafetensorsSuffix = ".safetensors";

bool ends_with(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

// Files in `dir` (names only), sorted.
std::vector<std::string> list_files(const fs::path& dir) {
  std::vector<std::string> names;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    std::error_code ec2;
    if (e.is_regular_file(ec2)) names.push_back(e.path().filename().string());
  }
  if (ec) fail(ErrorKind::Io, dir.string(), ": cannot list folder: ", ec.message());
  std::sort(names.begin(), names.end());
  return names;
}

bool has_safetensors(const std::vector<std::string>& files) {
  return std::any_of(files.begin(), files.end(), [](const std::string& f) {
    return ends_with(f, kSafetensorsSuffix) || ends_with(f, kIndexSuffix);
  });
}

// PyTorch pickle weights, which qtool does not read.
std::optional<std::string> find_pickle_weights(const std::vector<std::string>& files) {
  for (const auto& f : files)
    if (ends_with(f, ".bin") || ends_with(f, ".pt") || ends_with(f, ".pth") || ends_with(f, ".ckpt"))
      return f;
  return std::nullopt;
}

struct Fnv128 {
  uint64_t a = 0xcbf29ce484222325ull;  // FNV-1a 64 offset basis
  uint64_t b = 0x84222325cbf29ce4ull;  // the same basis, halves swapped: a second, independent lane
  static constexpr uint64_t kPrime = 0x100000001b3ull;
  void bytes(const void* p, size_t n) {
    const auto* c = static_cast<const uint8_t*>(p);
    for (size_t i = 0; i < n; ++i) {
      a = (a ^ c[i]) * kPrime;
      b = (b ^ static_cast<uint8_t>(c[i] + 0x9D)) * kPrime;
    }
  }
  void str(std::string_view s) {
    bytes(s.data(), s.size());
    bytes("", 1);  // a terminator, so that "ab"+"c" differs from "a"+"bc"
  }
  void u64(uint64_t v) {
    uint8_t le[8];
    for (int i = 0; i < 8; ++i) le[i] = static_cast<uint8_t>(v >> (8 * i));
    bytes(le, 8);
  }
  std::string hex() const {
    char buf[33];
    std::snprintf(buf, sizeof buf, "%016llx%016llx", static_cast<unsigned long long>(a),
                  static_cast<unsigned long long>(b));
    return buf;
  }
};

}  // namespace

// ---------------------------------------------------------------------------------------------
// Component

std::optional<Component::Entry> Component::find(std::string_view tensor_name) const {
  const auto it = by_name_.find(tensor_name);
  if (it == by_name_.end()) return std::nullopt;
  return it->second;
}

uint64_t Component::total_bytes() const {
  uint64_t n = 0;
  for (const auto& s : shards_)
    for (const auto& t : s.tensors()) n += t.nbytes();
  return n;
}

uint64_t Component::n_params() const {
  uint64_t n = 0;
  for (const auto& s : shards_)
    for (const auto& t : s.tensors()) n += t.numel();
  return n;
}

void Component::build_entries() {
  entries_.clear();
  by_name_.clear();
  size_t n = 0;
  for (const auto& s : shards_) n += s.tensors().size();
  entries_.reserve(n);
  by_name_.reserve(n);
  for (uint32_t si = 0; si < shards_.size(); ++si) {
    const auto& ts = shards_[si].tensors();
    for (uint32_t ti = 0; ti < ts.size(); ++ti) {
      const Entry e{si, ti};
      const auto [it, inserted] = by_name_.emplace(ts[ti].name, e);
      if (!inserted)
        fail(ErrorKind::InvalidInput, shards_[si].path().string(), ": tensor '", ts[ti].name, "' is also in ",
             shards_[it->second.shard].path().string(), " (file offset ", shards_[si].file_offset(ts[ti]),
             ")");
      entries_.push_back(e);
    }
  }
}

Component Component::open_file(const fs::path& file, std::string name) {
  Component c;
  c.name_ = std::move(name);
  c.dir_ = file.parent_path();
  std::string stem = file.filename().string();
  if (ends_with(stem, kSafetensorsSuffix)) stem.resize(stem.size() - kSafetensorsSuffix.size());
  c.weights_base_ = stem;
  c.shards_.push_back(SafetensorsFile::open(file));
  c.build_entries();
  return c;
}

Component Component::open_folder(const fs::path& dir, std::string name) {
  Component c;
  c.name_ = std::move(name);
  c.dir_ = dir;
  std::error_code ec;  // the non-throwing forms: a name too long or a loop is bad input, not a crash
  if (!fs::is_directory(dir, ec)) fail(ErrorKind::Io, dir.string(), ": not a folder");
  const fs::path config = dir / "config.json";
  if (fs::exists(config, ec)) c.config_ = read_json_file(config);

  const std::vector<std::string> files = list_files(dir);
  auto has = [&](const std::string& f) { return std::binary_search(files.begin(), files.end(), f); };

  // As transformers and diffusers look for them: the single file first, then the index.
  std::string single, index;
  for (const char* base : kWeightBases) {
    if (single.empty() && index.empty() && has(std::string(base) + ".safetensors")) {
      single = std::string(base) + ".safetensors";
      c.weights_base_ = base;
    }
  }
  for (const char* base : kWeightBases) {
    if (single.empty() && index.empty() && has(std::string(base) + std::string(kIndexSuffix))) {
      index = std::string(base) + std::string(kIndexSuffix);
      c.weights_base_ = base;
    }
  }
  if (single.empty() && index.empty()) {
    // Other names: one index, or one file.
    std::vector<std::string> indexes, singles;
    for (const auto& f : files) {
      if (ends_with(f, kIndexSuffix))
        indexes.push_back(f);
      else if (ends_with(f, kSafetensorsSuffix))
        singles.push_back(f);
    }
    if (indexes.size() == 1) {
      index = indexes[0];
      c.weights_base_ = index.substr(0, index.size() - kIndexSuffix.size());
    } else if (indexes.size() > 1) {
      fail(ErrorKind::InvalidInput, dir.string(), ": several weight indexes (", indexes[0], ", ", indexes[1],
           "); expected one");
    } else if (singles.size() == 1) {
      single = singles[0];
      c.weights_base_ = single.substr(0, single.size() - kSafetensorsSuffix.size());
    } else if (singles.size() > 1) {
      fail(ErrorKind::InvalidInput, dir.string(), ": ", singles.size(), " .safetensors files (", singles[0],
           ", ", singles[1],
           ", ...) and no index (model.safetensors.index.json) saying how they belong together");
    } else if (const auto pickle = find_pickle_weights(files)) {
      fail(ErrorKind::Unsupported, (dir / *pickle).string(),
           ": PyTorch pickle weights are not supported; qtool reads .safetensors");
    } else {
      fail(ErrorKind::InvalidInput, dir.string(), ": no .safetensors weights in this folder");
    }
  }

  if (!single.empty()) {
    c.shards_.push_back(SafetensorsFile::open(dir / single));
    c.build_entries();
    return c;
  }

  // A sharded component: the index and the shards must agree exactly.
  c.index_path_ = dir / index;
  const std::string index_label = c.index_path_.string();
  const nlohmann::json j = read_json_file(c.index_path_);
  if (!j.is_object()) fail(ErrorKind::InvalidInput, index_label, ": not a JSON object");
  const auto wm = j.find("weight_map");
  if (wm == j.end() || !wm->is_object())
    fail(ErrorKind::InvalidInput, index_label, ": missing 'weight_map' object");
  std::unordered_map<std::string, std::string> weight_map;
  std::map<std::string, std::string> shard_files;  // file -> first tensor mapped to it
  for (const auto& [tensor, file] : wm->items()) {
    if (!file.is_string())
      fail(ErrorKind::InvalidInput, index_label, ": tensor '", tensor,
           "': weight_map value is not a file name");
    const std::string f = file.get<std::string>();
    if (has_control_char(tensor) || has_control_char(f))
      fail(ErrorKind::InvalidInput, index_label, ": weight_map entry '", escape_controls(tensor), "': '",
           escape_controls(f), "' holds a control character (shown as \\xNN)");
    if (f.empty() || f == "." || f == ".." || f.find('/') != std::string::npos ||
        f.find('\\') != std::string::npos)
      fail(ErrorKind::InvalidInput, index_label, ": tensor '", tensor, "': shard '", f,
           "' is not a file name in the folder");
    weight_map.emplace(tensor, f);
    shard_files.emplace(f, tensor);
  }
  if (weight_map.empty()) fail(ErrorKind::InvalidInput, index_label, ": weight_map is empty");
  for (const auto& [file, tensor] : shard_files) {
    if (!has(file))
      fail(ErrorKind::InvalidInput, index_label, ": tensor '", tensor, "': shard '", file,
           "' does not exist in ", dir.string());
  }
  std::vector<std::string> shard_names;
  for (const auto& [file, tensor] : shard_files) {
    shard_names.push_back(file);
    c.shards_.push_back(SafetensorsFile::open(dir / file));
  }
  uint64_t data_bytes = 0, file_bytes = 0;
  for (size_t s = 0; s < c.shards_.size(); ++s) {
    const SafetensorsFile& shard = c.shards_[s];
    file_bytes += shard.file_size();
    for (const TensorInfo& t : shard.tensors()) {
      data_bytes += t.nbytes();
      const auto it = weight_map.find(t.name);
      if (it == weight_map.end())
        fail(ErrorKind::InvalidInput, shard.path().string(), ": tensor '", t.name, "' is not in the index ",
             index, " (file offset ", shard.file_offset(t), ")");
      if (it->second != shard_names[s])
        fail(ErrorKind::InvalidInput, shard.path().string(), ": tensor '", t.name, "' is here (file offset ",
             shard.file_offset(t), ") but ", index, " maps it to '", it->second, "'");
    }
  }
  for (const auto& [tensor, file] : weight_map) {
    const size_t s =
        static_cast<size_t>(std::find(shard_names.begin(), shard_names.end(), file) - shard_names.begin());
    if (!c.shards_[s].find(tensor))
      fail(ErrorKind::InvalidInput, index_label, ": tensor '", tensor, "' is mapped to '", file,
           "', which does not contain it");
  }
  if (const auto meta = j.find("metadata"); meta != j.end() && meta->is_object()) {
    if (const auto ts = meta->find("total_size"); ts != meta->end() && !ts->is_null()) {
      if (!ts->is_number() || ts->get<double>() < 0 || !std::isfinite(ts->get<double>()))
        fail(ErrorKind::InvalidInput, index_label, ": metadata.total_size is not a non-negative number");
      const double total = ts->get<double>();
      // Writers count tensor bytes (sometimes whole storages): it cannot be far from the data.
      if (total > 2.0 * static_cast<double>(file_bytes) || total < 0.5 * static_cast<double>(data_bytes))
        fail(ErrorKind::InvalidInput, index_label, ": metadata.total_size ", ts->dump(),
             " is implausible: the shards hold ", data_bytes, " bytes of tensors");
    }
  } else if (meta != j.end() && !meta->is_null()) {
    fail(ErrorKind::InvalidInput, index_label, ": 'metadata' is not an object");
  }
  c.build_entries();
  return c;
}

// ---------------------------------------------------------------------------------------------
// Checkpoint

Checkpoint Checkpoint::open(const fs::path& path) {
  Checkpoint ck;
  ck.root_ = path;
  std::error_code ec;
  const fs::file_status st = fs::status(path, ec);
  if (ec || !fs::exists(st)) fail(ErrorKind::Io, path.string(), ": no such file or folder");
  if (fs::is_regular_file(st)) {
    ck.layout_ = Layout::File;
    ck.components_.push_back(Component::open_file(path, ""));
    return ck;
  }
  if (!fs::is_directory(st)) fail(ErrorKind::Io, path.string(), ": not a file or folder");

  const fs::path model_index = path / "model_index.json";
  if (!fs::exists(model_index, ec)) {
    ck.layout_ = Layout::Model;
    ck.components_.push_back(Component::open_folder(path, ""));
    return ck;
  }

  ck.layout_ = Layout::Pipeline;
  const std::string text = read_text_file(model_index);
  // Parsed with key order kept: components are listed in the file's order.
  const auto ordered = parse_ordered_json(text, model_index.string());
  ck.model_index_ = parse_json(text, model_index.string());
  const std::string label = model_index.string();
  if (!ordered.is_object()) fail(ErrorKind::InvalidInput, label, ": not a JSON object");
  for (const auto& [key, value] : ordered.items()) {
    if (key.empty() || key[0] == '_') continue;  // _class_name, _diffusers_version, ...
    if (has_control_char(key))
      fail(ErrorKind::InvalidInput, label, ": component name '", escape_controls(key),
           "' holds a control character (shown as \\xNN); it cannot name a folder");
    if (!value.is_array()) {
      // Pipeline options (requires_safety_checker: true, ...) are not components; a component
      // folder whose entry is not [library, class] is a broken file.
      if (fs::is_directory(path / key, ec))
        fail(ErrorKind::InvalidInput, label, ": component '", key, "': expected [library, class], got ",
             value.dump());
      continue;
    }
    if (value.size() != 2)
      fail(ErrorKind::InvalidInput, label, ": component '", key, "': expected [library, class], got ",
           value.dump());
    if (value[0].is_null() && value[1].is_null()) continue;  // an absent optional component
    if (!value[0].is_string() || !value[1].is_string())
      fail(ErrorKind::InvalidInput, label, ": component '", key, "': expected [library, class] strings, got ",
           value.dump());
    if (key.find('/') != std::string::npos || key == "." || key == "..")
      fail(ErrorKind::InvalidInput, label, ": component name '", key, "' is not a folder name");
    const fs::path dir = path / key;
    if (!fs::is_directory(dir, ec))
      fail(ErrorKind::InvalidInput, label, ": component '", key, "' (", value[0].get<std::string>(), ".",
           value[1].get<std::string>(), ") has no folder ", dir.string());
    const std::vector<std::string> files = list_files(dir);
    if (has_safetensors(files)) {
      ck.components_.push_back(Component::open_folder(dir, key));
    } else if (const auto pickle = find_pickle_weights(files)) {
      fail(ErrorKind::Unsupported, (dir / *pickle).string(), ": component '", key,
           "' has PyTorch pickle weights; qtool reads .safetensors");
    } else {
      ck.other_components_.push_back(key);
    }
  }
  if (ck.components_.empty())
    fail(ErrorKind::InvalidInput, label, ": no component of the pipeline has .safetensors weights");
  return ck;
}

const Component* Checkpoint::find_component(std::string_view name) const {
  for (const auto& c : components_)
    if (c.name() == name) return &c;
  return nullptr;
}

void Checkpoint::check_intact() const {
  for (const Component& c : components_)
    for (const SafetensorsFile& s : c.shards()) s.check_intact();
}

std::string Checkpoint::fingerprint() const {
  // Per component (in order): its name, then its tensors sorted by name, each as name, dtype,
  // rank, dims and byte size. Independent of sharding and of the order of tensors in files.
  Fnv128 h;
  for (const Component& c : components_) {
    h.str(c.name());
    h.u64(c.entries().size());
    std::vector<const TensorInfo*> ts;
    ts.reserve(c.entries().size());
    for (const auto& e : c.entries()) ts.push_back(&c.info(e));
    std::sort(ts.begin(), ts.end(),
              [](const TensorInfo* a, const TensorInfo* b) { return a->name < b->name; });
    for (const TensorInfo* t : ts) {
      h.str(t->name);
      h.str(dtype_name(t->dtype));
      h.u64(t->shape.size());
      for (int64_t d : t->shape) h.u64(static_cast<uint64_t>(d));
      h.u64(t->nbytes());
    }
  }
  return h.hex();
}

// ---------------------------------------------------------------------------------------------
// Shard names

std::string shard_file_name(std::string_view base, size_t shard, size_t n_shards) {
  QTOOL_ASSERT(n_shards >= 1 && shard < n_shards);
  if (n_shards == 1) return std::string(base) + ".safetensors";
  char buf[64];
  std::snprintf(buf, sizeof buf, "-%05zu-of-%05zu.safetensors", shard + 1, n_shards);
  return std::string(base) + buf;
}

}  // namespace qtool
