"""Exact GELU, LayerNorm and Linear for MindSpore on the CPU, as fused C++ kernels (`ops.Custom`, func_type="aot").

Why: in MindSpore 2.10 graph mode on the CPU, exact (erf) `nn.GELU` becomes Erf, Div, Mul and Add kernels that
take ~45% of the PVT-Tiny forward (batch 8, 224x224: ~290 of ~650 ms of op time); on the stage-1 MLP activation
(25088, 512) it costs ~200 ms where PyTorch's GELU costs ~30 ms. An element-wise composite accurate to 1e-6 needs
about as many passes (one multiply on that tensor: ~10 ms), so it cannot win. One fused pass can: the GELU kernel
below takes ~23 ms there (~11 ms inside the model graph), its backward ~13 ms. `nn.LayerNorm` is already cheap in
a graph's forward; the LayerNorm kernel's gain is in the backward (~7 vs ~78 ms on (8, 3136, 64), op level).

Linear (`Dense`): oneDNN's sgemm from the libdnnl inside MindSpore's CPU wheel, with the bias fused and the rows
split over this library's threads; backward gives dx, dW and db (summed in double) in one kernel. Single-threaded
PVT-Tiny forward CPU time, MatMul + BiasAdd -> this kernel: 117 -> 107 ms at batch 1, 1192 -> 992 ms at batch 8
(224x224). Attention (`PvtAttention`): softmax(q k^T) v in blocks of 64 query rows with the same sgemm, so the
score matrix is never stored (800x1344 has 67200 x 1050 scores per stage-1 block); its backward recomputes the
probabilities with MindSpore ops. Single-threaded CPU time vs BatchMatMul + Softmax: PVT-Tiny forward 758 -> 702 ms
(224x224, batch 8), 3554 -> 3239 ms (800x1344). Without libdnnl only GELU and LayerNorm are compiled.

Accuracy (float32; measured against float64 references, see tests/test_fast_ops.py and tests/test_fast_dense.py):
- GELU(x) = x/2 * erfc(-x/sqrt 2), with erfc(a) = t * exp(-a^2 + P(t)), t = 1/(1 + a/2) and P a degree-9
  polynomial fitted for this file (relative error of erfc ~1e-7 down to the float range). Max abs error 4e-7
  on |x| <= 12 (PyTorch's own CPU GELU: 4e-7), exact 0/x tails, NaN/inf as PyTorch. The gradient
  Phi(x) + x phi(x) has max abs error 2e-7.
- LayerNorm: two-pass mean and biased variance per row, eps inside the square root, as `nn.LayerNorm`.
  The backward recomputes the row statistics instead of storing them and sums dgamma/dbeta in double.

The kernels are compiled with the system C++ compiler at first use and cached under `$PVT_DENSE_CACHE_DIR`, or
`$XDG_CACHE_HOME/pvt_dense`, or `~/.cache/pvt_dense` (file name keyed by a hash of the source and the flags).
When they are unavailable (no compiler, a device target other than CPU, a non-float32 input, or
`PVT_DENSE_FAST_OPS=0`), both Cells fall back to MindSpore's own operators with the same semantics (a failed
compile warns once, saying why). `PVT_DENSE_NUM_THREADS` caps the kernels' threads (default: the CPUs this process
may use). A graph exported with `mindspore.export` refers to the compiled library by path: export with
`PVT_DENSE_FAST_OPS=0` for a MINDIR that runs elsewhere.
"""
import contextlib
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import initializer

ENV_SWITCH = "PVT_DENSE_FAST_OPS"
ENV_CACHE_DIR = "PVT_DENSE_CACHE_DIR"

