// What every kernel source shares: the thread pool's interface (parallel_for), the float math (exp, erfc, GELU),
// the shape checks of the entry points and the PVT_ENTRY macro that wraps each kernel in them. The sources that
// include it are listed in KERNEL_SOURCES (pvt_dense/models/kernel_library.py), which compiles them into one library.
#pragma once

#include <sched.h>
#include <unistd.h>
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <exception>
#include <functional>
#include <mutex>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#ifdef PVT_HAVE_DNNL
// oneDNN's row-major sgemm, from the libdnnl that ships inside MindSpore's CPU wheel: C = alpha op(A) op(B) + beta C.
// It runs on the calling thread (MindSpore builds oneDNN with its threadpool runtime), so the kernels below split
// the work over their own threads.
extern "C" int dnnl_sgemm(char transa, char transb, int64_t m, int64_t n, int64_t k, float alpha, const float *a,
                          int64_t lda, const float *b, int64_t ldb, float beta, float *c, int64_t ldc);
#endif

// thread_pool.cc holds the one pool of the library (its state must exist once, not once per source). Hidden: the
// library exports only the entry points.
namespace pvt {
__attribute__((visibility("hidden"))) int thread_count();
// Runs task(c) for c in [0, chunks) on a pool of `threads` threads (this one included) when the pool is free,
// else all on this thread.
__attribute__((visibility("hidden"))) void run_chunks(int threads, int64_t chunks,
                                                      const std::function<void(int64_t)> &task);
#ifdef PVT_HAVE_DNNL
// winograd.cc: y = ReLU?(conv3x3(x, wt) + b) with stride 1 and padding 1, x (batch, c, h, w), wt (o, c, 3, 3),
// y (batch, o, h, w), by Winograd's F(2 x 2, 3 x 3); 0, 2 when an sgemm failed, or -1 without computing anything
// when the map is too small for it to pay (the caller convolves directly).
__attribute__((visibility("hidden"))) int winograd_conv3x3(int64_t batch, int64_t c, int64_t h, int64_t w,
                                                           int64_t o, const float *x, const float *wt,
                                                           const float *b, bool relu, float *y);
#endif
}  // namespace pvt

