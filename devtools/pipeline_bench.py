"""The benchmark's whole-pipeline cases: RetinaNet training steps, RetinaNet / Semantic FPN inference on a folder of
photos, and stage-map export of a folder, each ours (pvt_dense, MindSpore graph mode) against the reference a user
would otherwise run on torch (mmdetection 3.3, mmsegmentation 1.2, HF transformers' PVT as the official dense
backbone).

The folder cases time what a user waits for: from building the model and loading its weights to the last image's
result (graph compilations included), in a fresh process whose imports are not counted. Both sides read the same
files and the same checkpoint: an mmdetection (mmsegmentation) model is built with random weights, saved as an
mmengine checkpoint, loaded by mmdet's `init_detector` (mmseg's `init_model`) and by our whole-model loader
(`pvt_dense.checkpoint.whole_model`), so both detect (segment) the same things. The photos are made from scikit-image's
sample photos, cropped and resized to sizes of both orientations, written as JPEG and PNG.

mmcv-lite has no compiled operators: the mmlab side runs with the torchvision-based NMS stand-in of
`devtools.mmlab_stand_in`.
"""
import json
import os
import time

import numpy as np

from pvt_dense.data.transforms import IMAGENET_MEAN, IMAGENET_STD

# Sizes (height, width) of the photo folder: portrait, landscape and square, COCO-like (<= 640 a side) and larger.
PHOTO_SIZES = ((480, 640), (640, 480), (427, 640), (640, 427), (375, 500), (500, 333), (360, 640), (612, 612),
               (300, 700), (720, 540), (333, 500), (512, 384), (240, 320), (800, 600))
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "motorcycle_left")
COCO_CLASSES = 80
ADE_CLASSES = 150


def sample_photos():
    """scikit-image's bundled colour photos (those that load without a download), as RGB uint8 arrays."""
    from skimage import data
    photos = []
    for name in SKIMAGE_PHOTOS:
        try:
            image = getattr(data, name)()
        except Exception:  # noqa: BLE001 - a sample that needs a download (no network) is simply left out
            continue
        if image.ndim == 3 and image.shape[2] >= 3:
            photos.append(np.ascontiguousarray(image[:, :, :3]))
    if not photos:
        raise RuntimeError("scikit-image gave no sample photo")
    return photos


