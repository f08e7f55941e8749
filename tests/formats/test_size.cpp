#include <doctest/doctest.h>

#include "formats_test_util.hpp"
#include "qtool/formats/size.hpp"

namespace qtool {
namespace {

TEST_CASE("parse_size: bytes, decimal and binary units") {
  CHECK(parse_size("123", "--x") == 123);
  CHECK(parse_size("0", "--x") == 0);
  CHECK(parse_size("123B", "--x") == 123);
  CHECK(parse_size("20GiB", "--x") == 20ull << 30);
  CHECK(parse_size("512MiB", "--x") == 512ull << 20);
  CHECK(parse_size("4KiB", "--x") == 4096);
  CHECK(parse_size("2TiB", "--x") == 2ull << 40);
  CHECK(parse_size("20GB", "--x") == 20'000'000'000ull);
  CHECK(parse_size("20gb", "--x") == 20'000'000'000ull);
  CHECK(parse_size("5MB", "--x") == 5'000'000ull);
  CHECK(parse_size("7k", "--x") == 7000);
  CHECK(parse_size("1.5GiB", "--x") == 3ull << 29);
  CHECK(parse_size(".5KiB", "--x") == 512);
  CHECK(parse_size("20 GiB", "--x") == 20ull << 30);
}

TEST_CASE("parse_size: malformed sizes are usage errors naming the option") {
  for (const char* bad :
       {"", "GiB", "abc", "-5", "1.2.3", "5XB", "1e3", ".", " 5", "5 G i B", "99999999999TiB"}) {
    INFO("text: '", bad, "'");
    test::check_error([&] { parse_size(bad, "--max-shard-size"); }, ErrorKind::Usage, {"--max-shard-size"});
  }
}

TEST_CASE("parse_size: numbers beyond a double's range are usage errors, not exceptions") {
  // std::stod throws std::out_of_range on both of these (exit 3 before).
  const std::string huge = "1" + std::string(400, '0');
  const std::string tiny = "0." + std::string(400, '0') + "1";
  for (const std::string& text : {huge, huge + "GB", huge + ".5KiB"}) {
    INFO("text: ", text.size(), " characters");
    test::check_error([&] { parse_size(text, "--max-shard-size"); }, ErrorKind::Usage, {"--max-shard-size"});
  }
  // Below a byte rounds to 0, as "0.1" does.
  CHECK(parse_size(tiny, "--x") == 0);
  CHECK(parse_size(tiny + "GiB", "--x") == 0);
  CHECK(parse_size("0.1", "--x") == 0);
  // Near the top of the range: exact below 1.8e19 bytes, refused above (no wrap).
  CHECK(parse_size("16000000TiB", "--x") == 15625ull << 50);
  test::check_error([&] { parse_size("17000000TiB", "--x"); }, ErrorKind::Usage, {"--x"});
}

TEST_CASE("format_size") {
  CHECK(format_size(0) == "0 B");
  CHECK(format_size(1023) == "1023 B");
  CHECK(format_size(1536) == "1.50 KiB");
  CHECK(format_size(20ull << 30) == "20.00 GiB");
}

}  // namespace
}  // namespace qtool
