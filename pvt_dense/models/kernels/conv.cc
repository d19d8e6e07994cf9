// Convolution for inference (MatmulConv2d in eval mode; Semantic FPN's conv-BN-ReLU with the norm folded in) on
// oneDNN's sgemm: built only with PVT_HAVE_DNNL (MindSpore's libdnnl found).
#include "common.h"

#ifdef PVT_HAVE_DNNL
namespace {

// Output channels per thread when a small map's channels are split between threads.
constexpr int64_t kConvChannelGrain = 64;

// Convolution, inference only (the training path keeps MindSpore's Im2Col + BatchMatMul, which have gradients):
//   x (B, C, H, W), w (O, C, k, k), b (O), meta (3) = [stride, pad, relu] -> y (B, O, OH, OW),
//   OH = (H + 2 pad - k) / stride + 1 (floor), zero padding on every side, as PyTorch's and nn.Conv2d(pad_mode="pad").
// Each block of output rows is unfolded (im2col) into a per-thread buffer of C k k rows and multiplied by the
// weight (O x C k k) with one sgemm that writes the block's rows of every output channel in place (NCHW: a block of
// rows of one channel is contiguous). The whole-tensor columns that Im2Col + BatchMatMul build (k*k times the
// input, ~70 MB for 256 channels at 100x168) never exist: each block's columns stay in cache for its product.
struct ConvLayout {
  int64_t batch, c, h, w, o, k, stride, pad, oh, ow;
  bool relu;
  int64_t taps() const { return c * k * k; }
};

inline int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

// x is shapes[0], the weight shapes[1], the output (or its gradient) shapes[out].
bool conv_layout(int *ndims, int64_t **shapes, const float *meta, int out, ConvLayout *L) {
  const float stride = meta[0], pad = meta[1], relu = meta[2];
  if (!(stride >= 1.0f && stride <= 64.0f) || stride != std::floor(stride) || !(pad >= 0.0f && pad <= 64.0f) ||
      pad != std::floor(pad) || !(relu == 0.0f || relu == 1.0f))
    return false;
  const int64_t s = static_cast<int64_t>(stride), p = static_cast<int64_t>(pad), k = shapes[1][2];
  const int64_t h = shapes[0][2], w = shapes[0][3];
  if (h + 2 * p < k || w + 2 * p < k) return false;
  const int64_t oh = (h + 2 * p - k) / s + 1, ow = (w + 2 * p - k) / s + 1;
  if (shapes[out][2] != oh || shapes[out][3] != ow) return false;
  *L = {shapes[0][0], shapes[0][1], h, w, shapes[1][0], k, s, p, oh, ow, relu == 1.0f};
  return true;
}

// [lo, hi): the output columns j whose input column j stride - pad + kx lies inside [0, W), for kernel column kx.
inline void inside_columns(const ConvLayout &L, int64_t kx, int64_t *lo, int64_t *hi) {
  *lo = std::min<int64_t>(L.ow, std::max<int64_t>(0, floor_div(L.pad - kx + L.stride - 1, L.stride)));
  *hi = std::max<int64_t>(*lo, std::min<int64_t>(L.ow, floor_div(L.w - 1 + L.pad - kx, L.stride) + 1));
}

// The columns of output rows [r0, r1) of one image x (C, H, W): col (C k k, (r1 - r0) OW), row (c, ky, kx) holding
// x[c, r s - pad + ky, ow s - pad + kx] (0 outside the image) for each output pixel (r, ow) of the block.
void conv_columns(const ConvLayout &L, const float *__restrict x, int64_t r0, int64_t r1, float *__restrict col) {
  const int64_t n = (r1 - r0) * L.ow, k = L.k, s = L.stride, p = L.pad, ow = L.ow;
  for (int64_t c = 0; c < L.c; ++c) {
    const float *plane = x + c * L.h * L.w;
    for (int64_t ky = 0; ky < k; ++ky) {
      for (int64_t kx = 0; kx < k; ++kx) {
        float *dst = col + ((c * k + ky) * k + kx) * n;
        int64_t lo, hi;
        inside_columns(L, kx, &lo, &hi);
        for (int64_t r = r0; r < r1; ++r) {
          float *__restrict d = dst + (r - r0) * ow;
          const int64_t iy = r * s - p + ky;
          if (iy < 0 || iy >= L.h) {
            std::memset(d, 0, sizeof(float) * ow);
            continue;
          }
          const float *__restrict src = plane + iy * L.w - p + kx;
          std::memset(d, 0, sizeof(float) * lo);
          if (s == 1) {
            std::memcpy(d + lo, src + lo, sizeof(float) * (hi - lo));
          } else {
            for (int64_t j = lo; j < hi; ++j) d[j] = src[j * s];
          }
          std::memset(d + hi, 0, sizeof(float) * (ow - hi));
        }
      }
    }
  }
}

// Output pixels per im2col block: enough columns for an efficient sgemm, few enough that the block's columns
// (C k k x 768 floats: 7 MB at 256 channels) stay near the cache. Measured on one thread (Xeon, AVX-512), in
// GFLOP/s for 256 channels at 100x168 / 128 at 128x176 / 256 at 25x42: 384 columns 129 / 118 / 125, 768 141 /
// 127 / 115, 1536 118 / 113 / 108 (PyTorch 139-167).
constexpr int64_t kConvColumns = 768;

// y rows [r0, r1) of every channel of one image: bias, then += w col, then ReLU if asked.
int conv_block(const ConvLayout &L, const float *w, const float *b, const float *col, int64_t r0, int64_t r1,
               int64_t o0, int64_t o1, float *y) {
  const int64_t plane = L.oh * L.ow, n = (r1 - r0) * L.ow;
  for (int64_t o = o0; o < o1; ++o) std::fill_n(y + o * plane + r0 * L.ow, n, b[o]);
  if (dnnl_sgemm('N', 'N', o1 - o0, n, L.taps(), 1.0f, w + o0 * L.taps(), L.taps(), col, n, 1.0f,
                 y + o0 * plane + r0 * L.ow, plane) != 0)
    return 2;
  if (L.relu) {
    for (int64_t o = o0; o < o1; ++o) {
      float *__restrict v = y + o * plane + r0 * L.ow;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) v[j] = v[j] > 0.0f ? v[j] : 0.0f;
    }
  }
  return 0;
}

