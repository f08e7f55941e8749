#include "matmul_lt.hpp"

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <string>

#include "qtool/formats/error.hpp"
#include "qtool/runner/cuda_resources.hpp"

namespace qtool::runner::cuda {
namespace {

struct LtApi {
  decltype(&::cublasLtCreate) create;
  decltype(&::cublasLtDestroy) destroy;
  decltype(&::cublasLtMatmulDescCreate) desc_create;
  decltype(&::cublasLtMatmulDescDestroy) desc_destroy;
  decltype(&::cublasLtMatmulDescSetAttribute) desc_set;
  decltype(&::cublasLtMatrixLayoutCreate) layout_create;
  decltype(&::cublasLtMatrixLayoutDestroy) layout_destroy;
  decltype(&::cublasLtMatmulPreferenceCreate) pref_create;
  decltype(&::cublasLtMatmulPreferenceDestroy) pref_destroy;
  decltype(&::cublasLtMatmulPreferenceSetAttribute) pref_set;
  decltype(&::cublasLtMatmulAlgoGetHeuristic) heuristic;
  decltype(&::cublasLtMatmul) matmul;
};

LtApi load_lt() {
  const ToolkitLibrary lib("libcublasLt.so." + std::to_string(CUBLAS_VER_MAJOR), "cuBLASLt");
  LtApi api{};
  lib.require(api.create, "cublasLtCreate");
  lib.require(api.destroy, "cublasLtDestroy");
  lib.require(api.desc_create, "cublasLtMatmulDescCreate");
  lib.require(api.desc_destroy, "cublasLtMatmulDescDestroy");
  lib.require(api.desc_set, "cublasLtMatmulDescSetAttribute");
  lib.require(api.layout_create, "cublasLtMatrixLayoutCreate");
  lib.require(api.layout_destroy, "cublasLtMatrixLayoutDestroy");
  lib.require(api.pref_create, "cublasLtMatmulPreferenceCreate");
  lib.require(api.pref_destroy, "cublasLtMatmulPreferenceDestroy");
  lib.require(api.pref_set, "cublasLtMatmulPreferenceSetAttribute");
  lib.require(api.heuristic, "cublasLtMatmulAlgoGetHeuristic");
  lib.require(api.matmul, "cublasLtMatmul");
  return api;
}

std::atomic<uint64_t> g_fused{0};

const LtApi& lt() {
  static const LtApi api = load_lt();
  return api;
}

// The largest power of two up to 16 that divides the address (cuBLASLt's alignment classes).
int alignment(const void* p) {
  const auto u = reinterpret_cast<uintptr_t>(p);
  int a = 16;
  while (a > 1 && u % static_cast<uintptr_t>(a) != 0) a /= 2;
  return a;
}

int elem_bytes(cudaDataType t) { return t == CUDA_R_32F ? 4 : 2; }

// The alignment of every row of a column-major matrix (its start and its leading dimension).
int matrix_alignment(const void* p, int64_t ld, cudaDataType t) {
  const int a = alignment(p);
  int l = 16;
  while (l > 1 && (ld * elem_bytes(t)) % l != 0) l /= 2;
  return a < l ? a : l;
}

}  // namespace

struct LtMatmul::Plan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  cublasLtMatmulAlgo_t algo{};
  bool ok = false;  // cuBLASLt returned an algorithm

  Plan() = default;
  Plan(const Plan&) = delete;
  Plan& operator=(const Plan&) = delete;
  ~Plan() {
    if (a) (void)lt().layout_destroy(a);
    if (b) (void)lt().layout_destroy(b);
    if (d) (void)lt().layout_destroy(d);
    if (desc) (void)lt().desc_destroy(desc);
  }
};

LtMatmul::LtMatmul(int device, cudaStream_t stream, void* workspace, size_t workspace_bytes)
    : device_(device), stream_(stream), workspace_(workspace), workspace_bytes_(workspace_bytes) {
  DeviceScope scope(device_);
  QTOOL_CUBLAS_CHECK(lt().create(&handle_));
}

LtMatmul::~LtMatmul() {
  plans_.clear();
  if (handle_) {
    int prev = -1;
    (void)cudaGetDevice(&prev);
    (void)cudaSetDevice(device_);
    const cublasStatus_t st = lt().destroy(handle_);
    if (st != CUBLAS_STATUS_SUCCESS)
      std::fprintf(stderr, "qtool: warning: cublasLtDestroy failed: %d\n", static_cast<int>(st));
    if (prev >= 0) (void)cudaSetDevice(prev);
  }
}

