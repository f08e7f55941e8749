// The ops a unit runs with: the backend's ops, and, when digesting, a digest of every op's output
// folded into the unit's digest (so "streamed == all-resident" compares each unit's every
// intermediate bit for bit, not only the final output).
#pragma once

#include <vector>

#include "qtool/runner/driver.hpp"
#include "qtool/runner/ops.hpp"

namespace qtool::runner {

class UnitOps final : public Ops {
 public:
  UnitOps(Ops& inner, bool digest) : in_(&inner), digest_(digest) {}
  // The ops of the GPU the next units run on (a component over several GPUs).
  void rebind(Ops& inner) { in_ = &inner; }
  void start_unit() { acc_ = {}; }
  LayerDigest unit_digest() const { return acc_; }

  Mat alloc(int64_t rows, int64_t cols, DType dtype) override { return in_->alloc(rows, cols, dtype); }
  size_t mark() const override { return in_->mark(); }
  void release(size_t mark) override { in_->release(mark); }
  uint64_t peak_bytes() const override { return in_->peak_bytes(); }
  void reset_peak() override { in_->reset_peak(); }
  void upload(const void* host, const Mat& dst) override { in_->upload(host, dst); }
  void download(const Mat& src, void* host) override { in_->download(src, host); }

  void embedding(const Mat& ids, const DequantParams& table, const Mat& out) override {
    in_->embedding(ids, table, out);
    fold(out);
  }
  void linear(const Mat& x, const DequantParams& w, const DequantParams* b, const Mat& out) override {
    in_->linear(x, w, b, out);
    fold(out);
  }
  void linear_act(Activation act, const Mat& x, const DequantParams& w, const DequantParams* b,
                  const Mat& out) override {
    in_->linear_act(act, x, w, b, out);
    fold(out);
  }
  void rms_norm(const Mat& x, const DequantParams& w, float eps, RmsRounding r, int64_t hd,
                const Mat& out) override {
    in_->rms_norm(x, w, eps, r, hd, out);
    fold(out);
  }
  void layer_norm(const Mat& x, const DequantParams* w, const DequantParams* b, float eps,
                  const Mat& out) override {
    in_->layer_norm(x, w, b, eps, out);
    fold(out);
  }
  void modulate(const Mat& x, const Mat& shift, const Mat& scale, int64_t batch, float eps,
                const Mat& out) override {
    in_->modulate(x, shift, scale, batch, eps, out);
    fold(out);
  }
  void activation(Activation act, const Mat& x, const Mat& out) override {
    in_->activation(act, x, out);
    fold(out);
  }
  void gated(Activation act, const Mat& gate, const Mat& up, const Mat& out) override {
    in_->gated(act, gate, up, out);
    fold(out);
  }
  void add(const Mat& a, const Mat& b, const Mat& out) override {
    in_->add(a, b, out);
    fold(out);
  }
  void residual(const Mat& h, const Mat* gate, const Mat& y, int64_t batch, const Mat& out) override {
    in_->residual(h, gate, y, batch, out);
    fold(out);
  }
  void rope(RopeStyle style, const Mat& x, int64_t hd, const Mat& cos, const Mat& sin,
            const Mat& out) override {
    in_->rope(style, x, hd, cos, sin, out);
    fold(out);
  }
  void attention(const Mat& q, const Mat& k, const Mat& v, const AttentionShape& shape,
                 const Mat& out) override {
    in_->attention(q, k, v, shape, out);
    fold(out);
  }
  void copy(const Mat& src, const Mat& dst) override {
    in_->copy(src, dst);
    fold(dst);
  }
  void clamp(const Mat& x, float bound, const Mat& out) override {
    in_->clamp(x, bound, out);
    fold(out);
  }

 private:
  // acc = mix(acc, digest(out)): order-dependent across ops, so a changed op order shows too.
  void fold(const Mat& out) {
    if (!digest_ || out.rows == 0 || out.cols == 0) return;
    LayerDigest d;
    if (!in_->digest(out, &d.hash, &d.nonfinite)) {
      host_.resize(static_cast<size_t>(out.rows * out.cols) * out.elem_bytes());
      in_->download(out, host_.data());
      d = host_digest(host_.data(), static_cast<uint64_t>(out.rows * out.cols), out.dtype);
    }
    acc_.hash = kmath::mix64(acc_.hash * 0x9E3779B97F4A7C15ull + d.hash);
    acc_.nonfinite += d.nonfinite;
  }

  Ops* in_;
  bool digest_;
  LayerDigest acc_;
  std::vector<uint8_t> host_;
};

}  // namespace qtool::runner
