"""RetinaNet against mmdetection 3.3 itself: the test pipeline's pixels on real image files, `predict_by_feat`'s
detections and their COCO AP, `loss_by_feat`'s anchors, targets and per-level losses, and torch autograd's
gradients of the head. The backbone is left out where only the head, targets or losses are under test: both sides
get identical head outputs (or identical FPN features and copied head weights)."""
import json
import os

import cv2
import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn, ops

from mmlab_reference import require_mmdet
from pvt_dense.data.images import read_image
from pvt_dense.detection.anchors import AnchorGenerator
from pvt_dense.detection.coco import CocoDetection
from pvt_dense.detection.detector import RetinaNetLoss
from pvt_dense.detection.evaluation import coco_evaluate, detections_to_coco
from pvt_dense.detection.postprocess import InferenceSettings, detect_image
from pvt_dense.detection.retinanet_head import RetinaNetHead
from pvt_dense.detection.transforms import prepare_image

MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
STRIDES = (8, 16, 32, 64, 128)


def mmdet_retina_head_config(num_classes, in_channels=8, feat_channels=8, stacked_convs=1):
    """RetinaHead exactly as mmdetection's retinanet_r50_fpn_1x_coco / PVT RetinaNet configs set it up."""
    return dict(
        type="RetinaHead", num_classes=num_classes, in_channels=in_channels, stacked_convs=stacked_convs,
        feat_channels=feat_channels,
        anchor_generator=dict(type="AnchorGenerator", octave_base_scale=4, scales_per_octave=3,
                              ratios=[0.5, 1.0, 2.0], strides=list(STRIDES)),
        bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[1.0] * 4),
        loss_cls=dict(type="FocalLoss", use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0),
        loss_bbox=dict(type="L1Loss", loss_weight=1.0),
        train_cfg=dict(assigner=dict(type="MaxIoUAssigner", pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0,
                                     ignore_iof_thr=-1),
                       sampler=dict(type="PseudoSampler"), allowed_border=-1, pos_weight=-1, debug=False),
        test_cfg=dict(nms_pre=1000, min_bbox_size=0, score_thr=0.05, nms=dict(type="nms", iou_threshold=0.5),
                      max_per_img=100))


def mmdet_retina_head(num_classes, in_channels=8, feat_channels=8, stacked_convs=1):
    require_mmdet()
    from mmdet.registry import MODELS
    from mmengine.config import ConfigDict
    return MODELS.build(ConfigDict(mmdet_retina_head_config(num_classes, in_channels, feat_channels, stacked_convs)))


