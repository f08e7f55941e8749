// Whole-checkpoint conversion on synthetic and hand-built checkpoints: every scheme on the tiny
// Llama, the flux sample config on the tiny pipeline, sharding, bad weights, existing outputs,
// single files, and the dequantize round trip.
#include <doctest/doctest.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <random>
#include <set>
#include <string>

#include "qtool/formats/checkpoint.hpp"
#include "qtool/formats/error.hpp"
#include "qtool/formats/thread_pool.hpp"
#include "qtool/libquant/config.hpp"
#include "qtool/libquant/convert.hpp"
#include "test_convert_util.hpp"

namespace fs = std::filesystem;
using nlohmann::json;
using namespace qtool;
using namespace qtool::quant;

namespace {

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

bool has(const std::vector<std::string>& v, const std::string& x) {
  return std::find(v.begin(), v.end(), x) != v.end();
}

// Relative RMS error a scheme stays under on weights like the synthetic ones (normal rows with
// rare outliers of 10-50x). From the formats' resolution: e4m3 keeps 3 mantissa bits (relative
// rounding error <= 2^-4, RMS ~2^-4/sqrt(3) = 0.036 at worst, ~0.026 on normal data), e5m2 2 bits
// (twice that); int8 per row has a step of absmax/127 (~0.01-0.02 of the RMS); NF4 on normal
// blocks of 64 gives ~0.10 (SQNR near 20 dB), FP4 ~0.13. A block holding an outlier loses most
// of its resolution, and in the tiny presets' small tensors one such block weighs more: measured
// maxima over seeds were nf4 0.145, fp4 0.194, int8 0.020, e4m3 0.028, e5m2 0.055.
double rel_rms_bound(const SchemeOptions& o) {
  switch (o.scheme) {
    case Scheme::Int8: return 0.03;
    case Scheme::Fp8E4M3: return 0.036;
    case Scheme::Fp8E5M2: return 0.072;
    case Scheme::Nf4: return 0.17;
    case Scheme::Fp4: return 0.23;
  }
  return 0;
}

ConvertOptions quiet_options(size_t threads = 2) {
  ConvertOptions o;
  o.n_threads = threads;
  o.tool_version = "test";
  return o;
}

// The input files a conversion must carry over unchanged: everything but weights and config.json.
std::map<std::string, std::string> non_weight_files(const fs::path& root) {
  std::map<std::string, std::string> out;
  for (auto& [rel, bytes] : test::snapshot_tree(root)) {
    const std::string name = fs::path(rel).filename().string();
    if (name == "config.json" || contains(name, ".safetensors")) continue;
    out[rel] = bytes;
  }
  return out;
}

// rel RMS of a whole quantized weight from the output checkpoint against the input weight.
double independent_rel_rms(const QuantizedLinear& l, const Component& out, const std::vector<float>& ref,
                           ThreadPool& pool) {
  std::vector<float> deq(l.numel());
  dequantize_weight(l, out, deq.data(), pool);
  double se = 0, sr = 0;
  for (size_t i = 0; i < deq.size(); ++i) {
    se += (double(deq[i]) - ref[i]) * (double(deq[i]) - ref[i]);
    sr += double(ref[i]) * ref[i];
  }
  return sr > 0 ? std::sqrt(se / sr) : 0;
}

// Checks an output component against its input and the plan; returns the number of quantized
// linears found in the output.
void check_component(const Component& in, const Component& out, const ComponentPlan& plan,
                     const ConvertReport& report, ThreadPool& pool) {
  CAPTURE(in.name());
  const SchemeOptions so = *plan.options;
  std::set<std::string> expected_names;
  for (const auto& e : in.entries()) {
    const TensorInfo& t = in.info(e);
    const std::string m = module_of_tensor(t.name);
    if (t.name == m + ".weight" && plan.is_quantized(m)) {
      const auto decls = quantized_decls(m, t.dtype, t.shape, so);
      const auto w = out.find(decls[0].name);
      REQUIRE(w.has_value());
      for (const auto& d : decls) {
        CAPTURE(d.name);
        expected_names.insert(d.name);
        const auto o = out.find(d.name);
        REQUIRE(o.has_value());
        CHECK(out.info(*o).dtype == d.dtype);
        if (d.variable_length) {
          // bitsandbytes' quant_state JSON: as long as its nested_offset's repr, within the declared size.
          CHECK(out.info(*o).shape.size() == 1);
          CHECK(out.info(*o).nbytes() <= d.nbytes());
          const auto js = out.data(*o);
          CHECK(json::parse(js.begin(), js.end()).contains("nested_offset"));
        } else {
          CHECK(out.info(*o).shape == d.shape);
          CHECK(out.info(*o).nbytes() == d.nbytes());
        }
        CHECK(o->shard == w->shard);  // quant state lives in the weight's shard
      }
    } else {
      expected_names.insert(t.name);
      const auto o = out.find(t.name);
      REQUIRE_MESSAGE(o.has_value(), t.name);
      CHECK(out.info(*o).dtype == t.dtype);
      CHECK(out.info(*o).shape == t.shape);
      const auto a = in.data(e), b = out.data(*o);
      CHECK_MESSAGE(std::equal(a.begin(), a.end(), b.begin(), b.end()), "copied tensor differs: ", t.name);
    }
  }
  CHECK(out.entries().size() == expected_names.size());

  // The output reads back as quantized linears of the scheme, one per quantized module.
  const auto linears = find_quantized_linears(out);
  CHECK(linears.size() == plan.quantized_modules.size());
  for (const auto& l : linears) {
    CAPTURE(l.module);
    CHECK(plan.is_quantized(l.module));
    CHECK(l.options == so);
  }

  // Provenance in every file.
  for (const auto& shard : out.shards()) {
    const auto& meta = shard.metadata();
    CHECK(meta.at("format") == "pt");
    CHECK(meta.at("qtool_version") == "test");
    CHECK(meta.at("qtool_command") == "quantize");
    CHECK(meta.at("qtool_scheme") == scheme_name(so.scheme));
    CHECK(json::parse(meta.at("qtool_options")) == options_to_json(so));
    CHECK(meta.count("qtool_source_fingerprint") == 1);
  }

  // The report: every quantized tensor has its error, within the scheme's bound, and equal to
  // the error of the dequantized output recomputed here.
  size_t n_reported = 0;
  for (const auto& tr : report.tensors) {
    if (tr.component != in.name() || tr.scheme.empty()) continue;
    ++n_reported;
    CAPTURE(tr.name);
    REQUIRE(tr.has_error);
    CHECK(tr.rel_rms() < rel_rms_bound(so));
    CHECK(tr.sqnr_db() > -20 * std::log10(rel_rms_bound(so)));
    const std::string m = module_of_tensor(tr.name);
    const auto it =
        std::find_if(linears.begin(), linears.end(), [&](const QuantizedLinear& l) { return l.module == m; });
    REQUIRE(it != linears.end());
    const double again = independent_rel_rms(*it, out, test::tensor_f32(in, tr.name), pool);
    CHECK(tr.rel_rms() == doctest::Approx(again).epsilon(1e-3));
  }
  CHECK(n_reported == plan.quantized_modules.size());
}

void check_quantization_config(const json& qc, const SchemeOptions& so, const ComponentPlan& plan) {
  CHECK(qc == quantization_config_json(so, DType::BF16, plan.unquantized_modules));
  if (is_fp8(so.scheme)) {
    CHECK(qc.at("quant_method") == "compressed-tensors");
    // compressed-tensors' writer: weight-only fp8 is naive-quantized; "ignore" holds the unquantized
    // Linear modules (embeddings are not of the targeted type).
    CHECK(qc.at("format") == "naive-quantized");
    CHECK(qc.at("config_groups").at("group_0").at("format") == "naive-quantized");
    CHECK(qc.at("quantization_status") == "compressed");
    CHECK(qc.at("version").is_string());
    std::vector<std::string> linears;
    for (const auto& m : plan.unquantized_modules) {
      if (!is_embedding_module(m)) linears.push_back(m);
    }
    CHECK(qc.at("ignore").get<std::vector<std::string>>() == linears);
    CHECK(std::find(linears.begin(), linears.end(), "lm_head") != linears.end());
    const json& w = qc.at("config_groups").at("group_0").at("weights");
    CHECK(w.at("num_bits") == 8);
    CHECK(w.at("type") == "float");
    CHECK(w.at("strategy") == (so.per_tensor ? "tensor" : "channel"));
  } else {
    const bool four = is_4bit(so.scheme);
    CHECK(qc.at("quant_method") == "bitsandbytes");
    CHECK(qc.at("load_in_4bit") == four);
    CHECK(qc.at("load_in_8bit") == !four);
    CHECK(qc.at("_load_in_4bit") == four);
    CHECK(qc.at("_load_in_8bit") == !four);
    CHECK(qc.at("llm_int8_skip_modules").get<std::vector<std::string>>() == plan.unquantized_modules);
    if (four) {
      CHECK(qc.at("bnb_4bit_quant_type") == scheme_name(so.scheme));
      CHECK(qc.at("bnb_4bit_use_double_quant") == so.double_quant);
      CHECK(qc.at("bnb_4bit_compute_dtype") == "bfloat16");
      CHECK(qc.at("bnb_4bit_quant_storage") == "uint8");
    }
  }
}

// Generated from the scheme table: every scheme with its defaults, and once more with each option
// it reads set (per_tensor; double_quant with a blocksize of 128).
std::vector<SchemeOptions> scheme_matrix() {
  std::vector<SchemeOptions> v;
  for (const Scheme s : all_schemes()) {
    SchemeOptions o;
    o.scheme = s;
    v.push_back(o);
    if (scheme_has_option(s, "per_tensor")) {
      v.push_back(o);
      v.back().per_tensor = true;
    }
    if (scheme_has_option(s, "double_quant")) {
      v.push_back(o);
      v.back().double_quant = true;
      v.back().blocksize = 128;
    }
  }
  return v;
}

}  // namespace