_SOURCE = r"""// Fused float32 CPU kernels, exact GELU and LayerNorm, for MindSpore ops.Custom(func_type="aot").
#include <sched.h>
#include <atomic>
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

namespace {

int thread_count() {
  static const int count = [] {
    const char *env = std::getenv("PVT_DENSE_NUM_THREADS");
    if (env != nullptr && std::atoi(env) > 0) return std::atoi(env);
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0 && CPU_COUNT(&set) > 0) return CPU_COUNT(&set);
    unsigned hw = std::thread::hardware_concurrency();
    return hw > 0 ? static_cast<int>(hw) : 1;
  }();
  return count;
}

// Runs body(begin, end) over [0, n) in contiguous chunks of at least `grain` items, one chunk per thread.
template <class Body>
void parallel_for(int64_t n, int64_t grain, const Body &body) {
  int64_t chunks = n / (grain > 0 ? grain : 1);
  if (chunks > thread_count()) chunks = thread_count();
  if (chunks <= 1) {
    body(0, n, 0);
    return;
  }
  const int64_t step = (n + chunks - 1) / chunks;
  std::vector<std::thread> workers;
  int64_t launched = 1;
  try {
    for (int64_t c = 1; c < chunks; ++c, ++launched) {
      const int64_t begin = c * step, end = begin + step < n ? begin + step : n;
      workers.emplace_back([&body, begin, end, c] { body(begin, end, static_cast<int>(c)); });
    }
  } catch (...) {
    // Could not start a thread: do the remaining chunks here.
    for (int64_t c = launched; c < chunks; ++c) {
      const int64_t begin = c * step, end = begin + step < n ? begin + step : n;
      body(begin, end, static_cast<int>(c));
    }
  }
  body(0, step < n ? step : n, 0);
  for (auto &w : workers) w.join();
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

bool all_float32(int count, const char **dtypes) {
  for (int i = 0; i < count; ++i)
    if (std::strcmp(dtypes[i], "float32") != 0 && std::strcmp(dtypes[i], "float") != 0) return false;
  return true;
}

int64_t element_count(int ndim, const int64_t *shape) {
  int64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= shape[i];
  return n;
}

constexpr int64_t kElementGrain = 1 << 15;

struct RowStats {
  float mean, rstd;
};

inline RowStats row_stats(const float *__restrict x, int64_t cols, float eps) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < cols; ++j) sum += x[j];
  const float mean = sum / static_cast<float>(cols);
  float sq = 0.0f;
#pragma omp simd reduction(+ : sq)
  for (int64_t j = 0; j < cols; ++j) {
    const float d = x[j] - mean;
    sq += d * d;
  }
  const float var = sq / static_cast<float>(cols);
  return {mean, 1.0f / std::sqrt(var + eps)};
}

}  // namespace

extern "C" {

// inputs: x; output: y = GELU(x).
int PvtGelu(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (nparam != 2 || !all_float32(2, dtypes)) return 1;
  const float *__restrict x = static_cast<const float *>(params[0]);
  float *__restrict y = static_cast<float *>(params[1]);
  parallel_for(element_count(ndims[0], shapes[0]), kElementGrain, [&](int64_t b, int64_t e, int) {
#pragma omp simd
    for (int64_t i = b; i < e; ++i) y[i] = gelu(x[i]);
  });
  return 0;
}

// inputs: x, dy; output: dx = dy * GELU'(x).
int PvtGeluGrad(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (nparam != 3 || !all_float32(3, dtypes)) return 1;
  const float *__restrict x = static_cast<const float *>(params[0]);
  const float *__restrict dy = static_cast<const float *>(params[1]);
  float *__restrict dx = static_cast<float *>(params[2]);
  parallel_for(element_count(ndims[0], shapes[0]), kElementGrain, [&](int64_t b, int64_t e, int) {
#pragma omp simd
    for (int64_t i = b; i < e; ++i) dx[i] = dy[i] * gelu_grad(x[i]);
  });
  return 0;
}

// inputs: x (..., C), gamma (C), beta (C), eps (1); output: y. Normalises over the last axis.
int PvtLayerNorm(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (nparam != 5 || !all_float32(5, dtypes)) return 1;
  const float *__restrict x = static_cast<const float *>(params[0]);
  const float *__restrict gamma = static_cast<const float *>(params[1]);
  const float *__restrict beta = static_cast<const float *>(params[2]);
  const float eps = *static_cast<const float *>(params[3]);
  float *__restrict y = static_cast<float *>(params[4]);
  const int64_t cols = shapes[0][ndims[0] - 1];
  const int64_t rows = cols > 0 ? element_count(ndims[0], shapes[0]) / cols : 0;
  parallel_for(rows, 1 + kElementGrain / (cols > 0 ? cols : 1), [&](int64_t b, int64_t e, int) {
    for (int64_t r = b; r < e; ++r) {
      const float *__restrict xr = x + r * cols;
      float *__restrict yr = y + r * cols;
      const RowStats s = row_stats(xr, cols, eps);
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) yr[j] = (xr[j] - s.mean) * s.rstd * gamma[j] + beta[j];
    }
  });
  return 0;
}

// inputs: x, gamma, dy, eps; outputs: dx, dgamma, dbeta.
int PvtLayerNormGrad(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (nparam != 7 || !all_float32(7, dtypes)) return 1;
  const float *__restrict x = static_cast<const float *>(params[0]);
  const float *__restrict gamma = static_cast<const float *>(params[1]);
  const float *__restrict dy = static_cast<const float *>(params[2]);
  const float eps = *static_cast<const float *>(params[3]);
  float *__restrict dx = static_cast<float *>(params[4]);
  float *__restrict dgamma = static_cast<float *>(params[5]);
  float *__restrict dbeta = static_cast<float *>(params[6]);
  const int64_t cols = shapes[0][ndims[0] - 1];
  const int64_t rows = cols > 0 ? element_count(ndims[0], shapes[0]) / cols : 0;
  const int slots = thread_count();
  // dgamma and dbeta sum over all rows (25088 at stage 1, batch 8): accumulate in double.
  std::vector<double> partial(static_cast<size_t>(slots) * 2 * cols, 0.0);
  parallel_for(rows, 1 + kElementGrain / (cols > 0 ? cols : 1), [&](int64_t b, int64_t e, int slot) {
    double *__restrict pg = partial.data() + static_cast<size_t>(slot) * 2 * cols;
    double *__restrict pb = pg + cols;
    for (int64_t r = b; r < e; ++r) {
      const float *__restrict xr = x + r * cols;
      const float *__restrict dyr = dy + r * cols;
      float *__restrict dxr = dx + r * cols;
      const RowStats s = row_stats(xr, cols, eps);
      float sum_g = 0.0f, sum_gx = 0.0f;
#pragma omp simd reduction(+ : sum_g, sum_gx)
      for (int64_t j = 0; j < cols; ++j) {
        const float xhat = (xr[j] - s.mean) * s.rstd;
        const float g = dyr[j] * gamma[j];
        sum_g += g;
        sum_gx += g * xhat;
        pg[j] += dyr[j] * xhat;
        pb[j] += dyr[j];
      }
      const float mean_g = sum_g / static_cast<float>(cols), mean_gx = sum_gx / static_cast<float>(cols);
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) {
        const float xhat = (xr[j] - s.mean) * s.rstd;
        dxr[j] = s.rstd * (dyr[j] * gamma[j] - mean_g - xhat * mean_gx);
      }
    }
  });
  for (int64_t j = 0; j < cols; ++j) {
    double g = 0.0, bsum = 0.0;
    for (int s = 0; s < slots; ++s) {
      g += partial[static_cast<size_t>(s) * 2 * cols + j];
      bsum += partial[static_cast<size_t>(s) * 2 * cols + cols + j];
    }
    dgamma[j] = static_cast<float>(g);
    dbeta[j] = static_cast<float>(bsum);
  }
  return 0;
}

#ifdef PVT_HAVE_DNNL
// Rows of a (rows x cols) matrix per thread so that each sgemm call still gets a well-shaped block.
constexpr int64_t kGemmRowGrain = 64;

// inputs: x (..., K), w (N, K), b (N); output: y (..., N) = x w^T + b, as nn.Dense (weight layout (out, in)).
int PvtDense(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (nparam != 4 || !all_float32(4, dtypes)) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *w = static_cast<const float *>(params[1]);
  const float *b = static_cast<const float *>(params[2]);
  float *y = static_cast<float *>(params[3]);
  const int64_t k = shapes[0][ndims[0] - 1], n = shapes[1][0];
  const int64_t m = k > 0 ? element_count(ndims[0], shapes[0]) / k : 0;
  if (m == 0 || n == 0) return 0;
  std::atomic<int> status{0};
  if (m >= 2 * kGemmRowGrain || n < 2 * kGemmRowGrain) {
    parallel_for(m, kGemmRowGrain, [&](int64_t r0, int64_t r1, int) {
      for (int64_t r = r0; r < r1; ++r) std::memcpy(y + r * n, b, sizeof(float) * n);
      if (dnnl_sgemm('N', 'T', r1 - r0, n, k, 1.0f, x + r0 * k, k, w, k, 1.0f, y + r0 * n, n) != 0) status = 2;
    });
  } else {  // few rows (a late stage at batch 1): split the output features instead
    for (int64_t r = 0; r < m; ++r) std::memcpy(y + r * n, b, sizeof(float) * n);
    parallel_for(n, kGemmRowGrain, [&](int64_t c0, int64_t c1, int) {
      if (dnnl_sgemm('N', 'T', m, c1 - c0, k, 1.0f, x, k, w + c0 * k, k, 1.0f, y + c0, n) != 0) status = 2;
    });
  }
  return status.load();
}

// inputs: x (..., K), w (N, K), dy (..., N); outputs: dx = dy w, dw = dy^T x, db = sum of dy over rows.
int PvtDenseGrad(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (nparam != 6 || !all_float32(6, dtypes)) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *w = static_cast<const float *>(params[1]);
  const float *dy = static_cast<const float *>(params[2]);
  float *dx = static_cast<float *>(params[3]);
  float *dw = static_cast<float *>(params[4]);
  float *db = static_cast<float *>(params[5]);
  const int64_t k = shapes[0][ndims[0] - 1], n = shapes[1][0];
  const int64_t m = k > 0 ? element_count(ndims[0], shapes[0]) / k : 0;
  std::memset(dw, 0, sizeof(float) * n * k);
  if (m == 0 || n == 0) {
    std::memset(db, 0, sizeof(float) * n);
    if (m > 0) std::memset(dx, 0, sizeof(float) * m * k);
    return 0;
  }
  std::atomic<int> status{0};
  parallel_for(m, kGemmRowGrain, [&](int64_t r0, int64_t r1, int) {
    if (dnnl_sgemm('N', 'N', r1 - r0, k, n, 1.0f, dy + r0 * n, n, w, k, 0.0f, dx + r0 * k, k) != 0) status = 2;
  });
  // dw rows are independent: each thread owns a band of output features and reads all rows of dy and x.
  parallel_for(n, 16, [&](int64_t c0, int64_t c1, int) {
    if (dnnl_sgemm('T', 'N', c1 - c0, k, m, 1.0f, dy + c0, n, x, k, 0.0f, dw + c0 * k, k) != 0) status = 2;
  });
  // db sums up to ~10^5 rows: accumulate in double, one partial row per thread.
  const int slots = thread_count();
  std::vector<double> partial(static_cast<size_t>(slots) * n, 0.0);
  parallel_for(m, 1 + kElementGrain / n, [&](int64_t r0, int64_t r1, int slot) {
    double *__restrict acc = partial.data() + static_cast<size_t>(slot) * n;
    for (int64_t r = r0; r < r1; ++r) {
      const float *__restrict row = dy + r * n;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) acc[j] += row[j];
    }
  });
  for (int64_t j = 0; j < n; ++j) {
    double total = 0.0;
    for (int s = 0; s < slots; ++s) total += partial[static_cast<size_t>(s) * n + j];
    db[j] = static_cast<float>(total);
  }
  return status.load();
}

// inputs: q (..., N, D), k (..., M, D), v (..., M, D), leading axes equal; output: softmax(q k^T) v (..., N, D).
// Blocks of 64 query rows: scores (64 x M) in a per-thread buffer, softmax in place, then times v, so the
// N x M score matrix is never stored (at 800x1344 it would be 67200 x 1050 per stage-1 block).
int PvtAttention(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (nparam != 4 || !all_float32(4, dtypes) || ndims[0] < 2) return 1;
  const float *q = static_cast<const float *>(params[0]);
  const float *k = static_cast<const float *>(params[1]);
  const float *v = static_cast<const float *>(params[2]);
  float *out = static_cast<float *>(params[3]);
  const int64_t d = shapes[0][ndims[0] - 1], n = shapes[0][ndims[0] - 2], m = shapes[1][ndims[1] - 2];
  if (n == 0 || d == 0) return 0;
  const int64_t groups = element_count(ndims[0], shapes[0]) / (n * d);
  constexpr int64_t kRows = 64;
  const int64_t blocks = (n + kRows - 1) / kRows;
  std::atomic<int> status{0};
  parallel_for(groups * blocks, 1, [&](int64_t t0, int64_t t1, int) {
    std::vector<float> scores(static_cast<size_t>(kRows * (m > 0 ? m : 1)));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t g = t / blocks, r0 = (t % blocks) * kRows, rows = n - r0 < kRows ? n - r0 : kRows;
      float *o = out + (g * n + r0) * d;
      if (m == 0) {
        std::memset(o, 0, sizeof(float) * rows * d);
        continue;
      }
      float *s = scores.data();
      if (dnnl_sgemm('N', 'T', rows, m, d, 1.0f, q + (g * n + r0) * d, d, k + g * m * d, d, 0.0f, s, m) != 0)
        status = 2;
      for (int64_t r = 0; r < rows; ++r) {
        float *__restrict row = s + r * m;
        float top = row[0];
        for (int64_t j = 1; j < m; ++j) top = row[j] > top ? row[j] : top;
        float total = 0.0f;
#pragma omp simd reduction(+ : total)
        for (int64_t j = 0; j < m; ++j) {
          row[j] = exp_clamped(row[j] - top);
          total += row[j];
        }
        const float inverse = 1.0f / total;
#pragma omp simd
        for (int64_t j = 0; j < m; ++j) row[j] *= inverse;
      }
      if (dnnl_sgemm('N', 'N', rows, d, m, 1.0f, s, m, v + g * m * d, d, 0.0f, o, d) != 0) status = 2;
    }
  });
  return status.load();
}
#endif  // PVT_HAVE_DNNL

}  // extern "C"
"""

