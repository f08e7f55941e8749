// Malformed safetensors files, one test case per rejection. Files are built in memory (raw length
// field, header text, data bytes); every error must have the right kind and name the file, the
// tensor and the byte offset it is about.
#include <doctest/doctest.h>

#include "formats_test_util.hpp"
#include "qtool/formats/safetensors.hpp"

namespace qtool {
namespace {

using test::st_bytes;
using test::st_entry;
using test::st_header;

constexpr const char* kLabel = "model-00002-of-00003.safetensors";

void expect_bad(const std::vector<uint8_t>& bytes, ErrorKind kind,
                std::initializer_list<std::string> needles) {
  test::check_error([&] { parse_safetensors_header(bytes, bytes.size(), kLabel); }, kind, needles);
  test::check_error([&] { parse_safetensors_header(bytes, bytes.size(), kLabel); }, kind, {kLabel});
}
void expect_bad(const std::string& header, uint64_t data_bytes, ErrorKind kind,
                std::initializer_list<std::string> needles) {
  expect_bad(st_bytes(header, data_bytes), kind, needles);
}

// A valid two-tensor file: a F32 [2,2] at [0,16) and b BF16 [3] at [16,22).
std::string good_a() { return st_entry("a.weight", "F32", "[2,2]", 0, 16); }
std::string good_b() { return st_entry("b.weight", "BF16", "[3]", 16, 22); }

TEST_CASE("malformed 00: the valid baseline parses (the cases below differ from it in one thing)") {
  const auto bytes = st_bytes(st_header({good_a(), good_b()}), 22);
  CHECK(parse_safetensors_header(bytes, bytes.size(), kLabel).tensors.size() == 2);
}

// --- sizes, checked before any JSON is read ---

TEST_CASE("malformed 01: empty file") {
  expect_bad(std::vector<uint8_t>{}, ErrorKind::InvalidInput, {"0 bytes", "offset 0"});
}

TEST_CASE("malformed 02: file shorter than the 8-byte length") {
  expect_bad(std::vector<uint8_t>{1, 0, 0}, ErrorKind::InvalidInput, {"3 bytes", "offset 0"});
}

TEST_CASE("malformed 03: header length above 100,000,000") {
  // The JSON that follows is garbage: the length is rejected before it is looked at.
  expect_bad(st_bytes("not json", 0, 100'000'001), ErrorKind::InvalidInput,
             {"100000001", "limit", "offset 0"});
}

TEST_CASE("malformed 04: header length past the end of the file") {
  expect_bad(st_bytes("{}", 0, 1000), ErrorKind::InvalidInput, {"1000", "past the end", "offset 0"});
}

TEST_CASE("malformed 05: header length of 2^64-1 (no overflow in 8 + N)") {
  expect_bad(st_bytes("{}", 0, ~0ull), ErrorKind::InvalidInput, {"limit", "offset 0"});
}

TEST_CASE("malformed 06: header length zero") {
  expect_bad(st_bytes("", 0), ErrorKind::InvalidInput, {"empty", "offset 8"});
}

TEST_CASE("malformed 07: file truncated inside the header") {
  auto bytes = st_bytes(st_header({good_a(), good_b()}), 22);
  const uint64_t n = st_header({good_a(), good_b()}).size();
  bytes.resize(8 + n / 2);
  expect_bad(bytes, ErrorKind::InvalidInput, {"past the end", "offset 0"});
}

TEST_CASE("malformed 08: file truncated inside the last tensor's data (missing bytes)") {
  expect_bad(st_header({good_a(), good_b()}), 20, ErrorKind::InvalidInput,
             {"'b.weight'", "data_offsets end 22 exceeds data size 20", "file offset"});
}

TEST_CASE("malformed 09: trailing bytes after the last tensor") {
  expect_bad(st_header({good_a(), good_b()}), 30, ErrorKind::InvalidInput,
             {"'b.weight'", "8 trailing bytes", "file offset"});
}

TEST_CASE("malformed 10: data bytes but no tensors") {
  expect_bad(st_header({}), 4, ErrorKind::InvalidInput, {"no tensors", "4 data bytes", "file offset"});
}

// --- encoding and JSON syntax ---

TEST_CASE("malformed 11: header not UTF-8 (0xFF in a tensor name)") {
  std::string h = st_header({good_a(), st_entry("b.we\xff", "BF16", "[3]", 16, 22)});
  const size_t at = h.find('\xff');
  expect_bad(h, 22, ErrorKind::InvalidInput, {"UTF-8", "file offset " + std::to_string(8 + at)});
}

TEST_CASE("malformed 12: header not UTF-8 (overlong encoding)") {
  std::string h = st_header({st_entry("a\xc0\xaf", "F32", "[2,2]", 0, 16)});
  expect_bad(h, 16, ErrorKind::InvalidInput, {"UTF-8", "file offset " + std::to_string(8 + h.find('\xc0'))});
}

TEST_CASE("malformed 13: header not UTF-8 (UTF-16 surrogate encoded in UTF-8)") {
  std::string h = st_header({st_entry("a\xed\xa0\x80", "F32", "[2,2]", 0, 16)});
  expect_bad(h, 16, ErrorKind::InvalidInput, {"UTF-8", "file offset " + std::to_string(8 + h.find('\xed'))});
}

TEST_CASE("malformed 14: invalid JSON (trailing comma inside an entry)") {
  const std::string h = "{\"a.weight\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,16],}}";
  expect_bad(h, 16, ErrorKind::InvalidInput, {"not valid JSON", "'a.weight'", "file offset"});
}

TEST_CASE("malformed 15: invalid JSON (header cut short, padded with spaces)") {
  const std::string h = "{\"a.weight\":{\"dtype\":\"F32\",\"shape\":[2,2]        ";
  expect_bad(h, 16, ErrorKind::InvalidInput, {"not valid JSON", "'a.weight'", "file offset"});
}

TEST_CASE("malformed 16: invalid JSON (text after the header object)") {
  const std::string h = st_header({good_a()}) + " {}";
  expect_bad(h, 16, ErrorKind::InvalidInput, {"not valid JSON", "file offset"});
}

TEST_CASE("malformed 17: raw control character inside a tensor name") {
  const std::string h = st_header({st_entry("a\x01", "F32", "[2,2]", 0, 16)});
  expect_bad(h, 16, ErrorKind::InvalidInput, {"not valid JSON", "file offset"});
}

TEST_CASE("malformed 18: header is a JSON array, not an object") {
  expect_bad("[1, 2]  ", 0, ErrorKind::InvalidInput, {"does not start with '{'", "file offset 8"});
}

// --- entries ---

TEST_CASE("malformed 19: unknown dtype") {
  expect_bad(st_header({st_entry("a.weight", "F9", "[2,2]", 0, 16)}), 16, ErrorKind::InvalidInput,
             {"'a.weight'", "unknown dtype 'F9'", "file offset"});
}

TEST_CASE("malformed 20: known but unsupported dtype F8_E8M0") {
  expect_bad(st_header({good_a(), st_entry("scales", "F8_E8M0", "[6]", 16, 22)}), 22, ErrorKind::Unsupported,
             {"'scales'", "F8_E8M0", "file offset"});
}

TEST_CASE("malformed 21: known but unsupported dtypes F4 and C64") {
  expect_bad(st_header({st_entry("packed", "F4", "[8]", 0, 4)}), 4, ErrorKind::Unsupported,
             {"'packed'", "F4"});
  expect_bad(st_header({st_entry("cplx", "C64", "[1]", 0, 8)}), 8, ErrorKind::Unsupported, {"'cplx'", "C64"});
}

TEST_CASE("malformed 22: dtype is not a string") {
  const std::string h = "{\"a.weight\":{\"dtype\":7,\"shape\":[2,2],\"data_offsets\":[0,16]}}";
  expect_bad(h, 16, ErrorKind::InvalidInput, {"'a.weight'", "dtype is a number", "file offset"});
}

TEST_CASE("malformed 23: negative shape entry") {
  expect_bad(st_header({st_entry("a.weight", "F32", "[-2,2]", 0, 16)}), 16, ErrorKind::InvalidInput,
             {"'a.weight'", "negative", "file offset"});
}

TEST_CASE("malformed 24: non-integer shape entry") {
  expect_bad(st_header({st_entry("a.weight", "F32", "[2.5,2]", 0, 16)}), 16, ErrorKind::InvalidInput,
             {"'a.weight'", "2.5", "not an integer", "file offset"});
}

TEST_CASE("malformed 25: shape entry that is a string") {
  expect_bad(st_header({st_entry("a.weight", "F32", "[\"2\",2]", 0, 16)}), 16, ErrorKind::InvalidInput,
             {"'a.weight'", "shape entry is a string", "file offset"});
}

TEST_CASE("malformed 26: shape that is not an array") {
  expect_bad(st_header({st_entry("a.weight", "F32", "4", 0, 16)}), 16, ErrorKind::InvalidInput,
             {"'a.weight'", "shape is a number", "file offset"});
}

TEST_CASE("malformed 27: shape entry beyond int64") {
  expect_bad(st_header({st_entry("a.weight", "U8", "[9223372036854775808]", 0, 16)}), 16,
             ErrorKind::InvalidInput, {"'a.weight'", "too large", "file offset"});
}

TEST_CASE("malformed 28: shape product overflows") {
  expect_bad(st_header({st_entry("a.weight", "U8", "[4294967296,4294967296,2]", 0, 16)}), 16,
             ErrorKind::InvalidInput, {"'a.weight'", "overflow", "file offset"});
}

TEST_CASE("malformed 29: byte size (numel * dtype size) overflows") {
  expect_bad(st_header({st_entry("a.weight", "F64", "[4611686018427387904]", 0, 16)}), 16,
             ErrorKind::InvalidInput, {"'a.weight'", "overflow", "file offset"});
}

TEST_CASE("malformed 30: negative data offset") {
  const std::string h = "{\"a.weight\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[-16,0]}}";
  expect_bad(h, 16, ErrorKind::InvalidInput, {"'a.weight'", "negative", "file offset"});
}

TEST_CASE("malformed 31: data_offsets with three entries") {
  const std::string h = "{\"a.weight\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,16,32]}}";
  expect_bad(h, 16, ErrorKind::InvalidInput, {"'a.weight'", "more than 2", "file offset"});
}

TEST_CASE("malformed 32: data_offsets with one entry") {
  const std::string h = "{\"a.weight\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[16]}}";
  expect_bad(h, 16, ErrorKind::InvalidInput, {"'a.weight'", "1 entries, not 2", "file offset"});
}

TEST_CASE("malformed 33: non-integer data offset") {
  const std::string h = "{\"a.weight\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,16.0]}}";
  expect_bad(h, 16, ErrorKind::InvalidInput, {"'a.weight'", "16.0", "not an integer", "file offset"});
}

TEST_CASE("malformed 34: missing dtype") {
  const std::string h = "{\"a.weight\":{\"shape\":[2,2],\"data_offsets\":[0,16]}}";
  expect_bad(h, 16, ErrorKind::InvalidInput, {"'a.weight'", "missing 'dtype'", "file offset"});
}

TEST_CASE("malformed 35: missing shape") {
  const std::string h = "{\"a.weight\":{\"dtype\":\"F32\",\"data_offsets\":[0,16]}}";
  expect_bad(h, 16, ErrorKind::InvalidInput, {"'a.weight'", "missing 'shape'", "file offset"});
}

TEST_CASE("malformed 36: missing data_offsets") {
  const std::string h = "{\"a.weight\":{\"dtype\":\"F32\",\"shape\":[2,2]}}";
  expect_bad(h, 16, ErrorKind::InvalidInput, {"'a.weight'", "missing 'data_offsets'", "file offset"});
}

TEST_CASE("malformed 37: entry that is not an object") {
  expect_bad("{\"a.weight\":[0,16]}", 16, ErrorKind::InvalidInput,
             {"'a.weight'", "an array, not an object", "file offset"});
}

TEST_CASE("malformed 38: duplicate key inside an entry") {
  const std::string h =
      "{\"a.weight\":{\"dtype\":\"F32\",\"dtype\":\"U8\",\"shape\":[2,2],\"data_offsets\":[0,16]}}";
  expect_bad(h, 16, ErrorKind::InvalidInput, {"'a.weight'", "duplicate key 'dtype'", "file offset"});
}

// --- offsets ---

TEST_CASE("malformed 39: end before begin") {
  expect_bad(st_header({st_entry("a.weight", "U8", "[0]", 16, 0)}), 16, ErrorKind::InvalidInput,
             {"'a.weight'", "end 0 is before begin 16", "file offset"});
}

TEST_CASE("malformed 40: end - begin differs from numel * dtype size") {
  expect_bad(
      st_header({st_entry("a.weight", "F32", "[2,2]", 0, 12), st_entry("b.weight", "BF16", "[3]", 12, 18)}),
      18, ErrorKind::InvalidInput, {"'a.weight'", "hold 12 bytes", "needs 16", "file offset"});
}

TEST_CASE("malformed 41: offsets do not start at 0") {
  expect_bad(
      st_header({st_entry("a.weight", "F32", "[2,2]", 4, 20), st_entry("b.weight", "BF16", "[3]", 20, 26)}),
      26, ErrorKind::InvalidInput, {"'a.weight'", "start at data offset 0", "file offset"});
}

TEST_CASE("malformed 42: gap between tensors") {
  expect_bad(st_header({good_a(), st_entry("b.weight", "BF16", "[3]", 20, 26)}), 26, ErrorKind::InvalidInput,
             {"'b.weight'", "gap of 4 bytes", "'a.weight'", "file offset"});
}

TEST_CASE("malformed 43: overlapping tensors") {
  expect_bad(
      st_header({good_a(), st_entry("b.weight", "BF16", "[3]", 10, 16), st_entry("c", "U8", "[6]", 16, 22)}),
      22, ErrorKind::InvalidInput, {"'b.weight'", "overlap", "'a.weight'", "file offset"});
}

TEST_CASE("malformed 44: two tensors sharing the same bytes") {
  expect_bad(st_header({good_a(), st_entry("a.alias", "F32", "[2,2]", 0, 16)}), 16, ErrorKind::InvalidInput,
             {"overlap", "file offset"});
}

// --- names and metadata ---

TEST_CASE("malformed 45: duplicate tensor names (a JSON DOM would keep the last silently)") {
  expect_bad(st_header({good_a(), good_b(), st_entry("a.weight", "F32", "[2,2]", 22, 38)}), 38,
             ErrorKind::InvalidInput, {"'a.weight'", "duplicate tensor name", "file offset"});
}

TEST_CASE("malformed 46: __metadata__ value that is not a string") {
  const std::string h = "{\"__metadata__\":{\"format\":\"pt\",\"step\":100}," + good_a() + "}";
  expect_bad(h, 16, ErrorKind::InvalidInput,
             {"__metadata__", "'step'", "a number, not a string", "file offset"});
}

TEST_CASE("malformed 47: __metadata__ value that is an object") {
  const std::string h = "{\"__metadata__\":{\"nested\":{\"a\":\"b\"}}," + good_a() + "}";
  expect_bad(h, 16, ErrorKind::InvalidInput, {"__metadata__", "'nested'", "an object", "file offset"});
}

TEST_CASE("malformed 48: __metadata__ that is not a map") {
  const std::string h = "{\"__metadata__\":[\"format\",\"pt\"]," + good_a() + "}";
  expect_bad(h, 16, ErrorKind::InvalidInput, {"__metadata__", "not a map of strings", "file offset"});
}

TEST_CASE("malformed 49: duplicate __metadata__") {
  const std::string h = "{\"__metadata__\":{},\"__metadata__\":{}," + good_a() + "}";
  expect_bad(h, 16, ErrorKind::InvalidInput, {"duplicate key '__metadata__'", "file offset"});
}

TEST_CASE("malformed 50: duplicate key inside __metadata__") {
  const std::string h = "{\"__metadata__\":{\"format\":\"pt\",\"format\":\"np\"}," + good_a() + "}";
  expect_bad(h, 16, ErrorKind::InvalidInput, {"__metadata__", "duplicate key 'format'", "file offset"});
}

TEST_CASE("malformed 51: every error is detected through SafetensorsFile::open too, naming the path") {
  test::TempDir dir;
  const auto path = dir / "model-00001-of-00002.safetensors";
  test::write_file(path, st_bytes(st_header({good_a(), good_b()}), 21));
  test::check_error([&] { SafetensorsFile::open(path); }, ErrorKind::InvalidInput,
                    {path.string(), "'b.weight'", "exceeds data size 21"});
}

}  // namespace
}  // namespace qtool