TEST_CASE("quantize: every scheme on the tiny Llama, and dequantize back") {
  const uint64_t seed = test::printed_seed("quantize tiny");
  test::ScratchDir dir;
  const fs::path in_path = dir / "tiny";
  test::write_preset("tiny", in_path, seed);
  const auto input_before = test::snapshot_tree(in_path);
  const Checkpoint in = Checkpoint::open(in_path);
  ThreadPool pool(2);

  for (const SchemeOptions& so : scheme_matrix()) {
    const std::string tag = options_to_json(so).dump();
    CAPTURE(tag);
    const fs::path out_path = dir / "q";
    const QuantConfig config = config_for_scheme(so);
    const QuantPlan plan = plan_quantization(config, in);
    if (so.scheme == Scheme::Fp8E5M2) {
      // compressed-tensors' config cannot say e5m2 (loaders would read the codes as e4m3): a model
      // folder is refused, naming why and what to use, and nothing is written.
      ErrorKind kind = ErrorKind::Internal;
      const std::string msg = test::error_message(
          [&] { quantize_checkpoint(in_path, config, out_path, quiet_options()); }, &kind);
      CHECK(kind == ErrorKind::InvalidInput);
      CHECK(msg.find("fp8_e5m2") != std::string::npos);
      CHECK(msg.find("float8_e4m3fn") != std::string::npos);
      CHECK(msg.find("use fp8_e4m3") != std::string::npos);
      CHECK(msg.find(in_path.string()) != std::string::npos);
      CHECK(test::nothing_left(dir.path(), "q"));
      continue;
    }
    const ConvertReport report = quantize_checkpoint(in_path, config, out_path, quiet_options());
    const Checkpoint out = Checkpoint::open(out_path);
    REQUIRE(out.components().size() == 1);
    const ComponentPlan& cp = plan.components[0];
    CHECK(cp.is_quantized("model.layers.0.self_attn.q_proj"));
    CHECK(has(cp.unquantized_modules, "model.embed_tokens"));
    CHECK(has(cp.unquantized_modules, "lm_head"));
    check_component(in.components()[0], out.components()[0], cp, report, pool);
    REQUIRE(out.components()[0].config().has_value());
    const json& cfg = *out.components()[0].config();
    check_quantization_config(cfg.at("quantization_config"), so, cp);
    // The rest of config.json is the input's.
    json rest = cfg;
    rest.erase("quantization_config");
    CHECK(rest == *in.components()[0].config());
    CHECK(non_weight_files(out_path) == non_weight_files(in_path));
    CHECK(report.bytes_in == in.components()[0].total_bytes());
    CHECK(report.bytes_out == out.components()[0].total_bytes());
    CHECK(report.bytes_out < report.bytes_in);

    // Dequantize: plain weights of the original names, shapes and dtypes again.
    const fs::path deq_path = dir / "dq";
    dequantize_checkpoint(out_path, deq_path, std::nullopt, quiet_options());
    const Checkpoint deq = Checkpoint::open(deq_path);
    const Component& dc = deq.components()[0];
    const Component& ic = in.components()[0];
    CHECK(find_quantized_linears(dc).empty());
    CHECK(dc.entries().size() == ic.entries().size());
    const auto linears = find_quantized_linears(out.components()[0]);
    for (const auto& e : ic.entries()) {
      const TensorInfo& t = ic.info(e);
      CAPTURE(t.name);
      const auto d = dc.find(t.name);
      REQUIRE(d.has_value());
      CHECK(dc.info(*d).dtype == t.dtype);
      CHECK(dc.info(*d).shape == t.shape);
      const std::string m = module_of_tensor(t.name);
      if (t.name == m + ".weight" && cp.is_quantized(m)) {
        // Exactly qtool's dequantization rounded to the dtype, and within the scheme's bound.
        const auto l =
            std::find_if(linears.begin(), linears.end(), [&](const auto& x) { return x.module == m; });
        REQUIRE(l != linears.end());
        std::vector<float> f(l->numel());
        dequantize_weight(*l, out.components()[0], f.data(), pool);
        std::vector<uint8_t> expect(f.size() * dtype_size(t.dtype));
        convert_from_f32(t.dtype, f.data(), expect.data(), f.size());
        const auto got = dc.data(*d);
        CHECK(std::equal(got.begin(), got.end(), expect.begin(), expect.end()));
        const auto ref = test::tensor_f32(ic, t.name);
        const auto back = test::tensor_f32(dc, t.name);
        double se = 0, sr = 0;
        for (size_t i = 0; i < ref.size(); ++i) {
          se += (double(back[i]) - ref[i]) * (double(back[i]) - ref[i]);
          sr += double(ref[i]) * ref[i];
        }
        CHECK(std::sqrt(se / sr) < rel_rms_bound(so) + 0.01);
      } else {
        const auto a = ic.data(e), b = dc.data(*d);
        CHECK(std::equal(a.begin(), a.end(), b.begin(), b.end()));
      }
    }
    CHECK(*dc.config() == *ic.config());
    CHECK(non_weight_files(deq_path) == non_weight_files(in_path));
    for (const auto& shard : dc.shards()) CHECK(shard.metadata().at("qtool_command") == "dequantize");
    fs::remove_all(out_path);
    fs::remove_all(deq_path);
  }
  CHECK(test::snapshot_tree(in_path) == input_before);  // the input was never written
}

