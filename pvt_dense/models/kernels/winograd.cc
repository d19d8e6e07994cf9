// 3x3 convolutions with stride 1 and padding 1 (forward) by Winograd's minimal filtering F(2 x 2, 3 x 3) (Lavin &
// Gray, "Fast Algorithms for Convolutional Neural Networks", 2016): each 2 x 2 block of outputs of one channel is
// computed from the 4 x 4 patch of the input around it in a transformed space where the convolution is an
// element-wise product, so the products over the channels become 16 matrix products of (O x C) by (C x tiles)
// instead of one of (O x 9 C) by (C x pixels): 2.25 times fewer multiply-adds. Called by conv.cc's forward for the
// necks' and heads' 3x3 convolutions (FPN, RetinaNet, Semantic FPN), most of a detector's or segmentor's work after
// the backbone, where the map is large enough for it to pay.
#include "common.h"

#ifdef PVT_HAVE_DNNL
namespace {

// F(2 x 2, 3 x 3): an input patch d (4 x 4) -> V = Bt d Bt^T, a filter g (3 x 3) -> U = G g G^T, the element-wise
// product P = U .* V (summed over the input channels: 16 matrix products) -> the outputs Y = At P At^T (2 x 2), with
// Bt = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1], G = [1 0 0; .5 .5 .5; .5 -.5 .5; 0 0 1], At = [1 1 1 0; 0 1 -1 -1].
// Every constant is exact in float32 and the transforms only add and subtract, so the results stay within float32
// rounding of the direct convolution's (F(4 x 4, 3 x 3), with 4 times fewer products, measured about 20 times the
// direct kernel's error: not used).
struct WinoLayout {
  int64_t c, h, w, o, tiles_y, tiles_x;
  int64_t tiles() const { return tiles_y * tiles_x; }
};

// U[xi][o][c] for the 16 positions xi: the filters of output channels [o0, o1) in the transformed space.
void filter_transform(const WinoLayout &L, const float *__restrict w, int64_t o0, int64_t o1, float *__restrict u) {
  const int64_t oc = L.o * L.c;
  for (int64_t o = o0; o < o1; ++o) {
    for (int64_t c = 0; c < L.c; ++c) {
      const float *g = w + (o * L.c + c) * 9;
      float gg[4][3];  // G g
      for (int j = 0; j < 3; ++j) {
        gg[0][j] = g[j];
        gg[1][j] = 0.5f * (g[j] + g[3 + j] + g[6 + j]);
        gg[2][j] = 0.5f * (g[j] - g[3 + j] + g[6 + j]);
        gg[3][j] = g[6 + j];
      }
      for (int i = 0; i < 4; ++i) {  // (G g) G^T
        float *dst = u + (i * 4) * oc + o * L.c + c;
        dst[0] = gg[i][0];
        dst[oc] = 0.5f * (gg[i][0] + gg[i][1] + gg[i][2]);
        dst[2 * oc] = 0.5f * (gg[i][0] - gg[i][1] + gg[i][2]);
        dst[3 * oc] = gg[i][2];
      }
    }
  }
}

// Runs body(ty, tx0, tx1, t) over the tile rows that the tiles [t0, t1) cover: tiles (ty, tx) for tx in [tx0, tx1),
// the first of them being tile number t of the block (t - t0 its column in the block's matrices).
template <class Body>
void tile_rows(const WinoLayout &L, int64_t t0, int64_t t1, const Body &body) {
  for (int64_t t = t0; t < t1;) {
    const int64_t ty = t / L.tiles_x, tx0 = t % L.tiles_x, tx1 = std::min(L.tiles_x, tx0 + (t1 - t));
    body(ty, tx0, tx1, t - t0);
    t += tx1 - tx0;
  }
}

// V[xi][c][t - t0] (row length ld) for the tiles [t0, t1) of one image x (C, H, W): the 4x4
// input patch of tile (ty, tx) starts at row 2 ty - 1 and column 2 tx - 1 (the padding of 1), zero outside the
// image. V = Bt d Bt^T written out (Bt = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]), vectorised across the tiles of
// a row: each patch row is read from a zero-padded copy of its image row.
void input_transform(const WinoLayout &L, const float *__restrict x, int64_t t0, int64_t t1, float *__restrict v,
                     int64_t ld) {
  const int64_t cl = L.c * ld, padded = 2 * L.tiles_x + 2;
  std::vector<float> rows_buffer(static_cast<size_t>(4 * padded));
  for (int64_t c = 0; c < L.c; ++c) {
    const float *plane = x + c * L.h * L.w;
    float *out = v + c * ld;
    tile_rows(L, t0, t1, [&](int64_t ty, int64_t tx0, int64_t tx1, int64_t col) {
      // rows 2 ty - 1 .. 2 ty + 2, columns 2 tx0 - 1 .. 2 tx1 (r[i][k] is column 2 tx0 - 1 + k)
      const int64_t first = 2 * tx0 - 1, count = 2 * (tx1 - tx0) + 2;
      float *r[4];
      for (int i = 0; i < 4; ++i) {
        r[i] = rows_buffer.data() + i * padded;
        const int64_t yy = 2 * ty - 1 + i;
        for (int64_t k = 0; k < count; ++k) {
          const int64_t xx = first + k;
          r[i][k] = (yy >= 0 && yy < L.h && xx >= 0 && xx < L.w) ? plane[yy * L.w + xx] : 0.0f;
        }
      }
      const int64_t n = tx1 - tx0;
      float *__restrict o = out + col;
#pragma omp simd
      for (int64_t k = 0; k < n; ++k) {
        float d[4][4];
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < 4; ++j) d[i][j] = r[i][2 * k + j];
        float e[4][4];  // Bt d
        for (int j = 0; j < 4; ++j) {
          e[0][j] = d[0][j] - d[2][j];
          e[1][j] = d[1][j] + d[2][j];
          e[2][j] = d[2][j] - d[1][j];
          e[3][j] = d[1][j] - d[3][j];
        }
        for (int i = 0; i < 4; ++i) {  // (Bt d) Bt^T
          o[(i * 4 + 0) * cl + k] = e[i][0] - e[i][2];
          o[(i * 4 + 1) * cl + k] = e[i][1] + e[i][2];
          o[(i * 4 + 2) * cl + k] = e[i][2] - e[i][1];
          o[(i * 4 + 3) * cl + k] = e[i][1] - e[i][3];
        }
      }
    });
  }
}

