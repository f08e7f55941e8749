// FluxPipeline's data flow and its flow-matching Euler scheduler (pipeline.hpp).
#include "qtool/runner/pipeline.hpp"

#include <cmath>
#include <cstring>

#include "models/model_util.hpp"
#include "qtool/formats/error.hpp"
#include "qtool/formats/json.hpp"
#include "qtool/planner/arch.hpp"

namespace qtool::runner {

using models::encode;
using models::find_input;
using models::floats_of;
using models::round_to;

FlowMatchConfig read_flow_match_config(const std::filesystem::path& file) {
  if (!std::filesystem::exists(file))
    fail(ErrorKind::InvalidInput, file.string(),
         ": missing; a FluxPipeline folder needs its scheduler's config to run the denoising loop");
  const nlohmann::json j = read_json_file(file);
  if (!j.is_object()) fail(ErrorKind::InvalidInput, file.string(), ": not a JSON object");
  const auto where = [&](const char* key) { return file.string() + ": key '" + key + "'"; };
  const std::string cls = j.value("_class_name", std::string());
  if (cls != "FlowMatchEulerDiscreteScheduler")
    fail(ErrorKind::InvalidInput, where("_class_name"), " is '", cls,
         "'; the runner implements FlowMatchEulerDiscreteScheduler only");
  const auto number = [&](const char* key, double fallback, double lo, double hi) {
    if (!j.contains(key) || j[key].is_null()) return fallback;
    if (!j[key].is_number()) fail(ErrorKind::InvalidInput, where(key), " is not a number");
    const double v = j[key].get<double>();
    if (!std::isfinite(v) || v < lo || v > hi)
      fail(ErrorKind::InvalidInput, where(key), " is ", v, ", not in [", lo, ", ", hi, "]");
    return v;
  };
  const auto flag = [&](const char* key) {
    if (!j.contains(key) || j[key].is_null()) return false;
    if (!j[key].is_boolean()) fail(ErrorKind::InvalidInput, where(key), " is not true or false");
    return j[key].get<bool>();
  };
  FlowMatchConfig c;
  c.num_train_timesteps = static_cast<int64_t>(number("num_train_timesteps", 1000, 1, 1e6));
  c.shift = number("shift", 1.0, 1e-6, 1e6);
  c.use_dynamic_shifting = flag("use_dynamic_shifting");
  c.base_shift = number("base_shift", 0.5, -100, 100);
  c.max_shift = number("max_shift", 1.15, -100, 100);
  c.base_image_seq_len = static_cast<int64_t>(number("base_image_seq_len", 256, 0, 1e9));
  c.max_image_seq_len = static_cast<int64_t>(number("max_image_seq_len", 4096, 0, 1e9));
  if (c.use_dynamic_shifting && c.max_image_seq_len == c.base_image_seq_len)
    fail(ErrorKind::InvalidInput, where("max_image_seq_len"), " equals base_image_seq_len: no shift line");
  const std::string shift_type = j.value("time_shift_type", std::string("exponential"));
  if (shift_type != "exponential" && shift_type != "linear")
    fail(ErrorKind::InvalidInput, where("time_shift_type"), " is '", shift_type,
         "', not exponential or linear");
  c.linear_time_shift = shift_type == "linear";
  for (const char* key : {"use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas",
                          "stochastic_sampling", "use_flow_sigmas"})
    if (flag(key))
      fail(ErrorKind::InvalidInput, where(key),
           " is true: qtool's scheduler supports only the plain flow-matching sigmas");
  if (j.contains("shift_terminal") && !j["shift_terminal"].is_null() &&
      !(j["shift_terminal"].is_number() && j["shift_terminal"].get<double>() == 0))
    fail(ErrorKind::InvalidInput, where("shift_terminal"),
         " is set: qtool's scheduler supports no terminal shift");
  return c;
}

FlowMatchSchedule flow_match_schedule(const FlowMatchConfig& c, uint32_t steps, int64_t image_seq_len) {
  QTOOL_ASSERT(steps >= 1);
  FlowMatchSchedule s;
  // np.linspace(1.0, 1 / N, N): y = arange(N) * step + start, the last set to stop; then float32.
  const double start = 1.0, stop = 1.0 / steps;
  std::vector<float> sig(steps);
  for (uint32_t i = 0; i < steps; ++i) {
    double y = start;
    if (steps > 1) y = static_cast<double>(i) * ((stop - start) / static_cast<double>(steps - 1)) + start;
    if (steps > 1 && i == steps - 1) y = stop;
    sig[i] = static_cast<float>(y);
  }
  if (c.use_dynamic_shifting) {
    // calculate_shift, in Python floats.
    const double m =
        (c.max_shift - c.base_shift) / static_cast<double>(c.max_image_seq_len - c.base_image_seq_len);
    const double b = c.base_shift - m * static_cast<double>(c.base_image_seq_len);
    s.mu = static_cast<double>(image_seq_len) * m + b;
    // numpy float32 arithmetic with the Python scalar converted to float32 (** 1.0 is exact).
    const float e = static_cast<float>(c.linear_time_shift ? s.mu : std::exp(s.mu));
    for (float& v : sig) {
      const float r = 1.0f / v - 1.0f;
      v = e / (e + r);
    }
  } else {
    const float shift = static_cast<float>(c.shift), shift1 = static_cast<float>(c.shift - 1.0);
    for (float& v : sig) {
      const float num = shift * v;
      const float den = 1.0f + shift1 * v;
      v = num / den;
    }
  }
  s.sigmas = sig;
  s.sigmas.push_back(0.0f);
  for (float v : sig) s.timesteps.push_back(v * static_cast<float>(c.num_train_timesteps));
  return s;
}

void flow_match_euler_step(std::vector<float>& latents, const std::vector<float>& sample, float sigma,
                           float sigma_next, DType dtype) {
  QTOOL_ASSERT(latents.size() == sample.size());
  const float dt = round_to(dtype, sigma_next - sigma);
  for (size_t i = 0; i < latents.size(); ++i) {
    const float step = round_to(dtype, dt * sample[i]);
    const float sum = latents[i] + step;
    latents[i] = round_to(dtype, sum);
  }
}

bool is_flux_pipeline(const Checkpoint& checkpoint) {
  if (checkpoint.layout() != Checkpoint::Layout::Pipeline || !checkpoint.model_index()) return false;
  const nlohmann::json& mi = *checkpoint.model_index();
  return mi.is_object() && mi.value("_class_name", std::string()) == "FluxPipeline";
}

std::string missing_pipeline_components(const Checkpoint& checkpoint) {
  std::string missing;
  for (const char* name : {"text_encoder", "text_encoder_2", "transformer"})
    if (!checkpoint.find_component(name)) missing += std::string(missing.empty() ? "" : ", ") + name;
  return missing;
}

struct FluxPipelineFlow::Impl {
  uint32_t clip = 0, t5 = 0, transformer = 0;
  std::unique_ptr<Forward> clip_fwd, t5_fwd, flux_fwd;
  planner::FluxArch arch;
  DType dtype = DType::BF16;
  int64_t batch = 1, ti = 0;
  std::vector<float> latents;
  HostTensor pooled, hidden;  // the encoders' outputs (F32)
  HostTensor img_ids;
};

FluxPipelineFlow::~FluxPipelineFlow() = default;

namespace {

uint32_t component_index(const Checkpoint& ck, const char* name, const char* architecture,
                         std::unique_ptr<Forward>& fwd) {
  const Component* c = ck.find_component(name);
  if (!c)
    fail(ErrorKind::InvalidInput, ck.root().string(), ": a FluxPipeline folder without its '", name,
         "' component");
  fwd = make_forward(*c);
  if (!fwd || fwd->architecture() != architecture)
    fail(ErrorKind::InvalidInput, (c->dir() / "config.json").string(), ": the FluxPipeline's '", name,
         "' is not a ", architecture, " (", fwd ? fwd->architecture() : std::string("no forward"), ")");
  return static_cast<uint32_t>(c - ck.components().data());
}

}  // namespace

FluxPipelineFlow::FluxPipelineFlow(const Checkpoint& ck, uint32_t denoise_steps, int64_t tokens,
                                   uint64_t seed, const std::map<std::string, std::vector<HostTensor>>& given)
    : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  if (denoise_steps < 1 || denoise_steps > kMaxDenoiseSteps)
    fail(ErrorKind::Usage, "--denoise-steps: ", denoise_steps, " is not from 1 to ", kMaxDenoiseSteps);
  m.clip = component_index(ck, "text_encoder", "CLIPTextModel", m.clip_fwd);
  m.t5 = component_index(ck, "text_encoder_2", "T5EncoderModel", m.t5_fwd);
  m.transformer = component_index(ck, "transformer", "FluxTransformer2DModel", m.flux_fwd);
  m.arch = std::get<planner::FluxArch>(m.flux_fwd->arch());
  m.dtype = planner::model_dtype(m.flux_fwd->arch(), ck.components()[m.transformer]);
  const FlowMatchConfig config = read_flow_match_config(ck.root() / "scheduler" / "scheduler_config.json");

