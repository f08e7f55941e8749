// The CUDA platform of the schedule driver (cuda_platform.hpp): pinned host buffers, per GPU a
// copy and a compute stream, slot copies ordered by events, the ops on the compute stream, and
// the memory each GPU held.
#include "qtool/runner/cuda_platform.hpp"

#include <algorithm>
#include <atomic>
#include <deque>
#include <mutex>

#include "qtool/formats/error.hpp"
#include "qtool/runner/cuda_forward_ops.hpp"
#include "qtool/runner/cuda_resources.hpp"

namespace qtool::runner {
namespace {

using cuda::DeviceBuffer;
using cuda::DeviceScope;
using cuda::Event;
using cuda::Stream;

uint64_t used_bytes(int device) {
  DeviceScope scope(device);
  size_t free_b = 0, total_b = 0;
  QTOOL_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
  return static_cast<uint64_t>(total_b - free_b);
}

class PinnedHost final : public HostBuffer {
 public:
  PinnedHost(uint64_t bytes, std::atomic<uint64_t>& held) : buf_(bytes), held_(held) { held_ += bytes; }
  ~PinnedHost() override { held_ -= buf_.size(); }
  uint8_t* data() override { return buf_.data(); }
  uint64_t size() const override { return buf_.size(); }

 private:
  cuda::PinnedBuffer buf_;
  std::atomic<uint64_t>& held_;
};

// What the platform keeps per GPU across the devices the driver opens on it.
struct Gpu {
  int device = 0;
  uint64_t baseline = 0;  // used bytes once the context existed, before any allocation
  Stream copy;
  Stream compute;
  std::unique_ptr<Ops> ops;
  uint64_t activation_capacity = 0, scratch_capacity = 0;
  std::vector<MemoryItem> ops_items;  // the ops' dequant scratch and cuBLAS workspace
};

class CudaPlatform;

// The events of one slot of a GPU's ring.
struct SlotEvents {
  Event copied;                       // on the slot's GPU: its last copy is complete
  std::map<int, Event> freed;         // per compute GPU: the slot's last reader is done
  const Event* last_freed = nullptr;  // the latest of `freed` recorded (null: never used)
};

class CudaDevice final : public Device {
 public:
  CudaDevice(CudaPlatform& platform, Gpu& gpu) : platform_(platform), gpu_(gpu) {}
  ~CudaDevice() override {
    DeviceScope scope(gpu_.device);
    (void)cudaDeviceSynchronize();  // nothing may still read the memory freed below
  }

  uint8_t* allocate(MemoryKind kind, uint64_t bytes) override {
    buffers_.emplace_back(gpu_.device, bytes);
    kinds_.push_back(kind);
    note(kind, bytes);
    return buffers_.back().as<uint8_t>();
  }
  void free(uint8_t* memory) override;
  uint64_t held_bytes() override;
  void upload(uint8_t* dst, std::span<const uint8_t> host) override {
    DeviceScope scope(gpu_.device);
    QTOOL_CUDA_CHECK(cudaMemcpy(dst, host.data(), host.size(), cudaMemcpyHostToDevice));
  }
  void copy_to_slot(uint32_t slot, uint8_t* slot_memory, std::span<const uint8_t> host, bool wait) override {
    DeviceScope scope(gpu_.device);
    SlotEvents& e = events(slot);
    if (e.last_freed) gpu_.copy.wait(e.last_freed->get());
    QTOOL_CUDA_CHECK(
        cudaMemcpyAsync(slot_memory, host.data(), host.size(), cudaMemcpyHostToDevice, gpu_.copy.get()));
    e.copied.record(gpu_.copy.get());
    if (wait) e.copied.synchronize();
  }
  void wait_copied(uint32_t slot) override;
  void release(uint32_t slot) override;
  void note(MemoryKind kind, uint64_t bytes) override { note_memory(items_, kind, bytes); }
  void forget_activations() override { forget_activation_items(items_); }
  DeviceMemory memory() const override;
  void synchronize() override {
    DeviceScope scope(gpu_.device);
    QTOOL_CUDA_CHECK(cudaDeviceSynchronize());
    peak_ = std::max(peak_, used_bytes(gpu_.device));
  }

 private:
  SlotEvents& events(uint32_t slot) {
    std::lock_guard<std::mutex> lock(mu_);  // the copy thread and the compute thread both look up
    while (slots_.size() <= slot) {
      slots_.emplace_back();
      slots_.back().copied = Event(gpu_.device);
    }
    return slots_[slot];
  }