// y (O, H, W) on the tiles [t0, t1): At P At^T + bias (then ReLU), At = [1 1 1 0; 0 1 -1 -1], P from the products
// p[xi][o][t - t0] (row length ld); outputs past the image's edge are not written.
void output_transform(const WinoLayout &L, const float *__restrict p, int64_t ld, int64_t t0, int64_t t1,
                      const float *__restrict b, bool relu, float *__restrict y) {
  const int64_t stride = L.o * ld;
  std::vector<float> rows_buffer(static_cast<size_t>(4 * L.tiles_x));
  float *row0 = rows_buffer.data(), *row1 = row0 + 2 * L.tiles_x;
  for (int64_t o = 0; o < L.o; ++o) {
    float *plane = y + o * L.h * L.w;
    const float *src = p + o * ld;
    const float bias = b[o];
    tile_rows(L, t0, t1, [&](int64_t ty, int64_t tx0, int64_t tx1, int64_t col) {
      const int64_t n = tx1 - tx0;
      const float *__restrict q = src + col;
#pragma omp simd
      for (int64_t k = 0; k < n; ++k) {
        float s[2][4];  // At q
        for (int j = 0; j < 4; ++j) {
          const float q0 = q[(0 + j) * stride + k], q1 = q[(4 + j) * stride + k];
          const float q2 = q[(8 + j) * stride + k], q3 = q[(12 + j) * stride + k];
          s[0][j] = q0 + q1 + q2;
          s[1][j] = q1 - q2 - q3;
        }
        float out[2][2];
        for (int i = 0; i < 2; ++i) {
          out[i][0] = bias + s[i][0] + s[i][1] + s[i][2];
          out[i][1] = bias + s[i][1] - s[i][2] - s[i][3];
          if (relu) {
            out[i][0] = out[i][0] > 0.0f ? out[i][0] : 0.0f;
            out[i][1] = out[i][1] > 0.0f ? out[i][1] : 0.0f;
          }
        }
        row0[2 * k] = out[0][0];
        row0[2 * k + 1] = out[0][1];
        row1[2 * k] = out[1][0];
        row1[2 * k + 1] = out[1][1];
      }
      const int64_t x0 = 2 * tx0, cols = std::min<int64_t>(2 * n, L.w - x0);
      std::memcpy(plane + 2 * ty * L.w + x0, row0, sizeof(float) * cols);
      if (2 * ty + 1 < L.h) std::memcpy(plane + (2 * ty + 1) * L.w + x0, row1, sizeof(float) * cols);
    });
  }
}

// Tiles per block: the block's transformed input (16 C tiles floats) and products (16 O tiles) stay near the cache
// while each of the 16 products still has enough columns for an efficient sgemm.
constexpr int64_t kBlockTiles = 128;

}  // namespace

namespace pvt {
int winograd_conv3x3(int64_t batch, int64_t c, int64_t h, int64_t w, int64_t o, const float *x, const float *wt,
                     const float *b, bool relu, float *y) {
  constexpr int a2 = 16;
  const WinoLayout L{c, h, w, o, (h + 1) / 2, (w + 1) / 2};
  const int64_t nt = kBlockTiles, blocks = (L.tiles() + nt - 1) / nt, units = batch * blocks;
  const int64_t in_size = c * h * w, out_size = o * h * w;
  if (units < 2 * thread_count()) return -1;  // a small map: too few blocks to share, the direct path is faster
  std::vector<float> u(static_cast<size_t>(a2 * o * c));
  parallel_for(o, 16, [&](int64_t o0, int64_t o1, int) { filter_transform(L, wt, o0, o1, u.data()); });
  std::atomic<int> status{0};
  // Each thread transforms, multiplies and writes back its own blocks: the 16 products (O x C) (C x tiles) of a
  // block written to p[xi] (O x tiles).
  parallel_for(units, 1, [&](int64_t b0, int64_t b1, int) {
    std::vector<float> v(static_cast<size_t>(a2 * c * nt)), p(static_cast<size_t>(a2 * o * nt));
    for (int64_t unit = b0; unit < b1; ++unit) {
      const int64_t image = unit / blocks, t0 = (unit % blocks) * nt, t1 = std::min(L.tiles(), t0 + nt);
      input_transform(L, x + image * in_size, t0, t1, v.data(), nt);
      for (int xi = 0; xi < a2; ++xi)
        if (dnnl_sgemm('N', 'N', o, t1 - t0, c, 1.0f, u.data() + xi * o * c, c, v.data() + xi * c * nt, nt, 0.0f,
                       p.data() + xi * o * nt, nt) != 0)
          status = 2;
      output_transform(L, p.data(), nt, t0, t1, b, relu, y + image * out_size);
    }
  });
  return status.load();
}
}  // namespace pvt
#endif  // PVT_HAVE_DNNL
