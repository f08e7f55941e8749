// Checkpoints as users have them: a single .safetensors file, a model folder (config.json + one
// file or shards with an index), or a diffusers pipeline folder (model_index.json + one folder
// per component). Opening validates every file header and every index before any tensor is read.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "qtool/formats/json.hpp"  // read_json_file, write_json_file
#include "qtool/formats/safetensors.hpp"

namespace qtool {

// One set of weights: a whole single-file checkpoint, a model folder, or a pipeline component.
class Component {
 public:
  struct Entry {
    uint32_t shard;  // index into shards()
    uint32_t index;  // index into shards()[shard].tensors()
  };

  const std::string& name() const { return name_; }  // "" for a single model or file
  const std::filesystem::path& dir() const { return dir_; }
  // "model" (transformers), "diffusion_pytorch_model" (diffusers), or a single file's stem.
  const std::string& weights_base() const { return weights_base_; }
  const std::optional<nlohmann::json>& config() const { return config_; }  // config.json
  const std::filesystem::path& index_path() const { return index_path_; }  // empty: unsharded
  const std::vector<SafetensorsFile>& shards() const { return shards_; }

  // Every tensor, shard by shard in data order.
  const std::vector<Entry>& entries() const { return entries_; }
  const TensorInfo& info(Entry e) const { return shards_[e.shard].tensors()[e.index]; }
  std::span<const uint8_t> data(Entry e) const { return shards_[e.shard].data(info(e)); }
  const SafetensorsFile& shard_of(Entry e) const { return shards_[e.shard]; }
  std::optional<Entry> find(std::string_view tensor_name) const;

  uint64_t total_bytes() const;  // sum of tensor bytes
  uint64_t n_params() const;     // sum of numel

  // Loads a component from a folder (config.json optional) or from one .safetensors file.
  static Component open_folder(const std::filesystem::path& dir, std::string name);
  static Component open_file(const std::filesystem::path& file, std::string name);

 private:
  void build_entries();

  std::string name_;
  std::filesystem::path dir_;
  std::string weights_base_;
  std::optional<nlohmann::json> config_;
  std::filesystem::path index_path_;
  std::vector<SafetensorsFile> shards_;
  std::vector<Entry> entries_;
  std::unordered_map<std::string_view, Entry> by_name_;
};

class Checkpoint {
 public:
  enum class Layout { File, Model, Pipeline };

  static Checkpoint open(const std::filesystem::path& path);

  Layout layout() const { return layout_; }
  const std::filesystem::path& root() const { return root_; }
  const std::optional<nlohmann::json>& model_index() const { return model_index_; }
  // Components holding weights, in model_index.json order (one, named "", for File and Model).
  const std::vector<Component>& components() const { return components_; }
  const Component* find_component(std::string_view name) const;
  // Pipeline entries without weights (scheduler, tokenizer...): copied as they are.
  const std::vector<std::string>& other_components() const { return other_components_; }

  // A structural fingerprint: 128-bit hex digest (32 hex digits; two FNV-1a 64 lanes) over every
  // component's name and its tensors' names, dtypes, shapes and byte sizes (not the values), tensors
  // taken in name order: the same for any sharding of the same tensors, so a plan can be matched
  // to its checkpoint.
  std::string fingerprint() const;

  // Error(Io) naming the file when a shard was truncated while its data was being read
  // (SafetensorsFile::check_intact): call it before trusting what was read.
  void check_intact() const;

 private:
  Layout layout_ = Layout::File;
  std::filesystem::path root_;
  std::optional<nlohmann::json> model_index_;
  std::vector<Component> components_;
  std::vector<std::string> other_components_;
};

// A summary of a checkpoint from its headers alone (no tensor data is read); what `qtool inspect
// --json` prints, block lists aside:
//   {"path", "layout": "file"|"model"|"pipeline", "fingerprint", "pipeline_class" (or null),
//    "components": [{"name", "library", "class" (model_index.json entry, or null), "dir",
//                    "weights_base", "index" (file name, or null), "tensors", "parameters", "bytes",
//                    "dtypes": {"BF16": {"tensors", "parameters", "bytes"}, ...},
//                    "shards": [{"file", "file_bytes", "header_bytes", "tensors", "bytes"}],
//                    "config": {"architecture", "class_name", "model_type", "quant_method"} (each
//                    string or null; the whole null without config.json),
//                    "metadata": the first shard's __metadata__}],
//    "other_components": [names], "totals": {"tensors", "parameters", "bytes", "files", "file_bytes"}}
// Sizes in bytes; "bytes" counts tensor data, "file_bytes" whole files (headers included).
nlohmann::json describe_checkpoint(const Checkpoint& ck);

// The shard file name: "model-00001-of-00004.safetensors", or "model.safetensors" when n_shards == 1.
// `shard` is 0-based: shard 0 of 4 is "model-00001-of-00004.safetensors".
std::string shard_file_name(std::string_view base, size_t shard, size_t n_shards);

// Writes one component's weights: shards of at most `max_shard_size` bytes (0: one file) and,
// when sharded, `<base>.safetensors.index.json`. A group (a weight and all its quant state) is
// never split across shards. Every file is written under a temporary name and renamed on commit.
class ComponentWriter {
 public:
  ComponentWriter(std::filesystem::path dir, std::string base, std::vector<std::vector<TensorDecl>> groups,
                  uint64_t max_shard_size, std::map<std::string, std::string> metadata = {});
  ~ComponentWriter();

  // Thread-safe; see SafetensorsWriter::write.
  void write(std::string_view tensor_name, std::span<const uint8_t> bytes, uint64_t offset = 0);
  void commit();
  size_t n_shards() const { return writers_.size(); }

 private:
  std::filesystem::path dir_;
  std::string base_;
  std::vector<std::unique_ptr<SafetensorsWriter>> writers_;
  std::unordered_map<std::string, size_t> shard_of_;
  uint64_t total_size_ = 0;
};

// An output folder or file that appears under its final name only when complete: work happens in
// a temporary sibling (`<final>.tmp-<pid>`); commit() renames it into place (replacing an
// existing output only when `force`). Destroying it uncommitted removes the temporary.
// Refuses (Error(InvalidInput), naming the path) an existing output without `force`, and an
// output that is the input or lies inside it.
class OutputPath {
 public:
  OutputPath(std::filesystem::path final_path, bool force, const std::filesystem::path& input = {});
  ~OutputPath();
  OutputPath(const OutputPath&) = delete;
  OutputPath& operator=(const OutputPath&) = delete;

  const std::filesystem::path& tmp() const { return tmp_; }
  const std::filesystem::path& final_path() const { return final_; }
  void commit();

 private:
  std::filesystem::path final_;
  std::filesystem::path tmp_;
  bool force_;
  bool committed_ = false;
};

}  // namespace qtool
