// The schedule driver run by phase (RunOptions::phases, a plan by phase): per (component, GPU) its
// tensors of the GPU's resident arena as one allocation, uploaded at the job's start for a
// component resident for the job, else at its phase's start and freed at its end; per phase a
// ring of device slots for its streamed groups, allocated at its start and freed at its end; per
// phase its load time, the time of its passes and the most memory each GPU held.
#include <algorithm>
#include <chrono>

#include "driver_impl.hpp"
#include "qtool/formats/error.hpp"

namespace qtool::runner::driver_detail {
namespace {

// The index of the phase that runs `component`, or SIZE_MAX.
size_t phase_of(const std::vector<RunOptions::Phase>& phases, const std::string& component) {
  for (size_t p = 0; p < phases.size(); ++p)
    if (std::find(phases[p].components.begin(), phases[p].components.end(), component) !=
        phases[p].components.end())
      return p;
  return SIZE_MAX;
}

}  // namespace

void Driver::set_up_phases() {
  const auto& comps = checkpoint_.components();
  const auto& phases = options_.phases;
  loaded_.assign(comps.size(), 0);
  for (const RunOptions::Phase& ph : phases)
    for (const std::string& name : ph.load) {
      const Component* c = checkpoint_.find_component(name);
      if (!c)
        fail(ErrorKind::InvalidInput, "phase '", ph.name, "' loads component '", name,
             "', not in the checkpoint");
      loaded_[static_cast<size_t>(c - comps.data())] = 1;
    }
  // Each pass runs in its component's phase, the phases in order.
  for (size_t p = 0; p < passes_.size(); ++p) {
    const std::string& name = comps[passes_[p]].name();
    const size_t ph = phase_of(phases, name);
    if (ph == SIZE_MAX)
      fail(ErrorKind::InvalidInput, "component '", name,
           "' runs in no phase of the plan: plan the pipeline again");
    if (p > 0 && ph < pass_phase_.back())
      fail(ErrorKind::InvalidInput, "component '", name, "' runs after phase '",
           phases[pass_phase_.back()].name, "' but the plan puts it in the earlier phase '", phases[ph].name,
           "'");
    pass_phase_.push_back(ph);
  }
  // The resident arenas, split per component: the job-resident ones uploaded now.
  for (const auto& [d, ai] : schedule_.resident_arena) {
    const Arena& a = schedule_.arenas[ai];
    std::map<uint32_t, Arena> parts;
    for (const ArenaTensor& t : a.tensors) {
      Arena& part = parts[t.component];
      part.tensors.push_back(t);
      part.bytes = std::max(part.bytes, t.offset + t.nbytes);
    }
    for (auto& [ci, part] : parts) {
      uint64_t lo = UINT64_MAX;
      for (const ArenaTensor& t : part.tensors) lo = std::min(lo, t.offset);
      lo = lo / kArenaAlign * kArenaAlign;
      for (ArenaTensor& t : part.tensors) t.offset -= lo;
      part.bytes = (part.bytes - lo + kArenaAlign - 1) / kArenaAlign * kArenaAlign;
      Span& span = spans_[{ci, d}];
      span.lo = lo;
      span.bytes = part.bytes;
      span.host = platform_.host_buffer(part.bytes);
      fill_arena(checkpoint_, part, span.host->data());
      if (loaded_[ci]) continue;
      Device& dev = *devices_.at(d);
      span.mem = dev.allocate(MemoryKind::ResidentArena, span.bytes);
      dev.upload(span.mem, {span.host->data(), span.bytes});
    }
  }
  // Per phase and GPU: its ring (its components' largest streamed group, its slots).
  phase_slot_.assign(phases.size(), {});
  phase_k_.assign(phases.size(), {});
  for (size_t si = 0; si < schedule_.steps.size(); ++si) {
    if (!streamed(si)) continue;
    const ExecStep& st = schedule_.steps[si];
    const size_t ph = phase_of(phases, comps[st.component].name());
    if (ph == SIZE_MAX) continue;
    uint64_t& b = phase_slot_[ph][st.device];
    b = std::max(b, schedule_.arenas[st.arena].bytes);
    const auto it = phases[ph].slots.find(st.device);
    phase_k_[ph][st.device] = std::max<uint64_t>(1, it == phases[ph].slots.end() ? k_ : it->second);
  }
  result_.phases.assign(phases.size(), {});
  for (size_t p = 0; p < phases.size(); ++p) result_.phases[p].name = phases[p].name;
}

uint64_t Driver::slots_of(size_t si) const {
  if (!phased_) return k_;
  const size_t ph = phase_of(options_.phases, checkpoint_.components()[schedule_.steps[si].component].name());
  if (ph == SIZE_MAX) return k_;
  const auto it = phase_k_[ph].find(schedule_.steps[si].device);
  return it == phase_k_[ph].end() ? k_ : it->second;
}

void Driver::size_ops(const std::vector<OpsNeed>& per_component) {
  const auto& comps = checkpoint_.components();
  const auto group_of = [&](size_t c) {
    return phased_ ? phase_of(options_.phases, comps[c].name()) : SIZE_MAX;
  };
  ops_need_.assign(per_component.size(), {});
  for (size_t ci = 0; ci < per_component.size(); ++ci)
    for (size_t c = 0; c < per_component.size(); ++c) {
      if (group_of(ci) != SIZE_MAX && group_of(c) != group_of(ci)) continue;
      OpsNeed& n = ops_need_[ci];
      n.activation_bytes = std::max(n.activation_bytes, per_component[c].activation_bytes);
      n.dequant_scratch_bytes = std::max(n.dequant_scratch_bytes, per_component[c].dequant_scratch_bytes);
    }
}

void Driver::note_phase_peak(size_t phase) {
  for (auto& [d, dev] : devices_) {
    uint64_t& peak = result_.phases[phase].peak_bytes[d];
    peak = std::max(peak, dev->held_bytes());
  }
}

// The phase's loaded components uploaded and its rings allocated (the copy thread may then fill
// them); the time of it is the phase's load time.
void Driver::begin_phase(size_t phase) {
  RunResult::PhaseRun& pr = result_.phases[phase];
  pr.peak_bytes.clear();
  pr.passes = 0;
  pr.load_bytes = 0;
  const auto t0 = Clock::now();
  // The previous phase's ops (activation block, dequant scratch, handles) go: this phase's are made
  // for its components at its first pass, as the plan reserves them per phase. A phase that begins
  // again right after itself (a plan of one phase, run step after run step) keeps them: making
  // them again would cost every step cuDNN's plans and cuBLASLt's heuristics.
  if (ops_phase_ != phase) {
    platform_.release_ops();
    for (auto& [d, dev] : devices_) dev->forget_activations();
    ops_phase_ = phase;
    ++result_.ops_releases;
  }
  for (auto& [key, span] : spans_) {
    if (!loaded_[key.first] || span.mem) continue;
    if (phase_of(options_.phases, checkpoint_.components()[key.first].name()) != phase) continue;
    Device& dev = *devices_.at(key.second);
    span.mem = dev.allocate(MemoryKind::ResidentArena, span.bytes);
    dev.upload(span.mem, {span.host->data(), span.bytes});
    pr.load_bytes += span.bytes;
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& [d, bytes] : phase_slot_[phase])
      slots_[d] = {devices_.at(d)->allocate(MemoryKind::DeviceSlots, phase_k_[phase].at(d) * bytes), bytes};
    ring_phase_ = static_cast<int64_t>(phase);
  }
  for (auto& [d, dev] : devices_) dev->synchronize();
  pr.load_ms = ms_since(t0);
  cv_.notify_all();
  note_phase_peak(phase);
  phase_t0_ = Clock::now();
}

// Every pass of the phase has run: its time taken, its loaded components and rings freed.
void Driver::end_phase(size_t phase) {
  for (auto& [d, dev] : devices_) dev->synchronize();
  RunResult::PhaseRun& pr = result_.phases[phase];
  pr.run_ms = ms_since(phase_t0_);
  note_phase_peak(phase);
  for (auto& [key, span] : spans_) {
    if (!loaded_[key.first] || !span.mem) continue;
    devices_.at(key.second)->free(span.mem);
    span.mem = nullptr;
  }
  std::lock_guard<std::mutex> lock(mu_);
  for (const auto& [d, bytes] : phase_slot_[phase]) {
    devices_.at(d)->free(slots_.at(d).first);
    slots_.erase(d);
  }
  ring_phase_ = -1;
}

}  // namespace qtool::runner::driver_detail
