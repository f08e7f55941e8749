// The activation memory of an Ops backend (ops.hpp): one block of `capacity` bytes, host or
// device, used as a stack. Each allocation starts at a 256-byte boundary (so it holds
// round_up(bytes, 256) of the block); release(mark) frees every allocation made after the mark;
// the peak is the most bytes held at once since reset_peak. An allocation that would pass the
// capacity is Error(InvalidInput) naming the bytes asked and held: the plan reserves this memory,
// so an overflow means its activation reserve was wrong. The CPU and CUDA ops share it; the block
// itself is theirs (this class never dereferences it); StackOps below pairs the two.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>

#include "qtool/formats/error.hpp"
#include "qtool/runner/ops.hpp"

namespace qtool::runner {

class ActivationStack {
 public:
  static constexpr uint64_t kAlign = 256;

  // `where` names the memory in errors ("CPU activation memory").
  ActivationStack(uint8_t* base, uint64_t capacity, std::string where)
      : base_(base), capacity_(capacity), where_(std::move(where)) {}

  Mat alloc(int64_t rows, int64_t cols, DType dtype) {
    QTOOL_ASSERT(rows >= 0 && cols >= 0);
    const uint64_t r = static_cast<uint64_t>(rows), c = static_cast<uint64_t>(cols), e = dtype_size(dtype);
    const uint64_t bytes = r * c * e;
    const uint64_t start = (top_ + kAlign - 1) / kAlign * kAlign;
    const bool wraps = (c != 0 && r > UINT64_MAX / c) || (r * c != 0 && e > UINT64_MAX / (r * c));
    if (wraps || start + bytes > capacity_ || start + bytes < start)
      fail(ErrorKind::InvalidInput, where_, ": allocating [", rows, ", ", cols, "] ", dtype_name(dtype), " (",
           wraps ? std::string("more than 2^64") : std::to_string(bytes), " bytes) with ", top_, " of ",
           capacity_, " bytes held exceeds the capacity (the plan's activation reserve is too small)");
    top_ = start + bytes;
    peak_ = std::max(peak_, top_);
    return {base_ + start, dtype, rows, cols, cols};
  }
  size_t mark() const { return static_cast<size_t>(top_); }
  void release(size_t mark) {
    QTOOL_ASSERT_MSG(mark <= top_, "release(", mark, ") above the top ", top_);
    top_ = mark;
  }
  uint64_t peak_bytes() const { return peak_; }
  void reset_peak() { peak_ = top_; }
  uint64_t capacity() const { return capacity_; }
  uint64_t held() const { return top_; }
  // Whether every byte of view `m` lies in this memory (an empty view: any).
  bool holds(const Mat& m) const {
    if (m.rows == 0 || m.cols == 0) return true;
    const auto* p = static_cast<const uint8_t*>(m.data);
    const uint64_t extent =
        (static_cast<uint64_t>(m.rows - 1) * static_cast<uint64_t>(m.ld) + static_cast<uint64_t>(m.cols)) *
        dtype_size(m.dtype);
    return p >= base_ && p <= base_ + capacity_ && extent <= static_cast<uint64_t>(base_ + capacity_ - p);
  }

 private:
  uint8_t* base_;
  uint64_t capacity_;
  std::string where_;
  uint64_t top_ = 0;
  uint64_t peak_ = 0;
};

// An Ops backend's activation memory: a `Block` it owns (a host or device buffer; data() its first
// byte, which stays put when the block moves) used as one ActivationStack, whose alloc, mark,
// release, peak_bytes and reset_peak are the backend's. The CPU and CUDA backends derive from it.
template <class Block>
class StackOps : public Ops {
 public:
  Mat alloc(int64_t rows, int64_t cols, DType dtype) override { return stack_.alloc(rows, cols, dtype); }
  size_t mark() const override { return stack_.mark(); }
  void release(size_t mark) override { stack_.release(mark); }
  uint64_t peak_bytes() const override { return stack_.peak_bytes(); }
  void reset_peak() override { stack_.reset_peak(); }

 protected:
  const ActivationStack& stack() const { return stack_; }
  // `block` holds at least `capacity` bytes; `where` names the memory in errors.
  StackOps(Block block, uint64_t capacity, std::string where)
      : block_(std::move(block)), stack_(static_cast<uint8_t*>(block_.data()), capacity, std::move(where)) {}

 private:
  Block block_;
  ActivationStack stack_;
};

}  // namespace qtool::runner