  // The encoders' ids: given (checked) or drawn.
  const auto encoder_inputs = [&](const char* name, const Forward& fwd, uint64_t s) {
    const int64_t text_tokens = planner::flux_pipeline_tokens(fwd.arch(), tokens);
    const auto it = given.find(name);
    if (it != given.end()) {
      fwd.check_inputs(it->second, text_tokens);
      return it->second;
    }
    return fwd.random_inputs(1, text_tokens, s);
  };
  given_["text_encoder"] = encoder_inputs("text_encoder", *m.clip_fwd, seed);
  given_["text_encoder_2"] = encoder_inputs("text_encoder_2", *m.t5_fwd, seed + 1);
  const int64_t b1 = find_input(given_["text_encoder"], "input_ids")->shape[0];
  const int64_t b2 = find_input(given_["text_encoder_2"], "input_ids")->shape[0];
  if (b1 != b2)
    fail(ErrorKind::InvalidInput, "input 'text_encoder.input_ids' has batch ", b1,
         " but 'text_encoder_2.input_ids' has ", b2, ": one prompt each");
  const int64_t t2 = find_input(given_["text_encoder_2"], "input_ids")->shape[1];
  if (t2 > m.arch.text_tokens)
    fail(ErrorKind::InvalidInput, "input 'text_encoder_2.input_ids' has ", t2,
         " tokens; the transformer takes at most ", m.arch.text_tokens, " (max_sequence_length)");
  m.batch = b1;

