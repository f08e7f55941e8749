// The schedule driver (driver.hpp): set-up, the copy thread and the slot ring, and the compute
// walk over each component's units with a WeightSource served from the arenas.
#include "qtool/runner/driver.hpp"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <map>
#include <mutex>
#include <thread>
#include <unordered_set>

#include "qtool/formats/error.hpp"
#include "qtool/planner/arch.hpp"
#include "qtool/runner/cpu_kernels.hpp"
#include "qtool/runner/kernel_math.hpp"
#include "run_support.hpp"
#include "unit_ops.hpp"

namespace qtool::runner {

const char* lane_name(Lane lane) {
  switch (lane) {
    case Lane::Copy: return "copy";
    case Lane::Compute: return "compute";
    case Lane::DiskRead: return "disk read";
  }
  return "?";
}

std::string TraceEvent::lane_label() const {
  return lane == Lane::DiskRead ? std::string(lane_name(lane)) : str_cat("gpu", device, " ", lane_name(lane));
}

const char* memory_kind_name(MemoryKind kind) {
  switch (kind) {
    case MemoryKind::ResidentArena: return "resident_arena";
    case MemoryKind::StreamedHeldResident: return "streamed_groups_held_resident";
    case MemoryKind::DeviceSlots: return "device_slots";
    case MemoryKind::ActivationIn: return "activation_in";
    case MemoryKind::ActivationOut: return "activation_out";
    case MemoryKind::DequantScratch: return "dequant_scratch";
    case MemoryKind::CublasWorkspace: return "cublas_workspace";
    case MemoryKind::ForwardActivations: return "forward_activations";
  }
  return "?";
}

LayerDigest host_digest(const uint8_t* bytes, uint64_t n, DType dtype) {
  LayerDigest d;
  const uint64_t nbytes = n * dtype_size(dtype);
  for (uint64_t k = 0; k * 4 < nbytes; ++k) {
    uint32_t word = 0;
    std::memcpy(&word, bytes + 4 * k, std::min<uint64_t>(4, nbytes - 4 * k));
    d.hash += kmath::digest_term(k, word);
  }
  for (uint64_t i = 0; i < n; ++i) {
    switch (dtype) {
      case DType::BF16: {
        uint16_t h;
        std::memcpy(&h, bytes + 2 * i, 2);
        d.nonfinite += (h & 0x7F80u) == 0x7F80u;
        break;
      }
      case DType::F16: {
        uint16_t h;
        std::memcpy(&h, bytes + 2 * i, 2);
        d.nonfinite += (h & 0x7C00u) == 0x7C00u;
        break;
      }
      case DType::F32: {
        uint32_t u;
        std::memcpy(&u, bytes + 4 * i, 4);
        d.nonfinite += (u & 0x7F800000u) == 0x7F800000u;
        break;
      }
      default: break;
    }
  }
  return d;
}

uint64_t activation_capacity(const Checkpoint& checkpoint, const Schedule& schedule, uint64_t tokens,
                             uint64_t batch, const std::vector<std::unique_ptr<Forward>>& forwards) {
  uint64_t most = 0;
  for (size_t ci = 0; ci < checkpoint.components().size(); ++ci) {
    uint64_t need = 0;
    if (ci < forwards.size() && forwards[ci]) {
      const planner::Arch& arch = forwards[ci]->arch();
      const DType dtype = planner::model_dtype(arch, checkpoint.components()[ci]);
      for (const planner::ActivationItem& item :
           planner::activation_items(arch, static_cast<int64_t>(batch), static_cast<int64_t>(tokens), dtype))
        need += item.bytes;
      need += need / 4 + (1u << 20);
    } else {
      uint64_t in = 0, out = 0;
      for (const LinearTask& l : schedule.linears)
        if (l.component_index == ci) {
          in = std::max(in, l.in());
          out = std::max(out, l.out());
        }
      need = tokens * (in + out) * 2 + 2 * kArenaAlign;
    }
    most = std::max(most, need);
  }
  return most;
}

namespace {

using Clock = std::chrono::steady_clock;

enum class StepState : uint8_t { Pending, Held, Released };

// The units a component runs and how: its forward, or its linears (one unit per plan step).
class UnitRunner {
 public:
  virtual ~UnitRunner() = default;
  virtual const std::vector<std::string>& units() const = 0;
  virtual void begin(Ops& ops, uint32_t run_step) = 0;
  virtual void run_unit(size_t unit, Ops& ops, WeightSource& weights) = 0;
  virtual void end(Ops& ops, ComponentRun& run) = 0;
};

class ForwardRunner final : public UnitRunner {
 public:
  ForwardRunner(Forward& forward, std::vector<HostTensor> inputs)
      : forward_(forward), inputs_(std::move(inputs)) {}
  const std::vector<std::string>& units() const override { return forward_.units(); }
  void begin(Ops& ops, uint32_t) override { forward_.begin(ops, inputs_); }
  void run_unit(size_t unit, Ops& ops, WeightSource& weights) override {
    forward_.run_unit(unit, ops, weights);
  }
  void end(Ops& ops, ComponentRun& run) override {
    std::vector<HostTensor> outs = forward_.outputs(ops);
    run.output = std::move(outs.front());
    run.more_outputs.assign(std::make_move_iterator(outs.begin() + 1), std::make_move_iterator(outs.end()));
    run.inputs = inputs_;
  }

