// What quantize and dequantize share: the run's set-up (the output's temporary, created first so
// that a bad output name fails before any work; the opened checkpoint; the threads; the report's
// header; the progress count), each component's output and its tail, and the run's tail.
#pragma once

#include <atomic>
#include <chrono>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "convert_io.hpp"
#include "other_files.hpp"
#include "qtool/formats/checkpoint.hpp"
#include "qtool/formats/thread_pool.hpp"
#include "qtool/libquant/convert.hpp"

namespace qtool::quant::detail {

struct ConvertProgress {
  const ConvertOptions& options;
  uint64_t total_bytes = 0;
  std::atomic<uint64_t> done_bytes{0};
  void advance(uint64_t n, std::string_view label) {
    const uint64_t done = done_bytes.fetch_add(n) + n;
    if (options.progress) options.progress(done, total_bytes, label);
  }
};

// Where one component's tensors go: its output folder (empty for a single-file checkpoint) and
// the sink that writes them.
struct ComponentOutput {
  std::filesystem::path dir;
  Sink sink;
};

struct ConvertRun {
  const ConvertOptions& options;
  std::chrono::steady_clock::time_point start;
  OutputPath out;
  Checkpoint checkpoint;
  ThreadPool pool;
  ConvertReport report;
  ConvertProgress progress;
  std::string fingerprint;                          // of the input checkpoint
  std::set<std::filesystem::path> written_configs;  // input config.json files the run rewrote

  ConvertRun(const char* command, const std::filesystem::path& input, const std::filesystem::path& output,
             const ConvertOptions& options);

  bool is_file() const { return checkpoint.layout() == Checkpoint::Layout::File; }
  void add_warning(std::string warning);

  // Declares `groups` (a quantized weight and its state form one group) for `component`: its
  // folder created, the input's metadata (first shard; without "format" and earlier qtool keys)
  // plus `provenance`, shards as ConvertOptions says.
  ComponentOutput open_component(const Component& component, std::vector<std::vector<TensorDecl>> groups,
                                 const std::map<std::string, std::string>& provenance);
  // Writes `config` as the component's config.json in `out_dir`, in place of the input's.
  void write_config(const Component& component, const std::filesystem::path& out_dir,
                    const nlohmann::json& config);
  // After a component's tensors: the input checked intact, the sink committed, the totals added.
  void finish_component(Sink& sink, ComponentReport&& cr);
  // Copies `other_files`, commits the output and returns the report.
  ConvertReport finish(const std::vector<OtherFile>& other_files);
};

// "<shard>: tensor '<name>'", for messages.
std::string tensor_label(const Component& component, const Component::Entry& e);
// "the model" or "component '<name>'", for messages.
std::string component_label(const Component& component);
// The report of an input tensor, before it is converted or copied.
TensorReport tensor_report(const Component& component, const TensorInfo& t);

}  // namespace qtool::quant::detail
