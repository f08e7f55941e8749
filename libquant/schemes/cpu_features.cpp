// What the CPU and the OS offer the fast paths, read once with CPUID and XGETBV (<cpuid.h>, which
// GCC and clang both ship; clang 14's __builtin_cpu_supports does not know "f16c").
#include "scheme.hpp"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

namespace qtool::quant::detail {
namespace {

CpuFeatures detect() {
  CpuFeatures f;
#if defined(__x86_64__) || defined(__i386__)
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (__get_cpuid(1, &eax, &ebx, &ecx, &edx) == 0) return f;
  const bool fma = (ecx >> 12) & 1, osxsave = (ecx >> 27) & 1, avx = (ecx >> 28) & 1, f16c = (ecx >> 29) & 1;
  if (!osxsave || !avx) return f;
  // XCR0: bits 1-2 (SSE, AVX state) saved by the OS for ymm; bits 5-7 (opmask, zmm) for AVX-512.
  unsigned xcr0_lo = 0, xcr0_hi = 0;
  __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  const bool ymm_state = (xcr0_lo & 0x6u) == 0x6u;
  const bool zmm_state = (xcr0_lo & 0xE6u) == 0xE6u;
  if (__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) == 0) return f;
  const bool avx2 = (ebx >> 5) & 1;
  const bool avx512f = (ebx >> 16) & 1, avx512dq = (ebx >> 17) & 1, avx512bw = (ebx >> 30) & 1,
             avx512vl = (ebx >> 31) & 1;
  f.avx2 = ymm_state && avx2 && f16c;
  f.fma = f.avx2 && fma;
  // QTOOL_AVX512 (simd.hpp) lets the compiler use DQ as well.
  f.avx512 = f.fma && zmm_state && avx512f && avx512dq && avx512bw && avx512vl;
#endif
  return f;
}

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures features = detect();
  return features;
}

}  // namespace qtool::quant::detail
