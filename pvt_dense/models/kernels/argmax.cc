// Host-side helpers called through ctypes (not MindSpore ops), on the library's thread pool.
#include "common.h"

extern "C" {

// Host-side (called through ctypes, not a MindSpore op): out[i] = the index of the largest of x[c * n + i] over
// c in [0, k), the first one on ties and the first NaN if any, as numpy's argmax(axis=0) on (k, n) float32.
// Segmentation takes it over 150 class maps of a whole photo: numpy walks the pixels with a stride of n floats per
// channel; here each thread keeps a block of pixels' running maxima and reads every channel's block contiguously.
int PvtArgmaxChannels(const float *x, int64_t k, int64_t n, int32_t *out) {
  if (x == nullptr || out == nullptr || k < 1 || n < 0) return 1;
  return guarded([&] {
    constexpr int64_t kBlock = 2048;
    parallel_for((n + kBlock - 1) / kBlock, 1, [&](int64_t b0, int64_t b1, int) {
      float best[kBlock];
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t i0 = b * kBlock, count = std::min(kBlock, n - i0);
        int32_t *__restrict index = out + i0;
        std::memcpy(best, x + i0, sizeof(float) * count);
        std::fill_n(index, count, 0);
        for (int64_t c = 1; c < k; ++c) {
          const float *__restrict row = x + c * n + i0;
          for (int64_t i = 0; i < count; ++i) {
            // take v when it is larger, or NaN while the best so far is not (best != best: NaN)
            const float v = row[i];
            const bool take = (v > best[i] || (v != v)) && (best[i] == best[i]);
            best[i] = take ? v : best[i];
            index[i] = take ? static_cast<int32_t>(c) : index[i];
          }
        }
      }
    });
    return 0;
  });
}

}  // extern "C"