// The transpose of conv_columns: adds the columns of output rows [r0, r1) back onto image dx (C, H, W) at the
// positions they were read from (col2im), skipping the padding.
void conv_columns_add(const ConvLayout &L, const float *__restrict col, int64_t r0, int64_t r1, float *__restrict dx) {
  const int64_t n = (r1 - r0) * L.ow, k = L.k, s = L.stride, p = L.pad, ow = L.ow;
  for (int64_t c = 0; c < L.c; ++c) {
    float *plane = dx + c * L.h * L.w;
    for (int64_t ky = 0; ky < k; ++ky) {
      for (int64_t kx = 0; kx < k; ++kx) {
        const float *src = col + ((c * k + ky) * k + kx) * n;
        int64_t lo, hi;
        inside_columns(L, kx, &lo, &hi);
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t iy = r * s - p + ky;
          if (iy < 0 || iy >= L.h) continue;
          const float *__restrict d = src + (r - r0) * ow;
          float *__restrict row = plane + iy * L.w - p + kx;
          if (s == 1) {
#pragma omp simd
            for (int64_t j = lo; j < hi; ++j) row[j] += d[j];
          } else {
            for (int64_t j = lo; j < hi; ++j) row[j * s] += d[j];
          }
        }
      }
    }
  }
}

}  // namespace

