"""RetinaNet's training targets and test-time decoding against hand-computed values and brute-force references."""
import math

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from pvt_dense.detection.anchors import AnchorGenerator, base_anchors, graph_level_anchors
from pvt_dense.detection.assigner import MaxIoUAssigner, pairwise_iou
from pvt_dense.detection.box_coder import decode_deltas, encode_deltas
from pvt_dense.detection.losses import sigmoid_focal_loss
from pvt_dense.detection.postprocess import InferenceSettings, batched_nms, best_first, detect_image, nms
from pvt_dense.detection.retinanet_head import prior_bias


def iou_reference(a, b):
    """IoU of two x1y1x2y2 boxes, written out."""
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def test_base_anchors_have_the_recipe_sizes_and_ratios():
    anchors = base_anchors(8, octave_base_scale=4, scales_per_octave=3, ratios=(0.5, 1.0, 2.0))
    widths, heights = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    # ratio-major then scale: sqrt(area) = 8 * 4 * 2 ** (k / 3), height / width = ratio
    expected_sides = [32 * 2 ** (k / 3) for k in range(3)] * 3
    np.testing.assert_allclose(np.sqrt(widths * heights), expected_sides, rtol=1e-5)
    np.testing.assert_allclose(heights / widths, np.repeat([0.5, 1.0, 2.0], 3), rtol=1e-5)
    np.testing.assert_allclose(anchors[:, :2] + anchors[:, 2:], 0.0, atol=1e-5)  # centred on the origin


def test_grid_anchors_follow_the_head_layout_and_graph_equals_host():
    generator = AnchorGenerator(strides=(8, 16))
    anchors = generator.level_anchors(0, 3, 5)
    assert anchors.shape == (3 * 5 * 9, 4)
    # anchor (row y, column x, base a) sits at index (y * W + x) * A + a, centred on (x * 8, y * 8)
    y, x, a = 2, 3, 4
    index = (y * 5 + x) * 9 + a
    np.testing.assert_allclose(anchors[index], generator.base[0][a] + [x * 8, y * 8, x * 8, y * 8])
    graph = graph_level_anchors(Tensor(generator.base[1]), 16.0, 4, 2).asnumpy()
    np.testing.assert_allclose(graph, generator.level_anchors(1, 4, 2), atol=1e-5)


def test_box_coding_round_trip_and_known_deltas():
    rng = np.random.default_rng(0)
    anchors = np.concatenate([rng.uniform(0, 50, (64, 2)), rng.uniform(60, 120, (64, 2))], 1).astype(np.float32)
    boxes = np.concatenate([rng.uniform(0, 50, (64, 2)), rng.uniform(55, 140, (64, 2))], 1).astype(np.float32)
    deltas = encode_deltas(Tensor(anchors), Tensor(boxes)).asnumpy()
    np.testing.assert_allclose(decode_deltas(anchors, deltas), boxes, atol=1e-3)
    # anchor centred at (10, 10), 20 x 20; box centred at (15, 10), 40 x 10
    known = encode_deltas(Tensor([[0.0, 0.0, 20.0, 20.0]]), Tensor([[-5.0, 5.0, 35.0, 15.0]])).asnumpy()
    np.testing.assert_allclose(known, [[0.25, 0.0, math.log(2.0), math.log(0.5)]], atol=1e-6)
    # decoding clips to the image and bounds the size ratio
    wild = decode_deltas(np.asarray([[0, 0, 10, 10]], np.float32), np.asarray([[0, 0, 50, 50]], np.float32),
                         max_shape=(30, 40))
    np.testing.assert_allclose(wild, [[0, 0, 40, 30]])


def test_iou_known_cases():
    anchors = Tensor(np.asarray([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]], np.float32))
    boxes = Tensor(np.asarray([[[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]]], np.float32))
    iou = pairwise_iou(anchors, boxes).asnumpy()[0]
    np.testing.assert_allclose(iou[0], [1.0, 1.0 / 3.0, 0.0], atol=1e-6)  # same, half-shifted, disjoint