 private:
  Forward& forward_;
  std::vector<HostTensor> inputs_;
};

// Linears only: H [tokens, max_in] from the run step's seed, y = H[:, :in] W^T per linear.
class LinearRunner final : public UnitRunner {
 public:
  LinearRunner(const Checkpoint& checkpoint, const Schedule& schedule, uint32_t component, uint64_t tokens,
               uint64_t seed, std::vector<LayerDigest>* digests)
      : checkpoint_(checkpoint), schedule_(schedule), tokens_(tokens), seed_(seed), digests_(digests) {
    for (size_t si = 0; si < schedule.steps.size(); ++si) {
      if (schedule.steps[si].component != component) continue;
      steps_.push_back(si);
      names_.push_back(schedule.steps[si].name);
      for (uint32_t li : schedule.steps[si].linears) {
        max_in_ = std::max(max_in_, schedule.linears[li].in());
        max_out_ = std::max(max_out_, schedule.linears[li].out());
      }
    }
  }
  const std::vector<std::string>& units() const override { return names_; }
  const std::vector<size_t>& steps() const { return steps_; }
  uint64_t in_bytes() const { return tokens_ * max_in_ * 2; }
  uint64_t out_bytes() const { return tokens_ * max_out_ * 2; }
  void begin(Ops& ops, uint32_t run_step) override {
    run_step_ = run_step;
    if (max_in_ == 0) return;
    h_ = ops.alloc(static_cast<int64_t>(tokens_), static_cast<int64_t>(max_in_), DType::BF16);
    y_ = ops.alloc(static_cast<int64_t>(tokens_), static_cast<int64_t>(max_out_), DType::BF16);
    std::vector<uint16_t> host(tokens_ * max_in_);
    for (uint64_t t = 0; t < tokens_; ++t)
      cpu::generate_activation_rows(kmath::activation_stream(seed_ + run_step), max_in_, 0, max_in_,
                                    host.data(), t, t + 1);
    ops.upload(host.data(), h_);
  }
  void run_unit(size_t unit, Ops& ops, WeightSource& weights) override {
    for (uint32_t li : schedule_.steps[steps_[unit]].linears) {
      const LinearTask& l = schedule_.linears[li];
      const Component& comp = checkpoint_.components()[l.component_index];
      const DequantParams w = weights.get(comp.info(l.part_entry[kPartWeight]).name);
      const Mat y{y_.data, DType::BF16, static_cast<int64_t>(tokens_), static_cast<int64_t>(l.out()),
                  static_cast<int64_t>(l.out())};
      ops.linear(h_.cols_view(0, static_cast<int64_t>(l.in())), w, nullptr, y);
      if (digests_) {
        std::vector<uint8_t> host(tokens_ * l.out() * 2);
        ops.download(y, host.data());
        (*digests_)[li] = host_digest(host.data(), tokens_ * l.out(), DType::BF16);
      }
    }
  }
  void end(Ops&, ComponentRun&) override {}

