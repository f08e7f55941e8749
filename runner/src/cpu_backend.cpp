// The CPU backend: the CUDA backend's schedule with host memory standing in for device memory.
// A copy thread fills a ring of K slots per "device" in execution order (from the host arena of a
// cpu group, or from the checkpoint files through a staging buffer for a disk group) while the
// calling thread computes; slot reuse and readiness are ordered by counters under one mutex, as
// the CUDA backend orders them by events.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <thread>
#include <unordered_map>

#include "qtool/formats/error.hpp"
#include "qtool/formats/thread_pool.hpp"
#include "qtool/runner/cpu_kernels.hpp"
#include "qtool/runner/executor.hpp"
#include "qtool/runner/kernel_math.hpp"
#include "run_support.hpp"

namespace qtool::runner {
namespace {

using Clock = std::chrono::steady_clock;

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

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(size_t n_threads) : pool_(n_threads) {}
  std::string name() const override { return "cpu"; }
  std::string device_names() const override { return "CPU (" + std::to_string(pool_.size()) + " threads)"; }
  RunResult run(const Checkpoint& checkpoint, const Schedule& schedule, const RunOptions& options) override;
  LayerRun run_layer(const DequantParams& params, uint64_t tokens, uint64_t ldx, uint64_t seed,
                     int device) override;

 private:
  void dequantize(const DequantParams& p, uint16_t* out) {
    pool_.parallel_for(p.numel(), 1 << 16,
                       [&](size_t b, size_t e) { dequantize_to_bf16_cpu(p, out + b, b, e); });
  }
  ThreadPool pool_;
};

// Per "device": the buffers the CUDA backend holds on that GPU.
struct DeviceState {
  std::vector<AlignedBuffer> slots;
  AlignedBuffer activation_in;  // [tokens, max_in] bf16
  uint64_t max_in = 0;
  AlignedBuffer activation_out;  // [tokens, max_out] bf16
  AlignedBuffer scratch;         // [max_scratch] bf16
  std::vector<MemoryItem> items;
  uint64_t allocated = 0;
  uint32_t activation_step = UINT32_MAX;  // the run step whose hidden state is here

