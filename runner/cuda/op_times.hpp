// Per-op GPU time of the CUDA ops, for finding what bounds a step: when the environment variable
// QTOOL_CUDA_OP_TIMES is set, each op's kernels are bracketed by events on its stream and the
// elapsed times are summed per op name and printed to stderr when the ops are destroyed, with the
// time the GPU spent between ops. A span starts when its op is launched, so an op's first call
// also counts its host-side set-up (cuDNN's plan, cuBLASLt's heuristic) where the GPU was idle:
// time many steps. Off (no events, no cost) otherwise. The events serialise nothing: they are read
// in batches.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <vector>

namespace qtool::runner::cuda {

class OpTimes {
 public:
  OpTimes() : on_(std::getenv("QTOOL_CUDA_OP_TIMES") != nullptr) {}
  OpTimes(const OpTimes&) = delete;
  OpTimes& operator=(const OpTimes&) = delete;
  ~OpTimes() {
    if (!on_) return;
    collect();
    double total = 0.0;
    for (const auto& [name, t] : totals_) total += t.ms;
    std::fprintf(stderr, "CUDA op times (QTOOL_CUDA_OP_TIMES), %.3f ms in all:\n", total);
    for (const auto& [name, t] : totals_)
      std::fprintf(stderr, "  %-22s %8llu calls %12.3f ms %6.1f %%\n", name.c_str(),
                   static_cast<unsigned long long>(t.calls), t.ms, total > 0 ? 100.0 * t.ms / total : 0.0);
    // The ops run one after another on their stream: what the span from the first op's start to
    // the last op's end holds beyond them is time the GPU spent between ops (waiting for the
    // host's launches, for copies, or between steps).
    if (last_end_ms_ > first_begin_ms_)
      std::fprintf(stderr, "  first op's start to last op's end %.3f ms: %.3f ms between ops\n",
                   last_end_ms_ - first_begin_ms_, last_end_ms_ - first_begin_ms_ - total);
    if (ref_) cudaEventDestroy(ref_);
  }

  // Brackets the kernels launched on `stream` during its lifetime under `name`.
  class Span {
   public:
    Span(OpTimes& times, const char* name, cudaStream_t stream)
        : times_(times), name_(name), stream_(stream) {
      if (!times_.on_) return;
      if (!times_.ref_ && cudaEventCreate(&times_.ref_) == cudaSuccess) cudaEventRecord(times_.ref_, stream_);
      cudaEventCreate(&begin_);
      cudaEventCreate(&end_);
      cudaEventRecord(begin_, stream_);
    }
    Span(const Span&) = delete;
    Span& operator=(const Span&) = delete;
    // The name the span's time is summed under, when it is known only after the launch.
    void rename(const char* name) { name_ = name; }
    ~Span() {
      if (!times_.on_) return;
      cudaEventRecord(end_, stream_);
      times_.pending_.push_back({name_, begin_, end_});
      if (times_.pending_.size() >= 4096) times_.collect();
    }

   private:
    OpTimes& times_;
    const char* name_;
    cudaStream_t stream_;
    cudaEvent_t begin_ = nullptr, end_ = nullptr;
  };

 private:
  struct Pending {
    const char* name;
    cudaEvent_t begin, end;
  };
  struct Total {
    uint64_t calls = 0;
    double ms = 0.0;
  };
  void collect() {
    for (const Pending& p : pending_) {
      float ms = 0.0f;
      if (cudaEventSynchronize(p.end) == cudaSuccess &&
          cudaEventElapsedTime(&ms, p.begin, p.end) == cudaSuccess) {
        Total& t = totals_[p.name];
        ++t.calls;
        t.ms += ms;
        float b = 0.0f, e = 0.0f;
        if (ref_ && cudaEventElapsedTime(&b, ref_, p.begin) == cudaSuccess &&
            cudaEventElapsedTime(&e, ref_, p.end) == cudaSuccess) {
          first_begin_ms_ = std::min(first_begin_ms_, static_cast<double>(b));
          last_end_ms_ = std::max(last_end_ms_, static_cast<double>(e));
        }
      }
      cudaEventDestroy(p.begin);
      cudaEventDestroy(p.end);
    }
    pending_.clear();
  }

  bool on_;
  std::vector<Pending> pending_;
  std::map<std::string, Total> totals_;
  cudaEvent_t ref_ = nullptr;  // recorded before the first span: the origin of the timeline
  double first_begin_ms_ = 1e300, last_end_ms_ = 0.0;
};

}  // namespace qtool::runner::cuda