_BASE_FLAGS = ("-std=c++17", "-O3", "-shared", "-fPIC", "-pthread", "-ffp-contract=fast", "-fopenmp-simd",
               "-fno-math-errno", "-fno-trapping-math")


def _x86_flags():
    """-mavx2 -mfma where the CPU has them (checked, not assumed: the library is built on the machine it runs on)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return ("-mavx2", "-mfma") if {"avx2", "fma"} <= flags else ()
    except OSError:
        pass
    return ()


def _cache_dirs():
    explicit = os.environ.get(ENV_CACHE_DIR)
    if explicit:
        return [explicit]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return [os.path.join(base, "pvt_dense"), os.path.join(tempfile.gettempdir(), f"pvt_dense-{os.getuid()}")]


def _dnnl_library():
    """MindSpore's own oneDNN library (shipped in its CPU wheel), whose sgemm the Dense kernels call; or None."""
    folder = os.path.join(os.path.dirname(ms.__file__), "lib")
    for name in ("libdnnl.so.3", "libdnnl.so.2", "libdnnl.so"):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def _compile(compiler, flags, link, target):
    """Compile _SOURCE into `target` atomically: concurrent processes each write a temporary file, then rename."""
    folder = os.path.dirname(target)
    os.makedirs(folder, exist_ok=True)
    fd, source_path = tempfile.mkstemp(suffix=".cc", dir=folder)
    with os.fdopen(fd, "w") as handle:
        handle.write(_SOURCE)
    partial = f"{target}.{os.getpid()}.tmp"
    try:
        result = subprocess.run([compiler, *flags, "-o", partial, source_path, *link], capture_output=True,
                                text=True, timeout=300, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-2000:]}")
        os.replace(partial, target)
    finally:
        for leftover in (source_path, partial):
            if os.path.exists(leftover):
                os.remove(leftover)


