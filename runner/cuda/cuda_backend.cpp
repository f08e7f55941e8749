// The CUDA backend: executes a Schedule on one or more GPUs, every component linears-only. It keeps
// its own walker until it implements the schedule driver's device interface (driver.hpp: slots,
// copy, wait, ops); the CPU backend already runs through the driver and the real forwards.
//
// Per GPU: a resident arena loaded once; a ring of K device slots (one allocation); a copy stream
// that fills slot (j mod K) with the j-th group streamed to that GPU as soon as the compute of
// group j - K has released it (an event), and a compute stream that waits for the copy's event
// before it dequantizes and multiplies. The host enqueues a whole run without waiting on the GPU;
// the only host waits are a disk group's staging buffer (a reader thread waits for the copy out
// of it before it reads the next group into it) and the test hook `after_copy`.
//
// Disk groups: a reader thread preads each group's tensors from the checkpoint files into a ring
// of pinned staging buffers, in streaming order, ahead of the copies.
//
// Several GPUs: each plan step runs on its GPU; the hidden state follows the steps by peer copies
// (cudaMemcpy2DAsync across devices) ordered by events between the two compute streams.
#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <thread>

#include "../src/run_support.hpp"
#include "qtool/formats/error.hpp"
#include "qtool/formats/size.hpp"
#include "qtool/runner/cuda_ops.hpp"
#include "qtool/runner/cuda_resources.hpp"
#include "qtool/runner/executor.hpp"
#include "qtool/runner/kernel_math.hpp"

namespace qtool::runner {
namespace {

using cuda::DeviceBuffer;
using cuda::DeviceScope;
using cuda::Event;
using cuda::PinnedBuffer;
using cuda::Stream;

uint64_t align256(uint64_t v) { return (v + 255) / 256 * 256; }

uint64_t used_bytes(int device) {
  DeviceScope scope(device);
  size_t free_b = 0, total_b = 0;
  QTOOL_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
  return static_cast<uint64_t>(total_b - free_b);
}

uint64_t free_bytes(int device) {
  DeviceScope scope(device);
  size_t free_b = 0, total_b = 0;
  QTOOL_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
  return static_cast<uint64_t>(free_b);
}

// Timing events handed out in order, reused across runs.
class EventPool {
 public:
  explicit EventPool(int device) : device_(device) {}
  const Event& next() {
    if (used_ == events_.size()) events_.emplace_back(device_, Event::Timing::On);
    return events_[used_++];
  }

 private:
  int device_;
  std::deque<Event> events_;
  size_t used_ = 0;
};

struct GpuState {
  int device = 0;
  Stream copy;
  Stream compute;
  cuda::CublasHandle cublas;
  DeviceBuffer workspace;
  DeviceBuffer resident;  // the resident arena
  DeviceBuffer slots;     // n_slots * slot_bytes
  uint64_t slot_bytes = 0;
  DeviceBuffer activation_in;  // [tokens, max_in] bf16
  uint64_t max_in = 0;
  DeviceBuffer activation_out;  // [tokens, max_out] bf16
  uint16_t* y = nullptr;
  cuda::DeviceTables tables;
  unsigned long long* digests = nullptr;  // [n_linears][2]
  DeviceBuffer scratch;                   // [max_scratch] bf16
  std::vector<Event> slot_free;           // per slot: its last compute is done
  std::vector<Event> copy_done;           // per slot: its last copy is done
  Event h_ready;                          // the hidden state is readable (for a peer copy out of it)
  Event peer_in_done;                     // this GPU's copy of another GPU's hidden state has finished
  std::vector<const Event*> readers;      // peer_in_done of the GPUs that copied this one's hidden state
  Event last_work;                        // end of this GPU's work in the step
  std::unique_ptr<EventPool> timing;
  std::vector<MemoryItem> items;
  uint64_t allocated = 0;
  uint64_t baseline = 0;
  uint32_t activation_step = UINT32_MAX;
  uint64_t enqueued_computes = 0;  // streamed computes enqueued so far