LtMatmul::Plan* LtMatmul::plan(const LtGemm& g) {
  const int al_a = matrix_alignment(g.a, g.lda, g.ab), al_b = matrix_alignment(g.b, g.ldb, g.ab),
            al_d = matrix_alignment(g.out, g.ldd, g.d), al_bias = g.bias ? alignment(g.bias) : 0;
  const Key key{g.m,
                g.n,
                g.k,
                g.lda,
                g.ldb,
                g.ldd,
                static_cast<int>(g.ab),
                static_cast<int>(g.d),
                static_cast<int>(g.act),
                al_a,
                al_b,
                al_d,
                al_bias};
  auto it = plans_.find(key);
  if (it != plans_.end()) return it->second.get();
  auto p = std::make_unique<Plan>();
  const LtApi& api = lt();
  QTOOL_CUBLAS_CHECK(api.desc_create(&p->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
  QTOOL_CUBLAS_CHECK(api.desc_set(p->desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
  QTOOL_CUBLAS_CHECK(api.desc_set(p->desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
  cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_DEFAULT;
  if (g.act == LtActivation::GeluTanh)
    epi = g.bias ? CUBLASLT_EPILOGUE_GELU_BIAS : CUBLASLT_EPILOGUE_GELU;
  else if (g.bias)
    epi = CUBLASLT_EPILOGUE_BIAS;
  QTOOL_CUBLAS_CHECK(api.desc_set(p->desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof(epi)));
  if (g.bias) {
    const cudaDataType bt = g.d;
    QTOOL_CUBLAS_CHECK(api.desc_set(p->desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bt, sizeof(bt)));
    QTOOL_CUBLAS_CHECK(api.desc_set(p->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &g.bias, sizeof(g.bias)));
  }
  QTOOL_CUBLAS_CHECK(
      api.layout_create(&p->a, g.ab, static_cast<uint64_t>(g.k), static_cast<uint64_t>(g.m), g.lda));
  QTOOL_CUBLAS_CHECK(
      api.layout_create(&p->b, g.ab, static_cast<uint64_t>(g.k), static_cast<uint64_t>(g.n), g.ldb));
  QTOOL_CUBLAS_CHECK(
      api.layout_create(&p->d, g.d, static_cast<uint64_t>(g.m), static_cast<uint64_t>(g.n), g.ldd));
  cublasLtMatmulPreference_t pref = nullptr;
  QTOOL_CUBLAS_CHECK(api.pref_create(&pref));
  const auto set_pref = [&](cublasLtMatmulPreferenceAttributes_t attr, auto value) {
    return api.pref_set(pref, attr, &value, sizeof(value));
  };
  cublasStatus_t st =
      set_pref(CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, static_cast<uint64_t>(workspace_bytes_));
  if (st == CUBLAS_STATUS_SUCCESS)
    st = set_pref(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, static_cast<uint32_t>(al_a));
  if (st == CUBLAS_STATUS_SUCCESS)
    st = set_pref(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, static_cast<uint32_t>(al_b));
  if (st == CUBLAS_STATUS_SUCCESS)
    st = set_pref(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, static_cast<uint32_t>(al_d));
  if (st == CUBLAS_STATUS_SUCCESS)
    st = set_pref(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, static_cast<uint32_t>(al_d));
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  if (st == CUBLAS_STATUS_SUCCESS)
    st = api.heuristic(handle_, p->desc, p->a, p->b, p->d, p->d, pref, 1, &result, &found);
  (void)api.pref_destroy(pref);
  // No algorithm for this case (CUBLAS_STATUS_NOT_SUPPORTED, or none found): remembered, and the
  // caller takes its own path; any other status is a failure.
  if (st != CUBLAS_STATUS_SUCCESS && st != CUBLAS_STATUS_NOT_SUPPORTED) QTOOL_CUBLAS_CHECK(st);
  p->ok = st == CUBLAS_STATUS_SUCCESS && found > 0 && result.state == CUBLAS_STATUS_SUCCESS;
  if (p->ok) p->algo = result.algo;
  return plans_.emplace(key, std::move(p)).first->second.get();
}

bool LtMatmul::run(const LtGemm& g) {
  if (g.m <= 0 || g.n <= 0 || g.k <= 0) return false;
  DeviceScope scope(device_);
  Plan* p = plan(g);
  if (!p->ok) return false;
  const LtApi& api = lt();
  if (g.bias)
    QTOOL_CUBLAS_CHECK(api.desc_set(p->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &g.bias, sizeof(g.bias)));
  const float alpha = 1.0f, beta = 0.0f;
  QTOOL_CUBLAS_CHECK(api.matmul(handle_, p->desc, &alpha, g.a, p->a, g.b, p->b, &beta, g.out, p->d, g.out,
                                p->d, &p->algo, workspace_, workspace_bytes_, stream_));
  ++runs_;
  if (g.act != LtActivation::None) {
    ++fused_;
    g_fused.fetch_add(1, std::memory_order_relaxed);
  }
  return true;
}

uint64_t lt_fused_activations() { return g_fused.load(); }

}  // namespace qtool::runner::cuda
