// forward_compare DIR...: runs the real forward of each model folder DIR (written by
// tests/interop/forward_models.py: the checkpoint and vectors.safetensors) on the CPU ops in the
// planner's activation reserve, and compares each of its outputs with the framework's (test::judge: within
// twice the framework's own bf16 noise). Prints the max and RMS errors relative to the output's
// RMS; exits 1 when one is out of bounds or the activation peak is not the reserve, 2 on bad input.
#include <cstdio>
#include <cstring>
#include <string>

#include "model_util.hpp"
#include "models_test_util.hpp"

using namespace qtool;

int main(int argc, char** argv) {
  std::vector<std::string> dirs(argv + 1, argv + argc);
  if (dirs.empty()) {
    std::fprintf(stderr, "usage: forward_compare MODEL_DIR...\n");
    return 2;
  }
  int rc = 0;
  try {
    ThreadPool pool(2);
    for (const std::string& dir : dirs) {
      const Checkpoint ck = Checkpoint::open(dir);
      const Component& comp = ck.components()[0];
      auto fwd = runner::make_forward(comp);
      if (!fwd) fail(ErrorKind::InvalidInput, dir, ": no forward for this architecture");
      const auto vectors = test::read_vectors(std::filesystem::path(dir) / "vectors.safetensors");
      const auto inputs = test::inputs_of(*fwd, vectors);
      const DType dt = planner::model_dtype(fwd->arch(), comp);
      const test::ForwardRun r = test::run_forward(*fwd, comp, inputs, dt, pool);
      for (const runner::HostTensor& out : r.outputs) {
        if (!vectors.count(out.name) || !vectors.count(out.name + ".f32"))
          fail(ErrorKind::InvalidInput, dir, ": vectors hold no '", out.name, "' and '", out.name, ".f32'");
        const test::Judgement j = test::judge(out, vectors);
        const bool ok = j.ok && test::peak_matches(r.peak, r.reserved);
        std::printf(
            "%s: %s %s %s: vs the framework (%s) max rel %.5f, rms rel %.5f; the framework's own noise "
            "(vs float32) max %.5f, rms %.5f; qtool vs float32 rms %.5f; activation peak %llu of %llu "
            "reserved: %s\n",
            dir.c_str(), fwd->architecture().c_str(), out.name.c_str(),
            runner::models::shape_str(out.shape).c_str(), dtype_name(dt).data(), j.vs_framework.max_rel,
            j.vs_framework.rms_rel, j.noise.max_rel, j.noise.rms_rel, j.vs_f32.rms_rel,
            static_cast<unsigned long long>(r.peak), static_cast<unsigned long long>(r.reserved),
            ok ? "ok" : "FAIL");
        if (!ok) rc = 1;
      }
    }
  } catch (const Error& e) {
    std::fprintf(stderr, "forward_compare: %s\n", e.what());
    return 2;
  }
  return rc;
}
