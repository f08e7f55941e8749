// Owning, move-only wrappers for the CUDA resources the runner uses, and QTOOL_CUDA_CHECK.
// Only available when the CUDA backend is built (QTOOL_HAVE_CUDA). Destructors never throw: a
// failure while releasing is reported on stderr and ignored.
//
// Every type owns exactly one handle; moving transfers it and leaves the source empty. Each
// remembers the device it was made on and makes that device current while it releases, so a
// wrapper may be destroyed with any device current.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace qtool::runner::cuda {

// Throws qtool::Error(Internal) whose message names the failed statement, the file, the line, the
// current device and CUDA's own description. cudaErrorMemoryAllocation is Error(InvalidInput): a
// budget the machine cannot give is a user's problem, not a bug.
[[noreturn]] void cuda_fail(cudaError_t err, const char* expr, const char* file, int line);
[[noreturn]] void cublas_fail(cublasStatus_t status, const char* expr, const char* file, int line);

// QTOOL_CUDA_CHECK(expr) and QTOOL_CUBLAS_CHECK(expr): the fail above unless `expr` succeeded.
inline void check_cuda(cudaError_t err, const char* expr, const char* file, int line) {
  if (err != cudaSuccess) cuda_fail(err, expr, file, line);
}
inline void check_cublas(cublasStatus_t status, const char* expr, const char* file, int line) {
  if (status != CUBLAS_STATUS_SUCCESS) cublas_fail(status, expr, file, line);
}

// cuBLAS, loaded on first use with dlopen (libcublas.so.<major> of the toolkit qtool was built
// with), so that commands which never touch a GPU do not map its half a gigabyte of libraries at
// start-up. Throws Error(Unsupported) naming the library and dlerror() when it cannot be loaded.
struct CublasApi {
  decltype(&::cublasCreate_v2) create;
  decltype(&::cublasDestroy_v2) destroy;
  decltype(&::cublasSetStream_v2) set_stream;
  decltype(&::cublasGetStream_v2) get_stream;
  decltype(&::cublasSetPointerMode_v2) set_pointer_mode;
  decltype(&::cublasSetWorkspace_v2) set_workspace;
  cublasStatus_t (*gemm_ex)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int, const void*,
                            const void*, cudaDataType, int, const void*, cudaDataType, int, const void*,
                            void*, cudaDataType, int, cublasComputeType_t, cublasGemmAlgo_t);
};
const CublasApi& cublas();

// Loading a library of the CUDA toolkit at run time (cuBLAS above, cuDNN in attention_cudnn.cpp).
// The places to look for `soname`, in the caller's order: kLoaderSearch (the bare name: the
// dynamic loader's own search, LD_LIBRARY_PATH, the cache, the binary's run path),
// kBuildToolkitDir (the library folder of the toolkit qtool was built with; left out when the build
// does not know it) or a folder.
inline constexpr std::string_view kLoaderSearch = "";
inline constexpr std::string_view kBuildToolkitDir = "<the build's toolkit>";
std::vector<std::string> library_candidates(const std::string& soname,
                                            std::initializer_list<std::string_view> places);
// The first of `candidates` that dlopen loads (RTLD_NOW | RTLD_LOCAL); the library stays loaded for
// the process's life.
struct LoadedLibrary {
  void* handle = nullptr;   // null: none loaded
  std::string name;         // the candidate loaded
  std::string first_error;  // when none loaded: the first candidate's dlerror() ("not found")
};
LoadedLibrary open_first_library(const std::vector<std::string>& candidates);
// `fn` set to the symbol `name` of `library` (null when it has none); whether it has it.
void* library_symbol(void* library, const char* name);
template <class Fn>
bool resolve_symbol(void* library, const char* name, Fn& fn) {
  fn = reinterpret_cast<Fn>(library_symbol(library, name));
  return fn != nullptr;
}

// A toolkit library every symbol of which the caller needs (cuBLAS, cuBLASLt), loaded from the
// loader's search, the build's toolkit or /usr/local/cuda: Error(Unsupported) naming `what` and the
// first dlerror() when none loads, and naming the symbol when require() does not find it.
class ToolkitLibrary {
 public:
  ToolkitLibrary(std::string soname, const char* what);
  template <class Fn>
  void require(Fn& fn, const char* name) const {
    if (!resolve_symbol(handle_, name, fn)) missing(name);
  }

 private:
  [[noreturn]] void missing(const char* name) const;
  std::string soname_;
  const char* what_;
  void* handle_;
};

// The number of CUDA devices; 0 when there is no driver or no device (never throws).
int device_count();
// "NVIDIA H100 80GB HBM3 (cc 9.0, 132 SMs, 79.6 GiB)".
std::string describe_device(int device);

}  // namespace qtool::runner::cuda

#define QTOOL_CUDA_CHECK(expr) ::qtool::runner::cuda::check_cuda((expr), #expr, __FILE__, __LINE__)
#define QTOOL_CUBLAS_CHECK(expr) ::qtool::runner::cuda::check_cublas((expr), #expr, __FILE__, __LINE__)

