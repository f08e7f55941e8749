#include "qtool/runner/cpu_kernels.hpp"

#include <algorithm>
#include <vector>

#include "qtool/runner/kernel_math.hpp"

namespace qtool::runner::cpu {

void generate_activation_rows(uint64_t stream_seed, uint64_t ld, uint64_t col_begin, uint64_t col_end,
                              uint16_t* out, uint64_t row_begin, uint64_t row_end) {
  for (uint64_t t = row_begin; t < row_end; ++t)
    for (uint64_t c = col_begin; c < col_end; ++c)
      out[t * ld + c] = kmath::activation_bf16(stream_seed, t, c);
}

void generate_activation(uint64_t stream_seed, uint64_t tokens, uint64_t ld, uint64_t col_begin,
                         uint64_t col_end, uint16_t* out, ThreadPool& pool) {
  pool.parallel_for(tokens, 1, [&](size_t b, size_t e) {
    generate_activation_rows(stream_seed, ld, col_begin, col_end, out, b, e);
  });
}

void gemm_rows(const float* xf, const uint16_t* w, uint16_t* y, uint64_t tokens, uint64_t in, uint64_t out,
               uint64_t o_begin, uint64_t o_end) {
  constexpr uint64_t kLanes = 8;
  std::vector<float> wf(in);
  for (uint64_t o = o_begin; o < o_end; ++o) {
    const uint16_t* wrow = w + o * in;
    for (uint64_t k = 0; k < in; ++k) wf[k] = kmath::bf16_bits_to_f32(wrow[k]);
    for (uint64_t t = 0; t < tokens; ++t) {
      const float* xrow = xf + t * in;
      float acc[kLanes] = {};
      uint64_t k = 0;
      for (; k + kLanes <= in; k += kLanes)
        for (uint64_t l = 0; l < kLanes; ++l) acc[l] += xrow[k + l] * wf[k + l];
      for (uint64_t l = 0; k < in; ++k, ++l) acc[l] += xrow[k] * wf[k];
      const float sum = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
      y[t * out + o] = kmath::f32_to_bf16_bits(sum);
    }
  }
}

void gemm_bf16(const uint16_t* x, uint64_t ldx, const uint16_t* w, uint16_t* y, uint64_t tokens, uint64_t in,
               uint64_t out, ThreadPool& pool) {
  std::vector<float> xf(tokens * in);
  for (uint64_t t = 0; t < tokens; ++t)
    for (uint64_t k = 0; k < in; ++k) xf[t * in + k] = kmath::bf16_bits_to_f32(x[t * ldx + k]);
  const uint64_t min_rows = std::max<uint64_t>(1, (uint64_t{1} << 16) / std::max<uint64_t>(1, tokens * in));
  pool.parallel_for(out, min_rows,
                    [&](size_t b, size_t e) { gemm_rows(xf.data(), w, y, tokens, in, out, b, e); });
}

Digest digest(const uint16_t* y, uint64_t n) {
  Digest d;
  for (uint64_t k = 0; 2 * k < n; ++k) {
    const uint32_t word =
        static_cast<uint32_t>(y[2 * k]) | (2 * k + 1 < n ? static_cast<uint32_t>(y[2 * k + 1]) << 16 : 0u);
    d.hash += kmath::digest_term(k, word);
    d.nonfinite += kmath::nonfinite_in_word(word);
  }
  return d;
}

}  // namespace qtool::runner::cpu
