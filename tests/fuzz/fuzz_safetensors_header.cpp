// libFuzzer entry point for the safetensors header parser: raw bytes are a whole file. Whatever
// the bytes, the parser either returns a header whose tensors tile the data exactly or throws a
// qtool::Error naming the file; anything else (a crash, a sanitizer report, another exception,
// an Internal error) is a bug.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "qtool/formats/error.hpp"
#include "qtool/formats/safetensors.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  constexpr const char* kLabel = "fuzz.safetensors";
  try {
    const auto h = qtool::parse_safetensors_header(std::span<const uint8_t>(data, size), size, kLabel);
    uint64_t expected = 0;
    for (const auto& t : h.tensors) {
      QTOOL_ASSERT(t.begin == expected);
      QTOOL_ASSERT(t.end >= t.begin);
      QTOOL_ASSERT(t.nbytes() == t.numel() * qtool::dtype_size(t.dtype));
      expected = t.end;
    }
    QTOOL_ASSERT(h.data_offset() + expected == size);
    QTOOL_ASSERT(h.data_size() == expected);
  } catch (const qtool::Error& e) {
    const std::string msg = e.what();
    QTOOL_ASSERT_MSG(e.kind() == qtool::ErrorKind::InvalidInput || e.kind() == qtool::ErrorKind::Unsupported,
                     "unexpected error kind: ", msg);
    QTOOL_ASSERT_MSG(msg.rfind(kLabel, 0) == 0, "message does not name the file: ", msg);
  }
  return 0;
}
