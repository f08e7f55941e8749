// Whole-checkpoint conversion: quantize_checkpoint and dequantize_checkpoint (convert.hpp).
#include "qtool/libquant/convert.hpp"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <exception>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <thread>
#include <unordered_map>

#include "convert_stats.hpp"
#include "other_files.hpp"
#include "qtool/formats/checkpoint.hpp"
#include "qtool/formats/error.hpp"
#include "qtool/formats/safetensors.hpp"
#include "qtool/formats/size.hpp"
#include "qtool/formats/thread_pool.hpp"

namespace fs = std::filesystem;

namespace qtool::quant {
namespace {

using nlohmann::json;

constexpr uint64_t kCopyChunk = 32ull << 20;       // copied tensors go out in pieces of this size
constexpr uint64_t kPrefetchLimit = 256ull << 20;  // read-ahead hint for the next tensor
constexpr size_t kStatsChunk = 16384;              // elements per error-statistics chunk

uintptr_t page_size() {
  static const uintptr_t size = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  return size;
}

// Drops the pages of a read range of the (read-only, shared) input mapping from this process:
// the page cache keeps them, only our resident set shrinks. A page shared with a neighbouring
// tensor is simply faulted in again if it is read later.
void release_pages(std::span<const uint8_t> bytes) {
  if (bytes.empty()) return;
  const uintptr_t ps = page_size();
  const uintptr_t begin = reinterpret_cast<uintptr_t>(bytes.data()) & ~(ps - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(bytes.data()) + bytes.size() + ps - 1) & ~(ps - 1);
  ::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_DONTNEED);
}

// After a whole tensor: its pages and those within kReleaseMargin around it, clamped to its file's
// mapping. A page fault maps neighbouring pages too (fault-around), so reading one tensor maps a
// little of the tensors beside it, which may already have been released.
constexpr uint64_t kReleaseMargin = uint64_t{1} << 20;
void release_tensor_pages(const Component& component, const Component::Entry& e) {
  const auto bytes = component.data(e);
  const SafetensorsFile& file = component.shard_of(e);
  const uint8_t* base = bytes.data() - file.file_offset(component.info(e));
  const uint8_t* begin =
      bytes.data() - std::min<uint64_t>(kReleaseMargin, static_cast<uint64_t>(bytes.data() - base));
  const uint8_t* end = bytes.data() + bytes.size();
  end += std::min<uint64_t>(kReleaseMargin, static_cast<uint64_t>(base + file.file_size() - end));
  release_pages(std::span<const uint8_t>(begin, static_cast<size_t>(end - begin)));
}

// Asks the kernel to start reading a range we will need soon (cold page cache).
void prefetch_pages(std::span<const uint8_t> bytes) {
  if (bytes.empty()) return;
  bytes = bytes.subspan(0, std::min<uint64_t>(bytes.size(), kPrefetchLimit));
  const uintptr_t ps = page_size();
  const uintptr_t begin = reinterpret_cast<uintptr_t>(bytes.data()) & ~(ps - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(bytes.data()) + bytes.size() + ps - 1) & ~(ps - 1);
  ::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_WILLNEED);
}

// A reusable scratch buffer: grown when needed, never shrunk, so that the pages of one tensor's
// output are reused by the next instead of being mapped and zeroed again.
class Scratch {
 public:
  uint8_t* get(size_t n) {
    if (n > cap_) {
      buf_.reset();
      buf_.reset(new uint8_t[n]);
      cap_ = n;
    }
    return buf_.get();
  }

 private:
  std::unique_ptr<uint8_t[]> buf_;
  size_t cap_ = 0;
};

// Writes one component: a sharded folder (ComponentWriter) or a single file.
class Sink {
 public:
  Sink(const fs::path& dir, const std::string& base, std::vector<std::vector<TensorDecl>> groups,
       uint64_t max_shard_size, const std::map<std::string, std::string>& metadata) {
    component_ = std::make_unique<ComponentWriter>(dir, base, std::move(groups), max_shard_size, metadata);
  }
  Sink(const fs::path& file, std::vector<std::vector<TensorDecl>> groups,
       const std::map<std::string, std::string>& metadata) {
    std::vector<TensorDecl> decls;
    for (auto& g : groups) {
      for (auto& d : g) decls.push_back(std::move(d));
    }
    file_ = std::make_unique<SafetensorsWriter>(file, std::move(decls), metadata);
  }
  void write(std::string_view name, std::span<const uint8_t> bytes, uint64_t offset = 0) {
    if (component_)
      component_->write(name, bytes, offset);
    else
      file_->write(name, bytes, offset);
  }
  void commit() {
    if (component_)
      component_->commit();
    else
      file_->commit();
  }
  size_t n_shards() const { return component_ ? component_->n_shards() : 1; }

 private:
  std::unique_ptr<ComponentWriter> component_;
  std::unique_ptr<SafetensorsWriter> file_;
};

// Copies a tensor from the mapped input in pieces, releasing each piece once written.
void copy_tensor(Sink& sink, const std::string& name, std::span<const uint8_t> data,
                 const std::function<void(uint64_t)>& advance) {
  for (uint64_t off = 0; off < data.size(); off += kCopyChunk) {
    const uint64_t n = std::min<uint64_t>(kCopyChunk, data.size() - off);
    sink.write(name, data.subspan(off, n), off);
    release_pages(data.subspan(off, n));
    advance(n);
  }
  if (data.empty()) sink.write(name, data, 0);
}

