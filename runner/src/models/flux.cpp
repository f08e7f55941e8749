// FluxTransformer2DModel (diffusers), MODELS.md §1: embedders, double-stream blocks (text and
// image streams with their own weights, joint attention), single-stream blocks, norm_out, proj_out.
//
// The residual stream is one [B·(Tt + Ti), D] buffer, sample by sample, text tokens first: the
// joint attention and the single blocks read it as it is; the double blocks' per-stream ops run on
// each sample's text rows and image rows (views).
#include <array>
#include <cmath>
#include <cstring>

#include "model_util.hpp"
#include "models.hpp"
#include "qtool/formats/error.hpp"

namespace qtool::runner::models {
namespace {

using planner::FluxArch;

constexpr float kEps = 1e-6f;
constexpr int64_t kSinusoid = 256;

class FluxForward final : public ModelForward {
 public:
  FluxForward(const FluxArch& arch, DType dtype, std::string config_file)
      : ModelForward(arch, "FluxTransformer2DModel", dtype, std::move(config_file)), a_(arch) {
    add_unit("x_embedder", [this](Ops& ops, WeightSource& w) { x_embedder(ops, w); });
    add_unit("time_text_embed", [this](Ops& ops, WeightSource& w) { time_text_embed(ops, w); });
    add_unit("context_embedder", [this](Ops& ops, WeightSource& w) { context_embedder(ops, w); });
    add_blocks("transformer_blocks.", a_.n_double, &FluxForward::double_block);
    add_blocks("single_transformer_blocks.", a_.n_single, &FluxForward::single_block);
    add_unit("norm_out", [this](Ops& ops, WeightSource& w) { norm_out_unit(ops, w); });
    add_unit("proj_out", [this](Ops& ops, WeightSource& w) { proj_out(ops, w); });
  }

  std::vector<InputSpec> input_specs(int64_t batch, int64_t tokens) const override {
    return specs(batch, tokens, a_.text_tokens);
  }

  std::vector<HostTensor> random_inputs(int64_t batch, int64_t tokens, uint64_t seed) const override {
    Rng rng(seed);
    const int64_t tt = a_.text_tokens;
    const auto normal = [&](std::string name, std::vector<int64_t> shape) {
      int64_t n = 1;
      for (int64_t s : shape) n *= s;
      std::vector<float> v(static_cast<size_t>(n));
      for (float& x : v) x = static_cast<float>(rng.normal());
      return HostTensor{std::move(name), dtype_, std::move(shape), encode(v, dtype_)};
    };
    std::vector<HostTensor> in;
    in.push_back(normal("hidden_states", {batch, tokens, a_.in_channels}));
    in.push_back(normal("encoder_hidden_states", {batch, tt, a_.joint_attention_dim}));
    in.push_back(normal("pooled_projections", {batch, a_.pooled_projection_dim}));
    std::vector<float> t(static_cast<size_t>(batch));
    for (float& x : t) x = static_cast<float>(0.02 + 0.96 * rng.uniform());  // sigma in (0, 1)
    in.push_back({"timestep", DType::F32, {batch}, encode(t, DType::F32)});
    // The pipeline's ids for a packed latent grid of h/2 x w/2 = tokens: (0, row, col); the
    // grid's sides are the factor pair of `tokens` closest to square.
    int64_t rows = 1;
    for (int64_t r = 1; r * r <= tokens; ++r)
      if (tokens % r == 0) rows = r;
    const int64_t cols = tokens / rows;
    std::vector<float> img(static_cast<size_t>(tokens * 3), 0.0f);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) {
        img[static_cast<size_t>((r * cols + c) * 3 + 1)] = static_cast<float>(r);
        img[static_cast<size_t>((r * cols + c) * 3 + 2)] = static_cast<float>(c);
      }
    in.push_back({"img_ids", dtype_, {tokens, 3}, encode(img, dtype_)});
    in.push_back(
        {"txt_ids", dtype_, {tt, 3}, encode(std::vector<float>(static_cast<size_t>(tt * 3), 0.0f), dtype_)});
    if (a_.guidance_embeds)
      in.push_back({"guidance",
                    DType::F32,
                    {batch},
                    encode(std::vector<float>(static_cast<size_t>(batch), 3.5f), DType::F32)});
    return in;
  }

