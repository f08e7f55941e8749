// The CUDA backend: the schedule driver (driver.hpp) on the CUDA platform (cuda_platform.hpp), so a
// GPU run walks the plan exactly as a CPU run does: a component whose architecture has a forward
// runs its real forward on the CUDA ops (cuda_forward_ops.hpp), any other its linears only; the
// streamed groups are copied into the ring of device slots on each GPU's copy stream while its
// compute stream runs, ordered by events.
#include <algorithm>
#include <map>

#include "../src/run_support.hpp"
#include "qtool/formats/error.hpp"
#include "qtool/runner/cuda_forward_ops.hpp"
#include "qtool/runner/cuda_platform.hpp"
#include "qtool/runner/cuda_resources.hpp"
#include "qtool/runner/driver.hpp"
#include "qtool/runner/executor.hpp"

namespace qtool::runner {
namespace {

using cuda::DeviceBuffer;
using cuda::DeviceScope;

// run_layer's memory on one GPU, grown on demand.
struct LayerContext {
  int device = 0;
  cuda::Stream stream;
  std::unique_ptr<Ops> ops;
  uint64_t ops_bytes = 0;
  uint64_t scratch_bytes = 0;
  DeviceBuffer weight;
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
  RunResult run(const Checkpoint& checkpoint, const Schedule& schedule, const RunOptions& options) override {
    CudaPlatformConfig config;
    config.device_names = names_;
    config.cublas_workspace_bytes = options.sizing.cublas_workspace_bytes;
    workspace_bytes_ = options.sizing.cublas_workspace_bytes;
    const std::unique_ptr<Platform> platform = make_cuda_platform(config);
    return drive(*platform, checkpoint, schedule, options);
  }
  LayerRun run_layer(const DequantParams& params, uint64_t tokens, uint64_t ldx, uint64_t seed,
                     int device) override;

 private:
  std::string names_;
  std::map<int, std::unique_ptr<LayerContext>> layer_ctx_;
  uint64_t workspace_bytes_ = 32ull << 20;
};

// The linear alone through the CUDA ops, as the schedule's linears-only units run it, with its
// parts copied side by side into one device buffer (as in an arena).
LayerRun CudaBackend::run_layer(const DequantParams& hp, uint64_t tokens, uint64_t ldx, uint64_t seed,
                                int device) {
  if (device < 0 || device >= cuda::device_count())
    fail(ErrorKind::InvalidInput, "GPU ", device, " is not present");
  DeviceScope scope(device);
  auto& slot = layer_ctx_[device];
  if (!slot) {
    slot = std::make_unique<LayerContext>();
    slot->device = device;
    slot->stream = cuda::Stream(device);
  }
  LayerContext& c = *slot;
  ldx = std::max<uint64_t>(ldx, hp.cols);
  const PartLayout layout = part_layout(hp);
  if (c.weight.size() < layout.total) {
    c.weight.reset();
    c.weight = DeviceBuffer(device, std::max<uint64_t>(layout.total, kArenaAlign));
  }
  for (int p = 0; p < kNumParts; ++p)
    if (layout.source[p] && layout.sizes.bytes[p])
      QTOOL_CUDA_CHECK(cudaMemcpy(c.weight.as<uint8_t>() + layout.offset[p], layout.source[p],
                                  layout.sizes.bytes[p], cudaMemcpyHostToDevice));
  const DequantParams w = rebase_parts(hp, layout, c.weight.as<uint8_t>());
  const uint64_t need = tokens * (ldx + hp.rows) * 2 + 2 * kArenaAlign;
  const uint64_t scratch = hp.kind == WeightKind::Bf16 ? 0 : hp.numel() * 2;
  if (!c.ops || c.ops_bytes < need || c.scratch_bytes < scratch) {
    c.ops.reset();
    CudaOpsConfig config;
    config.activation_bytes = std::max(need, c.ops_bytes);
    config.dequant_scratch_bytes = std::max(scratch, c.scratch_bytes);
    config.cublas_workspace_bytes = workspace_bytes_;
    c.ops = make_cuda_ops(device, c.stream.get(), config);
    c.ops_bytes = config.activation_bytes;
    c.scratch_bytes = config.dequant_scratch_bytes;
  }
  return run_linear_alone(*c.ops, w, tokens, ldx, seed, nullptr);
}

}  // namespace

bool cuda_backend_available() { return cuda::device_count() > 0; }

std::unique_ptr<Backend> make_cuda_backend() { return std::make_unique<CudaBackend>(); }

}  // namespace qtool::runner
