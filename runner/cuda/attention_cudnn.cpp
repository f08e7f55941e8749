// cuDNN's fused flash-attention forward through its graph (backend) API, loaded with dlopen, with
// qtool's kernels as the fallback (attention_cudnn.hpp says what and when).
#include "attention_cudnn.hpp"

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "attention_mma.hpp"
#include "qtool/formats/error.hpp"
#include "qtool/runner/cuda_resources.hpp"

#if __has_include(<cudnn_graph.h>)
#include <cudnn_graph.h>
#define QTOOL_HAVE_CUDNN_HEADERS 1
#else
#define QTOOL_HAVE_CUDNN_HEADERS 0
#endif

namespace qtool::runner::cuda {

// --- the choice and the counts ---------------------------------------------------------------------

namespace {

std::atomic<int> g_impl{-1};  // -1: not chosen yet (QTOOL_ATTENTION is read at the first call)
std::atomic<uint64_t> g_own_calls{0};
std::atomic<uint64_t> g_cudnn_calls{0};

AttentionImpl impl_from_env() {
  const char* e = std::getenv("QTOOL_ATTENTION");
  // Unset: auto (cuDNN where it takes the case: 4 to 5 times our kernel's rate at Flux's and
  // Llama's shapes, bench/RESULTS.md).
  if (!e || !*e || std::strcmp(e, "auto") == 0) return AttentionImpl::Auto;
  if (std::strcmp(e, "own") == 0) return AttentionImpl::Own;
  if (std::strcmp(e, "cudnn") == 0) return AttentionImpl::Cudnn;
  fail(ErrorKind::InvalidInput, "environment variable QTOOL_ATTENTION=", e, ": expected auto, own or cudnn");
}

[[maybe_unused]] bool debug_on() {
  static const bool on = [] {
    const char* e = std::getenv("QTOOL_CUDNN_DEBUG");
    return e && *e && std::strcmp(e, "0") != 0;
  }();
  return on;
}

const char* dt_name(int dt) { return dt == fwd::kBf16 ? "bf16" : dt == fwd::kF16 ? "f16" : "f32"; }

// "bf16 b 1 h 24/24 s 4608x4608 d 128 non-causal (ld q 3072 k 3072 v 3072 out 3072)"
std::string describe(const fwd::AttnArgs& a) {
  return str_cat(dt_name(a.q.dt), " b ", a.batch, " h ", a.heads, "/", a.kv_heads, " s ", a.q_len, "x",
                 a.kv_len, " d ", a.head_dim, a.causal ? " causal" : " non-causal", " (ld q ", a.q.ld, " k ",
                 a.k.ld, " v ", a.v.ld, " out ", a.out.ld, ")");
}

bool aligned_view(const fwd::View& v) { return v.data && fwd::aligned_rows(v); }

// [first byte, one past the last byte] a view spans.
std::pair<uintptr_t, uintptr_t> span_of(const fwd::View& v) {
  const uintptr_t p = reinterpret_cast<uintptr_t>(v.data);
  const uint64_t elem = v.dt == fwd::kF32 ? 4 : 2;
  const uint64_t n = v.rows > 0 ? static_cast<uint64_t>((v.rows - 1) * v.ld + v.cols) : 0;
  return {p, p + n * elem};
}

bool overlaps(const fwd::View& a, const fwd::View& b) {
  const auto x = span_of(a), y = span_of(b);
  return x.first < y.second && y.first < x.second;
}

}  // namespace

AttentionImpl attention_impl() {
  int v = g_impl.load();
  if (v < 0) {
    int expected = -1;
    g_impl.compare_exchange_strong(expected, static_cast<int>(impl_from_env()));
    v = g_impl.load();
  }
  return static_cast<AttentionImpl>(v);
}

void set_attention_impl(AttentionImpl impl) { g_impl.store(static_cast<int>(impl)); }

const char* attention_impl_name(AttentionImpl impl) {
  switch (impl) {
    case AttentionImpl::Auto: return "auto";
    case AttentionImpl::Own: return "own";
    case AttentionImpl::Cudnn: return "cudnn";
  }
  return "?";
}

AttentionCounts attention_counts() { return {g_own_calls.load(), g_cudnn_calls.load()}; }

bool CudnnAttention::covers(const fwd::AttnArgs& a) {
  const int dt = a.q.dt;
  return !a.bias.data && !a.mask && (dt == fwd::kBf16 || dt == fwd::kF16) && a.k.dt == dt && a.v.dt == dt &&
         a.out.dt == dt && (a.head_dim == 64 || a.head_dim == 128) && a.batch >= 1 && a.q_len >= 1 &&
         a.kv_len >= 1 && a.heads >= 1 && a.kv_heads >= 1 && a.heads % a.kv_heads == 0 &&
         (!a.causal || a.q_len == a.kv_len) && aligned_view(a.q) && aligned_view(a.k) && aligned_view(a.v) &&
         aligned_view(a.out) && a.q.rows == a.batch * a.q_len && a.out.rows == a.q.rows &&
         a.k.rows == a.batch * a.kv_len && a.v.rows == a.k.rows && a.q.cols == a.heads * a.head_dim &&
         a.out.cols == a.q.cols && a.k.cols == a.kv_heads * a.head_dim && a.v.cols == a.k.cols &&
         !overlaps(a.out, a.q) && !overlaps(a.out, a.k) && !overlaps(a.out, a.v);
}

bool run_attention(CudnnAttention& cudnn, const fwd::AttnArgs& a, cudaStream_t stream,
                   const CudnnAttention::Workspace& workspace) {
  const AttentionImpl impl = attention_impl();
  if (impl != AttentionImpl::Own && CudnnAttention::covers(a)) {
    std::string why;
    if (cudnn.run(a, workspace, &why)) {
      g_cudnn_calls.fetch_add(1);
      return true;
    }
    if (impl == AttentionImpl::Cudnn)
      fail(ErrorKind::Unsupported, "QTOOL_ATTENTION=cudnn: cuDNN does not run attention ", describe(a), ": ",
           why);
  }
  fwd::launch_attention(a, stream);
  g_own_calls.fetch_add(1);
  return false;
}

#if QTOOL_HAVE_CUDNN_HEADERS

// --- loading ---------------------------------------------------------------------------------------

namespace {

// The functions of cuDNN's graph API qtool calls, resolved from libcudnn.so.9 (which forwards them
// to libcudnn_graph.so.9): X(member of CudnnApi, cuDNN's symbol, required).
#define QTOOL_CUDNN_FUNCTIONS(X)                             \
  X(get_version, cudnnGetVersion, true)                      \
  X(get_error_string, cudnnGetErrorString, true)             \
  X(get_last_error_string, cudnnGetLastErrorString, false)   \
  X(create, cudnnCreate, true)                               \
  X(destroy, cudnnDestroy, true)                             \
  X(set_stream, cudnnSetStream, true)                        \
  X(create_descriptor, cudnnBackendCreateDescriptor, true)   \
  X(destroy_descriptor, cudnnBackendDestroyDescriptor, true) \
  X(set_attribute, cudnnBackendSetAttribute, true)           \
  X(get_attribute, cudnnBackendGetAttribute, true)           \
  X(finalize, cudnnBackendFinalize, true)                    \
  X(execute, cudnnBackendExecute, true)

struct CudnnApi {  // a member not required may be null
#define QTOOL_CUDNN_MEMBER(member, symbol, required) decltype(&::symbol) member;
  QTOOL_CUDNN_FUNCTIONS(QTOOL_CUDNN_MEMBER)
#undef QTOOL_CUDNN_MEMBER
};

struct CudnnLoad {
  CudnnApi api{};
  bool ok = false;
  std::string why;   // when not ok
  std::string from;  // the name dlopen took
  size_t version = 0;
};

CudnnLoad load_cudnn() {
  CudnnLoad r;
  const std::string soname = "libcudnn.so." + std::to_string(CUDNN_MAJOR);
  // The toolkit's first (its cuDNN matches the headers qtool was built with and the CUDA runtime),
  // then the loader's search (LD_LIBRARY_PATH, the cache), then the usual folders.
  const LoadedLibrary lib = open_first_library(library_candidates(
      soname, {kBuildToolkitDir, "/usr/local/cuda/lib64", kLoaderSearch, "/usr/local/cuda/lib",
               "/usr/local/cuda/targets/x86_64-linux/lib", "/usr/lib/x86_64-linux-gnu"}));
  if (!lib.handle) {
    r.why = str_cat("cannot load cuDNN (", soname, "): ", lib.first_error);
    return r;
  }
  r.from = lib.name;
  std::string missing;
  CudnnApi& api = r.api;
  auto resolve = [&](auto& fn, const char* name, bool required) {
    if (!resolve_symbol(lib.handle, name, fn) && required)
      missing += str_cat(missing.empty() ? "" : ", ", name);
  };
#define QTOOL_CUDNN_RESOLVE(member, symbol, required) resolve(api.member, #symbol, required);
  QTOOL_CUDNN_FUNCTIONS(QTOOL_CUDNN_RESOLVE)
#undef QTOOL_CUDNN_RESOLVE
  if (!missing.empty()) {
    r.why = str_cat(r.from, " lacks ", missing);
    return r;  // the library stays mapped: harmless, and dlclose of a half-used library is not
  }
  r.version = api.get_version();
  if (r.version < 90000) {
    r.why = str_cat(r.from, " is cuDNN ", r.version / 10000, ".", r.version / 100 % 100, ".", r.version % 100,
                    ": the fused attention path needs 9.0 or later");
    return r;
  }
  r.ok = true;
  return r;
}

const CudnnLoad& cudnn_load() {
  static const CudnnLoad load = [] {
    CudnnLoad l = load_cudnn();
    if (debug_on()) {
      if (l.ok)
        std::fprintf(stderr, "qtool: cuDNN %zu.%zu.%zu loaded from %s (QTOOL_CUDNN_DEBUG)\n",
                     l.version / 10000, l.version / 100 % 100, l.version % 100, l.from.c_str());
      else
        std::fprintf(stderr,
                     "qtool: cuDNN not available, attention uses qtool's kernel: %s (QTOOL_CUDNN_DEBUG)\n",
                     l.why.c_str());
    }
    return l;
  }();
  return load;
}

const CudnnApi& api() { return cudnn_load().api; }

// "CUDNN_STATUS_NOT_SUPPORTED (cuDNN's last error message, when it has one)"
std::string status_text(cudnnStatus_t st) {
  const CudnnApi& a = api();
  std::string s = a.get_error_string ? std::string(a.get_error_string(st)) : str_cat("cudnnStatus_t ", st);
  if (a.get_last_error_string) {
    char buf[2048];
    buf[0] = '\0';
    a.get_last_error_string(buf, sizeof(buf));
    buf[sizeof(buf) - 1] = '\0';
    if (buf[0]) s += str_cat(" (", buf, ")");
  }
  return s;
}

// A failed cuDNN call while building or running a plan: the message names the descriptor, the call
// and the attribute, and gives cuDNN's status and last error message.
struct CudnnFailure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

#define QTOOL_CUDNN_TRY(expr, what)                                                                         \
  do {                                                                                                      \
    const cudnnStatus_t qtool_cudnn_st_ = (expr);                                                           \
    if (qtool_cudnn_st_ != CUDNN_STATUS_SUCCESS)                                                            \
      throw CudnnFailure(::qtool::str_cat(what, ": `", #expr, "` failed: ", status_text(qtool_cudnn_st_))); \
  } while (0)

// One backend descriptor, destroyed with it.
class Desc {
 public:
  Desc(cudnnBackendDescriptorType_t type, std::string name) : name_(std::move(name)) {
    QTOOL_CUDNN_TRY(api().create_descriptor(type, &d_), name_);
  }
  ~Desc() {
    if (!d_) return;
    const cudnnStatus_t st = api().destroy_descriptor(d_);
    if (st != CUDNN_STATUS_SUCCESS)
      std::fprintf(stderr, "qtool: warning: cudnnBackendDestroyDescriptor (%s) failed: %s\n", name_.c_str(),
                   api().get_error_string(st));
  }
  Desc(const Desc&) = delete;
  Desc& operator=(const Desc&) = delete;

  cudnnBackendDescriptor_t get() const { return d_; }
  const std::string& name() const { return name_; }

  void set(cudnnBackendAttributeName_t attr, const char* attr_name, cudnnBackendAttributeType_t type,
           int64_t count, const void* values) {
    QTOOL_CUDNN_TRY(api().set_attribute(d_, attr, type, count, const_cast<void*>(values)),
                    str_cat(name_, ", attribute ", attr_name));
  }
  void set_desc(cudnnBackendAttributeName_t attr, const char* attr_name, const Desc& value) {
    cudnnBackendDescriptor_t v = value.get();
    set(attr, attr_name, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &v);
  }
  void finalize() { QTOOL_CUDNN_TRY(api().finalize(d_), name_); }
  // cudnnBackendFinalize's status, for the callers that go on after a refusal.
  cudnnStatus_t try_finalize() { return api().finalize(d_); }

 private:
  std::string name_;
  cudnnBackendDescriptor_t d_ = nullptr;
};

#define QTOOL_CUDNN_SET(desc, attr, type, count, values) (desc).set(attr, #attr, type, count, values)
#define QTOOL_CUDNN_SET_DESC(desc, attr, value) (desc).set_desc(attr, #attr, value)

// The unique ids of the graph's non-virtual tensors (the variant pack's).
enum : int64_t {
  kUidQ = 1,
  kUidK = 2,
  kUidV = 3,
  kUidO = 4,
  kUidScale = 5,
  kUidNegInf = 6,
  kUidFirstVirtual = 100
};

struct Key {
  int dt;
  int64_t batch, heads, kv_heads, q_len, kv_len, head_dim, ld_q, ld_k, ld_v, ld_o;
  bool causal;
  auto operator<=>(const Key&) const = default;
};

Key key_of(const fwd::AttnArgs& a) {
  return {a.q.dt,     a.batch, a.heads, a.kv_heads, a.q_len,  a.kv_len,
          a.head_dim, a.q.ld,  a.k.ld,  a.v.ld,     a.out.ld, a.causal};
}

// A finalized execution plan and every descriptor it was built from (kept for its lifetime and
// destroyed last-made first), or the reason cuDNN refused the shape.
struct Plan {
  std::vector<std::unique_ptr<Desc>> descs;
  Desc* plan = nullptr;
  int64_t workspace = 0;
  std::string refused;  // non-empty: cuDNN cannot take the shape
  ~Plan() {
    while (!descs.empty()) descs.pop_back();
  }
  // A new descriptor, kept with the others.
  Desc& make(cudnnBackendDescriptorType_t type, std::string name) {
    descs.push_back(std::make_unique<Desc>(type, std::move(name)));
    return *descs.back();
  }
};

using Dims = std::array<int64_t, 4>;

// The graph's data types besides its io type (bf16 or f16): the scores, the indices, the mask.
constexpr cudnnDataType_t kDataF32 = CUDNN_DATA_FLOAT, kDataI32 = CUDNN_DATA_INT32,
                          kDataBool = CUDNN_DATA_BOOLEAN;

// The nodes of an operation graph, made into a plan's descriptors and each finalized as it is
// made: tensors (the virtual ones numbered from kUidFirstVirtual on) and operations, which ops()
// lists in the order they were added.
class GraphBuilder {
 public:
  explicit GraphBuilder(Plan& plan) : plan_(plan) {}

  Desc& tensor(const char* name, int64_t uid, cudnnDataType_t dt, Dims dims, Dims strides, bool is_virtual,
               bool by_value = false) {
    Desc& t = plan_.make(CUDNN_BACKEND_TENSOR_DESCRIPTOR, str_cat("tensor ", name));
    const int64_t alignment = 16;
    QTOOL_CUDNN_SET(t, CUDNN_ATTR_TENSOR_DATA_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &dt);
    QTOOL_CUDNN_SET(t, CUDNN_ATTR_TENSOR_DIMENSIONS, CUDNN_TYPE_INT64, 4, dims.data());
    QTOOL_CUDNN_SET(t, CUDNN_ATTR_TENSOR_STRIDES, CUDNN_TYPE_INT64, 4, strides.data());
    QTOOL_CUDNN_SET(t, CUDNN_ATTR_TENSOR_UNIQUE_ID, CUDNN_TYPE_INT64, 1, &uid);
    QTOOL_CUDNN_SET(t, CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, CUDNN_TYPE_INT64, 1, &alignment);
    if (is_virtual) {
      const bool yes = true;
      QTOOL_CUDNN_SET(t, CUDNN_ATTR_TENSOR_IS_VIRTUAL, CUDNN_TYPE_BOOLEAN, 1, &yes);
    }
    if (by_value) {
      const bool yes = true;
      QTOOL_CUDNN_SET(t, CUDNN_ATTR_TENSOR_IS_BY_VALUE, CUDNN_TYPE_BOOLEAN, 1, &yes);
    }
    t.finalize();
    return t;
  }
  Desc& virt(const char* name, cudnnDataType_t dt, Dims dims, Dims strides) {
    return tensor(name, next_virtual_++, dt, dims, strides, true);
  }

  void matmul(const char* name, const Desc& a, const Desc& b, const Desc& c) {
    operation(
        CUDNN_BACKEND_MATMUL_DESCRIPTOR, CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR, "matmul", name,
        [&](Desc& m) { QTOOL_CUDNN_SET(m, CUDNN_ATTR_MATMUL_COMP_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &kDataF32); },
        [&](Desc& op, const Desc& m) {
          QTOOL_CUDNN_SET_DESC(op, CUDNN_ATTR_OPERATION_MATMUL_ADESC, a);
          QTOOL_CUDNN_SET_DESC(op, CUDNN_ATTR_OPERATION_MATMUL_BDESC, b);
          QTOOL_CUDNN_SET_DESC(op, CUDNN_ATTR_OPERATION_MATMUL_CDESC, c);
          QTOOL_CUDNN_SET_DESC(op, CUDNN_ATTR_OPERATION_MATMUL_DESC, m);
        });
  }
  // y = mode(x [, b] [, t]); gen_index takes `axis`.
  void pointwise(const char* name, cudnnPointwiseMode_t mode, cudnnDataType_t prec, const Desc& x,
                 const Desc* b, const Desc* t, const Desc& y, int64_t axis = -1) {
    operation(
        CUDNN_BACKEND_POINTWISE_DESCRIPTOR, CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR, "pointwise", name,
        [&](Desc& pw) {
          QTOOL_CUDNN_SET(pw, CUDNN_ATTR_POINTWISE_MODE, CUDNN_TYPE_POINTWISE_MODE, 1, &mode);
          QTOOL_CUDNN_SET(pw, CUDNN_ATTR_POINTWISE_MATH_PREC, CUDNN_TYPE_DATA_TYPE, 1, &prec);
          if (mode == CUDNN_POINTWISE_GEN_INDEX)
            QTOOL_CUDNN_SET(pw, CUDNN_ATTR_POINTWISE_AXIS, CUDNN_TYPE_INT64, 1, &axis);
        },
        [&](Desc& op, const Desc& pw) {
          QTOOL_CUDNN_SET_DESC(op, CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, pw);
          QTOOL_CUDNN_SET_DESC(op, CUDNN_ATTR_OPERATION_POINTWISE_XDESC, x);
          if (b) QTOOL_CUDNN_SET_DESC(op, CUDNN_ATTR_OPERATION_POINTWISE_BDESC, *b);
          if (t) QTOOL_CUDNN_SET_DESC(op, CUDNN_ATTR_OPERATION_POINTWISE_TDESC, *t);
          QTOOL_CUDNN_SET_DESC(op, CUDNN_ATTR_OPERATION_POINTWISE_YDESC, y);
          const float one = 1.0f;
          QTOOL_CUDNN_SET(op, CUDNN_ATTR_OPERATION_POINTWISE_ALPHA1, CUDNN_TYPE_FLOAT, 1, &one);
          QTOOL_CUDNN_SET(op, CUDNN_ATTR_OPERATION_POINTWISE_ALPHA2, CUDNN_TYPE_FLOAT, 1, &one);
        });
  }
  void reduction(const char* name, cudnnReduceTensorOp_t kind, const Desc& x, const Desc& y) {
    operation(
        CUDNN_BACKEND_REDUCTION_DESCRIPTOR, CUDNN_BACKEND_OPERATION_REDUCTION_DESCRIPTOR, "reduction", name,
        [&](Desc& r) {
          QTOOL_CUDNN_SET(r, CUDNN_ATTR_REDUCTION_OPERATOR, CUDNN_TYPE_REDUCTION_OPERATOR_TYPE, 1, &kind);
          QTOOL_CUDNN_SET(r, CUDNN_ATTR_REDUCTION_COMP_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &kDataF32);
        },
        [&](Desc& op, const Desc& r) {
          QTOOL_CUDNN_SET_DESC(op, CUDNN_ATTR_OPERATION_REDUCTION_XDESC, x);
          QTOOL_CUDNN_SET_DESC(op, CUDNN_ATTR_OPERATION_REDUCTION_YDESC, y);
          QTOOL_CUDNN_SET_DESC(op, CUDNN_ATTR_OPERATION_REDUCTION_DESC, r);
        });
  }

  const std::vector<cudnnBackendDescriptor_t>& ops() const { return ops_; }

 private:
  // One node of the graph: the descriptor of what it computes (`what_type`, "<kind> <name>", its
  // attributes set by `describe`) and the operation that applies it (`op_type`, "<kind> operation
  // <name>", its tensors and that descriptor set by `connect`), each finalized; the operation joins ops.
  template <typename Describe, typename Connect>
  void operation(cudnnBackendDescriptorType_t what_type, cudnnBackendDescriptorType_t op_type,
                 const char* kind, const char* name, Describe&& describe, Connect&& connect) {
    Desc& what = plan_.make(what_type, str_cat(kind, " ", name));
    describe(what);
    what.finalize();
    Desc& op = plan_.make(op_type, str_cat(kind, " operation ", name));
    connect(op, what);
    op.finalize();
    ops_.push_back(op.get());
  }

  Plan& plan_;
  int64_t next_virtual_ = kUidFirstVirtual;
  std::vector<cudnnBackendDescriptor_t> ops_;
};

// The graph's non-virtual tensors: qtool's token-major views as [b, h, s, d] by strides, K as
// Kᵀ [b, h_kv, d, s_kv], and the scale, passed by value.
struct IoTensors {
  Desc &q, &kt, &v, &o, &scale;
};

IoTensors add_io_tensors(GraphBuilder& g, const Key& k, cudnnDataType_t io) {
  const int64_t b = k.batch, h = k.heads, hk = k.kv_heads, sq = k.q_len, skv = k.kv_len, d = k.head_dim;
  Desc& q = g.tensor("Q", kUidQ, io, {b, h, sq, d}, {sq * k.ld_q, d, k.ld_q, 1}, false);
  Desc& kt = g.tensor("K^T", kUidK, io, {b, hk, d, skv}, {skv * k.ld_k, d, 1, k.ld_k}, false);
  Desc& v = g.tensor("V", kUidV, io, {b, hk, skv, d}, {skv * k.ld_v, d, k.ld_v, 1}, false);
  Desc& o = g.tensor("O", kUidO, io, {b, h, sq, d}, {sq * k.ld_o, d, k.ld_o, 1}, false);
  Desc& scale = g.tensor("attn scale", kUidScale, kDataF32, {1, 1, 1, 1}, {1, 1, 1, 1}, false, true);
  return {q, kt, v, o, scale};
}

// The dense layouts of the scores [b, h, s_q, s_kv] and of their row statistics [b, h, s_q, 1].
struct ScoreLayout {
  Dims s_dims, s_strides, row_dims, row_strides;
};

ScoreLayout score_layout(const Key& k) {
  const int64_t b = k.batch, h = k.heads, sq = k.q_len, skv = k.kv_len;
  return {{b, h, sq, skv}, {h * sq * skv, sq * skv, skv, 1}, {b, h, sq, 1}, {h * sq, sq, 1, 1}};
}

// The logits: S = Q Kᵀ * scale, with k.causal the entries of keys after their query set to -inf.
const Desc& add_scores(GraphBuilder& g, const Key& k, const IoTensors& t, const ScoreLayout& l) {
  Desc& s = g.virt("S = Q K^T", kDataF32, l.s_dims, l.s_strides);
  g.matmul("bmm1", t.q, t.kt, s);
  Desc& s_scaled = g.virt("S * scale", kDataF32, l.s_dims, l.s_strides);
  g.pointwise("attn scale", CUDNN_POINTWISE_MUL, kDataF32, s, &t.scale, nullptr, s_scaled);
  if (!k.causal) return s_scaled;
  // Key col visible to query row iff row >= col (top-left diagonal): the others get -inf.
  Desc& neg_inf = g.tensor("-inf", kUidNegInf, kDataF32, {1, 1, 1, 1}, {1, 1, 1, 1}, false, true);
  Desc& row = g.virt("row index", kDataI32, l.s_dims, l.s_strides);
  g.pointwise("gen row index", CUDNN_POINTWISE_GEN_INDEX, kDataF32, s_scaled, nullptr, nullptr, row, 2);
  Desc& col = g.virt("col index", kDataI32, l.s_dims, l.s_strides);
  g.pointwise("gen col index", CUDNN_POINTWISE_GEN_INDEX, kDataF32, s_scaled, nullptr, nullptr, col, 3);
  Desc& keep = g.virt("row >= col", kDataBool, l.s_dims, l.s_strides);
  g.pointwise("row >= col", CUDNN_POINTWISE_CMP_GE, kDataBool, row, &col, nullptr, keep);
  Desc& masked = g.virt("causal S", kDataF32, l.s_dims, l.s_strides);
  g.pointwise("causal select", CUDNN_POINTWISE_BINARY_SELECT, kDataF32, s_scaled, &neg_inf, &keep, masked);
  return masked;
}

// P = softmax(logits) along the keys: exp(S - row max) / row sum, in the io type.
const Desc& add_softmax(GraphBuilder& g, const Desc& logits, const ScoreLayout& l, cudnnDataType_t io) {
  Desc& m = g.virt("row max", kDataF32, l.row_dims, l.row_strides);
  g.reduction("max", CUDNN_REDUCE_TENSOR_MAX, logits, m);
  Desc& sub = g.virt("S - max", kDataF32, l.s_dims, l.s_strides);
  g.pointwise("sub max", CUDNN_POINTWISE_SUB, kDataF32, logits, &m, nullptr, sub);
  Desc& e = g.virt("exp(S - max)", kDataF32, l.s_dims, l.s_strides);
  g.pointwise("exp", CUDNN_POINTWISE_EXP, kDataF32, sub, nullptr, nullptr, e);
  Desc& sum = g.virt("row sum", kDataF32, l.row_dims, l.row_strides);
  g.reduction("sum", CUDNN_REDUCE_TENSOR_ADD, e, sum);
  // The row statistics max + log(sum), a virtual output: cuDNN's fused attention engines match the
  // softmax only with this branch present (without it the heuristics offer no engine).
  Desc& log_sum = g.virt("log(row sum)", kDataF32, l.row_dims, l.row_strides);
  g.pointwise("log sum", CUDNN_POINTWISE_LOG, kDataF32, sum, nullptr, nullptr, log_sum);
  Desc& stats = g.virt("row max + log(row sum)", kDataF32, l.row_dims, l.row_strides);
  g.pointwise("stats", CUDNN_POINTWISE_ADD, kDataF32, m, &log_sum, nullptr, stats);
  Desc& pr = g.virt("P", io, l.s_dims, l.s_strides);  // bmm2's A operand in the io dtype, as cuDNN requires
  g.pointwise("div sum", CUDNN_POINTWISE_DIV, kDataF32, e, &sum, nullptr, pr);
  return pr;
}

// The SDPA forward graph for `k` (see attention_cudnn.hpp), O = softmax(Q Kᵀ * scale) V, finalized;
// its descriptors go into `p`. Without `graph_only` it names `handle`.
const Desc& add_operation_graph(cudnnHandle_t handle, const Key& k, Plan& p, bool graph_only) {
  const cudnnDataType_t io = k.dt == fwd::kF16 ? CUDNN_DATA_HALF : CUDNN_DATA_BFLOAT16;
  GraphBuilder g(p);
  const IoTensors t = add_io_tensors(g, k, io);
  const ScoreLayout layout = score_layout(k);
  const Desc& logits = add_scores(g, k, t, layout);
  const Desc& pr = add_softmax(g, logits, layout, io);
  g.matmul("bmm2", pr, t.v, t.o);

  Desc& graph = p.make(CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR, "operation graph");
  if (!graph_only) QTOOL_CUDNN_SET(graph, CUDNN_ATTR_OPERATIONGRAPH_HANDLE, CUDNN_TYPE_HANDLE, 1, &handle);
  QTOOL_CUDNN_SET(graph, CUDNN_ATTR_OPERATIONGRAPH_OPS, CUDNN_TYPE_BACKEND_DESCRIPTOR,
                  static_cast<int64_t>(g.ops().size()), g.ops().data());
  graph.finalize();
  return graph;
}

// The engine configurations cuDNN's heuristics (mode A) offer for `graph` (their descriptors go
// into `p`): `configs` holds as many as the heuristics counted, the first `got` of them filled in.
struct EngineConfigs {
  std::vector<cudnnBackendDescriptor_t> configs;
  int64_t got = 0;
};

EngineConfigs engine_configs(const Desc& graph, Plan& p) {
  Desc& heur = p.make(CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR, "engine heuristics (mode A)");
  const cudnnBackendHeurMode_t mode = CUDNN_HEUR_MODE_A;
  QTOOL_CUDNN_SET_DESC(heur, CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, graph);
  QTOOL_CUDNN_SET(heur, CUDNN_ATTR_ENGINEHEUR_MODE, CUDNN_TYPE_HEUR_MODE, 1, &mode);
  heur.finalize();
  int64_t count = 0;
  QTOOL_CUDNN_TRY(api().get_attribute(heur.get(), CUDNN_ATTR_ENGINEHEUR_RESULTS,
                                      CUDNN_TYPE_BACKEND_DESCRIPTOR, 0, &count, nullptr),
                  "engine heuristics (mode A), number of results");
  if (count <= 0) throw CudnnFailure("cuDNN's heuristics (mode A) offer no engine for the attention graph");
  EngineConfigs e;
  for (int64_t i = 0; i < count; ++i)
    e.configs.push_back(p.make(CUDNN_BACKEND_ENGINECFG_DESCRIPTOR, str_cat("engine config ", i)).get());
  QTOOL_CUDNN_TRY(api().get_attribute(heur.get(), CUDNN_ATTR_ENGINEHEUR_RESULTS,
                                      CUDNN_TYPE_BACKEND_DESCRIPTOR, count, &e.got, e.configs.data()),
                  "engine heuristics (mode A), results");
  if (e.got <= 0)
    throw CudnnFailure(str_cat("cuDNN's heuristics (mode A) counted ", count,
                               " engine configurations for the attention graph but returned none"));
  return e;
}

// The execution plan of the first of `e`'s configurations that finalizes with a workspace of at
// most kMaxWorkspaceBytes, into p.plan and p.workspace. Throws CudnnFailure, with the first
// refusal, when none does.
void finalize_plan(cudnnHandle_t handle, const EngineConfigs& e, Plan& p) {
  const int64_t count = static_cast<int64_t>(e.configs.size()), got = e.got;
  std::string first_refusal;
  for (int64_t i = 0; i < got && i < count; ++i) {
    auto plan = std::make_unique<Desc>(CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR,
                                       str_cat("execution plan (engine config ", i, " of ", got, ")"));
    QTOOL_CUDNN_SET(*plan, CUDNN_ATTR_EXECUTION_PLAN_HANDLE, CUDNN_TYPE_HANDLE, 1, &handle);
    QTOOL_CUDNN_SET(*plan, CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1,
                    &e.configs[i]);
    const cudnnStatus_t st = plan->try_finalize();
    if (st != CUDNN_STATUS_SUCCESS) {
      if (first_refusal.empty())
        first_refusal = str_cat(plan->name(), ": finalize failed: ", status_text(st));
      continue;
    }
    int64_t ws = 0, n = 0;
    QTOOL_CUDNN_TRY(api().get_attribute(plan->get(), CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE,
                                        CUDNN_TYPE_INT64, 1, &n, &ws),
                    str_cat(plan->name(), ", workspace size"));
    if (ws < 0 || static_cast<uint64_t>(ws) > CudnnAttention::kMaxWorkspaceBytes) {
      if (first_refusal.empty())
        first_refusal = str_cat(plan->name(), " wants ", ws, " bytes of workspace, more than the ",
                                CudnnAttention::kMaxWorkspaceBytes, " allowed");
      continue;
    }
    p.workspace = ws;
    p.plan = plan.get();
    p.descs.push_back(std::move(plan));
    return;
  }
  throw CudnnFailure(str_cat("no engine configuration of ", got, " finalizes; the first: ", first_refusal));
}

// The SDPA forward graph (see attention_cudnn.hpp) for `k`, finalized into an execution plan with the
// first engine configuration of cuDNN's heuristics (mode A) that finalizes with a workspace of at
// most kMaxWorkspaceBytes. Throws CudnnFailure when there is none.
void build_plan(cudnnHandle_t handle, const Key& k, Plan& p, bool graph_only = false) {
  const Desc& graph = add_operation_graph(handle, k, p, graph_only);
  if (graph_only) return;
  finalize_plan(handle, engine_configs(graph, p), p);
}

}  // namespace

struct CudnnAttention::Impl {
  int device;
  cudaStream_t stream;
  cudnnHandle_t handle = nullptr;
  std::string handle_error;  // non-empty: cudnnCreate failed (not tried again)
  std::map<Key, std::unique_ptr<Plan>> plans;
  size_t built = 0, refused = 0;

  ~Impl() {
    if (!handle) return;
    try {
      DeviceScope scope(device);
      plans.clear();  // the descriptors before the handle they name
      const cudnnStatus_t st = api().destroy(handle);
      if (st != CUDNN_STATUS_SUCCESS)
        std::fprintf(stderr, "qtool: warning: cudnnDestroy failed: %s\n", api().get_error_string(st));
    } catch (const std::exception& e) {
      std::fprintf(stderr, "qtool: warning: releasing cuDNN: %s\n", e.what());
    }
  }

  bool ensure_handle(std::string* why) {
    if (handle) return true;
    if (handle_error.empty()) {
      cudnnHandle_t h = nullptr;
      cudnnStatus_t st = api().create(&h);
      if (st != CUDNN_STATUS_SUCCESS) {
        handle_error = str_cat("cudnnCreate failed on device ", device, ": ", status_text(st));
      } else if ((st = api().set_stream(h, stream)) != CUDNN_STATUS_SUCCESS) {
        handle_error = str_cat("cudnnSetStream failed on device ", device, ": ", status_text(st));
        (void)api().destroy(h);
      } else {
        handle = h;
        return true;
      }
      if (debug_on())
        std::fprintf(stderr, "qtool: cuDNN attention off on device %d: %s (QTOOL_CUDNN_DEBUG)\n", device,
                     handle_error.c_str());
    }
    *why = handle_error;
    return false;
  }
};

CudnnAttention::CudnnAttention(int device, cudaStream_t stream) : impl_(std::make_unique<Impl>()) {
  impl_->device = device;
  impl_->stream = stream;
}

CudnnAttention::~CudnnAttention() = default;

size_t CudnnAttention::plans_built() const { return impl_->built; }
size_t CudnnAttention::shapes_refused() const { return impl_->refused; }

bool CudnnAttention::run(const fwd::AttnArgs& a, const Workspace& workspace, std::string* why) {
  QTOOL_ASSERT_MSG(covers(a), "cuDNN attention given a case it does not cover: ", describe(a));
  std::string local;
  std::string& reason = why ? *why : local;
  const CudnnLoad& load = cudnn_load();
  if (!load.ok) {
    reason = load.why;
    return false;
  }
  DeviceScope scope(impl_->device);
  if (!impl_->ensure_handle(&reason)) return false;
  const Key key = key_of(a);
  auto it = impl_->plans.find(key);
  if (it == impl_->plans.end()) {
    auto plan = std::make_unique<Plan>();
    const auto t0 = std::chrono::steady_clock::now();
    try {
      build_plan(impl_->handle, key, *plan);
      ++impl_->built;
      if (debug_on())
        std::fprintf(
            stderr, "qtool: cuDNN attention plan for %s: %s, workspace %lld bytes, built in %.1f ms\n",
            describe(a).c_str(), plan->plan->name().c_str(), static_cast<long long>(plan->workspace),
            std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    } catch (const CudnnFailure& e) {
      auto refused = std::make_unique<Plan>();  // the partial descriptors go with `plan`
      refused->refused = e.what();
      plan = std::move(refused);
      ++impl_->refused;
      if (debug_on())
        std::fprintf(stderr, "qtool: cuDNN attention cannot take %s, qtool's kernel serves it: %s\n",
                     describe(a).c_str(), plan->refused.c_str());
    }
    it = impl_->plans.emplace(key, std::move(plan)).first;
  }
  const Plan& p = *it->second;
  if (!p.refused.empty()) {
    reason = p.refused;
    return false;
  }
  void* ws = nullptr;
  if (p.workspace > 0) {
    ws = workspace ? workspace(static_cast<uint64_t>(p.workspace)) : nullptr;
    if (!ws) {
      reason = str_cat("the plan's ", p.workspace, " bytes of workspace are not available");
      return false;
    }
  }
  // The scalars passed by value: read from host memory when the plan launches.
  const float scale = a.scale;
  const float neg_inf =
      load.version < 91000 ? std::numeric_limits<float>::lowest() : -std::numeric_limits<float>::infinity();
  std::vector<int64_t> uids = {kUidQ, kUidK, kUidV, kUidO, kUidScale};
  std::vector<void*> ptrs = {a.q.data, a.k.data, a.v.data, a.out.data, const_cast<float*>(&scale)};
  if (a.causal) {
    uids.push_back(kUidNegInf);
    ptrs.push_back(const_cast<float*>(&neg_inf));
  }
  try {
    Desc pack(CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR, "variant pack");
    QTOOL_CUDNN_SET(pack, CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, CUDNN_TYPE_INT64,
                    static_cast<int64_t>(uids.size()), uids.data());
    QTOOL_CUDNN_SET(pack, CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS, CUDNN_TYPE_VOID_PTR,
                    static_cast<int64_t>(ptrs.size()), ptrs.data());
    QTOOL_CUDNN_SET(pack, CUDNN_ATTR_VARIANT_PACK_WORKSPACE, CUDNN_TYPE_VOID_PTR, 1, &ws);
    pack.finalize();
    QTOOL_CUDNN_TRY(api().execute(impl_->handle, p.plan->get(), pack.get()), "executing the attention plan");
  } catch (const CudnnFailure& e) {
    fail(ErrorKind::Internal, "cuDNN attention ", describe(a), " on device ", impl_->device, ": ", e.what());
  }
  return true;
}

bool cudnn_available(std::string* why) {
  const CudnnLoad& l = cudnn_load();
  if (!l.ok && why) *why = l.why;
  return l.ok;
}

size_t cudnn_version() {
  const CudnnLoad& l = cudnn_load();
  return l.ok ? l.version : 0;
}

std::string cudnn_check_graph(const fwd::AttnArgs& a) {
  if (!cudnn_load().ok) return cudnn_load().why;
  try {
    Plan p;
    build_plan(nullptr, key_of(a), p, true);
  } catch (const CudnnFailure& e) {
    return e.what();
  }
  return {};
}

std::string cudnn_description() {
  const CudnnLoad& l = cudnn_load();
  if (!l.ok) return str_cat("cuDNN not available: ", l.why);
  return str_cat("cuDNN ", l.version / 10000, ".", l.version / 100 % 100, ".", l.version % 100, " (", l.from,
                 "; built against ", CUDNN_MAJOR, ".", CUDNN_MINOR, ".", CUDNN_PATCHLEVEL, ")");
}

#else  // no cuDNN headers in the toolkit qtool was built with: the path is compiled out

struct CudnnAttention::Impl {};

CudnnAttention::CudnnAttention(int, cudaStream_t) {}
CudnnAttention::~CudnnAttention() = default;
size_t CudnnAttention::plans_built() const { return 0; }
size_t CudnnAttention::shapes_refused() const { return 0; }

bool CudnnAttention::run(const fwd::AttnArgs& a, const Workspace&, std::string* why) {
  QTOOL_ASSERT_MSG(covers(a), "cuDNN attention given a case it does not cover: ", describe(a));
  if (why) *why = "qtool was built without cuDNN's headers (cudnn_graph.h)";
  return false;
}

bool cudnn_available(std::string* why) {
  if (why) *why = "qtool was built without cuDNN's headers (cudnn_graph.h)";
  return false;
}

size_t cudnn_version() { return 0; }

std::string cudnn_check_graph(const fwd::AttnArgs&) { return "qtool was built without cuDNN's headers"; }

std::string cudnn_description() { return "cuDNN not available: qtool was built without cuDNN's headers"; }

#endif

}  // namespace qtool::runner::cuda
