// LayerNorm over the last axis and its backward (row statistics recomputed, dgamma / dbeta summed in double).
#include "common.h"

namespace {

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

// inputs: x (..., C), gamma (C), beta (C), eps (1); output: y. Normalises over the last axis.
static int PvtLayerNormUnchecked(int nparam, void **params, int *ndims, int64_t **shapes,
                                 const char **dtypes, void *, void *) {
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
static int PvtLayerNormGradUnchecked(int nparam, void **params, int *ndims, int64_t **shapes,
                                     const char **dtypes, void *, void *) {
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

// x (..., C), gamma (C), beta (C), eps (1) -> y like x
PVT_ENTRY(PvtLayerNorm, 5,
          ndims[0] >= 1 && is_vector(ndims, shapes, 1, last(ndims, shapes, 0)) &&
              is_vector(ndims, shapes, 2, last(ndims, shapes, 0)) &&
              element_count(ndims[3], shapes[3]) == 1 && same_shape(ndims, shapes, 0, 4))
// x, gamma, dy, eps -> dx like x, dgamma (C), dbeta (C)
PVT_ENTRY(PvtLayerNormGrad, 7,
          ndims[0] >= 1 && is_vector(ndims, shapes, 1, last(ndims, shapes, 0)) &&
              same_shape(ndims, shapes, 0, 2) && element_count(ndims[3], shapes[3]) == 1 &&
              same_shape(ndims, shapes, 0, 4) && is_vector(ndims, shapes, 5, last(ndims, shapes, 0)) &&
              is_vector(ndims, shapes, 6, last(ndims, shapes, 0)))

}  // extern "C"
