// The public libquant API: scheme names and options, layouts (names, dtypes, shapes, and sizes that
// do not depend on the data), NaN/Inf errors naming the element, the tensor -> module rule, and
// recognising quantized linears in a safetensors file (including inconsistent quant state).
#include <stdlib.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <limits>
#include <map>

#include "qtool/formats/checkpoint.hpp"
#include "qtool/formats/safetensors.hpp"
#include "test_scheme_util.hpp"

using namespace qtool;
using namespace qtool::quant;

namespace {

class TempDir {
 public:
  TempDir() {
    std::string tmpl = (std::filesystem::temp_directory_path() / "qtool-quant-XXXXXX").string();
    REQUIRE(::mkdtemp(tmpl.data()) != nullptr);
    path_ = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  std::filesystem::path operator/(const std::string& n) const { return path_ / n; }

 private:
  std::filesystem::path path_;
};

// Runs fn, expecting Error of `kind` whose message contains every string in `needles`.
void expect_error(const std::function<void()>& fn, ErrorKind kind,
                  std::initializer_list<std::string> needles) {
  try {
    fn();
    FAIL("no error thrown; expected one containing '", *needles.begin(), "'");
  } catch (const Error& e) {
    CAPTURE(e.what());
    CHECK(e.kind() == kind);
    for (const auto& n : needles)
      CHECK_MESSAGE(std::string(e.what()).find(n) != std::string::npos, "missing: ", n);
  }
}

struct FileTensor {
  TensorDecl decl;
  std::vector<uint8_t> bytes;
};

void write_file(const std::filesystem::path& path, const std::vector<FileTensor>& tensors) {
  std::vector<TensorDecl> decls;
  for (const auto& t : tensors) decls.push_back(t.decl);
  SafetensorsWriter w(path, decls);
  for (const auto& t : tensors) w.write(t.decl.name, t.bytes);
  w.commit();
}

std::vector<FileTensor> quantized(const std::string& module, const test::TestWeight& w,
                                  const SchemeOptions& o, ThreadPool& pool) {
  std::vector<FileTensor> out;
  for (auto& t :
       quantize_weight(module, str_cat("'", module, ".weight'"), w.dtype, w.shape(), w.bytes, o, pool))
    out.push_back({std::move(t.decl), std::move(t.bytes)});
  return out;
}

}  // namespace

TEST_CASE("scheme names and options") {
  CHECK(parse_scheme("int8") == Scheme::Int8);
  CHECK(parse_scheme("fp8") == Scheme::Fp8E4M3);
  CHECK(parse_scheme("fp8_e4m3") == Scheme::Fp8E4M3);
  CHECK(parse_scheme("fp8_e5m2") == Scheme::Fp8E5M2);
  CHECK(parse_scheme("nf4") == Scheme::Nf4);
  CHECK(parse_scheme("fp4") == Scheme::Fp4);
  CHECK_FALSE(parse_scheme("int4").has_value());
  CHECK_FALSE(parse_scheme("NF4").has_value());
  for (Scheme s : {Scheme::Int8, Scheme::Fp8E4M3, Scheme::Fp8E5M2, Scheme::Nf4, Scheme::Fp4})
    CHECK(parse_scheme(scheme_name(s)) == s);

  for (uint32_t bs : {32u, 64u, 256u, 4096u}) CHECK_NOTHROW(validate_options({Scheme::Nf4, bs}));
  for (uint32_t bs : {0u, 16u, 48u, 100u, 8192u})
    expect_error(
        [&] {
          validate_options({Scheme::Fp4, bs}, "quant_kwargs");
        },
        ErrorKind::InvalidInput, {"quant_kwargs", "blocksize", std::to_string(bs)});
  expect_error([] { validate_options({Scheme::Int8, 64, true}); }, ErrorKind::InvalidInput, {"double_quant"});
  expect_error(
      [] {
        validate_options({Scheme::Nf4, 64, false, true});
      },
      ErrorKind::InvalidInput, {"per_tensor"});
  CHECK_NOTHROW(validate_options({Scheme::Fp8E5M2, 64, false, true}));
}

TEST_CASE("layouts: names, dtypes and shapes per scheme") {
  const std::vector<int64_t> shape{3072, 3073};
  auto names = [](const std::vector<TensorDecl>& d) {
    std::vector<std::string> n;
    for (const auto& x : d) n.push_back(x.name + ":" + std::string(dtype_name(x.dtype)));
    return n;
  };
  const auto i8 = quantized_decls("a.b", DType::BF16, shape, {Scheme::Int8});
  CHECK(names(i8) == std::vector<std::string>{"a.b.weight:I8", "a.b.SCB:F32", "a.b.weight_format:U8"});
  CHECK(i8[0].shape == shape);
  CHECK(i8[1].shape == std::vector<int64_t>{3072});
  CHECK(i8[2].shape.empty());

  const auto f8 = quantized_decls("a.b", DType::F16, shape, {Scheme::Fp8E4M3});
  CHECK(names(f8) == std::vector<std::string>{"a.b.weight:F8_E4M3", "a.b.weight_scale:F16"});
  CHECK(f8[1].shape == std::vector<int64_t>{3072, 1});
  const auto f8t = quantized_decls("a.b", DType::BF16, shape, {Scheme::Fp8E5M2, 64, false, true});
  CHECK(names(f8t) == std::vector<std::string>{"a.b.weight:F8_E5M2", "a.b.weight_scale:BF16"});
  CHECK(f8t[1].shape == std::vector<int64_t>{1});

  const uint64_t n = 3072ull * 3073;
  const auto nf = quantized_decls("a.b", DType::BF16, shape, {Scheme::Nf4, 64, true});
  CHECK(names(nf) == std::vector<std::string>{"a.b.weight:U8", "a.b.weight.absmax:U8",
                                              "a.b.weight.quant_map:F32", "a.b.weight.nested_absmax:F32",
                                              "a.b.weight.nested_quant_map:F32",
                                              "a.b.weight.quant_state.bitsandbytes__nf4:U8"});
  CHECK(nf[0].shape == std::vector<int64_t>{static_cast<int64_t>((n + 1) / 2), 1});
  CHECK(nf[1].shape == std::vector<int64_t>{static_cast<int64_t>((n + 63) / 64)});
  CHECK(nf[3].shape == std::vector<int64_t>{static_cast<int64_t>(((n + 63) / 64 + 255) / 256)});
  const auto fp = quantized_decls("a.b", DType::F32, shape, {Scheme::Fp4, 128});
  CHECK(names(fp) == std::vector<std::string>{"a.b.weight:U8", "a.b.weight.absmax:F32",
                                              "a.b.weight.quant_map:F32",
                                              "a.b.weight.quant_state.bitsandbytes__fp4:U8"});
  CHECK(quantized_nbytes(DType::BF16, shape, {Scheme::Int8}) == n + 3072 * 4 + 1);

  expect_error(
      [] {
        quantized_decls("m", DType::BF16, std::vector<int64_t>{4, 4, 4}, {Scheme::Nf4});
      },
      ErrorKind::InvalidInput, {"'m'", "2-D"});
  expect_error(
      [] {
        quantized_decls("m", DType::I32, std::vector<int64_t>{4, 4}, {Scheme::Nf4});
      },
      ErrorKind::Unsupported, {"I32"});
  expect_error(
      [] {
        quantized_decls("m", DType::BF16, std::vector<int64_t>{0, 4}, {Scheme::Int8});
      },
      ErrorKind::InvalidInput, {"empty"});
}

TEST_CASE("sizes do not depend on the data but for the double-quant quant_state, bitsandbytes' own JSON") {
  ThreadPool pool(2);
  std::mt19937_64 rng(test::scheme_test_seed("fixed sizes"));
  for (Scheme s : {Scheme::Nf4, Scheme::Fp4})
    for (bool dq : {false, true}) {
      const SchemeOptions o{s, 64, dq};
      const auto decls = quantized_decls("m", DType::F32, std::vector<int64_t>{33, 65}, o);
      CHECK(decls.back().variable_length == dq);
      for (size_t i = 0; i + 1 < decls.size(); ++i) CHECK_FALSE(decls[i].variable_length);
      // Offsets of very different magnitudes (and exactly 0): every other part has the same size.
      for (float mag : {0.0f, 1e-30f, 3e-5f, 1e-4f, 0.7f, 123456.0f, 1e30f}) {
        test::TestWeight w(DType::F32, 33, 65);
        std::normal_distribution<float> nd;
        for (uint64_t i = 0; i < w.numel(); ++i) w.set(i, nd(rng) * mag);
        const auto t = quantize_weight("m", "w", w.dtype, w.shape(), w.bytes, o, pool);
        REQUIRE(t.size() == decls.size());
        for (size_t i = 0; i < t.size(); ++i) {
          CHECK(t[i].decl.name == decls[i].name);
          CHECK(t[i].decl.nbytes() == t[i].bytes.size());
          if (i + 1 < t.size() || !dq)
            CHECK(t[i].bytes.size() == decls[i].nbytes());
          else
            CHECK(t[i].bytes.size() <= decls[i].nbytes());
        }
        const std::string json(t.back().bytes.begin(), t.back().bytes.end());
        CAPTURE(json);
        const auto j = nlohmann::json::parse(json);
        CHECK(j["quant_type"] == std::string(scheme_name(s)));
        CHECK(j["shape"] == nlohmann::json::array({33, 65}));
        CHECK(j["dtype"] == "float32");
        CHECK(j.contains("nested_offset") == dq);
        // json.dumps of bitsandbytes' dict: this key order, ", " and ": ", the offset's repr.
        std::string want = str_cat("{\"quant_type\": \"", scheme_name(s),
                                   "\", \"blocksize\": 64, \"dtype\": \"float32\", "
                                   "\"shape\": [33, 65]");
        if (dq) {
          const float offset = j["nested_offset"].get<float>();
          want += str_cat(", \"nested_blocksize\": 256, \"nested_dtype\": \"float32\", \"nested_offset\": ",
                          detail::python_float_repr(static_cast<double>(offset)));
          CHECK(std::isfinite(offset));
        }
        CHECK(json == want + "}");
      }
    }
}

TEST_CASE("python_float_repr: Python's repr of a double (what json.dumps writes)") {
  // repr() in CPython 3.11 of each value.
  const std::pair<double, const char*> cases[] = {
      {0.0, "0.0"},
      {-0.0, "-0.0"},
      {1.0, "1.0"},
      {0.5, "0.5"},
      {100.0, "100.0"},
      {0.1, "0.1"},
      {static_cast<double>(0.09431193f), "0.09431193023920059"},
      {1e-4, "0.0001"},
      {1e-5, "1e-05"},
      {1.5e-5, "1.5e-05"},
      {0.00012345, "0.00012345"},
      {1234567890123456.0, "1234567890123456.0"},
      {1e16, "1e+16"},
      {1.25e16, "1.25e+16"},
      {123.456, "123.456"},
      {-2.5, "-2.5"},
      {static_cast<double>(std::numeric_limits<float>::denorm_min()), "1.401298464324817e-45"},
      {static_cast<double>(std::numeric_limits<float>::max()), "3.4028234663852886e+38"},
      {static_cast<double>(1e-30f), "1.0000000031710769e-30"},
      {std::numeric_limits<double>::denorm_min(), "5e-324"},
      {std::numeric_limits<double>::max(), "1.7976931348623157e+308"},
      {std::numeric_limits<double>::infinity(), "Infinity"},
      {-std::numeric_limits<double>::infinity(), "-Infinity"},
      {std::nan(""), "NaN"},
  };
  for (const auto& [v, want] : cases) {
    CAPTURE(want);
    CHECK(detail::python_float_repr(v) == want);
    CHECK(detail::python_float_repr(v).size() <= detail::kMaxFloatReprChars);
  }
  // Any float32 widened to double: reads back exactly, no longer than the limit, and no shorter
  // digit string would read back (the shortest), from a printed seed.
  std::mt19937_64 rng(test::scheme_test_seed("float repr"));
  for (int i = 0; i < 200000; ++i) {
    uint32_t bits32 = static_cast<uint32_t>(rng());
    float f;
    std::memcpy(&f, &bits32, 4);
    if (!std::isfinite(f)) continue;
    const double v = static_cast<double>(f);
    const std::string r = detail::python_float_repr(v);
    CAPTURE(r);
    REQUIRE(std::strtod(r.c_str(), nullptr) == v);
    REQUIRE(r.size() <= detail::kMaxFloatReprChars);
    char shorter[64];
    std::snprintf(shorter, sizeof shorter, "%.*e", 15, v);  // 16 significant digits
    // Significant digits of the repr: its mantissa's digits without leading or trailing zeros.
    std::string sig;
    for (char c : r.substr(0, r.find('e')))
      if (c >= '0' && c <= '9') sig += c;
    sig.erase(0, sig.find_first_not_of('0'));
    sig.erase(sig.find_last_not_of('0') + 1);
    const size_t n_sig = sig.size();
    if (n_sig > 16) REQUIRE(std::strtod(shorter, nullptr) != v);
  }
}

TEST_CASE("NaN or Inf in a weight is an error naming the tensor and the first bad element") {
  ThreadPool pool(2);
  std::mt19937_64 rng(test::scheme_test_seed("non-finite"));
  for (Scheme s : {Scheme::Int8, Scheme::Fp8E4M3, Scheme::Fp8E5M2, Scheme::Nf4, Scheme::Fp4})
    for (DType dt : {DType::BF16, DType::F16, DType::F32})
      for (float bad :
           {std::nanf(""), -std::numeric_limits<float>::infinity(), std::numeric_limits<float>::infinity()}) {
        auto w = test::random_weight(dt, 300, 70, rng, false, s);
        w.set(299 * 70 + 69, bad);  // the last element, in the last thread's range
        w.set(5 * 70 + 3, bad);     // the first one, which the message must name
        CAPTURE(std::string(scheme_name(s)) + " " + test::dtype_str(dt));
        const std::string kind = std::isnan(bad) ? "NaN" : bad < 0 ? "-Inf" : "Inf";
        for (auto impl : {detail::Impl::Reference, detail::Impl::Fast, detail::Impl::FastAvx2})
          expect_error([&] { test::quantize_with(w, {s}, impl, pool); }, ErrorKind::InvalidInput,
                       {"test tensor 'm.weight'", "element (5, 3)", kind});
      }
}

TEST_CASE("int8: a value beyond the float16 range is an error naming the element") {
  ThreadPool pool(2);
  for (DType dt : {DType::BF16, DType::F32}) {
    test::TestWeight w(dt, 4, 40);
    w.set(2 * 40 + 39, 70000.0f);
    for (auto impl : {detail::Impl::Reference, detail::Impl::Fast, detail::Impl::FastAvx2})
      expect_error([&] { test::quantize_with(w, {Scheme::Int8}, impl, pool); }, ErrorKind::InvalidInput,
                   {"element (2, 39)", "float16"});
  }
  ThreadPool p1(1);
  test::TestWeight w(DType::BF16, 1, 2);
  w.set(0, 1.0f);
  expect_error(
      [&] {
        quantize_weight("m", "lbl", DType::BF16, w.shape(), std::span(w.bytes).first(3), {Scheme::Int8}, p1);
      },
      ErrorKind::InvalidInput, {"lbl", "3 bytes"});
}

TEST_CASE("module_of_tensor keeps quant state with its weight") {
  CHECK(module_of_tensor("a.b.weight") == "a.b");
  CHECK(module_of_tensor("a.b.bias") == "a.b");
  CHECK(module_of_tensor("a.b.weight.absmax") == "a.b");
  CHECK(module_of_tensor("a.b.weight.quant_map") == "a.b");
  CHECK(module_of_tensor("a.b.weight.nested_absmax") == "a.b");
  CHECK(module_of_tensor("a.b.weight.nested_quant_map") == "a.b");
  CHECK(module_of_tensor("a.b.weight.quant_state.bitsandbytes__nf4") == "a.b");
  CHECK(module_of_tensor("a.b.weight.quant_state.bitsandbytes__fp4") == "a.b");
  CHECK(module_of_tensor("a.b.SCB") == "a.b");
  CHECK(module_of_tensor("a.b.weight_format") == "a.b");
  CHECK(module_of_tensor("a.b.weight_scale") == "a.b");
  CHECK(module_of_tensor("transformer_blocks.0.attn.to_q.weight") == "transformer_blocks.0.attn.to_q");
  CHECK(module_of_tensor("weight") == "");
  CHECK(module_of_tensor("weight.absmax") == "");
  // A quant type qtool lacks stays with its module (its recogniser refuses it by name); a dot after
  // the type makes it another tensor's name.
  CHECK(module_of_tensor("a.b.weight.quant_state.bitsandbytes__int3") == "a.b");
  CHECK(module_of_tensor("weight.quant_state.bitsandbytes__nf4") == "");
  CHECK(module_of_tensor("a.weight.quant_state.bitsandbytes__nf4.x") ==
        "a.weight.quant_state.bitsandbytes__nf4");
  CHECK(module_of_tensor("a.bweight.absmax") == "a.bweight");
}

TEST_CASE("the dotted names module_of_tensor strips are those the scheme table writes") {
  const detail::DottedPartNames& names = detail::dotted_part_names();
  CHECK(names.suffixes == std::vector<std::string>{"weight.absmax", "weight.quant_map",
                                                   "weight.nested_absmax", "weight.nested_quant_map"});
  CHECK(names.stems == std::vector<std::string>{"weight.quant_state.bitsandbytes__"});
  // Every dotted name a built-in scheme writes is one of them.
  for (const Scheme scheme : all_schemes())
    for (const bool dq : {false, true}) {
      SchemeOptions o;
      o.scheme = scheme;
      o.double_quant = dq && scheme_info(scheme).option_keys & kOptionDoubleQuant;
      for (const TensorDecl& d : quantized_decls("m", DType::F16, std::vector<int64_t>{8, 64}, o))
        CHECK(module_of_tensor(d.name) == "m");
    }
}

TEST_CASE("find_quantized_linears recognises every scheme in a safetensors file and dequantizes it") {
  TempDir dir;
  ThreadPool pool(2);
  std::mt19937_64 rng(test::scheme_test_seed("find_quantized_linears"));
  struct Want {
    std::string module;
    SchemeOptions o;
    DType dt;
    int64_t rows, cols;
  };
  const std::vector<Want> wants = {
      {"blocks.0.attn.to_q", {Scheme::Int8}, DType::BF16, 24, 40},
      {"blocks.0.attn.to_k", {Scheme::Fp8E4M3}, DType::BF16, 17, 33},
      {"blocks.0.attn.to_v", {Scheme::Fp8E5M2, 64, false, true}, DType::F16, 9, 8},
      {"blocks.0.ff.up", {Scheme::Nf4, 64, true}, DType::BF16, 130, 130},
      {"blocks.0.ff.down", {Scheme::Fp4, 32}, DType::F32, 7, 5},
      {"blocks.1.proj", {Scheme::Nf4, 128}, DType::F16, 3, 100},
  };
  std::vector<FileTensor> tensors;
  std::map<std::string, test::TestWeight> originals;
  for (const auto& wt : wants) {
    auto w = test::random_weight(wt.dt, wt.rows, wt.cols, rng, true, wt.o.scheme);
    for (auto& t : quantized(wt.module, w, wt.o, pool)) tensors.push_back(std::move(t));
    originals.emplace(wt.module, std::move(w));
  }
  tensors.push_back({{"blocks.0.attn.to_q.bias", DType::BF16, {24}}, std::vector<uint8_t>(48, 0)});
  tensors.push_back({{"blocks.0.norm.weight", DType::F32, {40}}, std::vector<uint8_t>(160, 0)});
  write_file(dir / "model.safetensors", tensors);

  const Component comp = Component::open_file(dir / "model.safetensors", "");
  const auto found = find_quantized_linears(comp);
  REQUIRE(found.size() == wants.size());
  for (const auto& wt : wants) {
    CAPTURE(wt.module);
    const auto it =
        std::find_if(found.begin(), found.end(), [&](const auto& q) { return q.module == wt.module; });
    REQUIRE(it != found.end());
    const QuantizedLinear& q = *it;
    CHECK(q.options.scheme == wt.o.scheme);
    CHECK(q.options.double_quant == wt.o.double_quant);
    CHECK(q.options.per_tensor == wt.o.per_tensor);
    if (is_4bit(wt.o.scheme)) CHECK(q.options.blocksize == wt.o.blocksize);
    CHECK(q.shape == std::vector<int64_t>{wt.rows, wt.cols});
    CHECK(q.orig_dtype == (wt.o.scheme == Scheme::Int8 ? DType::F16 : wt.dt));
    std::vector<std::string> expect_names;
    for (const auto& d : quantized_decls(wt.module, wt.dt, q.shape, wt.o)) expect_names.push_back(d.name);
    CHECK(q.tensor_names == expect_names);
    CHECK(q.tensor_parts == scheme_parts(wt.o));
    // Dequantized from the mapped file: the same as from the quantizer's own buffers.
    const auto& w = originals.at(wt.module);
    const auto outs = test::quantize_with(w, wt.o, detail::Impl::Reference, pool);
    const auto mine = test::linear_for(w, wt.o, test::offset_of(outs));
    CHECK(q.nested_offset == mine.nested_offset);
    std::vector<float> a(w.numel()), b(w.numel());
    dequantize_weight(q, comp, a.data(), pool);
    dequantize_weight(mine, tensor_bytes(mine, test::const_spans(outs)), b.data(), pool);
    CHECK(std::memcmp(a.data(), b.data(), a.size() * 4) == 0);
  }
}

TEST_CASE("inconsistent quant state is an error naming the file and the tensor") {
  TempDir dir;
  ThreadPool pool(1);
  std::mt19937_64 rng(test::scheme_test_seed("inconsistent state"));
  const auto w = test::random_weight(DType::BF16, 8, 64, rng, false);
  const auto base_nf4 = quantized("l", w, {Scheme::Nf4, 64, true}, pool);
  const auto base_i8 = quantized("l", w, {Scheme::Int8}, pool);
  const auto base_f8 = quantized("l", w, {Scheme::Fp8E4M3}, pool);
  int n = 0;
  auto check_case = [&](std::vector<FileTensor> tensors, ErrorKind kind,
                        std::initializer_list<std::string> needles) {
    const auto path = dir / str_cat("case", n++, ".safetensors");
    write_file(path, tensors);
    const Component comp = Component::open_file(path, "");
    std::vector<std::string> all = needles;
    all.push_back(path.filename().string());
    try {
      find_quantized_linears(comp);
      FAIL("no error for ", path.string());
    } catch (const Error& e) {
      CAPTURE(e.what());
      CHECK(e.kind() == kind);
      for (const auto& s : all)
        CHECK_MESSAGE(std::string(e.what()).find(s) != std::string::npos, "missing: ", s);
    }
  };
  auto without = [](std::vector<FileTensor> t, const std::string& name) {
    std::erase_if(t, [&](const FileTensor& x) { return x.decl.name == name; });
    return t;
  };
  auto with_bytes = [](std::vector<FileTensor> t, const std::string& name, std::string bytes) {
    for (auto& x : t)
      if (x.decl.name == name) {
        x.bytes.assign(bytes.begin(), bytes.end());
        x.decl.shape = {static_cast<int64_t>(bytes.size())};
      }
    return t;
  };
  const std::string qs = "l.weight.quant_state.bitsandbytes__nf4";
  check_case(without(base_nf4, "l.weight.absmax"), ErrorKind::InvalidInput, {"l.weight.absmax", "missing"});
  check_case(without(base_nf4, "l.weight.nested_absmax"), ErrorKind::InvalidInput,
             {"l.weight.nested_absmax"});
  check_case(without(base_nf4, qs), ErrorKind::InvalidInput, {"l.weight.absmax", "quant_state"});
  check_case(with_bytes(base_nf4, qs, "{not json"), ErrorKind::InvalidInput, {qs, "JSON"});
  check_case(with_bytes(base_nf4, qs,
                        R"({"quant_type": "fp4", "blocksize": 64, "dtype": "bfloat16", "shape": [8, 64]})"),
             ErrorKind::InvalidInput, {qs, "quant_type"});
  check_case(
      with_bytes(
          base_nf4, qs,
          R"({"quant_type": "nf4", "blocksize": 48, "dtype": "bfloat16", "shape": [8, 64], "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.1})"),
      ErrorKind::InvalidInput, {qs, "blocksize"});
  check_case(
      with_bytes(
          base_nf4, qs,
          R"({"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [8, 65], "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.1})"),
      ErrorKind::InvalidInput, {"l.weight'", "elements"});
  check_case(with_bytes(base_nf4, qs,
                        R"({"quant_type": "nf4", "blocksize": 64, "dtype": "int8", "shape": [8, 64]})"),
             ErrorKind::InvalidInput, {qs, "dtype"});
  // int8: SCB of the wrong dtype; an SCB without its weight.
  auto i8 = base_i8;
  for (auto& t : i8)
    if (t.decl.name == "l.SCB") t.decl.dtype = DType::I32;
  check_case(i8, ErrorKind::InvalidInput, {"l.SCB", "I32"});
  check_case(without(base_i8, "l.weight"), ErrorKind::InvalidInput, {"l.weight", "missing"});
  // fp8: a group-wise scale is not supported.
  auto f8 = base_f8;
  for (auto& t : f8)
    if (t.decl.name == "l.weight_scale") {
      t.decl.shape = {4, 4};
      t.bytes.resize(32);
    }
  check_case(f8, ErrorKind::Unsupported, {"l.weight_scale", "per channel"});
  // Codes without their scales are never plain weights: an I8 weight without SCB, an fp8 weight
  // without weight_scale (both fp8 dtypes).
  check_case(without(base_i8, "l.SCB"), ErrorKind::InvalidInput, {"'l.weight'", "I8 weight without 'l.SCB'"});
  check_case(without(base_f8, "l.weight_scale"), ErrorKind::InvalidInput,
             {"'l.weight'", "F8_E4M3 weight without 'l.weight_scale'"});
  auto e5 = without(base_f8, "l.weight_scale");
  for (auto& t : e5)
    if (t.decl.name == "l.weight") t.decl.dtype = DType::F8_E5M2;
  check_case(e5, ErrorKind::InvalidInput, {"F8_E5M2 weight without 'l.weight_scale'"});
  // weight_format is read whole: I32 256 and I64 2^32 have a first byte of 0 but are not format 0.
  for (const auto& [dt, value] :
       {std::pair{DType::I32, int64_t{256}}, std::pair{DType::I64, int64_t{1} << 32},
        std::pair{DType::U8, int64_t{1}}}) {
    auto wf = base_i8;
    for (auto& t : wf)
      if (t.decl.name == "l.weight_format") {
        t.decl.dtype = dt;
        t.bytes.assign(dtype_size(dt), 0);
        std::memcpy(t.bytes.data(), &value, dtype_size(dt));
      }
    check_case(wf, ErrorKind::Unsupported,
               {"l.weight_format", str_cat("weight format ", value, " is not supported")});
  }
}

