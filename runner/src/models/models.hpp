// The architectures' forwards (one file each) and what make_forward picks from.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "qtool/planner/arch.hpp"
#include "qtool/runner/forward.hpp"

namespace qtool::runner::models {

// A forward whose state after each unit can be read back: what the tests compare, stage by stage,
// with the outputs the frameworks' forward hooks give (tests/interop/forward_models.py).
class StagedForward : public Forward {
 public:
  // After run_unit(unit): the state it produced, named and shaped as the hooks' outputs
  // ("model.layers.3" [B, T, D]; "transformer_blocks.0.txt" [B, Tt, D] ...), in the model dtype;
  // empty for a unit without a hooked output.
  virtual std::vector<HostTensor> stages(Ops& ops, size_t unit) = 0;
};

// Rows [row, row + n) of `m` (dense) to the host, appended to t.bytes.
void download_rows(Ops& ops, const Mat& m, int64_t row, int64_t n, HostTensor& t);

// `config_file` names the config in error messages; `dtype` is the model dtype (activations).
std::unique_ptr<Forward> make_llama(const planner::LlamaArch& arch, DType dtype, std::string config_file);
std::unique_ptr<Forward> make_flux(const planner::FluxArch& arch, DType dtype, std::string config_file);
std::unique_ptr<Forward> make_t5(const planner::T5EncoderArch& arch, DType dtype, std::string config_file);
std::unique_ptr<Forward> make_clip(const planner::ClipTextArch& arch, DType dtype, std::string config_file);

// T5's relative position bucket of `rel` = key position − query position (bidirectional,
// MODELS.md §3.4: exact below num_buckets / 4, then logarithmic up to max_distance, in float32).
int64_t t5_relative_bucket(int64_t rel, int64_t num_buckets, int64_t max_distance);
// CLIP's pooled positions per sample of `ids` [batch, tokens] (MODELS.md §4.4): the first maximum
// id when eos_token_id is 2 (the legacy configs), else the first position holding eos_token_id
// (0 when none does).
std::vector<int64_t> clip_eos_positions(const std::vector<int64_t>& ids, int64_t batch, int64_t tokens,
                                        int64_t eos_token_id);

}  // namespace qtool::runner::models
