// describe_checkpoint: the summary `qtool inspect` prints, from headers and configs only.
#include <map>

#include "qtool/formats/checkpoint.hpp"

namespace qtool {
namespace {

nlohmann::json string_or_null(const nlohmann::json* j) {
  return (j && j->is_string()) ? *j : nlohmann::json(nullptr);
}

const nlohmann::json* member(const nlohmann::json& j, const char* key) {
  if (!j.is_object()) return nullptr;
  const auto it = j.find(key);
  return it == j.end() ? nullptr : &*it;
}

nlohmann::json config_summary(const std::optional<nlohmann::json>& config) {
  if (!config) return nullptr;
  const nlohmann::json& c = *config;
  const nlohmann::json* arch = member(c, "architectures");
  const nlohmann::json* first_arch = (arch && arch->is_array() && !arch->empty()) ? &(*arch)[0] : nullptr;
  const nlohmann::json* quant = member(c, "quantization_config");
  return {{"architecture", string_or_null(first_arch)},
          {"class_name", string_or_null(member(c, "_class_name"))},
          {"model_type", string_or_null(member(c, "model_type"))},
          {"quant_method", string_or_null(quant ? member(*quant, "quant_method") : nullptr)}};
}

const char* layout_name(Checkpoint::Layout l) {
  switch (l) {
    case Checkpoint::Layout::File: return "file";
    case Checkpoint::Layout::Model: return "model";
    case Checkpoint::Layout::Pipeline: return "pipeline";
  }
  return "file";
}

}  // namespace

nlohmann::json describe_checkpoint(const Checkpoint& ck) {
  const nlohmann::json* pipeline_class =
      ck.model_index() ? member(*ck.model_index(), "_class_name") : nullptr;
  nlohmann::json components = nlohmann::json::array();
  uint64_t total_tensors = 0, total_params = 0, total_bytes = 0, total_files = 0, total_file_bytes = 0;
  for (const Component& c : ck.components()) {
    struct Count {
      uint64_t tensors = 0, params = 0, bytes = 0;
    };
    std::map<std::string, Count> by_dtype;
    nlohmann::json shards = nlohmann::json::array();
    uint64_t tensors = 0, params = 0, bytes = 0;
    for (const SafetensorsFile& s : c.shards()) {
      uint64_t shard_bytes = 0;
      for (const TensorInfo& t : s.tensors()) {
        Count& k = by_dtype[std::string(dtype_name(t.dtype))];
        ++k.tensors;
        k.params += t.numel();
        k.bytes += t.nbytes();
        shard_bytes += t.nbytes();
        params += t.numel();
      }
      tensors += s.tensors().size();
      bytes += shard_bytes;
      total_file_bytes += s.file_size();
      ++total_files;
      shards.push_back({{"file", s.path().filename().string()},
                        {"file_bytes", s.file_size()},
                        {"header_bytes", s.header().data_offset()},
                        {"tensors", s.tensors().size()},
                        {"bytes", shard_bytes}});
    }
    nlohmann::json dtypes = nlohmann::json::object();
    for (const auto& [name, k] : by_dtype)
      dtypes[name] = {{"tensors", k.tensors}, {"parameters", k.params}, {"bytes", k.bytes}};

    nlohmann::json library = nullptr, class_name = nullptr;
    if (ck.model_index() && !c.name().empty()) {
      const nlohmann::json* entry = member(*ck.model_index(), c.name().c_str());
      if (entry && entry->is_array() && entry->size() == 2) {
        library = (*entry)[0];
        class_name = (*entry)[1];
      }
    }
    nlohmann::json metadata = nlohmann::json::object();
    if (!c.shards().empty())
      for (const auto& [k, v] : c.shards()[0].metadata()) metadata[k] = v;

    components.push_back(
        {{"name", c.name()},
         {"library", library},
         {"class", class_name},
         {"dir", c.dir().string()},
         {"weights_base", c.weights_base()},
         {"index", c.index_path().empty() ? nlohmann::json(nullptr)
                                          : nlohmann::json(c.index_path().filename().string())},
         {"tensors", tensors},
         {"parameters", params},
         {"bytes", bytes},
         {"dtypes", std::move(dtypes)},
         {"shards", std::move(shards)},
         {"config", config_summary(c.config())},
         {"metadata", std::move(metadata)}});
    total_tensors += tensors;
    total_params += params;
    total_bytes += bytes;
  }
  return {{"path", ck.root().string()},
          {"layout", layout_name(ck.layout())},
          {"fingerprint", ck.fingerprint()},
          {"pipeline_class", string_or_null(pipeline_class)},
          {"components", std::move(components)},
          {"other_components", ck.other_components()},
          {"totals",
           {{"tensors", total_tensors},
            {"parameters", total_params},
            {"bytes", total_bytes},
            {"files", total_files},
            {"file_bytes", total_file_bytes}}}};
}

}  // namespace qtool
