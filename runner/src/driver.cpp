// The schedule driver (driver.hpp): the names and digests of its results, its set-up (forwards,
// passes, digest names) and the run steps in order. The copy thread and the slot ring are in
// driver_copy.cpp, the compute walk over the units in driver_units.cpp.
#include "qtool/runner/driver.hpp"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <thread>

#include "driver_impl.hpp"
#include "qtool/formats/error.hpp"
#include "qtool/planner/arch.hpp"
#include "qtool/runner/kernel_math.hpp"

namespace qtool::runner {

const char* lane_name(Lane lane) {
  static constexpr std::array<const char*, 3> kNames = {"copy", "compute", "disk read"};
  static_assert(kNames.size() == static_cast<size_t>(Lane::DiskRead) + 1);
  return enum_name(lane, kNames);
}

std::string TraceEvent::lane_label() const {
  return lane == Lane::DiskRead ? std::string(lane_name(lane)) : str_cat("gpu", device, " ", lane_name(lane));
}

const char* memory_kind_name(MemoryKind kind) {
  static constexpr std::array<const char*, 8> kNames = {"resident_arena",   "streamed_groups_held_resident",
                                                        "device_slots",     "activation_in",
                                                        "activation_out",   "dequant_scratch",
                                                        "cublas_workspace", "forward_activations"};
  static_assert(kNames.size() == static_cast<size_t>(MemoryKind::ForwardActivations) + 1);
  return enum_name(kind, kNames);
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

std::vector<OpsNeed> ops_needs(const Checkpoint& checkpoint, const Schedule& schedule, uint64_t tokens,
                               uint64_t batch, const std::vector<std::unique_ptr<Forward>>& forwards,
                               bool pipeline) {
  std::vector<OpsNeed> needs(checkpoint.components().size());
  for (size_t ci = 0; ci < needs.size(); ++ci) {
    uint64_t need = 0;
    if (ci < forwards.size() && forwards[ci]) {
      const planner::Arch& arch = forwards[ci]->arch();
      const DType dtype = planner::model_dtype(arch, checkpoint.components()[ci]);
      const int64_t t = pipeline ? planner::flux_pipeline_tokens(arch, static_cast<int64_t>(tokens))
                                 : static_cast<int64_t>(tokens);
      for (const planner::ActivationItem& item :
           planner::activation_items(arch, static_cast<int64_t>(batch), t, dtype))
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
    needs[ci].activation_bytes = need;
  }
  for (const LinearTask& l : schedule.linears)
    if (l.needs_scratch() && l.component_index < needs.size()) {
      uint64_t& s = needs[l.component_index].dequant_scratch_bytes;
      s = std::max<uint64_t>(s, l.params.numel() * 2);
    }
  return needs;
}

namespace driver_detail {

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

void Driver::run_step(uint32_t run_step) {
  const auto t_step = Clock::now();
  copies_done_ = 0;
  peer_bytes_ = 0;
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
  ring_phase_ = -1;
  std::thread copier([this, run_step] { copy_loop(run_step); });
  try {
    for (size_t p = 0; p < passes_.size(); ++p) {
      cur_pass_ = p;
      const bool first = phased_ && (p == 0 || pass_phase_[p] != pass_phase_[p - 1]);
      const bool last = phased_ && (p + 1 == passes_.size() || pass_phase_[p + 1] != pass_phase_[p]);
      if (first) begin_phase(pass_phase_[p]);
      run_component(passes_[p], run_step, p);
      if (phased_) ++result_.phases[pass_phase_[p]].passes;
      if (last) end_phase(pass_phase_[p]);
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
  result_.peer_bytes_per_step = peer_bytes_;
  result_.peer_ms.push_back(platform_.take_transfer_ms());
}

RunResult Driver::run() {
  planned_ = options_.mode == Mode::Planned;
  phased_ = planned_ && !options_.phases.empty();
  result_.backend = platform_.name();
  result_.device_names = platform_.device_names();
  result_.mode = options_.mode;
  make_forwards();
  make_passes();
  set_up();
  uint64_t batch = 1;  // the largest batch of the inputs
  for (size_t ci = 0; ci < inputs_.size(); ++ci)
    if (ci < forwards_.size() && forwards_[ci] && !inputs_[ci].empty())
      batch = std::max(batch, static_cast<uint64_t>(forwards_[ci]->batch_of(inputs_[ci])));
  // The pipeline's own inputs (token ids, latents) are all batch-major.
  if (flow_)
    for (const auto& [name, inputs] : flow_->given_inputs())
      for (const HostTensor& t : inputs)
        if (t.shape.size() >= 2) batch = std::max(batch, static_cast<uint64_t>(t.shape[0]));
  size_ops(ops_needs(checkpoint_, schedule_, options_.tokens, batch, forwards_, flow_ != nullptr));
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

}  // namespace driver_detail

RunResult drive(Platform& platform, const Checkpoint& checkpoint, const Schedule& schedule,
                const RunOptions& options) {
  return driver_detail::Driver(platform, checkpoint, schedule, options).run();
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