  int64_t batch_of(const std::vector<HostTensor>& inputs) const override {
    return find_input(inputs, "hidden_states")->shape.at(0);
  }
  void check_inputs(const std::vector<HostTensor>& inputs, int64_t max_tokens) const override {
    check_against(inputs, specs(-1, -1, -1));
    const HostTensor& x = *find_input(inputs, "hidden_states");
    const HostTensor& y = *find_input(inputs, "encoder_hidden_states");
    const int64_t batch = x.shape[0], ti = x.shape[1], tt = y.shape[1];
    if (ti > max_tokens)
      fail(ErrorKind::InvalidInput, "input 'hidden_states' has ", ti, " image tokens; the plan was made for ",
           max_tokens);
    if (tt > a_.text_tokens)
      fail(ErrorKind::InvalidInput, "input 'encoder_hidden_states' has ", tt,
           " text tokens; the plan was made for ", a_.text_tokens);
    // The shapes the first two inputs fix.
    check_against(inputs, specs(batch, ti, tt));
    for (const char* name : {"img_ids", "txt_ids"}) {
      for (float v : floats_of(*find_input(inputs, name)))
        if (std::fabs(v) > 1.0e6f)
          fail(ErrorKind::InvalidInput, "input '", name, "' holds position ", v, ", beyond 1e6");
    }
  }

  void begin(Ops& ops, const std::vector<HostTensor>& inputs) override {
    const HostTensor& x = *find_input(inputs, "hidden_states");
    const HostTensor& y = *find_input(inputs, "encoder_hidden_states");
    batch_ = x.shape[0];
    ti_ = x.shape[1];
    tt_ = y.shape[1];
    const int64_t t = tt_ + ti_, d = a_.dim();
    x_in_ = float_input_as(x, dtype_);
    y_in_ = float_input_as(y, dtype_);
    pooled_in_ = float_input_as(*find_input(inputs, "pooled_projections"), dtype_);
    // t̃ = ⟦⟦t⟧·1000⟧, g̃ likewise (model dtype); φ in float32, rounded to the model dtype.
    const auto sinusoids = [&](const HostTensor& s) {
      std::vector<float> phi;
      for (float v : floats_of(s)) {
        const float scaled = round_to(dtype_, round_to(dtype_, v) * 1000.0f);
        const std::vector<float> p = timestep_sinusoid(scaled);
        phi.insert(phi.end(), p.begin(), p.end());
      }
      return encode(phi, dtype_);
    };
    t_phi_ = sinusoids(*find_input(inputs, "timestep"));
    if (a_.guidance_embeds) g_phi_ = sinusoids(*find_input(inputs, "guidance"));
    // RoPE tables for ids = [txt_ids ; img_ids].
    std::vector<float> ids = floats_of(*find_input(inputs, "txt_ids"));
    const std::vector<float> img = floats_of(*find_input(inputs, "img_ids"));
    ids.insert(ids.end(), img.begin(), img.end());
    std::vector<float> cos, sin;
    flux_rope_tables(ids, a_.axes_dims_rope, cos, sin);

    hs_ = ops.alloc(batch_ * t, d, dtype_);
    c_ = ops.alloc(batch_, d, dtype_);
    silu_c_ = ops.alloc(batch_, d, dtype_);
    cos_ = ops.alloc(t, a_.head_dim, DType::F32);
    sin_ = ops.alloc(t, a_.head_dim, DType::F32);
    sample_ = ops.alloc(batch_ * ti_, out_cols(), dtype_);
    normed_ = {};
    ops.upload(cos.data(), cos_);
    ops.upload(sin.data(), sin_);
  }

  std::vector<Mat*> shared_state() override {
    return {&hs_, &c_, &silu_c_, &cos_, &sin_, &sample_, &normed_};
  }

  std::vector<HostTensor> stages(Ops& ops, size_t unit) override {
    const int64_t d = a_.dim();
    const auto stream = [&](std::string name, bool text) {
      HostTensor t{std::move(name), dtype_, {batch_, text ? tt_ : ti_, d}, {}};
      for (int64_t b = 0; b < batch_; ++b)
        download_rows(ops, hs_, b * seq() + (text ? 0 : tt_), text ? tt_ : ti_, t);
      return t;
    };
    const std::string& u = units_[unit];
    if (u == "x_embedder") return {stream(u, false)};
    if (u == "context_embedder") return {stream(u, true)};
    if (u == "time_text_embed") return {download_tensor(ops, c_, u, {batch_, d})};
    if (u == "norm_out") return {download_tensor(ops, normed_, u, {batch_, ti_, d})};
    if (u == "proj_out") return {};
    return {stream(u + ".txt", true), stream(u + ".img", false)};
  }