TEST_CASE("quantize: the flux sample config on the tiny pipeline") {
  const uint64_t seed = test::printed_seed("quantize tiny-flux");
  test::ScratchDir dir;
  const fs::path in_path = dir / "flux";
  test::write_preset("tiny-flux", in_path, seed);
  const QuantConfig config = read_quant_config(fs::path(QTOOL_SAMPLE_CONFIGS) / "flux-nf4.json");
  const Checkpoint in = Checkpoint::open(in_path);
  const QuantPlan plan = plan_quantization(config, in);
  CHECK(plan.warnings.empty());
  const ConvertReport report = quantize_checkpoint(in_path, config, dir / "out", quiet_options());
  CHECK(report.warnings.empty());
  const Checkpoint out = Checkpoint::open(dir / "out");
  ThreadPool pool(2);

  REQUIRE(out.layout() == Checkpoint::Layout::Pipeline);
  CHECK(out.other_components() == in.other_components());
  CHECK(test::read_file_bytes(dir / "out" / "model_index.json") ==
        test::read_file_bytes(in_path / "model_index.json"));
  CHECK(non_weight_files(dir / "out") == non_weight_files(in_path));
  CHECK(report.files_copied == non_weight_files(in_path).size());

  for (const Component& ic : in.components()) {
    CAPTURE(ic.name());
    const Component* oc = out.find_component(ic.name());
    REQUIRE(oc != nullptr);
    const ComponentPlan* cp = plan.find(ic.name());
    REQUIRE(cp != nullptr);
    if (ic.name() == "transformer" || ic.name() == "text_encoder_2") {
      const SchemeOptions so = *cp->options;
      CHECK(so.scheme == (ic.name() == "transformer" ? Scheme::Nf4 : Scheme::Int8));
      check_component(ic, *oc, *cp, report, pool);
      check_quantization_config(oc->config()->at("quantization_config"), so, *cp);
    } else {
      // Copied: the same tensors, and config.json without a quantization_config.
      CHECK_FALSE(cp->options.has_value());
      CHECK(find_quantized_linears(*oc).empty());
      CHECK(oc->entries().size() == ic.entries().size());
      for (const auto& e : ic.entries()) {
        const auto o = oc->find(ic.info(e).name);
        REQUIRE(o.has_value());
        const auto a = ic.data(e), b = oc->data(*o);
        CHECK(std::equal(a.begin(), a.end(), b.begin(), b.end()));
      }
      CHECK(*oc->config() == *ic.config());
    }
  }
  // The skip patterns: left in bf16 and named for the loader.
  const ComponentPlan* t = plan.find("transformer");
  for (const char* m : {"x_embedder", "context_embedder", "norm_out.linear"}) {
    CHECK_FALSE(t->is_quantized(m));
    CHECK(has(
        out.find_component("transformer")->config()->at("quantization_config").at("llm_int8_skip_modules"),
        m));
    CHECK(out.find_component("transformer")
              ->info(*out.find_component("transformer")->find(std::string(m) + ".weight"))
              .dtype == DType::BF16);
  }
  CHECK(t->is_quantized("proj_out"));
  CHECK(t->is_quantized("single_transformer_blocks.0.proj_out"));
}

