// JSON reading and writing for every file and option qtool takes (json.hpp). Parsing goes through
// a SAX handler that builds the value itself: nlohmann's parser keeps its own stack (no recursion),
// and the handler stops at kMaxJsonDepth, so no deep value is ever built, copied or dumped.
#include "qtool/formats/json.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <limits>
#include <unordered_set>
#include <vector>

namespace fs = std::filesystem;

namespace qtool {
namespace {

constexpr size_t kUnknown = std::numeric_limits<size_t>::max();

// The byte offset of the first '[' or '{' (outside strings) nested deeper than kMaxJsonDepth.
size_t too_deep_offset(std::string_view text) {
  size_t depth = 0;
  bool in_string = false, escaped = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      if (escaped)
        escaped = false;
      else if (c == '\\')
        escaped = true;
      else if (c == '"')
        in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > kMaxJsonDepth) return i;
    } else if ((c == ']' || c == '}') && depth > 0) {
      --depth;
    }
  }
  return kUnknown;
}

// nlohmann's SAX interface; builds the value, refusing depth and duplicate keys.
template <typename Json>
class BoundedBuilder {
 public:
  using number_integer_t = typename Json::number_integer_t;
  using number_unsigned_t = typename Json::number_unsigned_t;
  using number_float_t = typename Json::number_float_t;
  using string_t = typename Json::string_t;
  using binary_t = typename Json::binary_t;

  Json root;
  std::string problem;         // why parsing stopped; empty when it did not
  size_t position = kUnknown;  // byte offset of the problem, when the parser knows it
  bool too_deep = false;

  bool null() { return put(Json(nullptr)) != nullptr; }
  bool boolean(bool v) { return put(Json(v)) != nullptr; }
  bool number_integer(number_integer_t v) { return put(Json(v)) != nullptr; }
  bool number_unsigned(number_unsigned_t v) { return put(Json(v)) != nullptr; }
  bool number_float(number_float_t v, const string_t&) { return put(Json(v)) != nullptr; }
  bool string(string_t& v) { return put(Json(std::move(v))) != nullptr; }
  bool binary(binary_t& v) { return put(Json::binary(std::move(v))) != nullptr; }
  bool start_object(size_t) { return open(Json::object()); }
  bool start_array(size_t) { return open(Json::array()); }
  bool end_object() {
    frames_.pop_back();
    return true;
  }
  bool end_array() {
    frames_.pop_back();
    return true;
  }
  bool key(string_t& k) {
    Frame& f = frames_.back();
    if (!f.keys.insert(k).second) {
      problem =
          str_cat("duplicate key '", k, "' in ", path_of_open(), " (a key may appear once in an object)");
      return false;
    }
    f.key = std::move(k);
    return true;
  }
  bool parse_error(size_t chars_read, const std::string& last_token, const nlohmann::json::exception& ex) {
    std::string what = ex.what();
    // "[json.exception.parse_error.101] parse error at line 1, column 2: syntax error ..."
    if (const size_t p = what.find("] "); p != std::string::npos) what = what.substr(p + 2);
    problem = what;
    position = chars_read > 0 ? chars_read - 1 : 0;
    // A number outside the double range (out_of_range 406) is reported once read: point at its start.
    if (ex.id == 406 && last_token.size() <= chars_read) position = chars_read - last_token.size();
    return false;
  }

 private:
  struct Frame {
    Json* value;
    string_t key;  // the key being read (objects)
    std::unordered_set<string_t> keys;
  };
  std::vector<Frame> frames_;

  // "the top-level object", "the object at quant_mapping.transformer", "the object at groups[3]".
  std::string path_of_open() const {
    std::string path;
    for (size_t i = 1; i < frames_.size(); ++i) {
      const Frame& parent = frames_[i - 1];
      if (parent.value->is_array())
        path += str_cat("[", parent.value->size() - 1, "]");
      else
        path += (path.empty() ? "" : ".") + parent.key;
    }
    return path.empty() ? std::string("the top-level object") : "the object at " + path;
  }

  Json* put(Json&& v) {
    if (frames_.empty()) {
      root = std::move(v);
      return &root;
    }
    Json& c = *frames_.back().value;
    if (c.is_array()) {
      c.push_back(std::move(v));
      return &c.back();
    }
    Json& slot = c[frames_.back().key];
    slot = std::move(v);
    return &slot;
  }
  bool open(Json&& container) {
    if (frames_.size() >= kMaxJsonDepth) {
      too_deep = true;
      problem = str_cat("arrays and objects nested deeper than ", kMaxJsonDepth, " levels");
      return false;
    }
    Json* slot = put(std::move(container));
    frames_.push_back({slot, {}, {}});
    return true;
  }
};

