// Tokenizer folders of the synthetic pipelines: small but working vocabularies (byte-level for
// CLIP, single characters for T5) in the files and formats the real tokenizers use.
#pragma once

#include <cstdint>

#include "qtool/formats/synth.hpp"

namespace qtool::synth_detail {

// CLIPTokenizer: vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json.
// 514 tokens (256 bytes, the same with "</w>", <|startoftext|>, <|endoftext|> last).
void add_clip_tokenizer_files(SynthComponent& c, int64_t max_length);
inline constexpr int64_t kClipTokenizerVocab = 514;

// T5TokenizerFast: tokenizer.json (a Unigram model), tokenizer_config.json,
// special_tokens_map.json. <pad> 0, </s> 1, <unk> 2, then "▁" and printable ASCII.
void add_t5_tokenizer_files(SynthComponent& c);
inline constexpr int64_t kT5TokenizerVocab = 98;

}  // namespace qtool::synth_detail