// copy_tensor of an input tensor. The kernel reads mapped pages past a truncated file's end as
// EFAULT (the write fails naming the output): the input shrinking under us is the cause to report.
void copy_input_tensor(const Component& component, Component::Entry e, Sink& sink, const std::string& name,
                       std::span<const uint8_t> data, const std::function<void(uint64_t)>& advance) {
  try {
    copy_tensor(sink, name, data, advance);
  } catch (const Error&) {
    component.shard_of(e).check_intact();
    throw;
  }
}

uint64_t default_max_shard_size(const Component& component, const ConvertOptions& options) {
  if (options.max_shard_size > 0) return options.max_shard_size;
  if (component.index_path().empty()) return 0;
  uint64_t largest = 0;
  for (const auto& shard : component.shards()) largest = std::max(largest, shard.file_size());
  return largest;
}

// The input's own metadata (first shard), without "format" and earlier qtool keys, plus ours.
std::map<std::string, std::string> output_metadata(const Component& component,
                                                   const std::map<std::string, std::string>& provenance) {
  std::map<std::string, std::string> meta;
  if (!component.shards().empty()) {
    for (const auto& [k, v] : component.shards().front().metadata()) {
      if (k == "format" || k.rfind("qtool_", 0) == 0) continue;
      meta[k] = v;
    }
  }
  for (const auto& [k, v] : provenance) meta[k] = v;
  return meta;
}

fs::path normal_abs(const fs::path& p) { return fs::absolute(p).lexically_normal(); }

bool is_weight_file_name(const std::string& name) {
  static const char* const kExt[] = {".safetensors", ".bin",     ".pt", ".pth", ".ckpt",
                                     ".gguf",        ".msgpack", ".h5", ".onnx"};
  for (const char* ext : kExt) {
    const std::string e(ext);
    if (name.size() >= e.size() && name.compare(name.size() - e.size(), e.size(), e) == 0) return true;
  }
  return name.size() > 22 && name.find(".safetensors.index.json") != std::string::npos;
}

// Copies the other files of the input folder (other_files.hpp) that are not a component's weights
// and not in `skip` (files the conversion writes itself) into `out_root`, keeping relative paths.
// Weight files that no component reads (other variants, pickles) are not copied: a warning names
// each.
uint64_t copy_other_files(const Checkpoint& checkpoint, const std::vector<detail::OtherFile>& files,
                          const fs::path& out_root, const std::set<fs::path>& skip,
                          std::vector<std::string>& warnings,
                          const std::function<void(std::string_view)>& on_warning) {
  std::set<fs::path> weights = skip;
  for (const Component& c : checkpoint.components()) {
    for (const auto& s : c.shards()) weights.insert(normal_abs(s.path()));
    if (!c.index_path().empty()) weights.insert(normal_abs(c.index_path()));
  }
  uint64_t n_copied = 0;
  for (const detail::OtherFile& f : files) {
    if (weights.count(normal_abs(f.source))) continue;
    if (is_weight_file_name(f.rel.filename().string())) {
      const std::string w = str_cat("not copied: ", (checkpoint.root() / f.rel).string(),
                                    " (weights that no component of the checkpoint reads)");
      warnings.push_back(w);
      if (on_warning) on_warning(w);
      continue;
    }
    std::error_code ec;
    const fs::path dst = out_root / f.rel;
    fs::create_directories(dst.parent_path(), ec);
    if (ec) fail(ErrorKind::Io, dst.parent_path().string(), ": cannot create folder: ", ec.message());
    fs::copy_file(f.source, dst, fs::copy_options::overwrite_existing, ec);
    if (ec) fail(ErrorKind::Io, f.source.string(), ": cannot copy to ", dst.string(), ": ", ec.message());
    ++n_copied;
  }
  return n_copied;
}

// The output folder of a component inside the output root.
fs::path component_out_dir(const Checkpoint& checkpoint, const Component& component,
                           const fs::path& out_root) {
  if (checkpoint.layout() != Checkpoint::Layout::Pipeline) return out_root;
  return out_root / normal_abs(component.dir()).lexically_relative(normal_abs(checkpoint.root()));
}

std::string tensor_label(const Component& component, const Component::Entry& e) {
  return str_cat(component.shard_of(e).path().string(), ": tensor '", component.info(e).name, "'");
}

// Every float tensor of a quantized linear's state (SCB, weight_scale, absmax, nested_absmax, the
// code maps) must be finite: one NaN or Inf scale would write a whole row or block of NaN/Inf
// weights. Error(InvalidInput) naming the tensor and the element.
void check_state_finite(const Component& component, const QuantizedLinear& linear) {
  constexpr size_t kChunk = 4096;
  float buf[kChunk];
  for (size_t k = 0; k < linear.tensor_names.size(); ++k) {
    const Part part = linear.tensor_parts[k];
    if (part == Part::Weight || part == Part::WeightFormat || part == Part::QuantState) continue;
    const auto e = component.find(linear.tensor_names[k]);
    QTOOL_ASSERT(e.has_value());
    const TensorInfo& t = component.info(*e);
    if (t.dtype != DType::F32 && t.dtype != DType::F16 && t.dtype != DType::BF16) continue;  // U8 codes
    const auto data = component.data(*e);
    const uint64_t n = t.numel();
    for (uint64_t i = 0; i < n; i += kChunk) {
      const size_t m = static_cast<size_t>(std::min<uint64_t>(kChunk, n - i));
      convert_to_f32(t.dtype, data.data() + i * dtype_size(t.dtype), buf, m);
      for (size_t j = 0; j < m; ++j) {
        if (std::isfinite(buf[j])) continue;
        fail(ErrorKind::InvalidInput, tensor_label(component, *e), ": element ", i + j, " is ",
             std::isnan(buf[j]) ? "NaN" : (buf[j] < 0 ? "-Inf" : "Inf"), "; the ", part_name(part), " of '",
             linear.module, "' must be finite, or its weights dequantize to NaN/Inf");
      }
    }
  }
}

