// Checked arithmetic for sizes, counts and offsets that come from files or the command line:
// std::nullopt where the exact result does not fit in 64 bits.
#pragma once

#include <cstdint>
#include <optional>

namespace qtool {

inline std::optional<uint64_t> checked_mul(uint64_t a, uint64_t b) {
  uint64_t r = 0;
  if (__builtin_mul_overflow(a, b, &r)) return std::nullopt;
  return r;
}

inline std::optional<uint64_t> checked_add(uint64_t a, uint64_t b) {
  uint64_t r = 0;
  if (__builtin_add_overflow(a, b, &r)) return std::nullopt;
  return r;
}

// a * b * c, or std::nullopt.
inline std::optional<uint64_t> checked_mul(uint64_t a, uint64_t b, uint64_t c) {
  const auto ab = checked_mul(a, b);
  return ab ? checked_mul(*ab, c) : std::nullopt;
}

}  // namespace qtool
