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
#include <string>
#include <utility>

namespace qtool::runner::cuda {

// Throws qtool::Error(Internal) whose message names the failed statement, the file, the line, the
// current device and CUDA's own description. cudaErrorMemoryAllocation is Error(InvalidInput): a
// budget the machine cannot give is a user's problem, not a bug.
[[noreturn]] void cuda_fail(cudaError_t err, const char* expr, const char* file, int line);
[[noreturn]] void cublas_fail(cublasStatus_t status, const char* expr, const char* file, int line);

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

// The number of CUDA devices; 0 when there is no driver or no device (never throws).
int device_count();
// "NVIDIA H100 80GB HBM3 (cc 9.0, 132 SMs, 79.6 GiB)".
std::string describe_device(int device);

}  // namespace qtool::runner::cuda

#define QTOOL_CUDA_CHECK(expr)                                                      \
  do {                                                                              \
    const cudaError_t qtool_cuda_err_ = (expr);                                     \
    if (qtool_cuda_err_ != cudaSuccess)                                             \
      ::qtool::runner::cuda::cuda_fail(qtool_cuda_err_, #expr, __FILE__, __LINE__); \
  } while (0)

#define QTOOL_CUBLAS_CHECK(expr)                                                       \
  do {                                                                                 \
    const cublasStatus_t qtool_cublas_st_ = (expr);                                    \
    if (qtool_cublas_st_ != CUBLAS_STATUS_SUCCESS)                                     \
      ::qtool::runner::cuda::cublas_fail(qtool_cublas_st_, #expr, __FILE__, __LINE__); \
  } while (0)

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

// A non-blocking stream (never synchronises with the legacy default stream).
class Stream {
 public:
  Stream() = default;
  explicit Stream(int device, int priority = 0);
  ~Stream() { reset(); }
  Stream(Stream&& other) noexcept : device_(other.device_), stream_(std::exchange(other.stream_, nullptr)) {}
  Stream& operator=(Stream&& other) noexcept;
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;

  cudaStream_t get() const { return stream_; }
  int device() const { return device_; }
  explicit operator bool() const { return stream_ != nullptr; }
  void synchronize() const;
  // The stream waits (on the device, not the host) until `event`'s latest record has completed.
  void wait(cudaEvent_t event) const;
  void reset() noexcept;

 private:
  int device_ = -1;
  cudaStream_t stream_ = nullptr;
};

class Event {
 public:
  enum class Timing : uint8_t { Off, On };
  Event() = default;
  explicit Event(int device, Timing timing = Timing::Off);
  ~Event() { reset(); }
  Event(Event&& other) noexcept : device_(other.device_), event_(std::exchange(other.event_, nullptr)) {}
  Event& operator=(Event&& other) noexcept;
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;

  cudaEvent_t get() const { return event_; }
  explicit operator bool() const { return event_ != nullptr; }
  void record(cudaStream_t stream) const;
  void synchronize() const;  // host waits for the latest record
  bool query() const;        // true when the latest record has completed
  // Milliseconds from `start` to this event (both timed, both completed).
  float elapsed_ms_since(const Event& start) const;
  void reset() noexcept;

 private:
  int device_ = -1;
  cudaEvent_t event_ = nullptr;
};

// Device memory from cudaMalloc on one device.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(int device, size_t nbytes);
  ~DeviceBuffer() { reset(); }
  DeviceBuffer(DeviceBuffer&& other) noexcept
      : device_(other.device_),
        data_(std::exchange(other.data_, nullptr)),
        size_(std::exchange(other.size_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  void* data() const { return data_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(data_);
  }
  size_t size() const { return size_; }
  int device() const { return device_; }
  void reset() noexcept;

 private:
  int device_ = -1;
  void* data_ = nullptr;
  size_t size_ = 0;
};

// Page-locked host memory (cudaHostAlloc, portable across devices), so host-to-device copies run
// at full bus speed and asynchronously.
class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  explicit PinnedBuffer(size_t nbytes);
  ~PinnedBuffer() { reset(); }
  PinnedBuffer(PinnedBuffer&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)), size_(std::exchange(other.size_, 0)) {}
  PinnedBuffer& operator=(PinnedBuffer&& other) noexcept;
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;

  uint8_t* data() const { return static_cast<uint8_t*>(data_); }
  size_t size() const { return size_; }
  void reset() noexcept;

 private:
  void* data_ = nullptr;
  size_t size_ = 0;
};

// A cuBLAS handle bound to one device, with pointer mode host and (when given) a caller-owned
// workspace, so cuBLAS allocates nothing behind the planner's back.
class CublasHandle {
 public:
  CublasHandle() = default;
  explicit CublasHandle(int device);
  ~CublasHandle() { reset(); }
  CublasHandle(CublasHandle&& other) noexcept
      : device_(other.device_), handle_(std::exchange(other.handle_, nullptr)) {}
  CublasHandle& operator=(CublasHandle&& other) noexcept;
  CublasHandle(const CublasHandle&) = delete;
  CublasHandle& operator=(const CublasHandle&) = delete;

  cublasHandle_t get() const { return handle_; }
  int device() const { return device_; }
  void set_stream(cudaStream_t stream) const;
  void set_workspace(void* workspace, size_t nbytes) const;
  void reset() noexcept;

 private:
  int device_ = -1;
  cublasHandle_t handle_ = nullptr;
};

}  // namespace qtool::runner::cuda