  CudaPlatform& platform_;
  Gpu& gpu_;
  std::deque<DeviceBuffer> buffers_;
  std::deque<MemoryKind> kinds_;  // per buffer
  std::vector<MemoryItem> items_;
  std::mutex mu_;
  std::deque<SlotEvents> slots_;  // a deque: references stay valid as it grows
  mutable uint64_t peak_ = 0;
};

class CudaPlatform final : public Platform {
 public:
  explicit CudaPlatform(CudaPlatformConfig config) : config_(std::move(config)) {}
  std::string name() const override { return "cuda"; }
  std::string device_names() const override { return config_.device_names; }
  std::unique_ptr<Device> open(int index) override {
    Gpu& g = gpu(index);
    return std::make_unique<CudaDevice>(*this, g);
  }
  std::unique_ptr<HostBuffer> host_buffer(uint64_t bytes) override {
    return std::make_unique<PinnedHost>(bytes, pinned_);
  }
  Ops& ops(int device, const OpsNeed& need) override {
    Gpu& g = gpu(device);
    if (!g.ops || g.activation_capacity < need.activation_bytes ||
        g.scratch_capacity < need.dequant_scratch_bytes) {
      g.ops.reset();  // the old block is freed before the new one is taken
      CudaOpsConfig c;
      c.activation_bytes = need.activation_bytes;
      c.dequant_scratch_bytes = need.dequant_scratch_bytes;
      c.cublas_workspace_bytes = config_.cublas_workspace_bytes;
      g.ops = make_cuda_ops(device, g.compute.get(), c);
      g.activation_capacity = need.activation_bytes;
      g.scratch_capacity = need.dequant_scratch_bytes;
      g.ops_items.clear();
      note_memory(g.ops_items, MemoryKind::DequantScratch, c.dequant_scratch_bytes);
      note_memory(g.ops_items, MemoryKind::CublasWorkspace, c.cublas_workspace_bytes);
    }
    active_ = &g;
    return *g.ops;
  }
  void release_ops() override {
    for (auto& [d, g] : gpus_) {
      DeviceScope scope(d);
      g->compute.synchronize();  // nothing may still use the ops' memory
      g->ops.reset();
      g->activation_capacity = 0;
      g->scratch_capacity = 0;
      g->ops_items.clear();
    }
  }

  // The compute stream of the ops the driver asked for last (the component running now).
  Gpu& active() const {
    QTOOL_ASSERT_MSG(active_ != nullptr, "a slot was waited for or released before any ops were asked for");
    return *active_;
  }
  uint64_t pinned_bytes() const { return pinned_; }

  void transfer(int src_device, const Mat& src, int dst_device, const Mat& dst) override {
    check_transfer(src, dst);
    QTOOL_ASSERT(src_device != dst_device);
    Gpu& s = gpu(src_device);
    Gpu& d = gpu(dst_device);
    const size_t bytes = static_cast<size_t>(src.rows * src.cols) * src.elem_bytes();
    Transfer& t = transfers_.emplace_back();
    t.ready = Event(src_device);
    t.start = Event(dst_device, Event::Timing::On);
    t.stop = Event(dst_device, Event::Timing::On);
    {
      DeviceScope scope(src_device);
      t.ready.record(s.compute.get());
    }
    {
      DeviceScope scope(dst_device);
      d.compute.wait(t.ready.get());
      t.start.record(d.compute.get());
      QTOOL_CUDA_CHECK(
          cudaMemcpyPeerAsync(dst.data, dst_device, src.data, src_device, bytes, d.compute.get()));
      t.stop.record(d.compute.get());
    }
    DeviceScope scope(src_device);
    s.compute.wait(t.stop.get());  // the source's next work may reuse `src`
  }
  double take_transfer_ms() override {
    double ms = 0;
    for (const Transfer& t : transfers_) {
      t.stop.synchronize();
      ms += t.stop.elapsed_ms_since(t.start);
    }
    transfers_.clear();
    return ms;
  }