  DeviceBuffer alloc(MemoryKind item, uint64_t bytes) {
    if (bytes == 0) return {};
    items.push_back({item, bytes});
    allocated += bytes;
    return DeviceBuffer(device, bytes);
  }
};

// Scratch buffers for run_layer, per GPU, grown on demand.
struct LayerContext {
  int device = 0;
  Stream stream;
  cuda::CublasHandle cublas;
  DeviceBuffer workspace;
  DeviceBuffer tables_mem;
  cuda::DeviceTables tables;
  DeviceBuffer weight, x, y, scratch, digest;

  void ensure(DeviceBuffer& b, uint64_t bytes) {
    if (b.size() < bytes) {
      b.reset();
      b = DeviceBuffer(device, std::max<uint64_t>(bytes, 256));
    }
  }
};

class CudaBackend final : public Backend {
 public:
  CudaBackend() {
    const int n = cuda::device_count();
    if (n == 0) fail(ErrorKind::Unsupported, "no CUDA device is present (use --backend cpu)");
    for (int d = 0; d < n; ++d) names_ += (d ? "; " : "") + cuda::describe_device(d);
  }
  std::string name() const override { return "cuda"; }
  std::string device_names() const override { return names_; }
  RunResult run(const Checkpoint& checkpoint, const Schedule& schedule, const RunOptions& options) override;
  LayerRun run_layer(const DequantParams& params, uint64_t tokens, uint64_t ldx, uint64_t seed,
                     int device) override;

 private:
  std::string names_;
  std::map<int, std::unique_ptr<LayerContext>> layer_ctx_;
  uint64_t workspace_bytes_ = 32ull << 20;
};

// Reads disk groups into the staging ring ahead of the copies.
class DiskReader {
 public:
  DiskReader(const Checkpoint& checkpoint, const Schedule& schedule, const ShardFiles& files,
             std::vector<size_t> disk_steps, std::vector<PinnedBuffer>& staging, uint32_t n_run_steps)
      : checkpoint_(checkpoint),
        schedule_(schedule),
        files_(files),
        steps_(std::move(disk_steps)),
        staging_(staging),
        free_event_(staging.size(), nullptr),
        total_(steps_.size() * n_run_steps) {
    if (total_ > 0) thread_ = std::thread([this] { loop(); });
  }
  ~DiskReader() { stop(); }

  // The staging buffer holding read `u` once it is there (the u-th disk copy of the run).
  PinnedBuffer& wait_ready(uint64_t u, double* read_us) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return error_ || ready_ > u; });
    if (error_) std::rethrow_exception(error_);
    if (read_us) *read_us = read_us_[u % staging_.size()];
    return staging_[u % staging_.size()];
  }
  // The copy out of read `u` has been enqueued and `done` recorded after it (an event of the GPU
  // whose copy stream moved it).
  void issued(uint64_t u, const Event* done) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      free_event_[u % staging_.size()] = done;
      issued_ = u + 1;
    }
    cv_.notify_all();
  }
  void stop() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    if (thread_.joinable()) thread_.join();
  }

 private:
  void loop() {
    try {
      const uint64_t n_staging = staging_.size();
      for (uint64_t u = 0; u < total_; ++u) {
        const uint64_t b = u % n_staging;
        if (u >= n_staging) {
          std::unique_lock<std::mutex> lock(mu_);
          cv_.wait(lock, [&] { return stop_ || issued_ > u - n_staging; });
          if (stop_) return;
          const Event* done = free_event_[b];
          lock.unlock();
          done->synchronize();  // the copy out of this buffer has finished
        }
        const Arena& a = schedule_.arenas[schedule_.steps[steps_[u % steps_.size()]].arena];
        const auto t0 = std::chrono::steady_clock::now();
        files_.read_group(checkpoint_, a, staging_[b].data());
        const double us =
            std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
        {
          std::lock_guard<std::mutex> lock(mu_);
          read_us_.resize(n_staging);
          read_us_[b] = us;
          ready_ = u + 1;
          if (stop_) return;
        }
        cv_.notify_all();
      }
    } catch (...) {
      std::lock_guard<std::mutex> lock(mu_);
      error_ = std::current_exception();
      cv_.notify_all();
    }
  }

  const Checkpoint& checkpoint_;
  const Schedule& schedule_;
  const ShardFiles& files_;
  std::vector<size_t> steps_;
  std::vector<PinnedBuffer>& staging_;
  std::vector<const Event*> free_event_;  // per staging buffer: recorded after the copy out of it
  uint64_t total_;
  std::mutex mu_;
  std::condition_variable cv_;
  uint64_t ready_ = 0;
  uint64_t issued_ = 0;
  std::vector<double> read_us_;
  bool stop_ = false;
  std::exception_ptr error_;
  std::thread thread_;
};

