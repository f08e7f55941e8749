// The CUDA platform's memory accounting (cuda_platform.hpp), which runs on the host and is shared
// with the CPU backend's devices: items noted as the driver notes them, and the peak a GPU run
// reports against the plan.
#include <doctest/doctest.h>

#include "qtool/runner/cuda_platform.hpp"

using namespace qtool::runner;

TEST_CASE("note_memory: activation items keep their largest size, allocations add up, zero notes nothing") {
  std::vector<MemoryItem> items;
  note_memory(items, MemoryKind::ResidentArena, 1000);
  note_memory(items, MemoryKind::DeviceSlots, 0);
  note_memory(items, MemoryKind::ResidentArena, 24);  // a second allocation of the same kind
  note_memory(items, MemoryKind::ForwardActivations, 300);
  note_memory(items, MemoryKind::ForwardActivations, 700);  // the next component's, larger
  note_memory(items, MemoryKind::ForwardActivations, 500);  // and a smaller one
  note_memory(items, MemoryKind::ActivationIn, 40);
  note_memory(items, MemoryKind::ActivationIn, 30);
  note_memory(items, MemoryKind::ActivationOut, 20);
  REQUIRE(items.size() == 5);
  CHECK(memory_of(items, MemoryKind::ResidentArena) == 1024);
  CHECK(memory_of(items, MemoryKind::DeviceSlots) == 0);
  CHECK(memory_of(items, MemoryKind::ForwardActivations) == 700);
  CHECK(memory_of(items, MemoryKind::ActivationIn) == 40);
  CHECK(memory_of(items, MemoryKind::ActivationOut) == 20);
}

TEST_CASE("cuda_needed_peak: the sampled peak less the activation block's never-reached tail") {
  std::vector<MemoryItem> items;
  note_memory(items, MemoryKind::ResidentArena, 1 << 20);
  // No activations noted: the whole block is unused.
  CHECK(cuda_needed_peak(items, 10'000'000, 4096) == 10'000'000 - 4096);
  // A forward's peak of 3000 bytes in a block of 4096.
  note_memory(items, MemoryKind::ForwardActivations, 3000);
  CHECK(cuda_needed_peak(items, 10'000'000, 4096) == 10'000'000 - 1096);
  // A linears-only component held more (in + out): that is what the block needed.
  note_memory(items, MemoryKind::ActivationIn, 2000);
  note_memory(items, MemoryKind::ActivationOut, 1500);
  CHECK(cuda_needed_peak(items, 10'000'000, 4096) == 10'000'000 - 596);
  // Held more than the capacity (cannot happen: the stack refuses it) or no block at all: nothing off.
  CHECK(cuda_needed_peak(items, 10'000'000, 3000) == 10'000'000);
  CHECK(cuda_needed_peak(items, 10'000'000, 0) == 10'000'000);
  // Never below zero.
  CHECK(cuda_needed_peak({}, 100, 4096) == 0);
}