def level_sizes(pad_height, pad_width):
    """The FPN's P3-P7 map sizes for a padded input (stride-2 3x3 convs give ceil(size / 2) beyond P5)."""
    return [(-(-pad_height // s), -(-pad_width // s)) for s in STRIDES]


# ---------------------------------------------------------------------------------------------------------------
# test protocol: pixels and detections on real image files

def sample_photos():
    """Photos of several shapes for both codecs: name -> RGB."""
    skimage_data = pytest.importorskip("skimage.data")
    return {
        "astronaut_333x500.jpg": cv2.resize(skimage_data.astronaut(), (500, 333), interpolation=cv2.INTER_AREA),
        "coffee_500x333.png": cv2.resize(skimage_data.coffee()[:, 100:500], (333, 500),
                                         interpolation=cv2.INTER_AREA),
        "chelsea_211x387.jpg": cv2.resize(skimage_data.chelsea(), (387, 211), interpolation=cv2.INTER_AREA),
        "rocket_97x1023.png": cv2.resize(skimage_data.rocket()[100:300], (1023, 97), interpolation=cv2.INTER_AREA),
    }


def mmdet_test_inputs(path):
    """mmdetection's test pipeline and data preprocessor on one file: (inputs (1, 3, H, W), data sample)."""
    require_mmdet()
    from mmdet.models.data_preprocessors import DetDataPreprocessor
    from mmengine.dataset import Compose
    pipeline = Compose([dict(type="LoadImageFromFile"), dict(type="Resize", scale=(1333, 800), keep_ratio=True),
                        dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape",
                                                              "scale_factor"))])
    packed = pipeline(dict(img_path=path, img_id=0))
    preprocessor = DetDataPreprocessor(mean=list(MEAN), std=list(STD), bgr_to_rgb=True, pad_size_divisor=32)
    batch = preprocessor({"inputs": [packed["inputs"]], "data_samples": [packed["data_samples"]]}, training=False)
    return batch["inputs"], batch["data_samples"][0]


@pytest.fixture(scope="module")
def photos(tmp_path_factory, write_photos):
    """The sample photos written with OpenCV: name -> path (str)."""
    written = write_photos(tmp_path_factory.mktemp("photos"), sample_photos())
    return {name: str(path) for name, path in written.items()}


def test_test_pipeline_pixels_equal_mmdetection(photos):
    for name, path in photos.items():
        inputs, sample = mmdet_test_inputs(path)
        chw, _, meta = prepare_image(read_image(path), np.zeros((0, 4)), (1333, 800), False, MEAN, STD, 32)
        assert chw.shape[1:] == tuple(sample.batch_input_shape) == tuple(sample.pad_shape), name
        assert meta["resized_size"] == tuple(sample.img_shape), name
        np.testing.assert_allclose(meta["scale_factor"][::-1], sample.scale_factor, rtol=1e-12)
        np.testing.assert_allclose(chw, inputs[0].numpy(), atol=1e-5, err_msg=name)


def random_head_outputs(rng, sizes, num_classes, batch=1):
    """Class logits with plenty of scores above 0.05 (nms_pre is exercised on the large levels) and box deltas
    with a few wild values (the wh_ratio_clip and the clipping to the image are exercised)."""
    cls_maps, reg_maps = [], []
    for height, width in sizes:
        cls_maps.append(rng.normal(-3.5, 1.2, (batch, 9 * num_classes, height, width)).astype(np.float32))
        deltas = rng.normal(0.0, 0.4, (batch, 36, height, width))
        wild = rng.random(deltas.shape) < 0.02
        deltas[wild] = rng.normal(0.0, 6.0, int(wild.sum()))
        reg_maps.append(deltas.astype(np.float32))
    return cls_maps, reg_maps


def mmdet_predictions(head, cls_maps, reg_maps, sample):
    import torch
    with torch.no_grad():
        result = head.predict_by_feat([torch.from_numpy(m) for m in cls_maps], [torch.from_numpy(m) for m in reg_maps],
                                      batch_img_metas=[sample.metainfo], rescale=True)[0]
    return result.bboxes.numpy(), result.scores.numpy(), result.labels.numpy()


def write_tiny_coco(path, photos, detections, num_classes, rng):
    """A COCO file for the photos whose ground truth is every 7th detection (jittered by up to 20%), so that
    detections match some of it at every IoU threshold and miss the rest: AP strictly between 0 and 1."""
    images, annotations = [], []
    for image_id, name in enumerate(sorted(photos), 1):
        height, width = cv2.imread(photos[name]).shape[:2]
        images.append({"id": image_id, "file_name": name, "height": height, "width": width})
        boxes, _, labels = detections[name]
        for box, label in zip(boxes[::7], labels[::7], strict=True):
            x1, y1, x2, y2 = (float(v) for v in box)
            w, h = (x2 - x1) * rng.uniform(0.8, 1.2), (y2 - y1) * rng.uniform(0.8, 1.2)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "bbox": [x1, y1, w, h],
                                "area": w * h, "iscrowd": 0, "category_id": int(label) + 1})
    with open(path, "w") as handle:
        json.dump({"images": images, "annotations": annotations,
                   "categories": [{"id": k + 1, "name": f"c{k}"} for k in range(num_classes)]}, handle)
    return path