TEST_CASE("quantize: shards keep each weight with its quant state") {
  const uint64_t seed = test::printed_seed("quantize shards");
  test::ScratchDir dir;
  const fs::path in_path = dir / "tiny";
  // The input sharded at 1 MB.
  test::write_preset("tiny", in_path, seed, DType::BF16, 1.0, uint64_t{1} << 20);
  const Checkpoint in = Checkpoint::open(in_path);
  REQUIRE(in.components()[0].shards().size() > 1);
  uint64_t largest_in = 0;
  for (const auto& s : in.components()[0].shards()) largest_in = std::max(largest_in, s.file_size());

  SchemeOptions so;
  so.scheme = Scheme::Nf4;
  so.double_quant = true;
  const QuantConfig config = config_for_scheme(so);

  SUBCASE("--max-shard-size") {
    ConvertOptions o = quiet_options();
    o.max_shard_size = 96 * 1024;
    quantize_checkpoint(in_path, config, dir / "out", o);
  }
  SUBCASE("as the input") { quantize_checkpoint(in_path, config, dir / "out", quiet_options()); }

  const Checkpoint out = Checkpoint::open(dir / "out");
  const Component& oc = out.components()[0];
  CHECK(oc.shards().size() > 1);
  CHECK_FALSE(oc.index_path().empty());
  const auto linears = find_quantized_linears(oc);
  CHECK_FALSE(linears.empty());
  std::set<uint32_t> shards_used;
  for (const auto& l : linears) {
    const uint32_t shard = oc.find(l.tensor_names[0])->shard;
    shards_used.insert(shard);
    for (const auto& n : l.tensor_names) CHECK(oc.find(n)->shard == shard);
  }
  CHECK(shards_used.size() > 1);
  for (const auto& s : oc.shards()) {
    // A shard may exceed the limit only when one group alone does.
    if (s.tensors().size() > 6) CHECK(s.file_size() <= std::max<uint64_t>(largest_in, 96 * 1024) + 4096);
  }
}

