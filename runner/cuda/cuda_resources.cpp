#include "qtool/runner/cuda_resources.hpp"

#include <dlfcn.h>

#include <cstdio>
#include <string>
#include <utility>
#include <vector>

#include "qtool/formats/error.hpp"
#include "qtool/formats/size.hpp"

namespace qtool::runner::cuda {
namespace {

int current_device_or_minus_one() {
  int device = -1;
  if (cudaGetDevice(&device) != cudaSuccess) return -1;
  return device;
}

// Releasing must not throw: report and carry on.
void report_release_error(cudaError_t err, const char* what) {
  if (err == cudaSuccess || err == cudaErrorCudartUnloading) return;
  std::fprintf(stderr, "qtool: warning: %s failed: %s\n", what, cudaGetErrorString(err));
}

const char* cublas_status_name(cublasStatus_t status) {
  switch (status) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    case CUBLAS_STATUS_LICENSE_ERROR: return "CUBLAS_STATUS_LICENSE_ERROR";
  }
  return "CUBLAS_STATUS_UNKNOWN";
}

CublasApi load_cublas() {
  const ToolkitLibrary lib("libcublas.so." + std::to_string(CUBLAS_VER_MAJOR), "cuBLAS");
  CublasApi api{};
  lib.require(api.create, "cublasCreate_v2");
  lib.require(api.destroy, "cublasDestroy_v2");
  lib.require(api.set_stream, "cublasSetStream_v2");
  lib.require(api.get_stream, "cublasGetStream_v2");
  lib.require(api.set_pointer_mode, "cublasSetPointerMode_v2");
  lib.require(api.set_workspace, "cublasSetWorkspace_v2");
  lib.require(api.gemm_ex, "cublasGemmEx");
  return api;  // the library stays loaded for the process's life
}

}  // namespace

std::vector<std::string> library_candidates(const std::string& soname,
                                            std::initializer_list<std::string_view> places) {
  std::vector<std::string> candidates;
  for (const std::string_view place : places) {
    if (place == kLoaderSearch) {
      candidates.push_back(soname);
    } else if (place == kBuildToolkitDir) {
#ifdef QTOOL_CUDA_LIBRARY_DIR
      candidates.push_back(std::string(QTOOL_CUDA_LIBRARY_DIR) + "/" + soname);
#endif
    } else {
      candidates.push_back(std::string(place) + "/" + soname);
    }
  }
  return candidates;
}

