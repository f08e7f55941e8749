#include "run_support.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "qtool/formats/error.hpp"
#include "qtool/formats/json.hpp"
#include "qtool/runner/cpu_kernels.hpp"
#include "qtool/runner/driver.hpp"
#include "qtool/runner/kernel_math.hpp"

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

LayerRun run_linear_alone(Ops& ops, const DequantParams& w, uint64_t tokens, uint64_t ldx, uint64_t seed,
                          ThreadPool* pool) {
  QTOOL_ASSERT(ldx >= w.cols);
  const size_t mark = ops.mark();
  const Mat x = ops.alloc(static_cast<int64_t>(tokens), static_cast<int64_t>(ldx), DType::BF16);
  const Mat y = ops.alloc(static_cast<int64_t>(tokens), static_cast<int64_t>(w.rows), DType::BF16);
  std::vector<uint16_t> xh(tokens * ldx);
  const uint64_t stream = kmath::activation_stream(seed);
  if (pool)
    cpu::generate_activation(stream, tokens, ldx, 0, ldx, xh.data(), *pool);
  else
    cpu::generate_activation_rows(stream, ldx, 0, ldx, xh.data(), 0, tokens);
  ops.upload(xh.data(), x);
  ops.linear(x.cols_view(0, static_cast<int64_t>(w.cols)), w, nullptr, y);
  LayerRun r;
  r.y.assign(tokens * w.rows, 0);
  ops.download(y, r.y.data());
  ops.release(mark);
  r.digest = host_digest(reinterpret_cast<const uint8_t*>(r.y.data()), r.y.size(), DType::BF16);
  return r;
}

}  // namespace qtool::runner
