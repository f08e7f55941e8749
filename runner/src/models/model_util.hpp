// What the architectures' forwards share: the host-side tables MODELS.md computes outside the
// graph (RoPE, the timestep sinusoid), input lookup and conversion, a seeded generator for
// random_inputs, and fetching a unit's weights in the plan's order with their shapes checked.
#pragma once

#include <cstdint>
#include <deque>
#include <string>
#include <string_view>
#include <vector>

#include "qtool/planner/arch.hpp"
#include "qtool/runner/forward.hpp"

namespace qtool::runner::models {

// --- host tables (MODELS.md §1.4, §1.5, §2.4) ------------------------------------------------------

// Llama's inv_freq [hd / 2] in float32 as transformers computes it: 1 / θ^(fp32(2i)/hd), then the
// llama3 scaling in float32 in the order of _compute_llama3_parameters.
std::vector<float> llama_inv_freq(const planner::LlamaArch& arch);
// cos and sin [rows, hd] in `dtype` for one position per row: angle = fp32(pos) · inv_i (fp32),
// halves layout [ang | ang], cos/sin in float32, each rounded once to `dtype`.
void llama_rope_tables(const std::vector<float>& inv_freq, const std::vector<int64_t>& positions, DType dtype,
                       std::vector<uint8_t>& cos, std::vector<uint8_t>& sin);
// Flux's cos and sin [rows, hd] float32 for ids [rows, n_axes] (float32 values): per axis of width
// d, ω_m = 1 / 10000^(2m/d) and θ = id·ω in float64, cos/sin in float64, then float32, each value
// twice (adjacent pairs).
void flux_rope_tables(const std::vector<float>& ids, const std::vector<int64_t>& axes_dims,
                      std::vector<float>& cos, std::vector<float>& sin);
// Flux's timestep sinusoid φ(s) [256] in float32 (get_timestep_embedding: 256 channels, cos first,
// frequencies exp(fp32(−ln 10000)·k / 128)).
std::vector<float> timestep_sinusoid(float s);

// --- values ------------------------------------------------------------------------------------------

float round_to(DType dtype, float v);  // v rounded once (RNE) to dtype (BF16, F16, F32) and back
// Float values to `dtype` bytes, each rounded once.
std::vector<uint8_t> encode(const std::vector<float>& v, DType dtype);
// A float input as float32 values; an integer input as int64.
std::vector<float> floats_of(const HostTensor& t);
std::vector<int64_t> ints_of(const HostTensor& t);
// The bytes of `t` in `dtype` (float inputs rounded once, as torch's .to(dtype)).
std::vector<uint8_t> float_input_as(const HostTensor& t, DType dtype);

// The input named `name`, or null.
const HostTensor* find_input(const std::vector<HostTensor>& inputs, std::string_view name);
// Checks `inputs` against `specs` (names known, required present, dtypes accepted, shapes; a spec
// dimension < 0 matches any size): Error(InvalidInput) naming the input.
void check_against(const std::vector<HostTensor>& inputs, const std::vector<InputSpec>& specs);
std::string shape_str(const std::vector<int64_t>& shape);

// A seeded generator (splitmix64) for random_inputs.
class Rng {
 public:
  explicit Rng(uint64_t seed) : state_(seed) {}
  uint64_t next();
  double uniform();  // [0, 1)
  double normal();   // N(0, 1), Box-Muller
 private:
  uint64_t state_;
};

// --- weights -----------------------------------------------------------------------------------------

// A linear's weight and optional bias.
struct Linear {
  const DequantParams* weight = nullptr;
  const DequantParams* bias = nullptr;
};

// The tensors one unit reads: declared with the shapes the config implies, fetched from the
// WeightSource in the plan's order (the module tree's: a module's own tensors by name, then its
// children, numbered children by value first, then names), then checked.
class UnitWeights {
 public:
  explicit UnitWeights(std::string config_file) : config_file_(std::move(config_file)) {}
  // A 1-D tensor of n elements (norm weights, biases).
  const DequantParams& vec(std::string name, int64_t n);
  // A 2-D tensor [rows, cols] (embedding tables; linear weights [out, in]).
  const DequantParams& mat(std::string name, int64_t rows, int64_t cols);
  // `<module>.weight` [out, in] and, when `bias`, `<module>.bias` [out].
  Linear linear(const std::string& module, int64_t in, int64_t out, bool bias);
  // Fetches the tensors declared since the last fetch, in the plan's order, and checks their
  // shapes. (A unit that spans several of the planner's units, like Flux's time_text_embed,
  // fetches once per planner unit, in their order.)
  void fetch(WeightSource& source);

 private:
  struct Slot {
    std::string name;
    int64_t rows = 0, cols = 0;  // rows 0: a vector of `cols` elements
    DequantParams params;
  };
  std::string config_file_;
  std::deque<Slot> slots_;
  size_t fetched_ = 0;
};

// Whether tensor `a` comes before tensor `b` in a unit's plan order (see UnitWeights).
// The activation a config's `hidden_act` / `dense_act_fn` names (the arch parsers accept only these).
Activation activation_of(const std::string& act);
bool plan_order_less(std::string_view a, std::string_view b);

}  // namespace qtool::runner::models
