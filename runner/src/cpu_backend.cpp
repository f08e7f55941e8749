// The CPU backend: the device interface of the schedule driver (driver.hpp) with host memory
// standing in for device memory, and the CPU ops (cpu_ops.hpp). The driver's copy thread fills a
// ring of K slots per "device" while the calling thread computes.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <utility>

#include "qtool/formats/error.hpp"
#include "qtool/formats/thread_pool.hpp"
#include "qtool/runner/cpu_kernels.hpp"
#include "qtool/runner/cpu_ops.hpp"
#include "qtool/runner/cuda_platform.hpp"
#include "qtool/runner/driver.hpp"
#include "qtool/runner/executor.hpp"
#include "qtool/runner/kernel_math.hpp"
#include "run_support.hpp"

namespace qtool::runner {
namespace {

// 256-byte aligned host memory standing in for one device allocation.
class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  explicit AlignedBuffer(uint64_t nbytes) : size_(nbytes) {
    if (nbytes == 0) return;
    data_ = static_cast<uint8_t*>(
        std::aligned_alloc(kArenaAlign, (nbytes + kArenaAlign - 1) / kArenaAlign * kArenaAlign));
    if (!data_)
      fail(ErrorKind::InvalidInput, "cannot allocate ", nbytes, " bytes of host memory for the CPU backend");
  }
  ~AlignedBuffer() { std::free(data_); }
  AlignedBuffer(AlignedBuffer&& o) noexcept
      : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)) {}
  AlignedBuffer& operator=(AlignedBuffer&& o) noexcept {
    std::swap(data_, o.data_);
    std::swap(size_, o.size_);
    return *this;
  }
  uint8_t* data() const { return data_; }
  uint64_t size() const { return size_; }

 private:
  uint8_t* data_ = nullptr;
  uint64_t size_ = 0;
};

class HostMemory final : public HostBuffer {
 public:
  explicit HostMemory(uint64_t bytes) : buf_(bytes) {}
  uint8_t* data() override { return buf_.data(); }
  uint64_t size() const override { return buf_.size(); }

 private:
  AlignedBuffer buf_;
};

// A "GPU" of the CPU backend: host buffers stand in for its memory; a copy is a memcpy on the
// driver's copy thread, complete when it returns, so the waits have nothing left to order.
class CpuDevice final : public Device {
 public:
  explicit CpuDevice(int index) : index_(index) {}
  uint8_t* allocate(MemoryKind kind, uint64_t bytes) override {
    buffers_.emplace_back(bytes);
    kinds_.push_back(kind);
    note(kind, bytes);
    live_ += bytes;
    peak_live_ = std::max(peak_live_, live_);
    return buffers_.back().data();
  }
  void free(uint8_t* memory) override {
    for (size_t i = 0; i < buffers_.size(); ++i) {
      if (buffers_[i].data() != memory) continue;
      const uint64_t bytes = buffers_[i].size();
      forget_item(kinds_[i], bytes);
      live_ -= bytes;
      buffers_.erase(buffers_.begin() + static_cast<std::ptrdiff_t>(i));
      kinds_.erase(kinds_.begin() + static_cast<std::ptrdiff_t>(i));
      return;
    }
    QTOOL_ASSERT(false && "free of memory this device did not allocate");
  }
  uint64_t held_bytes() override { return live_; }
  void upload(uint8_t* dst, std::span<const uint8_t> host) override {
    std::memcpy(dst, host.data(), host.size());
  }
  void copy_to_slot(uint32_t, uint8_t* slot_memory, std::span<const uint8_t> host, bool) override {
    std::memcpy(slot_memory, host.data(), host.size());
  }
  void wait_copied(uint32_t) override {}
  void release(uint32_t) override {}
  void note(MemoryKind kind, uint64_t bytes) override { note_memory(items_, kind, bytes); }
  void forget_activations() override { forget_activation_items(items_); }
  DeviceMemory memory() const override {
    DeviceMemory m;
    m.device = index_;
    m.items = items_;
    for (const MemoryItem& it : items_) m.allocated_bytes += it.bytes;
    // The most the live buffers held at once, and the activation items the ops noted.
    m.measured_peak_bytes = m.allocated_bytes - live_ + peak_live_;
    m.how =
        "CPU backend: the most bytes the host buffers standing in for device memory held at once, and the "
        "ops' activation peak (Ops::peak_bytes)";
    return m;
  }

 private:
  void forget_item(MemoryKind kind, uint64_t bytes) {
    for (auto it = items_.rbegin(); it != items_.rend(); ++it)
      if (it->kind == kind && it->bytes == bytes) {
        items_.erase(std::next(it).base());
        return;
      }
  }

  int index_;
  std::deque<AlignedBuffer> buffers_;
  std::deque<MemoryKind> kinds_;  // per buffer
  std::vector<MemoryItem> items_;
  uint64_t live_ = 0, peak_live_ = 0;
};