  std::vector<std::string> output_names() const override { return {"sample"}; }

  HostTensor output(Ops& ops) override {
    return download_f32_tensor(ops, sample_, "sample", {batch_, ti_, out_cols()});
  }

 private:
  int64_t out_cols() const { return a_.patch_size * a_.patch_size * a_.out_channels; }
  int64_t seq() const { return tt_ + ti_; }
  // Sample b's text and image rows of a [B·(Tt + Ti), *] buffer, and chunk k of its modulation.
  Mat txt(const Mat& m, int64_t b) const { return m.rows_view(b * seq(), tt_); }
  Mat img(const Mat& m, int64_t b) const { return m.rows_view(b * seq() + tt_, ti_); }
  Mat chunk(const Mat& mod, int64_t b, int64_t k) const {
    return mod.rows_view(b, 1).cols_view(k * a_.dim(), a_.dim());
  }

  std::vector<InputSpec> specs(int64_t batch, int64_t ti, int64_t tt) const {
    const std::vector<DType> act =
        dtype_ == DType::F32 ? std::vector<DType>{DType::F32} : std::vector<DType>{dtype_, DType::F32};
    std::vector<InputSpec> s = {{"hidden_states", act, {batch, ti, a_.in_channels}, false},
                                {"encoder_hidden_states", act, {batch, tt, a_.joint_attention_dim}, false},
                                {"pooled_projections", act, {batch, a_.pooled_projection_dim}, false},
                                {"timestep", act, {batch}, false},
                                {"img_ids", act, {ti, 3}, false},
                                {"txt_ids", act, {tt, 3}, false}};
    if (a_.guidance_embeds) s.push_back({"guidance", act, {batch}, false});
    return s;
  }

  // SDPA's default scale 1 / sqrt(hd) (a double), in float32.
  AttentionShape joint_attention() const {
    return self_attention(batch_, seq(), a_.n_heads, a_.n_heads, a_.head_dim,
                          static_cast<float>(1.0 / std::sqrt(static_cast<double>(a_.head_dim))));
  }

  // RoPE on sample b's rows of q and k (the joint sequence [text ; image]).
  void rope_sample(Ops& ops, const Mat& q, const Mat& k, int64_t b) const {
    const int64_t hd = a_.head_dim;
    ops.rope(RopeStyle::Adjacent, q.rows_view(b * seq(), seq()), hd, cos_, sin_,
             q.rows_view(b * seq(), seq()));
    ops.rope(RopeStyle::Adjacent, k.rows_view(b * seq(), seq()), hd, cos_, sin_,
             k.rows_view(b * seq(), seq()));
  }

  // Lin(in; `name`) of the host rows `host` [B·tokens, in_cols] into each sample's text (`text`)
  // or image rows of the stream.
  void embed_stream(Ops& ops, WeightSource& weights, const char* name, int64_t in_cols,
                    const std::vector<uint8_t>& host, bool text) {
    UnitWeights w(config_file_);
    const Linear lin = w.linear(name, in_cols, a_.dim(), true);
    w.fetch(weights);
    const int64_t tokens = text ? tt_ : ti_;
    const size_t m = ops.mark();
    const Mat in = ops.alloc(batch_ * tokens, in_cols, dtype_);
    ops.upload(host.data(), in);
    for (int64_t b = 0; b < batch_; ++b)
      ops.linear(in.rows_view(b * tokens, tokens), *lin.weight, lin.bias, text ? txt(hs_, b) : img(hs_, b));
    ops.release(m);
  }

  // Packed latents [B·Ti, in] -> each sample's image rows of the stream.
  void x_embedder(Ops& ops, WeightSource& weights) {
    embed_stream(ops, weights, "x_embedder", a_.in_channels, x_in_, false);
  }

