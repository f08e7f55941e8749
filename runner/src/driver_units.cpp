// The schedule driver's compute walk (driver_impl.hpp): a component's units run in order, by its
// forward or by its linears, each unit's tensors fetched from the steps the plan puts them in.
#include <algorithm>
#include <tuple>

#include "driver_impl.hpp"
#include "qtool/formats/error.hpp"
#include "qtool/runner/cpu_kernels.hpp"
#include "qtool/runner/kernel_math.hpp"
#include "unit_ops.hpp"

namespace qtool::runner::driver_detail {
namespace {

class ForwardRunner final : public UnitRunner {
 public:
  ForwardRunner(Forward& forward, std::vector<HostTensor> inputs, bool read_outputs)
      : forward_(forward), inputs_(std::move(inputs)), read_outputs_(read_outputs) {}
  const std::vector<std::string>& units() const override { return forward_.units(); }
  void begin(Ops& ops, int, uint32_t) override { forward_.begin(ops, inputs_); }
  void run_unit(size_t unit, Ops& ops, WeightSource& weights) override {
    forward_.run_unit(unit, ops, weights);
  }
  void end(Ops& ops, ComponentRun& run) override {
    if (!read_outputs_) return;
    std::vector<HostTensor> outs = forward_.outputs(ops);
    run.output = std::move(outs.front());
    run.more_outputs.assign(std::make_move_iterator(outs.begin() + 1), std::make_move_iterator(outs.end()));
    run.inputs = inputs_;
  }
  std::vector<Mat*> shared_state() override { return forward_.shared_state(); }

