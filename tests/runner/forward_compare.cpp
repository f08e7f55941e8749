// forward_compare DIR...: runs the real forward of each model folder DIR (written by
// tests/interop/forward_models.py: the checkpoint and vectors.safetensors) on the CPU ops in the
// planner's activation reserve, and compares its output with the framework's. Prints the max and
// RMS errors relative to the output's RMS; exits 1 when one is beyond --max-rel / --rms-rel or the
// activation peak differs from the reserve, 2 on bad input.
#include <cstdio>
#include <cstring>
#include <string>

#include "models_test_util.hpp"

using namespace qtool;

int main(int argc, char** argv) {
  double max_rel = 0.04, rms_rel = 0.008;
  std::vector<std::string> dirs;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--max-rel" && i + 1 < argc) {
      max_rel = std::stod(argv[++i]);
    } else if (a == "--rms-rel" && i + 1 < argc) {
      rms_rel = std::stod(argv[++i]);
    } else {
      dirs.push_back(a);
    }
  }
  if (dirs.empty()) {
    std::fprintf(stderr, "usage: forward_compare [--max-rel X] [--rms-rel Y] MODEL_DIR...\n");
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
      const auto want = vectors.find(r.output.name);
      if (want == vectors.end())
        fail(ErrorKind::InvalidInput, dir, ": vectors hold no '", r.output.name, "'");
      const test::Deviation d = test::deviation(test::as_floats(r.output), test::as_floats(want->second));
      const bool ok = d.finite && d.max_rel <= max_rel && d.rms_rel <= rms_rel && r.peak == r.reserved;
      std::printf(
          "%s: %s %s, %zu values: max rel %.5f (<= %.3f), rms rel %.5f (<= %.4f); activation peak %llu, "
          "reserve %llu: %s\n",
          dir.c_str(), fwd->architecture().c_str(), r.output.name.c_str(), d.n, d.max_rel, max_rel, d.rms_rel,
          rms_rel, static_cast<unsigned long long>(r.peak), static_cast<unsigned long long>(r.reserved),
          ok ? "ok" : "FAIL");
      if (!ok) rc = 1;
    }
  } catch (const Error& e) {
    std::fprintf(stderr, "forward_compare: %s\n", e.what());
    return 2;
  }
  return rc;
}