 private:
  const Checkpoint& checkpoint_;
  const Schedule& schedule_;
  uint64_t tokens_, seed_;
  std::vector<LayerDigest>* digests_;
  std::vector<size_t> steps_;
  std::vector<std::string> names_;
  uint64_t max_in_ = 0, max_out_ = 0;
  uint32_t run_step_ = 0;
  Mat h_, y_;
};

// Whether plan module `module` belongs to forward unit `unit` (equal, or one inside the other).
bool in_unit(const std::string& module, const std::string& unit) {
  const auto inside = [](const std::string& a, const std::string& b) {
    return a.size() > b.size() && a.compare(0, b.size(), b) == 0 && a[b.size()] == '.';
  };
  return module == unit || inside(module, unit) || inside(unit, module);
}

std::string label(const std::string& component, const std::string& name) {
  return component.empty() ? name : component + "/" + name;
}

class Driver;

// The WeightSource of one unit: tensors resolved in the unit's steps.
class StepWeights final : public WeightSource {
 public:
  StepWeights(Driver& driver, uint32_t component) : driver_(driver), component_(component) {}
  void enter(size_t unit, const std::string& unit_name, const std::vector<size_t>* steps) {
    unit_ = unit;
    unit_name_ = &unit_name;
    steps_ = steps;
  }
  DequantParams get(std::string_view tensor) override;
  bool has(std::string_view tensor) const override;
  std::unordered_set<uint64_t> read;  // (component, entry) keys of the tensors read

 private:
  Driver& driver_;
  uint32_t component_;
  size_t unit_ = 0;
  const std::string* unit_name_ = nullptr;
  const std::vector<size_t>* steps_ = nullptr;
};

uint64_t entry_key(Component::Entry e) { return (static_cast<uint64_t>(e.shard) << 32) | e.index; }

class Driver {
 public:
  Driver(Platform& platform, const Checkpoint& checkpoint, const Schedule& schedule,
         const RunOptions& options)
      : platform_(platform), checkpoint_(checkpoint), schedule_(schedule), options_(options) {}
  RunResult run();

  const Schedule& schedule() const { return schedule_; }
  const Checkpoint& checkpoint() const { return checkpoint_; }
  // The arena step `si` reads from and its base address now (waiting for its copy if streamed).
  uint32_t arena_of(size_t si) const { return schedule_.steps[si].arena; }
  const uint8_t* acquire(size_t si, const std::string& tensor);

 private:
  bool streamed(size_t si) const { return planned_ && schedule_.steps[si].streamed; }
  // The copy of streamed step `si` in the current pass.
  size_t item(size_t si) const { return pass_item0_[cur_pass_] + rank_[si]; }
  void set_up();
  void make_forwards();
  void make_passes();
  void copy_loop(uint32_t run_step);
  void wait_copy(size_t si);
  void finish(size_t si);
  void run_step(uint32_t run_step);
  void run_component(uint32_t component, uint32_t run_step, size_t pass);
  void unit_steps(uint32_t component, const std::vector<std::string>& units,
                  std::vector<std::vector<size_t>>& out, std::vector<size_t>& last_unit) const;
  void trace(std::string name, Lane lane, int device, uint32_t step, int32_t plan_step, Clock::time_point a,
             Clock::time_point b, uint64_t bytes);