 private:
  Gpu& gpu(int index) {
    const int n = cuda::device_count();
    if (index < 0 || index >= n)
      fail(ErrorKind::InvalidInput, "the plan uses GPU ", index, " but only ", n, " CUDA device",
           n == 1 ? " is" : "s are", " present");
    auto it = gpus_.find(index);
    if (it != gpus_.end()) return *it->second;
    auto g = std::make_unique<Gpu>();
    g->device = index;
    {
      DeviceScope scope(index);
      QTOOL_CUDA_CHECK(cudaFree(nullptr));  // create the context
      g->baseline = used_bytes(index);
    }
    g->copy = Stream(index);
    g->compute = Stream(index);
    // A forward's state crosses GPUs between units (transfer): directly where the pair has peer
    // access, else staged by the CUDA driver through host memory.
    for (auto& [other, og] : gpus_) enable_peer(index, other);
    return *gpus_.emplace(index, std::move(g)).first->second;
  }
  static void enable_peer(int a, int b) {
    for (auto [src, dst] : {std::pair{a, b}, std::pair{b, a}}) {
      int can = 0;
      QTOOL_CUDA_CHECK(cudaDeviceCanAccessPeer(&can, dst, src));
      if (!can) continue;
      DeviceScope scope(dst);
      const cudaError_t err = cudaDeviceEnablePeerAccess(src, 0);
      if (err == cudaErrorPeerAccessAlreadyEnabled)
        (void)cudaGetLastError();
      else
        QTOOL_CUDA_CHECK(err);
    }
  }

  // A transfer's events: recorded on the source once its work is issued, and around the copy on
  // the destination's stream.
  struct Transfer {
    Event ready, start, stop;
  };

  CudaPlatformConfig config_;
  std::map<int, std::unique_ptr<Gpu>> gpus_;
  std::deque<Transfer> transfers_;
  Gpu* active_ = nullptr;
  std::atomic<uint64_t> pinned_{0};
};

void CudaDevice::wait_copied(uint32_t slot) {
  Gpu& c = platform_.active();
  DeviceScope scope(c.device);
  c.compute.wait(events(slot).copied.get());
}

void CudaDevice::release(uint32_t slot) {
  Gpu& c = platform_.active();
  DeviceScope scope(c.device);
  SlotEvents& e = events(slot);
  auto it = e.freed.find(c.device);
  if (it == e.freed.end()) it = e.freed.emplace(c.device, Event(c.device)).first;
  it->second.record(c.compute.get());
  e.last_freed = &it->second;
}

void CudaDevice::free(uint8_t* memory) {
  for (size_t i = 0; i < buffers_.size(); ++i) {
    if (buffers_[i].as<uint8_t>() != memory) continue;
    DeviceScope scope(gpu_.device);
    QTOOL_CUDA_CHECK(cudaDeviceSynchronize());  // nothing may still read it
    peak_ = std::max(peak_, used_bytes(gpu_.device));
    for (auto it = items_.rbegin(); it != items_.rend(); ++it)
      if (it->kind == kinds_[i] && it->bytes == buffers_[i].size()) {
        items_.erase(std::next(it).base());
        break;
      }
    buffers_.erase(buffers_.begin() + static_cast<std::ptrdiff_t>(i));
    kinds_.erase(kinds_.begin() + static_cast<std::ptrdiff_t>(i));
    return;
  }
  QTOOL_ASSERT(false && "free of memory this device did not allocate");
}

uint64_t CudaDevice::held_bytes() {
  DeviceScope scope(gpu_.device);
  QTOOL_CUDA_CHECK(cudaDeviceSynchronize());
  const uint64_t used = used_bytes(gpu_.device);
  peak_ = std::max(peak_, used);
  std::vector<MemoryItem> items = items_;
  for (const MemoryItem& it : gpu_.ops_items) items.push_back(it);
  return cuda_needed_peak(items, used, gpu_.activation_capacity);
}

DeviceMemory CudaDevice::memory() const {
  peak_ = std::max(peak_, used_bytes(gpu_.device));
  DeviceMemory m;
  m.device = gpu_.device;
  m.items = items_;
  for (const MemoryItem& it : gpu_.ops_items) m.items.push_back(it);
  for (const MemoryItem& it : m.items) m.allocated_bytes += it.bytes;
  m.baseline_bytes = gpu_.baseline;
  m.measured_peak_bytes = cuda_needed_peak(m.items, peak_, gpu_.activation_capacity);
  m.pinned_host_bytes = platform_.pinned_bytes();
  m.how =
      "cudaMemGetInfo (total - free), sampled after each step (the CUDA context, cuBLAS, loaded kernels and "
      "allocator rounding included), less the part of the ops' activation block the run never reached";
  return m;
}

}  // namespace

std::unique_ptr<Platform> make_cuda_platform(const CudaPlatformConfig& config) {
  return std::make_unique<CudaPlatform>(config);
}

}  // namespace qtool::runner
