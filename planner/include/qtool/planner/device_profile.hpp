// A device profile: the rates and fixed costs of one GPU machine that the cost model and the
// reserve model use. Profiles live in sample_configs/devices/*.json; `qtool profile` measures one
// on the machine it runs on and writes the same schema.
//
// JSON schema (version 1; unknown keys are errors, missing keys take the defaults below):
//   {
//     "format": "qtool-device-profile", "version": 1,
//     "name": "h100-pcie-gen5",                 // free text
//     "description": "...",                     // free text: what was measured or assumed
//     "device_names": ["NVIDIA H100 80GB HBM3"],  // optional: the CUDA device names (cudaDeviceProp
//                                               // name) it was measured on; `qtool plan` without
//                                               // --device-profile uses it on such a GPU
//     "memory_bytes": 85520809984,              // total memory of one GPU (informational)
//     "h2d_pinned_gbps": 55.0,                  // host->device copy from pinned memory, GB/s (1e9 B/s)
//     "h2d_pageable_gbps": 9.0,                 // host->device copy from pageable memory, GB/s
//     "p2p_gbps": 50.0,                         // GPU->GPU peer copy, GB/s
//     "disk_read_gbps": 3.0,                    // checkpoint file -> pinned staging, GB/s
//     "device_bandwidth_gbps": 2000.0,          // device memory copy (d2d) bandwidth, GB/s
//     "bf16_tflops": 650.0,                     // effective dense bf16 GEMM rate, 1e12 FLOP/s
//     "attention_tflops": 147.0,                // the runner's attention at Flux's shape, 1e12 FLOP/s
//     "activation_gbps": 790.0,                 // the runner's norms, activations and residuals:
//                                               // bytes read plus written per second, GB/s
//     "dequant_gelems_per_s": {"int8": 600, "fp8_e4m3": 600, "fp8_e5m2": 600, "nf4": 500,
//                              "fp4": 500, "f16": 700, "f32": 400},  // 1e9 bf16 weights out/s
//     "context_bytes": 629145600,               // CUDA context + cuBLAS handle + module images
//     "cublas_workspace_bytes": 33554432,       // the workspace the runner sets with cublasSetWorkspace
//     "alloc_granularity_bytes": 2097152,       // cudaMalloc rounds every buffer up to this
//     "host_alloc_granularity_bytes": 4096,     // pinned host allocations round up to this
//     "pinned_page_table_bytes_per_gib": 2097152,  // device memory per started GiB of pinned host
//                                               // memory mapped into the GPU (its page tables)
//     "kernel_launch_us": 4.0,                  // fixed cost per kernel launched (GEMM, dequant)
//     "copy_latency_us": 8.0                    // fixed cost per host->device copy issued
//   }
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

namespace qtool::planner {

inline constexpr int kDeviceProfileVersion = 1;

struct DeviceProfile {
  std::string name = "h100-pcie-gen5";
  std::string description;
  std::vector<std::string> device_names;   // CUDA device names it describes ("" = none)
  uint64_t memory_bytes = 85520809984ull;  // 79.6 GiB: an H100 80GB as cudaMemGetInfo reports total
  double h2d_pinned_gbps = 55.0;
  double h2d_pageable_gbps = 9.0;
  double p2p_gbps = 50.0;
  double disk_read_gbps = 3.0;
  double device_bandwidth_gbps = 2000.0;
  double bf16_tflops = 650.0;
  // The runner's own forward ops, measured through its backend by `qtool profile`: attention
  // (FLOPs of softmax(QK^T)V at 24 heads, 4608 tokens, head_dim 128) and the memory-bound ops
  // (norms, activations, RoPE, residuals; bytes read plus written). The defaults: its tensor-core
  // attention and kernels as `qtool profile` measured them on an H200 (2026-12-05, bench/RESULTS.md
  // "full-size Flux against diffusers"), with which the full Flux step was predicted within 7%.
  double attention_tflops = 147.0;
  double activation_gbps = 790.0;
  // Dequantization (or conversion) to bf16, in 1e9 output elements per second, keyed by the
  // scheme name of libquant ("int8", "fp8_e4m3", "fp8_e5m2", "nf4", "fp4") or the source dtype
  // of an unquantized non-bf16 weight ("f16", "f32"). A missing key falls back to "nf4"'s rate.
  std::map<std::string, double> dequant_gelems_per_s = {
      {"int8", 600.0}, {"fp8_e4m3", 600.0}, {"fp8_e5m2", 600.0}, {"nf4", 500.0},
      {"fp4", 500.0},  {"f16", 700.0},      {"f32", 400.0}};
  uint64_t context_bytes = 600ull << 20;
  uint64_t cublas_workspace_bytes = 32ull << 20;
  uint64_t alloc_granularity_bytes = 2ull << 20;
  uint64_t host_alloc_granularity_bytes = 4096;
  // Pinned host memory is mapped into every GPU's address space; its page tables take device
  // memory: 2 MiB per GiB pinned on H100 (`qtool profile` logs +2/+4/+6 MiB for 1/2/3 GiB).
  uint64_t pinned_page_table_bytes_per_gib = 2ull << 20;
  double kernel_launch_us = 4.0;
  double copy_latency_us = 8.0;

  // Dequant rate for `key` in elements per second.
  double dequant_rate(std::string_view key) const;
};

nlohmann::json device_profile_to_json(const DeviceProfile& profile);
// Throws Error(InvalidInput) naming `label` and the key for unknown keys, wrong types, and
// rates or sizes that are not positive.
DeviceProfile device_profile_from_json(const nlohmann::json& j, std::string_view label);
DeviceProfile load_device_profile(const std::filesystem::path& path);

}  // namespace qtool::planner
