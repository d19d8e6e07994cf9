// Host-side helpers called through ctypes (not MindSpore ops), on the library's thread pool.
#include "common.h"

namespace {

// One channel's step of a running argmax over pixels [0, count): take v where it is larger, or NaN while the best
// so far is not (x != x: NaN), so the first maximum (or first NaN) keeps its index, as numpy's argmax.
inline void argmax_step(const float *__restrict plane, int32_t channel, int64_t count, float *__restrict best,
                        int32_t *__restrict index) {
  for (int64_t i = 0; i < count; ++i) {
    const float v = plane[i];
    const bool take = (v > best[i] || (v != v)) && (best[i] == best[i]);
    best[i] = take ? v : best[i];
    index[i] = take ? channel : index[i];
  }
}

}  // namespace

extern "C" {

// One channel more of a running argmax over n pixels (channel 0 starts it: best = its plane, index = 0): for masks
// computed channel by channel as each class map is resized, so the K resized maps never exist at once.
int PvtArgmaxUpdate(const float *plane, int32_t channel, int64_t n, float *best, int32_t *index) {
  if (plane == nullptr || best == nullptr || index == nullptr || n < 0 || channel < 0) return 1;
  if (channel == 0) {
    std::memcpy(best, plane, sizeof(float) * n);
    std::fill_n(index, n, 0);
    return 0;
  }
  argmax_step(plane, channel, n, best, index);
  return 0;
}

}  // extern "C"
