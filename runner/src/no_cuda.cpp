// Builds without a CUDA toolkit have only the CPU backend.
#if !defined(QTOOL_HAVE_CUDA)
#include "qtool/formats/error.hpp"
#include "qtool/runner/executor.hpp"

namespace qtool::runner {

bool cuda_backend_available() { return false; }

std::unique_ptr<Backend> make_cuda_backend() {
  fail(ErrorKind::Unsupported,
       "this qtool was built without CUDA: only the CPU backend is available (--backend cpu)");
}

}  // namespace qtool::runner
#endif
