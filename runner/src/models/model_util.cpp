#include "model_util.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numbers>

#include "models.hpp"
#include "qtool/formats/error.hpp"

namespace qtool::runner::models {

// --- host tables -------------------------------------------------------------------------------------

std::vector<float> llama_inv_freq(const planner::LlamaArch& a) {
  const int64_t half = a.head_dim / 2;
  const float base = static_cast<float>(a.rope_theta);
  const float dim = static_cast<float>(a.head_dim);
  std::vector<float> inv(static_cast<size_t>(half));
  for (int64_t i = 0; i < half; ++i) {
    // 1.0 / (base ** (arange(0, dim, 2).float() / dim)): torch's 1.0 / t is t.reciprocal() * 1.0.
    const float e = static_cast<float>(2 * i) / dim;
    inv[static_cast<size_t>(i)] = 1.0f / std::pow(base, e);
  }
  if (!a.llama3) return inv;
  const auto& s = *a.llama3;
  // Python scalars enter torch's float32 ops as float32; the wavelength bounds are Python
  // divisions (double) compared with float32 tensors.
  const float factor = static_cast<float>(s.factor);
  const float low = static_cast<float>(s.low_freq_factor);
  const float l0 = static_cast<float>(s.original_max_position_embeddings);
  const float lo_wavelen =
      static_cast<float>(static_cast<double>(s.original_max_position_embeddings) / s.low_freq_factor);
  const float hi_wavelen =
      static_cast<float>(static_cast<double>(s.original_max_position_embeddings) / s.high_freq_factor);
  const float span = static_cast<float>(s.high_freq_factor - s.low_freq_factor);
  const float two_pi = static_cast<float>(2.0 * std::numbers::pi);
  for (float& f : inv) {
    // 2 * math.pi / inv_freq: a reciprocal times the scalar.
    const float wavelen = (1.0f / f) * two_pi;
    const float llama = wavelen > lo_wavelen ? f / factor : f;
    if (!(wavelen < hi_wavelen) && !(wavelen > lo_wavelen)) {
      // old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
      const float smooth = ((1.0f / wavelen) * l0 - low) / span;
      f = (1.0f - smooth) * llama / factor + smooth * llama;
    } else {
      f = llama;
    }
  }
  return inv;
}

void llama_rope_tables(const std::vector<float>& inv_freq, const std::vector<int64_t>& positions, DType dtype,
                       std::vector<uint8_t>& cos, std::vector<uint8_t>& sin) {
  const size_t half = inv_freq.size(), hd = 2 * half;
  std::vector<float> c(positions.size() * hd), s(positions.size() * hd);
  for (size_t r = 0; r < positions.size(); ++r) {
    const float p = static_cast<float>(positions[r]);
    for (size_t i = 0; i < half; ++i) {
      const float ang = p * inv_freq[i];
      const float cv = std::cos(ang), sv = std::sin(ang);
      c[r * hd + i] = c[r * hd + half + i] = cv;
      s[r * hd + i] = s[r * hd + half + i] = sv;
    }
  }
  cos = encode(c, dtype);
  sin = encode(s, dtype);
}

void flux_rope_tables(const std::vector<float>& ids, const std::vector<int64_t>& axes_dims,
                      std::vector<float>& cos, std::vector<float>& sin) {
  const size_t n_axes = axes_dims.size();
  int64_t hd = 0;
  for (int64_t d : axes_dims) hd += d;
  const size_t rows = ids.size() / n_axes;
  cos.assign(rows * static_cast<size_t>(hd), 0.0f);
  sin.assign(cos.size(), 0.0f);
  for (size_t r = 0; r < rows; ++r) {
    size_t col = 0;
    for (size_t a = 0; a < n_axes; ++a) {
      const int64_t d = axes_dims[a];
      const double pos = static_cast<double>(ids[r * n_axes + a]);
      for (int64_t m = 0; m < d / 2; ++m) {
        const double omega = 1.0 / std::pow(10000.0, static_cast<double>(2 * m) / static_cast<double>(d));
        const double theta = pos * omega;
        const float cv = static_cast<float>(std::cos(theta)), sv = static_cast<float>(std::sin(theta));
        const size_t k = r * static_cast<size_t>(hd) + col + 2 * static_cast<size_t>(m);
        cos[k] = cos[k + 1] = cv;
        sin[k] = sin[k + 1] = sv;
      }
      col += static_cast<size_t>(d);
    }
  }
}

std::vector<float> timestep_sinusoid(float s) {
  constexpr int kHalf = 128;
  const float neg_log = static_cast<float>(-std::log(10000.0));
  std::vector<float> out(2 * kHalf);
  for (int k = 0; k < kHalf; ++k) {
    const float freq = std::exp(neg_log * static_cast<float>(k) / static_cast<float>(kHalf));
    const float a = s * freq;
    out[static_cast<size_t>(k)] = std::cos(a);
    out[static_cast<size_t>(kHalf + k)] = std::sin(a);
  }
  return out;
}

// --- values ------------------------------------------------------------------------------------------

float round_to(DType dtype, float v) {
  switch (dtype) {
    case DType::BF16: return bf16_to_f32(f32_to_bf16(v));
    case DType::F16: return f16_to_f32(f32_to_f16(v));
    default: return v;
  }
}

std::vector<uint8_t> encode(const std::vector<float>& v, DType dtype) {
  std::vector<uint8_t> out(v.size() * dtype_size(dtype));
  convert_from_f32(dtype, v.data(), out.data(), v.size());
  return out;
}

std::vector<float> floats_of(const HostTensor& t) {
  const size_t n = t.bytes.size() / dtype_size(t.dtype);
  std::vector<float> out(n);
  convert_to_f32(t.dtype, t.bytes.data(), out.data(), n);
  return out;
}

std::vector<int64_t> ints_of(const HostTensor& t) {
  std::vector<int64_t> out;
  if (t.dtype == DType::I64) {
    out.resize(t.bytes.size() / 8);
    std::memcpy(out.data(), t.bytes.data(), out.size() * 8);
  } else {
    QTOOL_ASSERT(t.dtype == DType::I32);
    std::vector<int32_t> v(t.bytes.size() / 4);
    std::memcpy(v.data(), t.bytes.data(), v.size() * 4);
    out.assign(v.begin(), v.end());
  }
  return out;
}

std::vector<uint8_t> float_input_as(const HostTensor& t, DType dtype) {
  if (t.dtype == dtype) return t.bytes;
  return encode(floats_of(t), dtype);
}

const HostTensor* find_input(const std::vector<HostTensor>& inputs, std::string_view name) {
  for (const HostTensor& t : inputs)
    if (t.name == name) return &t;
  return nullptr;
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i)
    s += (i ? ", " : "") + (shape[i] < 0 ? std::string("*") : std::to_string(shape[i]));
  return s + "]";
}

