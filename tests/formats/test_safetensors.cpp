// safetensors writer -> reader round trips, and the layout rules of the writer.
#include <doctest/doctest.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <thread>

#include "formats_test_util.hpp"
#include "qtool/formats/checkpoint.hpp"
#include "qtool/formats/safetensors.hpp"

namespace qtool {
namespace {

using test::TempDir;

struct Sample {
  TensorDecl decl;
  std::vector<uint8_t> bytes;
};

std::vector<int64_t> random_shape(std::mt19937_64& rng) {
  const int rank = static_cast<int>(rng() % 4);  // 0 (a scalar) to 3
  std::vector<int64_t> shape;
  for (int r = 0; r < rank; ++r) shape.push_back(static_cast<int64_t>(rng() % 9));  // 0 gives zero-size
  return shape;
}

std::vector<Sample> random_samples(std::mt19937_64& rng, size_t n) {
  std::vector<Sample> out;
  for (size_t i = 0; i < n; ++i) {
    Sample s;
    s.decl.name = "layers." + std::to_string(i) + ".w";
    s.decl.dtype = static_cast<DType>(i % kNumDTypes);  // every dtype
    s.decl.shape = random_shape(rng);
    s.bytes.resize(s.decl.nbytes());
    for (auto& b : s.bytes) b = static_cast<uint8_t>(rng());
    out.push_back(std::move(s));
  }
  return out;
}

// Writes `samples` in a random order, each tensor in random pieces, from several threads.
void write_samples(const std::filesystem::path& path, const std::vector<Sample>& samples,
                   std::mt19937_64& rng, std::map<std::string, std::string> metadata = {}) {
  std::vector<TensorDecl> decls;
  for (const auto& s : samples) decls.push_back(s.decl);
  SafetensorsWriter w(path, decls, std::move(metadata));
  struct Piece {
    size_t sample;
    uint64_t offset, size;
  };
  std::vector<Piece> pieces;
  for (size_t i = 0; i < samples.size(); ++i) {
    uint64_t off = 0;
    const uint64_t n = samples[i].bytes.size();
    while (off < n) {
      const uint64_t len = std::min<uint64_t>(n - off, 1 + rng() % 17);
      pieces.push_back({i, off, len});
      off += len;
    }
  }
  std::shuffle(pieces.begin(), pieces.end(), rng);
  std::vector<std::thread> threads;
  for (size_t t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      for (size_t k = t; k < pieces.size(); k += 4) {
        const Piece& p = pieces[k];
        const auto& s = samples[p.sample];
        w.write(s.decl.name, std::span<const uint8_t>(s.bytes.data() + p.offset, p.size), p.offset);
      }
    });
  for (auto& t : threads) t.join();
  CHECK_FALSE(std::filesystem::exists(path));  // nothing under the final name before commit
  w.commit();
}

TEST_CASE("round trip: every dtype, scalars, zero-size tensors, written in pieces from many threads") {
  const uint64_t seed = test::test_seed("safetensors round trip");
  std::mt19937_64 rng(seed);
  TempDir dir;
  const auto path = dir / "model.safetensors";
  const auto samples = random_samples(rng, 60);
  write_samples(path, samples, rng, {{"qtool.version", "test"}, {"note", "\"quoted\" \\ and \xc3\xa9"}});

  // Only the final file is left: no temporary sibling.
  size_t n_files = 0;
  for (const auto& e : std::filesystem::directory_iterator(dir.path())) {
    ++n_files;
    CHECK(e.path().filename() == "model.safetensors");
  }
  CHECK(n_files == 1);

  const auto f = SafetensorsFile::open(path);
  REQUIRE(f.tensors().size() == samples.size());
  CHECK(f.metadata().at("format") == "pt");
  CHECK(f.metadata().at("qtool.version") == "test");
  CHECK(f.metadata().at("note") == "\"quoted\" \\ and \xc3\xa9");
  CHECK(f.header().data_offset() % 8 == 0);
  for (const auto& s : samples) {
    const TensorInfo* t = f.find(s.decl.name);
    REQUIRE(t != nullptr);
    CHECK(t->dtype == s.decl.dtype);
    CHECK(t->shape == s.decl.shape);
    CHECK(t->nbytes() == s.bytes.size());
    CHECK(f.file_offset(*t) % dtype_size(t->dtype) == 0);  // naturally aligned
    const auto data = f.data(*t);
    CHECK(std::equal(data.begin(), data.end(), s.bytes.begin(), s.bytes.end()));
  }
  CHECK(f.find("absent") == nullptr);
  test::check_error([&] { f.at("absent"); }, ErrorKind::InvalidInput, {path.string(), "'absent'"});
}

TEST_CASE("writer layout: descending dtype size, then declaration order; padded header") {
  TempDir dir;
  const auto path = dir / "a.safetensors";
  std::vector<TensorDecl> decls = {
      {"u8", DType::U8, {3}},   {"f32_a", DType::F32, {2}}, {"bf16", DType::BF16, {1}},
      {"f64", DType::F64, {1}}, {"f32_b", DType::F32, {1}}, {"scalar_i8", DType::I8, {}},
  };
  SafetensorsWriter w(path, decls, {});
  for (const auto& d : decls) w.write(d.name, std::vector<uint8_t>(d.nbytes(), 0xAB));
  w.commit();
  CHECK(w.file_size() == std::filesystem::file_size(path));

  const auto bytes = test::read_file(path);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | bytes[static_cast<size_t>(i)];
  CHECK(n % 8 == 0);
  const std::string header(bytes.begin() + 8, bytes.begin() + 8 + static_cast<long>(n));
  // Padding is spaces, after the JSON object.
  const size_t close = header.find_last_of('}');
  CHECK(header.find_first_not_of(' ', close + 1) == std::string::npos);
  const auto j = nlohmann::json::parse(header);
  CHECK(j["__metadata__"]["format"] == "pt");

  const auto f = SafetensorsFile::open(path);
  std::vector<std::string> order;
  for (const auto& t : f.tensors()) order.push_back(t.name);
  CHECK(order == std::vector<std::string>{"f64", "f32_a", "f32_b", "bf16", "u8", "scalar_i8"});
  CHECK(f.at("scalar_i8").numel() == 1);
  CHECK(f.at("scalar_i8").shape.empty());
}

TEST_CASE("many tensors") {
  std::mt19937_64 rng(test::test_seed("many tensors"));
  TempDir dir;
  const auto path = dir / "many.safetensors";
  std::vector<Sample> samples;
  for (size_t i = 0; i < 5000; ++i) {
    Sample s;
    s.decl = {"blocks." + std::to_string(i / 10) + ".p" + std::to_string(i % 10),
              (i % 3) ? DType::BF16 : DType::F32,
              {static_cast<int64_t>(1 + rng() % 5)}};
    s.bytes.resize(s.decl.nbytes());
    for (auto& b : s.bytes) b = static_cast<uint8_t>(rng());
    samples.push_back(std::move(s));
  }
  write_samples(path, samples, rng);
  const auto f = SafetensorsFile::open(path);
  REQUIRE(f.tensors().size() == samples.size());
  for (const auto& s : samples) {
    const auto d = f.data(f.at(s.decl.name));
    REQUIRE(std::equal(d.begin(), d.end(), s.bytes.begin(), s.bytes.end()));
  }
}

TEST_CASE("an empty file of zero tensors round-trips") {
  TempDir dir;
  const auto path = dir / "empty.safetensors";
  SafetensorsWriter w(path, {}, {});
  w.commit();
  const auto f = SafetensorsFile::open(path);
  CHECK(f.tensors().empty());
  CHECK(f.header().data_size() == 0);
}

TEST_CASE("writer: variable-length tensors take their written lengths; the header stays in its space") {
  TempDir dir;
  std::mt19937_64 rng(test::test_seed("variable-length tensors"));
  for (int round = 0; round < 40; ++round) {
    CAPTURE(round);
    const auto path = dir / "v.safetensors";
    // Fixed tensors of several dtypes and variable ones (declared up to 1000 bytes) interleaved.
    std::vector<TensorDecl> decls;
    std::map<std::string, std::vector<uint8_t>> want;
    const int n = 1 + static_cast<int>(rng() % 6);
    for (int i = 0; i < n; ++i) {
      const std::string f = "fixed." + std::to_string(i), v = "state." + std::to_string(i);
      decls.push_back({f, i % 2 ? DType::F32 : DType::U8, {static_cast<int64_t>(rng() % 5)}});
      decls.push_back({v, DType::U8, {static_cast<int64_t>(rng() % 2 ? 1000 : 9)}, true});
    }
    std::map<std::string, uint64_t> declared;
    for (const auto& d : decls) declared[d.name] = d.nbytes();
    {
      SafetensorsWriter w(path, decls, {{"k", "v"}});
      for (const auto& d : decls) {
        // A variable one gets 0..declared bytes (0 and the declared size included).
        const uint64_t len = !d.variable_length ? d.nbytes()
                             : rng() % 4 == 0   ? d.nbytes()
                                                : rng() % (d.nbytes() + 1);
        std::vector<uint8_t> b(len);
        for (auto& x : b) x = static_cast<uint8_t>(rng());
        w.write(d.name, b);
        want[d.name] = b;
      }
      w.commit();
      CHECK(w.file_size() == std::filesystem::file_size(path));
    }
    const auto f = SafetensorsFile::open(path);  // checks offsets are contiguous and cover the data
    for (const auto& [name, b] : want) {
      CAPTURE(name);
      const auto got = f.data(f.at(name));
      CHECK(std::vector<uint8_t>(got.begin(), got.end()) == b);
      if (name.starts_with("state."))
        CHECK(f.at(name).shape == std::vector<int64_t>{static_cast<int64_t>(b.size())});
    }
    // Variable ones come last, in declaration order.
    std::vector<std::string> order;
    for (const auto& t : f.tensors()) order.push_back(t.name);
    for (int i = 0; i < n; ++i) CHECK(order[static_cast<size_t>(n + i)] == "state." + std::to_string(i));
    std::filesystem::remove(path);
  }
  // Misuse is our own error: written in pieces, twice, or longer than declared.
  {
    SafetensorsWriter w(dir / "m.safetensors", {{"s", DType::U8, {8}, true}}, {});
    test::check_error([&] { w.write("s", std::vector<uint8_t>(9, 1)); }, ErrorKind::Internal,
                      {"'s'", "exceeds"});
    test::check_error([&] { w.write("s", std::vector<uint8_t>(2, 1), 2); }, ErrorKind::Internal,
                      {"'s'", "once"});
    w.write("s", std::vector<uint8_t>(3, 1));
    test::check_error([&] { w.write("s", std::vector<uint8_t>(3, 1)); }, ErrorKind::Internal,
                      {"'s'", "once"});
  }
  CHECK(std::filesystem::is_empty(dir.path()));
}

TEST_CASE("component writer: the index's total_size counts variable-length tensors at their lengths") {
  TempDir dir;
  std::vector<std::vector<TensorDecl>> groups;
  for (int i = 0; i < 6; ++i)
    groups.push_back(
        {{"w" + std::to_string(i), DType::F32, {64}}, {"s" + std::to_string(i), DType::U8, {100}, true}});
  uint64_t total = 0;
  {
    ComponentWriter w(dir.path(), "model", groups, 700);  // several shards
    for (int i = 0; i < 6; ++i) {
      w.write("w" + std::to_string(i), std::vector<uint8_t>(256, 7));
      w.write("s" + std::to_string(i), std::vector<uint8_t>(static_cast<size_t>(10 + i), 9));
      total += 256 + 10 + static_cast<uint64_t>(i);
    }
    w.commit();
    CHECK(w.n_shards() > 1);
  }
  const auto bytes = test::read_file(dir / "model.safetensors.index.json");
  const auto index = nlohmann::json::parse(bytes.begin(), bytes.end());
  CHECK(index["metadata"]["total_size"] == total);
}

TEST_CASE("writer: no commit leaves nothing; commit refuses a tensor not fully written") {
  TempDir dir;
  const auto path = dir / "x.safetensors";
  {
    SafetensorsWriter w(path, {{"a", DType::F32, {4}}}, {});
    w.write("a", std::vector<uint8_t>(16, 1));
  }  // destroyed without commit
  CHECK(std::filesystem::is_empty(dir.path()));
  {
    SafetensorsWriter w(path, {{"a", DType::F32, {4}}, {"b", DType::U8, {2}}}, {});
    w.write("a", std::vector<uint8_t>(8, 1), 0);  // half of 'a', none of 'b'
    test::check_error([&] { w.commit(); }, ErrorKind::Internal, {"x.safetensors", "only"});
    CHECK_FALSE(std::filesystem::exists(path));
    test::check_error([&] { w.write("a", std::vector<uint8_t>(9, 1), 8); }, ErrorKind::Internal,
                      {"'a'", "exceeds"});
    test::check_error([&] { w.write("zz", std::vector<uint8_t>(1, 1)); }, ErrorKind::Internal, {"'zz'"});
  }
  CHECK(std::filesystem::is_empty(dir.path()));
  test::check_error(
      [&] {
        SafetensorsWriter w(path, {{"a", DType::U8, {1}}, {"a", DType::U8, {1}}}, {});
      },
      ErrorKind::InvalidInput, {"'a'", "twice"});
  test::check_error(
      [&] {
        SafetensorsWriter w(path, {{"__metadata__", DType::U8, {1}}}, {});
      },
      ErrorKind::InvalidInput, {"__metadata__"});
  test::check_error([&] { SafetensorsWriter w(dir / "no" / "such" / "dir.safetensors", {}, {}); },
                    ErrorKind::Io, {"dir.safetensors"});
}

TEST_CASE("reader accepts what the reference accepts: entries in any order, whitespace, unknown entry keys") {
  const std::string h =
      "{\"b\":{\"shape\":[2],\"data_offsets\":[4,6],\"dtype\":\"U8\",\"extra\":{\"x\":[1,{}]}},"
      "\"__metadata__\":{},\n \"a\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[0,4]},"
      "\"z\":{\"dtype\":\"BF16\",\"shape\":[3,0],\"data_offsets\":[6,6]}}    \n\t ";
  const auto bytes = test::st_bytes(h, 6);
  const auto hdr = parse_safetensors_header(bytes, bytes.size(), "ok.safetensors");
  REQUIRE(hdr.tensors.size() == 3);
  CHECK(hdr.tensors[0].name == "a");  // data order
  CHECK(hdr.tensors[1].name == "b");
  CHECK(hdr.tensors[2].name == "z");
  CHECK(hdr.tensors[2].numel() == 0);
  CHECK(hdr.data_size() == 6);
  CHECK(hdr.metadata.empty());
}

TEST_CASE("SafetensorsFile maps the file and data() points into it") {
  TempDir dir;
  const auto path = dir / "m.safetensors";
  const auto bytes = test::st_bytes(test::st_header({test::st_entry("t", "U8", "[5]", 0, 5)}), 5);
  test::write_file(path, bytes);
  const auto f = SafetensorsFile::open(path);
  CHECK(f.file_size() == bytes.size());
  const auto d = f.data(f.at("t"));
  CHECK(d.size() == 5);
  CHECK(std::equal(d.begin(), d.end(), bytes.end() - 5));
  test::check_error([&] { SafetensorsFile::open(dir / "missing.safetensors"); }, ErrorKind::Io,
                    {"missing.safetensors"});
}

}  // namespace
}  // namespace qtool
