// Bit-exactness against fixed vectors produced once by the real bitsandbytes 0.50.2,
// compressed-tensors 0.20 and torch 2.15 on the CPU (gen_reference_vectors.py): every scheme,
// dtype and edge case, through both the scalar reference and the fast path.
#include <fstream>
#include <nlohmann/json.hpp>

#include "qtool/formats/error.hpp"
#include "test_scheme_util.hpp"

using namespace qtool;
using namespace qtool::quant;
using qtool::test::from_hex;

namespace {

const nlohmann::json& vectors() {
  static const nlohmann::json doc = [] {
    std::ifstream in(QTOOL_LIBQUANT_VECTORS);
    REQUIRE_MESSAGE(in.good(), "cannot open ", QTOOL_LIBQUANT_VECTORS);
    return nlohmann::json::parse(in);
  }();
  return doc;
}

uint32_t bits(float f) { return detail::f32_bits(f); }

DType dtype_of(const std::string& s) {
  return s == "BF16" ? DType::BF16 : s == "F16" ? DType::F16 : DType::F32;
}

std::string hex_of(std::span<const uint8_t> b) {
  static const char* d = "0123456789abcdef";
  std::string s;
  for (uint8_t v : b) {
    s += d[v >> 4];
    s += d[v & 15];
  }
  return s;
}

}  // namespace

TEST_CASE("tables equal bitsandbytes' code values, thresholds, order and dynamic map") {
  const auto& t = vectors()["tables"];
  for (Scheme s : {Scheme::Nf4, Scheme::Fp4}) {
    const std::string name(scheme_name(s));
    const auto& table = detail::bnb4_table(s);
    for (size_t i = 0; i < 16; ++i) {
      CHECK(bits(code_table(s)[i]) == t[name + "_code"][i].get<uint32_t>());
      CHECK(int{table.pattern_of[i]} == t[name + "_order"][i].get<int>());
    }
    for (size_t i = 0; i < 15; ++i)
      CHECK(bits(table.thresholds[i]) == t[name + "_thresholds"][i].get<uint32_t>());
  }
  for (size_t i = 0; i < 256; ++i) CHECK(bits(dynamic_map()[i]) == t["dynamic_map"][i].get<uint32_t>());
}

TEST_CASE("torch.mean emulation equals torch's float32 mean") {
  const int lanes = vectors()["torch_mean_lanes"].get<int>();
  for (const auto& c : vectors()["mean_cases"]) {
    const auto n = c["n"].get<uint64_t>();
    const int threads = c["threads"].get<int>();
    std::vector<float> x(n);
    for (uint64_t i = 0; i < n; ++i) x[i] = static_cast<float>((i * 2654435761ull) % 1000003ull) / 1000003.0f;
    CAPTURE(n);
    CAPTURE(threads);
    CHECK(bits(detail::torch_mean_f32(x.data(), n, lanes, threads)) == c["mean_bits"].get<uint32_t>());
  }
}

