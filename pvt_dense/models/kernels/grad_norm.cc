// The global norm of a training step's gradients, for gradient clipping and the overflow check, in one pass over
// all of them: MindSpore's clip_by_global_norm squares every gradient into a new tensor, reduces it, and the
// overflow check sums every gradient again (~75 ms of a 240 ms PVT-Tiny RetinaNet step on 64x64 canvases; this is
// ~5 ms).
#include "common.h"

namespace {

// Elements per partial sum. Partial sums are added in block order whatever the thread count, so the norm is the
// same number on 1 or 16 threads (a resumed run reaches the same weights).
constexpr int64_t kNormBlock = 1 << 14;

// Squares summed in double: the square of any finite float fits a double, so the sum is finite exactly when every
// element is, which makes it the overflow check too.
double block_squares(const float *__restrict x, int64_t n) {
  double total = 0.0;
#pragma omp simd reduction(+ : total)
  for (int64_t i = 0; i < n; ++i) {
    const double v = x[i];
    total += v * v;
  }
  return total;
}

}  // namespace

extern "C" {

// params[0 .. n-1]: the gradients (float32, any shapes); params[n]: the output, float32 of shape (2,):
// [sqrt(sum of all squares), 1.0 if every element is finite else 0.0]. A norm beyond float32's range is +inf with
// the finite flag still 1.
int PvtGlobalNorm(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *extra,
                  void *stream) {
  if (nparam < 2 || params == nullptr || ndims == nullptr || shapes == nullptr || dtypes == nullptr ||
      !all_float32(nparam, dtypes) || !well_formed(nparam, ndims, shapes))
    return 1;
  const int count = nparam - 1;
  if (!is_vector(ndims, shapes, count, 2)) return 1;
  return guarded([&] {
    // Blocks of each tensor in order: (tensor, first element).
    std::vector<std::pair<int, int64_t>> blocks;
    for (int t = 0; t < count; ++t) {
      const int64_t n = element_count(ndims[t], shapes[t]);
      for (int64_t start = 0; start < n; start += kNormBlock) blocks.emplace_back(t, start);
    }
    std::vector<double> partial(blocks.size(), 0.0);
    parallel_for(static_cast<int64_t>(blocks.size()), 4, [&](int64_t begin, int64_t end, int) {
      for (int64_t b = begin; b < end; ++b) {
        const int t = blocks[b].first;
        const int64_t start = blocks[b].second, n = element_count(ndims[t], shapes[t]);
        const int64_t length = std::min(kNormBlock, n - start);
        partial[b] = block_squares(static_cast<const float *>(params[t]) + start, length);
      }
    });
    double total = 0.0;
    for (const double p : partial) total += p;
    float *out = static_cast<float *>(params[count]);
    const bool finite = std::isfinite(total);
    out[0] = finite ? static_cast<float>(std::sqrt(total)) : total;  // nan stays nan, inf stays inf
    out[1] = finite ? 1.0f : 0.0f;
    return 0;
  });
}

}  // extern "C"
