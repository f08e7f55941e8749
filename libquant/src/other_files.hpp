// The files of a checkpoint folder that quantize and dequantize copy beside the converted weights
// (configs, tokenizers, schedulers), found by walking the folder with its symbolic links checked.
#pragma once

#include <filesystem>
#include <functional>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "qtool/formats/checkpoint.hpp"

namespace qtool::quant::detail {

struct OtherFile {
  std::filesystem::path source;  // the path to read (it may be a symbolic link to a file anywhere)
  std::filesystem::path rel;     // its place relative to the checkpoint root, in the input and the output
};

// Every regular file under the checkpoint's root folder (none for a single-file checkpoint), in
// walk order, except other runs' unfinished outputs (".tmp-" in the name). Symbolic links:
//   - to a file: followed wherever the file is (the Hugging Face cache links snapshot files to
//     blobs outside the snapshot folder);
//   - to a folder inside the checkpoint: walked under the link's name, unless the folder is being
//     walked already (a loop: Error(InvalidInput) naming the link);
//   - to a folder outside the checkpoint: Error(InvalidInput) naming the link and its target, so
//     that no file from elsewhere lands in the output;
//   - that cannot be resolved (a loop of links, a missing target): Error(InvalidInput) naming it.
std::vector<OtherFile> list_other_files(const Checkpoint& checkpoint);

// `path` made absolute and lexically normal: how weight and config paths are compared.
std::filesystem::path normal_abs(const std::filesystem::path& path);

// Copies `files` that are not a component's weights and not in `skip` (absolute, normal: files the
// conversion writes itself) into `out_root`, keeping relative paths; returns how many. Weight files
// that no component reads (other variants, pickles) are not copied: a warning names each, appended
// to `warnings` and passed to `on_warning`.
uint64_t copy_other_files(const Checkpoint& checkpoint, const std::vector<OtherFile>& files,
                          const std::filesystem::path& out_root, const std::set<std::filesystem::path>& skip,
                          std::vector<std::string>& warnings,
                          const std::function<void(std::string_view)>& on_warning);

}  // namespace qtool::quant::detail
