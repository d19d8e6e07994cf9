"""The demo's pieces that can be checked without training: the summary picture built from a run folder, where the
drawn detections land, that the demo detection and segmentation configs fit the data the demo generates, and that
the demo's pretraining size trains the attention of every stage."""
import json
import os

import cv2
import numpy as np
import pytest

from pvt_dense.demo_summary import build_summary, principal_components_rgb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_DET_CONFIG = os.path.join(ROOT, "configs", "demo", "retinanet_pvt_tiny_digits.yaml")
DEMO_PRETRAIN_CONFIG = os.path.join(ROOT, "configs", "demo", "pvt_tiny_digits.yaml")


def _write_jsonl(path, records):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(record) + "\n" for record in records))


def _fake_run(root):
    """A demo output folder as a finished run leaves it, with made-up numbers and pictures."""
    rng = np.random.default_rng(0)
    _write_jsonl(os.path.join(root, "pretrain", "metrics.jsonl"),
                 [{"epoch": 1, "train_loss": 1.4, "val_top1": 81.9},
                  {"epoch": 2, "train_loss": 0.9, "val_top1": 93.25}])
    _write_jsonl(os.path.join(root, "detection", "metrics.jsonl"),
                 [{"iteration": 10, "train_loss": 1.0}, {"iteration": 72, "train_loss": 0.3, "val_AP": 0.625,
                                                         "val_AP50": 0.875}])
    _write_jsonl(os.path.join(root, "segmentation", "metrics.jsonl"), [{"iteration": 100, "val_mIoU": 0.805}])
    for folder, names in ((os.path.join(root, "detections"), ["000000.png", "000001.png"]),
                          (os.path.join(root, "segmentation_overlays", "overlay"), ["val_00000.jpg.jpg"]),
                          (os.path.join(root, "segmentation_overlays", "color"), ["val_00000.jpg.png"])):
        os.makedirs(folder)
        for name in names:
            cv2.imwrite(os.path.join(folder, name), rng.integers(0, 255, (96, 96, 3), dtype=np.uint8))
    os.makedirs(os.path.join(root, "features"))
    maps = {f"stage{i + 1}": rng.normal(size=(1, channels, size, size)).astype(np.float32)
            for i, (channels, size) in enumerate(((64, 16), (128, 8), (320, 4), (512, 2)))}
    np.savez(os.path.join(root, "features", "astronaut.png.npz"), out_indices=np.arange(4), **maps)


def test_summary_is_drawn_from_the_run_files_and_changes_with_them(tmp_path):
    root = str(tmp_path / "run")
    _fake_run(root)
    path, numbers = build_summary(root)
    assert path == os.path.join(root, "summary.png")
    assert numbers == {"top1": 93.25, "AP": 0.625, "AP50": 0.875, "mIoU": 0.805}
    first = cv2.imread(path)
    assert first is not None and first.shape == (1120, 1120, 3)  # 14 x 14 inches at 80 dpi
    assert not [name for name in os.listdir(root) if name.startswith(".") or name.endswith(".tmp")]

    # A different drawn detection on disk is a different picture (the panels are read back from the files).
    cv2.imwrite(os.path.join(root, "detections", "000000.png"), np.zeros((96, 96, 3), np.uint8))
    build_summary(root)
    second = cv2.imread(path)
    assert np.abs(first.astype(int) - second).max() > 100

    # And so is a different pretraining record.
    _write_jsonl(os.path.join(root, "pretrain", "metrics.jsonl"), [{"epoch": 1, "train_loss": 2.0, "val_top1": 10.0}])
    _, numbers = build_summary(root)
    assert numbers["top1"] == 10.0
    assert np.abs(cv2.imread(path).astype(int) - second).max() > 100


def test_summary_shows_each_segmentation_overlay_beside_its_colour_mask(tmp_path):
    from pvt_dense.demo_summary import segmentation_panels
    root = str(tmp_path / "run")
    _fake_run(root)
    overlays = os.path.join(root, "segmentation_overlays", "overlay")
    for name in ("val_00001.jpg.jpg", "val_00002.jpg.jpg"):  # val_00002 has no colour mask
        cv2.imwrite(os.path.join(overlays, name), np.zeros((8, 8, 3), np.uint8))
    colors = os.path.join(root, "segmentation_overlays", "color")
    cv2.imwrite(os.path.join(colors, "val_00001.jpg.png"), np.zeros((8, 8, 3), np.uint8))
    titles = [title for _, title in segmentation_panels(root, 4)]
    assert titles == ["overlay/val_00000.jpg.jpg", "color/val_00000.jpg.png", "overlay/val_00001.jpg.jpg",
                      "color/val_00001.jpg.png"]
    assert [t for _, t in segmentation_panels(root, 6)][-1] == "overlay/val_00002.jpg.jpg"