  Platform& platform_;
  const Checkpoint& checkpoint_;
  const Schedule& schedule_;
  const RunOptions& options_;
  bool planned_ = true;
  RunResult result_;
  std::map<int, std::unique_ptr<Device>> devices_;
  std::vector<const uint8_t*> on_device_;                // per arena: its device copy, if held there
  std::vector<std::unique_ptr<HostBuffer>> host_arena_;  // per arena: pinned copy of a cpu group
  std::vector<std::unique_ptr<HostBuffer>> staging_;     // disk groups
  std::map<int, std::pair<uint8_t*, uint64_t>> slots_;   // per GPU: ring base, slot bytes
  uint64_t k_ = 1;                                       // slots per ring
  // A run step runs passes: one run of one component's units each, in order (each component
  // once; a FluxPipeline's transformer once per denoising step). The copy thread copies every
  // pass's streamed steps, in pass order.
  struct CopyItem {
    size_t step = 0;
    uint64_t seq = 0;  // its sequence on its GPU
  };
  std::vector<uint32_t> passes_;         // per pass: its component
  std::vector<std::string> pass_label_;  // per pass: "transformer[denoise 3]"
  size_t cur_pass_ = 0;
  std::vector<CopyItem> items_;     // the copies of a run step, in order
  std::vector<size_t> pass_item0_;  // per pass: its first item
  std::vector<size_t> rank_;        // per streamed step: its position among its component's streamed steps
  std::vector<uint64_t> dev_rank_;  // ... among those on its GPU
  std::map<int, uint64_t> device_items_;                      // per GPU: its items per run step
  std::unique_ptr<FluxPipelineFlow> flow_;                    // a FluxPipeline run
  std::vector<std::unique_ptr<Forward>> forwards_;            // per component (null: linears only)
  std::vector<std::vector<HostTensor>> inputs_;               // per component with a forward
  std::vector<size_t> digest_base_;                           // per pass: its first unit digest
  std::vector<std::vector<std::vector<size_t>>> unit_steps_;  // per forward component, per unit: its steps
  std::vector<std::vector<size_t>> last_unit_;  // per forward component, per step: its last unit
  uint64_t activation_bytes_ = 0;
  std::unique_ptr<ShardFiles> files_;
  Clock::time_point origin_;
  std::mutex trace_mu_;

  // The ring, per run step.
  std::mutex mu_;
  std::condition_variable cv_;
  size_t copies_done_ = 0;
  bool abort_ = false;
  std::exception_ptr copy_error_;
  std::vector<StepState> state_;               // per item
  std::map<int, uint64_t> released_;           // per GPU: its first step (by seq) not yet released
  std::map<int, std::vector<uint8_t>> freed_;  // per GPU, per seq: released
};

void Driver::trace(std::string name, Lane lane, int device, uint32_t step, int32_t plan_step,
                   Clock::time_point a, Clock::time_point b, uint64_t bytes) {
  if (!options_.trace) return;
  std::lock_guard<std::mutex> lock(trace_mu_);
  result_.trace.push_back({std::move(name), lane, device, step, plan_step,
                           std::chrono::duration<double, std::micro>(a - origin_).count(),
                           std::chrono::duration<double, std::micro>(b - a).count(), bytes});
}

void Driver::make_forwards() {
  const auto& comps = checkpoint_.components();
  forwards_.resize(comps.size());
  inputs_.resize(comps.size());
  if (!options_.forwards) return;
  if (options_.denoise_steps > 0 && is_flux_pipeline(checkpoint_))
    flow_ = std::make_unique<FluxPipelineFlow>(checkpoint_, options_.denoise_steps,
                                               static_cast<int64_t>(options_.tokens), options_.seed,
                                               options_.inputs);
  for (size_t ci = 0; ci < comps.size(); ++ci) {
    bool runs = false;
    for (const ExecStep& st : schedule_.steps) runs = runs || st.component == ci;
    if (!runs) continue;
    forwards_[ci] = options_.make_forward ? options_.make_forward(comps[ci]) : make_forward(comps[ci]);
    if (!forwards_[ci]) continue;
    bool in_flow = false;
    for (const FluxPipelineFlow::Pass& p : flow_ ? flow_->passes() : std::vector<FluxPipelineFlow::Pass>{})
      in_flow = in_flow || p.component == ci;
    if (in_flow) continue;  // its inputs come from the pipeline, pass by pass
    const auto it = options_.inputs.find(comps[ci].name());
    if (it != options_.inputs.end()) {
      forwards_[ci]->check_inputs(it->second, static_cast<int64_t>(options_.tokens));
      inputs_[ci] = it->second;
    } else {
      inputs_[ci] = forwards_[ci]->random_inputs(1, static_cast<int64_t>(options_.tokens), options_.seed);
    }
  }
}

void Driver::make_passes() {
  const auto& comps = checkpoint_.components();
  std::vector<uint8_t> done(comps.size(), 0);
  const auto add = [&](uint32_t ci, std::string label) {
    done[ci] = 1;
    passes_.push_back(ci);
    pass_label_.push_back(std::move(label));
  };
  if (flow_)
    for (const FluxPipelineFlow::Pass& p : flow_->passes()) {
      bool runs = false;
      for (const ExecStep& st : schedule_.steps) runs = runs || st.component == p.component;
      if (!runs)
        fail(ErrorKind::InvalidInput, "the plan runs no step of component '", comps[p.component].name(),
             "', which the FluxPipeline needs: plan the whole pipeline folder");
      add(p.component, p.denoise_step < 0
                           ? comps[p.component].name()
                           : str_cat(comps[p.component].name(), "[denoise ", p.denoise_step, "]"));
    }
  for (const ExecStep& st : schedule_.steps)
    if (!done[st.component]) add(st.component, comps[st.component].name());
}

void Driver::set_up() {
  for (int d : schedule_.devices) devices_[d] = platform_.open(d);
  on_device_.assign(schedule_.arenas.size(), nullptr);
  host_arena_.resize(schedule_.arenas.size());
  for (size_t ai = 0; ai < schedule_.arenas.size(); ++ai) {
    const Arena& a = schedule_.arenas[ai];
    if (!schedule_.arena_used(ai) || a.bytes == 0) continue;
    if (!a.streamed() || !planned_) {
      Device& dev = *devices_.at(a.device);
      uint8_t* mem =
          dev.allocate(a.streamed() ? MemoryKind::StreamedHeldResident : MemoryKind::ResidentArena, a.bytes);
      const auto host = platform_.host_buffer(a.bytes);
      fill_arena(checkpoint_, a, host->data());
      dev.upload(mem, {host->data(), a.bytes});
      on_device_[ai] = mem;
    } else if (a.placement == Placement::Cpu) {
      host_arena_[ai] = platform_.host_buffer(a.bytes);
      fill_arena(checkpoint_, a, host_arena_[ai]->data());
    }
  }
  k_ = std::max<uint64_t>(1, schedule_.n_slots);
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
      result_.h2d_bytes_per_step += schedule_.arenas[schedule_.steps[si].arena].bytes;
      ++result_.copies_per_step[si];
    }
  }
  for (auto& [d, dev] : devices_) {
    const uint64_t slot_bytes = planned_ ? schedule_.slot_bytes(d) : 0;
    if (slot_bytes) slots_[d] = {dev->allocate(MemoryKind::DeviceSlots, k_ * slot_bytes), slot_bytes};
  }
  const uint64_t staging_bytes = planned_ ? schedule_.max_staging_bytes() : 0;
  for (uint64_t i = 0; staging_bytes && i < std::max<uint64_t>(1, options_.sizing.staging_buffers); ++i)
    staging_.push_back(platform_.host_buffer(staging_bytes));
  if (staging_bytes) files_ = std::make_unique<ShardFiles>(checkpoint_);
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
        cv_.wait(lock, [&] { return abort_ || released_[st.device] + k_ > seq; });
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
      const uint32_t slot = static_cast<uint32_t>(seq % k_);
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
  devices_.at(schedule_.steps[si].device)->wait_copied(static_cast<uint32_t>(items_[k].seq % k_));
}