// A QuantizedLinear describing tensors we have just produced (for dequantizing them back).
QuantizedLinear linear_from_output(const std::string& module, const SchemeOptions& options, DType dtype,
                                   std::span<const int64_t> shape, const std::vector<TensorDecl>& decls,
                                   const std::vector<std::span<uint8_t>>& outs) {
  QuantizedLinear linear;
  linear.module = module;
  linear.options = options;
  linear.orig_dtype = dtype;
  linear.shape.assign(shape.begin(), shape.end());
  linear.tensor_parts = scheme_parts(options);
  for (const auto& d : decls) linear.tensor_names.push_back(d.name);
  if (const auto read = detail::scheme_entry(options.scheme).read_written_state) read(linear, outs);
  return linear;
}

// Write jobs run on a thread of their own, so that the next tensor is converted while earlier ones
// are written. One thread: writes into one file serialise on its inode lock, and a second writer
// only spun on it (10% of the cycles of an int8 run). A Batch counts its unfinished jobs. At most
// `max_pending` jobs wait; a failed job's error is rethrown to the caller.
class WriteQueue {
 public:
  struct Batch {
    size_t pending = 0;  // guarded by the queue's mutex
  };

  explicit WriteQueue(size_t max_pending) : max_pending_(max_pending), thread_([this] { loop(); }) {}
  ~WriteQueue() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
      jobs_.clear();
    }
    cv_.notify_all();
    thread_.join();
  }
  WriteQueue(const WriteQueue&) = delete;
  WriteQueue& operator=(const WriteQueue&) = delete;

  void submit(Batch& batch, std::function<void()> job) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return error_ || jobs_.size() < max_pending_; });
    rethrow_locked();
    ++batch.pending;
    ++running_;
    jobs_.push_back({std::move(job), &batch});
    cv_.notify_all();
  }
  void wait(const Batch& batch) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return error_ || batch.pending == 0; });
    rethrow_locked();
  }
  void finish() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return error_ || running_ == 0; });
    rethrow_locked();
  }

 private:
  struct Job {
    std::function<void()> fn;
    Batch* batch;
  };
  void rethrow_locked() {
    if (error_) std::rethrow_exception(error_);
  }
  void loop() {
    for (;;) {
      Job job;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return stop_ || !jobs_.empty(); });
        if (stop_) return;
        job = std::move(jobs_.front());
        jobs_.pop_front();
      }
      std::exception_ptr err;
      try {
        job.fn();
      } catch (...) {
        err = std::current_exception();
      }
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (err && !error_) error_ = err;
        --job.batch->pending;
        --running_;
      }
      cv_.notify_all();
    }
  }

  size_t max_pending_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Job> jobs_;
  size_t running_ = 0;  // submitted and not finished
  std::exception_ptr error_;
  bool stop_ = false;
  std::thread thread_;  // last: starts once the members it uses exist
};

void add_warning(ConvertReport& report, const ConvertOptions& options, std::string w) {
  if (options.on_warning) options.on_warning(w);
  report.warnings.push_back(std::move(w));
}

std::optional<DType> dtype_from_torch_name(const json& value) {
  if (!value.is_string()) return std::nullopt;
  const std::string s = value.get<std::string>();
  if (s == "bfloat16") return DType::BF16;
  if (s == "float16" || s == "half") return DType::F16;
  if (s == "float32" || s == "float") return DType::F32;
  return std::nullopt;
}

double now_seconds(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

void finish_component_stats(ComponentReport& cr, const TensorReport& tr) {
  if (!tr.has_error) return;
  cr.sum_sq_ref += tr.sum_sq_ref;
  cr.sum_sq_err += tr.sum_sq_err;
  const double s = tr.sqnr_db();
  if (cr.worst_tensor.empty() || s < cr.worst_sqnr_db) {
    cr.worst_tensor = tr.name;
    cr.worst_sqnr_db = s;
  }
}

json finite_or_null(double v) { return std::isfinite(v) ? json(v) : json(nullptr); }

double rel_rms_of(double sum_ref, double sum_err) {
  if (sum_err == 0) return 0;
  if (sum_ref == 0) return std::numeric_limits<double>::infinity();
  return std::sqrt(sum_err / sum_ref);
}

double sqnr_of(double sum_ref, double sum_err) {
  if (sum_err == 0) return std::numeric_limits<double>::infinity();
  if (sum_ref == 0) return -std::numeric_limits<double>::infinity();
  return 10.0 * std::log10(sum_ref / sum_err);
}

}  // namespace

double TensorReport::rel_rms() const { return rel_rms_of(sum_sq_ref, sum_sq_err); }
double TensorReport::sqnr_db() const { return sqnr_of(sum_sq_ref, sum_sq_err); }

json quantization_config_json(const SchemeOptions& options, DType weight_dtype,
                              const std::vector<std::string>& unquantized_modules) {
  return detail::scheme_entry(options.scheme).loader_config(options, weight_dtype, unquantized_modules);
}

