// RetinaNet's sigmoid focal loss (mmdetection's formulation) summed over the classes of each anchor, and its
// gradient, without the (batch, anchors, classes) temporaries of the element-wise form: at 800x1216, batch 2 that
// tensor is 117 MB and the MindSpore chain (sigmoid, pt, weight, pow, BCE, one-hot targets) kept ~1.5 GB of them
// for the backward, more than the whole backbone's activations.
#include "common.h"

namespace {

struct FocalTerms {
  float loss, grad;  // the focal loss of one (anchor, class) and its derivative in the logit
};

// t: 1 for the anchor's target class, else 0. loss = w * BCE(x, t), w = (alpha t + (1 - alpha)(1 - t)) pt^gamma,
// pt = (1 - p) t + p (1 - t), p = sigmoid(x); BCE in its stable form max(x, 0) - x t + log1p(exp(-|x|)).
inline FocalTerms focal_terms(float x, bool target, float alpha, float gamma) {
  const float e = exp_clamped(-std::fabs(x));
  const float p = x >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
  const float t = target ? 1.0f : 0.0f;
  const float a_t = target ? alpha : 1.0f - alpha;
  const float pt = target ? 1.0f - p : p;
  float pt_gamma, pt_gamma_1;  // pt^gamma and pt^(gamma - 1)
  if (gamma == 2.0f) {
    pt_gamma = pt * pt;
    pt_gamma_1 = pt;
  } else if (gamma == 0.0f) {
    pt_gamma = 1.0f;
    pt_gamma_1 = 0.0f;  // its factor gamma is 0: no term, and no 0 * inf where pt = 0
  } else {
    pt_gamma = std::pow(pt, gamma);
    pt_gamma_1 = std::pow(pt, gamma - 1.0f);
  }
  const float bce = (x > 0.0f ? x : 0.0f) - x * t + std::log1p(e);
  const float weight = a_t * pt_gamma;
  const float dpt = (target ? -1.0f : 1.0f) * p * (1.0f - p);
  const float dweight = a_t * gamma * pt_gamma_1 * dpt;
  return {bce * weight, (p - t) * weight + bce * dweight};
}

// The row's target class as an index, -1 for none (negatives and ignored anchors carry -1, or any value outside
// [0, K)).
inline int64_t target_index(float label, int64_t classes) {
  return label >= 0.0f && label < static_cast<float>(classes) ? static_cast<int64_t>(label) : -1;
}

// Shapes: logits (B, N, K), labels (B, N) (the positive anchor's class index, anything outside [0, K) for
// negatives and ignored anchors), meta (2,) = [alpha, gamma].
inline bool focal_shapes(const int *ndims, int64_t **shapes) {
  return ndims[0] == 3 && ndims[1] == 2 && shapes[1][0] == shapes[0][0] && shapes[1][1] == shapes[0][1] &&
         is_vector(ndims, shapes, 2, 2);
}

// Runs body(r, logits of anchor r, its target index, focal terms of (anchor r, class k) as a function of k) over the
// B N anchors, in parallel: the loss and its gradient share inputs (logits, labels, meta [alpha, gamma]) and loop.
template <class Body>
void for_each_anchor(void **params, int64_t **shapes, const Body &body) {
  const float *logits = static_cast<const float *>(params[0]);
  const float *labels = static_cast<const float *>(params[1]);
  const float *meta = static_cast<const float *>(params[2]);
  const int64_t rows = shapes[0][0] * shapes[0][1], classes = shapes[0][2];
  const float alpha = meta[0], gamma = meta[1];
  parallel_for(rows, 256, [&](int64_t begin, int64_t end, int) {
    for (int64_t r = begin; r < end; ++r) {
      const float *x = logits + r * classes;
      const int64_t label = target_index(labels[r], classes);
      body(r, classes, [&](int64_t k) { return focal_terms(x[k], k == label, alpha, gamma); });
    }
  });
}

int PvtFocalLossUnchecked(int, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  float *out = static_cast<float *>(params[3]);
  for_each_anchor(params, shapes, [&](int64_t r, int64_t classes, const auto &terms) {
    float total = 0.0f;
    for (int64_t k = 0; k < classes; ++k) total += terms(k).loss;
    out[r] = total;
  });
  return 0;
}

int PvtFocalLossGradUnchecked(int, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  const float *dout = static_cast<const float *>(params[3]);
  float *dlogits = static_cast<float *>(params[4]);
  for_each_anchor(params, shapes, [&](int64_t r, int64_t classes, const auto &terms) {
    float *dx = dlogits + r * classes;
    for (int64_t k = 0; k < classes; ++k) dx[k] = dout[r] * terms(k).grad;
  });
  return 0;
}

}  // namespace

extern "C" {

// logits (B, N, K), labels (B, N), meta (2,) -> per-anchor loss (B, N), summed over the K classes.
PVT_ENTRY(PvtFocalLoss, 4, focal_shapes(ndims, shapes) && ndims[3] == 2 && shapes[3][0] == shapes[0][0] &&
                               shapes[3][1] == shapes[0][1])
// logits, labels, meta, dloss (B, N) -> dlogits (B, N, K).
PVT_ENTRY(PvtFocalLossGrad, 5, focal_shapes(ndims, shapes) && same_shape(ndims, shapes, 1, 3) &&
                                   same_shape(ndims, shapes, 0, 4))

}  // extern "C"