// The step's slot may be refilled: wait for its copy if it was never read, release it.
void Driver::finish(size_t si) {
  const size_t k = item(si);
  if (state_[k] == StepState::Released) return;
  if (state_[k] == StepState::Pending) wait_copy(si);
  const int d = schedule_.steps[si].device;
  const uint64_t seq = items_[k].seq;
  devices_.at(d)->release(static_cast<uint32_t>(seq % k_));
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
    const uint32_t a = schedule_.steps[si].arena;
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
  return base + (items_[k].seq % k_) * slot_bytes;
}

DequantParams StepWeights::get(std::string_view tensor) {
  const Schedule& s = driver_.schedule();
  const Component& comp = driver_.checkpoint().components()[component_];
  const WeightRef* w = s.find_weight(component_, tensor);
  if (!w)
    fail(ErrorKind::InvalidInput, "the forward of ",
         comp.name().empty() ? "the model" : "'" + comp.name() + "'", " needs tensor '", tensor, "', which ",
         driver_.checkpoint().root().string(), " lacks (or holds in a dtype the runner cannot read)");
  for (size_t si : *steps_) {
    const uint32_t arena = driver_.arena_of(si);
    if (s.offset_in(arena, component_, w->part_entry[kPartWeight]) == kNoPart) continue;
    const uint8_t* base = driver_.acquire(si, std::string(tensor));
    const DequantParams p = s.bind_weight(*w, arena, base);
    QTOOL_ASSERT(p.weight != nullptr);  // build_schedule keeps a weight and its quant state together
    for (const Component::Entry& e : w->tensors) read.insert(entry_key(e));
    return p;
  }
  fail(ErrorKind::InvalidInput, "unit '", *unit_name_, "' of ",
       comp.name().empty() ? "the model" : comp.name(), " reads tensor '", tensor,
       "', but the plan puts it in none of the unit's steps (",
       steps_->empty() ? std::string("it has none") : s.steps[steps_->front()].name,
       "): was the plan made for another checkpoint or an older qtool?");
}

