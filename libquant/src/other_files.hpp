// The files of a checkpoint folder that quantize and dequantize copy beside the converted weights
// (configs, tokenizers, schedulers), found by walking the folder with its symbolic links checked.
#pragma once

#include <filesystem>
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

}  // namespace qtool::quant::detail