class CpuPlatform final : public Platform {
 public:
  explicit CpuPlatform(ThreadPool& pool) : pool_(pool) {}
  std::string name() const override { return "cpu"; }
  std::string device_names() const override { return "CPU (" + std::to_string(pool_.size()) + " threads)"; }
  std::unique_ptr<Device> open(int index) override { return std::make_unique<CpuDevice>(index); }
  std::unique_ptr<HostBuffer> host_buffer(uint64_t bytes) override {
    return std::make_unique<HostMemory>(bytes);
  }
  Ops& ops(int device, const OpsNeed& need) override {
    PerDevice& d = ops_[device];
    if (!d.ops || d.capacity < need.activation_bytes) {
      d.ops.reset();
      d.ops = make_cpu_ops(pool_, need.activation_bytes);
      d.capacity = need.activation_bytes;
    }
    return *d.ops;
  }
  void release_ops() override { ops_.clear(); }
  void transfer(int, const Mat& src, int, const Mat& dst) override {
    check_transfer(src, dst);
    const auto t0 = std::chrono::steady_clock::now();
    std::memcpy(dst.data, src.data, static_cast<size_t>(src.rows * src.cols) * src.elem_bytes());
    transfer_ms_ += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  }
  double take_transfer_ms() override { return std::exchange(transfer_ms_, 0.0); }

 private:
  struct PerDevice {
    std::unique_ptr<Ops> ops;
    uint64_t capacity = 0;
  };
  ThreadPool& pool_;
  std::map<int, PerDevice> ops_;
  double transfer_ms_ = 0;
};

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(size_t n_threads) : pool_(n_threads), platform_(pool_) {}
  std::string name() const override { return "cpu"; }
  std::string device_names() const override { return platform_.device_names(); }
  RunResult run(const Checkpoint& checkpoint, const Schedule& schedule, const RunOptions& options) override {
    return drive(platform_, checkpoint, schedule, options);
  }
  LayerRun run_layer(const DequantParams& params, uint64_t tokens, uint64_t ldx, uint64_t seed,
                     int device) override;

 private:
  ThreadPool pool_;
  CpuPlatform platform_;
};

// The linear alone, through the same ops as the schedule's linears-only units, with its parts
// copied side by side into aligned memory (mapped tensors may be unaligned), as in an arena.
LayerRun CpuBackend::run_layer(const DequantParams& hp, uint64_t tokens, uint64_t ldx, uint64_t seed,
                               int device) {
  ldx = std::max<uint64_t>(ldx, hp.cols);
  const PartLayout layout = part_layout(hp);
  AlignedBuffer parts(std::max<uint64_t>(layout.total, kArenaAlign));
  for (int p = 0; p < kNumParts; ++p)
    if (layout.source[p])
      std::memcpy(parts.data() + layout.offset[p], layout.source[p], layout.sizes.bytes[p]);
  const DequantParams w = rebase_parts(hp, layout, parts.data());

  Ops& ops = platform_.ops(device, {.activation_bytes = tokens * (ldx + hp.rows) * 2 + 2 * kArenaAlign});
  return run_linear_alone(ops, w, tokens, ldx, seed, &pool_);
}

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(size_t n_threads) {
  return std::make_unique<CpuBackend>(n_threads);
}

PartLayout part_layout(const DequantParams& p) {
  PartLayout l;
  l.sizes = part_sizes(p);
  const uint8_t* const src[kNumParts] = {p.weight, p.scale, p.quant_map, p.nested_absmax, p.nested_quant_map};
  for (int k = 0; k < kNumParts; ++k) {
    l.source[k] = src[k];
    l.offset[k] = l.total;
    if (src[k]) l.total = (l.total + l.sizes.bytes[k] + kArenaAlign - 1) / kArenaAlign * kArenaAlign;
  }
  return l;
}

DequantParams rebase_parts(const DequantParams& params, const PartLayout& l, const uint8_t* base) {
  return with_parts(params,
                    [&](int k) -> const uint8_t* { return l.source[k] ? base + l.offset[k] : nullptr; });
}

PartSizes part_sizes(const DequantParams& p) {
  PartSizes s;
  const uint64_t n = p.numel();
  switch (p.kind) {
    case WeightKind::Bf16:
    case WeightKind::F16: s.bytes[kPartWeight] = 2 * n; break;
    case WeightKind::F32: s.bytes[kPartWeight] = 4 * n; break;
    case WeightKind::Int8:
      s.bytes[kPartWeight] = n;
      s.bytes[kPartScale] = 4 * p.rows;
      break;
    case WeightKind::Fp8E4M3:
    case WeightKind::Fp8E5M2:
      s.bytes[kPartWeight] = n;
      s.bytes[kPartScale] = (p.per_tensor ? 1 : p.rows) * (p.scale_type == ScaleType::F32 ? 4 : 2);
      break;
    case WeightKind::Nf4:
    case WeightKind::Fp4: {
      const uint64_t n_blocks = (n + p.blocksize - 1) / p.blocksize;
      s.bytes[kPartWeight] = (n + 1) / 2;
      s.bytes[kPartScale] = n_blocks * (p.double_quant ? 1 : 4);
      if (p.quant_map) s.bytes[kPartQuantMap] = 16 * 4;
      if (p.double_quant) {
        s.bytes[kPartNestedAbsmax] = (n_blocks + dq::kNestedBlocksize - 1) / dq::kNestedBlocksize * 4;
        if (p.nested_quant_map) s.bytes[kPartNestedQuantMap] = 256 * 4;
      }
      break;
    }
    case WeightKind::Host: host_part_sizes(p, s.bytes); break;
  }
  return s;
}

}  // namespace qtool::runner