json report_to_json(const ConvertReport& report) {
  json j;
  j["command"] = report.command;
  j["qtool_version"] = report.tool_version;
  j["input"] = report.input.string();
  j["output"] = report.output.string();
  j["threads"] = report.n_threads;
  j["seconds"] = report.seconds;
  j["bytes_in"] = report.bytes_in;
  j["bytes_out"] = report.bytes_out;
  j["input_bytes_per_second"] =
      report.seconds > 0 ? static_cast<double>(report.bytes_in) / report.seconds : 0.0;
  j["files_copied"] = report.files_copied;
  if (!report.config.is_null()) j["config"] = report.config;
  double sum_ref = 0, sum_err = 0;
  size_t n_quantized = 0, n_copied = 0;
  json worst = nullptr;
  double worst_sqnr = std::numeric_limits<double>::infinity();
  json comps = json::array();
  for (const auto& c : report.components) {
    json cj = {{"name", c.name},
               {"scheme", c.options.is_null() ? json(nullptr) : c.options.at("scheme")},
               {"options", c.options},
               {"tensors_converted", c.n_quantized},
               {"tensors_copied", c.n_copied},
               {"bytes_in", c.bytes_in},
               {"bytes_out", c.bytes_out},
               {"shards", c.n_shards},
               {"unquantized_modules", c.unquantized_modules}};
    if (report.command == "quantize" && c.n_quantized > 0) {
      cj["rel_rms"] = finite_or_null(rel_rms_of(c.sum_sq_ref, c.sum_sq_err));
      cj["sqnr_db"] = finite_or_null(sqnr_of(c.sum_sq_ref, c.sum_sq_err));
      cj["worst_tensor"] = c.worst_tensor;
      cj["worst_sqnr_db"] = finite_or_null(c.worst_sqnr_db);
      if (!c.worst_tensor.empty() && c.worst_sqnr_db < worst_sqnr) {
        worst_sqnr = c.worst_sqnr_db;
        worst = {
            {"component", c.name}, {"tensor", c.worst_tensor}, {"sqnr_db", finite_or_null(c.worst_sqnr_db)}};
      }
    }
    sum_ref += c.sum_sq_ref;
    sum_err += c.sum_sq_err;
    n_quantized += c.n_quantized;
    n_copied += c.n_copied;
    comps.push_back(cj);
  }
  j["components"] = comps;
  json totals = {{"tensors_converted", n_quantized},
                 {"tensors_copied", n_copied},
                 {"bytes_in", report.bytes_in},
                 {"bytes_out", report.bytes_out}};
  if (report.command == "quantize") {
    totals["rel_rms"] = finite_or_null(rel_rms_of(sum_ref, sum_err));
    totals["sqnr_db"] = finite_or_null(sqnr_of(sum_ref, sum_err));
    totals["worst"] = worst;
  }
  j["totals"] = totals;
  json tensors = json::array();
  for (const auto& t : report.tensors) {
    json tj = {{"component", t.component},
               {"name", t.name},
               {"scheme", t.scheme.empty() ? json(nullptr) : json(t.scheme)},
               {"dtype", std::string(dtype_name(t.dtype))},
               {"shape", t.shape},
               {"bytes_in", t.bytes_in},
               {"bytes_out", t.bytes_out}};
    if (t.has_error) {
      tj["rel_rms"] = finite_or_null(t.rel_rms());
      tj["sqnr_db"] = finite_or_null(t.sqnr_db());
      tj["max_abs_err"] = t.max_abs_err;
    }
    tensors.push_back(tj);
  }
  j["tensors"] = tensors;
  j["warnings"] = report.warnings;
  return j;
}

std::string summary_text(const ConvertReport& report, bool per_tensor) {
  std::string out;
  char line[512];
  const double gbps = report.seconds > 0 ? static_cast<double>(report.bytes_in) / report.seconds / 1e9 : 0.0;
  std::snprintf(line, sizeof line, "%s: %s -> %s (%zu threads, %.2f s, %.2f GB/s of input)\n",
                report.command.c_str(), report.input.string().c_str(), report.output.string().c_str(),
                report.n_threads, report.seconds, gbps);
  out += line;
  const bool quantize = report.command == "quantize";
  if (per_tensor) {
    for (const auto& t : report.tensors) {
      if (t.scheme.empty()) continue;
      std::string name = t.component.empty() ? t.name : t.component + "/" + t.name;
      if (t.has_error) {
        std::snprintf(line, sizeof line, "  %-60s %-8s %10s -> %10s  rel RMS %.4f  SQNR %6.2f dB\n",
                      name.c_str(), t.scheme.c_str(), format_size(t.bytes_in).c_str(),
                      format_size(t.bytes_out).c_str(), t.rel_rms(), t.sqnr_db());
      } else {
        std::snprintf(line, sizeof line, "  %-60s %-8s %10s -> %10s\n", name.c_str(), t.scheme.c_str(),
                      format_size(t.bytes_in).c_str(), format_size(t.bytes_out).c_str());
      }
      out += line;
    }
  }
  std::snprintf(line, sizeof line, "  %-16s %-9s %9s %7s %11s    %-11s%s\n", "component", "scheme",
                "converted", "copied", "bytes in", "bytes out",
                quantize ? "  rel RMS      SQNR  worst tensor" : "");
  out += line;
  double sum_ref = 0, sum_err = 0;
  size_t n_conv = 0, n_copied = 0;
  for (const auto& c : report.components) {
    const std::string scheme = c.options.is_null() ? "-" : c.options.at("scheme").get<std::string>();
    const std::string name = c.name.empty() ? "(model)" : c.name;
    std::snprintf(line, sizeof line, "  %-16s %-9s %9zu %7zu %11s -> %-11s", name.c_str(), scheme.c_str(),
                  c.n_quantized, c.n_copied, format_size(c.bytes_in).c_str(),
                  format_size(c.bytes_out).c_str());
    out += line;
    if (quantize && c.n_quantized > 0) {
      std::snprintf(line, sizeof line, " %8.4f %6.2f dB  %.2f dB %s", rel_rms_of(c.sum_sq_ref, c.sum_sq_err),
                    sqnr_of(c.sum_sq_ref, c.sum_sq_err), c.worst_sqnr_db, c.worst_tensor.c_str());
      out += line;
    }
    out += "\n";
    sum_ref += c.sum_sq_ref;
    sum_err += c.sum_sq_err;
    n_conv += c.n_quantized;
    n_copied += c.n_copied;
  }
  std::snprintf(line, sizeof line, "  %-16s %-9s %9zu %7zu %11s -> %-11s", "total", "", n_conv, n_copied,
                format_size(report.bytes_in).c_str(), format_size(report.bytes_out).c_str());
  out += line;
  if (quantize && n_conv > 0) {
    std::snprintf(line, sizeof line, " %8.4f %6.2f dB", rel_rms_of(sum_ref, sum_err),
                  sqnr_of(sum_ref, sum_err));
    out += line;
  }
  out += "\n";
  if (report.files_copied > 0) out += str_cat("  ", report.files_copied, " other files copied\n");
  return out;
}