namespace {

// A model folder with two F32 (or BF16) linears, one of which holds a bad value at (row, col).
void write_bad_model(const fs::path& dir, DType dtype, int64_t row, int64_t col, float bad, uint64_t seed) {
  fs::create_directories(dir);
  write_json_file(dir / "config.json", json{{"model_type", "llama"}});
  const std::vector<int64_t> a{8, 16}, b{6, 40};
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.0f, 0.02f);
  auto fill = [&](size_t n, bool with_bad) {
    std::vector<float> f(n);
    for (auto& x : f) x = nd(rng);
    if (with_bad) f[static_cast<size_t>(row * 40 + col)] = bad;
    std::vector<uint8_t> bytes(n * dtype_size(dtype));
    convert_from_f32(dtype, f.data(), bytes.data(), n);
    return bytes;
  };
  ComponentWriter w(dir, "model", {{TensorDecl{"a.weight", dtype, a}}, {TensorDecl{"b.weight", dtype, b}}},
                    0);
  w.write("a.weight", fill(8 * 16, false));
  w.write("b.weight", fill(6 * 40, true));
  w.commit();
}

}  // namespace

TEST_CASE("quantize: NaN or Inf in a weight names the tensor and the element; nothing is written") {
  const uint64_t seed = test::printed_seed("quantize nan");
  struct Case {
    DType dtype;
    int64_t row, col;
    float bad;
    const char* what;
  };
  const Case cases[] = {{DType::F32, 2, 5, std::nanf(""), "NaN"},
                        {DType::BF16, 5, 39, INFINITY, "Inf"},
                        {DType::F16, 0, 0, -INFINITY, "-Inf"}};
  for (const Case& c : cases) {
    for (Scheme s : {Scheme::Int8, Scheme::Fp8E4M3, Scheme::Nf4}) {
      CAPTURE(c.what);
      CAPTURE(scheme_name(s));
      test::ScratchDir dir;
      write_bad_model(dir / "m", c.dtype, c.row, c.col, c.bad, seed);
      SchemeOptions so;
      so.scheme = s;
      ErrorKind kind = ErrorKind::Internal;
      const std::string msg = test::error_message(
          [&] { quantize_checkpoint(dir / "m", config_for_scheme(so), dir / "out", quiet_options()); },
          &kind);
      CHECK(kind == ErrorKind::InvalidInput);
      CHECK_MESSAGE(contains(msg, "'b.weight'"), msg);
      CHECK_MESSAGE(contains(msg, str_cat("(", c.row, ", ", c.col, ")")), msg);
      CHECK_MESSAGE(contains(msg, c.what), msg);
      CHECK(test::nothing_left(dir.path(), "out"));
    }
  }
}