// After a kernel launch: the launch's own error (bad configuration), without synchronising.
#define QTOOL_CUDA_CHECK_LAUNCH() QTOOL_CUDA_CHECK(cudaPeekAtLastError())

namespace qtool::runner::cuda {

// Makes `device` current for its lifetime and restores the previous device afterwards.
class DeviceScope {
 public:
  explicit DeviceScope(int device);
  ~DeviceScope();
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int previous_ = -1;
};

// The handle a wrapper below owns, with the device it was made on: moved (the source left empty),
// never copied, and released once, by Release{}(device, handle), when it is dropped or replaced
// (an empty handle is not released).
template <class Handle, class Release>
class Owned {
 public:
  Owned() = default;
  explicit Owned(int device, Handle handle = {}) noexcept : device_(device), handle_(handle) {}
  ~Owned() { reset(); }
  Owned(Owned&& other) noexcept : device_(other.device_), handle_(std::exchange(other.handle_, Handle{})) {}
  Owned& operator=(Owned&& other) noexcept {
    if (this != &other) {
      reset();
      device_ = other.device_;
      handle_ = std::exchange(other.handle_, Handle{});
    }
    return *this;
  }

  Handle get() const { return handle_; }
  int device() const { return device_; }
  // Releases the handle held and takes `handle` (made on device()).
  void reset(Handle handle = {}) noexcept {
    if (handle_) Release{}(device_, handle_);
    handle_ = handle;
  }

 private:
  int device_ = -1;
  Handle handle_{};
};

// A non-blocking stream (never synchronises with the legacy default stream).
class Stream {
 public:
  Stream() = default;
  explicit Stream(int device, int priority = 0);

  cudaStream_t get() const { return stream_.get(); }
  int device() const { return stream_.device(); }
  explicit operator bool() const { return stream_.get() != nullptr; }
  void synchronize() const;
  // The stream waits (on the device, not the host) until `event`'s latest record has completed.
  void wait(cudaEvent_t event) const;
  void reset() noexcept { stream_.reset(); }

 private:
  struct Destroy {
    void operator()(int device, cudaStream_t stream) const noexcept;
  };
  Owned<cudaStream_t, Destroy> stream_;
};

class Event {
 public:
  enum class Timing : uint8_t { Off, On };
  Event() = default;
  explicit Event(int device, Timing timing = Timing::Off);

  cudaEvent_t get() const { return event_.get(); }
  explicit operator bool() const { return event_.get() != nullptr; }
  void record(cudaStream_t stream) const;
  void synchronize() const;  // host waits for the latest record
  bool query() const;        // true when the latest record has completed
  // Milliseconds from `start` to this event (both timed, both completed).
  float elapsed_ms_since(const Event& start) const;
  void reset() noexcept { event_.reset(); }

 private:
  struct Destroy {
    void operator()(int device, cudaEvent_t event) const noexcept;
  };
  Owned<cudaEvent_t, Destroy> event_;
};

// Memory that `Free` releases: its first byte, its size in bytes (0 once moved from or reset) and
// the device it was made on.
template <class Free>
class Memory {
 public:
  Memory() = default;

  void* data() const { return data_.get(); }
  template <typename T>
  T* as() const {
    return static_cast<T*>(data_.get());
  }
  size_t size() const { return data_.get() ? size_ : 0; }
  int device() const { return data_.device(); }
  void reset() noexcept { data_.reset(); }

 protected:
  Memory(int device, void* data, size_t size) noexcept : data_(device, data), size_(size) {}

 private:
  Owned<void*, Free> data_;
  size_t size_ = 0;
};

struct CudaFree {
  void operator()(int device, void* data) const noexcept;
};
struct CudaFreeHost {
  void operator()(int device, void* data) const noexcept;
};

// Device memory from cudaMalloc on one device.
class DeviceBuffer : public Memory<CudaFree> {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(int device, size_t nbytes);
};

// Page-locked host memory (cudaHostAlloc, portable across devices), so host-to-device copies run
// at full bus speed and asynchronously.
class PinnedBuffer : public Memory<CudaFreeHost> {
 public:
  PinnedBuffer() = default;
  explicit PinnedBuffer(size_t nbytes);

  uint8_t* data() const { return as<uint8_t>(); }
};

// A cuBLAS handle bound to one device, with pointer mode host and (when given) a caller-owned
// workspace, so cuBLAS allocates nothing behind the planner's back.
class CublasHandle {
 public:
  CublasHandle() = default;
  explicit CublasHandle(int device);

  cublasHandle_t get() const { return handle_.get(); }
  int device() const { return handle_.device(); }
  void set_stream(cudaStream_t stream) const;
  void set_workspace(void* workspace, size_t nbytes) const;
  void reset() noexcept { handle_.reset(); }

 private:
  struct Destroy {
    void operator()(int device, cublasHandle_t handle) const noexcept;
  };
  Owned<cublasHandle_t, Destroy> handle_;
};

}  // namespace qtool::runner::cuda
