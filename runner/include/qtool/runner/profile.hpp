// `qtool profile`: measures the device profile the planner's cost and reserve models use
// (planner/device_profile.hpp) on the machine it runs on.
//
// CUDA: host-to-device bandwidth from pinned and from pageable memory, peer bandwidth (with two
// GPUs), checkpoint-file reads into pinned memory, device-to-device copy bandwidth (bytes read
// plus bytes written), the bf16 GEMM rate of the runner's own cuBLAS call, the runner's dequant
// kernels per scheme, the memory a context with cuBLAS and the loaded kernels takes, cudaMalloc's
// rounding, and the fixed costs of a launch and of a copy. Every rate is the median of repeats,
// timed with CUDA events after a warm-up.
// CPU: the same quantities for the CPU backend (memcpy stands in for host-to-device copies).
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "qtool/planner/device_profile.hpp"
#include "qtool/runner/dequant.hpp"

namespace qtool::runner {

struct ProfileOptions {
  std::string backend = "auto";        // auto | cuda | cpu
  int device = 0;                      // CUDA: the GPU to measure
  uint64_t copy_bytes = 256ull << 20;  // bytes per bandwidth measurement
  uint64_t gemm_tokens = 4096;         // GEMM rate at [tokens, 4096] x [4096, 4096]
  uint32_t repeats = 7;
  std::filesystem::path tmp_dir;  // for the disk-read file (default: the system's temp dir)
  size_t threads = 0;             // CPU backend
  std::function<void(std::string_view)> log;
};

planner::DeviceProfile measure_profile(const ProfileOptions& options);

#if defined(QTOOL_HAVE_CUDA)
planner::DeviceProfile measure_cuda_profile(const ProfileOptions& options);
std::optional<std::string> cuda_device_name(int device);
#endif

// The name CUDA gives GPU `device` (cudaDeviceProp::name, e.g. "NVIDIA H100 80GB HBM3"), or
// nullopt without CUDA support or without that device. Touches CUDA only when called.
std::optional<std::string> gpu_device_name(int device = 0);

// Shared by both: the read rate of a file written to `dir` and dropped from the page cache
// (posix_fadvise DONTNEED after fsync), into `dst` (at least `bytes` long), in GB/s.
double measure_disk_read_gbps(const std::filesystem::path& dir, uint64_t bytes, uint8_t* dst);

// `bytes` random weight bytes for timing the dequant kernels, which every kind reads as finite
// values, as a quantizer writes them: no fp8 NaN or Inf codes (exponent bits all set; real
// weights never have them, and they would send the kernels to their bit-exact, slower NaN path),
// and every odd byte below 0x40, so that f16 and f32 views are finite too.
std::vector<uint8_t> random_finite_codes(size_t bytes, uint64_t seed);

// The weight kinds both profiles time dequantization for, under the key the profile writes.
struct ProfiledKind {
  const char* key;
  WeightKind kind;
};
inline constexpr ProfiledKind kProfiledDequantKinds[] = {
    {"int8", WeightKind::Int8}, {"fp8_e4m3", WeightKind::Fp8E4M3}, {"fp8_e5m2", WeightKind::Fp8E5M2},
    {"nf4", WeightKind::Nf4},   {"fp4", WeightKind::Fp4},          {"f16", WeightKind::F16},
    {"f32", WeightKind::F32}};

// A [rows, cols] weight of `kind` over random codes and per-block scales, for timing.
inline DequantParams timing_weight(WeightKind kind, uint64_t rows, uint64_t cols, const uint8_t* codes,
                                   const uint8_t* scales) {
  return DequantParams{.kind = kind, .rows = rows, .cols = cols, .weight = codes, .scale = scales};
}

}  // namespace qtool::runner
