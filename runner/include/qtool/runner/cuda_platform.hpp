// The CUDA backend's device interface for the schedule driver (driver.hpp), and the memory
// accounting both backends' devices share.
//
// Per GPU (cuda/cuda_platform.cpp): a copy stream and a compute stream; the driver's copy thread
// enqueues slot copies on the copy stream (each first waits, on the device, for the event the
// compute stream recorded when the slot's previous group was released) and records a "copied"
// event per slot; wait_copied makes the compute stream wait for it on the device, so the copy of
// group k+1 runs under the compute of group k with no host synchronisation. Host buffers are
// pinned. The ops (cuda_forward_ops.hpp) of each GPU run on its compute stream, their memory
// allocated when first asked for: the activation stack, the dequant scratch and the cuBLAS
// workspace of the plan. A component over several GPUs runs each unit on its own GPU's ops, which
// read only that GPU's arena and slots; its forward's state crosses between units by transfer():
// a cudaMemcpyPeerAsync on the receiving GPU's compute stream, ordered by events both ways (direct
// where the pair has peer access, which is enabled; else the CUDA driver stages it through host
// memory).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "qtool/runner/driver.hpp"
#include "qtool/runner/executor.hpp"

namespace qtool::runner {

// The activation kinds (ForwardActivations, ActivationIn, ActivationOut): the ops' memory, reused
// by one component after another.
inline bool is_activation_kind(MemoryKind kind) {
  return kind == MemoryKind::ForwardActivations || kind == MemoryKind::ActivationIn ||
         kind == MemoryKind::ActivationOut;
}

// Records `bytes` of `kind` in `items`. The activation kinds keep one item, their largest size;
// any other kind adds an item per allocation. Zero bytes record nothing.
inline void note_memory(std::vector<MemoryItem>& items, MemoryKind kind, uint64_t bytes) {
  if (bytes == 0) return;
  if (is_activation_kind(kind))
    for (MemoryItem& it : items)
      if (it.kind == kind) {
        it.bytes = it.bytes > bytes ? it.bytes : bytes;
        return;
      }
  items.push_back({kind, bytes});
}

// Drops the activation kinds' items (Device::forget_activations).
inline void forget_activation_items(std::vector<MemoryItem>& items) {
  std::erase_if(items, [](const MemoryItem& it) { return is_activation_kind(it.kind); });
}

// The bytes of `kind` in `items`.
inline uint64_t memory_of(const std::vector<MemoryItem>& items, MemoryKind kind) {
  uint64_t b = 0;
  for (const MemoryItem& it : items)
    if (it.kind == kind) b += it.bytes;
  return b;
}

// The peak a GPU's run needed: `peak_used` (the most of cudaMemGetInfo's total - free sampled, the
// context, cuBLAS, module images and allocator rounding included) less the part of the activation
// block the run never reached. The block holds `activation_capacity` bytes (the driver asks a
// quarter more than the plan's items); what the run held at most is its largest activation item
// (a forward's peak, or a linears-only component's input and output).
inline uint64_t cuda_needed_peak(const std::vector<MemoryItem>& items, uint64_t peak_used,
                                 uint64_t activation_capacity) {
  const uint64_t forward = memory_of(items, MemoryKind::ForwardActivations);
  const uint64_t linear =
      memory_of(items, MemoryKind::ActivationIn) + memory_of(items, MemoryKind::ActivationOut);
  const uint64_t held = forward > linear ? forward : linear;
  const uint64_t unused = activation_capacity > held ? activation_capacity - held : 0;
  return peak_used > unused ? peak_used - unused : 0;
}

struct CudaPlatformConfig {
  std::string device_names;                       // Platform::device_names
  uint64_t cublas_workspace_bytes = 32ull << 20;  // per GPU (the plan's cublas_workspace)
};

#ifdef QTOOL_HAVE_CUDA
// The platform of one run (or of several: its ops and streams are reused). Throws
// Error(InvalidInput) from open() for a GPU index that is not present.
std::unique_ptr<Platform> make_cuda_platform(const CudaPlatformConfig& config);
#endif

}  // namespace qtool::runner
