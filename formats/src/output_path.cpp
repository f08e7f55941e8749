// OutputPath: outputs appear under their final name only when complete.
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <string>
#include <system_error>

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

// Removes `<name>.tmp-<pid>` siblings left by processes that no longer run (killed runs).
void remove_stale_temporaries(const fs::path& final_path) {
  const std::string prefix = final_path.filename().string() + ".tmp-";
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(final_path.parent_path(), ec)) {
    const std::string name = e.path().filename().string();
    if (name.rfind(prefix, 0) != 0) continue;
    const std::string pid_text = name.substr(prefix.size());
    if (pid_text.empty() || pid_text.size() > 9 ||
        pid_text.find_first_not_of("0123456789") != std::string::npos)
      continue;
    const pid_t pid = static_cast<pid_t>(std::stol(pid_text));
    if (pid == ::getpid()) continue;
    if (::kill(pid, 0) == 0 || errno != ESRCH) continue;  // still running (or not ours to judge)
    std::error_code ec2;
    fs::remove_all(e.path(), ec2);
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
  if (fs::symlink_status(final_, ec).type() != fs::file_type::not_found && !ec && !force_)
    fail(ErrorKind::InvalidInput, final_path.string(), ": output exists (use --force to replace it)");
  const fs::path parent = final_.parent_path();
  fs::create_directories(parent, ec);
  if (ec) fail(ErrorKind::Io, parent.string(), ": cannot create folder: ", ec.message());
  remove_stale_temporaries(final_);
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
  if (exists && !fs::is_directory(final_) && !fs::is_directory(tmp_)) {
    // A file replaces a file atomically.
    if (::rename(tmp_.c_str(), final_.c_str()) != 0)
      fail(ErrorKind::Io, tmp_.string(), ": cannot rename to ", final_.string(), ": ", std::strerror(errno));
  } else if (exists) {
    // A folder cannot be renamed over another: move the old one aside, rename, then delete it.
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