template <typename Json>
Json parse_bounded(std::string_view text, std::string_view label, ErrorKind kind) {
  BoundedBuilder<Json> b;
  bool ok = false;
  try {
    ok = Json::sax_parse(text, &b, nlohmann::json::input_format_t::json, true, false);
  } catch (const nlohmann::json::exception& e) {
    // The handler reports errors itself; this is for anything the parser throws past it.
    b.problem = e.what();
    ok = false;
  }
  if (ok && b.problem.empty()) return std::move(b.root);
  if (b.too_deep) b.position = too_deep_offset(text);
  if (b.problem.empty()) b.problem = "cannot be parsed";
  if (b.position != kUnknown) fail(kind, label, ": invalid JSON at byte ", b.position, ": ", b.problem);
  fail(kind, label, ": invalid JSON: ", b.problem);
}

const char* file_type_name(mode_t mode) {
  if (S_ISFIFO(mode)) return "a FIFO";
  if (S_ISSOCK(mode)) return "a socket";
  if (S_ISCHR(mode)) return "a character device";
  if (S_ISBLK(mode)) return "a block device";
  if (S_ISDIR(mode)) return "a folder";
  return "not a plain file";
}

}  // namespace

nlohmann::json parse_json(std::string_view text, std::string_view label, ErrorKind kind) {
  return parse_bounded<nlohmann::json>(text, label, kind);
}

nlohmann::ordered_json parse_ordered_json(std::string_view text, std::string_view label, ErrorKind kind) {
  return parse_bounded<nlohmann::ordered_json>(text, label, kind);
}

int open_regular_file(const fs::path& path) {
  // O_NONBLOCK: opening a FIFO with no writer would otherwise wait forever. It changes nothing
  // for a regular file, and is cleared before the descriptor is returned.
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
  if (fd < 0) fail(ErrorKind::Io, path.string(), ": cannot open: ", std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    fail(ErrorKind::Io, path.string(), ": cannot stat: ", std::strerror(err));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    fail(ErrorKind::InvalidInput, path.string(), ": not a regular file (", file_type_name(st.st_mode), ")");
  }
  const int flags = ::fcntl(fd, F_GETFL);
  if (flags >= 0) (void)::fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
  return fd;
}

std::string read_text_file(const fs::path& path) {
  const int fd = open_regular_file(path);
  std::string text;
  char buf[1 << 16];
  for (;;) {
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const int err = errno;
      ::close(fd);
      fail(ErrorKind::Io, path.string(), ": read error: ", std::strerror(err));
    }
    if (n == 0) break;
    text.append(buf, static_cast<size_t>(n));
  }
  ::close(fd);
  return text;
}

nlohmann::json read_json_file(const fs::path& path) {
  return parse_json(read_text_file(path), path.string());
}

std::string dump_json(const nlohmann::json& value, int indent) {
  return value.dump(indent, ' ', false, nlohmann::json::error_handler_t::replace);
}

std::string dump_json(const nlohmann::ordered_json& value, int indent) {
  return value.dump(indent, ' ', false, nlohmann::ordered_json::error_handler_t::replace);
}

void write_json_file(const fs::path& path, const nlohmann::json& value) {
  write_text_file(path, dump_json(value, 2) + "\n");
}

void write_text_file(const fs::path& path, std::string_view text) {
  fs::path tmp = path;
  tmp += ".tmp-" + std::to_string(::getpid());
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) fail(ErrorKind::Io, tmp.string(), ": cannot create: ", std::strerror(errno));
  size_t done = 0;
  while (done < text.size()) {
    const ssize_t w = ::write(fd, text.data() + done, text.size() - done);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) {
      const int err = errno;
      ::close(fd);
      ::unlink(tmp.c_str());
      fail(ErrorKind::Io, tmp.string(), ": cannot write: ", std::strerror(err));
    }
    done += static_cast<size_t>(w);
  }
  if (::fsync(fd) != 0 || ::close(fd) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    fail(ErrorKind::Io, tmp.string(), ": cannot flush: ", std::strerror(err));
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    fail(ErrorKind::Io, tmp.string(), ": cannot rename to ", path.string(), ": ", std::strerror(err));
  }
}

}  // namespace qtool
