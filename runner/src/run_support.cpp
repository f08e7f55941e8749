#include "run_support.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "qtool/formats/error.hpp"
#include "qtool/formats/json.hpp"

namespace qtool::runner {

ShardFiles::ShardFiles(const Checkpoint& checkpoint) {
  for (const Component& c : checkpoint.components()) {
    std::vector<int> fds;
    for (const SafetensorsFile& f : c.shards()) {
      int fd = -1;
      try {
        fd = open_regular_file(f.path());  // never blocks on a FIFO put in the shard's place
      } catch (...) {
        for (int o : fds) ::close(o);
        for (auto& v : fds_)
          for (int o : v) ::close(o);
        throw;
      }
      fds.push_back(fd);
    }
    fds_.push_back(std::move(fds));
  }
}

ShardFiles::~ShardFiles() {
  for (auto& v : fds_)
    for (int fd : v) ::close(fd);
}

void ShardFiles::read_group(const Checkpoint& checkpoint, const Arena& group, uint8_t* dst) const {
  uint64_t pos = 0;
  for (const ArenaTensor& t : group.tensors) {
    if (t.offset > pos) std::memset(dst + pos, 0, t.offset - pos);
    const Component& comp = checkpoint.components()[t.component];
    const SafetensorsFile& file = comp.shard_of(t.entry);
    const uint64_t file_offset = file.file_offset(comp.info(t.entry));
    const int fd = fds_[t.component][t.entry.shard];
    uint64_t done = 0;
    while (done < t.nbytes) {
      const ssize_t n =
          ::pread(fd, dst + t.offset + done, t.nbytes - done, static_cast<off_t>(file_offset + done));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0)
        fail(ErrorKind::Io, "could not read ", t.nbytes, " bytes of tensor '", comp.info(t.entry).name,
             "' from ", file.path().string(), " at offset ", file_offset + done,
             n < 0 ? std::string(": ") + std::strerror(errno) : std::string(": unexpected end of file"));
      done += static_cast<uint64_t>(n);
    }
    pos = t.offset + t.nbytes;
  }
  if (group.bytes > pos) std::memset(dst + pos, 0, group.bytes - pos);
}

}  // namespace qtool::runner