TEST_CASE("quantize / dequantize: a shard truncated while it is read is an error naming it, not SIGBUS") {
  // A download restarting under a running conversion: after the first tensor is done, the input
  // shard is cut back to its first page. The tensors read after that lie past the file's end;
  // reading their mapped pages used to kill the process with SIGBUS.
  const uint64_t seed = test::printed_seed("truncated shard");
  for (const bool dequantize : {false, true}) {
    for (Scheme s : {Scheme::Int8, Scheme::Nf4}) {
      CAPTURE(dequantize);
      CAPTURE(scheme_name(s));
      test::ScratchDir dir;
      SchemeOptions so;
      so.scheme = s;
      test::write_preset("tiny", dir / "tiny", seed);
      fs::path in = dir / "tiny";
      if (dequantize) {
        quantize_checkpoint(dir / "tiny", config_for_scheme(so), dir / "q", quiet_options());
        in = dir / "q";
      }
      fs::path shard;
      for (const auto& e : fs::directory_iterator(in))
        if (e.path().extension() == ".safetensors") shard = e.path();
      REQUIRE(!shard.empty());
      const std::string before = test::read_file_bytes(shard);
      ConvertOptions o = quiet_options();
      std::atomic<bool> cut{false};
      o.progress = [&](uint64_t, uint64_t, std::string_view) {
        if (!cut.exchange(true)) REQUIRE(::truncate(shard.c_str(), 4096) == 0);
      };
      ErrorKind kind = ErrorKind::Internal;
      const std::string msg = test::error_message(
          [&] {
            if (dequantize)
              dequantize_checkpoint(in, dir / "out", std::nullopt, o);
            else
              quantize_checkpoint(in, config_for_scheme(so), dir / "out", o);
          },
          &kind);
      CHECK(cut.load());
      CHECK(kind == ErrorKind::Io);
      CHECK_MESSAGE(contains(msg, shard.string()), msg);
      CHECK_MESSAGE(contains(msg, "truncated while being read"), msg);
      CHECK(test::nothing_left(dir.path(), "out"));
      CHECK(fs::file_size(shard) == 4096);
      CHECK(before.size() > 4096);
    }
  }
}

TEST_CASE("quantize: an existing output is refused without force and replaced with it") {
  test::ScratchDir dir;
  test::write_preset("tiny", dir / "tiny", test::printed_seed("quantize existing"));
  fs::create_directories(dir / "out");
  std::ofstream(dir / "out" / "keep.txt") << "mine";
  SchemeOptions so;
  so.scheme = Scheme::Int8;
  ErrorKind kind = ErrorKind::Internal;
  const std::string msg = test::error_message(
      [&] { quantize_checkpoint(dir / "tiny", config_for_scheme(so), dir / "out", quiet_options()); }, &kind);
  CHECK(kind == ErrorKind::InvalidInput);
  CHECK(contains(msg, "exists"));
  CHECK(contains(msg, (dir / "out").string()));
  CHECK(test::read_file_bytes(dir / "out" / "keep.txt") == "mine");
  ConvertOptions o = quiet_options();
  o.force = true;
  quantize_checkpoint(dir / "tiny", config_for_scheme(so), dir / "out", o);
  CHECK_FALSE(fs::exists(dir / "out" / "keep.txt"));
  CHECK_FALSE(find_quantized_linears(Checkpoint::open(dir / "out").components()[0]).empty());
  // The output may not be the input, nor lie inside it.
  o.force = true;
  CHECK_THROWS_AS(quantize_checkpoint(dir / "tiny", config_for_scheme(so), dir / "tiny", o), Error);
  CHECK_THROWS_AS(quantize_checkpoint(dir / "tiny", config_for_scheme(so), dir / "tiny" / "q", o), Error);
  CHECK(Checkpoint::open(dir / "tiny").components()[0].entries().size() > 0);
}

