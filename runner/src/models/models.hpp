// The architectures' forwards (one file each) and what make_forward picks from.
#pragma once

#include <memory>
#include <string>

#include "qtool/planner/arch.hpp"
#include "qtool/runner/forward.hpp"

namespace qtool::runner::models {

// `config_file` names the config in error messages; `dtype` is the model dtype (activations).
std::unique_ptr<Forward> make_llama(const planner::LlamaArch& arch, DType dtype, std::string config_file);
std::unique_ptr<Forward> make_flux(const planner::FluxArch& arch, DType dtype, std::string config_file);

}  // namespace qtool::runner::models