 private:
  Forward& forward_;
  std::vector<HostTensor> inputs_;
  bool read_outputs_;
};

// Linears only: H [tokens, max_in] from the run step's seed, y = H[:, :in] W^T per linear. Each
// GPU the component runs on makes its own H and y, sized by its own linears (what the plan
// reserves there): H's values depend only on (token, column), so every linear reads the same
// input wherever it runs, and nothing crosses between GPUs.
class LinearRunner final : public UnitRunner {
 public:
  LinearRunner(const Checkpoint& checkpoint, const Schedule& schedule, uint32_t component, uint64_t tokens,
               uint64_t seed, std::vector<LayerDigest>* digests)
      : checkpoint_(checkpoint), schedule_(schedule), tokens_(tokens), seed_(seed), digests_(digests) {
    for (size_t si = 0; si < schedule.steps.size(); ++si) {
      if (schedule.steps[si].component != component) continue;
      steps_.push_back(si);
      names_.push_back(schedule.steps[si].name);
      auto& [in, out] = max_[schedule.steps[si].device];
      for (uint32_t li : schedule.steps[si].linears) {
        in = std::max(in, schedule.linears[li].in());
        out = std::max(out, schedule.linears[li].out());
      }
    }
  }
  const std::vector<std::string>& units() const override { return names_; }
  const std::vector<size_t>& steps() const { return steps_; }
  // The bytes of H and y on `device` (0 where it runs none of the linears).
  uint64_t in_bytes(int device) const { return tokens_ * largest(device).first * 2; }
  uint64_t out_bytes(int device) const { return tokens_ * largest(device).second * 2; }
  void begin(Ops& ops, int device, uint32_t run_step) override {
    run_step_ = run_step;
    moved_to(ops, device);
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
  std::vector<Mat*> shared_state() override { return {}; }
  void moved_to(Ops& ops, int device) override {
    const auto [max_in, max_out] = largest(device);
    if (max_in == 0) return;
    if (const auto made = made_.find(device); made != made_.end()) {  // back on a GPU: its buffers stay
      std::tie(h_, y_) = made->second;
      return;
    }
    h_ = ops.alloc(static_cast<int64_t>(tokens_), static_cast<int64_t>(max_in), DType::BF16);
    y_ = ops.alloc(static_cast<int64_t>(tokens_), static_cast<int64_t>(max_out), DType::BF16);
    std::vector<uint16_t> host(tokens_ * max_in);
    for (uint64_t t = 0; t < tokens_; ++t)
      cpu::generate_activation_rows(kmath::activation_stream(seed_ + run_step_), max_in, 0, max_in,
                                    host.data(), t, t + 1);
    ops.upload(host.data(), h_);
    made_[device] = {h_, y_};
  }

 private:
  const Checkpoint& checkpoint_;
  const Schedule& schedule_;
  uint64_t tokens_, seed_;
  std::vector<LayerDigest>* digests_;
  std::vector<size_t> steps_;
  std::vector<std::string> names_;
  // The largest in and out of the linears on `device` (0, 0 where none).
  std::pair<uint64_t, uint64_t> largest(int device) const {
    const auto it = max_.find(device);
    return it == max_.end() ? std::pair<uint64_t, uint64_t>{0, 0} : it->second;
  }

  std::map<int, std::pair<uint64_t, uint64_t>> max_;  // per GPU: its linears' largest in and out
  std::map<int, std::pair<Mat, Mat>> made_;           // per GPU: its H and y
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

}  // namespace

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
  // A unit computes on one GPU, where each of its steps must be.
  for (size_t u = 0; u < units.size(); ++u)
    for (size_t si : out[u])
      if (schedule_.steps[si].device != schedule_.steps[out[u].front()].device)
        fail(ErrorKind::InvalidInput, "unit '", units[u], "' of the ", forwards_[component]->architecture(),
             " forward reads plan steps on GPU ", schedule_.steps[out[u].front()].device, " ('",
             schedule_.steps[out[u].front()].name, "') and GPU ", schedule_.steps[si].device, " ('",
             schedule_.steps[si].name, "'): a unit runs on one GPU; plan again with this qtool");
  // A unit holds every step it reads until it ends: its streamed steps must fit the ring at once.
  for (size_t u = 0; u < units.size(); ++u) {
    std::map<int, std::pair<uint64_t, uint64_t>> span;  // GPU -> first, last seq
    uint64_t k = k_;
    for (size_t si : out[u]) {
      if (!streamed(si)) continue;
      k = slots_of(si);
      const uint64_t seq = dev_rank_[si];
      auto [it, fresh] = span.try_emplace(schedule_.steps[si].device, seq, seq);
      if (!fresh) it->second = {std::min(it->second.first, seq), std::max(it->second.second, seq)};
    }
    for (const auto& [d, range] : span)
      if (range.second - range.first + 1 > k)
        fail(ErrorKind::InvalidInput, "unit '", units[u], "' of the ", forwards_[component]->architecture(),
             " forward reads ", range.second - range.first + 1,
             " streamed groups at once but the plan gives GPU ", d, " ", k,
             " slots: plan again with --prefetch ", range.second - range.first + 1, " or --offload block");
  }
}

bool Driver::runs_on(const std::vector<std::vector<size_t>>& steps_of, int device) const {
  for (const auto& v : steps_of)
    for (size_t si : v)
      if (schedule_.steps[si].device == device) return true;
  return false;
}

ComponentUnits Driver::component_units(uint32_t ci, uint32_t run_step, size_t pass, bool first_pass) {
  ComponentUnits cu;
  if (forwards_[ci]) {
    const bool in_flow = flow_ && pass < flow_->passes().size();
    cu.runner = std::make_unique<ForwardRunner>(*forwards_[ci], in_flow ? flow_->inputs(pass) : inputs_[ci],
                                                options_.outputs || options_.digests || in_flow);
    cu.steps_of = unit_steps_[ci];
    cu.last_unit = last_unit_[ci];
    return cu;
  }
  std::vector<LayerDigest>* linear_digests = options_.digests ? &result_.digests[run_step] : nullptr;
  auto lr = std::make_unique<LinearRunner>(checkpoint_, schedule_, ci, options_.tokens, options_.seed,
                                           linear_digests);
  cu.last_unit.assign(schedule_.steps.size(), SIZE_MAX);
  for (size_t u = 0; u < lr->steps().size(); ++u) {
    cu.steps_of.push_back({lr->steps()[u]});
    cu.last_unit[lr->steps()[u]] = u;
  }
  if (first_pass)
    for (auto& [d, dev] : devices_) {
      if (!runs_on(cu.steps_of, d)) continue;
      dev->note(MemoryKind::ActivationIn, lr->in_bytes(d));
      dev->note(MemoryKind::ActivationOut, lr->out_bytes(d));
    }
  cu.runner = std::move(lr);
  return cu;
}

Ops& Driver::ops_on(uint32_t ci, int device, ComponentOps& used) {
  Ops& ops = platform_.ops(device, ops_need_[ci]);
  auto [it, fresh] = used.try_emplace(device, OpsInUse{&ops, 0, {}});
  if (fresh) {
    it->second.mark = ops.mark();
    ops.reset_peak();
  }
  QTOOL_ASSERT_MSG(it->second.ops == &ops, "GPU ", device, "'s ops were made anew during a component's run");
  return ops;
}

void Driver::hand_over(UnitRunner& runner, int from, int to, ComponentOps& used, uint32_t run_step) {
  const auto t0 = Clock::now();
  std::vector<std::pair<const void*, Mat>> moved;  // a view's old data -> its copy
  uint64_t bytes = 0;
  const std::vector<Mat*> state = runner.shared_state();
  std::vector<Mat>& left = used.at(from).left;
  left.clear();
  for (const Mat* m : state) left.push_back(*m);
  const std::vector<Mat>& back = used.at(to).left;  // empty: the state was never on `to`
  Ops& to_ops = *used.at(to).ops;
  for (size_t i = 0; i < state.size(); ++i) {
    Mat* m = state[i];
    if (m->data == nullptr) continue;
    const auto same =
        std::find_if(moved.begin(), moved.end(), [&](const auto& p) { return p.first == m->data; });
    if (same != moved.end()) {
      *m = same->second;
      continue;
    }
    QTOOL_ASSERT_MSG(m->dense(), "a forward's shared state [", m->rows, ", ", m->cols,
                     "] is not a dense buffer");
    const bool fits = i < back.size() && back[i].data && back[i].rows == m->rows && back[i].cols == m->cols &&
                      back[i].dtype == m->dtype;
    const Mat dst = fits ? back[i] : to_ops.alloc(m->rows, m->cols, m->dtype);
    platform_.transfer(from, *m, to, dst);
    bytes += static_cast<uint64_t>(m->rows * m->cols) * m->elem_bytes();
    moved.emplace_back(m->data, dst);
    *m = dst;
  }
  runner.moved_to(to_ops, to);
  peer_bytes_ += bytes;
  if (bytes)
    trace(str_cat("peer copy gpu", from, " -> gpu", to), Lane::Compute, to, run_step, -1, t0, Clock::now(),
          bytes);
}

void Driver::run_units(uint32_t ci, uint32_t run_step, size_t pass, const ComponentUnits& cu,
                       UnitOps& unit_ops, StepWeights& weights, int device, ComponentOps& used) {
  UnitRunner& runner = *cu.runner;
  const size_t digest0 = digest_base_[pass];
  for (size_t u = 0; u < runner.units().size(); ++u) {
    const std::vector<size_t>& steps = cu.steps_of[u];
    weights.enter(u, runner.units()[u], &steps);
    if (!steps.empty() && schedule_.steps[steps.front()].device != device) {
      const int next = schedule_.steps[steps.front()].device;
      Ops& ops = ops_on(ci, next, used);
      hand_over(runner, device, next, used, run_step);
      unit_ops.rebind(ops);
      device = next;
    }
    unit_ops.start_unit();
    const auto t0 = Clock::now();
    runner.run_unit(u, unit_ops, weights);
    trace(forwards_[ci] ? label(pass_label_[pass], runner.units()[u]) : runner.units()[u], Lane::Compute,
          device, run_step, steps.empty() ? -1 : static_cast<int32_t>(steps.front()), t0, Clock::now(), 0);
    if (forwards_[ci] && options_.digests)
      result_.unit_digests[run_step][digest0 + u] = unit_ops.unit_digest();
    for (size_t si : steps)
      if (cu.last_unit[si] == u && streamed(si)) finish(si);
  }
}

void Driver::end_forward(uint32_t ci, uint32_t run_step, size_t pass, size_t n_units,
                         const StepWeights& weights, bool first_pass) {
  ComponentRun& run = result_.components[ci];
  const HostTensor& out = run.output;
  if (options_.digests)
    result_.unit_digests[run_step][digest_base_[pass] + n_units] =
        host_digest(out.bytes.data(), out.bytes.size() / dtype_size(out.dtype), out.dtype);
  if (flow_ && pass < flow_->passes().size()) {
    std::vector<HostTensor> outs{out};
    outs.insert(outs.end(), run.more_outputs.begin(), run.more_outputs.end());
    flow_->take(pass, outs);
  }
  if (first_pass) {
    const Component& comp = checkpoint_.components()[ci];
    for (const Component::Entry& e : comp.entries()) {
      const std::string& name = comp.info(e).name;
      if (!weights.read.count(entry_key(e)) && !schedule_.tied[ci].count(name))
        run.unread_tensors.push_back(name);
    }
  }
}

void Driver::run_component(uint32_t ci, uint32_t run_step, size_t pass) {
  ComponentRun& run = result_.components[ci];
  const bool first_pass = run_step == 0 && run.passes == 0;
  const ComponentUnits cu = component_units(ci, run_step, pass, first_pass);
  int first_device = schedule_.devices.front();  // the GPU of its first unit with steps
  for (const std::vector<size_t>& steps : cu.steps_of)
    if (!steps.empty()) {
      first_device = schedule_.steps[steps.front()].device;
      break;
    }
  ComponentOps used;
  UnitOps unit_ops(ops_on(ci, first_device, used), forwards_[ci] && options_.digests);
  StepWeights weights(*this, ci);
  cu.runner->begin(unit_ops, first_device, run_step);
  run_units(ci, run_step, pass, cu, unit_ops, weights, first_device, used);
  cu.runner->end(unit_ops, run);
  if (forwards_[ci]) end_forward(ci, run_step, pass, cu.runner->units().size(), weights, first_pass);
  for (auto& [d, in_use] : used) {
    uint64_t& peak = run.activation_peak_by_gpu[d];
    peak = std::max(peak, in_use.ops->peak_bytes());
    in_use.ops->release(in_use.mark);
  }
  if (run_step == 0) ++run.passes;
  if (forwards_[ci] && first_pass)
    for (auto& [d, dev] : devices_)
      if (runs_on(cu.steps_of, d)) dev->note(MemoryKind::ForwardActivations, run.activation_peak_by_gpu[d]);
}

}  // namespace qtool::runner::driver_detail