def test_summary_of_a_run_without_dense_tasks_says_so(tmp_path):
    root = str(tmp_path / "run")
    _write_jsonl(os.path.join(root, "pretrain", "metrics.jsonl"), [{"epoch": 1, "train_loss": 1.0, "val_top1": 50.0}])
    path, numbers = build_summary(root, path=str(tmp_path / "elsewhere.png"))
    assert numbers == {"top1": 50.0, "AP": None, "AP50": None, "mIoU": None}
    assert cv2.imread(path).shape == (1120, 1120, 3)


def test_stage_map_colours_are_the_first_principal_components_of_the_channels():
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(1)
    feature_map = rng.normal(size=(32, 12, 10)) * np.linspace(0.1, 3.0, 32)[:, None, None]
    rgb = principal_components_rgb(feature_map)
    assert rgb.shape == (12, 10, 3) and rgb.min() >= 0 and rgb.max() <= 1
    reference = PCA(n_components=3).fit_transform(feature_map.reshape(32, -1).T)
    for k in range(3):
        # Each colour is its component stretched to the 1st-99th percentile and clipped: monotone in it, so the
        # rank correlation with scikit-learn's component is +-1 away from the clipped tails.
        inside = (rgb[..., k].reshape(-1) > 0) & (rgb[..., k].reshape(-1) < 1)
        corr = np.corrcoef(rgb[..., k].reshape(-1)[inside], reference[inside, k])[0, 1]
        assert abs(corr) > 0.9999


def test_drawn_detections_of_the_demo_land_flat_in_the_output_folder(tmp_path):
    from pvt_dense.data.images import list_image_entries
    from pvt_dense.detection.demo import write_image_list
    from pvt_dense.detection.infer import drawn_name
    from pvt_dense.output_names import OutputNamer, contained_path

    image_dir = tmp_path / "deep" / "checkout" / "outputs" / "demo" / "digits_detection" / "val"
    image_dir.mkdir(parents=True)
    names = ["000000.png", "000001.png"]
    for name in names:
        cv2.imwrite(str(image_dir / name), np.zeros((8, 8, 3), np.uint8))
    list_path = str(tmp_path / "detection_inputs.txt")
    write_image_list(list_path, str(image_dir), names)
    entries = list_image_entries(list_path)
    assert [entry.path for entry in entries] == [str(image_dir / name) for name in names]
    namer = OutputNamer(reserved=("detections.json",))
    drawn = [drawn_name(entry.name, namer) for entry in entries]
    assert drawn == names
    output_dir = str(tmp_path / "detections")
    assert [contained_path(output_dir, name) for name in drawn] == [os.path.join(output_dir, n) for n in names]


def test_detections_drawn_larger_keep_their_boxes_on_the_objects():
    from pvt_dense.detection.infer import draw_detections

    image = np.zeros((20, 30, 3), np.uint8)
    drawn = draw_detections(image, np.array([[10.0, 5.0, 20.0, 15.0]]), np.array([0.9]), np.array([1]), ["a", "b"],
                            scale=4)
    assert drawn.shape == (80, 120, 3)
    # The box's right and bottom edges lie at 4x the input's coordinates (the label sits above the top edge).
    assert drawn[60, 40:80].max() > 0 and drawn[40:60, 80].max() > 0
    assert drawn[70:, :].max() == 0 and drawn[:, 90:].max() == 0


@pytest.fixture
def demo_detection_set(tmp_path):
    from pvt_dense.data.digits_detection import make_digits_detection
    from pvt_dense.detection.demo import DEMO_DATA
    return make_digits_detection(str(tmp_path / "digits_detection"), **DEMO_DATA)