def test_decoded_detections_and_their_ap_equal_mmdetection(photos, tmp_path):
    num_classes = 3
    head = mmdet_retina_head(num_classes)
    generator = AnchorGenerator(STRIDES)
    rng = np.random.default_rng(0)
    ours, theirs = {}, {}
    for name, path in sorted(photos.items()):
        _, sample = mmdet_test_inputs(path)
        _, _, meta = prepare_image(read_image(path), np.zeros((0, 4)), (1333, 800), False, MEAN, STD, 32)
        cls_maps, reg_maps = random_head_outputs(rng, level_sizes(*meta["pad_size"]), num_classes)
        ours[name] = detect_image(cls_maps + reg_maps, 0, generator, num_classes, meta, InferenceSettings())
        theirs[name] = mmdet_predictions(head, cls_maps, reg_maps, sample)
        (boxes, scores, labels), (their_boxes, their_scores, their_labels) = ours[name], theirs[name]
        assert len(their_boxes) == 100 and len(boxes) == len(their_boxes)  # score_thr, nms_pre, max_per_img bite
        np.testing.assert_array_equal(labels, their_labels)
        np.testing.assert_allclose(scores, their_scores, rtol=1e-4)
        np.testing.assert_allclose(boxes, their_boxes, rtol=1e-4, atol=1e-3)
    ann = write_tiny_coco(str(tmp_path / "ann.json"), photos, theirs, num_classes, rng)
    dataset = CocoDetection(ann, os.path.dirname(next(iter(photos.values()))))
    metrics = []
    for detections in (ours, theirs):
        results = []
        for record in dataset.records:
            results += detections_to_coco(record.image_id, *detections[os.path.basename(record.path)],
                                          dataset.category_ids)
        metrics.append(coco_evaluate(dataset.coco, results, verbose=False))
    assert metrics[0] == metrics[1] and 0 < metrics[0]["AP"] < 1, metrics


