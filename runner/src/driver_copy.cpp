// The schedule driver's copy engine (driver_impl.hpp): the arenas and slot rings set up, the copy
// thread filling each GPU's ring of K slots ahead of compute (disk groups through a staging ring),
// and a step's slot acquired by the units and released when the last unit using it ends.
#include <algorithm>
#include <thread>

#include "driver_impl.hpp"
#include "qtool/formats/error.hpp"
#include "qtool/formats/thread_pool.hpp"

namespace qtool::runner::driver_detail {

void Driver::set_up() {
  const auto t0 = Clock::now();
  for (int d : schedule_.devices) devices_[d] = platform_.open(d);
  const auto t_open = Clock::now();
  on_device_.assign(schedule_.arenas.size(), nullptr);
  host_arena_.resize(schedule_.arenas.size());
  std::vector<size_t> pinned;  // streamed groups held in host memory for the job
  for (size_t ai = 0; ai < schedule_.arenas.size(); ++ai) {
    const Arena& a = schedule_.arenas[ai];
    if (!schedule_.arena_used(ai) || a.bytes == 0) continue;
    if (phased_ && !a.streamed()) continue;  // split per component (set_up_phases)
    if (!a.streamed() || !planned_) {
      Device& dev = *devices_.at(a.device);
      uint8_t* mem =
          dev.allocate(a.streamed() ? MemoryKind::StreamedHeldResident : MemoryKind::ResidentArena, a.bytes);
      const auto host = platform_.host_buffer(a.bytes);
      fill_arena(checkpoint_, a, host->data());
      dev.upload(mem, {host->data(), a.bytes});
      on_device_[ai] = mem;
    } else if (a.placement == Placement::Cpu) {
      pinned.push_back(ai);
    }
  }
  const auto t_resident = Clock::now();
  // The host copies of the streamed groups, made and filled by several threads: pinning (the
  // kernel zeroes and locks every page) and reading the mapped checkpoint are each bound by one
  // core, and a job's first step waits for all of them.
  if (!pinned.empty()) {
    ThreadPool pool(
        std::min<size_t>(pinned.size(), std::min<size_t>(8, std::thread::hardware_concurrency())));
    pool.parallel_for(pinned.size(), 1, [&](size_t b, size_t e) {
      for (size_t i = b; i < e; ++i) {
        const size_t ai = pinned[i];
        host_arena_[ai] = platform_.host_buffer(schedule_.arenas[ai].bytes);
        fill_arena(checkpoint_, schedule_.arenas[ai], host_arena_[ai]->data());
      }
    });
  }
  const auto t_host = Clock::now();
  k_ = std::max<uint64_t>(1, schedule_.n_slots);
  if (phased_) set_up_phases();
  rank_.assign(schedule_.steps.size(), SIZE_MAX);
  dev_rank_.assign(schedule_.steps.size(), 0);
  std::vector<std::vector<size_t>> streamed_of(checkpoint_.components().size());
  std::map<std::pair<uint32_t, int>, uint64_t> on_gpu;
  for (size_t si = 0; si < schedule_.steps.size(); ++si) {
    if (!streamed(si)) continue;
    const ExecStep& st = schedule_.steps[si];
    rank_[si] = streamed_of[st.component].size();
    streamed_of[st.component].push_back(si);
    dev_rank_[si] = on_gpu[{st.component, st.device}]++;
  }
  result_.copies_per_step.assign(schedule_.steps.size(), 0);
  for (size_t p = 0; p < passes_.size(); ++p) {
    pass_item0_.push_back(items_.size());
    for (size_t si : streamed_of[passes_[p]]) {
      items_.push_back({si, device_items_[schedule_.steps[si].device]++});
      item_phase_.push_back(phased_ ? pass_phase_[p] : 0);
      result_.h2d_bytes_per_step += schedule_.arenas[schedule_.steps[si].arena].bytes;
      ++result_.copies_per_step[si];
    }
  }
  for (auto& [d, dev] : devices_) {
    const uint64_t slot_bytes = planned_ && !phased_ ? schedule_.slot_bytes(d) : 0;
    if (slot_bytes) slots_[d] = {dev->allocate(MemoryKind::DeviceSlots, k_ * slot_bytes), slot_bytes};
  }
  const uint64_t staging_bytes = planned_ ? schedule_.max_staging_bytes() : 0;
  for (uint64_t i = 0; staging_bytes && i < std::max<uint64_t>(1, options_.sizing.staging_buffers); ++i)
    staging_.push_back(platform_.host_buffer(staging_bytes));
  if (staging_bytes) files_ = std::make_unique<ShardFiles>(checkpoint_);
  result_.setup = {ms_between(t0, t_open), ms_between(t_open, t_resident), ms_between(t_resident, t_host),
                   ms_since(t0)};
}

void Driver::copy_loop(uint32_t run_step) {
  try {
    size_t staging_next = 0;
    for (size_t k = 0; k < items_.size(); ++k) {
      const size_t si = items_[k].step;
      const uint64_t seq = items_[k].seq;
      const ExecStep& st = schedule_.steps[si];
      const Arena& a = schedule_.arenas[st.arena];
      {
        std::unique_lock<std::mutex> lock(mu_);
        // A run by phase copies a phase's groups once its ring exists.
        cv_.wait(lock, [&] {
          return abort_ || (released_[st.device] + slots_of(si) > seq &&
                            (!phased_ || ring_phase_ == static_cast<int64_t>(item_phase_[k])));
        });
        if (abort_) return;
      }
      std::span<uint8_t> host;
      if (a.placement == Placement::Disk) {
        HostBuffer& stage = *staging_[staging_next++ % staging_.size()];
        const auto t0 = Clock::now();
        files_->read_group(checkpoint_, a, stage.data());
        trace(st.name, Lane::DiskRead, st.device, run_step, static_cast<int32_t>(si), t0, Clock::now(),
              a.payload_bytes);
        host = {stage.data(), a.bytes};
      } else {
        host = {host_arena_[st.arena]->data(), a.bytes};
      }
      const auto [base, slot_bytes] = slots_.at(st.device);
      const uint32_t slot = static_cast<uint32_t>(seq % slots_of(si));
      const auto t0 = Clock::now();
      devices_.at(st.device)->copy_to_slot(
          slot, base + slot * slot_bytes, host,
          a.placement == Placement::Disk || options_.after_copy || options_.trace);
      trace(st.name, Lane::Copy, st.device, run_step, static_cast<int32_t>(si), t0, Clock::now(), a.bytes);
      if (options_.after_copy) options_.after_copy(si, host);
      {
        std::lock_guard<std::mutex> lock(mu_);
        copies_done_ = k + 1;
      }
      cv_.notify_all();
    }
  } catch (...) {
    std::lock_guard<std::mutex> lock(mu_);
    copy_error_ = std::current_exception();
    abort_ = true;
    cv_.notify_all();
  }
}

void Driver::wait_copy(size_t si) {
  const size_t k = item(si);
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [&] { return abort_ || copies_done_ > k; });
  if (copy_error_) std::rethrow_exception(copy_error_);
  if (abort_) fail(ErrorKind::Internal, "the run was aborted");
  lock.unlock();
  devices_.at(schedule_.steps[si].device)->wait_copied(static_cast<uint32_t>(items_[k].seq % slots_of(si)));
}

