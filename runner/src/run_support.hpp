// Pieces the runner's sources share: enum names from a table, a disk group read from the
// checkpoint's files, a linear run alone.
#pragma once

#include <array>
#include <cstdint>
#include <vector>

#include "qtool/formats/checkpoint.hpp"
#include "qtool/formats/thread_pool.hpp"
#include "qtool/runner/executor.hpp"
#include "qtool/runner/ops.hpp"
#include "qtool/runner/schedule.hpp"

namespace qtool::runner {

// The name of enum value `e` from a table of its type's names in declaration order ("?" for a value
// past the table). Each table is checked against the type's last value where it is written.
template <typename E, size_t N>
constexpr const char* enum_name(E e, const std::array<const char*, N>& names) {
  const auto i = static_cast<size_t>(e);
  return i < N ? names[i] : "?";
}

// Every shard file of a checkpoint, opened for pread. Reading a group lays its tensors out as
// fill_arena does (same offsets, zeroed gaps), from the files rather than the mapping, so a disk
// group's bytes never go through the page-cache-backed map of the process.
class ShardFiles {
 public:
  explicit ShardFiles(const Checkpoint& checkpoint);
  ~ShardFiles();
  ShardFiles(const ShardFiles&) = delete;
  ShardFiles& operator=(const ShardFiles&) = delete;

  // Reads arena `arena` into `dst` (arena.bytes bytes). Thread-safe. Error(Io) naming the file and
  // offset on a short read.
  void read_group(const Checkpoint& checkpoint, const Arena& arena, uint8_t* dst) const;

 private:
  std::vector<std::vector<int>> fds_;  // [component][shard]
};

// Backend::run_layer on `ops`: the hidden state H(seed) [tokens, ldx] generated on the host (by
// `pool`'s threads, or this one when null) and uploaded, y = H[:, 0:cols] * W^T as the schedule's
// linears-only units compute it, downloaded and digested. `weight` lives in the ops' memory; ldx
// is at least weight.cols. The ops' activation memory must hold tokens x (ldx + rows) bf16.
LayerRun run_linear_alone(Ops& ops, const DequantParams& weight, uint64_t tokens, uint64_t ldx, uint64_t seed,
                          ThreadPool* pool);

}  // namespace qtool::runner
