// Byte sizes as users write them: "20GiB", "512MiB", "20GB", "1.5GiB", "123".
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace qtool {

// Throws Error(Usage) naming `option` when the text is not a size.
uint64_t parse_size(std::string_view text, std::string_view option);
std::string format_size(uint64_t bytes);  // "1.50 GiB"
// Parameter counts: "11.90B" (billions with `billion_digits` decimals), "123.06M", "83.82K", "42".
std::string format_count(uint64_t n, int billion_digits = 2);

}  // namespace qtool