// What quantize and dequantize share: the output's temporary (created first, so that a bad output
// name fails before any work), the opened checkpoint, the threads, the report's header and the
// progress count.
struct ConvertProgress {
  const ConvertOptions& options;
  uint64_t total_bytes = 0;
  std::atomic<uint64_t> done_bytes{0};
  void advance(uint64_t n, std::string_view label) {
    const uint64_t done = done_bytes.fetch_add(n) + n;
    if (options.progress) options.progress(done, total_bytes, label);
  }
};

struct ConvertRun {
  std::chrono::steady_clock::time_point start;
  OutputPath out;
  Checkpoint checkpoint;
  ThreadPool pool;
  ConvertReport report;
  ConvertProgress progress;

  ConvertRun(const char* command, const fs::path& input, const fs::path& output,
             const ConvertOptions& options)
      : start(std::chrono::steady_clock::now()),
        out(output, options.force, input),
        checkpoint(Checkpoint::open(input)),
        pool(options.n_threads),
        progress{options} {
    if (checkpoint.layout() == Checkpoint::Layout::File && options.max_shard_size > 0) {
      fail(ErrorKind::Usage, "--max-shard-size: ", input.string(),
           " is a single .safetensors file, whose output is one file; give a model folder to shard it");
    }
    report.command = command;
    report.input = input;
    report.output = output;
    report.tool_version = options.tool_version;
    report.n_threads = pool.size();
    if (checkpoint.layout() != Checkpoint::Layout::File) {
      std::error_code ec;
      fs::create_directories(out.tmp(), ec);
      if (ec) fail(ErrorKind::Io, out.tmp().string(), ": cannot create folder: ", ec.message());
    }
    for (const auto& c : checkpoint.components()) progress.total_bytes += c.total_bytes();
  }
};

// ------------------------------------------------------------------------------------------------
// quantize

// A scheme a loader's quantization_config cannot express (fp8_e5m2: compressed-tensors' 8-bit
// float is always float8_e4m3fn, so transformers and vLLM would load the codes as e4m3 without a
// word) is refused for a model folder before anything is written.
namespace {
void refuse_inexpressible(const Checkpoint& checkpoint, const QuantPlan& plan) {
  for (const Component& component : checkpoint.components()) {
    const ComponentPlan* cp = plan.find(component.name());
    if (!cp || !cp->options || cp->quantized_modules.empty()) continue;
    const SchemeInfo& info = scheme_info(cp->options->scheme);
    if (info.folder_refusal.empty()) continue;
    fail(ErrorKind::InvalidInput, info.name, " for ",
         component.name().empty() ? std::string("the model") : "component '" + component.name() + "'", " of ",
         checkpoint.root().string(), ": ", info.folder_refusal);
  }
}
}  // namespace