  // c = ⟦⟦e_t + e_g⟧ + e_p⟧ (no guidance: ⟦e_t + e_p⟧), and SiLU(c), which every modulation reads.
  void time_text_embed(Ops& ops, WeightSource& weights) {
    const int64_t d = a_.dim();
    UnitWeights w(config_file_);
    const std::string p = "time_text_embed.";
    // One planner unit (the template places time_text_embed whole): one fetch, in the plan's order.
    const Linear t1 = w.linear(p + "timestep_embedder.linear_1", kSinusoid, d, true);
    const Linear t2 = w.linear(p + "timestep_embedder.linear_2", d, d, true);
    Linear g1, g2;
    if (a_.guidance_embeds) {
      g1 = w.linear(p + "guidance_embedder.linear_1", kSinusoid, d, true);
      g2 = w.linear(p + "guidance_embedder.linear_2", d, d, true);
    }
    const Linear p1 = w.linear(p + "text_embedder.linear_1", a_.pooled_projection_dim, d, true);
    const Linear p2 = w.linear(p + "text_embedder.linear_2", d, d, true);
    w.fetch(weights);

    const size_t m = ops.mark();
    const Mat phi = ops.alloc(batch_, kSinusoid, dtype_);
    const Mat hidden = ops.alloc(batch_, d, dtype_);
    const Mat e = ops.alloc(batch_, d, dtype_);
    const Mat pooled = ops.alloc(batch_, a_.pooled_projection_dim, dtype_);
    // Lin(SiLU(Lin(in; l1)); l2) -> out
    const auto embedder = [&](const Mat& in, const Linear& l1, const Linear& l2, const Mat& out) {
      ops.linear(in, *l1.weight, l1.bias, hidden);
      ops.activation(Activation::Silu, hidden, hidden);
      ops.linear(hidden, *l2.weight, l2.bias, out);
    };
    ops.upload(t_phi_.data(), phi);
    embedder(phi, t1, t2, c_);
    if (a_.guidance_embeds) {
      ops.upload(g_phi_.data(), phi);
      embedder(phi, g1, g2, e);
      ops.add(c_, e, c_);
    }
    ops.upload(pooled_in_.data(), pooled);
    embedder(pooled, p1, p2, e);
    ops.add(c_, e, c_);
    ops.activation(Activation::Silu, c_, silu_c_);
    ops.release(m);
  }

  // T5 hidden states [B·Tt, joint] -> each sample's text rows of the stream.
  void context_embedder(Ops& ops, WeightSource& weights) {
    embed_stream(ops, weights, "context_embedder", a_.joint_attention_dim, y_in_, true);
  }

  // One stream's weights in a double block.
  struct Stream {
    Linear mod, out, ff_in, ff_out;
    std::array<Linear, 3> qkv;
    const DequantParams* norm_q = nullptr;
    const DequantParams* norm_k = nullptr;
  };