bool StepWeights::has(std::string_view tensor) const {
  return driver_.schedule().find_weight(component_, tensor) != nullptr;
}

void Driver::unit_steps(uint32_t component, const std::vector<std::string>& units,
                        std::vector<std::vector<size_t>>& out, std::vector<size_t>& last_unit) const {
  out.assign(units.size(), {});
  last_unit.assign(schedule_.steps.size(), SIZE_MAX);
  const Component& comp = checkpoint_.components()[component];
  for (size_t si = 0; si < schedule_.steps.size(); ++si) {
    const ExecStep& st = schedule_.steps[si];
    if (st.component != component) continue;
    bool any = false;
    for (size_t u = 0; u < units.size(); ++u) {
      bool hit = false;
      for (const std::string& m : st.modules) hit = hit || in_unit(m, units[u]);
      if (!hit) continue;
      out[u].push_back(si);
      last_unit[si] = u;
      any = true;
    }
    if (!any)
      fail(ErrorKind::InvalidInput, "plan step '", st.name, "' runs modules that are in no unit of the ",
           forwards_[component]->architecture(), " forward of ", label(comp.name(), "(component)"),
           ": was the plan made for another checkpoint?");
  }
  // The copies follow the plan's order, the units the forward's: they must agree.
  size_t last = 0;
  for (size_t u = 0; u < units.size(); ++u) {
    for (size_t si : out[u]) {
      if (si < last)
        fail(ErrorKind::InvalidInput, "the plan runs step '", schedule_.steps[last].name, "' before step '",
             schedule_.steps[si].name, "', but the ", forwards_[component]->architecture(),
             " forward runs unit '", units[u],
             "' first: plan again with this qtool (its model templates give the forward's order)");
      last = si;
    }
  }
  // A unit holds every step it reads until it ends: its streamed steps must fit the ring at once.
  for (size_t u = 0; u < units.size(); ++u) {
    std::map<int, std::pair<uint64_t, uint64_t>> span;  // GPU -> first, last seq
    for (size_t si : out[u]) {
      if (!streamed(si)) continue;
      const uint64_t seq = dev_rank_[si];
      auto [it, fresh] = span.try_emplace(schedule_.steps[si].device, seq, seq);
      if (!fresh) it->second = {std::min(it->second.first, seq), std::max(it->second.second, seq)};
    }
    for (const auto& [d, range] : span)
      if (range.second - range.first + 1 > k_)
        fail(ErrorKind::InvalidInput, "unit '", units[u], "' of the ", forwards_[component]->architecture(),
             " forward reads ", range.second - range.first + 1,
             " streamed groups at once but the plan gives GPU ", d, " ", k_,
             " slots: plan again with --prefetch ", range.second - range.first + 1, " or --offload block");
  }
}