ConvertReport quantize_checkpoint(const fs::path& input, const QuantConfig& config, const fs::path& output,
                                  const ConvertOptions& options) {
  ConvertRun run("quantize", input, output, options);
  // Plain references, not a structured binding: lambdas below capture them (clang 14 cannot
  // capture structured bindings).
  auto& start = run.start;
  auto& out = run.out;
  auto& checkpoint = run.checkpoint;
  auto& pool = run.pool;
  auto& report = run.report;
  auto& progress = run.progress;
  const QuantPlan plan = plan_quantization(config, checkpoint);
  // Checked before any conversion: a bad link fails the run at once.
  const std::vector<detail::OtherFile> other_files = detail::list_other_files(checkpoint);
  report.config = config_to_json(config);
  for (const auto& w : plan.warnings) add_warning(report, options, w);
  const std::string fingerprint = checkpoint.fingerprint();
  const bool is_file = checkpoint.layout() == Checkpoint::Layout::File;
  if (!is_file) refuse_inexpressible(checkpoint, plan);

  // Two output buffers: one being filled while the other is written.
  constexpr size_t kBuffers = 2;
  std::array<Scratch, kBuffers> scratch;
  std::array<WriteQueue::Batch, kBuffers> scratch_batch{};
  size_t next_buffer = 0;
  std::set<fs::path> written_configs;
  for (const Component& component : checkpoint.components()) {
    const ComponentPlan* cp = plan.find(component.name());
    QTOOL_ASSERT(cp != nullptr);
    ComponentReport cr;
    cr.name = component.name();
    cr.options = cp->options ? options_to_json(*cp->options) : json(nullptr);
    cr.unquantized_modules = cp->unquantized_modules;

    // Declare every output tensor: a quantized weight and its quant state form one group.
    const auto& entries = component.entries();
    std::vector<std::vector<TensorDecl>> groups;
    std::vector<bool> quantize(entries.size(), false);
    groups.reserve(entries.size());
    DType weight_dtype = DType::BF16;
    bool have_weight_dtype = false;
    for (size_t i = 0; i < entries.size(); ++i) {
      const TensorInfo& t = component.info(entries[i]);
      const std::string module = module_of_tensor(t.name);
      if (cp->options && t.name == module + ".weight" && cp->is_quantized(module)) {
        quantize[i] = true;
        groups.push_back(quantized_decls(module, t.dtype, t.shape, *cp->options));
        if (!have_weight_dtype) {
          weight_dtype = t.dtype;
          have_weight_dtype = true;
        }
      } else {
        groups.push_back({TensorDecl{t.name, t.dtype, t.shape}});
      }
    }
    // `groups` moves into the writer; the conversion keeps the names and sizes.
    std::vector<std::vector<TensorDecl>> decls = groups;

    std::map<std::string, std::string> provenance = {
        {"qtool_version", options.tool_version},
        {"qtool_command", "quantize"},
        {"qtool_scheme", cp->options ? std::string(scheme_name(cp->options->scheme)) : std::string("none")},
        {"qtool_options", cp->options ? options_to_json(*cp->options).dump() : std::string("null")},
        {"qtool_component", component.name()},
        {"qtool_source_fingerprint", fingerprint},
        {"qtool_unquantized_modules", json(cp->unquantized_modules).dump()},
    };
    const auto metadata = output_metadata(component, provenance);
    const fs::path out_dir = is_file ? fs::path() : component_out_dir(checkpoint, component, out.tmp());
    if (!is_file) {
      std::error_code ec;
      fs::create_directories(out_dir, ec);
      if (ec) fail(ErrorKind::Io, out_dir.string(), ": cannot create folder: ", ec.message());
    }
    Sink sink = is_file ? Sink(out.tmp(), std::move(groups), metadata)
                        : Sink(out_dir, component.weights_base(), std::move(groups),
                               default_max_shard_size(component, options), metadata);

    WriteQueue::Batch copies;  // outlives the queue, whose threads count it down
    WriteQueue writes(8);
    for (size_t i = 0; i < entries.size(); ++i) {
      const auto& e = entries[i];
      const TensorInfo& t = component.info(e);
      const auto data = component.data(e);
      if (i + 1 < entries.size()) prefetch_pages(component.data(entries[i + 1]));
      TensorReport tr;
      tr.component = component.name();
      tr.name = t.name;
      tr.dtype = t.dtype;
      tr.shape = t.shape;
      tr.bytes_in = t.nbytes();
      if (!quantize[i]) {
        writes.submit(copies, [&sink, &progress, &component, e, &name = t.name, data] {
          copy_input_tensor(component, e, sink, name, data, [&](uint64_t n) { progress.advance(n, name); });
          release_tensor_pages(component, e);
        });
        tr.bytes_out = t.nbytes();
        ++cr.n_copied;
      } else {
        const SchemeOptions& so = *cp->options;
        const std::string module = module_of_tensor(t.name);
        const auto& group = decls[i];
        size_t total = 0;
        for (const auto& d : group) total += (d.nbytes() + 63) & ~size_t{63};
        const size_t buffer = next_buffer++ % kBuffers;
        writes.wait(scratch_batch[buffer]);  // its last contents are written
        uint8_t* base = scratch[buffer].get(std::max<size_t>(total, 1));
        std::vector<std::span<uint8_t>> outs;
        size_t off = 0;
        for (const auto& d : group) {
          outs.emplace_back(base + off, d.nbytes());
          off += (d.nbytes() + 63) & ~size_t{63};
        }
        // The error of what is written, from the written bytes: each range as soon as the kernel
        // has finished it, on its thread, while its input is still in that core's cache.
        std::once_flag linear_once;
        std::optional<QuantizedLinear> linear;
        TensorBytes tb;
        std::vector<std::span<uint8_t>> written;  // outs, each variable-length part cut to its JSON
        std::vector<std::span<const uint8_t>> parts;
        std::mutex stats_mu;
        detail::ErrorSums stats;
        const RangeDone range_done = [&](uint64_t begin, uint64_t end) {
          std::call_once(linear_once, [&] {
            written = outs;
            for (size_t k = 0; k < group.size(); ++k) {
              if (group[k].variable_length)
                written[k] = written[k].first(quant_state_bytes(written[k]).size());
            }
            parts.assign(written.begin(), written.end());
            linear = linear_from_output(module, so, t.dtype, t.shape, group, written);
            tb = tensor_bytes(*linear, std::span<const std::span<const uint8_t>>(parts.data(), parts.size()));
          });
          detail::ErrorSums sums;
          detail::accumulate_error_elements(*linear, tb, t.dtype, data.data(), begin, end, sums);
          std::lock_guard<std::mutex> lock(stats_mu);
          stats.add(sums);
        };
        quantize_weight_into(tensor_label(component, e), t.dtype, t.shape, data, so,
                             std::span<const std::span<uint8_t>>(outs.data(), outs.size()), pool, range_done);
        for (size_t k = 0; k < group.size(); ++k) {
          if (group[k].variable_length) outs[k] = outs[k].first(quant_state_bytes(outs[k]).size());
        }
        tr.sum_sq_ref = stats.sum_sq_ref;
        tr.sum_sq_err = stats.sum_sq_err;
        tr.max_abs_err = stats.max_abs_err;
        tr.has_error = true;
        // A shard truncated under us reads as zeros past its end (MappedFile): stop here.
        component.shard_of(e).check_intact();
        release_tensor_pages(component, e);
        for (const auto& o : outs) tr.bytes_out += o.size();
        for (size_t k = 0; k < group.size(); ++k) {
          writes.submit(scratch_batch[buffer],
                        [&sink, &name = group[k].name, out = outs[k]] { sink.write(name, out); });
        }
        progress.advance(t.nbytes(), t.name);
        tr.scheme = std::string(scheme_name(so.scheme));
        ++cr.n_quantized;
        finish_component_stats(cr, tr);
      }
      cr.bytes_in += tr.bytes_in;
      cr.bytes_out += tr.bytes_out;
      report.tensors.push_back(std::move(tr));
    }
    writes.finish();
    checkpoint.check_intact();  // the copied tensors too
    sink.commit();
    cr.n_shards = sink.n_shards();

    // config.json with the quantization_config its loaders read.
    if (!is_file && component.config()) {
      json cfg = *component.config();
      if (cp->options && !cp->quantized_modules.empty()) {
        if (!cfg.is_object()) {
          fail(ErrorKind::InvalidInput, (component.dir() / "config.json").string(), ": not a JSON object");
        }
        cfg["quantization_config"] =
            quantization_config_json(*cp->options, weight_dtype, cp->unquantized_modules);
      }
      write_json_file(out_dir / "config.json", cfg);
      written_configs.insert(normal_abs(component.dir() / "config.json"));
    }
    if (is_file && cp->options && !scheme_info(cp->options->scheme).file_warning.empty() &&
        !cp->quantized_modules.empty()) {
      add_warning(report, options,
                  str_cat(component.name().empty() ? std::string("the model")
                                                   : "component '" + component.name() + "'",
                          ": ", scheme_info(cp->options->scheme).file_warning));
    }
    report.bytes_in += cr.bytes_in;
    report.bytes_out += cr.bytes_out;
    report.components.push_back(std::move(cr));
  }
  std::vector<std::string> copy_warnings;
  report.files_copied = copy_other_files(checkpoint, other_files, out.tmp(), written_configs, copy_warnings,
                                         options.on_warning);
  report.warnings.insert(report.warnings.end(), copy_warnings.begin(), copy_warnings.end());
  checkpoint.check_intact();
  out.commit();
  report.seconds = now_seconds(start);
  return report;
}

