// OutputPath: outputs appear under their final name only when complete.
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <string>
#include <system_error>
#include <vector>

#include "qtool/formats/checkpoint.hpp"
#include "qtool/formats/error.hpp"

namespace fs = std::filesystem;

namespace qtool {
namespace {

// True when `inner` is `outer` or lies inside it (both absolute and normalised).
bool is_within(const fs::path& inner, const fs::path& outer) {
  const fs::path rel = inner.lexically_relative(outer);
  if (rel.empty()) return false;
  const auto first = *rel.begin();
  return first != "..";
}

fs::path absolute_normal(const fs::path& p) {
  std::error_code ec;
  fs::path r = fs::weakly_canonical(fs::absolute(p), ec);
  if (ec) r = fs::absolute(p).lexically_normal();
  // "dir/" and "dir" name the same place.
  if (!r.has_filename() && r.has_parent_path()) r = r.parent_path();
  return r;
}

// The pid in `<prefix><pid>` (or `<prefix><pid>.tmp-<pid>`, the temporary of a single-file
// output's writer) when `name` has that form, else 0.
pid_t pid_of_sibling(const std::string& name, const std::string& prefix) {
  if (name.rfind(prefix, 0) != 0) return 0;
  const size_t begin = prefix.size();
  const size_t end = std::min(name.find_first_not_of("0123456789", begin), name.size());
  if (end == begin || end - begin > 9) return 0;
  if (end != name.size() && name.compare(end, 5, ".tmp-") != 0) return 0;
  return static_cast<pid_t>(std::stol(name.substr(begin, end - begin)));
}

// True when `pid` is another process that no longer runs (a killed run of ours).
bool is_dead(pid_t pid) { return pid > 0 && pid != ::getpid() && ::kill(pid, 0) != 0 && errno == ESRCH; }

// Cleans up after runs that were killed: `<name>.tmp-<pid>` (unfinished work, or the old output
// after the exchange of a commit) is removed; `<name>.old-<pid>` (the old output moved aside by the
// two-rename commit of a filesystem without RENAME_EXCHANGE) is moved back under the final name
// when that name is empty, which is where the killed run left it, else removed.
void clean_up_killed_runs(const fs::path& final_path) {
  const std::string tmp_prefix = final_path.filename().string() + ".tmp-";
  const std::string old_prefix = final_path.filename().string() + ".old-";
  std::error_code ec;
  std::vector<fs::path> stale_tmp, stale_old;
  for (const auto& e : fs::directory_iterator(final_path.parent_path(), ec)) {
    const std::string name = e.path().filename().string();
    if (is_dead(pid_of_sibling(name, tmp_prefix))) stale_tmp.push_back(e.path());
    if (is_dead(pid_of_sibling(name, old_prefix))) stale_old.push_back(e.path());
  }
  for (const auto& p : stale_tmp) fs::remove_all(p, ec);
  for (const auto& p : stale_old) {
    if (fs::symlink_status(final_path, ec).type() == fs::file_type::not_found &&
        ::rename(p.c_str(), final_path.c_str()) == 0)
      continue;
    fs::remove_all(p, ec);
  }
}

}  // namespace

OutputPath::OutputPath(fs::path final_path, bool force, const fs::path& input) : force_(force) {
  if (final_path.empty()) fail(ErrorKind::Usage, "output path is empty");
  final_ = absolute_normal(final_path);
  if (!input.empty()) {
    const fs::path in = absolute_normal(input);
    if (final_ == in) fail(ErrorKind::InvalidInput, final_path.string(), ": the output is the input");
    if (is_within(final_, in))
      fail(ErrorKind::InvalidInput, final_path.string(), ": the output lies inside the input ",
           input.string());
    if (is_within(in, final_))
      fail(ErrorKind::InvalidInput, final_path.string(), ": the input ", input.string(),
           " lies inside the output, which would be replaced");
  }
  std::error_code ec;
  const fs::path parent = final_.parent_path();
  if (fs::is_directory(parent, ec)) clean_up_killed_runs(final_);  // first: it may restore the old output
  if (fs::symlink_status(final_, ec).type() != fs::file_type::not_found && !ec && !force_)
    fail(ErrorKind::InvalidInput, final_path.string(), ": output exists (use --force to replace it)");
  fs::create_directories(parent, ec);
  if (ec) fail(ErrorKind::Io, parent.string(), ": cannot create folder: ", ec.message());
  tmp_ = final_;
  tmp_ += ".tmp-" + std::to_string(::getpid());
  fs::remove_all(tmp_, ec);
}

OutputPath::~OutputPath() {
  if (committed_) return;
  std::error_code ec;
  fs::remove_all(tmp_, ec);
}

void OutputPath::commit() {
  if (committed_) return;
  std::error_code ec;
  if (fs::symlink_status(tmp_, ec).type() == fs::file_type::not_found)
    fail(ErrorKind::Internal, tmp_.string(), ": nothing was written to the temporary output");
  const bool exists = fs::symlink_status(final_, ec).type() != fs::file_type::not_found;
  if (exists && !force_)
    fail(ErrorKind::InvalidInput, final_.string(),
         ": output appeared while writing (use --force to replace it)");
  if (exists && !fs::is_directory(final_, ec) && !fs::is_directory(tmp_, ec)) {
    // A file replaces a file atomically.
    if (::rename(tmp_.c_str(), final_.c_str()) != 0)
      fail(ErrorKind::Io, tmp_.string(), ": cannot rename to ", final_.string(), ": ", std::strerror(errno));
  } else if (exists && ::renameat2(AT_FDCWD, tmp_.c_str(), AT_FDCWD, final_.c_str(), RENAME_EXCHANGE) == 0) {
    // One step: the new output takes the final name and the old one the temporary's, which is then
    // deleted (a run killed while deleting leaves a `.tmp-<pid>` that the next run removes).
    committed_ = true;
    fs::remove_all(tmp_, ec);
    return;
  } else if (exists) {
    // No RENAME_EXCHANGE on this filesystem: move the old output aside, rename, then delete it.
    // A run killed between the two renames leaves the final name empty and `.old-<pid>`, which the
    // next run moves back.
    fs::path old = final_;
    old += ".old-" + std::to_string(::getpid());
    fs::remove_all(old, ec);
    if (::rename(final_.c_str(), old.c_str()) != 0)
      fail(ErrorKind::Io, final_.string(), ": cannot move the old output aside: ", std::strerror(errno));
    if (::rename(tmp_.c_str(), final_.c_str()) != 0) {
      const int err = errno;
      ::rename(old.c_str(), final_.c_str());
      fail(ErrorKind::Io, tmp_.string(), ": cannot rename to ", final_.string(), ": ", std::strerror(err));
    }
    fs::remove_all(old, ec);
  } else if (::rename(tmp_.c_str(), final_.c_str()) != 0) {
    fail(ErrorKind::Io, tmp_.string(), ": cannot rename to ", final_.string(), ": ", std::strerror(errno));
  }
  committed_ = true;
}

}  // namespace qtool