TEST_CASE("quantize: an already quantized input is refused") {
  test::ScratchDir dir;
  test::write_preset("tiny", dir / "tiny", test::printed_seed("quantize twice"));
  SchemeOptions so;
  so.scheme = Scheme::Nf4;
  quantize_checkpoint(dir / "tiny", config_for_scheme(so), dir / "q", quiet_options());
  const std::string msg = test::error_message(
      [&] { quantize_checkpoint(dir / "q", config_for_scheme(so), dir / "qq", quiet_options()); });
  CHECK(contains(msg, "already quantized"));
  CHECK(contains(msg, "dequantize"));
  CHECK(test::nothing_left(dir.path(), "qq"));
}

TEST_CASE("quantize: a single .safetensors file gives a single file") {
  test::ScratchDir dir;
  test::write_preset("tiny", dir / "tiny", test::printed_seed("quantize file"), DType::BF16, 1.0,
                     uint64_t{1} << 30);
  fs::copy_file(dir / "tiny" / "model.safetensors", dir / "w.safetensors");
  SchemeOptions so;
  so.scheme = Scheme::Fp8E4M3;
  const ConvertReport r = quantize_checkpoint(dir / "w.safetensors", config_for_scheme(so),
                                              dir / "q.safetensors", quiet_options());
  CHECK(r.files_copied == 0);
  const Checkpoint out = Checkpoint::open(dir / "q.safetensors");
  CHECK(out.layout() == Checkpoint::Layout::File);
  CHECK(find_quantized_linears(out.components()[0]).size() ==
        plan_quantization(config_for_scheme(so), Checkpoint::open(dir / "w.safetensors"))
            .components[0]
            .quantized_modules.size());
  ConvertOptions o = quiet_options();
  o.max_shard_size = 1 << 20;
  ErrorKind kind = ErrorKind::Internal;
  test::error_message(
      [&] { quantize_checkpoint(dir / "w.safetensors", config_for_scheme(so), dir / "q2.safetensors", o); },
      &kind);
  CHECK(kind == ErrorKind::Usage);
  // And back, as float32.
  dequantize_checkpoint(dir / "q.safetensors", dir / "d.safetensors", DType::F32, quiet_options());
  const Checkpoint d = Checkpoint::open(dir / "d.safetensors");
  CHECK(d.components()[0].info(*d.components()[0].find("model.layers.0.mlp.up_proj.weight")).dtype ==
        DType::F32);
  CHECK(d.components()[0].info(*d.components()[0].find("model.embed_tokens.weight")).dtype == DType::BF16);
}

TEST_CASE("quantize: the JSON report") {
  test::ScratchDir dir;
  test::write_preset("tiny", dir / "tiny", test::printed_seed("quantize report"));
  SchemeOptions so;
  so.scheme = Scheme::Int8;
  const ConvertReport r =
      quantize_checkpoint(dir / "tiny", config_for_scheme(so), dir / "q", quiet_options(1));
  const json j = report_to_json(r);
  CHECK(j.at("command") == "quantize");
  CHECK(j.at("threads") == 1);
  CHECK(j.at("bytes_in") == r.bytes_in);
  CHECK(j.at("tensors").size() == Checkpoint::open(dir / "tiny").components()[0].entries().size());
  const json& totals = j.at("totals");
  size_t n = 0;
  double worst = 1e9;
  for (const auto& t : j.at("tensors")) {
    if (t.at("scheme").is_null()) {
      CHECK_FALSE(t.contains("sqnr_db"));
      CHECK(t.at("bytes_in") == t.at("bytes_out"));
      continue;
    }
    ++n;
    CHECK(t.at("scheme") == "int8");
    CHECK(t.at("rel_rms").get<double>() > 0);
    CHECK(t.at("bytes_out").get<uint64_t>() < t.at("bytes_in").get<uint64_t>());
    worst = std::min(worst, t.at("sqnr_db").get<double>());
  }
  CHECK(totals.at("tensors_converted") == n);
  CHECK(totals.at("worst").at("sqnr_db").get<double>() == doctest::Approx(worst));
  CHECK(totals.at("sqnr_db").get<double>() > worst);
  CHECK(j.at("components").at(0).at("scheme") == "int8");
  const std::string text = summary_text(r, true);
  CHECK(contains(text, "int8"));
  CHECK(contains(text, "model.layers.0.mlp.up_proj.weight"));
}