def assign_reference(anchors, boxes, pos_thr=0.5, neg_thr=0.4, min_pos_iou=0.0):
    """mmdetection's MaxIoUAssigner for one image, loop by loop: -1 ignore, 0 negative, k + 1 matched to box k."""
    if len(boxes) == 0:
        return np.zeros(len(anchors), np.int64)
    overlaps = np.asarray([[iou_reference(b, a) for a in anchors] for b in boxes])  # (M, N)
    assigned = -np.ones(len(anchors), np.int64)
    best, best_box = overlaps.max(0), overlaps.argmax(0)
    assigned[(best >= 0) & (best < neg_thr)] = 0
    positive = best >= pos_thr
    assigned[positive] = best_box[positive] + 1
    for k in range(len(boxes)):
        if overlaps[k].max() >= min_pos_iou:
            assigned[overlaps[k] == overlaps[k].max()] = k + 1
    return assigned


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_assigner_matches_the_reference_with_padding_and_empty_images(seed):
    rng = np.random.default_rng(seed)
    anchors = AnchorGenerator(strides=(8, 16)).grid_anchors([(6, 6), (3, 3)])
    anchors = np.concatenate(anchors)
    max_gt, counts = 6, [4, 0, 6]
    boxes = np.zeros((3, max_gt, 4), np.float32)
    mask = np.zeros((3, max_gt), np.float32)
    for image, count in enumerate(counts):
        corner = rng.uniform(-5, 40, (count, 2))
        size = rng.uniform(6, 40, (count, 2))
        boxes[image, :count] = np.concatenate([corner, corner + size], 1)
        mask[image, :count] = 1
    boxes[0, 1] = boxes[0, 0]  # two identical boxes: the later one wins the tie, as in mmdetection's loop
    boxes[1, :] = 7.0  # padding rows hold garbage; the mask must hide them
    valid = Tensor(np.ones((3, len(anchors)), np.bool_))
    matched, positive, negative = (t.asnumpy() for t in MaxIoUAssigner()(Tensor(anchors), Tensor(boxes),
                                                                          Tensor(mask), valid))
    for image, count in enumerate(counts):
        expected = assign_reference(anchors, boxes[image, :count])
        np.testing.assert_array_equal(positive[image], expected > 0)
        np.testing.assert_array_equal(negative[image], expected == 0)
        np.testing.assert_array_equal(matched[image][expected > 0], expected[expected > 0] - 1)
    assert negative[1].all() and not positive[1].any()  # no objects: every anchor is background


def test_focal_loss_against_hand_computed_values():
    alpha, gamma = 0.25, 2.0
    logits = np.asarray([0.0, 2.0, -3.0, 4.0], np.float32)
    targets = np.asarray([1.0, 0.0, 1.0, 1.0], np.float32)
    expected = []
    for x, t in zip(logits, targets, strict=True):
        p = 1.0 / (1.0 + math.exp(-x))
        p_t = p if t == 1 else 1.0 - p
        alpha_t = alpha if t == 1 else 1.0 - alpha
        expected.append(-alpha_t * (1.0 - p_t) ** gamma * math.log(p_t))  # Lin et al., eq. 5
    loss = sigmoid_focal_loss(Tensor(logits), Tensor(targets), alpha, gamma).asnumpy()
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    assert abs(expected[0] - 0.25 * 0.25 * math.log(2.0)) < 1e-12  # p = 0.5 by hand: 0.0433
    # the prior bias makes every class start at probability 0.01
    assert abs(1.0 / (1.0 + math.exp(-prior_bias(0.01))) - 0.01) < 1e-12


