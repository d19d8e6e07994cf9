// Multi-head attention on the token layouts of the q and kv Linear layers (forward, key-bias forward, backward),
// blocked so that no N x M score matrix is stored, on oneDNN's sgemm: built only with PVT_HAVE_DNNL.
#include "common.h"

#ifdef PVT_HAVE_DNNL
extern "C" {

// Row-wise softmax of a (rows x m) block in place.
// Each row of s (rows x m) [plus bias (m), when given] becomes exp(row - max of row), unnormalised; inverse[r] gets
// 1 / its sum. The forward scales the rows' product with v instead of the m scores (d values a row, not m).
inline void exp_rows(float *s, int64_t rows, int64_t m, const float *__restrict bias, float *inverse) {
  for (int64_t r = 0; r < rows; ++r) {
    float *__restrict row = s + r * m;
    if (bias != nullptr) {
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) row[j] += bias[j];
    }
    float top = row[0];
    // an explicit max reduction: without it the loop stays scalar (measured: 283 -> 211 ms for one stage-1
    // attention of PVT-Tiny at 800x1216, one thread)
#pragma omp simd reduction(max : top)
    for (int64_t j = 1; j < m; ++j) top = row[j] > top ? row[j] : top;
    float total = 0.0f;
#pragma omp simd reduction(+ : total)
    for (int64_t j = 0; j < m; ++j) {
      row[j] = exp_clamped(row[j] - top);
      total += row[j];
    }
    inverse[r] = 1.0f / total;
  }
}

// Row-wise softmax in place, normalised (the backward needs the probabilities themselves).
inline void softmax_rows(float *s, int64_t rows, int64_t m) {
  for (int64_t r = 0; r < rows; ++r) {
    float inverse;
    exp_rows(s + r * m, 1, m, nullptr, &inverse);
    float *__restrict row = s + r * m;
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) row[j] *= inverse;
  }
}

// Multi-head attention on token layouts, as the q and kv Linear layers produce them, so that no head transpose,
// key/value split or scaling pass is needed around it:
//   q (B, N, C) with C = heads * D (head h in columns [h D, (h + 1) D)),
//   kv (B, M, 2 C) (keys in columns [0, C), values in [C, 2 C), heads as in q),
//   meta (2) = [heads, scale];  out (B, N, C) = per head softmax(scale q k^T) v, heads side by side.
struct HeadLayout {
  int64_t batch, n, m, c, heads, d;
  float scale;
  int64_t groups() const { return batch * heads; }
  // Offsets of group g = (b, h): its queries / outputs (leading dimension c), keys and values (leading 2 c).
  int64_t q_at(int64_t g, int64_t row) const { return ((g / heads) * n + row) * c + (g % heads) * d; }
  int64_t k_at(int64_t g) const { return (g / heads) * m * 2 * c + (g % heads) * d; }
  int64_t v_at(int64_t g) const { return k_at(g) + c; }
};

// The layout of q, kv and meta, or false when they do not fit together (meta is read here: its values, not its
// shape, give the head count).
bool head_layout(int *ndims, int64_t **shapes, const float *meta, HeadLayout *out) {
  const float heads = meta[0], scale = meta[1];
  const int64_t c = shapes[0][2];
  if (!(heads >= 1.0f && heads <= static_cast<float>(c > 0 ? c : 1)) || heads != std::floor(heads) ||
      !std::isfinite(scale))
    return false;
  const int64_t h = static_cast<int64_t>(heads);
  if (c % h != 0) return false;
  *out = {shapes[0][0], shapes[0][1], shapes[1][1], c, h, c / h, scale};
  return true;
}

// Blocks of 64 query rows: scores (64 x M) in a per-thread buffer, softmax in place, then times v, so the
// N x M score matrix is never stored (at 800x1344 it would be 67200 x 1050 per stage-1 block).
constexpr int64_t kAttentionRows = 64;

