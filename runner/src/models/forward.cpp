// make_forward: the architecture from config.json (planner::arch_of), the model dtype from the
// checkpoint, and the matching forward.
#include "models.hpp"

namespace qtool::runner {

std::unique_ptr<Forward> make_forward(const Component& component) {
  const std::optional<planner::Arch> arch = planner::arch_of(component);
  if (!arch) return nullptr;
  const DType dtype = planner::model_dtype(*arch, component);
  const std::string config =
      component.dir().empty() ? std::string("config.json") : (component.dir() / "config.json").string();
  if (const auto* llama = std::get_if<planner::LlamaArch>(&*arch))
    return models::make_llama(*llama, dtype, config);
  if (const auto* t5 = std::get_if<planner::T5EncoderArch>(&*arch))
    return models::make_t5(*t5, dtype, config);
  if (const auto* clip = std::get_if<planner::ClipTextArch>(&*arch))
    return models::make_clip(*clip, dtype, config);
  return models::make_flux(std::get<planner::FluxArch>(*arch), dtype, config);
}

}  // namespace qtool::runner