def test_training_ground_truth_equals_mmdetection_coco_dataset(tmp_path):
    """Which boxes train, and where they land after the resize and flip: our reader + transforms against
    mmdetection's CocoDataset with LoadAnnotations, Resize, RandomFlip (prob 1) and PackDetInputs. RetinaNet's
    ignore_iof_thr is -1, so mmdetection's ignored (crowd) instances take no part and ours are left out."""
    require_mmdet()
    from mmdet.datasets import CocoDataset
    rng = np.random.default_rng(0)
    sizes = {1: (90, 60), 2: (50, 120), 3: (70, 70), 4: (40, 30)}  # id: (width, height)
    boxes = [  # (image id, [x, y, w, h], iscrowd, area or None)
        (1, [5, 6, 30, 20], 0, None), (1, [0, 0, 90, 60], 1, None), (1, [10, 10, 0.5, 9], 0, None),
        (1, [70, 40, 40, 40], 0, None), (2, [3, 3, 20, 40], 0, None), (2, [200, 10, 5, 5], 0, None),
        (2, [10, 60, 10, 10], 0, 0), (3, [0, 0, 70, 70], 1, None), (3, [20.5, 30.25, 12.5, 7.75], 0, None)]
    images = []
    for image_id, (width, height) in sizes.items():
        name = f"{image_id}.png"
        cv2.imwrite(str(tmp_path / name), rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
        images.append({"id": image_id, "file_name": name, "width": width, "height": height})
    annotations = [{"id": k + 1, "image_id": i, "bbox": b, "iscrowd": c, "category_id": 7 if k % 2 else 3,
                    "area": b[2] * b[3] if a is None else a} for k, (i, b, c, a) in enumerate(boxes)]
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations,
                               "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]}))
    theirs = CocoDataset(ann_file=str(ann), data_prefix=dict(img=str(tmp_path)), metainfo=dict(classes=("cat", "dog")),
                         pipeline=[dict(type="LoadImageFromFile"), dict(type="LoadAnnotations", with_bbox=True),
                                   dict(type="Resize", scale=(1333, 800), keep_ratio=True),
                                   dict(type="RandomFlip", prob=1.0), dict(type="PackDetInputs")])
    ours = CocoDetection(str(ann), str(tmp_path))
    assert len(theirs) == len(ours.records) == 4
    for index, record in enumerate(ours.records):
        sample = theirs[index]["data_samples"]
        assert sample.img_id == record.image_id
        _, resized, _ = prepare_image(read_image(record.path), record.boxes, (1333, 800), True, MEAN, STD, 32)
        np.testing.assert_allclose(resized, sample.gt_instances.bboxes.tensor.numpy(), rtol=1e-6, atol=1e-4)
        np.testing.assert_array_equal(record.labels, sample.gt_instances.labels.numpy())
    assert [len(r.boxes) for r in ours.records] == [2, 1, 1, 0]  # crowd, thin, empty-area and outside boxes out


# ---------------------------------------------------------------------------------------------------------------
# training targets and losses

# A batch of four images on a 128x160 canvas, each with its own img_shape and pad_shape (mmdetection's metas):
# 0: a normal box and one so small (3x2 px) that only low-quality matching assigns it an anchor;
# 1: no objects; 2: boxes plus a crowd box (ignored by RetinaNet: mmdetection moves it to ignored instances,
# our COCO reader leaves it out); 3: a box that overlaps no anchor of the image's padded area (IoU 0 with all of
# them: with min_pos_iou 0 it claims every one, in mmdetection's code and ours), then a normal box.
CANVAS = (128, 160)
IMAGES = [
    dict(img_shape=(100, 150), boxes=[[10, 12, 70, 60], [20, 20, 23, 22]], labels=[2, 0]),
    dict(img_shape=(60, 90), boxes=[], labels=[]),
    dict(img_shape=(120, 70), boxes=[[5, 30, 60, 110], [30, 5, 50, 20]], labels=[1, 1],
         crowd=[[0, 0, 70, 120]]),
    dict(img_shape=(50, 50), boxes=[[900, 900, 940, 930], [8, 8, 40, 44]], labels=[0, 2]),
]
MAX_GT = 3


def img_metas():
    metas = []
    for image in IMAGES:
        height, width = image["img_shape"]
        pad = (-(-height // 32) * 32, -(-width // 32) * 32)
        metas.append(dict(img_shape=image["img_shape"], pad_shape=pad, batch_input_shape=CANVAS,
                          scale_factor=(1.0, 1.0), ori_shape=image["img_shape"]))
    return metas


def mmdet_gt():
    import torch
    from mmengine.structures import InstanceData
    gt, ignored = [], []
    for image in IMAGES:
        gt.append(InstanceData(bboxes=torch.tensor(image["boxes"], dtype=torch.float32).reshape(-1, 4),
                               labels=torch.tensor(image["labels"], dtype=torch.long)))
        ignored.append(InstanceData(bboxes=torch.tensor(image.get("crowd", []), dtype=torch.float32).reshape(-1, 4),
                                    labels=torch.zeros(len(image.get("crowd", [])), dtype=torch.long)))
    return gt, ignored


def our_gt():
    boxes = np.zeros((len(IMAGES), MAX_GT, 4), np.float32)
    labels = np.zeros((len(IMAGES), MAX_GT), np.int32)
    mask = np.zeros((len(IMAGES), MAX_GT), np.float32)
    for slot, image in enumerate(IMAGES):
        count = len(image["boxes"])
        boxes[slot, :count] = np.asarray(image["boxes"], np.float32).reshape(-1, 4)
        labels[slot, :count] = image["labels"]
        mask[slot, :count] = 1
    pad_sizes = np.asarray([meta["pad_shape"] for meta in img_metas()], np.float32)
    return Tensor(boxes), Tensor(labels), Tensor(mask), Tensor(pad_sizes)


def random_outputs(num_classes, seed=0):
    rng = np.random.default_rng(seed)
    sizes = level_sizes(*CANVAS)
    cls_maps = [rng.normal(-2.0, 1.5, (len(IMAGES), 9 * num_classes, h, w)).astype(np.float32) for h, w in sizes]
    reg_maps = [rng.normal(0.0, 0.5, (len(IMAGES), 36, h, w)).astype(np.float32) for h, w in sizes]
    return cls_maps, reg_maps


def test_anchors_and_targets_equal_mmdetection():
    torch = pytest.importorskip("torch")
    num_classes = 3
    head = mmdet_retina_head(num_classes)
    sizes = level_sizes(*CANVAS)
    anchor_list, valid_list = head.get_anchors(sizes, img_metas(), device="cpu")
    gt, ignored = mmdet_gt()
    labels_l, weights_l, targets_l, box_weights_l, avg_factor = head.get_targets(
        anchor_list, valid_list, gt, img_metas(), ignored)

    generator = AnchorGenerator(STRIDES)
    ours = generator.grid_anchors(sizes)
    for level in range(5):
        np.testing.assert_array_equal(ours[level], anchor_list[0][level].numpy())  # bit for bit

    loss = RetinaNetLoss(generator, num_classes)
    cls_maps, reg_maps = random_outputs(num_classes)
    gt_boxes, gt_labels, gt_mask, pad_sizes = our_gt()
    _, _, anchors, anchor_valid, _ = loss.flatten_outputs([Tensor(m) for m in cls_maps + reg_maps], pad_sizes)
    np.testing.assert_array_equal(anchor_valid.asnumpy(), torch.stack([torch.cat(v) for v in valid_list]).numpy())
    class_targets, label_weights, box_targets, positive, our_avg = (
        t.asnumpy() for t in loss.targets(anchors, anchor_valid, gt_boxes, gt_labels, gt_mask))

    their_labels = torch.cat(labels_l, 1).numpy()  # num_classes = background
    their_weights = torch.cat(weights_l, 1).numpy()
    their_targets = torch.cat(targets_l, 1).numpy()
    their_positive = their_labels < num_classes
    np.testing.assert_array_equal(positive, their_positive)
    np.testing.assert_array_equal(label_weights, their_weights)
    our_labels = np.where(positive, class_targets.argmax(-1), num_classes)
    np.testing.assert_array_equal(our_labels, their_labels)
    np.testing.assert_allclose(box_targets[positive], their_targets[their_positive], rtol=1e-5, atol=1e-5)
    assert our_avg == avg_factor

    # the cases the batch was built for actually happen
    valid = torch.stack([torch.cat(v) for v in valid_list]).numpy()
    assert not their_positive[1].any() and their_weights[1].sum() == valid[1].sum()  # empty: all valid negative
    assert (their_weights[0] == 0).any()  # anchors off image 0's pad_shape take no part
    all_anchors = np.concatenate(ours)
    tiny_iou = iou_with(all_anchors[valid[0]], IMAGES[0]["boxes"][1])
    assert tiny_iou.max() < 0.4 and (their_labels[0] == 0).any()  # the 3x2 box: low-quality matches only
    assert iou_with(all_anchors[valid[3]], IMAGES[3]["boxes"][0]).max() == 0
    assert (their_labels[3] == 0).sum() > 0.9 * valid[3].sum()  # the box touching no anchor claims them all


def iou_with(anchors, box):
    box = np.asarray(box, np.float32)
    wh = np.clip(np.minimum(anchors[:, 2:], box[2:]) - np.maximum(anchors[:, :2], box[:2]), 0, None)
    inter = wh[:, 0] * wh[:, 1]
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return inter / (area(anchors) + area(box) - inter)


class HeadWithLoss(nn.Cell):
    def __init__(self, head, loss):
        super().__init__()
        self.head = head
        self.loss = loss

    def construct(self, features, gt_boxes, gt_labels, gt_mask, pad_sizes):
        return self.loss(self.head(features), gt_boxes, gt_labels, gt_mask, pad_sizes)


class SummedLoss(nn.Cell):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def construct(self, features, gt_boxes, gt_labels, gt_mask, pad_sizes):
        losses = self.net(features, gt_boxes, gt_labels, gt_mask, pad_sizes)
        total = losses[0]
        for value in losses[1:]:
            total = total + value
        return total


@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_per_level_losses_equal_mmdetection(mode, request):
    torch = pytest.importorskip("torch")
    request.getfixturevalue(mode if mode == "pynative" else "graph_mode")
    num_classes = 3
    head = mmdet_retina_head(num_classes)
    cls_maps, reg_maps = random_outputs(num_classes, seed=1)
    gt, ignored = mmdet_gt()
    theirs = head.loss_by_feat([torch.from_numpy(m) for m in cls_maps], [torch.from_numpy(m) for m in reg_maps],
                               gt, img_metas(), ignored)
    loss = RetinaNetLoss(AnchorGenerator(STRIDES), num_classes)
    ours = [v.asnumpy() for v in loss([Tensor(m) for m in cls_maps + reg_maps], *our_gt())]
    their_values = [v.item() for v in theirs["loss_cls"]] + [v.item() for v in theirs["loss_bbox"]]
    assert min(their_values[:5]) > 0 and min(their_values[5:8]) > 0
    np.testing.assert_allclose(ours, their_values, rtol=1e-4)


def copy_head_weights(ours, theirs):
    """mmdetection's RetinaHead conv weights into ours (cls_convs.i.conv -> cls_convs.2i: ReLUs sit between)."""
    state = {k: v.detach().numpy() for k, v in theirs.state_dict().items()}
    names = {}
    for branch in ("cls_convs", "reg_convs"):
        for index in range(len(getattr(theirs, branch))):
            for kind in ("weight", "bias"):
                names[f"{branch}.{2 * index}.{kind}"] = f"{branch}.{index}.conv.{kind}"
    for layer in ("retina_cls", "retina_reg"):
        for kind in ("weight", "bias"):
            names[f"{layer}.{kind}"] = f"{layer}.{kind}"
    params = {p.name: p for p in ours.get_parameters()}
    assert sorted(params) == sorted(names) and len(names) == len(state)
    for our_name, their_name in names.items():
        params[our_name].set_data(Tensor(state[their_name]))
    return names


def test_head_gradients_equal_torch_autograd_on_mmdetection(pynative):
    torch = pytest.importorskip("torch")
    num_classes = 3
    theirs = mmdet_retina_head(num_classes, in_channels=8, feat_channels=8, stacked_convs=2)
    torch.manual_seed(0)
    for parameter in theirs.parameters():  # not the near-zero init: gradients of every size
        torch.nn.init.normal_(parameter, std=0.1)
    head = RetinaNetHead(8, num_classes, feat_channels=8, stacked_convs=2)
    names = copy_head_weights(head, theirs)
    rng = np.random.default_rng(3)
    features = [rng.normal(0, 1, (len(IMAGES), 8, h, w)).astype(np.float32) for h, w in level_sizes(*CANVAS)]

    gt, ignored = mmdet_gt()
    cls_scores, bbox_preds = theirs([torch.from_numpy(f) for f in features])
    their_losses = theirs.loss_by_feat(cls_scores, bbox_preds, gt, img_metas(), ignored)
    total = sum(their_losses["loss_cls"]) + sum(their_losses["loss_bbox"])
    total.backward()
    their_grads = {name: p.grad.numpy() for name, p in theirs.named_parameters()}

    net = SummedLoss(HeadWithLoss(head, RetinaNetLoss(AnchorGenerator(STRIDES), num_classes)))
    weights = net.trainable_params()
    value, grads = ms.value_and_grad(net, grad_position=None, weights=weights)(
        tuple(Tensor(f) for f in features), *our_gt())
    np.testing.assert_allclose(value.asnumpy(), total.item(), rtol=1e-4)
    for parameter, grad in zip(weights, grads, strict=True):
        expected = their_grads[names[parameter.name.split("head.", 1)[1]]]
        assert np.abs(expected).max() > 0
        np.testing.assert_allclose(grad.asnumpy(), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max(),
                                   err_msg=parameter.name)


# ---------------------------------------------------------------------------------------------------------------
# end to end: a detector built and saved by mmdetection, run by our command line

def randomise_(module, seed):
    """Every weight moved off its initialisation (biases and norm shifts non-zero) so that the detections depend
    on all of them; the classifier's prior bias kept low enough that many anchors pass score_thr."""
    torch = pytest.importorskip("torch")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if name.endswith("pos_embed"):
                tensor.copy_(0.5 * torch.randn(tensor.shape, generator=generator))
            elif tensor.ndim == 1 and "norm" in name:
                tensor.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn(tensor.shape,
                                                                                          generator=generator))
            elif name.endswith("bias"):
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator))
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) / max(1, tensor[0].numel()) ** 0.5)
        module.bbox_head.retina_cls.bias.fill_(-2.0)
    return module.eval()


