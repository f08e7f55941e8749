// Progress reporting from library code: a callback the CLI turns into a bar on a terminal.
#pragma once

#include <cstdint>
#include <functional>
#include <string_view>

namespace qtool {

// Called with the work done so far and the total, in the caller's units (usually bytes), and a
// short label of the current item. May be called from several threads; must be cheap.
using ProgressFn = std::function<void(uint64_t done, uint64_t total, std::string_view label)>;

}  // namespace qtool
