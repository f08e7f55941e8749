// Writing a synthetic model: folders and config files, then every component's tensors generated
// in chunks of at most kChunkElems elements by a thread pool and written in place (pwrite).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <fstream>
#include <memory>
#include <span>
#include <sstream>
#include <vector>

#include "qtool/formats/checkpoint.hpp"
#include "qtool/formats/error.hpp"
#include "qtool/formats/synth.hpp"
#include "qtool/formats/thread_pool.hpp"

namespace fs = std::filesystem;

namespace qtool {
namespace {

// 1 Mi elements: 4 MiB of float32 plus at most 4 MiB converted, per thread.
constexpr uint64_t kChunkElems = uint64_t{1} << 20;

uint64_t numel_of(const TensorDecl& d) {
  uint64_t n = 1;
  for (int64_t x : d.shape) n *= static_cast<uint64_t>(x);
  return n;
}

void write_text_file(const fs::path& path, const std::string& text) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  if (!f) fail(ErrorKind::Io, path.string(), ": cannot create file");
  f.write(text.data(), static_cast<std::streamsize>(text.size()));
  f.close();
  if (!f) fail(ErrorKind::Io, path.string(), ": write failed");
}

std::string format_scale(double s) {
  std::ostringstream os;
  os << s;
  return os.str();
}

struct Chunk {
  uint32_t tensor;
  uint64_t begin;  // elements
  uint64_t end;
};

}  // namespace

SynthResult synth_summary(const SynthModel& model, const SynthWriteOptions& options) {
  SynthResult r;
  for (const auto& c : model.components) {
    SynthComponentResult cr;
    cr.name = c.name;
    cr.class_name = c.class_name;
    cr.n_params = c.n_params();
    cr.published_params = c.published_params;
    cr.n_bytes = c.n_bytes();
    if (!c.weights_base.empty()) {
      cr.max_shard_size = options.max_shard_size.value_or(c.default_max_shard_size);
      // The same greedy packing as ComponentWriter: a tensor that would overflow the current
      // shard starts a new one.
      size_t shards = 1;
      uint64_t bytes = 0;
      bool empty = true;
      for (const auto& t : c.tensors) {
        const uint64_t b = t.decl.nbytes();
        if (cr.max_shard_size > 0 && !empty && bytes + b > cr.max_shard_size) {
          ++shards;
          bytes = 0;
        }
        bytes += b;
        empty = false;
      }
      cr.n_shards = shards;
    }
    r.n_params += cr.n_params;
    r.n_bytes += cr.n_bytes;
    r.components.push_back(std::move(cr));
  }
  return r;
}

SynthResult write_synth_model(const SynthModel& model, const fs::path& out,
                              const SynthWriteOptions& options) {
  const auto t0 = std::chrono::steady_clock::now();
  SynthResult result = synth_summary(model, options);
  OutputPath output(out, options.force);
  result.output = output.final_path();
  const fs::path root = output.tmp();
  std::error_code ec;
  fs::create_directories(root, ec);
  if (ec) fail(ErrorKind::Io, root.string(), ": cannot create folder: ", ec.message());

  ThreadPool pool(options.threads);
  const uint64_t total_bytes = model.n_bytes();
  std::atomic<uint64_t> done_bytes{0};
  if (options.progress) options.progress(0, total_bytes, "");

  if (model.is_pipeline) write_json_file(root / "model_index.json", model.model_index);
  const std::map<std::string, std::string> metadata = {
      {"qtool.synth.preset", model.preset},
      {"qtool.synth.scale", format_scale(model.scale)},
      {"qtool.synth.seed", std::to_string(options.seed)},
  };

  for (size_t ci = 0; ci < model.components.size(); ++ci) {
    const SynthComponent& c = model.components[ci];
    const fs::path dir = model.is_pipeline ? root / c.name : root;
    fs::create_directories(dir, ec);
    if (ec) fail(ErrorKind::Io, dir.string(), ": cannot create folder: ", ec.message());
    for (const auto& [name, value] : c.json_files) write_json_file(dir / name, value);
    for (const auto& [name, text] : c.text_files) write_text_file(dir / name, text);
    if (c.tensors.empty()) continue;

    // One group per tensor: a synthetic checkpoint has no quant state to keep together.
    std::vector<std::vector<TensorDecl>> groups;
    groups.reserve(c.tensors.size());
    for (const auto& t : c.tensors) groups.push_back({t.decl});
    ComponentWriter writer(dir, c.weights_base, std::move(groups), result.components[ci].max_shard_size,
                           metadata);
    result.components[ci].n_shards = writer.n_shards();

    std::vector<Chunk> chunks;
    for (uint32_t ti = 0; ti < c.tensors.size(); ++ti) {
      const uint64_t n = numel_of(c.tensors[ti].decl);
      for (uint64_t b = 0; b < n; b += kChunkElems) chunks.push_back({ti, b, std::min(n, b + kChunkElems)});
    }
    // Workers take chunks in order from a shared counter, so writes move through the files
    // roughly sequentially; which thread makes a chunk does not change its bytes.
    std::atomic<size_t> next{0};
    pool.parallel_for(pool.size(), 1, [&](size_t, size_t) {
      std::vector<float> values;
      std::vector<uint8_t> bytes;
      try {
        for (size_t k = next++; k < chunks.size(); k = next++) {
          const Chunk& ch = chunks[k];
          const SynthTensor& t = c.tensors[ch.tensor];
          const uint64_t n = ch.end - ch.begin;
          const size_t esize = dtype_size(t.decl.dtype);
          values.resize(n);
          synth_fill(t, options.seed, ch.begin, ch.end, values.data());
          std::span<const uint8_t> data;
          if (t.decl.dtype == DType::F32) {
            data = {reinterpret_cast<const uint8_t*>(values.data()), n * 4};
          } else {
            bytes.resize(n * esize);
            convert_from_f32(t.decl.dtype, values.data(), bytes.data(), n);
            data = {bytes.data(), bytes.size()};
          }
          writer.write(t.decl.name, data, ch.begin * esize);
          const uint64_t done = done_bytes += data.size();
          if (options.progress) options.progress(done, total_bytes, t.decl.name);
        }
      } catch (...) {
        next = chunks.size();  // the other workers stop at their next chunk
        throw;
      }
    });
    writer.commit();
  }
  output.commit();
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return result;
}

}  // namespace qtool