def _build_library():
    """(path of the compiled kernel library, whether it has the Dense kernels), compiling it if this machine has
    no cached copy yet."""
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not compiler:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    simd = [_BASE_FLAGS + _x86_flags()]
    if simd[0] != _BASE_FLAGS:
        simd.append(_BASE_FLAGS)  # an old compiler or assembler without AVX2 support
    dnnl = _dnnl_library()
    attempts = []
    if dnnl:
        folder = os.path.dirname(dnnl)
        link = (f"-L{folder}", f"-l:{os.path.basename(dnnl)}", f"-Wl,-rpath,{folder}")
        attempts += [(flags + ("-DPVT_HAVE_DNNL",), link, True) for flags in simd]
    attempts += [(flags, (), False) for flags in simd]  # GELU and LayerNorm only
    errors = []
    for folder in _cache_dirs():
        for flags, link, has_dense in attempts:
            key = hashlib.sha256("\0".join((_SOURCE, compiler, platform.machine()) + flags + link).encode())
            target = os.path.join(folder, f"fast_ops-{key.hexdigest()[:20]}.so")
            if os.path.isfile(target):
                return target, has_dense
            try:
                _compile(compiler, flags, link, target)
                return target, has_dense
            except (OSError, RuntimeError, subprocess.SubprocessError) as err:
                errors.append(f"{target}: {err}")
    raise RuntimeError("; ".join(errors))


