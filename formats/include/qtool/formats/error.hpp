// Errors: a typed qtool::Error for anything a user can cause (bad files, bad options), and
// QTOOL_ASSERT for the program's own invariants. The CLI maps ErrorKind to exit codes in one place.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>

namespace qtool {

enum class ErrorKind {
  InvalidInput,  // malformed file, bad config, impossible budget, mismatched plan: exit 2
  Usage,         // bad command-line option: exit 2
  Io,            // cannot open / read / write / rename: exit 2
  Unsupported,   // a valid input qtool does not handle (dtype F4, ...): exit 2
  CheckFailed,   // verify found a failure: exit 1
  Internal,      // a bug: exit 3
};

const char* error_kind_name(ErrorKind kind);

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, std::string message) : std::runtime_error(std::move(message)), kind_(kind) {}
  ErrorKind kind() const noexcept { return kind_; }

 private:
  ErrorKind kind_;
};

// Concatenates any streamable values: str_cat("tensor '", name, "': offset ", off).
template <typename... Args>
std::string str_cat(Args&&... args) {
  std::ostringstream os;
  (os << ... << std::forward<Args>(args));
  return os.str();
}

// `s` with every control character (U+0000..U+001F, U+007F) written as \xNN, for names that
// come from files: a NUL would cut a printed message short, a newline or escape would garble it.
std::string escape_controls(std::string_view s);
// Whether `s` holds a control character (which escape_controls() would rewrite).
bool has_control_char(std::string_view s);

template <typename... Args>
[[noreturn]] void fail(ErrorKind kind, Args&&... args) {
  throw Error(kind, str_cat(std::forward<Args>(args)...));
}

[[noreturn]] void assert_failed(const char* expr, const char* file, int line, const std::string& msg);

}  // namespace qtool

#define QTOOL_ASSERT(cond)                                                         \
  do {                                                                             \
    if (!(cond)) ::qtool::assert_failed(#cond, __FILE__, __LINE__, std::string()); \
  } while (0)
#define QTOOL_ASSERT_MSG(cond, ...)                                                                \
  do {                                                                                             \
    if (!(cond)) ::qtool::assert_failed(#cond, __FILE__, __LINE__, ::qtool::str_cat(__VA_ARGS__)); \
  } while (0)