def write_photo_folder(folder, count, sizes=PHOTO_SIZES):
    """`count` photos written to `folder`: photo k is sample (k mod n) cropped (a window that moves with k) and
    resized to sizes[k mod len(sizes)], JPEG for even k and PNG for odd k. Deterministic; returns the paths."""
    import cv2
    os.makedirs(folder, exist_ok=True)
    photos = sample_photos()
    paths = []
    for k in range(count):
        source = photos[k % len(photos)]
        height, width = sizes[k % len(sizes)]
        rows, cols = source.shape[:2]
        # the largest window of the target's aspect ratio that fits, shifted along the free axis by k
        scale = min(rows / height, cols / width)
        crop_h, crop_w = int(height * scale), int(width * scale)
        top = (rows - crop_h) * (k % 3) // 2
        left = (cols - crop_w) * ((k // 3) % 3) // 2
        window = source[top:top + crop_h, left:left + crop_w]
        image = cv2.resize(window, (width, height), interpolation=cv2.INTER_AREA)
        path = os.path.join(folder, f"photo_{k:02d}_{height}x{width}.{'jpg' if k % 2 == 0 else 'png'}")
        if not cv2.imwrite(path, np.ascontiguousarray(image[:, :, ::-1])):
            raise RuntimeError(f"OpenCV could not write {path}")
        paths.append(path)
    return paths


def photo_paths(folder):
    return sorted(os.path.join(folder, name) for name in os.listdir(folder) if name.startswith("photo_"))


# ---------------------------------------------------------------------------------------------------------------
# The mmlab side's models, as mmdetection's and mmsegmentation's configs describe them

def mmdet_pvt_backbone(spec):
    """mmdet's `PyramidVisionTransformer` for a v1 spec (configs/pvt/retinanet_pvt-t_fpn_1x_coco.py for Tiny)."""
    return dict(type="PyramidVisionTransformer", num_layers=list(spec.depths), embed_dims=spec.embed_dims[0],
                num_heads=list(spec.num_heads), sr_ratios=list(spec.sr_ratios), mlp_ratios=list(spec.mlp_ratios),
                patch_sizes=[4, 2, 2, 2], strides=[4, 2, 2, 2], out_indices=(0, 1, 2, 3), init_cfg=None)


def mmdet_retinanet_config(spec, img_scale=(1333, 800), num_classes=COCO_CLASSES):
    """mmdetection 3.3's RetinaNet-PVT (configs/pvt/retinanet_pvt-t_fpn_1x_coco.py and its _base_ files) as one
    mmengine Config: model, and the test pipeline `inference_detector` reads."""
    from mmengine.config import Config
    model = dict(
        type="RetinaNet",
        data_preprocessor=dict(type="DetDataPreprocessor", mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD),
                               bgr_to_rgb=True, pad_size_divisor=32),
        backbone=mmdet_pvt_backbone(spec),
        neck=dict(type="FPN", in_channels=list(spec.embed_dims), out_channels=256, start_level=1,
                  add_extra_convs="on_input", num_outs=5),
        bbox_head=dict(type="RetinaHead", num_classes=num_classes, in_channels=256, stacked_convs=4,
                       feat_channels=256,
                       anchor_generator=dict(type="AnchorGenerator", octave_base_scale=4, scales_per_octave=3,
                                             ratios=[0.5, 1.0, 2.0], strides=[8, 16, 32, 64, 128]),
                       bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[1.0] * 4),
                       loss_cls=dict(type="FocalLoss", use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0),
                       loss_bbox=dict(type="L1Loss", loss_weight=1.0)),
        train_cfg=dict(assigner=dict(type="MaxIoUAssigner", pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0,
                                     ignore_iof_thr=-1),
                       sampler=dict(type="PseudoSampler"), allowed_border=-1, pos_weight=-1, debug=False),
        test_cfg=dict(nms_pre=1000, min_bbox_size=0, score_thr=0.05, nms=dict(type="nms", iou_threshold=0.5),
                      max_per_img=100))
    pipeline = [dict(type="LoadImageFromFile"), dict(type="Resize", scale=tuple(img_scale), keep_ratio=True),
                dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape",
                                                      "scale_factor"))]
    return Config(dict(model=model, default_scope="mmdet",
                       test_dataloader=dict(dataset=dict(type="CocoDataset", pipeline=pipeline))))


def mmseg_semantic_fpn_config(spec, scale=(2048, 512), num_classes=ADE_CLASSES):
    """mmsegmentation 1.2's Semantic FPN (configs/sem_fpn/fpn_r50_512x512_160k_ade20k.py) on mmdet's PVT, as the
    official PVT segmentation configs set it up, with the ADE20K test pipeline `inference_model` reads."""
    from mmengine.config import Config
    backbone = dict(mmdet_pvt_backbone(spec), type="mmdet.PyramidVisionTransformer")
    model = dict(
        type="EncoderDecoder",
        data_preprocessor=dict(type="SegDataPreProcessor", mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD),
                               bgr_to_rgb=True, size_divisor=32, pad_val=0, seg_pad_val=255),
        backbone=backbone,
        neck=dict(type="FPN", in_channels=list(spec.embed_dims), out_channels=256, num_outs=4),
        decode_head=dict(type="FPNHead", in_channels=[256] * 4, in_index=[0, 1, 2, 3], feature_strides=[4, 8, 16, 32],
                         channels=128, dropout_ratio=0.1, num_classes=num_classes,
                         norm_cfg=dict(type="BN", requires_grad=True), align_corners=False,
                         loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0)),
        train_cfg=dict(), test_cfg=dict(mode="whole"))
    pipeline = [dict(type="LoadImageFromFile"), dict(type="Resize", scale=tuple(scale), keep_ratio=True),
                dict(type="PackSegInputs")]
    return Config(dict(model=model, default_scope="mmseg", test_pipeline=pipeline))


def _save_mmengine_checkpoint(model, path, classes):
    from mmengine.runner.checkpoint import save_checkpoint
    save_checkpoint(dict(meta=dict(dataset_meta=dict(classes=tuple(classes))), state_dict=model.state_dict()), path)
    return path