void check_against(const std::vector<HostTensor>& inputs, const std::vector<InputSpec>& specs) {
  for (const HostTensor& t : inputs) {
    const auto spec =
        std::find_if(specs.begin(), specs.end(), [&](const InputSpec& s) { return s.name == t.name; });
    if (spec == specs.end()) {
      std::string known;
      for (const InputSpec& s : specs) known += (known.empty() ? "" : ", ") + s.name;
      fail(ErrorKind::InvalidInput, "input '", t.name, "' is not an input of the forward (inputs: ", known,
           ")");
    }
    if (std::count_if(inputs.begin(), inputs.end(), [&](const HostTensor& o) { return o.name == t.name; }) >
        1)
      fail(ErrorKind::InvalidInput, "input '", t.name, "' is given twice");
    if (std::find(spec->dtypes.begin(), spec->dtypes.end(), t.dtype) == spec->dtypes.end()) {
      std::string ok;
      for (DType d : spec->dtypes) ok += (ok.empty() ? "" : ", ") + std::string(dtype_name(d));
      fail(ErrorKind::InvalidInput, "input '", t.name, "' is ", dtype_name(t.dtype), "; expected ", ok);
    }
    bool match = t.shape.size() == spec->shape.size();
    uint64_t numel = 1;
    for (size_t i = 0; i < t.shape.size(); ++i) {
      if (t.shape[i] < 0) match = false;
      if (match && spec->shape[i] >= 0 && spec->shape[i] != t.shape[i]) match = false;
      numel *= static_cast<uint64_t>(std::max<int64_t>(t.shape[i], 0));
    }
    if (!match)
      fail(ErrorKind::InvalidInput, "input '", t.name, "' has shape ", shape_str(t.shape), "; expected ",
           shape_str(spec->shape));
    if (numel == 0)
      fail(ErrorKind::InvalidInput, "input '", t.name, "' is empty: shape ", shape_str(t.shape));
    if (t.bytes.size() != numel * dtype_size(t.dtype))
      fail(ErrorKind::InvalidInput, "input '", t.name, "' holds ", t.bytes.size(), " bytes; shape ",
           shape_str(t.shape), " of ", dtype_name(t.dtype), " needs ", numel * dtype_size(t.dtype));
    if (dtype_is_float(t.dtype)) {
      for (float v : floats_of(t))
        if (!std::isfinite(v)) fail(ErrorKind::InvalidInput, "input '", t.name, "' holds a non-finite value");
    }
  }
  for (const InputSpec& s : specs)
    if (!s.optional && !find_input(inputs, s.name))
      fail(ErrorKind::InvalidInput, "input '", s.name, "' is missing (shape ", shape_str(s.shape), ")");
}