def _same_shape(*shapes):
    return shapes[0]


def _same_dtype(*dtypes):
    return dtypes[0]


class _Kernels:
    """The Custom primitives, with their bprops, made once per process."""

    def __init__(self, library, has_dense=False):
        if ":" in library:
            raise RuntimeError(f"the kernel library path must not contain ':' ({library})")
        gelu_grad = ops.Custom(f"{library}:PvtGeluGrad", out_shape=_same_shape, out_dtype=_same_dtype,
                               func_type="aot")

        def gelu_bprop(x, out, dout):
            return (gelu_grad(x, dout),)

        layer_norm_grad = ops.Custom(f"{library}:PvtLayerNormGrad", out_shape=lambda x, g, dy, e: (x, g, g),
                                     out_dtype=lambda x, g, dy, e: (x, g, g), func_type="aot")

        def layer_norm_bprop(x, gamma, beta, eps, out, dout):
            dx, dgamma, dbeta = layer_norm_grad(x, gamma, dout, eps)
            return dx, dgamma, dbeta, ops.zeros_like(eps)

        self.library = library
        self.dense = self.attention = None
        if has_dense:
            dense_grad = ops.Custom(f"{library}:PvtDenseGrad", out_shape=lambda x, w, dy: (x, w, [w[0]]),
                                    out_dtype=lambda x, w, dy: (x, w, w), func_type="aot")

            def dense_bprop(x, weight, bias, out, dout):
                return dense_grad(x, weight, dout)

            scores_of = ops.BatchMatMul(transpose_b=True)
            transposed_times = ops.BatchMatMul(transpose_a=True)
            times = ops.BatchMatMul()
            softmax = ops.Softmax(axis=-1)

            def attention_bprop(q, k, v, out, dout):
                # Recomputes the probabilities (the forward never stored them), then the softmax backward.
                probs = softmax(scores_of(q, k))
                dprobs = scores_of(dout, v)
                dscores = probs * (dprobs - (dprobs * probs).sum(axis=-1, keepdims=True))
                return times(dscores, k), transposed_times(dscores, q), transposed_times(probs, dout)

            self.attention = ops.Custom(f"{library}:PvtAttention", out_shape=lambda q, k, v: q,
                                        out_dtype=lambda q, k, v: q, func_type="aot", bprop=attention_bprop)
            self.dense = ops.Custom(f"{library}:PvtDense", out_shape=lambda x, w, b: list(x[:-1]) + [w[0]],
                                    out_dtype=lambda x, w, b: x, func_type="aot", bprop=dense_bprop)
        self.gelu = ops.Custom(f"{library}:PvtGelu", out_shape=_same_shape, out_dtype=_same_dtype,
                               func_type="aot", bprop=gelu_bprop)
        self.layer_norm = ops.Custom(f"{library}:PvtLayerNorm", out_shape=_same_shape, out_dtype=_same_dtype,
                                     func_type="aot", bprop=layer_norm_bprop)