def write_reference_checkpoints(spec, folder, which=("det", "seg")):
    """Random-weight mmdet RetinaNet / mmseg Semantic FPN checkpoints for `spec` in `folder`: {kind: path}.

    RetinaNet's classifier bias is raised from its prior (-4.6, scores ~0.01) to -2.5 so that a realistic number of
    anchors pass the 0.05 score threshold and decoding and NMS do real work on both sides."""
    import torch

    from .mmlab_stand_in import import_mmdet, import_mmseg
    torch.manual_seed(0)
    paths = {}
    if "det" in which:
        import_mmdet()
        from mmdet.registry import MODELS
        detector = MODELS.build(mmdet_retinanet_config(spec).model)
        detector.init_weights()
        with torch.no_grad():
            detector.bbox_head.retina_cls.bias.fill_(-2.5)
        paths["det"] = _save_mmengine_checkpoint(detector, os.path.join(folder, "retinanet_mmdet3.pth"),
                                                 [f"class{i}" for i in range(COCO_CLASSES)])
    if "seg" in which:
        import_mmseg()
        from mmseg.registry import MODELS
        segmentor = MODELS.build(mmseg_semantic_fpn_config(spec).model)
        segmentor.init_weights()
        paths["seg"] = _save_mmengine_checkpoint(segmentor, os.path.join(folder, "semfpn_mmseg1.pth"),
                                                 [f"class{i}" for i in range(ADE_CLASSES)])
    return paths


# ---------------------------------------------------------------------------------------------------------------
# Timing helpers

class Stopwatch:
    """Seconds spent per named part; `wrap(owner, name, part)` times every call of owner.name under `part`."""

    def __init__(self):
        self.parts = {}

    def add(self, part, seconds):
        self.parts[part] = self.parts.get(part, 0.0) + seconds

    def wrap(self, owner, name, part):
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.add(part, time.perf_counter() - start)

        setattr(owner, name, timed)
        return original


def folder_result(total, per_image, parts, count, extra=None):
    """The folder cases' result: total wall seconds, per-image seconds (for the median and spread) and parts."""
    return dict({"total_s": total, "times_s": per_image, "images": count, "parts_s": parts,
                 "first_call_s": per_image[0] if per_image else None}, **(extra or {}))


def per_image_times(stamps, start):
    """Seconds between consecutive finished images, the first counted from `start` (after loading)."""
    return list(np.diff([start] + list(stamps)))


# ---------------------------------------------------------------------------------------------------------------
# Ours

def _ours_context(threads):
    import mindspore as ms
    ms.set_device("CPU")
    ms.set_context(mode=ms.GRAPH_MODE)
    from .timing import set_mindspore_threads
    set_mindspore_threads(threads)


def _detection_cfg(model, case, config=None):
    from pvt_dense.detection.config import load_detection_config
    path = config or os.path.join(REPOSITORY_ROOT, "configs", "detection", f"retinanet_{model}_fpn_1x_coco.yaml")
    return load_detection_config(path, [("mode", 0), ("distribute", False), ("pretrained", ""),
                                        ("progress_bar", False), ("img_scale", [case["width"], case["height"]])])


