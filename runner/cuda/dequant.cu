// Dequantization to bf16 on the GPU: kernel -> launcher(stream) -> entry.
//
// Memory-bound: each thread moves 16 elements (16 bytes of int8/fp8 or 8 bytes of 4-bit codes in,
// 32 bytes of bf16 out) with vector loads and stores; a grid-stride loop over a grid sized to the
// machine. The per-element arithmetic is dq::element_f32's, so the values match the CPU bit for bit.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <algorithm>
#include <cstring>

#include "qtool/runner/cuda_ops.hpp"
#include "qtool/runner/dequant.hpp"

namespace qtool::runner::cuda {
namespace {

constexpr int kThreads = 256;
constexpr uint64_t kChunk = 16;  // elements per thread per iteration

// Two floats to bf16 bits (lo in the low half): the hardware's round-to-nearest-even conversion,
// which equals kmath::f32_to_bf16_bits on every non-NaN input; NaNs take the software path (the
// hardware returns a canonical NaN, the CPU keeps the payload).
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if (lo != lo || hi != hi)
    return static_cast<uint32_t>(kmath::f32_to_bf16_bits(lo)) |
           (static_cast<uint32_t>(kmath::f32_to_bf16_bits(hi)) << 16);
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// Two fp8 codes (first in the low byte) to floats through the hardware's exact fp8 -> f16 -> f32
// conversions; NaN codes take dq's decoder, whose bit patterns the CPU produces.
template <WeightKind kKind>
__device__ __forceinline__ float2 fp8x2_to_float2(uint32_t pair) {
  constexpr __nv_fp8_interpretation_t kInterp = kKind == WeightKind::Fp8E4M3 ? __NV_E4M3 : __NV_E5M2;
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(pair), kInterp);
  float2 f = __half22float2(__half2(h));
  const uint32_t b0 = pair & 0xFFu, b1 = (pair >> 8) & 0xFFu;
  const auto is_nan = [](uint32_t b) {
    return kKind == WeightKind::Fp8E4M3 ? (b & 0x7Fu) == 0x7Fu : (b & 0x7Fu) > 0x7Cu;
  };
  if (is_nan(b0))
    f.x = kKind == WeightKind::Fp8E4M3 ? dq::e4m3_to_f32(static_cast<uint8_t>(b0))
                                       : dq::e5m2_to_f32(static_cast<uint8_t>(b0));
  if (is_nan(b1))
    f.y = kKind == WeightKind::Fp8E4M3 ? dq::e4m3_to_f32(static_cast<uint8_t>(b1))
                                       : dq::e5m2_to_f32(static_cast<uint8_t>(b1));
  return f;
}

__device__ __forceinline__ void store16(uint16_t* out, uint64_t chunk, const float (&v)[16]) {
  uint4 a, b;
  a.x = pack2(v[0], v[1]);
  a.y = pack2(v[2], v[3]);
  a.z = pack2(v[4], v[5]);
  a.w = pack2(v[6], v[7]);
  b.x = pack2(v[8], v[9]);
  b.y = pack2(v[10], v[11]);
  b.z = pack2(v[12], v[13]);
  b.w = pack2(v[14], v[15]);
  uint4* dst = reinterpret_cast<uint4*>(out + chunk * kChunk);
  dst[0] = a;
  dst[1] = b;
}

__device__ __forceinline__ uint8_t byte_of(const uint4& v, int i) {
  const uint32_t w = i < 4 ? v.x : i < 8 ? v.y : i < 12 ? v.z : v.w;
  return static_cast<uint8_t>(w >> (8 * (i & 3)));
}

// int8 / fp8 with cols % 16 == 0: chunk c is 16 elements of row c / chunks_per_row. Index is
// uint32_t when the chunks fit (a 32-bit division per chunk instead of a 64-bit one).
template <WeightKind kKind, typename Index>
__global__ void dequant_rowwise_vec_kernel(DequantParams p, Index n_chunks, Index chunks_per_row,
                                           uint16_t* out) {
  const uint4* src = reinterpret_cast<const uint4*>(p.weight);
  const Index stride = static_cast<Index>(gridDim.x) * blockDim.x;
  for (Index c = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x; c < n_chunks; c += stride) {
    const Index row = c / chunks_per_row;
    const float scale = dq::row_scale(p, row);
    const uint4 q = src[c];
    float v[16];
    if constexpr (kKind == WeightKind::Int8) {
#pragma unroll
      for (int i = 0; i < 16; ++i) v[i] = dq::rowwise_value(kKind, byte_of(q, i), scale);
    } else {
      const uint32_t words[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float2 f = fp8x2_to_float2<kKind>(words[i / 2] >> (16 * (i & 1)));
        v[2 * i] = kmath::x86_mul(f.x, scale);
        v[2 * i + 1] = kmath::x86_mul(f.y, scale);
      }
    }
    store16(out, c, v);
  }
}

// nf4 / fp4 over the first n_chunks * 16 elements: chunk c is bytes [8c, 8c + 8), all in one
// absmax block (blocksize is a multiple of 16).
template <bool kDouble>
__global__ void dequant_4bit_vec_kernel(DequantParams p, uint64_t n_chunks, const float* code_table,
                                        const float* nested_map, uint16_t* out) {
  __shared__ float s_code[16];
  __shared__ float s_nested[kDouble ? 256 : 1];
  if (threadIdx.x < 16) s_code[threadIdx.x] = code_table[threadIdx.x];
  if constexpr (kDouble) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) s_nested[i] = nested_map[i];
  }
  __syncthreads();
  const uint2* src = reinterpret_cast<const uint2*>(p.weight);
  const int block_shift = __ffs(static_cast<int>(p.blocksize)) - 1;  // blocksize is a power of two
  const uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x;
  for (uint64_t c = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < n_chunks; c += stride) {
    const uint64_t block = (c * kChunk) >> block_shift;
    const float absmax = kDouble ? dq::block_absmax(p, block, s_nested) : dq::load_f32(p.scale, block);
    const uint2 q = src[c];
    float v[16];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const uint32_t byte = ((i < 4 ? q.x : q.y) >> (8 * (i & 3))) & 0xFFu;
      v[2 * i] = kmath::x86_mul(s_code[byte >> 4], absmax);
      v[2 * i + 1] = kmath::x86_mul(s_code[byte & 0xFu], absmax);
    }
    store16(out, c, v);
  }
}