RunResult CudaBackend::run(const Checkpoint& checkpoint, const Schedule& schedule,
                           const RunOptions& options) {
  RunResult result;
  result.backend = name();
  result.device_names = names_;
  result.mode = options.mode;
  const bool planned = options.mode == Mode::Planned;
  const uint64_t tokens = options.tokens;
  const uint64_t n_slots = std::max<uint32_t>(1, schedule.n_slots);
  const int n_visible = cuda::device_count();
  for (int d : schedule.devices)
    if (d >= n_visible)
      fail(ErrorKind::InvalidInput, "the plan uses GPU ", d, " but only ", n_visible, " CUDA device",
           n_visible == 1 ? " is" : "s are", " present");
  workspace_bytes_ = options.sizing.cublas_workspace_bytes;

  // --- Set-up: contexts, streams, handles, then every allocation, before any step runs. -----------
  std::map<int, GpuState> gpus;
  for (int d : schedule.devices) {
    DeviceScope scope(d);
    QTOOL_CUDA_CHECK(cudaFree(nullptr));  // create the context
    GpuState& g = gpus[d];
    g.device = d;
    g.baseline = used_bytes(d);
  }
  // Peer access between every pair the schedule crosses (direct copies instead of host staging).
  for (size_t i = 1; i < schedule.steps.size(); ++i) {
    const int a = schedule.steps[i - 1].device, b = schedule.steps[i].device;
    if (a == b) continue;
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

  // What must fit: check before allocating so that a run that cannot fit says so clearly.
  for (auto& [d, g] : gpus) {
    uint64_t need = 0;
    for (size_t ai = 0; ai < schedule.arenas.size(); ++ai) {
      const Arena& a = schedule.arenas[ai];
      if (a.device == d && (!a.streamed() || !planned)) need += a.bytes;
    }
    if (planned) need += n_slots * schedule.slot_bytes(d);
    need += tokens * (schedule.max_in(d) + schedule.max_out(d)) * 2 + schedule.max_scratch_elems(d) * 2 +
            workspace_bytes_;
    const uint64_t avail = free_bytes(d);
    if (need > avail)
      fail(ErrorKind::InvalidInput, "GPU ", d, " has ", format_size(avail), " free but the ",
           planned ? "planned" : "all-resident", " run needs ", format_size(need));
  }

  for (auto& [d, g] : gpus) {
    DeviceScope scope(d);
    g.copy = Stream(d);
    g.compute = Stream(d);
    g.cublas = cuda::CublasHandle(d);
    g.workspace = g.alloc(MemoryKind::CublasWorkspace, workspace_bytes_);
    g.cublas.set_workspace(g.workspace.data(), g.workspace.size());
    g.cublas.set_stream(g.compute.get());
    g.max_in = schedule.max_in(d);
    // The planner's reserve items, each its own allocation. The tables and the digests (a few KiB)
    // ride in the rounding slack of whichever allocation has room, so they cost no granule of
    // their own; without room anywhere they extend activation_out.
    const uint64_t gran = std::max<uint64_t>(1, options.sizing.alloc_granularity_bytes);
    const auto rounded = [&](uint64_t b) { return (b + gran - 1) / gran * gran; };
    const uint64_t in_bytes = tokens * g.max_in * 2;
    const uint64_t out_bytes = tokens * schedule.max_out(d) * 2;
    const uint64_t scratch_bytes = schedule.max_scratch_elems(d) * 2;
    g.slot_bytes = planned ? schedule.slot_bytes(d) : 0;
    const uint64_t slots_bytes = n_slots * g.slot_bytes;
    const uint64_t extras = align256(cuda::kDeviceTablesBytes) +
                            std::max<uint64_t>(1, schedule.linears.size()) * 2 * sizeof(unsigned long long);
    enum Host { kIn, kOut, kScratch, kSlots };
    const uint64_t sizes[4] = {in_bytes, out_bytes, scratch_bytes, slots_bytes};
    int host = kOut;
    uint64_t best = 0;
    for (int h = 0; h < 4; ++h) {
      if (sizes[h] == 0) continue;
      const uint64_t slack = rounded(sizes[h]) - align256(sizes[h]);
      if (slack >= extras && slack > best) {
        best = slack;
        host = h;
      }
    }
    const auto with_extras = [&](int h) { return h == host ? align256(sizes[h]) + extras : sizes[h]; };
    g.activation_in = g.alloc(MemoryKind::ActivationIn, with_extras(kIn));
    g.activation_out = g.alloc(MemoryKind::ActivationOut, with_extras(kOut));
    g.y = g.activation_out.as<uint16_t>();
    g.scratch = g.alloc(MemoryKind::DequantScratch, with_extras(kScratch));
    if (slots_bytes) {
      g.slots = g.alloc(MemoryKind::DeviceSlots, with_extras(kSlots));
      for (uint64_t k = 0; k < n_slots; ++k) {
        g.slot_free.emplace_back(d);
        g.copy_done.emplace_back(d);
      }
    }
    DeviceBuffer* const host_buf[4] = {&g.activation_in, &g.activation_out, &g.scratch, &g.slots};
    uint8_t* const extra = host_buf[host]->as<uint8_t>() + align256(sizes[host]);
    g.tables = cuda::upload_tables(extra, g.compute.get());
    g.digests = reinterpret_cast<unsigned long long*>(extra + align256(cuda::kDeviceTablesBytes));
    g.h_ready = Event(d);
    g.peer_in_done = Event(d);
    g.last_work = Event(d);
    g.timing = std::make_unique<EventPool>(d);
  }

  // Arenas on the GPUs (loaded once), and the pinned host arenas of cpu groups.
  std::vector<DeviceBuffer> on_device(schedule.arenas.size());
  std::vector<PinnedBuffer> host_arena(schedule.arenas.size());
  for (size_t ai = 0; ai < schedule.arenas.size(); ++ai) {
    const Arena& a = schedule.arenas[ai];
    if (!schedule.arena_used(ai) || a.bytes == 0) continue;
    if (!a.streamed() || !planned) {
      GpuState& g = gpus.at(a.device);
      DeviceScope scope(a.device);
      on_device[ai] =
          g.alloc(a.streamed() ? MemoryKind::StreamedHeldResident : MemoryKind::ResidentArena, a.bytes);
      QTOOL_CUDA_CHECK(cudaMemset(on_device[ai].data(), 0, a.bytes));
      for (const ArenaTensor& t : a.tensors) {
        const auto src = checkpoint.components()[t.component].data(t.entry);
        if (t.nbytes)
          QTOOL_CUDA_CHECK(cudaMemcpy(on_device[ai].as<uint8_t>() + t.offset, src.data(), t.nbytes,
                                      cudaMemcpyHostToDevice));
      }
    } else if (a.placement == Placement::Cpu) {
      host_arena[ai] = PinnedBuffer(a.bytes);
      fill_arena(checkpoint, a, host_arena[ai].data());
    }
  }
  const ShardFiles files(checkpoint);
  std::vector<PinnedBuffer> staging;
  std::map<int, std::vector<Event>> staging_free;  // per GPU, per staging buffer
  std::vector<size_t> disk_steps;
  std::vector<size_t> streamed_steps;
  for (size_t si = 0; si < schedule.steps.size(); ++si) {
    const ExecStep& st = schedule.steps[si];
    if (!planned || !st.streamed) continue;
    streamed_steps.push_back(si);
    result.h2d_bytes_per_step += schedule.arenas[st.arena].bytes;
    if (schedule.arenas[st.arena].placement == Placement::Disk) disk_steps.push_back(si);
  }
  if (!disk_steps.empty()) {
    const uint64_t n_staging = std::max<uint64_t>(1, options.sizing.staging_buffers);
    for (uint64_t i = 0; i < n_staging; ++i) staging.emplace_back(schedule.max_staging_bytes());
    for (size_t si : disk_steps) {
      auto& events = staging_free[schedule.steps[si].device];
      while (events.size() < n_staging) events.emplace_back(schedule.steps[si].device);
    }
  }
  for (auto& [d, g] : gpus) {
    DeviceScope scope(d);
    QTOOL_CUDA_CHECK(cudaDeviceSynchronize());
  }
  std::map<int, uint64_t> peak;
  const auto sample = [&] {
    for (auto& [d, g] : gpus) peak[d] = std::max(peak[d], used_bytes(d));
  };
  sample();

  // --- The run: everything enqueued from here on without waiting for the GPUs. ----------------
  const size_t n_linears = schedule.linears.size();
  const size_t digest_words = std::max<size_t>(1, n_linears) * 2;
  std::map<int, PinnedBuffer> digest_host;  // per GPU: [steps][n_linears][2]
  for (auto& [d, g] : gpus) {
    digest_host.emplace(d, PinnedBuffer(options.steps * digest_words * sizeof(unsigned long long)));
    std::memset(digest_host.at(d).data(), 0, digest_host.at(d).size());
  }
  std::vector<uint64_t> seq_of(schedule.steps.size(), 0);
  std::map<int, uint64_t> streamed_per_device;  // per run step
  for (size_t si : streamed_steps) seq_of[si] = streamed_per_device[schedule.steps[si].device]++;
  const uint64_t streamed_per_run_step = streamed_steps.size();
  DiskReader reader(checkpoint, schedule, files, disk_steps, staging, options.steps);

  struct TraceRef {
    const Event* start;
    const Event* end;
    int device;
    uint32_t step;
    int32_t plan_step;
    std::string name;
    Lane lane;
    uint64_t bytes;
  };
  std::vector<TraceRef> traces;
  struct DiskTrace {
    double start_us, dur_us;
    uint32_t step;
    size_t plan_step;
    uint64_t bytes;
  };
  std::vector<DiskTrace> disk_traces;

  // Origins for the trace: one timed event per GPU; host time is aligned to the first one's.
  std::map<int, const Event*> origin;
  for (auto& [d, g] : gpus) {
    DeviceScope scope(d);
    origin[d] = &g.timing->next();
    origin[d]->record(g.compute.get());
  }
  for (auto& [d, ev] : origin) ev->synchronize();
  const auto host_origin = std::chrono::steady_clock::now();
  const int first_device = schedule.steps.empty() ? schedule.devices.front() : schedule.steps.front().device;
  std::vector<std::pair<const Event*, const Event*>> step_events;
  const auto gpu_seq = [&](uint32_t rstep, size_t si) {
    return rstep * streamed_per_device[schedule.steps[si].device] + seq_of[si];
  };

  // Copies are issued in streaming order across run steps: copy c of the run is run step
  // c / S, streamed step c % S. The copy with sequence number j on its GPU may be issued once the
  // compute of j - K there has been enqueued (that compute records the slot's free event).
  uint64_t next_copy = 0;
  const uint64_t total_copies = streamed_per_run_step * options.steps;
  uint64_t disk_issued = 0;
  const auto issue_copies = [&] {
    while (next_copy < total_copies) {
      const uint32_t rstep = static_cast<uint32_t>(next_copy / streamed_per_run_step);
      const size_t si = streamed_steps[next_copy % streamed_per_run_step];
      const ExecStep& st = schedule.steps[si];
      GpuState& g = gpus.at(st.device);
      const uint64_t j = gpu_seq(rstep, si);
      if (j >= n_slots && g.enqueued_computes < j - n_slots + 1) break;
      const uint64_t slot = j % n_slots;
      const Arena& a = schedule.arenas[st.arena];
      DeviceScope scope(st.device);
      if (j >= n_slots) g.copy.wait(g.slot_free[slot].get());
      std::span<uint8_t> host;
      if (a.placement == Placement::Disk) {
        const auto w0 = std::chrono::steady_clock::now();
        double us = 0;
        PinnedBuffer& buf = reader.wait_ready(disk_issued, &us);
        if (options.trace) {
          // The read ended no later than now; its start is its duration before that.
          const double end_us = std::chrono::duration<double, std::micro>(
                                    std::max(w0, std::chrono::steady_clock::now()) - host_origin)
                                    .count();
          disk_traces.push_back({std::max(0.0, end_us - us), us, rstep, si, a.payload_bytes});
        }
        host = {buf.data(), a.bytes};
      } else {
        host = {host_arena[st.arena].data(), a.bytes};
      }
      const Event* t0 = options.trace ? &g.timing->next() : nullptr;
      const Event* t1 = options.trace ? &g.timing->next() : nullptr;
      if (t0) t0->record(g.copy.get());
      QTOOL_CUDA_CHECK(cudaMemcpyAsync(g.slots.as<uint8_t>() + slot * g.slot_bytes, host.data(), a.bytes,
                                       cudaMemcpyHostToDevice, g.copy.get()));
      g.copy_done[slot].record(g.copy.get());
      if (t1) {
        t1->record(g.copy.get());
        traces.push_back({t0, t1, st.device, rstep, static_cast<int32_t>(si), st.name, Lane::Copy, a.bytes});
      }
      if (options.after_copy) {
        // Before the reader may reuse a staging buffer: the hook sees the bytes of this copy.
        g.copy_done[slot].synchronize();
        options.after_copy(si, host);
      }
      if (a.placement == Placement::Disk) {
        const Event& done = staging_free.at(st.device)[disk_issued % staging.size()];
        done.record(g.copy.get());
        reader.issued(disk_issued, &done);
        ++disk_issued;
      }
      ++next_copy;
    }
  };

  try {
    issue_copies();
    for (uint32_t rstep = 0; rstep < options.steps; ++rstep) {
      const uint64_t stream_seed = kmath::activation_stream(options.seed + rstep);
      GpuState& first = gpus.at(first_device);
      const Event& step_start = first.timing->next();
      {
        DeviceScope scope(first_device);
        step_start.record(first.compute.get());
      }
      int act_device = -1;
      for (size_t si = 0; si < schedule.steps.size(); ++si) {
        const ExecStep& x = schedule.steps[si];
        GpuState& g = gpus.at(x.device);
        DeviceScope scope(x.device);
        cudaStream_t cs = g.compute.get();
        const Lane compute_lane = Lane::Compute;
        if (g.activation_step != rstep) {
          // First use of this GPU in the step: clear its digests, bring the hidden state here.
          if (options.digests)
            QTOOL_CUDA_CHECK(cudaMemsetAsync(g.digests, 0, digest_words * sizeof(unsigned long long), cs));
          auto* h = g.activation_in.as<uint16_t>();
          const Event* t0 = options.trace ? &g.timing->next() : nullptr;
          const Event* t1 = options.trace ? &g.timing->next() : nullptr;
          if (t0) t0->record(cs);
          // No earlier peer copy may still be reading this GPU's hidden state.
          for (const Event* r : g.readers) g.compute.wait(r->get());
          g.readers.clear();
          uint64_t bytes = 0;
          if (act_device < 0) {
            cuda::generate_activation(stream_seed, tokens, g.max_in, 0, g.max_in, h, cs);
          } else {
            GpuState& src = gpus.at(act_device);
            {
              DeviceScope src_scope(act_device);
              src.h_ready.record(src.compute.get());
            }
            g.compute.wait(src.h_ready.get());
            const uint64_t cols = std::min(src.max_in, g.max_in);
            QTOOL_CUDA_CHECK(cudaMemcpy2DAsync(h, g.max_in * 2, src.activation_in.data(), src.max_in * 2,
                                               cols * 2, tokens, cudaMemcpyDefault, cs));
            g.peer_in_done.record(cs);
            src.readers.push_back(&g.peer_in_done);
            if (g.max_in > cols)
              cuda::generate_activation(stream_seed, tokens, g.max_in, cols, g.max_in, h, cs);
            bytes = tokens * cols * 2;
            if (rstep == 0) result.peer_bytes_per_step += bytes;
          }
          if (t1) {
            t1->record(cs);
            traces.push_back({t0, t1, x.device, rstep, -1, act_device < 0 ? "activations" : "peer copy",
                              compute_lane, bytes});
          }
          g.activation_step = rstep;
        }
        act_device = x.device;

        const bool streamed = planned && x.streamed;
        const uint8_t* base = nullptr;
        uint64_t slot = 0;
        if (streamed) {
          slot = gpu_seq(rstep, si) % n_slots;
          g.compute.wait(g.copy_done[slot].get());
          base = g.slots.as<uint8_t>() + slot * g.slot_bytes;
        } else {
          base = on_device[x.arena].as<uint8_t>();
        }
        const Event* t0 = options.trace ? &g.timing->next() : nullptr;
        const Event* t1 = options.trace ? &g.timing->next() : nullptr;
        if (t0) t0->record(cs);
        for (uint32_t li : x.linears) {
          const LinearTask& l = schedule.linears[li];
          const DequantParams p = schedule.bind(l, base);
          const uint16_t* w = reinterpret_cast<const uint16_t*>(p.weight);
          if (l.needs_scratch()) {
            cuda::dequantize_to_bf16(p, g.tables, g.scratch.as<uint16_t>(), cs);
            w = g.scratch.as<uint16_t>();
          }
          cuda::gemm_bf16(g.cublas, g.activation_in.as<uint16_t>(), g.max_in, w, g.y, tokens, l.in(),
                          l.out());
          if (options.digests) cuda::accumulate_digest(g.y, tokens * l.out(), g.digests + 2 * li, cs);
        }
        if (t1) {
          t1->record(cs);
          traces.push_back({t0, t1, x.device, rstep, static_cast<int32_t>(si), x.name, compute_lane,
                            streamed ? schedule.arenas[x.arena].bytes : 0});
        }
        if (streamed) {
          g.slot_free[slot].record(cs);
          ++g.enqueued_computes;
          issue_copies();
        }
      }
      // End of the step: each GPU sends its digests home; all GPUs join the first one's timeline.
      for (auto& [d, g] : gpus) {
        DeviceScope scope(d);
        if (g.activation_step == rstep && options.digests) {
          auto* dst = reinterpret_cast<unsigned long long*>(digest_host.at(d).data()) + rstep * digest_words;
          QTOOL_CUDA_CHECK(cudaMemcpyAsync(dst, g.digests, digest_words * sizeof(unsigned long long),
                                           cudaMemcpyDeviceToHost, g.compute.get()));
        }
        if (d != first_device) {
          g.last_work.record(g.compute.get());
          first.compute.wait(g.last_work.get());
        }
      }
      const Event& step_end = first.timing->next();
      {
        DeviceScope scope(first_device);
        step_end.record(first.compute.get());
      }
      step_events.emplace_back(&step_start, &step_end);
    }
    for (auto& [d, g] : gpus) {
      DeviceScope scope(d);
      QTOOL_CUDA_CHECK(cudaDeviceSynchronize());
    }
  } catch (...) {
    reader.stop();
    for (auto& [d, g] : gpus) {
      DeviceScope scope(d);
      (void)cudaDeviceSynchronize();
      (void)cudaGetLastError();
    }
    throw;
  }
  reader.stop();
  sample();

  // --- Results. -----------------------------------------------------------------------------------
  for (const auto& [a, b] : step_events) result.step_ms.push_back(b->elapsed_ms_since(*a));
  result.digests.assign(options.steps, std::vector<LayerDigest>(n_linears));
  for (uint32_t rstep = 0; rstep < options.steps; ++rstep) {
    for (size_t li = 0; li < n_linears; ++li) {
      const int d = schedule.steps[schedule.linears[li].step].device;
      const auto* src =
          reinterpret_cast<const unsigned long long*>(digest_host.at(d).data()) + rstep * digest_words;
      result.digests[rstep][li] = {src[2 * li], src[2 * li + 1]};
    }
  }
  if (options.trace) {
    // Every GPU's origin was recorded at (nearly) the same host instant, so their times align.
    for (const TraceRef& t : traces) {
      const Event& o = *origin.at(t.device);
      const double start_us = 1000.0 * t.start->elapsed_ms_since(o);
      const double end_us = 1000.0 * t.end->elapsed_ms_since(o);
      result.trace.push_back(
          {t.name, t.lane, t.device, t.step, t.plan_step, start_us, end_us - start_us, t.bytes});
    }
    for (const DiskTrace& t : disk_traces)
      result.trace.push_back({schedule.steps[t.plan_step].name, Lane::DiskRead,
                              schedule.steps[t.plan_step].device, t.step, static_cast<int32_t>(t.plan_step),
                              t.start_us, t.dur_us, t.bytes});
    std::sort(result.trace.begin(), result.trace.end(),
              [](const TraceEvent& a, const TraceEvent& b) { return a.start_us < b.start_us; });
  }
  for (auto& [d, g] : gpus) {
    DeviceMemory m;
    m.device = d;
    m.items = g.items;
    m.allocated_bytes = g.allocated;
    m.baseline_bytes = g.baseline;
    m.measured_peak_bytes = peak[d];
    for (const PinnedBuffer& b : host_arena) m.pinned_host_bytes += b.size();
    for (const PinnedBuffer& b : staging) m.pinned_host_bytes += b.size();
    m.how =
        "cudaMemGetInfo (total - free), sampled after set-up and after the last step; includes the CUDA "
        "context, cuBLAS, loaded kernels and allocator rounding";
    result.memory.push_back(std::move(m));
  }
  return result;
}

LayerRun CudaBackend::run_layer(const DequantParams& hp, uint64_t tokens, uint64_t ldx, uint64_t seed,
                                int device) {
  DeviceScope scope(device);
  auto& slot = layer_ctx_[device];
  if (!slot) {
    slot = std::make_unique<LayerContext>();
    slot->device = device;
    slot->stream = Stream(device);
    slot->cublas = cuda::CublasHandle(device);
    slot->workspace = DeviceBuffer(device, workspace_bytes_);
    slot->cublas.set_workspace(slot->workspace.data(), slot->workspace.size());
    slot->cublas.set_stream(slot->stream.get());
    slot->tables_mem = DeviceBuffer(device, cuda::kDeviceTablesBytes);
    slot->tables = cuda::upload_tables(slot->tables_mem.data(), slot->stream.get());
  }
  LayerContext& c = *slot;
  cudaStream_t cs = c.stream.get();
  ldx = std::max<uint64_t>(ldx, hp.cols);
  // The weight's parts side by side, 256-byte aligned, as in an arena.
  const PartLayout layout = part_layout(hp);
  c.ensure(c.weight, layout.total);
  for (int p = 0; p < kNumParts; ++p)
    if (layout.source[p] && layout.sizes.bytes[p])
      QTOOL_CUDA_CHECK(cudaMemcpyAsync(c.weight.as<uint8_t>() + layout.offset[p], layout.source[p],
                                       layout.sizes.bytes[p], cudaMemcpyHostToDevice, cs));
  const DequantParams dp = rebase_parts(hp, layout, c.weight.as<uint8_t>());
  c.ensure(c.x, tokens * ldx * 2);
  c.ensure(c.y, tokens * hp.rows * 2);
  c.ensure(c.digest, 2 * sizeof(unsigned long long));
  cuda::generate_activation(kmath::activation_stream(seed), tokens, ldx, 0, hp.cols, c.x.as<uint16_t>(), cs);
  const uint16_t* w = reinterpret_cast<const uint16_t*>(dp.weight);
  if (hp.kind != WeightKind::Bf16) {
    c.ensure(c.scratch, hp.numel() * 2);
    cuda::dequantize_to_bf16(dp, c.tables, c.scratch.as<uint16_t>(), cs);
    w = c.scratch.as<uint16_t>();
  }
  cuda::gemm_bf16(c.cublas, c.x.as<uint16_t>(), ldx, w, c.y.as<uint16_t>(), tokens, hp.cols, hp.rows);
  QTOOL_CUDA_CHECK(cudaMemsetAsync(c.digest.data(), 0, 2 * sizeof(unsigned long long), cs));
  cuda::accumulate_digest(c.y.as<uint16_t>(), tokens * hp.rows, c.digest.as<unsigned long long>(), cs);
  LayerRun r;
  r.y.resize(tokens * hp.rows);
  unsigned long long dg[2] = {};
  QTOOL_CUDA_CHECK(cudaMemcpyAsync(r.y.data(), c.y.data(), r.y.size() * 2, cudaMemcpyDeviceToHost, cs));
  QTOOL_CUDA_CHECK(cudaMemcpyAsync(dg, c.digest.data(), sizeof(dg), cudaMemcpyDeviceToHost, cs));
  c.stream.synchronize();
  r.digest = {dg[0], dg[1]};
  return r;
}

}  // namespace

bool cuda_backend_available() { return cuda::device_count() > 0; }

std::unique_ptr<Backend> make_cuda_backend() { return std::make_unique<CudaBackend>(); }

}  // namespace qtool::runner