_LOCK = threading.Lock()
_STATE = {}


def kernels():
    """The compiled kernels, or None (with one warning per process saying why) when they cannot be used."""
    with _LOCK:
        if "kernels" not in _STATE:
            _STATE["kernels"], _STATE["reason"] = None, None
            if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
                _STATE["reason"] = f"disabled by {ENV_SWITCH}"
            elif platform.system() != "Linux":
                _STATE["reason"] = "MindSpore's aot Custom ops need Linux"
            else:
                try:
                    _STATE["kernels"] = _Kernels(*_build_library())
                except Exception as err:  # any failure here must only cost speed, never the model
                    _STATE["reason"] = f"{type(err).__name__}: {err}"
                    warnings.warn(f"pvt_dense fast GELU/LayerNorm kernels unavailable, using MindSpore's "
                                  f"operators (slower, same results): {_STATE['reason']}", RuntimeWarning,
                                  stacklevel=3)
        return _STATE["kernels"]


_FORCED_OFF = []


@contextlib.contextmanager
def mindspore_ops_only():
    """Cells built inside this block use MindSpore's own operators, whatever the kernels' availability.

    For `mindspore.export`: a graph with the Custom kernels names this machine's compiled library by path, so a
    MINDIR exported from it would not run anywhere else.
    """
    _FORCED_OFF.append(True)
    try:
        yield
    finally:
        _FORCED_OFF.pop()