LoadedLibrary open_first_library(const std::vector<std::string>& candidates) {
  LoadedLibrary lib;
  for (const std::string& name : candidates) {
    lib.handle = ::dlopen(name.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (lib.handle) {
      lib.name = name;
      return lib;
    }
    if (lib.first_error.empty()) {
      const char* e = ::dlerror();
      lib.first_error = e ? e : "not found";
    }
  }
  return lib;
}

void* library_symbol(void* library, const char* name) { return ::dlsym(library, name); }

ToolkitLibrary::ToolkitLibrary(std::string soname, const char* what)
    : soname_(std::move(soname)), what_(what) {
  const LoadedLibrary lib = open_first_library(
      library_candidates(soname_, {kLoaderSearch, kBuildToolkitDir, "/usr/local/cuda/lib64",
                                   "/usr/local/cuda/lib", "/usr/local/cuda/targets/x86_64-linux/lib"}));
  if (!lib.handle)
    fail(ErrorKind::Unsupported, "cannot load ", what_, " (", soname_, "): ", lib.first_error,
         "; install the CUDA toolkit's ", what_, " or add its folder to LD_LIBRARY_PATH");
  handle_ = lib.handle;
}

void ToolkitLibrary::missing(const char* name) const {
  fail(ErrorKind::Unsupported, soname_, " has no symbol ", name, ": is it ", what_, " ", CUBLAS_VER_MAJOR,
       "?");
}

const CublasApi& cublas() {
  static const CublasApi api = load_cublas();  // a failed load is tried again on the next call
  return api;
}

void cuda_fail(cudaError_t err, const char* expr, const char* file, int line) {
  const int device = current_device_or_minus_one();
  (void)cudaGetLastError();  // clear a sticky launch error so the caller can report and go on
  const ErrorKind kind = err == cudaErrorMemoryAllocation ? ErrorKind::InvalidInput : ErrorKind::Internal;
  fail(kind, "CUDA error ", cudaGetErrorName(err), " (", cudaGetErrorString(err), ") in `", expr, "` at ",
       file, ":", line, " on device ", device);
}

void cublas_fail(cublasStatus_t status, const char* expr, const char* file, int line) {
  const int device = current_device_or_minus_one();
  fail(status == CUBLAS_STATUS_ALLOC_FAILED ? ErrorKind::InvalidInput : ErrorKind::Internal, "cuBLAS error ",
       cublas_status_name(status), " in `", expr, "` at ", file, ":", line, " on device ", device);
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

std::string describe_device(int device) {
  cudaDeviceProp prop{};
  QTOOL_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  char buf[96];
  std::snprintf(buf, sizeof(buf), " (cc %d.%d, %d SMs, %.1f GiB)", prop.major, prop.minor,
                prop.multiProcessorCount,
                static_cast<double>(prop.totalGlobalMem) / (1024.0 * 1024.0 * 1024.0));
  return std::string(prop.name) + buf;
}

DeviceScope::DeviceScope(int device) {
  QTOOL_CUDA_CHECK(cudaGetDevice(&previous_));
  if (previous_ != device) QTOOL_CUDA_CHECK(cudaSetDevice(device));
}

DeviceScope::~DeviceScope() {
  int now = -1;
  if (cudaGetDevice(&now) == cudaSuccess && now != previous_ && previous_ >= 0)
    report_release_error(cudaSetDevice(previous_), "cudaSetDevice (restore)");
}

namespace {

// Runs `release` with `device` current and makes the previous device current again (errors
// ignored: it runs in destructors).
template <class F>
void on_device(int device, F&& release) noexcept {
  int prev = -1;
  (void)cudaGetDevice(&prev);
  (void)cudaSetDevice(device);
  release();
  if (prev >= 0) (void)cudaSetDevice(prev);
}

}  // namespace

// --- Stream --------------------------------------------------------------------------------------

Stream::Stream(int device, int priority) : stream_(device) {
  DeviceScope scope(device);
  cudaStream_t stream = nullptr;
  QTOOL_CUDA_CHECK(cudaStreamCreateWithPriority(&stream, cudaStreamNonBlocking, priority));
  stream_.reset(stream);
}

void Stream::Destroy::operator()(int device, cudaStream_t stream) const noexcept {
  on_device(device, [&] { report_release_error(cudaStreamDestroy(stream), "cudaStreamDestroy"); });
}

void Stream::synchronize() const { QTOOL_CUDA_CHECK(cudaStreamSynchronize(get())); }

void Stream::wait(cudaEvent_t event) const { QTOOL_CUDA_CHECK(cudaStreamWaitEvent(get(), event, 0)); }

// --- Event ---------------------------------------------------------------------------------------

Event::Event(int device, Timing timing) : event_(device) {
  DeviceScope scope(device);
  const unsigned flags = timing == Timing::On ? cudaEventDefault : cudaEventDisableTiming;
  cudaEvent_t event = nullptr;
  QTOOL_CUDA_CHECK(cudaEventCreateWithFlags(&event, flags));
  event_.reset(event);
}

void Event::Destroy::operator()(int, cudaEvent_t event) const noexcept {
  report_release_error(cudaEventDestroy(event), "cudaEventDestroy");
}

void Event::record(cudaStream_t stream) const { QTOOL_CUDA_CHECK(cudaEventRecord(get(), stream)); }
void Event::synchronize() const { QTOOL_CUDA_CHECK(cudaEventSynchronize(get())); }

bool Event::query() const {
  const cudaError_t err = cudaEventQuery(get());
  if (err == cudaErrorNotReady) return false;
  QTOOL_CUDA_CHECK(err);
  return true;
}

float Event::elapsed_ms_since(const Event& start) const {
  float ms = 0.0f;
  QTOOL_CUDA_CHECK(cudaEventElapsedTime(&ms, start.get(), get()));
  return ms;
}

// --- DeviceBuffer, PinnedBuffer ------------------------------------------------------------------

namespace {

void* device_malloc(int device, size_t nbytes) {
  if (nbytes == 0) return nullptr;
  DeviceScope scope(device);
  void* data = nullptr;
  const cudaError_t err = cudaMalloc(&data, nbytes);
  if (err == cudaErrorMemoryAllocation) {
    (void)cudaGetLastError();
    size_t free_b = 0, total_b = 0;
    (void)cudaMemGetInfo(&free_b, &total_b);
    fail(ErrorKind::InvalidInput, "GPU ", device, " cannot allocate ", format_size(nbytes), " (", nbytes,
         " bytes): ", format_size(free_b), " of ", format_size(total_b), " free");
  }
  QTOOL_CUDA_CHECK(err);
  return data;
}

void* host_alloc(size_t nbytes) {
  void* data = nullptr;
  if (nbytes) QTOOL_CUDA_CHECK(cudaHostAlloc(&data, nbytes, cudaHostAllocPortable));
  return data;
}

}  // namespace

DeviceBuffer::DeviceBuffer(int device, size_t nbytes)
    : Memory(device, device_malloc(device, nbytes), nbytes) {}

void CudaFree::operator()(int device, void* data) const noexcept {
  on_device(device, [&] { report_release_error(cudaFree(data), "cudaFree"); });
}

PinnedBuffer::PinnedBuffer(size_t nbytes) : Memory(-1, host_alloc(nbytes), nbytes) {}

void CudaFreeHost::operator()(int, void* data) const noexcept {
  report_release_error(cudaFreeHost(data), "cudaFreeHost");
}

// --- CublasHandle --------------------------------------------------------------------------------

CublasHandle::CublasHandle(int device) : handle_(device) {
  DeviceScope scope(device);
  cublasHandle_t handle = nullptr;
  QTOOL_CUBLAS_CHECK(cublas().create(&handle));
  handle_.reset(handle);
  QTOOL_CUBLAS_CHECK(cublas().set_pointer_mode(handle, CUBLAS_POINTER_MODE_HOST));
}

void CublasHandle::Destroy::operator()(int device, cublasHandle_t handle) const noexcept {
  on_device(device, [&] {
    const cublasStatus_t st = cublas().destroy(handle);
    if (st != CUBLAS_STATUS_SUCCESS)
      std::fprintf(stderr, "qtool: warning: cublasDestroy failed: %d\n", static_cast<int>(st));
  });
}

void CublasHandle::set_stream(cudaStream_t stream) const {
  QTOOL_CUBLAS_CHECK(cublas().set_stream(get(), stream));
}

void CublasHandle::set_workspace(void* workspace, size_t nbytes) const {
  QTOOL_CUBLAS_CHECK(cublas().set_workspace(get(), workspace, nbytes));
}

}  // namespace qtool::runner::cuda
