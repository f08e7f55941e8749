// `qtool verify --reference`: the tensors a quantized checkpoint must hold unchanged. quantize
// copies every tensor it does not quantize (norms, embeddings, biases, the output head, ...)
// byte for byte, and records each quantized weight's original dtype and shape; this compares
// both with the original checkpoint, where the linear-output check cannot see them.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "qtool/formats/checkpoint.hpp"

namespace qtool::runner {

struct ReferenceTensors {
  size_t n_compared = 0;  // unquantized tensors compared byte for byte
  uint64_t bytes_compared = 0;
  size_t n_quantized = 0;                // quantized linears whose recorded dtype and shape were compared
  std::vector<std::string> differences;  // one line per difference, naming the component and tensor
};

// For every component of `checkpoint` (matched to `reference`'s by name):
//   - each tensor that is not part of a quantized linear (quant::find_quantized_linears) must be
//     in the reference under its name with the same dtype, shape and bytes (the first differing
//     element is named);
//   - each quantized linear's original shape must be the reference weight's, and its recorded
//     original dtype (the 4-bit quant_state's "dtype", fp8's scale dtype) the reference weight's
//     dtype (int8 records none);
//   - each reference tensor must be in the checkpoint, as itself or as a quantized linear's weight.
// Malformed quant state throws Error(InvalidInput) as find_quantized_linears does; differences are
// returned, not thrown (verify reports them as a failed check).
ReferenceTensors compare_with_reference(const Checkpoint& checkpoint, const Checkpoint& reference);

}  // namespace qtool::runner