@pytest.mark.slow
def test_infer_det_command_line_gives_mmdetections_detections_for_an_mmdetection_checkpoint(photos, tmp_path):
    """mmdetection 3.3 builds RetinaNet on its PVT-Tiny (FPN and head narrowed to 64 channels to stay quick) and
    saves it; `tools/infer_det.py` loads that file and detects in JPEG/PNG files of several shapes under the test
    protocol. Same detections, in the same order, as mmdetection's `test_step` (its pipeline, preprocessor and
    `predict(rescale=True)`), up to the rounding of detections.json (boxes 0.01 px, scores 1e-5)."""
    import subprocess
    import sys
    torch = pytest.importorskip("torch")
    require_mmdet()
    from mmdet.registry import MODELS
    from mmengine.config import ConfigDict
    from mmengine.dataset import Compose
    classes, img_scale = ("ant", "bee", "cow"), (320, 192)
    model = randomise_(MODELS.build(ConfigDict(
        type="RetinaNet",
        data_preprocessor=dict(type="DetDataPreprocessor", mean=list(MEAN), std=list(STD), bgr_to_rgb=True,
                               pad_size_divisor=32),
        backbone=dict(type="PyramidVisionTransformer", num_layers=[2, 2, 2, 2]),
        neck=dict(type="FPN", in_channels=[64, 128, 320, 512], out_channels=64, start_level=1,
                  add_extra_convs="on_input", num_outs=5),
        bbox_head=dict(mmdet_retina_head_config(len(classes), 64, 64, 2)),
        test_cfg=dict(nms_pre=1000, min_bbox_size=0, score_thr=0.05, nms=dict(type="nms", iou_threshold=0.5),
                      max_per_img=100))), seed=4)
    checkpoint = str(tmp_path / "retinanet_pvt_tiny_mmdet3.pth")
    torch.save({"meta": {"dataset_meta": {"classes": classes}}, "state_dict": model.state_dict()}, checkpoint)

    pipeline = Compose([dict(type="LoadImageFromFile"), dict(type="Resize", scale=img_scale, keep_ratio=True),
                        dict(type="PackDetInputs")])
    expected = {}
    for name, path in photos.items():
        packed = pipeline(dict(img_path=path, img_id=0))
        with torch.no_grad():
            result = model.test_step({"inputs": [packed["inputs"]], "data_samples": [packed["data_samples"]]})[0]
        expected[name] = result.pred_instances

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "drawn"
    command = [sys.executable, os.path.join(repo, "tools", "infer_det.py"), "--ckpt_path", checkpoint,
               "--input", os.path.dirname(next(iter(photos.values()))), "--output", str(out),
               "--num_classes", "3", "--neck_channels", "64", "--head_channels", "64",
               "--head_stacked_convs", "2", "--img_scale", str(list(img_scale)), "--pretrained", "",
               "--progress_bar", "False"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"{len(photos)} distinct input shapes" in run.stdout
    with open(out / "detections.json") as handle:
        written = json.load(handle)
    detections, names = written["images"], {c["label"]: c["name"] for c in written["classes"]}
    for name, instances in expected.items():
        ours = detections[name]["detections"]
        assert 0 < len(ours) == len(instances.scores), name
        assert [names[d["label"]] for d in ours] == [classes[k] for k in instances.labels.tolist()], name
        np.testing.assert_allclose([d["score"] for d in ours], instances.scores.numpy(), atol=1e-5, err_msg=name)
        np.testing.assert_allclose([d["bbox_xyxy"] for d in ours], instances.bboxes.numpy(), atol=6e-3, rtol=1e-5,
                                   err_msg=name)