extern "C" {

// The convolution's backward for training, without the Im2Col columns of the whole input that MindSpore's
// gradient keeps from the forward to the backward (k*k times the input: ~280 MB per 256-channel 3x3 conv of
// RetinaNet's head at P3 of two 800x1216 images, ten such convs): per block of output rows, the block's columns are
// rebuilt in a per-thread buffer, dw += dy_block col^T (per-thread partial sums, added in slot order) and
// dx += col2im(w^T dy_block). Threads take contiguous runs of (image, block); those after the first add into their
// own copy of dx, summed at the end, since neighbouring blocks read overlapping input rows.
// inputs: x, w, dy, meta; outputs: dx like x, dw like w, db (O).
static int PvtConv2dGradUnchecked(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                  void *, void *) {
  if (nparam != 7 || !all_float32(7, dtypes)) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *w = static_cast<const float *>(params[1]);
  const float *dy = static_cast<const float *>(params[2]);
  float *dx = static_cast<float *>(params[4]);
  float *dw = static_cast<float *>(params[5]);
  float *db = static_cast<float *>(params[6]);
  ConvLayout L;
  // meta as the forward got it: with the ReLU fused, the caller has already zeroed dy where the output was zero
  if (!conv_layout(ndims, shapes, static_cast<const float *>(params[3]), 2, &L)) return 1;
  const int64_t in_size = L.c * L.h * L.w, plane = L.oh * L.ow, out_size = L.o * plane, taps = L.taps();
  std::fill_n(dx, L.batch * in_size, 0.0f);
  std::fill_n(dw, L.o * taps, 0.0f);
  for (int64_t o = 0; o < L.o; ++o) {
    double total = 0.0;
    for (int64_t image = 0; image < L.batch; ++image) {
      const float *g = dy + image * out_size + o * plane;
      for (int64_t j = 0; j < plane; ++j) total += g[j];
    }
    db[o] = static_cast<float>(total);
  }
  if (L.batch == 0 || L.o == 0 || plane == 0 || taps == 0) return 0;
  const int64_t rows = std::max<int64_t>(1, std::min<int64_t>(L.oh, kConvColumns / L.ow));
  const int64_t blocks = (L.oh + rows - 1) / rows, units = L.batch * blocks;
  const int threads = static_cast<int>(std::min<int64_t>(thread_count(), units));
  std::vector<float> dw_parts(static_cast<size_t>(threads > 1 ? (threads - 1) * L.o * taps : 0), 0.0f);
  std::vector<float> dx_parts(static_cast<size_t>(threads > 1 ? (threads - 1) * L.batch * in_size : 0), 0.0f);
  std::atomic<int> status{0};
  parallel_for(units, 1, [&](int64_t t0, int64_t t1, int slot) {
    float *my_dw = slot == 0 ? dw : dw_parts.data() + (slot - 1) * L.o * taps;
    float *my_dx = slot == 0 ? dx : dx_parts.data() + (slot - 1) * L.batch * in_size;
    std::vector<float> col(static_cast<size_t>(taps * rows * L.ow)), dcol(col.size());
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t image = t / blocks, r0 = (t % blocks) * rows, r1 = std::min(L.oh, r0 + rows);
      const int64_t n = (r1 - r0) * L.ow;
      const float *g = dy + image * out_size + r0 * L.ow;
      conv_columns(L, x + image * in_size, r0, r1, col.data());
      if (dnnl_sgemm('N', 'T', L.o, taps, n, 1.0f, g, plane, col.data(), n, 1.0f, my_dw, taps) != 0) status = 2;
      if (dnnl_sgemm('T', 'N', taps, n, L.o, 1.0f, w, taps, g, plane, 0.0f, dcol.data(), n) != 0) status = 2;
      conv_columns_add(L, dcol.data(), r0, r1, my_dx + image * in_size);
    }
  });
  for (int part = 0; part + 1 < threads; ++part) {
    const float *pw = dw_parts.data() + part * L.o * taps;
    for (int64_t i = 0; i < L.o * taps; ++i) dw[i] += pw[i];
    const float *px = dx_parts.data() + part * L.batch * in_size;
    for (int64_t i = 0; i < L.batch * in_size; ++i) dx[i] += px[i];
  }
  return status.load();
}