def kernels_for_new_cell():
    """The kernels a Cell being built now should use: None on a non-CPU target or inside `mindspore_ops_only`."""
    if _FORCED_OFF or ms.get_context("device_target") != "CPU":
        return None
    return kernels()


def fast_ops_status():
    """(available, reason): whether the CPU kernels are in use and, if not, why."""
    available = kernels() is not None
    return available, _STATE.get("reason")


class GELU(nn.Cell):
    """Exact (erf) GELU, elementwise: a drop-in for `nn.GELU(approximate=False)`.

    Input and output: a float tensor of any shape. float32 on the CPU runs the fused kernel; anything else runs
    `nn.GELU(approximate=False)`.
    """

    def __init__(self):
        super().__init__()
        compiled = kernels_for_new_cell()
        self.use_kernel = compiled is not None
        self.kernel = compiled.gelu if self.use_kernel else None
        self.fallback = nn.GELU(approximate=False)

    def construct(self, x):
        if self.use_kernel and x.dtype == ms.float32:
            return self.kernel(x)
        return self.fallback(x)


class LayerNorm(nn.Cell):
    """LayerNorm over the last axis: a drop-in for `nn.LayerNorm((channels,), epsilon=eps)`.

    Same semantics (biased variance, eps inside the square root) and the same float32 Parameters, `gamma` (ones)
    and `beta` (zeros), so checkpoints written with either load into the other.

    Input (..., channels); output the same shape.
    """

    def __init__(self, channels, eps=1e-5):
        super().__init__()
        self.channels = int(channels)
        self.eps = float(eps)
        self.gamma = Parameter(initializer("ones", (self.channels,), ms.float32), name="gamma")
        self.beta = Parameter(initializer("zeros", (self.channels,), ms.float32), name="beta")
        compiled = kernels_for_new_cell()
        self.use_kernel = compiled is not None
        self.kernel = compiled.layer_norm if self.use_kernel else None
        self.eps_tensor = Tensor([self.eps], ms.float32)
        self.fallback = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=self.eps)

    def construct(self, x):
        if self.use_kernel and x.dtype == ms.float32:
            return self.kernel(x, self.gamma, self.beta, self.eps_tensor)
        y, _, _ = self.fallback(x, self.gamma.astype(x.dtype), self.beta.astype(x.dtype))
        return y

    def extend_repr(self):
        return f"channels={self.channels}, eps={self.eps}, kernel={self.use_kernel}"


class Dense(nn.Cell):
    """y = x W^T + b over the last axis: a drop-in for `nn.Dense(in_channels, out_channels, has_bias=True)`.

    Same float32 Parameters, `weight` (out, in) and `bias` (out,), so checkpoints of either load into the other.
    float32 on the CPU runs one kernel per call (oneDNN's sgemm from MindSpore's own libdnnl, split over this
    library's threads, with the bias fused; backward likewise); anything else runs MatMul + BiasAdd.

    Input (..., in_channels); output (..., out_channels).
    """

    def __init__(self, in_channels, out_channels, weight_init="normal", bias_init="zeros"):
        super().__init__()
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.weight = Parameter(initializer(weight_init, (self.out_channels, self.in_channels), ms.float32),
                                name="weight")
        self.bias = Parameter(initializer(bias_init, (self.out_channels,), ms.float32), name="bias")
        compiled = kernels_for_new_cell()
        self.use_kernel = compiled is not None and compiled.dense is not None
        self.kernel = compiled.dense if self.use_kernel else None
        self.matmul = ops.MatMul(transpose_b=True)
        self.bias_add = ops.BiasAdd()

    def construct(self, x):
        if self.use_kernel and x.dtype == ms.float32:
            return self.kernel(x, self.weight, self.bias)
        out_shape = x.shape[:-1] + (self.out_channels,)
        y = self.matmul(x.reshape(-1, self.in_channels), self.weight.astype(x.dtype))
        return self.bias_add(y, self.bias.astype(x.dtype)).reshape(out_shape)

    def extend_repr(self):
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}, kernel={self.use_kernel}"
