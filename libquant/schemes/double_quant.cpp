// Double quant of the 4-bit absmax (bitsandbytes `compress_statistics`): offset = torch.mean(absmax),
// then (absmax - offset) quantized in blocks of 256 with the 8-bit signed dynamic map, exactly as
// bitsandbytes' CPU quantize_blockwise does it (a 65536-entry lookup table, not a nearest search).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "scheme.hpp"
#include "simd.hpp"

namespace qtool::quant::detail {
namespace {

// bitsandbytes' create_dynamic_map(signed=True), float32 bit patterns (FORMATS.md).
constexpr uint32_t kDynamicMapBits[256] = {
    0xbf7e3333, 0xbf7a999a, 0xbf770000, 0xbf736666, 0xbf6fcccd, 0xbf6c3333, 0xbf68999a, 0xbf650000,
    0xbf616666, 0xbf5dcccd, 0xbf5a3333, 0xbf56999a, 0xbf530000, 0xbf4f6666, 0xbf4bcccd, 0xbf483333,
    0xbf44999a, 0xbf410000, 0xbf3d6666, 0xbf39cccd, 0xbf363334, 0xbf32999a, 0xbf2f0000, 0xbf2b6666,
    0xbf27cccd, 0xbf243334, 0xbf20999a, 0xbf1d0000, 0xbf196666, 0xbf15cccd, 0xbf123334, 0xbf0e999a,
    0xbf0b0000, 0xbf076666, 0xbf03cccc, 0xbf003333, 0xbef93332, 0xbef20000, 0xbeeacccc, 0xbee3999a,
    0xbedc6666, 0xbed53333, 0xbece0000, 0xbec6cccc, 0xbebf999a, 0xbeb86666, 0xbeb13333, 0xbeaa0000,
    0xbea2cccc, 0xbe9b999a, 0xbe946666, 0xbe8d3334, 0xbe860000, 0xbe7d9999, 0xbe6f3333, 0xbe60cccd,
    0xbe526666, 0xbe440000, 0xbe35999a, 0xbe273333, 0xbe18cccd, 0xbe0a6666, 0xbdf80000, 0xbddb3334,
    0xbdc9eb85, 0xbdc428f7, 0xbdbe6667, 0xbdb8a3d7, 0xbdb2e148, 0xbdad1eb8, 0xbda75c2a, 0xbda1999a,
    0xbd9bd70a, 0xbd96147b, 0xbd9051eb, 0xbd8a8f5d, 0xbd84cccd, 0xbd7e147b, 0xbd728f5d, 0xbd670a3d,
    0xbd5b851f, 0xbd500000, 0xbd447ae1, 0xbd38f5c3, 0xbd2d70a3, 0xbd21eb85, 0xbd166667, 0xbd0ae148,
    0xbcfeb852, 0xbce7ae15, 0xbcd0a3d7, 0xbcb9999a, 0xbca28f5d, 0xbc8b851f, 0xbc68f5c3, 0xbc3ae148,
    0xbc1f3b64, 0xbc160418, 0xbc0ccccd, 0xbc039581, 0xbbf4bc6a, 0xbbe24dd3, 0xbbcfdf3b, 0xbbbd70a4,
    0xbbab020d, 0xbb989374, 0xbb8624dd, 0xbb676c8a, 0xbb428f5c, 0xbb1db22d, 0xbaf1a9fc, 0xbaa7ef9d,
    0xba7765ff, 0xba59e83e, 0xba3c6a80, 0xba1eecc1, 0xba016f01, 0xb9c7e283, 0xb98ce705, 0xb923d70b,
    0xb8ba1f4b, 0xb88aefb3, 0xb8378034, 0xb7b24206, 0xb70205ff, 0xb65a1a94, 0xb513a3b7, 0x00000000,
    0x3513a3b7, 0x365a1a94, 0x370205ff, 0x37b24206, 0x38378034, 0x388aefb3, 0x38ba1f4b, 0x3923d70b,
    0x398ce705, 0x39c7e283, 0x3a016f01, 0x3a1eecc1, 0x3a3c6a80, 0x3a59e83e, 0x3a7765ff, 0x3aa7ef9d,
    0x3af1a9fc, 0x3b1db22d, 0x3b428f5c, 0x3b676c8a, 0x3b8624dd, 0x3b989374, 0x3bab020d, 0x3bbd70a4,
    0x3bcfdf3b, 0x3be24dd3, 0x3bf4bc6a, 0x3c039581, 0x3c0ccccd, 0x3c160418, 0x3c1f3b64, 0x3c3ae148,
    0x3c68f5c3, 0x3c8b851f, 0x3ca28f5d, 0x3cb9999a, 0x3cd0a3d7, 0x3ce7ae15, 0x3cfeb852, 0x3d0ae148,
    0x3d166667, 0x3d21eb85, 0x3d2d70a3, 0x3d38f5c3, 0x3d447ae1, 0x3d500000, 0x3d5b851f, 0x3d670a3d,
    0x3d728f5d, 0x3d7e147b, 0x3d84cccd, 0x3d8a8f5d, 0x3d9051eb, 0x3d96147b, 0x3d9bd70a, 0x3da1999a,
    0x3da75c2a, 0x3dad1eb8, 0x3db2e148, 0x3db8a3d7, 0x3dbe6667, 0x3dc428f7, 0x3dc9eb85, 0x3ddb3334,
    0x3df80000, 0x3e0a6666, 0x3e18cccd, 0x3e273333, 0x3e35999a, 0x3e440000, 0x3e526666, 0x3e60cccd,
    0x3e6f3333, 0x3e7d9999, 0x3e860000, 0x3e8d3334, 0x3e946666, 0x3e9b999a, 0x3ea2cccc, 0x3eaa0000,
    0x3eb13333, 0x3eb86666, 0x3ebf999a, 0x3ec6cccc, 0x3ece0000, 0x3ed53333, 0x3edc6666, 0x3ee3999a,
    0x3eeacccc, 0x3ef20000, 0x3ef93332, 0x3f003333, 0x3f03cccc, 0x3f076666, 0x3f0b0000, 0x3f0e999a,
    0x3f123334, 0x3f15cccd, 0x3f196666, 0x3f1d0000, 0x3f20999a, 0x3f243334, 0x3f27cccd, 0x3f2b6666,
    0x3f2f0000, 0x3f32999a, 0x3f363334, 0x3f39cccd, 0x3f3d6666, 0x3f410000, 0x3f44999a, 0x3f483333,
    0x3f4bcccd, 0x3f4f6666, 0x3f530000, 0x3f56999a, 0x3f5a3333, 0x3f5dcccd, 0x3f616666, 0x3f650000,
    0x3f68999a, 0x3f6c3333, 0x3f6fcccd, 0x3f736666, 0x3f770000, 0x3f7a999a, 0x3f7e3333, 0x3f800000,
};

constexpr int kLutSize = 65536;

// lut[i] = number of midpoints of the map below the value -1 + 2i/65535 (bitsandbytes'
// build_quantize_lut, with its float32 arithmetic).
struct DynamicLut {
  std::array<uint8_t, kLutSize> lut{};
  DynamicLut() {
    const auto& map = dynamic_map_table();
    float mid[255];
    for (int i = 0; i < 255; ++i) mid[i] = 0.5f * (map[i] + map[i + 1]);
    int code = 0;
    for (int i = 0; i < kLutSize; ++i) {
      const float fi = static_cast<float>(i);
      const float val = (fi + fi) / 65535.0f - 1.0f;
      while (code < 255 && mid[code] < val) ++code;
      lut[static_cast<size_t>(i)] = static_cast<uint8_t>(code);
    }
  }
};

const DynamicLut& dynamic_lut() {
  static const DynamicLut lut;
  return lut;
}

// --- torch's cascade sum ---------------------------------------------------------------------------

int64_t ceil_log2(int64_t x) {
  if (x <= 2) return 1;
  const auto v = static_cast<uint64_t>(x) - 1;
  return 64 - __builtin_clzll(v);  // index of the last set bit + 1
}

// A "vector" of `lanes` float accumulators; lane-wise adds equal torch's Vectorized<float> adds.
struct Vec {
  std::array<float, 16> v{};
};

// multi_row_sum over `size` rows of 4 items; item(i, k) loads row i, column k.
template <typename Item, typename Load, typename Add>
std::array<Item, 4> multi_row_sum(int64_t size, const Item& zero, Load load, Add add) {
  constexpr int64_t kLevels = 4;
  const int64_t level_power = std::max<int64_t>(4, ceil_log2(size) / kLevels);
  const int64_t level_step = int64_t{1} << level_power;
  const int64_t level_mask = level_step - 1;
  Item acc[kLevels][4];
  for (auto& level : acc)
    for (auto& a : level) a = zero;
  int64_t i = 0;
  for (; i + level_step <= size;) {
    for (int64_t j = 0; j < level_step; ++j, ++i)
      for (int64_t k = 0; k < 4; ++k) add(acc[0][k], load(i, k));
    for (int64_t j = 1; j < kLevels; ++j) {
      for (int64_t k = 0; k < 4; ++k) {
        add(acc[j][k], acc[j - 1][k]);
        acc[j - 1][k] = zero;
      }
      const int64_t mask = level_mask << (j * level_power);
      if ((i & mask) != 0) break;
    }
  }
  for (; i < size; ++i)
    for (int64_t k = 0; k < 4; ++k) add(acc[0][k], load(i, k));
  for (int64_t j = 1; j < kLevels; ++j)
    for (int64_t k = 0; k < 4; ++k) add(acc[0][k], acc[j][k]);
  return {acc[0][0], acc[0][1], acc[0][2], acc[0][3]};
}

// row_sum: the items viewed as (-1, 4) rows, then the tail, then the 4 partial sums.
template <typename Item, typename Load, typename Add>
Item row_sum(int64_t size, const Item& zero, Load load, Add add) {
  const int64_t size_ilp = size / 4;
  auto partial = multi_row_sum<Item>(
      size_ilp, zero, [&](int64_t i, int64_t k) { return load(4 * i + k); }, add);
  for (int64_t i = size_ilp * 4; i < size; ++i) add(partial[0], load(i));
  for (int k = 1; k < 4; ++k) add(partial[0], partial[k]);
  return partial[0];
}

float scalar_row_sum(const float* x, int64_t n) {
  return row_sum<float>(
      n, 0.0f, [&](int64_t i) { return x[i]; }, [](float& a, float b) { a += b; });
}

// One contiguous inner reduction (cascade_sum's loop on [x, x + n)) with `Lanes` lanes, each lane's
// adds in the same order; LaneVec is a GCC vector of Lanes floats (lane-wise adds, as torch's
// Vectorized<float>), or Vec for a lane count given at run time.
template <typename LaneVec, typename Load, typename Add, typename Lane>
float inner_sum_with(const float* x, int64_t n, int lanes, Load load, Add add, Lane lane) {
  if (n < lanes) return scalar_row_sum(x, n);
  const int64_t vec_size = n / lanes;
  const LaneVec acc = row_sum<LaneVec>(vec_size, LaneVec{}, load, add);
  float final_acc = 0.0f;
  for (int64_t k = vec_size * lanes; k < n; ++k) final_acc += x[k];
  for (int l = 0; l < lanes; ++l) final_acc += lane(acc, l);
  return final_acc;
}

// Lanes floats as Lanes / 4 SSE vectors (the baseline's width, so nothing depends on a target).
template <int Lanes>
struct FixedLanes {
  using V4 = float __attribute__((vector_size(16)));
  V4 part[Lanes / 4] = {};
};

template <int Lanes>
float inner_sum_fixed(const float* x, int64_t n) {
  using L = FixedLanes<Lanes>;
  return inner_sum_with<L>(
      x, n, Lanes,
      [&](int64_t i) {
        L v;
        std::memcpy(v.part, x + i * Lanes, sizeof v.part);
        return v;
      },
      [](L& a, const L& b) {
        for (int k = 0; k < Lanes / 4; ++k) a.part[k] += b.part[k];
      },
      [](const L& v, int l) { return v.part[l / 4][l % 4]; });
}

float inner_sum(const float* x, int64_t n, int lanes) {
  if (lanes == 8) return inner_sum_fixed<8>(x, n);
  if (lanes == 16) return inner_sum_fixed<16>(x, n);
  return inner_sum_with<Vec>(
      x, n, lanes,
      [&](int64_t i) {
        Vec v;
        for (int l = 0; l < lanes; ++l) v.v[static_cast<size_t>(l)] = x[i * lanes + l];
        return v;
      },
      [lanes](Vec& a, const Vec& b) {
        for (int l = 0; l < lanes; ++l) a.v[static_cast<size_t>(l)] += b.v[static_cast<size_t>(l)];
      },
      [](const Vec& v, int l) { return v.v[static_cast<size_t>(l)]; });
}

// float -> int32 by truncation as x86's cvttss2si does it (bitsandbytes' binary relies on it):
// NaN and out-of-range values give INT32_MIN. (A NaN arises when absmax2 is so small that
// 1 / absmax2 overflows and a zero difference is multiplied by it.)
int32_t truncate_like_cvttss2si(float x) {
  if (!(x > -2147483904.0f && x < 2147483648.0f)) return INT32_MIN;
  return static_cast<int32_t>(x);
}

}  // namespace

const std::array<float, 256>& dynamic_map_table() {
  static const std::array<float, 256> map = [] {
    std::array<float, 256> m{};
    for (size_t i = 0; i < 256; ++i) m[i] = f32_from_bits(kDynamicMapBits[i]);
    return m;
  }();
  return map;
}

float torch_mean_f32(const float* x, uint64_t n_u, int lanes, int threads) {
  QTOOL_ASSERT(lanes >= 1 && lanes <= 16 && threads >= 1);
  const auto n = static_cast<int64_t>(n_u);
  constexpr int64_t kGrain = 32768;  // at::internal::GRAIN_SIZE
  float sum = 0.0f;
  if (n < kGrain || threads == 1) {
    sum += inner_sum(x, n, lanes);
  } else {
    // Two-pass reduction: per-thread partial sums (zero for threads that get no chunk), then
    // their sum. parallel_for runs serially when n does not exceed the grain.
    std::vector<float> buffer(static_cast<size_t>(threads), 0.0f);
    if (n <= kGrain) {
      buffer[0] += inner_sum(x, n, lanes);
    } else {
      const int64_t n_chunks = std::min<int64_t>(threads, (n + kGrain - 1) / kGrain);
      const int64_t chunk = (n + n_chunks - 1) / n_chunks;
      for (int64_t t = 0; t < n_chunks; ++t) {
        const int64_t begin = t * chunk;
        if (begin >= n) continue;
        const int64_t end = std::min(n, begin + chunk);
        buffer[static_cast<size_t>(t)] += inner_sum(x + begin, end - begin, lanes);
      }
    }
    sum += inner_sum(buffer.data(), threads, lanes);
  }
  return sum / static_cast<float>(n);
}

namespace {

// One nested block [begin, end) of (x - offset) into 8-bit codes; returns its absmax. The reference.
float dynamic_quantize_block_ref(const float* x, float offset, uint64_t begin, uint64_t end, uint8_t* q) {
  const auto& lut = dynamic_lut().lut;
  float amax = 0.0f;
  for (uint64_t i = begin; i < end; ++i) amax = std::max(amax, std::fabs(x[i] - offset));
  if (amax == 0.0f) {
    std::fill(q + begin, q + end, uint8_t{0});
    return amax;
  }
  const float inv = 1.0f / amax;
  for (uint64_t i = begin; i < end; ++i) {
    const float v = std::clamp((x[i] - offset) * inv, -1.0f, 1.0f);
    // bitsandbytes' x86 build contracts `(v + 1) * 0.5 * 65535 + 0.5` into one FMA.
    const float idx = std::fma((v + 1.0f) * 0.5f, 65535.0f, 0.5f);
    q[i] = lut[static_cast<uint16_t>(truncate_like_cvttss2si(idx))];
  }
  return amax;
}

#if QTOOL_HAVE_X86_SIMD
// The same for a full block (kNestedBlocksize, a multiple of 8) with AVX2 + FMA: the same
// operations lane by lane. max_ps(v, acc) keeps acc where v is NaN as std::max(acc, v) does;
// max_ps(-1, v) and min_ps(1, v) pass a NaN v through as std::clamp does; cvttps gives INT32_MIN for
// NaN and out-of-range values as cvttss2si does.
QTOOL_AVX2_FMA float dynamic_quantize_block_avx2(const float* x, float offset, uint64_t begin, uint8_t* q) {
  static_assert(kNestedBlocksize % 8 == 0);
  const __m256 voff = _mm256_set1_ps(offset);
  __m256 vmax = _mm256_setzero_ps();
  for (uint64_t i = 0; i < kNestedBlocksize; i += 8) {
    const __m256 d = simd::abs8(_mm256_sub_ps(_mm256_loadu_ps(x + begin + i), voff));
    vmax = _mm256_max_ps(d, vmax);
  }
  const float amax = simd::hmax8(vmax);
  if (amax == 0.0f) {
    std::fill(q + begin, q + begin + kNestedBlocksize, uint8_t{0});
    return amax;
  }
  const __m256 vinv = _mm256_set1_ps(1.0f / amax);
  const __m256 one = _mm256_set1_ps(1.0f), minus_one = _mm256_set1_ps(-1.0f), half = _mm256_set1_ps(0.5f);
  const __m256 scale = _mm256_set1_ps(65535.0f);
  const auto& lut = dynamic_lut().lut;
  alignas(32) int32_t idx[8];
  for (uint64_t i = 0; i < kNestedBlocksize; i += 8) {
    __m256 v = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + begin + i), voff), vinv);
    v = _mm256_min_ps(one, _mm256_max_ps(minus_one, v));
    const __m256 f = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_add_ps(v, one), half), scale, half);
    _mm256_store_si256(reinterpret_cast<__m256i*>(idx), _mm256_cvttps_epi32(f));
    for (int k = 0; k < 8; ++k) q[begin + i + static_cast<uint64_t>(k)] = lut[static_cast<uint16_t>(idx[k])];
  }
  return amax;
}
#endif

}  // namespace

void dynamic_quantize_blocks(const float* x, uint64_t n, float offset, uint64_t block_begin,
                             uint64_t block_end, uint8_t* q, uint8_t* absmax2, Impl impl) {
  for (uint64_t b = block_begin; b < block_end; ++b) {
    const uint64_t begin = b * kNestedBlocksize;
    const uint64_t end = std::min<uint64_t>(n, begin + kNestedBlocksize);
    float amax;
#if QTOOL_HAVE_X86_SIMD
    if (impl != Impl::Reference && end - begin == kNestedBlocksize && cpu_features().fma)
      amax = dynamic_quantize_block_avx2(x, offset, begin, q);
    else
#endif
      amax = dynamic_quantize_block_ref(x, offset, begin, end, q);
    store_f32(absmax2 + 4 * b, amax);
  }
}

void dynamic_dequantize(const uint8_t* q, const float* map, const float* nested_absmax, float offset,
                        uint64_t begin, uint64_t end, float* out) {
  for (uint64_t i = begin; i < end; ++i) {
    const float scaled = map[q[i]] * nested_absmax[i / kNestedBlocksize];
    out[i - begin] = scaled + offset;
  }
}

}  // namespace qtool::quant::detail