// out = per head softmax(scale q k^T [+ bias]) v (see HeadLayout); bias (B, M) or null. bias[b, j] is added to every
// score of key j in batch element b before the softmax: -1e30 leaves key j out exactly, which is how padded positions
// of a size bucket are kept out of the attention (inference only, so PvtAttentionGrad has no bias).
static int attention_forward(int *ndims, int64_t **shapes, const float *q, const float *kv, const float *meta,
                             const float *bias, float *out) {
  HeadLayout L;
  if (!head_layout(ndims, shapes, meta, &L)) return 1;
  if (L.n == 0 || L.c == 0 || L.batch == 0) return 0;
  if (L.m == 0) {
    std::memset(out, 0, sizeof(float) * L.batch * L.n * L.c);
    return 0;
  }
  const int64_t blocks = (L.n + kAttentionRows - 1) / kAttentionRows, m = L.m, d = L.d, c = L.c;
  std::atomic<int> status{0};
  parallel_for(L.groups() * blocks, 1, [&](int64_t t0, int64_t t1, int) {
    std::vector<float> scores(static_cast<size_t>(kAttentionRows * m));
    float inverse[kAttentionRows];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t g = t / blocks, r0 = (t % blocks) * kAttentionRows;
      const int64_t rows = L.n - r0 < kAttentionRows ? L.n - r0 : kAttentionRows;
      float *s = scores.data();
      if (dnnl_sgemm('N', 'T', rows, m, d, L.scale, q + L.q_at(g, r0), c, kv + L.k_at(g), 2 * c, 0.0f, s, m) != 0)
        status = 2;
      exp_rows(s, rows, m, bias != nullptr ? bias + (g / L.heads) * m : nullptr, inverse);
      float *o = out + L.q_at(g, r0);
      if (dnnl_sgemm('N', 'N', rows, d, m, 1.0f, s, m, kv + L.v_at(g), 2 * c, 0.0f, o, c) != 0) status = 2;
      for (int64_t r = 0; r < rows; ++r) {
        float *__restrict orow = o + r * c;
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) orow[j] *= inverse[r];
      }
    }
  });
  return status.load();
}

// inputs: q, kv, meta; output: out.
static int PvtAttentionUnchecked(int nparam, void **params, int *ndims, int64_t **shapes,
                                 const char **dtypes, void *, void *) {
  if (nparam != 4 || !all_float32(4, dtypes)) return 1;
  return attention_forward(ndims, shapes, static_cast<const float *>(params[0]),
                           static_cast<const float *>(params[1]), static_cast<const float *>(params[2]), nullptr,
                           static_cast<float *>(params[3]));
}

// inputs: q, kv, meta, bias (B, M); output: out.
static int PvtAttentionBiasUnchecked(int nparam, void **params, int *ndims, int64_t **shapes,
                                     const char **dtypes, void *, void *) {
  if (nparam != 5 || !all_float32(5, dtypes)) return 1;
  return attention_forward(ndims, shapes, static_cast<const float *>(params[0]),
                           static_cast<const float *>(params[1]), static_cast<const float *>(params[2]),
                           static_cast<const float *>(params[3]), static_cast<float *>(params[4]));
}

// The backward of group g's query rows [r0, r0 + rows): recomputes p = softmax(scale q k^T) for those rows (as the
// forward did), writes their dq and adds their share of dk and dv into dk_acc and dv_acc (m x d, leading
// dimension ld). ds = p * (dp - rowsum(dp * p)) with dp = dout v^T. `scratch` holds 2 * rows * m floats.
int attention_grad_rows(const HeadLayout &L, const float *q, const float *kv, const float *dout, float *dq,
                        int64_t g, int64_t r0, int64_t rows, float *dk_acc, float *dv_acc, int64_t ld,
                        float *scratch) {
  const int64_t m = L.m, d = L.d, c = L.c;
  const float *qg = q + L.q_at(g, r0), *k = kv + L.k_at(g), *v = kv + L.v_at(g), *dog = dout + L.q_at(g, r0);
  int status = 0;
  float *p = scratch, *ds = scratch + rows * m;
  if (dnnl_sgemm('N', 'T', rows, m, d, L.scale, qg, c, k, 2 * c, 0.0f, p, m) != 0) status = 2;
  softmax_rows(p, rows, m);
  if (dnnl_sgemm('N', 'T', rows, m, d, 1.0f, dog, c, v, 2 * c, 0.0f, ds, m) != 0) status = 2;
  for (int64_t r = 0; r < rows; ++r) {
    const float *__restrict pr = p + r * m;
    float *__restrict dr = ds + r * m;
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (int64_t j = 0; j < m; ++j) dot += dr[j] * pr[j];
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) dr[j] = pr[j] * (dr[j] - dot);
  }
  if (dnnl_sgemm('N', 'N', rows, d, m, L.scale, ds, m, k, 2 * c, 0.0f, dq + L.q_at(g, r0), c) != 0) status = 2;
  if (dnnl_sgemm('T', 'N', m, d, rows, L.scale, ds, m, qg, c, 1.0f, dk_acc, ld) != 0) status = 2;
  if (dnnl_sgemm('T', 'N', m, d, rows, 1.0f, p, m, dog, c, 1.0f, dv_acc, ld) != 0) status = 2;
  return status;
}

