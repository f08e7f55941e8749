// The set-up and tail that quantize and dequantize share (convert_run.hpp).
#include "convert_run.hpp"

#include <algorithm>
#include <system_error>

#include "qtool/formats/error.hpp"

namespace fs = std::filesystem;

namespace qtool::quant::detail {
namespace {

uint64_t default_max_shard_size(const Component& component, const ConvertOptions& options) {
  if (options.max_shard_size > 0) return options.max_shard_size;
  if (component.index_path().empty()) return 0;
  uint64_t largest = 0;
  for (const auto& shard : component.shards()) largest = std::max(largest, shard.file_size());
  return largest;
}

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

// The output folder of a component inside the output root.
fs::path component_out_dir(const Checkpoint& checkpoint, const Component& component,
                           const fs::path& out_root) {
  if (checkpoint.layout() != Checkpoint::Layout::Pipeline) return out_root;
  return out_root / normal_abs(component.dir()).lexically_relative(normal_abs(checkpoint.root()));
}

void create_folder(const fs::path& dir) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) fail(ErrorKind::Io, dir.string(), ": cannot create folder: ", ec.message());
}

}  // namespace

ConvertRun::ConvertRun(const char* command, const fs::path& input, const fs::path& output,
                       const ConvertOptions& opts)
    : options(opts),
      start(std::chrono::steady_clock::now()),
      out(output, opts.force, input),
      checkpoint(Checkpoint::open(input)),
      pool(opts.n_threads),
      progress{opts} {
  if (is_file() && options.max_shard_size > 0) {
    fail(ErrorKind::Usage, "--max-shard-size: ", input.string(),
         " is a single .safetensors file, whose output is one file; give a model folder to shard it");
  }
  report.command = command;
  report.input = input;
  report.output = output;
  report.tool_version = options.tool_version;
  report.n_threads = pool.size();
  if (!is_file()) create_folder(out.tmp());
  for (const auto& c : checkpoint.components()) progress.total_bytes += c.total_bytes();
  fingerprint = checkpoint.fingerprint();
}

void ConvertRun::add_warning(std::string warning) {
  if (options.on_warning) options.on_warning(warning);
  report.warnings.push_back(std::move(warning));
}

ComponentOutput ConvertRun::open_component(const Component& component,
                                           std::vector<std::vector<TensorDecl>> groups,
                                           const std::map<std::string, std::string>& provenance) {
  const auto metadata = output_metadata(component, provenance);
  if (is_file()) return {fs::path(), Sink(out.tmp(), std::move(groups), metadata)};
  fs::path dir = component_out_dir(checkpoint, component, out.tmp());
  create_folder(dir);
  Sink sink(dir, component.weights_base(), std::move(groups), default_max_shard_size(component, options),
            metadata);
  return {std::move(dir), std::move(sink)};
}

void ConvertRun::write_config(const Component& component, const fs::path& out_dir,
                              const nlohmann::json& config) {
  write_json_file(out_dir / "config.json", config);
  written_configs.insert(normal_abs(component.dir() / "config.json"));
}

void ConvertRun::finish_component(Sink& sink, ComponentReport&& cr) {
  checkpoint.check_intact();  // a shard truncated under us reads as zeros past its end (MappedFile)
  sink.commit();
  cr.n_shards = sink.n_shards();
  report.bytes_in += cr.bytes_in;
  report.bytes_out += cr.bytes_out;
  report.components.push_back(std::move(cr));
}

ConvertReport ConvertRun::finish(const std::vector<OtherFile>& other_files) {
  std::vector<std::string> copy_warnings;
  report.files_copied = copy_other_files(checkpoint, other_files, out.tmp(), written_configs, copy_warnings,
                                         options.on_warning);
  report.warnings.insert(report.warnings.end(), copy_warnings.begin(), copy_warnings.end());
  checkpoint.check_intact();
  out.commit();
  report.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return std::move(report);
}

std::string tensor_label(const Component& component, const Component::Entry& e) {
  return str_cat(component.shard_of(e).path().string(), ": tensor '", component.info(e).name, "'");
}

std::string component_label(const Component& component) {
  return component.name().empty() ? std::string("the model") : "component '" + component.name() + "'";
}

TensorReport tensor_report(const Component& component, const TensorInfo& t) {
  TensorReport tr;
  tr.component = component.name();
  tr.name = t.name;
  tr.dtype = t.dtype;
  tr.shape = t.shape;
  tr.bytes_in = t.nbytes();
  return tr;
}

}  // namespace qtool::quant::detail
