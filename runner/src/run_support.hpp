// Pieces both backends use: reading a disk group from the checkpoint's files.
#pragma once

#include <cstdint>
#include <vector>

#include "qtool/formats/checkpoint.hpp"
#include "qtool/runner/schedule.hpp"

namespace qtool::runner {

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

}  // namespace qtool::runner