HostTensor int64_input(std::string name, int64_t batch, int64_t tokens, const std::vector<int64_t>& values) {
  QTOOL_ASSERT(values.size() == static_cast<size_t>(batch * tokens));
  HostTensor t{std::move(name), DType::I64, {batch, tokens}, std::vector<uint8_t>(values.size() * 8)};
  std::memcpy(t.bytes.data(), values.data(), t.bytes.size());
  return t;
}

HostTensor random_token_ids(Rng& rng, int64_t batch, int64_t tokens, int64_t vocab) {
  std::vector<int64_t> ids(static_cast<size_t>(batch * tokens));
  for (int64_t& v : ids) v = static_cast<int64_t>(rng.next() % static_cast<uint64_t>(vocab));
  return int64_input("input_ids", batch, tokens, ids);
}

void check_token_count(const HostTensor& ids, int64_t max_tokens) {
  if (ids.shape[1] > max_tokens)
    fail(ErrorKind::InvalidInput, "input 'input_ids' has ", ids.shape[1], " tokens; the plan was made for ",
         max_tokens);
}

void check_token_range(const HostTensor& ids, int64_t vocab) {
  for (int64_t v : ints_of(ids))
    if (v < 0 || v >= vocab)
      fail(ErrorKind::InvalidInput, "input 'input_ids' holds token id ", v, ", outside the vocabulary [0, ",
           vocab, ")");
}

void check_shaped_as_ids(const HostTensor& t, const HostTensor& ids) {
  if (t.shape != ids.shape)
    fail(ErrorKind::InvalidInput, "input '", t.name, "' has shape ", shape_str(t.shape), "; 'input_ids' has ",
         shape_str(ids.shape));
}

void check_attention_mask(const std::vector<HostTensor>& inputs, const HostTensor& ids) {
  const HostTensor* m = find_input(inputs, "attention_mask");
  if (!m) return;
  check_shaped_as_ids(*m, ids);
  for (int64_t v : ints_of(*m))
    if (v != 0 && v != 1)
      fail(ErrorKind::InvalidInput, "input 'attention_mask' holds ", v, "; it must be 0 or 1");
}

std::vector<int64_t> positions_of(const std::vector<HostTensor>& inputs, int64_t batch, int64_t seq) {
  if (const HostTensor* pos = find_input(inputs, "position_ids")) return ints_of(*pos);
  std::vector<int64_t> positions(static_cast<size_t>(batch * seq));
  for (int64_t r = 0; r < batch * seq; ++r) positions[static_cast<size_t>(r)] = r % seq;
  return positions;
}

KeyMask upload_key_mask(Ops& ops, const std::vector<HostTensor>& inputs, int64_t batch, int64_t seq) {
  const HostTensor* m = find_input(inputs, "attention_mask");
  const std::vector<int64_t> keep =
      m ? ints_of(*m) : std::vector<int64_t>(static_cast<size_t>(batch * seq), 1);
  const KeyMask mask{ops.alloc(batch, seq, DType::I64), m != nullptr};
  ops.upload(keep.data(), mask.mat);
  return mask;
}

