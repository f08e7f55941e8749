#include "synth_tokenizers.hpp"

#include <string>
#include <vector>

namespace qtool::synth_detail {
namespace {

using nlohmann::json;

std::string utf8(uint32_t cp) {
  std::string s;
  if (cp < 0x80) {
    s += static_cast<char>(cp);
  } else if (cp < 0x800) {
    s += static_cast<char>(0xC0 | (cp >> 6));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    s += static_cast<char>(0xE0 | (cp >> 12));
    s += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  }
  return s;
}

// GPT-2's byte-to-unicode table, in its order: printable bytes map to themselves, the rest to
// U+0100 upwards.
std::vector<std::string> byte_level_alphabet() {
  std::vector<uint32_t> bytes, chars;
  for (uint32_t b = '!'; b <= '~'; ++b) bytes.push_back(b);
  for (uint32_t b = 0xA1; b <= 0xAC; ++b) bytes.push_back(b);
  for (uint32_t b = 0xAE; b <= 0xFF; ++b) bytes.push_back(b);
  chars = bytes;
  uint32_t n = 0;
  for (uint32_t b = 0; b < 256; ++b) {
    bool seen = false;
    for (uint32_t x : bytes) seen = seen || x == b;
    if (!seen) {
      bytes.push_back(b);
      chars.push_back(256 + n++);
    }
  }
  std::vector<std::string> out;
  for (uint32_t c : chars) out.push_back(utf8(c));
  return out;
}

json added_token(const std::string& content, bool normalized) {
  return json{{"content", content}, {"lstrip", false},      {"normalized", normalized},
              {"rstrip", false},    {"single_word", false}, {"special", true}};
}

json special_token(const std::string& content, bool normalized) {
  return json{{"content", content},
              {"lstrip", false},
              {"normalized", normalized},
              {"rstrip", false},
              {"single_word", false}};
}

}  // namespace

void add_clip_tokenizer_files(SynthComponent& c, int64_t max_length) {
  const auto alphabet = byte_level_alphabet();
  json vocab = json::object();
  int64_t id = 0;
  for (const auto& a : alphabet) vocab[a] = id++;
  for (const auto& a : alphabet) vocab[a + "</w>"] = id++;
  const int64_t bos = id++, eos = id++;
  vocab["<|startoftext|>"] = bos;
  vocab["<|endoftext|>"] = eos;
  c.json_files["vocab.json"] = vocab;
  c.text_files["merges.txt"] = "#version: 0.2\n";
  c.json_files["tokenizer_config.json"] = json{
      {"add_prefix_space", false},
      {"added_tokens_decoder",
       {{std::to_string(bos), added_token("<|startoftext|>", true)},
        {std::to_string(eos), added_token("<|endoftext|>", false)}}},
      {"bos_token", "<|startoftext|>"},
      {"clean_up_tokenization_spaces", true},
      {"do_lower_case", true},
      {"eos_token", "<|endoftext|>"},
      {"errors", "replace"},
      {"model_max_length", max_length},
      {"pad_token", "<|endoftext|>"},
      {"tokenizer_class", "CLIPTokenizer"},
      {"unk_token", "<|endoftext|>"},
  };
  c.json_files["special_tokens_map.json"] = json{
      {"bos_token", special_token("<|startoftext|>", true)},
      {"eos_token", special_token("<|endoftext|>", false)},
      {"pad_token", "<|endoftext|>"},
      {"unk_token", special_token("<|endoftext|>", false)},
  };
}

void add_t5_tokenizer_files(SynthComponent& c) {
  const std::string kSpace = "\xE2\x96\x81";  // U+2581, SentencePiece's word boundary
  json vocab =
      json::array({json::array({"<pad>", 0.0}), json::array({"</s>", 0.0}), json::array({"<unk>", 0.0})});
  vocab.push_back(json::array({kSpace, -2.0}));
  for (char ch = '!'; ch <= '~'; ++ch) vocab.push_back(json::array({std::string(1, ch), -4.0}));
  json added = json::array();
  const char* specials[] = {"<pad>", "</s>", "<unk>"};
  for (int i = 0; i < 3; ++i) {
    json t = added_token(specials[i], false);
    t["id"] = i;
    added.push_back(t);
  }
  const json metaspace{
      {"type", "Metaspace"}, {"replacement", kSpace}, {"prepend_scheme", "always"}, {"split", true}};
  c.json_files["tokenizer.json"] = json{
      {"version", "1.0"},
      {"truncation", nullptr},
      {"padding", nullptr},
      {"added_tokens", added},
      {"normalizer", {{"type", "Replace"}, {"pattern", {{"Regex", " {2,}"}}}, {"content", " "}}},
      {"pre_tokenizer", metaspace},
      {"post_processor",
       {{"type", "TemplateProcessing"},
        {"single", json::array({{{"Sequence", {{"id", "A"}, {"type_id", 0}}}},
                                {{"SpecialToken", {{"id", "</s>"}, {"type_id", 0}}}}})},
        {"pair", json::array({{{"Sequence", {{"id", "A"}, {"type_id", 0}}}},
                              {{"SpecialToken", {{"id", "</s>"}, {"type_id", 0}}}},
                              {{"Sequence", {{"id", "B"}, {"type_id", 0}}}},
                              {{"SpecialToken", {{"id", "</s>"}, {"type_id", 0}}}}})},
        {"special_tokens", {{"</s>", {{"id", "</s>"}, {"ids", {1}}, {"tokens", {"</s>"}}}}}}}},
      {"decoder", metaspace},
      {"model", {{"type", "Unigram"}, {"unk_id", 2}, {"vocab", vocab}, {"byte_fallback", false}}},
  };
  json decoder = json::object();
  for (int i = 0; i < 3; ++i) decoder[std::to_string(i)] = added_token(specials[i], false);
  c.json_files["tokenizer_config.json"] = json{
      {"add_prefix_space", true},
      {"added_tokens_decoder", decoder},
      {"additional_special_tokens", json::array()},
      {"clean_up_tokenization_spaces", true},
      {"eos_token", "</s>"},
      {"extra_ids", 0},
      {"legacy", true},
      {"model_max_length", 512},
      {"pad_token", "<pad>"},
      {"sp_model_kwargs", json::object()},
      {"tokenizer_class", "T5Tokenizer"},
      {"unk_token", "<unk>"},
  };
  c.json_files["special_tokens_map.json"] = json{
      {"eos_token", special_token("</s>", false)},
      {"pad_token", special_token("<pad>", false)},
      {"unk_token", special_token("<unk>", false)},
  };
}

}  // namespace qtool::synth_detail
