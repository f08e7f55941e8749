#include "qtool/formats/error.hpp"

#include <cstdio>
#include <cstdlib>

namespace qtool {

const char* error_kind_name(ErrorKind kind) {
  switch (kind) {
    case ErrorKind::InvalidInput: return "invalid input";
    case ErrorKind::Usage: return "usage";
    case ErrorKind::Io: return "I/O error";
    case ErrorKind::Unsupported: return "unsupported";
    case ErrorKind::CheckFailed: return "check failed";
    case ErrorKind::Internal: return "internal error";
  }
  return "error";
}

void assert_failed(const char* expr, const char* file, int line, const std::string& msg) {
  std::fprintf(stderr, "qtool: internal error: assertion '%s' failed at %s:%d%s%s\n", expr, file, line,
               msg.empty() ? "" : ": ", msg.c_str());
  std::abort();
}

}  // namespace qtool
