// Linear (nn.Dense) and the fused GELU + Linear, forward and backward, on oneDNN's sgemm: built only with
// PVT_HAVE_DNNL (MindSpore's libdnnl found).
#include "common.h"

#ifdef PVT_HAVE_DNNL
extern "C" {

// Rows of a (rows x cols) matrix per thread so that each sgemm call still gets a well-shaped block.
constexpr int64_t kGemmRowGrain = 64;

// inputs: x (..., K), w (N, K), b (N); output: y (..., N) = x w^T + b, as nn.Dense (weight layout (out, in)).
static int PvtDenseUnchecked(int nparam, void **params, int *ndims, int64_t **shapes,
                             const char **dtypes, void *, void *) {
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
static int PvtDenseGradUnchecked(int nparam, void **params, int *ndims, int64_t **shapes,
                                 const char **dtypes, void *, void *) {
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

// Rows per sgemm inside a thread's share of the fused GELU + Linear kernels: the GELU'd block (rows x K) stays in
// a per-thread buffer of at most 256 x K floats.
constexpr int64_t kGeluDenseRows = 256;

// inputs: h (..., K), w (N, K), b (N); output: y (..., N) = GELU(h) w^T + b. GELU(h) is made per block of rows in a
// per-thread buffer and never stored: the MLP keeps only fc1's output h, from which the backward recomputes it.
static int PvtGeluDenseUnchecked(int nparam, void **params, int *ndims, int64_t **shapes,
                                 const char **dtypes, void *, void *) {
  if (nparam != 4 || !all_float32(4, dtypes)) return 1;
  const float *h = static_cast<const float *>(params[0]);
  const float *w = static_cast<const float *>(params[1]);
  const float *b = static_cast<const float *>(params[2]);
  float *y = static_cast<float *>(params[3]);
  const int64_t k = shapes[0][ndims[0] - 1], n = shapes[1][0];
  const int64_t m = k > 0 ? element_count(ndims[0], shapes[0]) / k : 0;
  if (m == 0 || n == 0) return 0;
  std::atomic<int> status{0};
  parallel_for(m, kGemmRowGrain, [&](int64_t r0, int64_t r1, int) {
    std::vector<float> act(static_cast<size_t>((r1 - r0 < kGeluDenseRows ? r1 - r0 : kGeluDenseRows) * k));
    for (int64_t s0 = r0; s0 < r1; s0 += kGeluDenseRows) {
      const int64_t rows = r1 - s0 < kGeluDenseRows ? r1 - s0 : kGeluDenseRows;
      const float *__restrict hs = h + s0 * k;
      float *__restrict a = act.data();
#pragma omp simd
      for (int64_t i = 0; i < rows * k; ++i) a[i] = gelu(hs[i]);
      for (int64_t r = s0; r < s0 + rows; ++r) std::memcpy(y + r * n, b, sizeof(float) * n);
      if (dnnl_sgemm('N', 'T', rows, n, k, 1.0f, a, k, w, k, 1.0f, y + s0 * n, n) != 0) status = 2;
    }
  });
  return status.load();
}

// The whole feed-forward layer for inference, fc2(GELU(fc1(x))), in blocks of rows: each block's hidden activations
// (rows x H) stay in a per-thread buffer from the first product through the GELU to the second, instead of being
// written out and read back twice (PVT-Tiny's stage 1 at 800x1216: 60800 x 512 floats, 124 MB, per block).
// Measured there on one thread (Xeon, AVX-512): Dense + GeluDense 162-170 ms; this kernel with 64 / 128 / 256 / 512
// rows a block 124 / 116-119 / 107 / 104 ms (the buffer: 256 x H floats, 2 MB at PVT's widest H of 2048).
constexpr int64_t kMlpRows = 256;

// inputs: x (..., C), w1 (H, C), b1 (H), w2 (N, H), b2 (N); output: y (..., N).
static int PvtMlpUnchecked(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                           void *) {
  if (nparam != 6 || !all_float32(6, dtypes)) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *w1 = static_cast<const float *>(params[1]);
  const float *b1 = static_cast<const float *>(params[2]);
  const float *w2 = static_cast<const float *>(params[3]);
  const float *b2 = static_cast<const float *>(params[4]);
  float *y = static_cast<float *>(params[5]);
  const int64_t c = shapes[0][ndims[0] - 1], hidden = shapes[1][0], n = shapes[3][0];
  const int64_t m = c > 0 ? element_count(ndims[0], shapes[0]) / c : 0;
  if (m == 0 || n == 0) return 0;
  std::atomic<int> status{0};
  parallel_for((m + kMlpRows - 1) / kMlpRows, 1, [&](int64_t t0, int64_t t1, int) {
    std::vector<float> act(static_cast<size_t>(kMlpRows * hidden));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t * kMlpRows, rows = std::min(kMlpRows, m - r0);
      float *__restrict a = act.data();
      for (int64_t r = 0; r < rows; ++r) std::memcpy(a + r * hidden, b1, sizeof(float) * hidden);
      if (c > 0 && dnnl_sgemm('N', 'T', rows, hidden, c, 1.0f, x + r0 * c, c, w1, c, 1.0f, a, hidden) != 0)
        status = 2;
#pragma omp simd
      for (int64_t i = 0; i < rows * hidden; ++i) a[i] = gelu(a[i]);
      for (int64_t r = r0; r < r0 + rows; ++r) std::memcpy(y + r * n, b2, sizeof(float) * n);
      if (hidden > 0 && dnnl_sgemm('N', 'T', rows, n, hidden, 1.0f, a, hidden, w2, hidden, 1.0f, y + r0 * n, n) != 0)
        status = 2;
    }
  });
  return status.load();
}

// inputs: h (..., K), w (N, K), dy (..., N); outputs: dh = (dy w) * GELU'(h), dw = dy^T GELU(h), db = sum of dy.
// Per block of rows: GELU(h) recomputed into a per-thread buffer, dh written in place of (dy w); dw summed per
// thread (N x K partials, added in slot order), db in double.
static int PvtGeluDenseGradUnchecked(int nparam, void **params, int *ndims, int64_t **shapes,
                                     const char **dtypes, void *, void *) {
  if (nparam != 6 || !all_float32(6, dtypes)) return 1;
  const float *h = static_cast<const float *>(params[0]);
  const float *w = static_cast<const float *>(params[1]);
  const float *dy = static_cast<const float *>(params[2]);
  float *dh = static_cast<float *>(params[3]);
  float *dw = static_cast<float *>(params[4]);
  float *db = static_cast<float *>(params[5]);
  const int64_t k = shapes[0][ndims[0] - 1], n = shapes[1][0];
  const int64_t m = k > 0 ? element_count(ndims[0], shapes[0]) / k : 0;
  std::memset(dw, 0, sizeof(float) * n * k);
  std::memset(db, 0, sizeof(float) * n);
  if (m == 0) return 0;
  if (n == 0) {
    std::memset(dh, 0, sizeof(float) * m * k);
    return 0;
  }
  const int slots = thread_count();
  std::vector<float> dw_partial(static_cast<size_t>(slots) * n * k, 0.0f);
  std::vector<double> db_partial(static_cast<size_t>(slots) * n, 0.0);
  std::atomic<int> status{0};
  parallel_for(m, kGemmRowGrain, [&](int64_t r0, int64_t r1, int slot) {
    std::vector<float> act(static_cast<size_t>((r1 - r0 < kGeluDenseRows ? r1 - r0 : kGeluDenseRows) * k));
    float *pw = dw_partial.data() + static_cast<size_t>(slot) * n * k;
    double *__restrict pb = db_partial.data() + static_cast<size_t>(slot) * n;
    for (int64_t s0 = r0; s0 < r1; s0 += kGeluDenseRows) {
      const int64_t rows = r1 - s0 < kGeluDenseRows ? r1 - s0 : kGeluDenseRows;
      const float *__restrict hs = h + s0 * k;
      float *__restrict a = act.data();
      float *__restrict dhs = dh + s0 * k;
      if (dnnl_sgemm('N', 'N', rows, k, n, 1.0f, dy + s0 * n, n, w, k, 0.0f, dhs, k) != 0) status = 2;
#pragma omp simd
      for (int64_t i = 0; i < rows * k; ++i) {
        a[i] = gelu(hs[i]);
        dhs[i] *= gelu_grad(hs[i]);
      }
      if (dnnl_sgemm('T', 'N', n, k, rows, 1.0f, dy + s0 * n, n, a, k, 1.0f, pw, k) != 0) status = 2;
      for (int64_t r = s0; r < s0 + rows; ++r) {
        const float *__restrict row = dy + r * n;
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) pb[j] += row[j];
      }
    }
  });
  for (int s = 0; s < slots; ++s) {
    const float *__restrict pw = dw_partial.data() + static_cast<size_t>(s) * n * k;
#pragma omp simd
    for (int64_t i = 0; i < n * k; ++i) dw[i] += pw[i];
  }
  for (int64_t j = 0; j < n; ++j) {
    double total = 0.0;
    for (int s = 0; s < slots; ++s) total += db_partial[static_cast<size_t>(s) * n + j];
    db[j] = static_cast<float>(total);
  }
  return status.load();
}

// x (..., K), w (N, K), b (N) -> y (..., N)
PVT_ENTRY(PvtDense, 4,
          ndims[0] >= 1 && ndims[1] == 2 && shapes[1][1] == last(ndims, shapes, 0) &&
              is_vector(ndims, shapes, 2, shapes[1][0]) && same_leading(ndims, shapes, 0, 3, 1) &&
              last(ndims, shapes, 3) == shapes[1][0])
// x (..., K), w (N, K), dy (..., N) -> dx like x, dw like w, db (N)
PVT_ENTRY(PvtDenseGrad, 6,
          ndims[0] >= 1 && ndims[1] == 2 && shapes[1][1] == last(ndims, shapes, 0) &&
              same_leading(ndims, shapes, 0, 2, 1) && last(ndims, shapes, 2) == shapes[1][0] &&
              same_shape(ndims, shapes, 0, 3) && same_shape(ndims, shapes, 1, 4) &&
              is_vector(ndims, shapes, 5, shapes[1][0]))
// h (..., K), w (N, K), b (N) -> y (..., N) = GELU(h) w^T + b
PVT_ENTRY(PvtGeluDense, 4,
          ndims[0] >= 1 && ndims[1] == 2 && shapes[1][1] == last(ndims, shapes, 0) &&
              is_vector(ndims, shapes, 2, shapes[1][0]) && same_leading(ndims, shapes, 0, 3, 1) &&
              last(ndims, shapes, 3) == shapes[1][0])
// h (..., K), w (N, K), dy (..., N) -> dh like h, dw like w, db (N)
PVT_ENTRY(PvtGeluDenseGrad, 6,
          ndims[0] >= 1 && ndims[1] == 2 && shapes[1][1] == last(ndims, shapes, 0) &&
              same_leading(ndims, shapes, 0, 2, 1) && last(ndims, shapes, 2) == shapes[1][0] &&
              same_shape(ndims, shapes, 0, 3) && same_shape(ndims, shapes, 1, 4) &&
              is_vector(ndims, shapes, 5, shapes[1][0]))

// x (..., C), w1 (H, C), b1 (H), w2 (N, H), b2 (N) -> y (..., N)
PVT_ENTRY(PvtMlp, 6,
          ndims[0] >= 1 && ndims[1] == 2 && shapes[1][1] == last(ndims, shapes, 0) &&
              is_vector(ndims, shapes, 2, shapes[1][0]) && ndims[3] == 2 && shapes[3][1] == shapes[1][0] &&
              is_vector(ndims, shapes, 4, shapes[3][0]) && same_leading(ndims, shapes, 0, 5, 1) &&
              last(ndims, shapes, 5) == shapes[3][0])

}  // extern "C"
#endif  // PVT_HAVE_DNNL