// Any kind, element by element over [begin, end): the tails and the shapes the vector paths skip.
__global__ void dequant_scalar_kernel(DequantParams p, uint64_t begin, uint64_t end, const float* code_table,
                                      const float* nested_map, uint16_t* out) {
  const uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x;
  for (uint64_t i = begin + static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < end;
       i += stride)
    out[i] = kmath::f32_to_bf16_bits(dq::element_f32(p, i, code_table, nested_map));
}

int grid_for(uint64_t work_items) { return cuda::grid_for(work_items, kThreads); }

void launch_scalar(const DequantParams& p, uint64_t begin, uint64_t end, const float* code_table,
                   const float* nested_map, uint16_t* out, cudaStream_t stream) {
  if (end <= begin) return;
  dequant_scalar_kernel<<<grid_for(end - begin), kThreads, 0, stream>>>(p, begin, end, code_table, nested_map,
                                                                        out);
  QTOOL_CUDA_CHECK_LAUNCH();
}

template <WeightKind kKind>
void launch_rowwise(const DequantParams& p, uint16_t* out, cudaStream_t stream) {
  const uint64_t chunks_per_row = p.cols / kChunk;
  const uint64_t n_chunks = p.rows * chunks_per_row;
  // 32-bit indices when the grid-stride loop cannot overflow them.
  if (n_chunks + static_cast<uint64_t>(grid_for(n_chunks)) * kThreads < (1ull << 32))
    dequant_rowwise_vec_kernel<kKind, uint32_t><<<grid_for(n_chunks), kThreads, 0, stream>>>(
        p, static_cast<uint32_t>(n_chunks), static_cast<uint32_t>(chunks_per_row), out);
  else
    dequant_rowwise_vec_kernel<kKind, uint64_t>
        <<<grid_for(n_chunks), kThreads, 0, stream>>>(p, n_chunks, chunks_per_row, out);
  QTOOL_CUDA_CHECK_LAUNCH();
}

