// The frameworks' stored test vectors (tests/runner/data/<variant>: a tiny checkpoint saved by
// transformers or diffusers and vectors.safetensors, tests/interop/forward_models.py) run through
// a backend's schedule driver: the CPU backend in runner_driver_test, the CUDA backend in
// runner_cuda_driver_test (the interop check on the GPU).
#pragma once

#include <algorithm>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

#include "models_test_util.hpp"
#include "runner_test_util.hpp"

namespace qtool::test {

struct VectorRun {
  std::string architecture;
  std::vector<std::pair<std::string, Judgement>> judged;  // per output of the forward
};

// The forward of the model folder `dir` on the framework's inputs, planned at the least GPU budget
// any plan fits in (the folders are a few hundred KiB: the plan keeps them resident), run by
// `backend` for one step; each output judged against the framework's (judge: within twice the
// framework's own bf16 noise).
inline VectorRun run_vectors(runner::Backend& backend, const std::filesystem::path& dir) {
  const Checkpoint ck = Checkpoint::open(dir);
  const Component& comp = ck.components().at(0);
  const auto fwd = runner::make_forward(comp);
  QTOOL_ASSERT_MSG(fwd, dir.string(), ": no forward");
  const auto vectors = read_vectors(dir / "vectors.safetensors");
  std::vector<runner::HostTensor> inputs = inputs_of(*fwd, vectors);
  uint64_t tokens = 1;  // the plan's: the longest sequence among the inputs
  for (const runner::HostTensor& t : inputs)
    if (t.shape.size() >= 2) tokens = std::max<uint64_t>(tokens, static_cast<uint64_t>(t.shape[1]));
  const runner::Schedule s = runner::build_schedule(ck, plan_streamed(ck, 0.0, 0.5, tokens, 2));
  runner::RunOptions o;
  o.tokens = tokens;
  o.steps = 1;
  o.digests = false;
  o.inputs[comp.name()] = std::move(inputs);
  const runner::RunResult r = backend.run(ck, s, o);
  VectorRun v;
  const runner::ComponentRun& c = r.components.at(0);
  v.architecture = c.architecture;
  v.judged.emplace_back(c.output.name, judge(c.output, vectors));
  for (const runner::HostTensor& t : c.more_outputs) v.judged.emplace_back(t.name, judge(t, vectors));
  return v;
}

inline const std::vector<std::string>& vector_variants() {
  static const std::vector<std::string> v = {"llama_small", "llama_small_tied", "flux_small",
                                             "t5_small",    "clip_small",       "clip_small_eos"};
  return v;
}

}  // namespace qtool::test