  void double_block(int64_t i, Ops& ops, WeightSource& weights) {
    const int64_t d = a_.dim(), f = 4 * d, hd = a_.head_dim, n = batch_ * seq();
    const std::string p = "transformer_blocks." + std::to_string(i) + ".";
    UnitWeights w(config_file_);
    Stream x, y;  // image, text
    x.mod = w.linear(p + "norm1.linear", d, 6 * d, true);
    y.mod = w.linear(p + "norm1_context.linear", d, 6 * d, true);
    x.qkv = w.linears(p + "attn.", {"to_q", "to_k", "to_v"}, d, d, true);
    y.qkv = w.linears(p + "attn.", {"add_q_proj", "add_k_proj", "add_v_proj"}, d, d, true);
    x.norm_q = &w.vec(p + "attn.norm_q.weight", hd);
    x.norm_k = &w.vec(p + "attn.norm_k.weight", hd);
    y.norm_q = &w.vec(p + "attn.norm_added_q.weight", hd);
    y.norm_k = &w.vec(p + "attn.norm_added_k.weight", hd);
    x.out = w.linear(p + "attn.to_out.0", d, d, true);
    y.out = w.linear(p + "attn.to_add_out", d, d, true);
    x.ff_in = w.linear(p + "ff.net.0.proj", d, f, true);
    x.ff_out = w.linear(p + "ff.net.2", f, d, true);
    y.ff_in = w.linear(p + "ff_context.net.0.proj", d, f, true);
    y.ff_out = w.linear(p + "ff_context.net.2", f, d, true);
    w.fetch(weights);

    const size_t m = ops.mark();
    // (shift, scale, gate) x (attention, MLP) per stream: chunks 0..5 of Lin(SiLU(c); norm1*.linear).
    const Mat mod_x = ops.alloc(batch_, 6 * d, dtype_);
    const Mat mod_y = ops.alloc(batch_, 6 * d, dtype_);
    ops.linear(silu_c_, *x.mod.weight, x.mod.bias, mod_x);
    ops.linear(silu_c_, *y.mod.weight, y.mod.bias, mod_y);
    const Mat nrm = ops.alloc(n, d, dtype_);  // normalised input, then the attention output
    const Mat q = ops.alloc(n, d, dtype_);    // q, then the projections' outputs
    const size_t m_kv = ops.mark();
    const Mat k = ops.alloc(n, d, dtype_);
    const Mat v = ops.alloc(n, d, dtype_);
    // One stream's rows of sample b: Mod, q/k/v, per-head RMSNorm of q and k.
    const auto project = [&](const Stream& s, const Mat& mod, int64_t b, auto rows) {
      ops.modulate(rows(hs_, b), chunk(mod, b, 0), chunk(mod, b, 1), 1, kEps, rows(nrm, b));
      const auto& [lq, lk, lv] = s.qkv;
      ops.linear(rows(nrm, b), *lq.weight, lq.bias, rows(q, b));
      ops.linear(rows(nrm, b), *lk.weight, lk.bias, rows(k, b));
      ops.linear(rows(nrm, b), *lv.weight, lv.bias, rows(v, b));
      ops.rms_norm(rows(q, b), *s.norm_q, kEps, RmsRounding::Once, hd, rows(q, b));
      ops.rms_norm(rows(k, b), *s.norm_k, kEps, RmsRounding::Once, hd, rows(k, b));
    };
    const auto txt_rows = [this](const Mat& mm, int64_t b) { return txt(mm, b); };
    const auto img_rows = [this](const Mat& mm, int64_t b) { return img(mm, b); };
    for (int64_t b = 0; b < batch_; ++b) {
      project(x, mod_x, b, img_rows);
      project(y, mod_y, b, txt_rows);
      rope_sample(ops, q, k, b);  // after the norms
    }
    ops.attention(q, k, v, joint_attention(), nrm);
    // stream = ⟦stream + ⟦gate · Lin(rows; lin)⟧⟧ on sample b's rows of `in`, gate = chunk g.
    const auto gated_residual = [&](const Linear& lin, const Mat& in, const Mat& mod, int64_t g, int64_t b,
                                    auto rows) {
      ops.linear(rows(in, b), *lin.weight, lin.bias, rows(q, b));
      const Mat gate = chunk(mod, b, g);
      ops.residual(rows(hs_, b), &gate, rows(q, b), 1, rows(hs_, b));
    };
    for (int64_t b = 0; b < batch_; ++b) {
      gated_residual(x.out, nrm, mod_x, 2, b, img_rows);
      gated_residual(y.out, nrm, mod_y, 2, b, txt_rows);
    }
    ops.release(m_kv);

    // Feed-forward: stream = ⟦stream + ⟦gate · Lin(GELUt(Lin(Mod(stream))))⟧⟧ per stream.
    const Mat hidden = ops.alloc(n, f, dtype_);
    for (int64_t b = 0; b < batch_; ++b) {
      ops.modulate(img(hs_, b), chunk(mod_x, b, 3), chunk(mod_x, b, 4), 1, kEps, img(nrm, b));
      ops.linear_act(Activation::GeluTanh, img(nrm, b), *x.ff_in.weight, x.ff_in.bias, img(hidden, b));
      ops.modulate(txt(hs_, b), chunk(mod_y, b, 3), chunk(mod_y, b, 4), 1, kEps, txt(nrm, b));
      ops.linear_act(Activation::GeluTanh, txt(nrm, b), *y.ff_in.weight, y.ff_in.bias, txt(hidden, b));
    }
    for (int64_t b = 0; b < batch_; ++b) {
      gated_residual(x.ff_out, hidden, mod_x, 5, b, img_rows);
      gated_residual(y.ff_out, hidden, mod_y, 5, b, txt_rows);
      if (dtype_ == DType::F16) ops.clamp(txt(hs_, b), 65504.0f, txt(hs_, b));
    }
    ops.release(m);
  }