@pytest.mark.parametrize("gamma", [2.0, 1.5, 0.0])
@pytest.mark.parametrize("mode", [ms.GRAPH_MODE, ms.PYNATIVE_MODE], ids=["graph", "pynative"])
def test_focal_loss_kernel_equals_the_element_wise_loss_and_its_gradient(gamma, mode, pynative):
    # RetinaNetLoss uses the kernel library's per-anchor focal loss where it is loaded: values and gradients must
    # be the element-wise form's, for targets given as class indices (-1: none, and out of range: none).
    from mindspore import nn, ops
    from pvt_dense.models.fast_ops import kernels
    library = kernels()
    if library is None:
        pytest.skip("kernel library unavailable")
    ms.set_context(mode=mode)
    rng = np.random.default_rng(0)
    batch, anchors, classes, alpha = 2, 300, 7, 0.25
    logits = (rng.standard_normal((batch, anchors, classes)) * 4).astype(np.float32)
    logits[0, :3] = [[-90.0] * classes, [90.0] * classes, [0.0] * classes]  # saturated sigmoid, and p = 1/2
    target = rng.integers(-1, classes, (batch, anchors)).astype(np.float32)
    target[1, :2] = [classes, -5]  # out of range: no positive class
    one_hot = (np.arange(classes) == target[..., None]).astype(np.float32)
    weights = rng.random((batch, anchors)).astype(np.float32)  # an upstream gradient that is not all ones

    class Fused(nn.Cell):
        def construct(self, x):
            return (library.focal_loss(x, Tensor(target), Tensor([alpha, gamma], ms.float32)) * Tensor(weights)).sum()

    class ElementWise(nn.Cell):
        def construct(self, x):
            return (sigmoid_focal_loss(x, Tensor(one_hot), alpha, gamma).sum(axis=2) * Tensor(weights)).sum()

    for net in (Fused(), ElementWise()):
        value, grad = ops.value_and_grad(net)(Tensor(logits))
        if isinstance(net, Fused):
            fused = value.asnumpy(), grad.asnumpy()
        else:
            reference = value.asnumpy(), grad.asnumpy()
    # Where the sigmoid saturates the element-wise gradient is nan (exp(90) overflows); the kernel's stays finite:
    # 0 for a confident right answer (x = -90, not the class), (1 - alpha) * weight for a confident wrong one
    # (x = 90, not the class).
    assert np.isfinite(fused[1]).all()
    others = [np.arange(classes) != target[0, row] for row in (0, 1)]
    assert (fused[1][0, 0][others[0]] == 0).all()
    np.testing.assert_allclose(fused[1][0, 1][others[1]], (1 - alpha) * weights[0, 1], rtol=1e-5)
    # At x = 0 the element-wise form differentiates relu and abs at their kinks (0), though the loss is smooth
    # there: its gradient is compared on the other rows, and every row against the derivative in float64.
    rows = np.ones((batch, anchors), bool)
    rows[0, :3] = False
    np.testing.assert_allclose(fused[1][rows], reference[1][rows], rtol=2e-4, atol=1e-6)
    x = logits.astype(np.float64)
    p = 1.0 / (1.0 + np.exp(-x))
    pt = np.where(one_hot == 1, 1.0 - p, p)
    alpha_t = np.where(one_hot == 1, alpha, 1 - alpha)
    bce = np.maximum(x, 0) - x * one_hot + np.log1p(np.exp(-np.abs(x)))
    expected = (alpha_t * pt ** gamma * bce).sum(axis=2)
    np.testing.assert_allclose(fused[0], (expected * weights).sum(), rtol=2e-5)
    dweight = alpha_t * gamma * pt ** max(gamma - 1, 0) * np.where(one_hot == 1, -1, 1) * p * (1 - p)
    derivative = ((p - one_hot) * alpha_t * pt ** gamma + bce * dweight) * weights[..., None]
    np.testing.assert_allclose(fused[1], derivative, rtol=2e-4, atol=1e-6)


def nms_reference(boxes, scores, iou_thr):
    """Brute force: visit boxes by falling score; keep one unless a kept box overlaps it above the threshold."""
    kept = []
    for index in sorted(range(len(scores)), key=lambda i: (-scores[i], i)):
        if all(iou_reference(boxes[index], boxes[k]) <= iou_thr for k in kept):
            kept.append(index)
    return kept


@pytest.mark.parametrize("seed", range(5))
def test_nms_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    corner = rng.uniform(0, 50, (60, 2))
    boxes = np.concatenate([corner, corner + rng.uniform(5, 30, (60, 2))], 1).astype(np.float32)
    scores = rng.choice(np.linspace(0.1, 1.0, 25), 60).astype(np.float32)  # ties included
    assert list(nms(boxes, scores, 0.5)) == nms_reference(boxes, scores, 0.5)
    labels = rng.integers(0, 3, 60)
    expected = sorted((i for c in range(3) for i in np.flatnonzero(labels == c)[
        nms_reference(boxes[labels == c], scores[labels == c], 0.5)]), key=lambda i: (-scores[i], i))
    assert list(batched_nms(boxes, scores, labels, 0.5)) == expected
    for max_num in (1, 7, len(expected), 1000):  # stopping early keeps exactly the first max_num
        assert list(batched_nms(boxes, scores, labels, 0.5, max_num=max_num)) == expected[:max_num]


def test_detect_image_decodes_thresholds_and_maps_boxes_to_the_original_image():
    generator = AnchorGenerator(strides=(8,), octave_base_scale=4, scales_per_octave=1, ratios=(1.0,))
    num_classes, height, width = 2, 4, 4
    cls_map = np.full((num_classes, height, width), -10.0, np.float32)
    cls_map[1, 2, 1] = 3.0  # one confident anchor of class 1 at row 2, column 1
    cls_map[0, 2, 2] = 2.0  # and an overlapping one of class 0 (class-wise NMS keeps both)
    reg_map = np.zeros((4, height, width), np.float32)
    meta = {"resized_size": (32, 32), "scale_factor": (0.5, 0.25), "original_size": (64, 128)}
    boxes, scores, labels = detect_image([cls_map[None], reg_map[None]], 0, generator, num_classes, meta,
                                         InferenceSettings(score_thr=0.05))
    assert list(labels) == [1, 0]
    np.testing.assert_allclose(scores[0], 1 / (1 + math.exp(-3.0)), rtol=1e-6)
    # the anchor (8 - 16, 16 - 16, 8 + 16, 16 + 16) clipped to the 32 x 32 resized image, then scaled back
    np.testing.assert_allclose(boxes[0], [0 / 0.25, 0 / 0.5, 24 / 0.25, 32 / 0.5], atol=1e-4)


