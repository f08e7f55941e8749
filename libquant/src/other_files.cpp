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

}  // namespace qtool::quant::detail