// Internal linkage, as when the kernels were one file: each source inlines its own copy and the library exports
// only the entry points.
namespace {

using pvt::thread_count;

// Runs body(begin, end, slot) over [0, n) in contiguous chunks of at least `grain` items, at most one chunk per
// thread; slot is the chunk's index (< thread_count()), for per-chunk partial sums.
template <class Body>
void parallel_for(int64_t n, int64_t grain, const Body &body) {
  const int threads = thread_count();
  int64_t chunks = n / (grain > 0 ? grain : 1);
  if (chunks > threads) chunks = threads;
  if (chunks <= 1) {
    body(0, n, 0);
    return;
  }
  const int64_t step = (n + chunks - 1) / chunks;
  const std::function<void(int64_t)> chunk = [&](int64_t c) {
    const int64_t begin = c * step, end = begin + step < n ? begin + step : n;
    if (begin < end) body(begin, end, static_cast<int>(c));
  };
  pvt::run_chunks(threads, chunks, chunk);
}

inline float as_float(int32_t i) { float f; std::memcpy(&f, &i, sizeof f); return f; }

// exp(a) for a in [-87, 88] (0 below, e^88 above), ~1 ulp; branch-free so loops vectorise.
inline float exp_clamped(float a_in) {
  float a = a_in < -87.0f ? -87.0f : a_in;
  a = a > 88.0f ? 88.0f : a;
  // Round a / ln2 to the nearest integer with the 1.5 * 2^23 shifter (exact for |a / ln2| < 2^22).
  const float n = (a * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = a - n * 0.693145751953125f;  // ln2 split in two so r is exact to float precision
  r = r - n * 1.42860682030941723212e-6f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const float value = p * as_float((static_cast<int32_t>(n) + 127) << 23);
  return a_in < -87.0f ? 0.0f : value;  // below e^-87 flush to zero instead of returning e^-87
}

// erfc(a) for a >= 0 as t * exp(-a^2 + P(t)), t = 1 / (1 + a/2): relative error ~1e-7 over the float range.
// P: least squares on ln(erfcx(a) / t) for a in [0, 10], reweighted toward minimax (max error 4.5e-8).
inline float erfc_nonneg(float a) {
  const float t = 1.0f / (1.0f + 0.5f * a);
  float p = 1.422023271e-01f;
  p = p * t - 6.660994638e-01f;
  p = p * t + 1.122468556e+00f;
  p = p * t - 6.513143240e-01f;
  p = p * t - 1.167530199e-01f;
  p = p * t + 2.018824575e-02f;
  p = p * t + 2.835616645e-02f;
  p = p * t + 3.879006575e-01f;
  p = p * t + 9.984923255e-01f;
  p = p * t - 1.265441425e+00f;
  return t * exp_clamped(std::fma(-a, a, p));
}

constexpr float kSqrtHalf = 0.70710678118654752440f;
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;

// GELU(x) = 0.5 x erfc(-x / sqrt(2)); erfc of a non-positive argument is 2 - erfc(|.|).
inline float gelu(float x) {
  const float z = -x * kSqrtHalf;
  const float e = erfc_nonneg(std::fabs(z));
  const float c = z >= 0.0f ? e : 2.0f - e;
  return 0.5f * x * c;
}

// d GELU / dx = Phi(x) + x phi(x).
inline float gelu_grad(float x) {
  const float z = -x * kSqrtHalf;
  const float a = std::fabs(z);
  const float e = erfc_nonneg(a);
  const float cdf = 0.5f * (z >= 0.0f ? e : 2.0f - e);
  const float pdf = a < 14.0f ? kInvSqrt2Pi * exp_clamped(-a * a) : 0.0f;
  return cdf + x * pdf;
}

inline bool all_float32(int count, const char **dtypes) {
  for (int i = 0; i < count; ++i)
    if (std::strcmp(dtypes[i], "float32") != 0 && std::strcmp(dtypes[i], "float") != 0) return false;
  return true;
}

inline int64_t element_count(int ndim, const int64_t *shape) {
  int64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= shape[i];
  return n;
}

constexpr int64_t kElementGrain = 1 << 15;

// Shape checks for the entry points: MindSpore passes every input's and output's shape; a kernel called with
// shapes that do not fit together would read or write out of bounds, so it refuses them (non-zero status) instead.
inline bool well_formed(int nparam, const int *ndims, int64_t **shapes) {
  for (int i = 0; i < nparam; ++i) {
    if (ndims[i] < 0 || ndims[i] > 16) return false;
    for (int a = 0; a < ndims[i]; ++a)
      if (shapes[i][a] < 0) return false;
  }
  return true;
}

inline bool same_shape(const int *ndims, int64_t **shapes, int a, int b) {
  if (ndims[a] != ndims[b]) return false;
  for (int i = 0; i < ndims[a]; ++i)
    if (shapes[a][i] != shapes[b][i]) return false;
  return true;
}

// Tensor `i` is a vector of `length` values.
inline bool is_vector(const int *ndims, int64_t **shapes, int i, int64_t length) {
  return ndims[i] == 1 && shapes[i][0] == length;
}

// Tensors a and b have the same rank and agree on every axis except the last `skip_last`.
inline bool same_leading(const int *ndims, int64_t **shapes, int a, int b, int skip_last) {
  if (ndims[a] != ndims[b] || ndims[a] < skip_last) return false;
  for (int i = 0; i < ndims[a] - skip_last; ++i)
    if (shapes[a][i] != shapes[b][i]) return false;
  return true;
}

inline int64_t last(const int *ndims, int64_t **shapes, int i) { return shapes[i][ndims[i] - 1]; }

// Exceptions (std::bad_alloc from a scratch buffer) must not cross the C interface.
template <class Kernel>
int guarded(const Kernel &kernel) {
  try {
    return kernel();
  } catch (...) {
    return 3;
  }
}

}  // namespace

// The entry points MindSpore calls (ops.Custom "library:Name", func_type="aot"): status 0 on success, 1 for
// tensors this kernel does not take (count, dtype or shapes), 2 for a failed sgemm, 3 for an exception.
#define PVT_ENTRY(name, count, shapes_fit)                                                                       \
  int name(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *extra,           \
           void *stream) {                                                                                      \
    if (nparam != (count) || params == nullptr || ndims == nullptr || shapes == nullptr || dtypes == nullptr ||   \
        !all_float32(count, dtypes) || !well_formed(count, ndims, shapes) || !(shapes_fit))                     \
      return 1;                                                                                                 \
    return guarded([&] { return name##Unchecked(nparam, params, ndims, shapes, dtypes, extra, stream); });       \
  }