  void single_block(int64_t j, Ops& ops, WeightSource& weights) {
    const int64_t d = a_.dim(), f = 4 * d, hd = a_.head_dim, n = batch_ * seq();
    const std::string p = "single_transformer_blocks." + std::to_string(j) + ".";
    UnitWeights w(config_file_);
    const Linear mod_lin = w.linear(p + "norm.linear", d, 3 * d, true);
    const Linear mlp = w.linear(p + "proj_mlp", d, f, true);
    const auto [to_q, to_k, to_v] = w.linears(p + "attn.", {"to_q", "to_k", "to_v"}, d, d, true);
    const DequantParams& norm_q = w.vec(p + "attn.norm_q.weight", hd);
    const DequantParams& norm_k = w.vec(p + "attn.norm_k.weight", hd);
    const Linear out = w.linear(p + "proj_out", d + f, d, true);
    w.fetch(weights);

    const size_t m = ops.mark();
    const Mat mod = ops.alloc(batch_, 3 * d, dtype_);  // shift, scale, gate
    ops.linear(silu_c_, *mod_lin.weight, mod_lin.bias, mod);
    const Mat nrm = ops.alloc(n, d, dtype_);  // normalised input, then the output projection
    ops.modulate(hs_, mod.cols_view(0, d), mod.cols_view(d, d), batch_, kEps, nrm);
    // [attention output | GELUt(proj_mlp)]: the input of proj_out, filled in place.
    const Mat cat = ops.alloc(n, d + f, dtype_);
    const Mat u = cat.cols_view(d, f);
    ops.linear_act(Activation::GeluTanh, nrm, *mlp.weight, mlp.bias, u);
    const size_t m_qkv = ops.mark();
    const auto [q, k, v] = project_qkv(ops, nrm, to_q, to_k, to_v, d, d, dtype_);
    ops.rms_norm(q, norm_q, kEps, RmsRounding::Once, hd, q);
    ops.rms_norm(k, norm_k, kEps, RmsRounding::Once, hd, k);
    for (int64_t b = 0; b < batch_; ++b) rope_sample(ops, q, k, b);
    ops.attention(q, k, v, joint_attention(), cat.cols_view(0, d));
    ops.release(m_qkv);
    ops.linear(cat, *out.weight, out.bias, nrm);
    const Mat gate = mod.cols_view(2 * d, d);
    ops.residual(hs_, &gate, nrm, batch_, hs_);
    if (dtype_ == DType::F16) ops.clamp(hs_, 65504.0f, hs_);
    ops.release(m);
  }

  // ⟦⟦LN0(x) · ⟦1 + s⟧⟧ + σ⟧ of the image tokens, (s, σ) = split2(Lin(SiLU(c); norm_out.linear))
  // (scale first). The normalised tokens stay allocated for proj_out.
  void norm_out_unit(Ops& ops, WeightSource& weights) {
    const int64_t d = a_.dim();
    UnitWeights w(config_file_);
    const Linear lin = w.linear("norm_out.linear", d, 2 * d, true);
    w.fetch(weights);
    normed_ = ops.alloc(batch_ * ti_, d, dtype_);
    const size_t m = ops.mark();
    const Mat mod = ops.alloc(batch_, 2 * d, dtype_);
    ops.linear(silu_c_, *lin.weight, lin.bias, mod);
    for (int64_t b = 0; b < batch_; ++b)
      ops.modulate(img(hs_, b), chunk(mod, b, 1), chunk(mod, b, 0), 1, kEps, normed_.rows_view(b * ti_, ti_));
    ops.release(m);
  }

  void proj_out(Ops& ops, WeightSource& weights) {
    UnitWeights w(config_file_);
    const Linear lin = w.linear("proj_out", a_.dim(), out_cols(), true);
    w.fetch(weights);
    ops.linear(normed_, *lin.weight, lin.bias, sample_);
  }

  FluxArch a_;

  int64_t batch_ = 0, ti_ = 0, tt_ = 0;
  std::vector<uint8_t> x_in_, y_in_, pooled_in_, t_phi_, g_phi_;
  Mat hs_, c_, silu_c_, cos_, sin_, sample_, normed_;
};

}  // namespace

std::unique_ptr<Forward> make_flux(const FluxArch& arch, DType dtype, std::string config_file) {
  return std::make_unique<FluxForward>(arch, dtype, std::move(config_file));
}

}  // namespace qtool::runner::models