def test_nms_matches_torchvision_on_many_boxes():
    """The real framework's NMS (what mmcv's nms calls on the CPU) on 2000 boxes of 80 classes, as RetinaNet
    decodes them: the same kept indices in the same order."""
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    rng = np.random.default_rng(7)
    corner = rng.uniform(0, 1200, (2000, 2))
    boxes = np.concatenate([corner, corner + rng.uniform(4, 300, (2000, 2))], 1).astype(np.float32)
    scores = rng.permutation(np.linspace(0.05, 1.0, 2000)).astype(np.float32)
    labels = rng.integers(0, 80, 2000)
    expected = torchvision.ops.batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores),
                                           torch.from_numpy(labels), 0.5).numpy()
    assert list(batched_nms(boxes, scores, labels, 0.5)) == list(expected)
    assert list(nms(boxes, scores, 0.6)) == list(torchvision.ops.nms(torch.from_numpy(boxes),
                                                                      torch.from_numpy(scores), 0.6).numpy())
    assert nms(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), 0.5).shape == (0,)
    shifted = scores - 0.5  # scores of 0 and below keep their order and ties
    assert list(nms(boxes, shifted, 0.6)) == list(nms(boxes, scores, 0.6))


@pytest.mark.parametrize("count", [1, 7, 300, 5000])
def test_best_first_is_the_head_of_a_stable_sort(count):
    """Scores rounded to two decimals, so many ties fall on the cut: the kept candidates and their order must be
    exactly those of a full stable sort (the decoding's nms_pre)."""
    rng = np.random.default_rng(count)
    scores = np.round(rng.uniform(0, 1, 20000), 2).astype(np.float32)
    candidates = np.flatnonzero(scores > 0.05)
    expected = candidates[np.argsort(-scores[candidates], kind="stable")[:count]]
    np.testing.assert_array_equal(best_first(scores, candidates, count), expected)


@pytest.mark.parametrize("shift, score_thr, count", [(-6.0, 0.05, 1000), (-6.0, 0.3, 5), (-1.0, 0.05, 1000),
                                                      (-6.0, 0.0, 50), (-6.0, 1.0, 50), (-1.0, 0.05, 30),
                                                      (0.0, 0.0, 1), (20.0, 0.05, 30), ("ties", 0.05, 100)])
def test_level_candidates_equal_the_full_map_path(shift, score_thr, count):
    """The logit pre-selection gives exactly what sigmoid-ing the whole level and `best_first` give, scores on the
    threshold itself included (sparse: a trained head; dense: the shift of -1, rounded logits with ties at the
    count-th best, and saturated scores)."""
    from pvt_dense.detection.postprocess import flatten_level, level_candidates
    rng = np.random.default_rng(7)
    anchors, classes, height, width = 9, 4, 13, 17
    if shift == "ties":  # dense, and logits rounded to 0.1: many equal scores at the count-th best
        cls_map = np.round(rng.standard_normal((anchors * classes, height, width)), 1).astype(np.float32)
    else:  # 20: every score is 1.0 in float32 (saturated)
        cls_map = (rng.standard_normal((anchors * classes, height, width)) + shift).astype(np.float32)
    if 0 < score_thr < 1:
        cls_map[:, :2, :3] = np.float32(np.log(score_thr / (1 - score_thr)))  # on the boundary
    reg_map = rng.standard_normal((anchors * 4, height, width)).astype(np.float32)
    scores, deltas = flatten_level(cls_map, reg_map, classes)
    flat = scores.reshape(-1)
    chosen = best_first(flat, np.flatnonzero(flat > score_thr), count)
    got = level_candidates(cls_map, reg_map, classes, score_thr, count)
    expected = (chosen // classes, chosen % classes, flat[chosen], deltas[chosen // classes])
    assert len(got) == len(expected)
    for got_part, expected_part in zip(got, expected):
        np.testing.assert_array_equal(got_part, expected_part)