def ours_det_folder(task, case):
    _ours_context(task["threads"])
    from pvt_dense.detection import infer as infer_module
    from pvt_dense.detection.config import inference_settings
    from pvt_dense.detection.build import load_detector_with_names
    watch = Stopwatch()
    stamps = []
    for name, part in (("read_image", "read"), ("prepare_image", "resize, normalise, pad"),
                       ("detect_image", "decode + NMS"), ("draw_detections", "draw + write")):
        watch.wrap(infer_module, name, part)
    start = time.perf_counter()
    cfg = _detection_cfg(task["model"], case)
    detector, names, category_ids = load_detector_with_names(cfg, task["checkpoints"]["det"])
    loaded = time.perf_counter()

    from pvt_dense.detection.evaluation import DetectorForward

    class TimedForward(DetectorForward):
        def __call__(self, image_batch):
            begin = time.perf_counter()
            outputs = super().__call__(image_batch)
            watch.add("forward (graph, eager, compile)", time.perf_counter() - begin)
            stamps.append(time.perf_counter())
            return outputs

    forward = TimedForward(detector)
    summary = infer_module.infer_images(detector, task["folder"], task["scratch"], names, inference_settings(cfg),
                                        cfg.img_scale, cfg.size_divisor, cfg.mean, cfg.std, category_ids=category_ids,
                                        progress=False, forward=forward)
    total = time.perf_counter() - start
    watch.add("build + load weights", loaded - start)
    stats = forward.stats
    watch.parts["of which compilation (first graph calls)"] = sum(stats.compile_seconds)
    with open(summary["json"], encoding="utf-8") as handle:
        detections = sum(len(v["detections"]) for v in json.load(handle)["images"].values())
    return folder_result(total, per_image_times(stamps, loaded), watch.parts, len(summary["written"]),
                         {"note": stats.summary() + f"; {len(forward.shapes)} input shapes; "
                          f"{detections} detections"})


def ours_seg_folder(task, case):
    _ours_context(task["threads"])
    from pvt_dense.segmentation import evaluation as seg_evaluation
    from pvt_dense.segmentation import infer as infer_module
    from pvt_dense.segmentation.build import load_trained_segmentor_with_report
    from pvt_dense.segmentation.config import load_segmentation_config, predictor_options
    from pvt_dense.segmentation.segmentor import SegmentorInference
    watch = Stopwatch()
    stamps = []
    watch.wrap(infer_module, "read_image", "read")
    watch.wrap(infer_module, "_encode", "colour + write PNGs")
    start = time.perf_counter()
    path = os.path.join(REPOSITORY_ROOT, "configs", "segmentation", f"semfpn_{task['model']}_ade20k_40k.yaml")
    cfg = load_segmentation_config(path, [("mode", 0), ("distribute", False), ("pretrained", ""),
                                          ("progress_bar", False), ("test_scale", [case["width"], case["height"]])])
    net, _ = load_trained_segmentor_with_report(cfg, task["checkpoints"]["seg"])
    predictor = seg_evaluation.Predictor(SegmentorInference(net, upsample=False), **predictor_options(cfg))
    loaded = time.perf_counter()
    original_predict = predictor.predict

    def predict(image):
        begin = time.perf_counter()
        mask = original_predict(image)
        watch.add("resize + forward + upsample + argmax", time.perf_counter() - begin)
        stamps.append(time.perf_counter())
        return mask

    predictor.predict = predict
    summary = infer_module.infer_images(predictor, task["folder"], task["scratch"], cfg.num_classes, progress=False)
    total = time.perf_counter() - start
    watch.add("build + load weights", loaded - start)
    note = ""
    if predictor.stats is not None:
        watch.parts["of which compilation (first graph calls)"] = sum(predictor.stats.compile_seconds)
        note = predictor.stats.summary()
    return folder_result(total, per_image_times(stamps, loaded), watch.parts, len(summary["written"]),
                         {"note": note})


def ours_export_folder(task, case):
    _ours_context(task["threads"])
    from pvt_dense import features
    watch = Stopwatch()
    stamps = []
    watch.wrap(features, "read_image", "read")
    watch.wrap(features, "write_npz_atomic", "write .npz")
    original = features.forward_batch

    def forward_batch(forward, batch):
        begin = time.perf_counter()
        maps = original(forward, batch)
        watch.add("forward (graph, eager, compile)", time.perf_counter() - begin)
        stamps.append(time.perf_counter())
        return maps

    features.forward_batch = forward_batch
    start = time.perf_counter()
    summary = features.export_features(task["model"], task["folder"], task["scratch"], short_side=case["height"],
                                       max_long_side=case["width"], progress=False)
    total = time.perf_counter() - start
    stats = summary.forward_stats
    watch.parts["of which compilation (first graph calls)"] = sum(stats.compile_seconds)
    return folder_result(total, per_image_times(stamps, start), watch.parts, len(summary.exported),
                         {"note": stats.summary()})