TEST_CASE("weight_format 0 is accepted as U8, I32 or I64") {
  TempDir dir;
  ThreadPool pool(1);
  std::mt19937_64 rng(test::scheme_test_seed("weight_format"));
  const auto w = test::random_weight(DType::BF16, 4, 32, rng, false);
  for (const DType dt : {DType::U8, DType::I32, DType::I64}) {
    auto tensors = quantized("l", w, {Scheme::Int8}, pool);
    for (auto& t : tensors)
      if (t.decl.name == "l.weight_format") {
        t.decl.dtype = dt;
        t.bytes.assign(dtype_size(dt), 0);
      }
    const auto path = dir / str_cat("wf_", dtype_name(dt), ".safetensors");
    write_file(path, tensors);
    const Component comp = Component::open_file(path, "");
    const auto found = find_quantized_linears(comp);
    REQUIRE(found.size() == 1);
    CHECK(found[0].tensor_parts.back() == Part::WeightFormat);
  }
}

TEST_CASE("tensor_bytes from raw spans is checked against the layout") {
  ThreadPool pool(1);
  std::mt19937_64 rng(test::scheme_test_seed("check_tensor_bytes"));
  const auto w = test::random_weight(DType::BF16, 4, 64, rng, false);
  const SchemeOptions o{Scheme::Nf4, 64, true};
  auto outs = test::quantize_with(w, o, detail::Impl::Fast, pool);
  const auto q = test::linear_for(w, o, test::offset_of(outs));
  CHECK_NOTHROW(check_tensor_bytes(q, tensor_bytes(q, test::const_spans(outs))));
  outs[1].pop_back();
  expect_error([&] { check_tensor_bytes(q, tensor_bytes(q, test::const_spans(outs))); },
               ErrorKind::InvalidInput, {"module 'm'", "scale"});
}
