// The one JSON reader (formats/json.hpp) and the guards on user files: nesting depth, duplicate
// keys, numbers outside the double range, special files, text that is not UTF-8, and a mapped file
// truncated while it is read.
#include <doctest/doctest.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <csignal>
#include <string>

#include "formats_test_util.hpp"
#include "qtool/formats/checkpoint.hpp"
#include "qtool/formats/json.hpp"
#include "qtool/formats/mapped_file.hpp"
#include "qtool/formats/safetensors.hpp"

namespace qtool {
namespace {

namespace fs = std::filesystem;

std::string nested(size_t depth, char open = '[', char close = ']') {
  return std::string(depth, open) + std::string(depth, close);
}

// Kills the test (instead of hanging ctest) when a call blocks.
struct Watchdog {
  explicit Watchdog(unsigned seconds) { ::alarm(seconds); }
  ~Watchdog() { ::alarm(0); }
};

TEST_CASE("read_json_file: nesting is bounded, deep input is an error naming the file and the byte") {
  test::TempDir dir;
  // Exactly kMaxJsonDepth levels parse; one more does not.
  test::write_file(dir / "ok.json", nested(kMaxJsonDepth));
  CHECK(read_json_file(dir / "ok.json").is_array());
  for (size_t depth : {kMaxJsonDepth + 1, size_t{100000}, size_t{1000000}}) {
    INFO("depth ", depth);
    test::write_file(dir / "deep.json", nested(depth));
    // Offset of the first '[' past the limit: byte kMaxJsonDepth.
    test::check_error([&] { read_json_file(dir / "deep.json"); }, ErrorKind::InvalidInput,
                      {"deep.json", "byte 128", "nested deeper than 128"});
  }
  // Objects, and brackets inside strings that do not count.
  std::string objects;
  for (int i = 0; i < 200; ++i) objects += "{\"[[[\":";
  objects += "1" + std::string(200, '}');
  test::write_file(dir / "obj.json", objects);
  test::check_error([&] { read_json_file(dir / "obj.json"); }, ErrorKind::InvalidInput,
                    {"obj.json", "nested deeper"});
  const std::string text = nested(10000);
  test::check_error([&] { parse_json(text, "--max-memory", ErrorKind::Usage); }, ErrorKind::Usage,
                    {"--max-memory", "byte 128"});
  test::check_error([&] { parse_ordered_json(text, "model_index.json"); }, ErrorKind::InvalidInput,
                    {"model_index.json", "byte 128"});
}

TEST_CASE("read_json_file: a key given twice in one object is refused, naming it") {
  test::TempDir dir;
  test::write_file(dir / "d.json", R"({"quant_backend": "int8", "quant_backend": "nf4"})");
  test::check_error([&] { read_json_file(dir / "d.json"); }, ErrorKind::InvalidInput,
                    {"d.json", "duplicate key 'quant_backend'", "top-level object"});
  test::write_file(dir / "n.json", R"({"a": [1, {"b": {"x": 1, "y": 2, "x": 3}}]})");
  test::check_error([&] { read_json_file(dir / "n.json"); }, ErrorKind::InvalidInput,
                    {"n.json", "duplicate key 'x'", "a[1].b"});
  // An escaped spelling of the same key is the same key.
  test::check_error([&] { parse_json(R"({"ab": 1, "a\u0062": 2})", "cfg"); }, ErrorKind::InvalidInput,
                    {"duplicate key 'ab'"});
  test::check_error([&] { parse_ordered_json(R"({"c": 1, "b": 2, "c": 3})", "mi"); }, ErrorKind::InvalidInput,
                    {"duplicate key 'c'"});
  // The same key in different objects is fine, and order is kept by the ordered parse.
  const auto o = parse_ordered_json(R"({"z": {"k": 1}, "a": {"k": 2}})", "mi");
  CHECK(o.begin().key() == "z");
  CHECK(o["a"]["k"] == 2);
}

TEST_CASE("parse_json: every nlohmann error is bad input naming the source and the byte") {
  // 1e400 (out_of_range 406 in nlohmann, which only parse_error handlers missed), -1e400, bad
  // UTF-8, truncated text, trailing garbage.
  struct Case {
    std::string text;
    std::string byte;
  };
  const Case cases[] = {{R"({"a": 1e400})", "byte 6"}, {R"([1, -1e400])", "byte 4"}, {"[\"\xff\"]", "byte 2"},
                        {R"({"a": [1, 2)", "byte 11"}, {"{} x", "byte 3"},           {"", "byte 0"}};
  for (const Case& c : cases) {
    INFO("text: ", c.text);
    test::check_error([&] { parse_json(c.text, "plan.json"); }, ErrorKind::InvalidInput,
                      {"plan.json", "invalid JSON", c.byte});
  }
  // Underflow is not an error: it reads as 0, as Python's json does.
  CHECK(parse_json("[1e-400]", "x")[0].get<double>() == 0.0);
  CHECK(parse_json("18446744073709551615", "x").get<uint64_t>() == UINT64_MAX);
  CHECK(parse_json("18446744073709551616", "x").is_number_float());
}

TEST_CASE("read_json_file and MappedFile refuse special files without blocking") {
  test::TempDir dir;
  const fs::path fifo = dir / "config.json";
  REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
  Watchdog watchdog(20);  // the old code blocked in open() forever
  test::check_error([&] { read_json_file(fifo); }, ErrorKind::InvalidInput,
                    {"config.json", "not a regular file", "FIFO"});
  test::check_error([&] { MappedFile m(fifo); }, ErrorKind::InvalidInput, {"config.json", "FIFO"});
  test::check_error([&] { read_text_file(dir.path()); }, ErrorKind::InvalidInput, {"folder"});
  test::check_error([&] { MappedFile m("/dev/zero"); }, ErrorKind::InvalidInput,
                    {"/dev/zero", "character device"});

  // A model folder whose config.json is a FIFO: refused when opened, naming it.
  const std::string header = test::st_header({test::st_entry("w", "F32", "[2]", 0, 8)});
  test::write_file(dir / "model.safetensors", test::st_bytes(header, 8));
  test::check_error([&] { Checkpoint::open(dir.path()); }, ErrorKind::InvalidInput, {"config.json", "FIFO"});
  // A pipeline whose model_index.json is a FIFO.
  test::TempDir pipe;
  REQUIRE(::mkfifo((pipe / "model_index.json").c_str(), 0600) == 0);
  test::check_error([&] { Checkpoint::open(pipe.path()); }, ErrorKind::InvalidInput,
                    {"model_index.json", "FIFO"});
}

TEST_CASE("dump_json: strings that are not UTF-8 never throw") {
  const std::string bad_path = "/tmp/caf\xe9/model\xff.safetensors";  // Latin-1 bytes in a file name
  nlohmann::json j = {{"path", bad_path}, {"n", 1}};
  std::string text;
  CHECK_NOTHROW(text = dump_json(j, 2));
  // The bad bytes become U+FFFD; the result is valid JSON that parses back.
  const auto back = parse_json(text, "dump");
  CHECK(back["path"] == "/tmp/caf\xef\xbf\xbd/model\xef\xbf\xbd.safetensors");
  CHECK(back["n"] == 1);
  test::TempDir dir;
  CHECK_NOTHROW(write_json_file(dir / "r.json", j));
  CHECK(read_json_file(dir / "r.json")["path"] == back["path"]);
}

TEST_CASE("MappedFile: a file truncated after it was mapped is an error, not SIGBUS") {
  test::TempDir dir;
  const uint64_t seed = test::test_seed("truncated mapping");
  const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  // A safetensors file of one F32 tensor spanning several pages (a seeded size).
  const size_t n = (5 * page) / 4 + 3 + seed % 17;
  const std::string header = test::st_header({test::st_entry("w", "F32", str_cat("[", n, "]"), 0, n * 4)});
  const std::vector<uint8_t> bytes = test::st_bytes(header, n * 4);
  const fs::path path = dir / "shard.safetensors";
  test::write_file(path, bytes);
  const SafetensorsFile f = SafetensorsFile::open(path);
  const auto data = f.data(f.at("w"));
  REQUIRE(data.size() == n * 4);
  CHECK_NOTHROW(f.check_intact());
  // A download restarting: the file is cut back to part of its first page.
  REQUIRE(::truncate(path.c_str(), 100) == 0);
  // Reading every byte of the tensor, past the new end, must not kill the process.
  uint64_t sum = 0;
  for (size_t i = 0; i < data.size(); i += 64) sum += data[i];
  (void)sum;
  test::check_error([&] { f.check_intact(); }, ErrorKind::Io,
                    {"shard.safetensors", "truncated while being read"});
  // A different mapping, untouched, stays fine; a fault outside every mapping still kills (not
  // tested: it would end the test).
  test::write_file(dir / "other.safetensors", bytes);
  const SafetensorsFile g = SafetensorsFile::open(dir / "other.safetensors");
  CHECK(g.data(g.at("w"))[5] == bytes[8 + header.size() + 5]);
  CHECK_NOTHROW(g.check_intact());
}

}  // namespace
}  // namespace qtool