uint64_t Rng::next() {
  uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

double Rng::uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }

double Rng::normal() {
  const double u1 = 1.0 - uniform();  // (0, 1]
  const double u2 = uniform();
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * std::numbers::pi * u2);
}

// --- weights -----------------------------------------------------------------------------------------

namespace {

std::vector<std::string_view> split_path(std::string_view s) {
  std::vector<std::string_view> out;
  size_t pos = 0;
  while (true) {
    const size_t dot = s.find('.', pos);
    out.push_back(s.substr(pos, dot == std::string_view::npos ? std::string_view::npos : dot - pos));
    if (dot == std::string_view::npos) break;
    pos = dot + 1;
  }
  return out;
}

bool is_index(std::string_view e) {
  return !e.empty() && std::all_of(e.begin(), e.end(), [](char c) { return c >= '0' && c <= '9'; });
}

// Children of a module: numbered ones by value first, then names.
bool child_less(std::string_view a, std::string_view b) {
  const bool ia = is_index(a), ib = is_index(b);
  if (ia && ib) return a.size() != b.size() ? a.size() < b.size() : a < b;
  if (ia != ib) return ia;
  return a < b;
}

}  // namespace

Activation activation_of(const std::string& act) {
  if (act == "gelu_new") return Activation::GeluNew;
  if (act == "relu") return Activation::Relu;
  if (act == "quick_gelu") return Activation::QuickGelu;
  if (act == "silu") return Activation::Silu;
  QTOOL_ASSERT_MSG(act == "gelu_pytorch_tanh", "activation ", act);
  return Activation::GeluTanh;
}

float head_dim_scale(int64_t head_dim) {
  return static_cast<float>(std::pow(static_cast<double>(head_dim), -0.5));
}

AttentionShape self_attention(int64_t batch, int64_t seq, int64_t heads, int64_t kv_heads, int64_t head_dim,
                              float scale) {
  AttentionShape s;
  s.batch = batch;
  s.q_len = s.kv_len = seq;
  s.heads = heads;
  s.kv_heads = kv_heads;
  s.head_dim = head_dim;
  s.scale = scale;
  return s;
}

Qkv project_qkv(Ops& ops, const Mat& x, const Linear& q, const Linear& k, const Linear& v, int64_t q_cols,
                int64_t kv_cols, DType dtype) {
  Qkv out{ops.alloc(x.rows, q_cols, dtype), ops.alloc(x.rows, kv_cols, dtype),
          ops.alloc(x.rows, kv_cols, dtype)};
  ops.linear(x, *q.weight, q.bias, out.q);
  ops.linear(x, *k.weight, k.bias, out.k);
  ops.linear(x, *v.weight, v.bias, out.v);
  return out;
}

bool plan_order_less(std::string_view a, std::string_view b) {
  auto pa = split_path(a), pb = split_path(b);
  const std::string_view la = pa.back(), lb = pb.back();
  pa.pop_back();
  pb.pop_back();
  for (size_t i = 0; i < std::min(pa.size(), pb.size()); ++i)
    if (pa[i] != pb[i]) return child_less(pa[i], pb[i]);
  if (pa.size() != pb.size()) return pa.size() < pb.size();  // a module's own tensors first
  return la < lb;
}

const DequantParams& UnitWeights::vec(std::string name, int64_t n) {
  slots_.push_back({std::move(name), 0, n, {}});
  return slots_.back().params;
}

const DequantParams& UnitWeights::mat(std::string name, int64_t rows, int64_t cols) {
  slots_.push_back({std::move(name), rows, cols, {}});
  return slots_.back().params;
}

Linear UnitWeights::linear(const std::string& module, int64_t in, int64_t out, bool bias) {
  Linear l;
  l.weight = &mat(module + ".weight", out, in);
  if (bias) l.bias = &vec(module + ".bias", out);
  return l;
}