TEST_CASE("quantize: the written tensors are the whole-weight quantization, byte for byte") {
  // What quantize_checkpoint writes (rows split across threads, parts written from reused
  // buffers by the write threads) equals quantize_weight on the whole tensor, for shapes that cross
  // the kernels' block and thread-split boundaries in every way.
  const uint64_t seed = test::printed_seed("quantize whole");
  std::mt19937_64 rng(seed);
  test::ScratchDir dir;
  const std::vector<std::pair<std::string, std::vector<int64_t>>> shapes = {
      {"a.weight", {1, 1}},     {"b.weight", {3, 5}},      {"c.weight", {7, 33}},
      {"d.weight", {130, 7}},   {"e.weight", {200, 1000}}, {"f.weight", {1, 70000}},
      {"g.weight", {300, 256}}, {"h.weight", {129, 1023}}};
  for (DType dtype : {DType::BF16, DType::F16, DType::F32}) {
    CAPTURE(dtype_name(dtype));
    const fs::path model = dir / ("m-" + std::string(dtype_name(dtype)));
    fs::create_directories(model);
    write_json_file(model / "config.json", json{{"model_type", "llama"}});
    std::vector<std::vector<TensorDecl>> groups;
    for (const auto& [name, shape] : shapes) groups.push_back({TensorDecl{name, dtype, shape}});
    std::map<std::string, std::vector<uint8_t>> values;
    {
      ComponentWriter w(model, "model", groups, 0);
      std::normal_distribution<float> nd(0.0f, 1.0f);
      for (const auto& [name, shape] : shapes) {
        std::vector<float> f(static_cast<size_t>(shape[0] * shape[1]));
        for (size_t i = 0; i < f.size(); ++i)
          f[i] = (i % 97 == 3 ? 0.0f : 0.02f * nd(rng)) * (i % 501 == 7 ? 40.0f : 1.0f);
        std::vector<uint8_t> bytes(f.size() * dtype_size(dtype));
        convert_from_f32(dtype, f.data(), bytes.data(), f.size());
        w.write(name, bytes);
        values[name] = bytes;
      }
      w.commit();
    }
    ThreadPool pool(2);
    for (const SchemeOptions& so : scheme_matrix()) {
      const std::string tag = options_to_json(so).dump();
      CAPTURE(tag);
      // fp8_e5m2 is written for single files only (a folder's config could not say e5m2).
      const bool as_file = so.scheme == Scheme::Fp8E5M2;
      const fs::path out = dir / (as_file ? "q.safetensors" : "q");
      const ConvertReport r = quantize_checkpoint(as_file ? model / "model.safetensors" : model,
                                                  config_for_scheme(so), out, quiet_options());
      const Checkpoint q = Checkpoint::open(out);
      const Component& qc = q.components()[0];
      for (const auto& [name, shape] : shapes) {
        CAPTURE(name);
        const std::string module = name.substr(0, name.size() - 7);
        const auto whole = quantize_weight(module, name, dtype, shape, values[name], so, pool);
        for (const auto& t : whole) {
          const auto e = qc.find(t.decl.name);
          REQUIRE(e.has_value());
          const auto got = qc.data(*e);
          CHECK_MESSAGE(std::equal(got.begin(), got.end(), t.bytes.begin(), t.bytes.end()), t.decl.name);
        }
      }
      // The error of every tensor equals the one measured from the whole weight.
      for (const auto& tr : r.tensors) {
        CAPTURE(tr.name);
        const auto linears = find_quantized_linears(qc);
        const auto l = std::find_if(linears.begin(), linears.end(), [&](const QuantizedLinear& x) {
          return x.module + ".weight" == tr.name;
        });
        REQUIRE(l != linears.end());
        std::vector<float> ref(l->numel());
        convert_to_f32(dtype, values[tr.name].data(), ref.data(), ref.size());
        CHECK(tr.rel_rms() == doctest::Approx(independent_rel_rms(*l, qc, ref, pool)).epsilon(1e-4));
      }
      fs::remove_all(out);
    }
  }
}