  // The latents: given (packed [B, Ti, in_channels]) or drawn.
  const std::vector<HostTensor>* pipe = given.count("") ? &given.at("") : nullptr;
  const HostTensor* lat = pipe ? find_input(*pipe, kLatentsInput) : nullptr;
  if (lat) {
    if (lat->dtype != DType::BF16 && lat->dtype != DType::F16 && lat->dtype != DType::F32)
      fail(ErrorKind::InvalidInput, "input '", kLatentsInput, "' is ", dtype_name(lat->dtype),
           "; expected BF16, F16 or F32");
    if (lat->shape.size() != 3 || lat->shape[0] != m.batch || lat->shape[1] < 1 ||
        lat->shape[2] != m.arch.in_channels)
      fail(ErrorKind::InvalidInput, "input '", kLatentsInput, "' has shape ", models::shape_str(lat->shape),
           "; expected [", m.batch, ", image tokens, ", m.arch.in_channels,
           "] (packed latents, batch of the token ids, the transformer's in_channels)");
    if (lat->shape[1] > tokens)
      fail(ErrorKind::InvalidInput, "input '", kLatentsInput, "' has ", lat->shape[1],
           " image tokens; the plan was made for ", tokens);
    m.ti = lat->shape[1];
    m.latents = floats_of(*lat);
    for (float& v : m.latents) {
      if (!std::isfinite(v))
        fail(ErrorKind::InvalidInput, "input '", kLatentsInput, "' holds a non-finite value");
      v = round_to(m.dtype, v);
    }
  } else {
    m.ti = tokens;
    models::Rng rng(seed + 2);
    m.latents.resize(static_cast<size_t>(m.batch * m.ti * m.arch.in_channels));
    for (float& v : m.latents) v = round_to(m.dtype, static_cast<float>(rng.normal()));
  }
  if (pipe)
    for (const HostTensor& t : *pipe)
      if (t.name != kLatentsInput)
        fail(ErrorKind::InvalidInput, "input '", t.name, "' is not an input of the FluxPipeline (expected ",
             kLatentsInput, ", text_encoder.input_ids, text_encoder_2.input_ids)");
  run_.latents = {kLatentsInput, m.dtype, {m.batch, m.ti, m.arch.in_channels}, encode(m.latents, m.dtype)};
  given_[""] = {run_.latents};

