// The safetensors reader: a validating header parser (every check of FORMATS.md, before any tensor
// byte is looked at) and SafetensorsFile on top of a memory map.
//
// The header JSON is parsed with nlohmann's SAX interface straight into TensorInfo records: no
// DOM is built, duplicate keys are seen (a DOM keeps only the last), and a counting iterator gives
// the byte offset of every key for the error messages.
#include <sys/mman.h>

#include <algorithm>
#include <cstring>
#include <iterator>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <unordered_set>

#include "qtool/formats/error.hpp"
#include "qtool/formats/safetensors.hpp"

namespace qtool {
namespace {

uint64_t load_u64_le(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

// Returns the index of the first byte that is not part of valid UTF-8 (RFC 3629: no overlong
// forms, no surrogates, nothing above U+10FFFF), or nullopt when all of `s` is valid.
std::optional<size_t> find_invalid_utf8(const uint8_t* s, size_t n) {
  size_t i = 0;
  while (i < n) {
    const uint8_t c = s[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t len;
    uint8_t lo = 0x80, hi = 0xBF;  // allowed range of the second byte
    if (c >= 0xC2 && c <= 0xDF) {
      len = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
      len = 3;
      if (c == 0xE0) lo = 0xA0;
      if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
      len = 4;
      if (c == 0xF0) lo = 0x90;
      if (c == 0xF4) hi = 0x8F;
    } else {
      return i;
    }
    if (i + len > n) return i;
    if (s[i + 1] < lo || s[i + 1] > hi) return i;
    for (size_t k = 2; k < len; ++k)
      if (s[i + k] < 0x80 || s[i + k] > 0xBF) return i;
    i += len;
  }
  return std::nullopt;
}

// A char iterator that publishes how far the JSON lexer has read, so that SAX events can be
// given a byte offset.
class CountingIterator {
 public:
  using iterator_category = std::forward_iterator_tag;
  using value_type = char;
  using difference_type = std::ptrdiff_t;
  using pointer = const char*;
  using reference = const char&;

  CountingIterator() = default;
  CountingIterator(const char* p, const char* base, size_t* pos) : p_(p), base_(base), pos_(pos) {}
  reference operator*() const { return *p_; }
  CountingIterator& operator++() {
    ++p_;
    *pos_ = static_cast<size_t>(p_ - base_);
    return *this;
  }
  CountingIterator operator++(int) {
    CountingIterator old = *this;
    ++*this;
    return old;
  }
  bool operator==(const CountingIterator& o) const { return p_ == o.p_; }
  bool operator!=(const CountingIterator& o) const { return p_ != o.p_; }

 private:
  const char* p_ = nullptr;
  const char* base_ = nullptr;
  size_t* pos_ = nullptr;
};

// Builds the header from SAX events. Throws Error on the first problem; `pos` is the number of
// header bytes the lexer has consumed (the file offset is 8 + pos).
class HeaderSax {
 public:
  using json = nlohmann::json;

  HeaderSax(std::string_view label, const size_t* pos, SafetensorsHeader* out)
      : label_(label), pos_(pos), out_(out) {}

  // --- nlohmann SAX interface ---
  bool null() { return value(Kind::Null); }
  bool boolean(bool) { return value(Kind::Bool); }
  bool number_integer(json::number_integer_t v) {
    if (v >= 0) return number(static_cast<uint64_t>(v));
    return value(Kind::Negative);
  }
  bool number_unsigned(json::number_unsigned_t v) { return number(v); }
  bool number_float(json::number_float_t, const std::string& text) {
    float_text_ = text;
    return value(Kind::Float);
  }
  bool string(std::string& s) {
    string_ = &s;
    return value(Kind::String);
  }
  bool binary(json::binary_t&) { return value(Kind::Null); }
  bool start_object(size_t) { return value(Kind::Object); }
  bool start_array(size_t) { return value(Kind::Array); }
  bool key(std::string& k);
  bool end_object();
  bool end_array();
  bool parse_error(size_t position, const std::string&, const nlohmann::detail::exception& ex);

  const std::optional<std::string>& unsupported_tensor() const { return unsupported_tensor_; }
  const std::string& unsupported_dtype() const { return unsupported_dtype_; }
  uint64_t unsupported_offset() const { return unsupported_offset_; }

 private:
  enum class State { Start, Top, Metadata, Entry, Shape, Offsets, Skip, Done };
  enum class Field { None, DType, Shape, Offsets, Unknown };
  enum class Kind { Null, Bool, Negative, Unsigned, Float, String, Object, Array };

  static const char* kind_name(Kind k) {
    switch (k) {
      case Kind::Null: return "null";
      case Kind::Bool: return "a boolean";
      case Kind::Negative: return "a negative number";
      case Kind::Unsigned: return "a number";
      case Kind::Float: return "a non-integer number";
      case Kind::String: return "a string";
      case Kind::Object: return "an object";
      case Kind::Array: return "an array";
    }
    return "a value";
  }

  uint64_t file_offset() const { return 8 + *pos_; }

  template <typename... Args>
  [[noreturn]] void fail_tensor(Args&&... args) const {
    fail(ErrorKind::InvalidInput, label_, ": tensor '", entry_.name, "': ", std::forward<Args>(args)...,
         " (header, file offset ", file_offset(), ")");
  }
  template <typename... Args>
  [[noreturn]] void fail_header(Args&&... args) const {
    fail(ErrorKind::InvalidInput, label_, ": ", std::forward<Args>(args)..., " (header, file offset ",
         file_offset(), ")");
  }

  bool number(uint64_t v) {
    number_ = v;
    return value(Kind::Unsigned);
  }
  bool value(Kind kind);
  void finish_entry();
  // The end of an array or object inside a skipped value: back to where the skip began after
  // the outermost one.
  bool end_skipped() {
    if (--skip_depth_ == 0) state_ = skip_return_;
    return true;
  }

  std::string_view label_;
  const size_t* pos_;
  SafetensorsHeader* out_;

  State state_ = State::Start;
  State skip_return_ = State::Top;
  size_t skip_depth_ = 0;
  Field field_ = Field::None;
  uint64_t number_ = 0;
  std::string float_text_;
  std::string* string_ = nullptr;

  std::unordered_set<std::string> names_;      // top-level keys seen
  std::unordered_set<std::string> meta_keys_;  // __metadata__ keys seen
  std::string meta_key_;
  bool seen_metadata_ = false;

  TensorInfo entry_;
  bool has_dtype_ = false, has_shape_ = false, has_offsets_ = false;
  std::vector<uint64_t> offsets_;
  std::optional<DType> dtype_;
  std::string dtype_text_;

  std::optional<std::string> unsupported_tensor_;
  std::string unsupported_dtype_;
  uint64_t unsupported_offset_ = 0;
};

bool HeaderSax::key(std::string& k) {
  switch (state_) {
    case State::Top:
      if (has_control_char(k))
        fail_header("tensor name '", escape_controls(k),
                    "' holds a control character (shown as \\xNN); tensor names must be printable");
      if (!names_.insert(k).second) {
        if (k == "__metadata__") fail_header("duplicate key '__metadata__'");
        entry_.name = k;
        fail_tensor("duplicate tensor name");
      }
      entry_ = TensorInfo{};
      entry_.name = k;
      field_ = Field::None;
      return true;
    case State::Metadata:
      if (!meta_keys_.insert(k).second) fail_header("__metadata__: duplicate key '", k, "'");
      meta_key_ = k;
      return true;
    case State::Entry:
      if (k == "dtype")
        field_ = Field::DType;
      else if (k == "shape")
        field_ = Field::Shape;
      else if (k == "data_offsets")
        field_ = Field::Offsets;
      else
        field_ = Field::Unknown;  // like the reference reader, other keys are ignored
      if ((field_ == Field::DType && has_dtype_) || (field_ == Field::Shape && has_shape_) ||
          (field_ == Field::Offsets && has_offsets_))
        fail_tensor("duplicate key '", k, "'");
      return true;
    case State::Skip: return true;
    default: fail_header("unexpected key '", k, "'");
  }
}

bool HeaderSax::value(Kind kind) {
  switch (state_) {
    case State::Start:
      if (kind != Kind::Object) fail_header("the header is ", kind_name(kind), ", not a JSON object");
      state_ = State::Top;
      return true;
    case State::Top:
      // The value of a top-level key: "__metadata__" or a tensor entry.
      if (entry_.name == "__metadata__" && !seen_metadata_) {
        seen_metadata_ = true;
        if (kind != Kind::Object) fail_header("__metadata__ is ", kind_name(kind), ", not a map of strings");
        state_ = State::Metadata;
        return true;
      }
      if (kind != Kind::Object) fail_tensor("entry is ", kind_name(kind), ", not an object");
      state_ = State::Entry;
      has_dtype_ = has_shape_ = has_offsets_ = false;
      offsets_.clear();
      dtype_.reset();
      return true;
    case State::Metadata:
      if (kind != Kind::String)
        fail_header("__metadata__ value of '", meta_key_, "' is ", kind_name(kind), ", not a string");
      out_->metadata.emplace(meta_key_, std::move(*string_));
      return true;
    case State::Entry:
      switch (field_) {
        case Field::DType: {
          if (kind != Kind::String) fail_tensor("dtype is ", kind_name(kind), ", not a string");
          has_dtype_ = true;
          bool known_unsupported = false;
          dtype_ = parse_dtype(*string_, &known_unsupported);
          dtype_text_ = *string_;
          if (!dtype_ && !known_unsupported) fail_tensor("unknown dtype '", *string_, "'");
          if (!dtype_ && !unsupported_tensor_) {
            unsupported_tensor_ = entry_.name;
            unsupported_dtype_ = *string_;
            unsupported_offset_ = file_offset();
          }
          return true;
        }
        case Field::Shape:
          if (kind != Kind::Array) fail_tensor("shape is ", kind_name(kind), ", not an array");
          has_shape_ = true;
          state_ = State::Shape;
          return true;
        case Field::Offsets:
          if (kind != Kind::Array) fail_tensor("data_offsets is ", kind_name(kind), ", not an array");
          has_offsets_ = true;
          state_ = State::Offsets;
          return true;
        case Field::Unknown:
          if (kind == Kind::Object || kind == Kind::Array) {
            skip_return_ = State::Entry;
            skip_depth_ = 1;
            state_ = State::Skip;
          }
          return true;
        case Field::None: break;
      }
      fail_tensor("unexpected value");
    case State::Shape:
      if (kind == Kind::Float) fail_tensor("shape entry ", float_text_, " is not an integer");
      if (kind != Kind::Unsigned)
        fail_tensor("shape entry is ", kind_name(kind), ", not a non-negative integer");
      if (number_ > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
        fail_tensor("shape entry ", number_, " is too large");
      entry_.shape.push_back(static_cast<int64_t>(number_));
      return true;
    case State::Offsets:
      if (kind == Kind::Float) fail_tensor("data_offsets entry ", float_text_, " is not an integer");
      if (kind != Kind::Unsigned)
        fail_tensor("data_offsets entry is ", kind_name(kind), ", not a non-negative integer");
      offsets_.push_back(number_);
      if (offsets_.size() > 2) fail_tensor("data_offsets has more than 2 entries");
      return true;
    case State::Skip:
      if (kind == Kind::Object || kind == Kind::Array) ++skip_depth_;
      return true;
    case State::Done: break;
  }
  fail_header("unexpected value after the end of the header object");
}

bool HeaderSax::end_array() {
  switch (state_) {
    case State::Shape: state_ = State::Entry; return true;
    case State::Offsets:
      if (offsets_.size() != 2) fail_tensor("data_offsets has ", offsets_.size(), " entries, not 2");
      entry_.begin = offsets_[0];
      entry_.end = offsets_[1];
      state_ = State::Entry;
      return true;
    case State::Skip: return end_skipped();
    default: fail_header("unexpected end of array");
  }
}

bool HeaderSax::end_object() {
  switch (state_) {
    case State::Top: state_ = State::Done; return true;
    case State::Entry: finish_entry(); [[fallthrough]];
    case State::Metadata:
      state_ = State::Top;
      entry_ = TensorInfo{};
      return true;
    case State::Skip: return end_skipped();
    default: fail_header("unexpected end of object");
  }
}

void HeaderSax::finish_entry() {
  if (!has_dtype_) fail_tensor("missing 'dtype'");
  if (!has_shape_) fail_tensor("missing 'shape'");
  if (!has_offsets_) fail_tensor("missing 'data_offsets'");
  if (!dtype_) return;  // known but unsupported: reported after the whole header parsed
  entry_.dtype = *dtype_;
  // The byte size must be representable: numel * dtype size without overflow.
  uint64_t n = 1;
  for (int64_t d : entry_.shape) {
    if (__builtin_mul_overflow(n, static_cast<uint64_t>(d), &n))
      fail_tensor("shape product overflows 64 bits");
  }
  uint64_t bytes = 0;
  if (__builtin_mul_overflow(n, static_cast<uint64_t>(dtype_size(entry_.dtype)), &bytes))
    fail_tensor("byte size of shape overflows 64 bits");
  out_->tensors.push_back(std::move(entry_));
}

bool HeaderSax::parse_error(size_t position, const std::string&, const nlohmann::detail::exception& ex) {
  std::string what = ex.what();
  // Drop nlohmann's "[json.exception.parse_error.101] " prefix; keep its description.
  if (const size_t p = what.find("] "); what.rfind("[json.exception", 0) == 0 && p != std::string::npos)
    what = what.substr(p + 2);
  const uint64_t at = 8 + (position > 0 ? position - 1 : 0);
  if (state_ == State::Entry || state_ == State::Shape || state_ == State::Offsets || state_ == State::Skip)
    fail(ErrorKind::InvalidInput, label_, ": tensor '", entry_.name,
         "': header is not valid JSON at file offset ", at, ": ", what);
  fail(ErrorKind::InvalidInput, label_, ": header is not valid JSON at file offset ", at, ": ", what);
}

}  // namespace

uint64_t TensorInfo::numel() const {
  uint64_t n = 1;
  for (int64_t d : shape) n *= static_cast<uint64_t>(d);
  return n;
}

uint64_t SafetensorsHeader::data_size() const {
  uint64_t n = 0;
  for (const auto& t : tensors) n += t.nbytes();
  return n;
}

SafetensorsHeader parse_safetensors_header(std::span<const uint8_t> head, uint64_t file_size,
                                           std::string_view label) {
  // Sizes first: nothing of the JSON is read until the header is known to lie inside the file.
  if (file_size < 8 || head.size() < 8)
    fail(ErrorKind::InvalidInput, label, ": file is ", file_size,
         " bytes, too short for the 8-byte header length (file offset 0)");
  const uint64_t n = load_u64_le(head.data());
  if (n > kMaxHeaderSize)
    fail(ErrorKind::InvalidInput, label, ": header length ", n, " exceeds the limit of ", kMaxHeaderSize,
         " bytes (file offset 0)");
  if (8 + n > file_size)
    fail(ErrorKind::InvalidInput, label, ": header length ", n, " runs past the end of the file (", file_size,
         " bytes; file offset 0)");
  if (head.size() < 8 + n)
    fail(ErrorKind::Internal, label, ": only ", head.size(), " of the ", 8 + n, " header bytes were given");

  const uint8_t* json_begin = head.data() + 8;
  if (n == 0) fail(ErrorKind::InvalidInput, label, ": header is empty (file offset 8)");
  if (const auto bad = find_invalid_utf8(json_begin, n))
    fail(ErrorKind::InvalidInput, label, ": header is not valid UTF-8 at file offset ", 8 + *bad);
  if (json_begin[0] != '{')
    fail(ErrorKind::InvalidInput, label, ": header does not start with '{' (file offset 8)");

  // nlohmann's lexer takes a NUL byte for the end of its input, so `{...}\0 anything` would parse.
  // JSON text holds no raw NUL (strings must escape it): the object must end before the first NUL,
  // and then the NUL is a byte after the object where only whitespace padding may be.
  const auto* nul = static_cast<const uint8_t*>(std::memchr(json_begin, 0, n));
  const size_t json_size = nul ? static_cast<size_t>(nul - json_begin) : n;

  SafetensorsHeader header;
  header.header_size = n;
  size_t pos = 0;
  HeaderSax sax(label, &pos, &header);
  const char* text = reinterpret_cast<const char*>(json_begin);
  CountingIterator first(text, text, &pos), last(text + json_size, text, &pos);
  nlohmann::json::sax_parse(first, last, &sax);
  if (nul)
    fail(ErrorKind::InvalidInput, label, ": header has a NUL byte after its JSON object (file offset ",
         8 + json_size, "); only whitespace (space padding) may follow the object");

  if (sax.unsupported_tensor())
    fail(ErrorKind::Unsupported, label, ": tensor '", *sax.unsupported_tensor(), "': dtype ",
         sax.unsupported_dtype(), " is not supported by qtool (header, file offset ",
         sax.unsupported_offset(), ")");

  // Offsets: sorted by position, they must tile [0, data size) exactly.
  auto& ts = header.tensors;
  std::stable_sort(ts.begin(), ts.end(), [](const TensorInfo& a, const TensorInfo& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  const uint64_t data_size = file_size - 8 - n;
  const uint64_t data_offset = 8 + n;
  uint64_t expected = 0;
  const TensorInfo* prev = nullptr;
  for (const TensorInfo& t : ts) {
    auto bad = [&](auto&&... args) {
      fail(ErrorKind::InvalidInput, label, ": tensor '", t.name, "': ", args...);
    };
    if (t.end < t.begin)
      bad("data_offsets end ", t.end, " is before begin ", t.begin, " (file offset ", data_offset + t.begin,
          ")");
    const uint64_t want = t.numel() * dtype_size(t.dtype);
    if (t.end - t.begin != want) {
      std::string shape = "[";
      for (size_t i = 0; i < t.shape.size(); ++i) shape += (i ? ", " : "") + std::to_string(t.shape[i]);
      shape += "]";
      bad("data_offsets [", t.begin, ", ", t.end, ") hold ", t.end - t.begin, " bytes but ",
          dtype_name(t.dtype), " ", shape, " needs ", want, " (file offset ", data_offset + t.begin, ")");
    }
    if (t.begin > expected) {
      if (!prev)
        bad("data_offsets begin ", t.begin, ": the first tensor must start at data offset 0 (file offset ",
            data_offset, ")");
      bad("gap of ", t.begin - expected, " bytes before this tensor: it begins at data offset ", t.begin,
          " but tensor '", prev->name, "' ends at ", expected, " (file offset ", data_offset + expected, ")");
    }
    if (t.begin < expected)
      bad("data_offsets [", t.begin, ", ", t.end, ") overlap tensor '", prev->name, "' which ends at ",
          expected, " (file offset ", data_offset + t.begin, ")");
    if (t.end > data_size)
      bad("data_offsets end ", t.end, " exceeds data size ", data_size, " (file offset ", data_offset + t.end,
          " > file size ", file_size, ")");
    expected = t.end;
    prev = &t;
  }
  if (expected < data_size) {
    if (!prev)
      fail(ErrorKind::InvalidInput, label, ": no tensors, but ", data_size,
           " data bytes follow the header (file offset ", data_offset, ")");
    fail(ErrorKind::InvalidInput, label, ": tensor '", prev->name, "': ", data_size - expected,
         " trailing bytes after the last tensor, which ends at data offset ", expected, " (file offset ",
         data_offset + expected, " < file size ", file_size, ")");
  }
  return header;
}

SafetensorsFile SafetensorsFile::open(const std::filesystem::path& path) {
  SafetensorsFile f;
  f.file_ = MappedFile(path);
  const std::span<const uint8_t> head(f.file_.data(), f.file_.size());
  // Only the header's pages are read: no readahead into tensor data while parsing it.
  void* map = const_cast<uint8_t*>(f.file_.data());
  if (map) ::madvise(map, f.file_.size(), MADV_RANDOM);
  f.header_ = parse_safetensors_header(head, f.file_.size(), path.string());
  if (map) ::madvise(map, f.file_.size(), MADV_NORMAL);
  f.by_name_.reserve(f.header_.tensors.size());
  for (size_t i = 0; i < f.header_.tensors.size(); ++i) f.by_name_.emplace(f.header_.tensors[i].name, i);
  return f;
}

const TensorInfo* SafetensorsFile::find(std::string_view name) const {
  const auto it = by_name_.find(name);
  return it == by_name_.end() ? nullptr : &header_.tensors[it->second];
}

const TensorInfo& SafetensorsFile::at(std::string_view name) const {
  if (const TensorInfo* t = find(name)) return *t;
  fail(ErrorKind::InvalidInput, path().string(), ": tensor '", name, "' not found");
}

std::span<const uint8_t> SafetensorsFile::data(const TensorInfo& t) const {
  QTOOL_ASSERT(t.end <= file_.size() - header_.data_offset());
  return {file_.data() + header_.data_offset() + t.begin, t.nbytes()};
}

}  // namespace qtool
