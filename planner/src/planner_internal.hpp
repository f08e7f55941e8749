// Pieces of the planner exposed to its unit tests.
#pragma once

#include <cstdint>
#include <vector>

#include "qtool/planner/planner.hpp"

namespace qtool::planner {

// Contiguous partition of the units `seq` (in order; sizes in `size`, indexed by unit id) over
// GPUs with weight capacities `cap` (per GPU position) for a strategy, with revisits for units
// left over. Sets gpu_of[unit] to the GPU position. Returns false when some unit cannot be placed.
bool partition(Strategy strategy, const std::vector<uint32_t>& seq, const std::vector<uint64_t>& size,
               const std::vector<uint64_t>& cap, std::vector<int32_t>& gpu_of);

double copy_seconds(uint64_t bytes, const Location& target, const DeviceProfile& p);
double linear_seconds(const LinearOp& l, uint64_t tokens, const DeviceProfile& p);

}  // namespace qtool::planner
