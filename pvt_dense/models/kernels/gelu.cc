// Exact (erf) GELU and its gradient, element-wise (the math is in common.h, shared with the fused GELU + Linear).
#include "common.h"

extern "C" {

// inputs: x; output: y = GELU(x).
static int PvtGeluUnchecked(int nparam, void **params, int *ndims, int64_t **shapes,
                            const char **dtypes, void *, void *) {
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
static int PvtGeluGradUnchecked(int nparam, void **params, int *ndims, int64_t **shapes,
                                const char **dtypes, void *, void *) {
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

// y = GELU(x); dx = dy * GELU'(x)
PVT_ENTRY(PvtGelu, 2, same_shape(ndims, shapes, 0, 1))
PVT_ENTRY(PvtGeluGrad, 3, same_shape(ndims, shapes, 0, 1) && same_shape(ndims, shapes, 0, 2))

}  // extern "C"
