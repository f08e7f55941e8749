// The scheme table: the one place the rest of qtool looks schemes up in. Built-in rows here;
// register_scheme adds rows at run time (a test's scheme, a plugin).
#include <algorithm>
#include <deque>

#include "scheme.hpp"

namespace qtool::quant::detail {

bool have_simd() { return cpu_features().avx2; }

namespace {

constexpr std::string_view kFp8Aliases[] = {"fp8"};

constexpr std::string_view kE5M2FolderRefusal =
    "compressed-tensors' quantization_config cannot express e5m2 weights (its 8-bit float is always "
    "float8_e4m3fn), so transformers and vLLM would read the codes as e4m3 without a warning; use fp8_e4m3 "
    "(\"fp8\") for a model folder, or quantize a single .safetensors file, which has no quantization_config "
    "and keeps the F8_E5M2 dtype in its header";

SchemeInfo info(Scheme scheme, std::string_view name, std::string_view family, uint8_t option_keys,
                bool rowwise, std::string_view orig_dtype_source, double dequant_gelems_per_s) {
  SchemeInfo i;
  i.scheme = scheme;
  i.name = name;
  i.family = family;
  i.option_keys = option_keys;
  i.rowwise = rowwise;
  i.orig_dtype_source = orig_dtype_source;
  i.dequant_gelems_per_s = dequant_gelems_per_s;
  return i;
}

// The built-in rows, in the order of the Scheme values. Entry fields: info, aliases, parts, decls,
// quantize, dequantize_rows, recognise, check_unclaimed, read_written_state, loader_config,
// accumulate_error.
std::deque<SchemeEntry> make_builtin() {
  std::deque<SchemeEntry> t;
  SchemeInfo int8 = info(Scheme::Int8, "int8", "int8", 0, true, {}, 600.0);
  int8.f16_range = true;
  int8.records_orig_dtype = false;  // LLM.int8 quantizes the weight cast to float16
  t.push_back({int8,
               {},
               int8_parts,
               int8_decls,
               int8_quantize,
               int8_dequantize_linear,
               int8_recognise,
               int8_check_unclaimed,
               nullptr,
               bnb_loader_config,
               int8_accumulate_error});

  const SchemeInfo e4m3 =
      info(Scheme::Fp8E4M3, "fp8_e4m3", "fp8", kOptionPerTensor, true, "weight_scale's dtype", 600.0);
  SchemeInfo e5m2 =
      info(Scheme::Fp8E5M2, "fp8_e5m2", "fp8", kOptionPerTensor, true, "weight_scale's dtype", 600.0);
  e5m2.folder_refusal = kE5M2FolderRefusal;
  e5m2.file_warning = "fp8_e5m2 is read by qtool; compressed-tensors loaders expect fp8_e4m3 weights";
  for (const auto& [i, aliases] : {std::pair{e4m3, std::span<const std::string_view>(kFp8Aliases)},
                                   std::pair{e5m2, std::span<const std::string_view>()}})
    t.push_back({i, aliases, fp8_parts, fp8_decls, fp8_quantize, fp8_dequantize_linear, fp8_recognise,
                 fp8_check_unclaimed, nullptr, fp8_loader_config, fp8_accumulate_error});

  const uint8_t bnb4_keys = kOptionBlocksize | kOptionDoubleQuant;
  for (const auto& i :
       {info(Scheme::Nf4, "nf4", "nf4 and fp4", bnb4_keys, false, "quant_state 'dtype'", 500.0),
        info(Scheme::Fp4, "fp4", "nf4 and fp4", bnb4_keys, false, "quant_state 'dtype'", 500.0)})
    t.push_back({i,
                 {},
                 bnb4_parts,
                 bnb4_decls,
                 bnb4_quantize,
                 bnb4_dequantize_linear,
                 bnb4_recognise,
                 bnb4_check_unclaimed,
                 bnb4_read_written_state,
                 bnb_loader_config,
                 bnb4_accumulate_error});
  return t;
}

// Rows by Scheme value (a deque: registering never moves an entry others hold).
std::deque<SchemeEntry>& table() {
  static std::deque<SchemeEntry> t = make_builtin();
  return t;
}

// Adds the dotted names of `entry`'s parts to `names` (each once).
void add_dotted_part_names(const SchemeEntry& entry, DottedPartNames& names) {
  const bool double_quant = entry.info.option_keys & kOptionDoubleQuant;
  const bool per_tensor = entry.info.option_keys & kOptionPerTensor;
  auto add = [](std::vector<std::string>& to, std::string name) {
    if (std::find(to.begin(), to.end(), name) == to.end()) to.push_back(std::move(name));
  };
  for (const bool dq : {false, true}) {
    for (const bool pt : {false, true}) {
      if ((dq && !double_quant) || (pt && !per_tensor)) continue;
      SchemeOptions options;
      options.scheme = entry.info.scheme;
      options.double_quant = dq;
      options.per_tensor = pt;
      for (const TensorDecl& d : entry.decls("", DType::BF16, 64, 64, options)) {
        if (d.name.find('.') == std::string::npos) continue;
        if (d.name.size() > entry.info.name.size() && d.name.ends_with(entry.info.name))
          add(names.stems, d.name.substr(0, d.name.size() - entry.info.name.size()));
        else
          add(names.suffixes, d.name);
      }
    }
  }
}

// Built at the first use, from the rows the table has then; register_scheme adds later rows'.
bool g_dotted_part_names_built = false;
DottedPartNames& dotted_part_names_of_table() {
  static DottedPartNames names = [] {
    DottedPartNames n;
    for (const SchemeEntry& e : table()) add_dotted_part_names(e, n);
    g_dotted_part_names_built = true;
    return n;
  }();
  return names;
}

}  // namespace

const DottedPartNames& dotted_part_names() { return dotted_part_names_of_table(); }

const SchemeEntry& scheme_entry(Scheme scheme) {
  const auto& t = table();
  const auto i = static_cast<size_t>(scheme);
  QTOOL_ASSERT_MSG(i < t.size(), "unknown scheme ", i);
  return t[i];
}

Scheme register_scheme(const SchemeEntry& entry) {
  auto& t = table();
  QTOOL_ASSERT(entry.parts && entry.decls && entry.quantize && entry.dequantize_rows && entry.recognise &&
               entry.loader_config);
  if (t.size() > UINT8_MAX)
    fail(ErrorKind::InvalidInput, "scheme '", entry.info.name, "': the table is full");
  std::vector<std::string_view> spellings{entry.info.name};
  spellings.insert(spellings.end(), entry.aliases.begin(), entry.aliases.end());
  for (const std::string_view s : spellings)
    if (parse_scheme(s)) fail(ErrorKind::InvalidInput, "scheme '", entry.info.name, "': '", s, "' is taken");
  t.push_back(entry);
  t.back().info.scheme = static_cast<Scheme>(t.size() - 1);
  if (g_dotted_part_names_built) add_dotted_part_names(t.back(), dotted_part_names_of_table());
  return t.back().info.scheme;
}

}  // namespace qtool::quant::detail

namespace qtool::quant {

const SchemeInfo& scheme_info(Scheme scheme) { return detail::scheme_entry(scheme).info; }

std::vector<Scheme> all_schemes() {
  std::vector<Scheme> all;
  for (const auto& e : detail::table()) all.push_back(e.info.scheme);
  return all;
}

}  // namespace qtool::quant