TEST_CASE("every scheme is bit-exact with the reference packages on fixed vectors") {
  ThreadPool pool(2);
  const auto& cases = vectors()["cases"];
  REQUIRE(cases.size() > 50);
  int n_cases = 0;
  for (const auto& c : cases) {
    const std::string name = c["name"];
    CAPTURE(name);
    SchemeOptions o;
    o.scheme = *parse_scheme(c["scheme"].get<std::string>());
    o.blocksize = c["blocksize"].get<uint32_t>();
    o.double_quant = c["double_quant"].get<bool>();
    o.per_tensor = c["per_tensor"].get<bool>();
    const DType dt = dtype_of(c["dtype"]);
    const auto shape = c["shape"].get<std::vector<int64_t>>();
    test::TestWeight w(dt, shape[0], shape[1]);
    w.bytes = from_hex(c["input"].get<std::string>());
    REQUIRE(w.bytes.size() == w.numel() * dtype_size(dt));
    const auto parts = scheme_parts(o);
    for (auto impl : {detail::Impl::Reference, detail::Impl::Fast}) {
      CAPTURE(static_cast<int>(impl));
      const auto outs = test::quantize_with(w, o, impl, pool);
      for (size_t i = 0; i < parts.size(); ++i) {
        const std::string key = parts[i] == Part::Weight         ? "weight"
                                : parts[i] == Part::Scale        ? "scale"
                                : parts[i] == Part::WeightFormat ? "weight_format"
                                : parts[i] == Part::NestedAbsmax ? "nested_absmax"
                                                                 : "";
        if (key.empty()) continue;
        CAPTURE(key);
        CHECK(hex_of(outs[i]) == c["outputs"][key].get<std::string>());
      }
      if (is_4bit(o.scheme)) {
        // quant_map / nested_quant_map equal the tables checked above.
        CHECK(std::memcmp(outs[2].data(), code_table(o.scheme).data(), 64) == 0);
        const auto& ref_state = c["quant_state"];
        const auto state = quant_state_bytes(outs.back());
        const std::string text(state.begin(), state.end());
        CAPTURE(text);
        const auto ours = nlohmann::json::parse(text);
        // bitsandbytes' key order and separators; the offset as Python's repr of the reference's.
        CHECK(text.starts_with(str_cat("{\"quant_type\": \"", scheme_name(o.scheme), "\", \"blocksize\": ",
                                       o.blocksize, ", \"dtype\": \"", ref_state["dtype"].get<std::string>(),
                                       "\", \"shape\": [", shape[0], ", ", shape[1], "]")));
        CHECK(ours["quant_type"] == ref_state["quant_type"]);
        CHECK(ours["blocksize"] == ref_state["blocksize"]);
        CHECK(ours["dtype"] == ref_state["dtype"]);
        CHECK(ours["shape"] == ref_state["shape"]);
        CHECK(ours.size() == ref_state.size());
        if (o.double_quant) {
          CHECK(ours["nested_blocksize"] == ref_state["nested_blocksize"]);
          CHECK(ours["nested_dtype"] == ref_state["nested_dtype"]);
          CHECK(bits(static_cast<float>(ours["nested_offset"].get<double>())) ==
                bits(static_cast<float>(ref_state["nested_offset"].get<double>())));
          CHECK(text.ends_with(
              str_cat(", \"nested_blocksize\": 256, \"nested_dtype\": \"float32\", \"nested_offset\": ",
                      detail::python_float_repr(ref_state["nested_offset"].get<double>()), "}")));
        } else {
          CHECK(text.ends_with("]}"));
        }
      }
    }
    ++n_cases;
  }
  MESSAGE(n_cases, " reference cases checked");
}

TEST_CASE("dequantization equals bitsandbytes' and compressed-tensors' on fixed vectors") {
  ThreadPool pool(2);
  int n_cases = 0;
  for (const auto& c : vectors()["cases"]) {
    if (!c.contains("dequant")) continue;
    const std::string name = c["name"];
    CAPTURE(name);
    SchemeOptions o;
    o.scheme = *parse_scheme(c["scheme"].get<std::string>());
    o.blocksize = c["blocksize"].get<uint32_t>();
    o.double_quant = c["double_quant"].get<bool>();
    o.per_tensor = c["per_tensor"].get<bool>();
    const DType dt = dtype_of(c["dtype"]);
    const auto shape = c["shape"].get<std::vector<int64_t>>();
    test::TestWeight w(dt, shape[0], shape[1]);
    w.bytes = from_hex(c["input"].get<std::string>());
    const auto outs = test::quantize_with(w, o, detail::Impl::Fast, pool);
    const QuantizedLinear q = test::linear_for(w, o, test::offset_of(outs));
    const auto spans = test::const_spans(outs);
    std::vector<float> deq(w.numel());
    dequantize_weight(q, tensor_bytes(q, spans), deq.data(), pool);
    // int8 dequantizes to float32; the others to the weight's dtype (bitsandbytes'
    // dequantize_4bit, compressed-tensors' q.to(scale.dtype) * scale).
    const DType out_dt = o.scheme == Scheme::Int8 ? DType::F32 : dt;
    std::vector<uint8_t> ours(w.numel() * dtype_size(out_dt));
    convert_from_f32(out_dt, deq.data(), ours.data(), deq.size());
    CHECK(hex_of(ours) == c["dequant"].get<std::string>());
    ++n_cases;
  }
  CHECK(n_cases > 30);
}
