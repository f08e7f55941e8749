#include "other_files.hpp"

#include <algorithm>
#include <cerrno>
#include <string>
#include <system_error>

#include "qtool/formats/error.hpp"

namespace fs = std::filesystem;

namespace qtool::quant::detail {
namespace {

bool is_within(const fs::path& path, const fs::path& folder) {
  auto p = path.begin();
  for (auto f = folder.begin(); f != folder.end(); ++f, ++p) {
    if (p == path.end() || *p != *f) return false;
  }
  return true;
}

struct Walker {
  fs::path root;                  // canonical
  fs::path shown_root;            // as the user gave it, for messages
  std::vector<fs::path> walking;  // canonical folders being walked (root first)
  std::vector<OtherFile> files;

  std::string shown(const fs::path& rel) const { return (shown_root / rel).string(); }

  void walk(const fs::path& dir, const fs::path& rel_dir) {
    std::error_code ec;
    fs::directory_iterator it(dir, ec);
    if (ec) fail(ErrorKind::Io, shown(rel_dir), ": cannot list folder: ", ec.message());
    std::vector<fs::directory_entry> entries;
    for (; it != fs::directory_iterator(); it.increment(ec)) {
      if (ec) fail(ErrorKind::Io, shown(rel_dir), ": cannot list folder: ", ec.message());
      entries.push_back(*it);
    }
    std::sort(entries.begin(), entries.end(),
              [](const fs::directory_entry& a, const fs::directory_entry& b) { return a.path() < b.path(); });
    for (const fs::directory_entry& entry : entries) {
      const fs::path name = entry.path().filename();
      if (name.string().find(".tmp-") != std::string::npos) continue;  // another run's unfinished output
      const fs::path rel = rel_dir / name;
      const fs::file_status link_st = entry.symlink_status(ec);
      if (ec) fail(ErrorKind::Io, shown(rel), ": cannot stat: ", ec.message());
      if (!fs::is_symlink(link_st)) {
        if (fs::is_directory(link_st)) {
          enter(entry.path(), rel);
        } else if (fs::is_regular_file(link_st)) {
          files.push_back({entry.path(), rel});
        } else {
          // A FIFO, socket or device: copying it would block or never end.
          fail(ErrorKind::InvalidInput, shown(rel),
               ": not a regular file (a FIFO, socket or device) in the checkpoint folder");
        }
        continue;
      }
      const fs::file_status st = fs::status(entry.path(), ec);
      if (ec) {
        if (ec == std::errc::too_many_symbolic_link_levels)
          fail(ErrorKind::InvalidInput, shown(rel), ": a loop of symbolic links (", ec.message(),
               "); remove the link or point it at a file");
        std::error_code ec2;
        fail(ErrorKind::InvalidInput, shown(rel), ": a symbolic link to ",
             fs::read_symlink(entry.path(), ec2).string(), ", which cannot be read (", ec.message(), ")");
      }
      if (fs::is_regular_file(st)) {
        files.push_back({entry.path(), rel});
      } else if (fs::is_directory(st)) {
        const fs::path target = fs::canonical(entry.path(), ec);
        if (ec) fail(ErrorKind::Io, shown(rel), ": cannot resolve the symbolic link: ", ec.message());
        if (!is_within(target, root))
          fail(ErrorKind::InvalidInput, shown(rel), ": a symbolic link to the folder ", target.string(),
               ", outside the checkpoint ", shown_root.string(),
               "; qtool copies no folder from outside the checkpoint into the output (replace the link with "
               "a copy of the folder, or remove it)");
        enter(entry.path(), rel);
      }
    }
  }

  void enter(const fs::path& dir, const fs::path& rel) {
    std::error_code ec;
    const fs::path canon = fs::canonical(dir, ec);
    if (ec) fail(ErrorKind::Io, shown(rel), ": cannot resolve the folder: ", ec.message());
    if (std::find(walking.begin(), walking.end(), canon) != walking.end())
      fail(ErrorKind::InvalidInput, shown(rel), ": a symbolic link loop: it leads back to ", canon.string(),
           ", a folder that contains it; remove the link");
    walking.push_back(canon);
    walk(dir, rel);
    walking.pop_back();
  }
};

}  // namespace

std::vector<OtherFile> list_other_files(const Checkpoint& checkpoint) {
  if (checkpoint.layout() == Checkpoint::Layout::File) return {};
  std::error_code ec;
  const fs::path root = fs::canonical(checkpoint.root(), ec);
  if (ec) fail(ErrorKind::Io, checkpoint.root().string(), ": cannot resolve the folder: ", ec.message());
  Walker w{root, checkpoint.root(), {root}, {}};
  w.walk(checkpoint.root(), fs::path());
  return std::move(w.files);
}

fs::path normal_abs(const fs::path& path) { return fs::absolute(path).lexically_normal(); }

namespace {

bool is_weight_file_name(const std::string& name) {
  static const char* const kExt[] = {".safetensors", ".bin",     ".pt", ".pth", ".ckpt",
                                     ".gguf",        ".msgpack", ".h5", ".onnx"};
  for (const char* ext : kExt) {
    const std::string e(ext);
    if (name.size() >= e.size() && name.compare(name.size() - e.size(), e.size(), e) == 0) return true;
  }
  return name.size() > 22 && name.find(".safetensors.index.json") != std::string::npos;
}

}  // namespace

uint64_t copy_other_files(const Checkpoint& checkpoint, const std::vector<OtherFile>& files,
                          const fs::path& out_root, const std::set<fs::path>& skip,
                          std::vector<std::string>& warnings,
                          const std::function<void(std::string_view)>& on_warning) {
  std::set<fs::path> weights = skip;
  for (const Component& c : checkpoint.components()) {
    for (const auto& s : c.shards()) weights.insert(normal_abs(s.path()));
    if (!c.index_path().empty()) weights.insert(normal_abs(c.index_path()));
  }
  uint64_t n_copied = 0;
  for (const OtherFile& f : files) {
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

}  // namespace qtool::quant::detail