def test_demo_detection_config_fits_the_demo_data(demo_detection_set):
    """(Nearly) every box of the generated training set has an anchor the assigner takes as positive (IoU >=
    pos_iou_thr), with the anchors built by mmdetection's own AnchorGenerator from the config's values; the config's
    classes are the generated categories and the head predicts one set of outputs per anchor."""
    from mmlab_reference import require_mmdet
    require_mmdet()
    import torch
    from mmdet.models.task_modules.prior_generators import AnchorGenerator
    from mmdet.structures.bbox import bbox_overlaps

    from pvt_dense.detection.demo import DEMO_DATA
    from pvt_dense.detection.config import load_detection_config

    cfg = load_detection_config(DEMO_DET_CONFIG)
    with open(demo_detection_set["train_ann"], encoding="utf-8") as handle:
        document = json.load(handle)
    assert cfg.num_classes == len(document["categories"]) == DEMO_DATA.get("classes", 10)
    assert list(cfg.img_scale) == [DEMO_DATA["canvas_size"]] * 2

    strides = [8 * 2 ** level for level in range(cfg.neck_num_outs)]  # the FPN starts at stage 2 (stride 8)
    assert cfg.neck_first_stage == 1
    generator = AnchorGenerator(strides=strides, ratios=cfg.anchor_ratios,
                                octave_base_scale=cfg.anchor_octave_base_scale,
                                scales_per_octave=cfg.anchor_scales_per_octave)
    size = DEMO_DATA["canvas_size"]
    anchors = torch.cat(generator.grid_priors([(-(-size // s), -(-size // s)) for s in strides], device="cpu"))
    boxes = torch.tensor([a["bbox"] for a in document["annotations"]], dtype=torch.float32)
    boxes[:, 2:] += boxes[:, :2]
    best = bbox_overlaps(boxes, anchors).max(dim=1).values
    assert len(boxes) > 300
    # All but the odd narrow '1' are positives of some anchor; hardly any is left to low-quality matching below 0.4
    # (one of the ~1,390 boxes: a '1' drawn 24 px high is a few pixels wide).
    assert (best >= cfg.pos_iou_thr).float().mean().item() >= 0.99, f"{(best < cfg.pos_iou_thr).sum()} boxes"
    assert (best < cfg.neg_iou_thr).float().mean().item() <= 0.002, f"{(best < cfg.neg_iou_thr).sum()} boxes"

    assert generator.num_base_priors[0] == len(cfg.anchor_ratios) * cfg.anchor_scales_per_octave


def _query_gradients_per_stage(model_name, num_classes, image_size):
    """Largest |gradient| of each stage's attention query weights after one cross-entropy step on random images."""
    import mindspore as ms
    from mindspore import nn

    from pvt_dense.models import create_model

    ms.set_seed(0)
    net = create_model(model_name, num_classes=num_classes)
    queries = [param for param in net.trainable_params() if param.name.endswith(".attn.q.weight")]
    images = ms.Tensor(np.random.default_rng(0).normal(size=(2, 3, image_size, image_size)).astype(np.float32))
    labels = ms.Tensor(np.array([1, 2], np.int32))
    grads = ms.grad(nn.WithLossCell(net, nn.CrossEntropyLoss()), grad_position=None, weights=queries)(images, labels)
    largest = {}
    for param, grad in zip(queries, grads, strict=True):
        stage = int(param.name.split("stages.")[1].split(".")[0])
        largest[stage] = max(largest.get(stage, 0.0), float(np.abs(grad.asnumpy()).max()))
    return [largest[stage] for stage in sorted(largest)]


def test_demo_pretraining_size_gives_every_stage_query_a_gradient():
    """At 32x32 the spatial reduction of stages 1-3 leaves one key, softmax over one key is 1 whatever the query, and
    their query projections get no gradient at all (they stayed random through the demo's pretraining); at the
    demo config's size each of the four stages learns its queries."""
    from pvt_dense.classification.config import load_classification_config

    cfg = load_classification_config(DEMO_PRETRAIN_CONFIG)
    one_key = _query_gradients_per_stage(cfg.model, cfg.num_classes, 32)
    assert one_key[:3] == [0.0, 0.0, 0.0] and one_key[3] > 0
    assert all(value > 0 for value in _query_gradients_per_stage(cfg.model, cfg.num_classes, cfg.image_resize))


def test_demo_segmentation_config_fits_the_demo_data():
    """The Semantic FPN demo trains at the size its canvases are drawn at (no resize blurs the strokes the masks
    must follow, see DEMO_DATA) and tests at the largest scale its random rescale trains at, on the generated set's
    two classes."""
    from pvt_dense.data.digits_segmentation import class_names
    from pvt_dense.segmentation.demo import DEMO_CONFIG, DEMO_DATA
    from pvt_dense.segmentation.config import load_segmentation_config

    cfg = load_segmentation_config(DEMO_CONFIG)
    size = DEMO_DATA["canvas_size"]
    assert cfg.train_scale == cfg.crop_size == [size, size]
    assert cfg.test_scale == [round(size * cfg.ratio_range[1])] * 2
    assert size % cfg.size_divisor == 0 and cfg.test_scale[0] % cfg.size_divisor == 0
    assert cfg.class_names == class_names(10, merge_digits=DEMO_DATA["merge_digits"]) == ["background", "digit"]
    low, high = DEMO_DATA["digit_size"]
    assert 8 <= low <= high <= size


def test_the_demo_time_the_docs_promise_is_the_plan_the_demo_prints(capsys):
    """README and quick start say "about N minutes", the demo's plan adds up its measured parts: one figure."""
    import re
    from pvt_dense.demo import DENSE_TASKS, PART_ESTIMATES, print_plan
    minutes = round(sum(seconds for _, seconds in PART_ESTIMATES) / 60)
    print_plan("outputs/demo", DENSE_TASKS)
    assert f"about {minutes} min on an idle 2-core CPU" in capsys.readouterr().out
    for page in ("README.md", os.path.join("docs", "quickstart.md")):
        with open(os.path.join(ROOT, page), encoding="utf-8") as handle:
            claims = re.findall(r"about (\d+) minutes", handle.read().replace("\n", " "))
        assert claims and all(int(claim) == minutes for claim in claims), (page, claims, minutes)