// ------------------------------------------------------------------------------------------------
// dequantize

ConvertReport dequantize_checkpoint(const fs::path& input, const fs::path& output, std::optional<DType> dtype,
                                    const ConvertOptions& options) {
  if (dtype && !is_quantizable_dtype(*dtype)) {
    fail(ErrorKind::Usage, "--dtype: ", dtype_name(*dtype), " is not bf16, f16 or f32");
  }
  ConvertRun run("dequantize", input, output, options);
  // Plain references, not a structured binding: lambdas below capture them (clang 14 cannot
  // capture structured bindings).
  auto& start = run.start;
  auto& out = run.out;
  auto& checkpoint = run.checkpoint;
  auto& pool = run.pool;
  auto& report = run.report;
  auto& progress = run.progress;
  const std::string fingerprint = checkpoint.fingerprint();
  const bool is_file = checkpoint.layout() == Checkpoint::Layout::File;

  const std::vector<detail::OtherFile> other_files = detail::list_other_files(checkpoint);
  size_t n_linears_total = 0;
  std::set<fs::path> written_configs;
  for (const Component& component : checkpoint.components()) {
    const std::vector<QuantizedLinear> linears = find_quantized_linears(component);
    for (const QuantizedLinear& l : linears) check_state_finite(component, l);
    n_linears_total += linears.size();
    // Where each tensor of a quantized linear belongs.
    std::unordered_map<std::string, std::pair<size_t, Part>> part_of;
    for (size_t li = 0; li < linears.size(); ++li) {
      for (size_t k = 0; k < linears[li].tensor_names.size(); ++k) {
        part_of.emplace(linears[li].tensor_names[k], std::make_pair(li, linears[li].tensor_parts[k]));
      }
    }
    // int8 does not record the weight's dtype: the config's, else the other float tensors'.
    DType fallback = DType::BF16;
    {
      std::optional<DType> from_config;
      if (component.config() && component.config()->is_object()) {
        for (const char* key : {"torch_dtype", "dtype"}) {
          if (!from_config && component.config()->contains(key))
            from_config = dtype_from_torch_name((*component.config())[key]);
        }
      }
      if (from_config) {
        fallback = *from_config;
      } else {
        std::map<DType, uint64_t> counts;
        for (const auto& e : component.entries()) {
          const TensorInfo& t = component.info(e);
          if (!part_of.count(t.name) && is_quantizable_dtype(t.dtype)) counts[t.dtype] += t.numel();
        }
        uint64_t best = 0;
        for (const auto& [dt, n] : counts) {
          if (n > best) {
            best = n;
            fallback = dt;
          }
        }
      }
    }
    auto out_dtype_of = [&](const QuantizedLinear& l) {
      if (dtype) return *dtype;
      if (!scheme_info(l.options.scheme).records_orig_dtype) return fallback;
      return l.orig_dtype;
    };

    ComponentReport cr;
    cr.name = component.name();
    std::vector<std::vector<TensorDecl>> groups;
    std::set<std::string> schemes;
    for (const auto& e : component.entries()) {
      const TensorInfo& t = component.info(e);
      const auto it = part_of.find(t.name);
      if (it == part_of.end()) {
        groups.push_back({TensorDecl{t.name, t.dtype, t.shape}});
      } else if (it->second.second == Part::Weight) {
        const QuantizedLinear& l = linears[it->second.first];
        groups.push_back({TensorDecl{l.module + ".weight", out_dtype_of(l), l.shape}});
        schemes.insert(std::string(scheme_name(l.options.scheme)));
      }
    }
    cr.options = linears.empty() ? json(nullptr) : options_to_json(linears.front().options);

    const std::map<std::string, std::string> provenance = {
        {"qtool_version", options.tool_version},
        {"qtool_command", "dequantize"},
        {"qtool_scheme", "none"},
        {"qtool_component", component.name()},
        {"qtool_source_fingerprint", fingerprint},
    };
    const auto metadata = output_metadata(component, provenance);
    const fs::path out_dir = is_file ? fs::path() : component_out_dir(checkpoint, component, out.tmp());
    if (!is_file) {
      std::error_code ec;
      fs::create_directories(out_dir, ec);
      if (ec) fail(ErrorKind::Io, out_dir.string(), ": cannot create folder: ", ec.message());
    }
    Sink sink = is_file ? Sink(out.tmp(), std::move(groups), metadata)
                        : Sink(out_dir, component.weights_base(), std::move(groups),
                               default_max_shard_size(component, options), metadata);

    for (const auto& e : component.entries()) {
      const TensorInfo& t = component.info(e);
      const auto it = part_of.find(t.name);
      if (it == part_of.end()) {
        TensorReport tr;
        tr.component = component.name();
        tr.name = t.name;
        tr.dtype = t.dtype;
        tr.shape = t.shape;
        tr.bytes_in = tr.bytes_out = t.nbytes();
        copy_input_tensor(component, e, sink, t.name, component.data(e),
                          [&](uint64_t n) { progress.advance(n, t.name); });
        release_tensor_pages(component, e);
        ++cr.n_copied;
        cr.bytes_in += tr.bytes_in;
        cr.bytes_out += tr.bytes_out;
        report.tensors.push_back(std::move(tr));
        continue;
      }
      if (it->second.second != Part::Weight) continue;  // read with its weight
      const QuantizedLinear& l = linears[it->second.first];
      const TensorBytes tb = tensor_bytes(l, component);
      check_tensor_bytes(l, tb);
      const DType odt = out_dtype_of(l);
      const size_t rows = static_cast<size_t>(l.rows()), cols = static_cast<size_t>(l.cols());
      const size_t osize = dtype_size(odt);
      const std::string name = l.module + ".weight";
      const size_t rows_per_chunk = std::max<size_t>(1, (kStatsChunk * 4) / std::max<size_t>(cols, 1));
      pool.parallel_for(rows, rows_per_chunk, [&](size_t r0, size_t r1) {
        std::vector<float> f(rows_per_chunk * cols);
        std::vector<uint8_t> o(rows_per_chunk * cols * osize);
        for (size_t r = r0; r < r1; r += rows_per_chunk) {
          const size_t re = std::min(r1, r + rows_per_chunk);
          const size_t n = (re - r) * cols;
          dequantize_rows_f32(l, tb, f.data(), r, re);
          convert_from_f32(odt, f.data(), o.data(), n);
          sink.write(name, std::span<const uint8_t>(o.data(), n * osize), r * cols * osize);
        }
      });
      TensorReport tr;
      tr.component = component.name();
      tr.name = t.name;
      tr.scheme = std::string(scheme_name(l.options.scheme));
      tr.dtype = t.dtype;
      tr.shape = t.shape;
      for (const auto& tn : l.tensor_names) {
        const auto pe = component.find(tn);
        QTOOL_ASSERT(pe.has_value());
        tr.bytes_in += component.info(*pe).nbytes();
        release_tensor_pages(component, *pe);
      }
      tr.bytes_out = static_cast<uint64_t>(rows) * cols * osize;
      ++cr.n_quantized;
      cr.bytes_in += tr.bytes_in;
      cr.bytes_out += tr.bytes_out;
      progress.advance(tr.bytes_in, name);
      report.tensors.push_back(std::move(tr));
    }
    checkpoint.check_intact();  // a shard truncated under us reads as zeros past its end (MappedFile)
    sink.commit();
    cr.n_shards = sink.n_shards();
    if (!is_file && component.config()) {
      json cfg = *component.config();
      if (cfg.is_object()) cfg.erase("quantization_config");
      write_json_file(out_dir / "config.json", cfg);
      written_configs.insert(normal_abs(component.dir() / "config.json"));
    }
    report.bytes_in += cr.bytes_in;
    report.bytes_out += cr.bytes_out;
    report.components.push_back(std::move(cr));
  }
  if (n_linears_total == 0) {
    add_warning(report, options,
                str_cat(input.string(), ": no quantized weights found; the tensors are copied unchanged"));
  }
  std::vector<std::string> copy_warnings;
  report.files_copied = copy_other_files(checkpoint, other_files, out.tmp(), written_configs, copy_warnings,
                                         options.on_warning);
  report.warnings.insert(report.warnings.end(), copy_warnings.begin(), copy_warnings.end());
  checkpoint.check_intact();
  out.commit();
  report.seconds = now_seconds(start);
  return report;
}

}  // namespace qtool::quant