void launch_4bit(const DequantParams& p, const float* code_table, const float* nested_map, uint16_t* out,
                 cudaStream_t stream) {
  const uint64_t n_chunks = p.numel() / kChunk;
  if (n_chunks > 0) {
    if (p.double_quant)
      dequant_4bit_vec_kernel<true>
          <<<grid_for(n_chunks), kThreads, 0, stream>>>(p, n_chunks, code_table, nested_map, out);
    else
      dequant_4bit_vec_kernel<false>
          <<<grid_for(n_chunks), kThreads, 0, stream>>>(p, n_chunks, code_table, nested_map, out);
    QTOOL_CUDA_CHECK_LAUNCH();
  }
  launch_scalar(p, n_chunks * kChunk, p.numel(), code_table, nested_map, out, stream);
}

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }
bool is_pow2(uint32_t v) { return v && (v & (v - 1)) == 0; }

}  // namespace

DeviceTables upload_tables(void* device_memory, cudaStream_t stream) {
  float host[16 + 16 + 256];
  float code[16];
  float nested[256];
  DequantParams nf4;
  nf4.kind = WeightKind::Nf4;
  resolve_tables(nf4, code, nested);
  std::memcpy(host, code, sizeof(code));
  DequantParams fp4;
  fp4.kind = WeightKind::Fp4;
  resolve_tables(fp4, code, nested);
  std::memcpy(host + 16, code, sizeof(code));
  std::memcpy(host + 32, nested, sizeof(nested));
  QTOOL_CUDA_CHECK(cudaMemcpyAsync(device_memory, host, sizeof(host), cudaMemcpyHostToDevice, stream));
  QTOOL_CUDA_CHECK(cudaStreamSynchronize(stream));  // `host` is on this stack frame
  const float* base = static_cast<const float*>(device_memory);
  return DeviceTables{base, base + 16, base + 32};
}

CodeTables code_tables(const DequantParams& p, const DeviceTables& tables) {
  CodeTables t;
  t.nested = tables.dynamic_map;
  if (!is_4bit(p.kind)) return t;
  t.code = p.quant_map ? reinterpret_cast<const float*>(p.quant_map)
                       : (p.kind == WeightKind::Nf4 ? tables.nf4 : tables.fp4);
  if (p.nested_quant_map) t.nested = reinterpret_cast<const float*>(p.nested_quant_map);
  return t;
}

void dequantize_to_bf16(const DequantParams& p, const DeviceTables& tables, uint16_t* out,
                        cudaStream_t stream) {
  require_device_kind(p);
  if (p.numel() == 0) return;
  if (p.kind == WeightKind::Bf16) {
    QTOOL_CUDA_CHECK(cudaMemcpyAsync(out, p.weight, p.numel() * 2, cudaMemcpyDeviceToDevice, stream));
    return;
  }
  const auto [code_table, nested_map] = code_tables(p, tables);
  const bool vec_ok = aligned16(out) && aligned16(p.weight);
  switch (p.kind) {
    case WeightKind::Int8:
      if (vec_ok && p.cols % kChunk == 0) return launch_rowwise<WeightKind::Int8>(p, out, stream);
      break;
    case WeightKind::Fp8E4M3:
      if (vec_ok && p.cols % kChunk == 0) return launch_rowwise<WeightKind::Fp8E4M3>(p, out, stream);
      break;
    case WeightKind::Fp8E5M2:
      if (vec_ok && p.cols % kChunk == 0) return launch_rowwise<WeightKind::Fp8E5M2>(p, out, stream);
      break;
    case WeightKind::Nf4:
    case WeightKind::Fp4:
      if (vec_ok && is_pow2(p.blocksize) && p.blocksize % kChunk == 0)
        return launch_4bit(p, code_table, nested_map, out, stream);
      break;
    default: break;
  }
  launch_scalar(p, 0, p.numel(), code_table, nested_map, out, stream);
}

}  // namespace qtool::runner::cuda