void UnitWeights::fetch(WeightSource& source) {
  std::vector<Slot*> order;
  for (size_t i = fetched_; i < slots_.size(); ++i) order.push_back(&slots_[i]);
  fetched_ = slots_.size();
  std::stable_sort(order.begin(), order.end(),
                   [](const Slot* a, const Slot* b) { return plan_order_less(a->name, b->name); });
  for (Slot* s : order) {
    s->params = source.get(s->name);
    const DequantParams& p = s->params;
    const bool ok =
        s->rows == 0 ? p.numel() == static_cast<uint64_t>(s->cols)
                     : p.rows == static_cast<uint64_t>(s->rows) && p.cols == static_cast<uint64_t>(s->cols);
    if (!ok) {
      const std::string want =
          s->rows == 0 ? str_cat("[", s->cols, "]") : str_cat("[", s->rows, ", ", s->cols, "]");
      fail(ErrorKind::InvalidInput, "tensor '", s->name, "' is [", p.rows, ", ", p.cols, "] (", p.numel(),
           " elements); ", config_file_, " implies ", want);
    }
  }
}

void download_rows(Ops& ops, const Mat& m, int64_t row, int64_t n, HostTensor& t) {
  const Mat v = m.rows_view(row, n);
  const size_t at = t.bytes.size();
  t.bytes.resize(at + static_cast<size_t>(n * m.cols) * m.elem_bytes());
  ops.download(v, t.bytes.data() + at);
}

HostTensor download_tensor(Ops& ops, const Mat& m, std::string name, std::vector<int64_t> shape) {
  HostTensor t{std::move(name), m.dtype, std::move(shape), {}};
  download_rows(ops, m, 0, m.rows, t);
  return t;
}

std::vector<uint8_t> download_f32(Ops& ops, const Mat& m, int64_t row, int64_t n) {
  HostTensor raw{"", m.dtype, {}, {}};
  download_rows(ops, m, row, n, raw);
  std::vector<uint8_t> f(static_cast<size_t>(n * m.cols) * 4);
  convert_to_f32(m.dtype, raw.bytes.data(), reinterpret_cast<float*>(f.data()),
                 static_cast<size_t>(n * m.cols));
  return f;
}

HostTensor download_f32_tensor(Ops& ops, const Mat& m, std::string name, std::vector<int64_t> shape) {
  return HostTensor{std::move(name), DType::F32, std::move(shape), download_f32(ops, m, 0, m.rows)};
}

std::vector<InputSpec> TokenForward::input_specs(int64_t batch, int64_t tokens) const {
  std::vector<InputSpec> specs = {{"input_ids", {DType::I64, DType::I32}, {batch, tokens}, false}};
  for (const std::string& name : model_.optional_inputs)
    specs.push_back({name, {DType::I64, DType::I32}, {batch, tokens}, true});
  return specs;
}

std::vector<HostTensor> TokenForward::random_inputs(int64_t batch, int64_t tokens, uint64_t seed) const {
  Rng rng(seed);
  return {random_token_ids(rng, batch, tokens, model_.vocab)};
}

const HostTensor& TokenForward::checked_ids(const std::vector<HostTensor>& inputs, int64_t max_tokens) const {
  check_against(inputs, input_specs(-1, -1));
  const HostTensor& ids = *find_input(inputs, "input_ids");
  check_token_count(ids, max_tokens);
  return ids;
}

void TokenForward::begin_stream(Ops& ops, const std::vector<HostTensor>& inputs, DType stream_dtype) {
  ids_ = *find_input(inputs, "input_ids");
  batch_ = ids_.shape[0];
  seq_ = ids_.shape[1];
  h_ = ops.alloc(rows(), model_.width, stream_dtype);
  out_ = {};
}

void TokenForward::embed_tokens(Ops& ops, WeightSource& weights, const std::string& table) {
  UnitWeights w(config_file_);
  const DequantParams& t = w.mat(table, model_.vocab, model_.width);
  w.fetch(weights);
  const size_t m = ops.mark();
  const Mat ids = ops.alloc(rows(), 1, ids_.dtype);
  ops.upload(ids_.bytes.data(), ids);
  ops.embedding(ids, t, h_);
  ops.release(m);
}

void TokenForward::final_rms_norm(Ops& ops, WeightSource& weights, const std::string& weight, double eps,
                                  const Mat& out) {
  UnitWeights w(config_file_);
  const DequantParams& norm = w.vec(weight, model_.width);
  w.fetch(weights);
  ops.rms_norm(h_, norm, static_cast<float>(eps), RmsRounding::Twice, 0, out);
}

}  // namespace qtool::runner::models
