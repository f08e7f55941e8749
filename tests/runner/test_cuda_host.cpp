// The CUDA platform's memory accounting (cuda_platform.hpp), which runs on the host and is shared
// with the CPU backend's devices: items noted as the driver notes them, and the peak a GPU run
// reports against the plan.
#include <doctest/doctest.h>

#include <string>
#include <utility>

#include "qtool/formats/error.hpp"
#include "qtool/runner/activation_stack.hpp"
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

TEST_CASE(
    "ActivationStack (the CPU and CUDA ops' activation memory): names its memory, refuses sizes that wrap") {
  alignas(256) static uint8_t block[1024];
  ActivationStack stack(block, sizeof block, "GPU 3 activation memory");
  const Mat a = stack.alloc(2, 3, qtool::DType::F32);  // 24 bytes, then the next buffer at 256
  CHECK(a.data == block);
  CHECK(stack.held() == 24);
  const Mat b = stack.alloc(1, 1, qtool::DType::BF16);
  CHECK(static_cast<uint8_t*>(b.data) == block + 256);
  CHECK(stack.peak_bytes() == 258);
  for (const auto& [rows, cols] :
       {std::pair<int64_t, int64_t>{int64_t{1} << 40, int64_t{1} << 40}, {int64_t{1} << 62, 4}, {1, 1024}}) {
    CAPTURE(rows);
    try {
      stack.alloc(rows, cols, qtool::DType::F32);
      FAIL("an allocation past the capacity was accepted");
    } catch (const qtool::Error& e) {
      CHECK(e.kind() == qtool::ErrorKind::InvalidInput);
      CHECK(std::string(e.what()).find("GPU 3 activation memory") != std::string::npos);
    }
  }
  CHECK(stack.held() == 258);  // a refused allocation takes nothing
  stack.release(0);
  CHECK(stack.held() == 0);
  CHECK(stack.capacity() == 1024);
}