// inputs: q, kv, meta, dout like q; outputs: dq like q, dkv like kv. The probabilities are recomputed per (group,
// block of 64 query rows) in a per-thread buffer, so no N x M matrix of the whole tensor is ever stored. dk and dv
// sum over every query row of their group: with at least as many groups as threads each thread owns whole groups;
// otherwise (batch 1, one head) each thread sums its rows into its own (M x D) partials, added up in slot order.
static int PvtAttentionGradUnchecked(int nparam, void **params, int *ndims, int64_t **shapes,
                                     const char **dtypes, void *, void *) {
  if (nparam != 6 || !all_float32(6, dtypes)) return 1;
  const float *q = static_cast<const float *>(params[0]);
  const float *kv = static_cast<const float *>(params[1]);
  const float *dout = static_cast<const float *>(params[3]);
  float *dq = static_cast<float *>(params[4]);
  float *dkv = static_cast<float *>(params[5]);
  HeadLayout L;
  if (!head_layout(ndims, shapes, static_cast<const float *>(params[2]), &L)) return 1;
  std::memset(dkv, 0, sizeof(float) * L.batch * L.m * 2 * L.c);
  if (L.n == 0 || L.c == 0 || L.batch == 0) return 0;
  if (L.m == 0) {
    std::memset(dq, 0, sizeof(float) * L.batch * L.n * L.c);
    return 0;
  }
  const int64_t blocks = (L.n + kAttentionRows - 1) / kAttentionRows, m = L.m, d = L.d, c = L.c;
  const int64_t groups = L.groups();
  std::atomic<int> status{0};
  const int threads = thread_count();
  if (groups >= threads || blocks == 1) {
    // Heads of one sample write disjoint columns of the same dkv rows: no two threads write one element.
    parallel_for(groups, 1, [&](int64_t g0, int64_t g1, int) {
      std::vector<float> scratch(static_cast<size_t>(2 * kAttentionRows * m));
      for (int64_t g = g0; g < g1; ++g)
        for (int64_t r0 = 0; r0 < L.n; r0 += kAttentionRows) {
          const int64_t rows = L.n - r0 < kAttentionRows ? L.n - r0 : kAttentionRows;
          if (attention_grad_rows(L, q, kv, dout, dq, g, r0, rows, dkv + L.k_at(g), dkv + L.v_at(g), 2 * c,
                                  scratch.data()) != 0)
            status = 2;
        }
    });
    return status.load();
  }
  const int64_t part = m * d;
  std::vector<float> partial(static_cast<size_t>(threads) * 2 * part);
  for (int64_t g = 0; g < groups; ++g) {
    std::fill(partial.begin(), partial.end(), 0.0f);
    parallel_for(blocks, 1, [&](int64_t b0, int64_t b1, int slot) {
      std::vector<float> scratch(static_cast<size_t>(2 * kAttentionRows * m));
      float *pk = partial.data() + static_cast<size_t>(slot) * 2 * part, *pv = pk + part;
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t r0 = b * kAttentionRows, rows = L.n - r0 < kAttentionRows ? L.n - r0 : kAttentionRows;
        if (attention_grad_rows(L, q, kv, dout, dq, g, r0, rows, pk, pv, d, scratch.data()) != 0) status = 2;
      }
    });
    for (int s = 0; s < threads; ++s) {
      const float *pk = partial.data() + static_cast<size_t>(s) * 2 * part, *pv = pk + part;
      for (int64_t j = 0; j < m; ++j) {
        float *__restrict gk = dkv + L.k_at(g) + j * 2 * c, *__restrict gv = dkv + L.v_at(g) + j * 2 * c;
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) {
          gk[i] += pk[j * d + i];
          gv[i] += pv[j * d + i];
        }
      }
    }
  }
  return status.load();
}

// q (B, N, C), kv (B, M, 2C), meta [heads, scale] -> out like q
PVT_ENTRY(PvtAttention, 4,
          ndims[0] == 3 && ndims[1] == 3 && shapes[1][0] == shapes[0][0] && shapes[1][2] == 2 * shapes[0][2] &&
              element_count(ndims[2], shapes[2]) == 2 && same_shape(ndims, shapes, 0, 3))
// q, kv, meta, bias (B, M) -> out like q
PVT_ENTRY(PvtAttentionBias, 5,
          ndims[0] == 3 && ndims[1] == 3 && shapes[1][0] == shapes[0][0] && shapes[1][2] == 2 * shapes[0][2] &&
              element_count(ndims[2], shapes[2]) == 2 && ndims[3] == 2 && shapes[3][0] == shapes[0][0] &&
              shapes[3][1] == shapes[1][1] && same_shape(ndims, shapes, 0, 4))
// q, kv, meta, dout like q -> dq like q, dkv like kv
PVT_ENTRY(PvtAttentionGrad, 6,
          ndims[0] == 3 && ndims[1] == 3 && shapes[1][0] == shapes[0][0] && shapes[1][2] == 2 * shapes[0][2] &&
              element_count(ndims[2], shapes[2]) == 2 && same_shape(ndims, shapes, 0, 3) &&
              same_shape(ndims, shapes, 0, 4) && same_shape(ndims, shapes, 1, 5))

}  // extern "C"
#endif  // PVT_HAVE_DNNL