  void add(const std::string& item, uint64_t bytes) {
    if (bytes == 0) return;
    items.push_back({item, bytes});
    allocated += bytes;
  }
};

RunResult CpuBackend::run(const Checkpoint& checkpoint, const Schedule& schedule, const RunOptions& options) {
  RunResult result;
  result.backend = name();
  result.device_names = device_names();
  result.mode = options.mode;
  const uint64_t tokens = options.tokens;
  const uint64_t n_slots = std::max<uint64_t>(1, schedule.n_slots);
  const bool planned = options.mode == Mode::Planned;
  const auto is_streamed = [&](const ExecStep& st) { return planned && st.streamed; };

  std::map<int, DeviceState> devs;
  for (int d : schedule.devices) devs[d];

  // Arenas held on a "device": the resident ones, and in AllResident mode every group's too.
  std::vector<AlignedBuffer> on_device(schedule.arenas.size());
  std::vector<AlignedBuffer> host_arena(schedule.arenas.size());  // pinned host arenas of cpu groups
  for (size_t ai = 0; ai < schedule.arenas.size(); ++ai) {
    const Arena& a = schedule.arenas[ai];
    bool used = !a.streamed();
    for (const ExecStep& st : schedule.steps) used = used || st.arena == ai;
    if (!used) continue;
    if (!a.streamed() || !planned) {
      on_device[ai] = AlignedBuffer(a.bytes);
      fill_arena(checkpoint, a, on_device[ai].data());
      devs.at(a.device).add(a.streamed() ? "streamed groups held resident" : "resident_arena", a.bytes);
    } else if (a.placement == Placement::Cpu) {
      host_arena[ai] = AlignedBuffer(a.bytes);
      fill_arena(checkpoint, a, host_arena[ai].data());
    }
  }
  std::vector<AlignedBuffer> staging;
  const uint64_t staging_bytes = planned ? schedule.max_staging_bytes() : 0;
  for (uint64_t i = 0; staging_bytes && i < std::max<uint64_t>(1, options.sizing.staging_buffers); ++i)
    staging.emplace_back(staging_bytes);
  const ShardFiles files(checkpoint);

  for (auto& [d, st] : devs) {
    const uint64_t slot_bytes = planned ? schedule.slot_bytes(d) : 0;
    if (slot_bytes) {
      for (uint64_t k = 0; k < n_slots; ++k) st.slots.emplace_back(slot_bytes);
      st.add("device_slots", n_slots * slot_bytes);
    }
    st.max_in = schedule.max_in(d);
    st.activation_in = AlignedBuffer(tokens * st.max_in * 2);
    st.add("activation_in", st.activation_in.size());
    st.activation_out = AlignedBuffer(tokens * schedule.max_out(d) * 2);
    st.add("activation_out", st.activation_out.size());
    st.scratch = AlignedBuffer(schedule.max_scratch_elems(d) * 2);
    st.add("dequant_scratch", st.scratch.size());
  }

  // The streamed steps in order, each with its device-local sequence number (slot = seq % K).
  std::vector<size_t> order;
  std::vector<uint64_t> seq_of(schedule.steps.size(), 0);
  std::map<int, uint64_t> per_device;
  for (size_t si = 0; si < schedule.steps.size(); ++si) {
    if (!is_streamed(schedule.steps[si])) continue;
    order.push_back(si);
    seq_of[si] = per_device[schedule.steps[si].device]++;
    result.h2d_bytes_per_step += schedule.arenas[schedule.steps[si].arena].bytes;
  }

  const auto t_origin = Clock::now();
  std::mutex trace_mu;
  const auto add_trace = [&](std::string nm, std::string lane, uint32_t step, int32_t plan_step,
                             Clock::time_point a, Clock::time_point b, uint64_t bytes) {
    if (!options.trace) return;
    std::lock_guard<std::mutex> lock(trace_mu);
    result.trace.push_back({std::move(nm), std::move(lane), step, plan_step,
                            std::chrono::duration<double, std::micro>(a - t_origin).count(),
                            std::chrono::duration<double, std::micro>(b - a).count(), bytes});
  };

  result.digests.assign(options.steps, std::vector<LayerDigest>(schedule.linears.size()));
  for (uint32_t step = 0; step < options.steps; ++step) {
    const uint64_t stream_seed = kmath::activation_stream(options.seed + step);
    const auto t_step = Clock::now();
    // The slot ring: copies done, and per device the slot uses released by compute.
    std::mutex mu;
    std::condition_variable cv;
    size_t copies_done = 0;
    std::map<int, uint64_t> released;
    for (auto& [d, st] : devs) released[d] = 0;
    std::exception_ptr copy_error;
    bool abort = false;

    std::thread copier([&] {
      try {
        size_t staging_next = 0;
        for (size_t k = 0; k < order.size(); ++k) {
          const size_t si = order[k];
          const ExecStep& st = schedule.steps[si];
          const Arena& a = schedule.arenas[st.arena];
          const uint64_t seq = seq_of[si];
          {
            std::unique_lock<std::mutex> lock(mu);
            cv.wait(lock, [&] { return abort || released[st.device] + n_slots > seq; });
            if (abort) return;
          }
          uint8_t* slot = devs.at(st.device).slots[seq % n_slots].data();
          std::span<uint8_t> host;
          if (a.placement == Placement::Disk) {
            AlignedBuffer& stage = staging[staging_next++ % staging.size()];
            const auto t0 = Clock::now();
            files.read_group(checkpoint, a, stage.data());
            add_trace(st.name, "disk read", step, static_cast<int32_t>(si), t0, Clock::now(),
                      a.payload_bytes);
            host = {stage.data(), a.bytes};
          } else {
            host = {host_arena[st.arena].data(), a.bytes};
          }
          const auto t0 = Clock::now();
          std::memcpy(slot, host.data(), a.bytes);
          add_trace(st.name, "gpu" + std::to_string(st.device) + " copy", step, static_cast<int32_t>(si), t0,
                    Clock::now(), a.bytes);
          if (options.after_copy) options.after_copy(si, host);
          {
            std::lock_guard<std::mutex> lock(mu);
            copies_done = k + 1;
          }
          cv.notify_all();
        }
      } catch (...) {
        std::lock_guard<std::mutex> lock(mu);
        copy_error = std::current_exception();
        abort = true;
        cv.notify_all();
      }
    });

    try {
      int act_device = -1;
      size_t k = 0;
      for (size_t si = 0; si < schedule.steps.size(); ++si) {
        const ExecStep& x = schedule.steps[si];
        DeviceState& st = devs.at(x.device);
        const std::string compute_lane = "gpu" + std::to_string(x.device) + " compute";
        // The hidden state: made on the first step's device, copied along when the device changes.
        if (st.activation_step != step) {
          const auto t0 = Clock::now();
          auto* h = reinterpret_cast<uint16_t*>(st.activation_in.data());
          if (act_device < 0) {
            cpu::generate_activation(stream_seed, tokens, st.max_in, 0, st.max_in, h, pool_);
            add_trace("activations", compute_lane, step, -1, t0, Clock::now(), 0);
          } else {
            const DeviceState& src = devs.at(act_device);
            const uint64_t cols = std::min(src.max_in, st.max_in);
            const auto* hs = reinterpret_cast<const uint16_t*>(src.activation_in.data());
            for (uint64_t t = 0; t < tokens; ++t)
              std::memcpy(h + t * st.max_in, hs + t * src.max_in, cols * 2);
            if (st.max_in > cols)
              cpu::generate_activation(stream_seed, tokens, st.max_in, cols, st.max_in, h, pool_);
            if (step == 0) result.peer_bytes_per_step += tokens * cols * 2;
            add_trace("peer copy", compute_lane, step, -1, t0, Clock::now(), tokens * cols * 2);
          }
          st.activation_step = step;
        }
        act_device = x.device;

        const uint8_t* base = nullptr;
        const bool streamed = is_streamed(x);
        if (streamed) {
          std::unique_lock<std::mutex> lock(mu);
          cv.wait(lock, [&] { return abort || copies_done > k; });
          if (abort) break;
          base = st.slots[seq_of[si] % n_slots].data();
        } else {
          base = on_device[x.arena].data();
        }
        const auto t0 = Clock::now();
        for (uint32_t li : x.linears) {
          const LinearTask& l = schedule.linears[li];
          const DequantParams p = schedule.bind(l, base);
          const uint16_t* w = reinterpret_cast<const uint16_t*>(p.weight);
          if (l.needs_scratch()) {
            dequantize(p, reinterpret_cast<uint16_t*>(st.scratch.data()));
            w = reinterpret_cast<const uint16_t*>(st.scratch.data());
          }
          auto* y = reinterpret_cast<uint16_t*>(st.activation_out.data());
          const auto* h = reinterpret_cast<const uint16_t*>(st.activation_in.data());
          cpu::gemm_bf16(h, st.max_in, w, y, tokens, l.in(), l.out(), pool_);
          if (options.digests) {
            const cpu::Digest dg = cpu::digest(y, tokens * l.out());
            result.digests[step][li] = {dg.hash, dg.nonfinite};
          }
        }
        add_trace(x.name, compute_lane, step, static_cast<int32_t>(si), t0, Clock::now(), 0);
        if (streamed) {
          {
            std::lock_guard<std::mutex> lock(mu);
            released[x.device] = seq_of[si] + 1;
          }
          cv.notify_all();
          ++k;
        }
      }
    } catch (...) {
      {
        std::lock_guard<std::mutex> lock(mu);
        abort = true;
      }
      cv.notify_all();
      copier.join();
      throw;
    }
    copier.join();
    if (copy_error) std::rethrow_exception(copy_error);
    result.step_ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t_step).count());
  }

  for (auto& [d, st] : devs) {
    DeviceMemory m;
    m.device = d;
    m.items = st.items;
    m.allocated_bytes = st.allocated;
    m.measured_peak_bytes = st.allocated;
    m.how = "CPU backend: bytes of the host buffers standing in for device memory";
    result.memory.push_back(std::move(m));
  }
  return result;
}

LayerRun CpuBackend::run_layer(const DequantParams& p, uint64_t tokens, uint64_t ldx, uint64_t seed, int) {
  LayerRun r;
  ldx = std::max<uint64_t>(ldx, p.cols);
  std::vector<uint16_t> x(tokens * ldx);
  cpu::generate_activation(kmath::activation_stream(seed), tokens, ldx, 0, p.cols, x.data(), pool_);
  std::vector<uint16_t> w(p.numel());
  if (p.kind == WeightKind::Bf16)
    std::memcpy(w.data(), p.weight, p.numel() * 2);  // mapped bytes: maybe unaligned
  else
    dequantize(p, w.data());
  r.y.assign(tokens * p.rows, 0);
  cpu::gemm_bf16(x.data(), ldx, w.data(), r.y.data(), tokens, p.cols, p.rows, pool_);
  const cpu::Digest dg = cpu::digest(r.y.data(), r.y.size());
  r.digest = {dg.hash, dg.nonfinite};
  return r;
}

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(size_t n_threads) {
  return std::make_unique<CpuBackend>(n_threads);
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
  }
  return s;
}

}  // namespace qtool::runner