def synthetic_detection_batch(case, num_classes=COCO_CLASSES, boxes_per_image=12, seed=0):
    """A training batch like the 1x recipe's: images padded to (height, width), each image's own (resized) size a
    little smaller, boxes of varied sizes inside it. Returns numpy (images, boxes list, labels list, pad sizes)."""
    rng = np.random.default_rng(seed)
    batch, height, width = case["batch"], case["height"], case["width"]
    images = rng.standard_normal((batch, 3, height, width)).astype(np.float32)
    boxes, labels, pad_sizes = [], [], []
    for index in range(batch):
        # the second image narrower, as a portrait-ish photo batched with a landscape one
        pad_h, pad_w = height, max(width - 128 * index, 32 * (width // 64))
        pad_sizes.append((pad_h, pad_w))
        x1 = rng.uniform(0, pad_w * 0.7, boxes_per_image)
        y1 = rng.uniform(0, pad_h * 0.7, boxes_per_image)
        w = rng.uniform(0.03, 0.3, boxes_per_image) * pad_w
        h = rng.uniform(0.03, 0.3, boxes_per_image) * pad_h
        boxes.append(np.stack([x1, y1, np.minimum(x1 + w, pad_w - 1), np.minimum(y1 + h, pad_h - 1)], 1)
                     .astype(np.float32))
        labels.append(rng.integers(0, num_classes, boxes_per_image).astype(np.int32))
    return images, boxes, labels, pad_sizes


def ours_det_train(task, case):
    _ours_context(task["threads"])
    import mindspore as ms

    from pvt_dense.detection.build import build_retinanet, training_network
    from pvt_dense.detection.transforms import pad_targets
    from pvt_dense.engine.optim import build_adamw
    from pvt_dense.engine.train_step import TrainStep

    from .timing import time_calls
    cfg = _detection_cfg(task["model"], case)
    train_net = training_network(build_retinanet(cfg, COCO_CLASSES, load_pretrained=False), cfg)
    optimizer = build_adamw(train_net, cfg, [cfg.lr] * 1000)
    step = TrainStep(train_net, optimizer, loss_scale=cfg.loss_scale, clip_grad_norm=cfg.clip_grad_norm)
    step.set_train(True)
    images, boxes, labels, pad_sizes = synthetic_detection_batch(case)
    targets = [pad_targets(b, l, cfg.max_gt) for b, l in zip(boxes, labels)]
    inputs = (ms.Tensor(images), ms.Tensor(np.stack([t[0] for t in targets])),
              ms.Tensor(np.stack([t[1] for t in targets])), ms.Tensor(np.stack([t[2] for t in targets])),
              ms.Tensor(np.asarray(pad_sizes, np.float32)))

    def call():
        step(*inputs)[0].asnumpy()

    first, times = time_calls(call, task["warmup"], task["repeats"], task.get("max_seconds"))
    return {"first_call_s": first, "times_s": times}


# ---------------------------------------------------------------------------------------------------------------
# Theirs

def _torch_context(threads):
    import torch
    torch.set_num_threads(threads)
    torch.manual_seed(0)


def theirs_det_folder(task, case):
    _torch_context(task["threads"])
    from .mmlab_stand_in import import_mmdet
    import_mmdet()
    from mmdet.apis import inference_detector, init_detector

    from pvt_dense.models.factory import get_spec
    paths = photo_paths(task["folder"])
    start = time.perf_counter()
    config = mmdet_retinanet_config(get_spec(task["model"]), (case["width"], case["height"]))
    model = init_detector(config, task["checkpoints"]["det"], device="cpu", palette="coco")
    loaded = time.perf_counter()
    stamps, detections = [], 0
    for path in paths:
        result = inference_detector(model, path)
        detections += len(result.pred_instances.scores)
        stamps.append(time.perf_counter())
    total = time.perf_counter() - start
    return folder_result(total, per_image_times(stamps, loaded), {"build + load weights": loaded - start},
                         len(paths), {"note": f"{detections} detections"})


def theirs_seg_folder(task, case):
    _torch_context(task["threads"])
    from .mmlab_stand_in import import_mmseg
    import_mmseg()
    from mmseg.apis import inference_model, init_model

    from pvt_dense.models.factory import get_spec
    paths = photo_paths(task["folder"])
    start = time.perf_counter()
    config = mmseg_semantic_fpn_config(get_spec(task["model"]), (case["width"], case["height"]))
    model = init_model(config, task["checkpoints"]["seg"], device="cpu")
    loaded = time.perf_counter()
    stamps = []
    for path in paths:
        inference_model(model, path).pred_sem_seg.data.numpy()
        stamps.append(time.perf_counter())
    total = time.perf_counter() - start
    return folder_result(total, per_image_times(stamps, loaded), {"build + load weights": loaded - start},
                         len(paths))


def theirs_export_folder(task, case):
    """The official dense backbone (HF's PVT made to compute it) over the same files, with the same preprocessing
    (keep-ratio resize, pad to 32), one .npz of the four stage maps per image."""
    _torch_context(task["threads"])
    import torch

    from pvt_dense.data.images import read_image
    from pvt_dense.data.transforms import preprocess_dense
    from pvt_dense.models.factory import get_spec

    from .hf_reference import official_dense_hf_backbone
    paths = photo_paths(task["folder"])
    start = time.perf_counter()
    model = official_dense_hf_backbone(get_spec(task["model"]))
    loaded = time.perf_counter()
    stamps = []
    with torch.inference_mode():
        for path in paths:
            chw, meta = preprocess_dense(read_image(path), case["height"], case["width"], 32)
            outputs = model(pixel_values=torch.from_numpy(chw[None]), output_hidden_states=True)
            arrays = {f"stage{i + 1}": h[0].numpy() for i, h in enumerate(outputs.hidden_states)}
            np.savez(os.path.join(task["scratch"], os.path.basename(path) + ".npz"), **arrays)
            stamps.append(time.perf_counter())
    total = time.perf_counter() - start
    return folder_result(total, per_image_times(stamps, loaded), {"build": loaded - start}, len(paths))


def theirs_det_train(task, case):
    """mmdetection's RetinaNet `loss` (its assigner, focal and L1 losses) + backward + torch AdamW, on the same
    synthetic batch; the data preprocessor is left out on both sides (inputs are already normalised and padded)."""
    _torch_context(task["threads"])
    import torch

    from .timing import time_calls
    from .mmlab_stand_in import import_mmdet
    import_mmdet()
    from mmdet.registry import MODELS
    from mmdet.structures import DetDataSample
    from mmengine.structures import InstanceData

    from pvt_dense.models.factory import get_spec
    model = MODELS.build(mmdet_retinanet_config(get_spec(task["model"])).model)
    model.init_weights()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)
    images, boxes, labels, pad_sizes = synthetic_detection_batch(case)
    samples = []
    for index, (pad_h, pad_w) in enumerate(pad_sizes):
        sample = DetDataSample(metainfo=dict(img_shape=(pad_h, pad_w), pad_shape=(pad_h, pad_w),
                                             batch_input_shape=(case["height"], case["width"]),
                                             scale_factor=(1.0, 1.0), ori_shape=(pad_h, pad_w)))
        sample.gt_instances = InstanceData(bboxes=torch.from_numpy(boxes[index]),
                                           labels=torch.from_numpy(labels[index]).long())
        samples.append(sample)
    inputs = torch.from_numpy(images)

    def call():
        optimizer.zero_grad(set_to_none=True)
        losses = model.loss(inputs, samples)
        total = sum(v if torch.is_tensor(v) else sum(v) for v in losses.values())
        total.backward()
        optimizer.step()

    first, times = time_calls(call, task["warmup"], task["repeats"], task.get("max_seconds"))
    return {"first_call_s": first, "times_s": times}


REPOSITORY_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PIPELINE_WORKERS = {
    ("mindspore", "det_train"): ours_det_train, ("torch_hf", "det_train"): theirs_det_train,
    ("mindspore", "det_folder"): ours_det_folder, ("torch_hf", "det_folder"): theirs_det_folder,
    ("mindspore", "seg_folder"): ours_seg_folder, ("torch_hf", "seg_folder"): theirs_seg_folder,
    ("mindspore", "export_folder"): ours_export_folder, ("torch_hf", "export_folder"): theirs_export_folder,
}
