#include "qtool/runner/profile.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <ctime>
#include <random>
#include <vector>

#include "qtool/formats/error.hpp"
#include "qtool/formats/thread_pool.hpp"
#include "qtool/runner/cpu_kernels.hpp"
#include "qtool/runner/dequant.hpp"
#include "qtool/runner/executor.hpp"

namespace qtool::runner {
namespace {

using Clock = std::chrono::steady_clock;

double median_of(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

template <typename Fn>
double median_seconds(uint32_t repeats, Fn&& fn) {
  fn();  // warm-up
  std::vector<double> t;
  for (uint32_t i = 0; i < repeats; ++i) {
    const auto a = Clock::now();
    fn();
    t.push_back(std::chrono::duration<double>(Clock::now() - a).count());
  }
  return median_of(t);
}

std::string today() {
  const std::time_t now = std::time(nullptr);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%d", std::gmtime(&now));
  return buf;
}

planner::DeviceProfile measure_cpu_profile(const ProfileOptions& o) {
  ThreadPool pool(o.threads);
  planner::DeviceProfile p;
  p.name = "cpu-backend";
  const uint64_t n = std::max<uint64_t>(o.copy_bytes, 1 << 20);
  std::vector<uint8_t> a(n, 1), b(n, 2);
  const double copy_s = median_seconds(o.repeats, [&] { std::memcpy(b.data(), a.data(), n); });
  const double copy_gbps = static_cast<double>(n) / copy_s / 1e9;
  p.h2d_pinned_gbps = copy_gbps;
  p.h2d_pageable_gbps = copy_gbps;
  p.p2p_gbps = copy_gbps;
  p.device_bandwidth_gbps = 2 * copy_gbps;  // bytes read plus bytes written
  p.disk_read_gbps = measure_disk_read_gbps(o.tmp_dir, n, b.data());
  // GEMM: [tokens, 1024] x [1024, 1024] is enough to see the CPU's rate without waiting long.
  const uint64_t t = std::min<uint64_t>(o.gemm_tokens, 64), k = 1024, m = 1024;
  std::vector<uint16_t> x(t * k, 0x3f80), w(m * k, 0x3c00), y(t * m);
  const double gemm_s = median_seconds(std::max<uint32_t>(1, o.repeats / 2), [&] {
    cpu::gemm_bf16(x.data(), k, w.data(), y.data(), t, k, m, pool);
  });
  p.bf16_tflops = 2.0 * static_cast<double>(t * k * m) / gemm_s / 1e12;
  // Not measured here: attention at the GEMM rate, the memory-bound ops at a quarter of memcpy's.
  p.attention_tflops = p.bf16_tflops;
  p.activation_gbps = p.device_bandwidth_gbps / 4;
  // Dequant per scheme on a 1024 x 4096 weight of random (finite) codes.
  const uint64_t rows = 1024, cols = 4096, numel = rows * cols;
  const std::vector<uint8_t> q = random_finite_codes(numel * 4, 1);
  std::vector<float> scales(numel / 64 + rows, 0.01f);
  std::vector<uint16_t> out(numel);
  for (const auto& [key, kind] : kProfiledDequantKinds) {
    const DequantParams dp =
        timing_weight(kind, rows, cols, q.data(), reinterpret_cast<const uint8_t*>(scales.data()));
    const double s = median_seconds(std::max<uint32_t>(1, o.repeats / 2), [&] {
      pool.parallel_for(numel, 1 << 16,
                        [&](size_t b0, size_t e0) { dequantize_to_bf16_cpu(dp, out.data() + b0, b0, e0); });
    });
    p.dequant_gelems_per_s[key] = static_cast<double>(numel) / s / 1e9;
  }
  p.context_bytes = 1;  // no device context on the CPU
  p.cublas_workspace_bytes = 1;
  p.alloc_granularity_bytes = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
  p.host_alloc_granularity_bytes = p.alloc_granularity_bytes;
  p.kernel_launch_us = 1.0;
  p.copy_latency_us = 1.0;
  p.memory_bytes =
      static_cast<uint64_t>(sysconf(_SC_PHYS_PAGES)) * static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
  p.description = "measured by qtool profile on " + today() + " for the CPU backend (" +
                  std::to_string(pool.size()) +
                  " threads): memcpy stands in for host-to-device copies; GEMM and dequant rates are the CPU "
                  "kernels'; attention and the memory-bound ops are estimated (the GEMM rate, a quarter of "
                  "memcpy's)";
  return p;
}

}  // namespace

std::vector<uint8_t> random_finite_codes(size_t bytes, uint64_t seed) {
  std::vector<uint8_t> v(bytes);
  std::mt19937_64 rng(seed);
  for (size_t i = 0; i < bytes; ++i) {
    uint8_t b = static_cast<uint8_t>(rng());
    if (i & 1) b &= 0x3F;
    v[i] = (b & 0x7Cu) == 0x7Cu ? static_cast<uint8_t>(b & ~0x04u) : b;
  }
  return v;
}

double measure_disk_read_gbps(const std::filesystem::path& dir_in, uint64_t bytes, uint8_t* dst) {
  const std::filesystem::path dir = dir_in.empty() ? std::filesystem::temp_directory_path() : dir_in;
  const std::filesystem::path path = dir / ("qtool-profile-" + std::to_string(::getpid()) + ".bin");
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) fail(ErrorKind::Io, "cannot create ", path.string(), " to measure disk reads");
  struct Cleanup {
    int fd;
    std::filesystem::path path;
    ~Cleanup() {
      ::close(fd);
      std::error_code ec;
      std::filesystem::remove(path, ec);
    }
  } cleanup{fd, path};
  std::vector<uint8_t> block(1 << 20);
  std::mt19937_64 rng(7);
  for (auto& v : block) v = static_cast<uint8_t>(rng());
  for (uint64_t done = 0; done < bytes;) {
    const uint64_t n = std::min<uint64_t>(block.size(), bytes - done);
    if (::pwrite(fd, block.data(), n, static_cast<off_t>(done)) != static_cast<ssize_t>(n))
      fail(ErrorKind::Io, "cannot write ", path.string(), " at offset ", done);
    done += n;
  }
  ::fsync(fd);
  std::vector<double> rates;
  for (int rep = 0; rep < 3; ++rep) {
    ::posix_fadvise(fd, 0, static_cast<off_t>(bytes), POSIX_FADV_DONTNEED);
    const auto a = Clock::now();
    for (uint64_t done = 0; done < bytes;) {
      const ssize_t n =
          ::pread(fd, dst + done, std::min<uint64_t>(64ull << 20, bytes - done), static_cast<off_t>(done));
      if (n <= 0) fail(ErrorKind::Io, "cannot read ", path.string(), " at offset ", done);
      done += static_cast<uint64_t>(n);
    }
    rates.push_back(static_cast<double>(bytes) / std::chrono::duration<double>(Clock::now() - a).count() /
                    1e9);
  }
  return median_of(rates);
}

std::optional<std::string> gpu_device_name(int device) {
#if defined(QTOOL_HAVE_CUDA)
  return cuda_device_name(device);
#else
  (void)device;
  return std::nullopt;
#endif
}

planner::DeviceProfile measure_profile(const ProfileOptions& options) {
  if (options.backend == "cpu") return measure_cpu_profile(options);
  if (options.backend != "auto" && options.backend != "cuda")
    fail(ErrorKind::Usage, "backend '", options.backend, "' is not auto, cuda or cpu");
#if defined(QTOOL_HAVE_CUDA)
  if (cuda_backend_available()) return measure_cuda_profile(options);
#endif
  if (options.backend == "cuda")
    fail(ErrorKind::Unsupported, "no CUDA device is present (use --backend cpu)");
  if (options.log) options.log("no CUDA device: profiling the CPU backend");
  return measure_cpu_profile(options);
}

}  // namespace qtool::runner