// inputs: x, w, b, meta; output: y.
static int PvtConv2dUnchecked(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                              void *) {
  if (nparam != 5 || !all_float32(5, dtypes)) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *w = static_cast<const float *>(params[1]);
  const float *b = static_cast<const float *>(params[2]);
  float *y = static_cast<float *>(params[4]);
  ConvLayout L;
  if (!conv_layout(ndims, shapes, static_cast<const float *>(params[3]), 4, &L)) return 1;
  if (L.batch == 0 || L.o == 0 || L.oh == 0 || L.ow == 0) return 0;
  const int64_t in_size = L.c * L.h * L.w, out_size = L.o * L.oh * L.ow;
  if (L.taps() == 0) {  // no input channels: the bias alone
    for (int64_t i = 0; i < L.batch * L.o; ++i) std::fill_n(y + i * L.oh * L.ow, L.oh * L.ow, b[i % L.o]);
    return 0;
  }
  if (L.k == 3 && L.stride == 1 && L.pad == 1) {  // the necks' and heads' 3x3 convolutions: winograd.cc
    const int status = pvt::winograd_conv3x3(L.batch, L.c, L.h, L.w, L.o, x, w, b, L.relu, y);
    if (status >= 0) return status;
  }
  const int64_t rows = std::max<int64_t>(1, std::min<int64_t>(L.oh, kConvColumns / L.ow));
  const int64_t blocks = (L.oh + rows - 1) / rows;
  std::atomic<int> status{0};
  if (L.batch * blocks >= 2 * thread_count() || L.o < 2 * kConvChannelGrain) {
    // many blocks: each thread unfolds and multiplies its own blocks
    parallel_for(L.batch * blocks, 1, [&](int64_t t0, int64_t t1, int) {
      std::vector<float> col(static_cast<size_t>(L.taps() * rows * L.ow));
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t image = t / blocks, r0 = (t % blocks) * rows, r1 = std::min(L.oh, r0 + rows);
        conv_columns(L, x + image * in_size, r0, r1, col.data());
        if (conv_block(L, w, b, col.data(), r0, r1, 0, L.o, y + image * out_size) != 0) status = 2;
      }
    });
  } else {
    // a small map (few blocks): unfold it once, split the output channels over the threads
    std::vector<float> col(static_cast<size_t>(L.taps() * L.oh * L.ow));
    for (int64_t image = 0; image < L.batch; ++image) {
      conv_columns(L, x + image * in_size, 0, L.oh, col.data());
      parallel_for(L.o, kConvChannelGrain, [&](int64_t o0, int64_t o1, int) {
        if (conv_block(L, w, b, col.data(), 0, L.oh, o0, o1, y + image * out_size) != 0) status = 2;
      });
    }
  }
  return status.load();
}

// x (B, C, H, W), w (O, C, k, k), b (O), meta [stride, pad, relu] -> y (B, O, OH, OW) (OH, OW checked in the kernel).
// One entry per stride, each taking only its own stride and "same" padding (k odd, pad k / 2: OH = ceil(H / stride)):
// MindSpore's PyNative mode keeps one output-shape function per kernel name, so one name must mean one shape rule.
#define PVT_CONV_ENTRY(name, stride)                                                                              \
  static int name##Unchecked(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,       \
                             void *extra, void *stream) {                                                         \
    const float *meta = static_cast<const float *>(params[3]);                                                   \
    if (meta[0] != (stride) || meta[1] != static_cast<float>(shapes[1][2] / 2) || shapes[1][2] % 2 != 1)        \
      return 1;                                                                                                   \
    return PvtConv2dUnchecked(nparam, params, ndims, shapes, dtypes, extra, stream);                             \
  }                                                                                                               \
  PVT_ENTRY(name, 5,                                                                                              \
            ndims[0] == 4 && ndims[1] == 4 && shapes[1][1] == shapes[0][1] && shapes[1][2] == shapes[1][3] &&     \
                is_vector(ndims, shapes, 2, shapes[1][0]) && element_count(ndims[3], shapes[3]) == 3 &&           \
                ndims[4] == 4 && shapes[4][0] == shapes[0][0] && shapes[4][1] == shapes[1][0])
// x, w (O, C, k, k), dy (B, O, OH, OW), meta [stride, pad, relu] -> dx like x, dw like w, db (O); any stride and padding
// (OH and OW checked in the kernel): the output shapes do not depend on them.
PVT_ENTRY(PvtConv2dGrad, 7,
          ndims[0] == 4 && ndims[1] == 4 && shapes[1][1] == shapes[0][1] && shapes[1][2] == shapes[1][3] &&
              ndims[2] == 4 && shapes[2][0] == shapes[0][0] && shapes[2][1] == shapes[1][0] &&
              element_count(ndims[3], shapes[3]) == 3 && same_shape(ndims, shapes, 0, 4) &&
              same_shape(ndims, shapes, 1, 5) && is_vector(ndims, shapes, 6, shapes[1][0]))
PVT_CONV_ENTRY(PvtConv2dStride1, 1)
PVT_CONV_ENTRY(PvtConv2dStride2, 2)
PVT_CONV_ENTRY(PvtConv2dStride4, 4)

}  // extern "C"
#endif  // PVT_HAVE_DNNL