// The step's slot may be refilled: wait for its copy if it was never read, release it.
void Driver::finish(size_t si) {
  const size_t k = item(si);
  if (state_[k] == StepState::Released) return;
  if (state_[k] == StepState::Pending) wait_copy(si);
  const int d = schedule_.steps[si].device;
  const uint64_t seq = items_[k].seq;
  devices_.at(d)->release(static_cast<uint32_t>(seq % slots_of(si)));
  {
    std::lock_guard<std::mutex> lock(mu_);
    state_[k] = StepState::Released;
    auto& freed = freed_[d];
    freed[seq] = 1;
    while (released_[d] < freed.size() && freed[released_[d]]) ++released_[d];
  }
  cv_.notify_all();
}

const uint8_t* Driver::acquire(size_t si, const std::string& tensor) {
  if (!streamed(si)) {
    const ExecStep& st = schedule_.steps[si];
    if (phased_) {  // the component's own allocation, at the arena's offsets from its span's start
      const Span& span = spans_.at({st.component, st.device});
      QTOOL_ASSERT(span.mem != nullptr);
      return reinterpret_cast<const uint8_t*>(reinterpret_cast<uintptr_t>(span.mem) - span.lo);
    }
    const uint32_t a = st.arena;
    QTOOL_ASSERT(on_device_[a] != nullptr);
    return on_device_[a];
  }
  const int d = schedule_.steps[si].device;
  const size_t k = item(si);
  if (state_[k] == StepState::Released)
    fail(ErrorKind::Internal, "the forward asked for tensor '", tensor, "' of plan step '",
         schedule_.steps[si].name,
         "' after its device slot was reused: the forward reads its tensors out of the plan's order");
  if (state_[k] == StepState::Pending) {
    wait_copy(si);
    state_[k] = StepState::Held;
  }
  const auto [base, slot_bytes] = slots_.at(d);
  return base + (items_[k].seq % slots_of(si)) * slot_bytes;
}

}  // namespace qtool::runner::driver_detail