void Driver::run_component(uint32_t ci, uint32_t run_step, size_t pass) {
  const Component& comp = checkpoint_.components()[ci];
  ComponentRun& run = result_.components[ci];
  const bool in_flow = flow_ && pass < flow_->passes().size();
  const bool first_pass = run_step == 0 && run.passes == 0;
  std::unique_ptr<UnitRunner> runner;
  std::vector<std::vector<size_t>> steps_of;
  std::vector<size_t> last_unit;
  std::vector<LayerDigest>* linear_digests = options_.digests ? &result_.digests[run_step] : nullptr;
  if (forwards_[ci]) {
    runner = std::make_unique<ForwardRunner>(*forwards_[ci], in_flow ? flow_->inputs(pass) : inputs_[ci]);
    steps_of = unit_steps_[ci];
    last_unit = last_unit_[ci];
  } else {
    auto lr = std::make_unique<LinearRunner>(checkpoint_, schedule_, ci, options_.tokens, options_.seed,
                                             linear_digests);
    last_unit.assign(schedule_.steps.size(), SIZE_MAX);
    for (size_t u = 0; u < lr->steps().size(); ++u) {
      steps_of.push_back({lr->steps()[u]});
      last_unit[lr->steps()[u]] = u;
    }
    if (first_pass)
      for (auto& [d, dev] : devices_) {
        bool here = false;
        for (size_t si : lr->steps()) here = here || schedule_.steps[si].device == d;
        if (!here) continue;
        dev->note(MemoryKind::ActivationIn, lr->in_bytes());
        dev->note(MemoryKind::ActivationOut, lr->out_bytes());
      }
    runner = std::move(lr);
  }
  const int first_device = steps_of.empty() || steps_of.front().empty()
                               ? schedule_.devices.front()
                               : schedule_.steps[steps_of.front().front()].device;
  Ops& ops = platform_.ops(first_device, activation_bytes_);
  const size_t mark = ops.mark();
  ops.reset_peak();
  const size_t digest0 = digest_base_[pass];
  UnitOps unit_ops(ops, forwards_[ci] && options_.digests);
  StepWeights weights(*this, ci);
  runner->begin(unit_ops, run_step);
  int device = first_device;
  for (size_t u = 0; u < runner->units().size(); ++u) {
    weights.enter(u, runner->units()[u], &steps_of[u]);
    if (!steps_of[u].empty()) device = schedule_.steps[steps_of[u].front()].device;
    unit_ops.start_unit();
    const auto t0 = Clock::now();
    runner->run_unit(u, unit_ops, weights);
    trace(forwards_[ci] ? label(pass_label_[pass], runner->units()[u]) : runner->units()[u], Lane::Compute,
          device, run_step, steps_of[u].empty() ? -1 : static_cast<int32_t>(steps_of[u].front()), t0,
          Clock::now(), 0);
    if (forwards_[ci] && options_.digests)
      result_.unit_digests[run_step][digest0 + u] = unit_ops.unit_digest();
    for (size_t si : steps_of[u])
      if (last_unit[si] == u && streamed(si)) finish(si);
  }
  runner->end(unit_ops, run);
  if (forwards_[ci]) {
    const HostTensor& out = run.output;
    if (options_.digests)
      result_.unit_digests[run_step][digest0 + runner->units().size()] =
          host_digest(out.bytes.data(), out.bytes.size() / dtype_size(out.dtype), out.dtype);
    if (in_flow) {
      std::vector<HostTensor> outs{out};
      outs.insert(outs.end(), run.more_outputs.begin(), run.more_outputs.end());
      flow_->take(pass, outs);
    }
    if (first_pass) {
      for (const Component::Entry& e : comp.entries()) {
        const std::string& name = comp.info(e).name;
        if (!weights.read.count(entry_key(e)) && !schedule_.tied[ci].count(name))
          run.unread_tensors.push_back(name);
      }
    }
  }
  run.activation_peak_bytes = std::max(run.activation_peak_bytes, ops.peak_bytes());
  ops.release(mark);
  if (run_step == 0) ++run.passes;
  if (forwards_[ci] && first_pass)
    for (auto& [d, dev] : devices_) {
      bool here = false;
      for (const auto& v : steps_of)
        for (size_t si : v) here = here || schedule_.steps[si].device == d;
      if (here) dev->note(MemoryKind::ForwardActivations, run.activation_peak_bytes);
    }
}

