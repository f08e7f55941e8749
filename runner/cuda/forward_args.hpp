// The CUDA kernels' arguments (forward_kernels.hpp) for the views of ops.hpp, as the CUDA backend
// passes them (forward_ops.cpp); host code only. The tests launch the kernels with the same ones.
#pragma once

#include "forward_kernels.hpp"
#include "qtool/runner/ops.hpp"

namespace qtool::runner::cuda::fwd {

// `m` (check_view) as a kernel view.
View view(const Mat& m);
// The attention kernels' arguments: q, k, v and out as views, `s`'s sizes, bias and key mask (a
// dropped key's score gets finfo(dtype).min).
AttnArgs attention_args(const Mat& q, const Mat& k, const Mat& v, const AttentionShape& s, const Mat& out);

}  // namespace qtool::runner::cuda::fwd