  // The packed grid and its ids (0, row, col) in the model dtype (_prepare_latent_image_ids).
  int64_t rows = 1;
  for (int64_t r = 1; r * r <= m.ti; ++r)
    if (m.ti % r == 0) rows = r;
  run_.grid_rows = rows;
  run_.grid_cols = m.ti / rows;
  std::vector<float> ids(static_cast<size_t>(m.ti * 3), 0.0f);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < run_.grid_cols; ++c) {
      ids[static_cast<size_t>((r * run_.grid_cols + c) * 3 + 1)] = static_cast<float>(r);
      ids[static_cast<size_t>((r * run_.grid_cols + c) * 3 + 2)] = static_cast<float>(c);
    }
  m.img_ids = {"img_ids", m.dtype, {m.ti, 3}, encode(ids, m.dtype)};

  run_.ran = true;
  run_.denoise_steps = denoise_steps;
  run_.schedule = flow_match_schedule(config, denoise_steps, m.ti);
  for (float t : run_.schedule.timesteps)
    run_.timestep_inputs.push_back(round_to(m.dtype, round_to(m.dtype, t) / 1000.0f));
  run_.guidance = m.arch.guidance_embeds ? kFluxGuidanceScale : 0.0f;

  passes_.push_back({m.clip, -1});
  passes_.push_back({m.t5, -1});
  for (uint32_t i = 0; i < denoise_steps; ++i) passes_.push_back({m.transformer, static_cast<int32_t>(i)});
}

std::vector<HostTensor> FluxPipelineFlow::inputs(size_t p) const {
  const Impl& m = *impl_;
  QTOOL_ASSERT(p < passes_.size());
  const Pass& pass = passes_[p];
  if (pass.component == m.clip) return given_.at("text_encoder");
  if (pass.component == m.t5) return given_.at("text_encoder_2");
  QTOOL_ASSERT(!m.pooled.bytes.empty() && !m.hidden.bytes.empty());
  std::vector<HostTensor> in;
  in.push_back({"hidden_states", m.dtype, {m.batch, m.ti, m.arch.in_channels}, encode(m.latents, m.dtype)});
  HostTensor y = m.hidden;
  y.name = "encoder_hidden_states";
  in.push_back(std::move(y));
  HostTensor pooled = m.pooled;
  pooled.name = "pooled_projections";
  in.push_back(std::move(pooled));
  const float ts = run_.timestep_inputs[static_cast<size_t>(pass.denoise_step)];
  in.push_back({"timestep",
                DType::F32,
                {m.batch},
                encode(std::vector<float>(static_cast<size_t>(m.batch), ts), DType::F32)});
  in.push_back(m.img_ids);
  const int64_t tt = m.hidden.shape[1];
  in.push_back(
      {"txt_ids", m.dtype, {tt, 3}, encode(std::vector<float>(static_cast<size_t>(tt * 3), 0.0f), m.dtype)});
  if (m.arch.guidance_embeds)
    in.push_back({"guidance",
                  DType::F32,
                  {m.batch},
                  encode(std::vector<float>(static_cast<size_t>(m.batch), run_.guidance), DType::F32)});
  return in;
}

namespace {

const HostTensor& named_output(const std::vector<HostTensor>& outputs, const char* name) {
  for (const HostTensor& t : outputs)
    if (t.name == name) return t;
  fail(ErrorKind::Internal, "the forward gave no output '", name, "'");
}

// The output `name` of an encoder's pass, which the transformer takes as an input of `rank`
// dimensions whose last is its `dim` (`width`).
const HostTensor& encoder_output(const std::vector<HostTensor>& outputs, const char* encoder,
                                 const char* name, size_t rank, const char* dim, int64_t width) {
  const HostTensor& t = named_output(outputs, name);
  if (t.shape.size() != rank || t.shape.back() != width)
    fail(ErrorKind::InvalidInput, "the ", encoder, "'s ", name, " has shape ", models::shape_str(t.shape),
         " but the transformer's ", dim, " is ", width);
  return t;
}

}  // namespace

void FluxPipelineFlow::take(size_t p, const std::vector<HostTensor>& outputs) {
  Impl& m = *impl_;
  QTOOL_ASSERT(p < passes_.size());
  const Pass& pass = passes_[p];
  if (pass.component == m.clip) {
    m.pooled = encoder_output(outputs, "text_encoder", "pooler_output", 2, "pooled_projection_dim",
                              m.arch.pooled_projection_dim);
    return;
  }
  if (pass.component == m.t5) {
    m.hidden = encoder_output(outputs, "text_encoder_2", "last_hidden_state", 3, "joint_attention_dim",
                              m.arch.joint_attention_dim);
    return;
  }
  const std::vector<float> sample = floats_of(named_output(outputs, "sample"));
  const size_t i = static_cast<size_t>(pass.denoise_step);
  flow_match_euler_step(m.latents, sample, run_.schedule.sigmas[i], run_.schedule.sigmas[i + 1], m.dtype);
  if (i + 1 == run_.denoise_steps)
    run_.images = {
        kImagesOutput, DType::F32, {m.batch, m.ti, m.arch.in_channels}, encode(m.latents, DType::F32)};
}

}  // namespace qtool::runner