void Driver::run_step(uint32_t run_step) {
  const auto t_step = Clock::now();
  copies_done_ = 0;
  abort_ = false;
  copy_error_ = nullptr;
  state_.assign(items_.size(), StepState::Pending);
  released_.clear();
  freed_.clear();
  for (const auto& [d, n] : device_items_) freed_[d].assign(n, 0);
  // A pipeline starts again from its inputs each run step.
  if (flow_ && run_step > 0)
    flow_ = std::make_unique<FluxPipelineFlow>(checkpoint_, options_.denoise_steps,
                                               static_cast<int64_t>(options_.tokens), options_.seed,
                                               options_.inputs);
  std::thread copier([this, run_step] { copy_loop(run_step); });
  try {
    for (size_t p = 0; p < passes_.size(); ++p) {
      cur_pass_ = p;
      run_component(passes_[p], run_step, p);
    }
    if (flow_) result_.pipeline = flow_->result();
  } catch (...) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      abort_ = true;
    }
    cv_.notify_all();
    copier.join();
    if (copy_error_) std::rethrow_exception(copy_error_);
    throw;
  }
  copier.join();
  if (copy_error_) std::rethrow_exception(copy_error_);
  for (auto& [d, dev] : devices_) dev->synchronize();
  result_.step_ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t_step).count());
}

RunResult Driver::run() {
  planned_ = options_.mode == Mode::Planned;
  result_.backend = platform_.name();
  result_.device_names = platform_.device_names();
  result_.mode = options_.mode;
  make_forwards();
  make_passes();
  set_up();
  uint64_t batch = 1;  // the largest batch of the inputs (dimension 0 of each)
  for (const auto& inputs : inputs_)
    for (const HostTensor& t : inputs)
      if (t.shape.size() >= 2) batch = std::max(batch, static_cast<uint64_t>(t.shape[0]));
  if (flow_)
    for (const auto& [name, inputs] : flow_->given_inputs())
      for (const HostTensor& t : inputs)
        if (t.shape.size() >= 2) batch = std::max(batch, static_cast<uint64_t>(t.shape[0]));
  activation_bytes_ = activation_capacity(checkpoint_, schedule_, options_.tokens, batch, forwards_);
  const auto& comps = checkpoint_.components();
  unit_steps_.resize(comps.size());
  last_unit_.resize(comps.size());
  for (uint32_t ci = 0; ci < comps.size(); ++ci)
    if (forwards_[ci]) unit_steps(ci, forwards_[ci]->units(), unit_steps_[ci], last_unit_[ci]);
  result_.components.resize(comps.size());
  for (size_t ci = 0; ci < comps.size(); ++ci) {
    ComponentRun& run = result_.components[ci];
    run.component = comps[ci].name();
    if (!forwards_[ci]) continue;
    run.forward = true;
    run.architecture = forwards_[ci]->architecture();
    run.units = forwards_[ci]->units();
  }
  // Digest names: every forward pass's units, then its output, in run order.
  digest_base_.assign(passes_.size(), 0);
  for (size_t p = 0; p < passes_.size(); ++p) {
    if (!forwards_[passes_[p]]) continue;
    digest_base_[p] = result_.unit_names.size();
    for (const std::string& u : forwards_[passes_[p]]->units())
      result_.unit_names.push_back(label(pass_label_[p], u));
    result_.unit_names.push_back(label(pass_label_[p], "output"));
  }
  result_.digests.assign(options_.steps, std::vector<LayerDigest>(schedule_.linears.size()));
  result_.unit_digests.assign(options_.steps, std::vector<LayerDigest>(result_.unit_names.size()));
  origin_ = Clock::now();
  for (uint32_t step = 0; step < options_.steps; ++step) run_step(step);
  for (auto& [d, dev] : devices_) result_.memory.push_back(dev->memory());
  // Components that never ran a step keep no entry.
  std::erase_if(result_.components, [&](const ComponentRun& r) {
    const Component* c = checkpoint_.find_component(r.component);
    for (const ExecStep& st : schedule_.steps)
      if (&comps[st.component] == c) return false;
    return true;
  });
  return std::move(result_);
}

}  // namespace

RunResult drive(Platform& platform, const Checkpoint& checkpoint, const Schedule& schedule,
                const RunOptions& options) {
  return Driver(platform, checkpoint, schedule, options).run();
}

HostTensor run_forward(Forward& forward, Ops& ops, WeightSource& weights,
                       const std::vector<HostTensor>& inputs) {
  const size_t mark = ops.mark();
  forward.begin(ops, inputs);
  for (size_t u = 0; u < forward.units().size(); ++u) forward.run_unit(u, ops, weights);
  HostTensor out = forward.output(ops);
  ops.release(mark);
  return out;
}

}  // namespace qtool::runner
