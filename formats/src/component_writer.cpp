// Writes one component's weights as one file or as shards with an index.
#include <set>
#include <unordered_set>

#include "qtool/formats/checkpoint.hpp"
#include "qtool/formats/error.hpp"

namespace qtool {

ComponentWriter::ComponentWriter(std::filesystem::path dir, std::string base,
                                 std::vector<std::vector<TensorDecl>> groups, uint64_t max_shard_size,
                                 std::map<std::string, std::string> metadata)
    : dir_(std::move(dir)), base_(std::move(base)) {
  // Greedy in declaration order, like transformers' sharding: a group that would overflow the
  // current shard starts a new one; a group larger than the limit gets a shard of its own.
  std::vector<std::vector<TensorDecl>> shards(1);
  uint64_t shard_bytes = 0;
  std::unordered_set<std::string> names;
  for (auto& group : groups) {
    uint64_t group_bytes = 0;
    for (const TensorDecl& d : group) {
      if (!names.insert(d.name).second)
        fail(ErrorKind::InvalidInput, (dir_ / base_).string(), ": tensor '", d.name, "' declared twice");
      group_bytes += d.nbytes();
    }
    if (max_shard_size > 0 && !shards.back().empty() && shard_bytes + group_bytes > max_shard_size) {
      shards.emplace_back();
      shard_bytes = 0;
    }
    shard_bytes += group_bytes;
    total_size_ += group_bytes;
    for (TensorDecl& d : group) shards.back().push_back(std::move(d));
  }
  const size_t n = shards.size();
  writers_.reserve(n);
  for (size_t s = 0; s < n; ++s) {
    for (const TensorDecl& d : shards[s]) shard_of_.emplace(d.name, s);
    writers_.push_back(std::make_unique<SafetensorsWriter>(dir_ / shard_file_name(base_, s, n),
                                                           std::move(shards[s]), metadata));
  }
}

ComponentWriter::~ComponentWriter() = default;

void ComponentWriter::write(std::string_view tensor_name, std::span<const uint8_t> bytes, uint64_t offset) {
  const auto it = shard_of_.find(std::string(tensor_name));
  if (it == shard_of_.end())
    fail(ErrorKind::Internal, (dir_ / base_).string(), ": tensor '", tensor_name, "' was not declared");
  writers_[it->second]->write(tensor_name, bytes, offset);
}

void ComponentWriter::commit() {
  total_size_ = 0;  // variable-length tensors take their written lengths now
  for (auto& w : writers_) {
    w->commit();
    total_size_ += w->data_bytes();
  }
  if (writers_.size() > 1) {
    nlohmann::json weight_map = nlohmann::json::object();
    for (const auto& [name, shard] : shard_of_)
      weight_map[name] = writers_[shard]->path().filename().string();
    const nlohmann::json index = {{"metadata", {{"total_size", total_size_}}}, {"weight_map", weight_map}};
    write_json_file(dir_ / (base_ + ".safetensors.index.json"), index);
  }
}

}  // namespace qtool
