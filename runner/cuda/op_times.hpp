// Per-op GPU time of the CUDA ops, for finding what bounds a step: when the environment variable
// QTOOL_CUDA_OP_TIMES is set, each op's kernels are bracketed by events on its stream and the
// elapsed times are summed per op name and printed to stderr when the ops are destroyed. Off (no
// events, no cost) otherwise. The events serialise nothing: they are read in batches.
#pragma once

#include <cuda_runtime.h>

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
  }

  // Brackets the kernels launched on `stream` during its lifetime under `name`.
  class Span {
   public:
    Span(OpTimes& times, const char* name, cudaStream_t stream)
        : times_(times), name_(name), stream_(stream) {
      if (!times_.on_) return;
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
      }
      cudaEventDestroy(p.begin);
      cudaEventDestroy(p.end);
    }
    pending_.clear();
  }

  bool on_;
  std::vector<Pending> pending_;
  std::map<std::string, Total> totals_;
};

}  // namespace qtool::runner::cuda
