"""RetinaNet training end to end on a tiny digits set: the loss falls, box AP50 >= 0.5 on it, checkpoints evaluate
and draw; config and component errors name the valid choices."""
import json
import os

import numpy as np
import pytest

from pvt_dense.data.digits_detection import make_digits_detection
from pvt_dense.detection.config import INFER_FIELDS, inference_settings, load_detection_config
from pvt_dense.errors import ConfigError

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def tiny_config(data, run_dir, *extra):
    # Frozen random backbone (3 stages built), narrow neck and head: the smallest RetinaNet that still learns to
    # find and tell apart two digit classes within ~1 minute on 2 cores (graph mode compiles once).
    return load_detection_config(None, [
        "--data_dir", data["root"], "--train_ann", data["train_ann"], "--train_images", data["train_images"],
        "--val_ann", data["train_ann"], "--val_images", data["train_images"], "--num_classes", "2",
        "--ckpt_save_dir", str(run_dir), "--resume", "", "--distribute", "False", "--mode", "0",
        "--pretrained", "", "--out_indices", "[1, 2]", "--frozen_stages", "3", "--drop_path_rate", "0",
        "--img_scale", "[64, 64]", "--flip_prob", "0", "--max_gt", "4", "--neck_channels", "32",
        "--head_channels", "32", "--head_stacked_convs", "1", "--batch_size", "4", "--lr", "0.001",
        "--warmup_iters", "5", "--epochs", "25", "--lr_steps", "[100]", "--eval_interval_epochs", "0",
        "--progress_bar", "False", "--log_interval", "10", "--num_workers", "1", *extra])


@pytest.mark.slow
def test_training_on_a_tiny_set_lowers_the_loss_and_reaches_ap50(tmp_path, capsys):
    from pvt_dense.detection.infer import infer_images
    from pvt_dense.detection.build import load_detector_with_names
    from pvt_dense.detection.train import train_detector

    data = make_digits_detection(tmp_path / "digits", train_images=8, val_images=1, canvas_size=64,
                                 digit_sizes=(22, 30), min_digits=1, max_digits=2, classes=2, seed=1)
    cfg = tiny_config(data, tmp_path / "run")
    state = train_detector(cfg)
    with open(tmp_path / "run" / "metrics.jsonl") as handle:
        losses = [json.loads(line)["train_loss"] for line in handle]
    assert losses[-1] < 0.5 * losses[0]
    assert state["metrics"]["AP50"] >= 0.5, state["metrics"]
    assert "Average Precision" in capsys.readouterr().out

    # the best checkpoint reloads into a fresh detector with its class names, and inference writes inside DIR only
    detector, names, category_ids = load_detector_with_names(cfg, str(tmp_path / "run" / "retinanet_pvt_tiny_best.ckpt"))
    assert names == ["0", "1"] and category_ids == [1, 2]
    listing = tmp_path / "inputs.txt"
    listing.write_text(f"digits/train/000000.png\n../{tmp_path.name}/digits/train/000001.png\n")
    out = tmp_path / "drawn"
    summary = infer_images(detector, str(listing), str(out), names, inference_settings(cfg), (64, 64), 32,
                           progress=False)
    assert len(summary["written"]) == 2
    assert all(os.path.realpath(p).startswith(os.path.realpath(out) + os.sep) for p in summary["written"])
    with open(summary["json"]) as handle:
        results = json.load(handle)
    detections = results["images"]
    assert [c["name"] for c in results["classes"]] == list(names)  # each class named once
    assert any(d["score"] > 0.3 and 0 <= d["label"] < len(names) for item in detections.values()
               for d in item["detections"])


def test_configs_switch_the_backbone_with_one_word_and_reject_unknown_names():
    for size, drop_path in (("tiny", 0.1), ("small", 0.1), ("medium", 0.0), ("large", 0.0)):
        cfg = load_detection_config(os.path.join(CONFIG_DIR, "detection", f"retinanet_pvt_{size}_fpn_1x_coco.yaml"))
        assert (cfg.backbone, cfg.drop_path_rate, cfg.lr, cfg.img_scale) == (f"pvt_{size}", drop_path, 1e-4,
                                                                             [1333, 800])
    path = os.path.join(CONFIG_DIR, "detection", "retinanet_pvt_tiny_fpn_1x_coco.yaml")
    assert load_detection_config(path, ["--backbone", "pvt_large"]).backbone == "pvt_large"
    with pytest.raises(ConfigError, match="pvt_large"):
        load_detection_config(path, ["--backbone", "pvt_huge"])
    with pytest.raises(ConfigError, match="'fpn'"):
        load_detection_config(path, ["--neck", "bifpn"])
    with pytest.raises(ConfigError, match="'retinanet'"):
        load_detection_config(path, ["--head", "fcos"])
    with pytest.raises(ConfigError, match="unknown config key 'lr_step'"):
        load_detection_config(path, ["--lr_step", "[3]"])
    with pytest.raises(ConfigError, match="unknown config key 'input'"):
        load_detection_config(path, ["--input", "x.png"])  # a tool's key is not a training key
    assert load_detection_config(path, ["--input", "x.png"], extra_fields=INFER_FIELDS).input == "x.png"
    load_detection_config(os.path.join(CONFIG_DIR, "demo", "retinanet_pvt_tiny_digits.yaml"))


def test_evaluation_pads_each_image_to_32_and_reuses_a_compiled_graph_per_shape(tmp_path, graph_mode, capsys):
    import cv2

    from pvt_dense.detection.coco import CocoDetection
    from pvt_dense.detection.evaluation import DetectorForward, evaluate_detector
    from pvt_dense.detection.build import build_retinanet

    sizes = [(60, 40), (40, 60), (60, 40)]  # (width, height): two shapes under mmdetection's test protocol
    rng = np.random.default_rng(0)
    images = []
    for image_id, (width, height) in enumerate(sizes, 1):
        cv2.imwrite(str(tmp_path / f"{image_id}.png"), rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
        images.append({"id": image_id, "file_name": f"{image_id}.png", "width": width, "height": height})
    annotations = [{"id": 1, "image_id": 1, "bbox": [5, 5, 20, 20], "area": 400, "iscrowd": 0, "category_id": 1}]
    (tmp_path / "ann.json").write_text(json.dumps({"images": images, "annotations": annotations, "categories": [
        {"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}))
    cfg = load_detection_config(None, ["--pretrained", "", "--out_indices", "[1, 2]", "--frozen_stages", "3",
                                       "--drop_path_rate", "0", "--num_classes", "2", "--neck_channels", "16",
                                       "--head_channels", "16", "--head_stacked_convs", "1"])
    detector = build_retinanet(cfg, 2)
    forward = DetectorForward(detector, policy="graph")  # MindSpore's own graph mode: compile every new shape
    metrics = evaluate_detector(detector, CocoDetection(tmp_path / "ann.json", tmp_path), img_scale=(96, 64),
                                progress=False, forward=forward)
    # 60x40 -> x1.6 -> 96x64, already a multiple of 32: no padding beyond it (not a fixed canvas)
    assert forward.shapes == {(1, 3, 64, 96), (1, 3, 96, 64)} and metrics["input_shapes"] == 2
    assert len(detector.compile_cache) == 2  # the third image reused the first one's graph
    assert (forward.stats.compilations, forward.stats.graph_calls) == (2, 1)
    assert "3 images in 2 distinct input shapes; forward: 2 graph compilations" in capsys.readouterr().out


@pytest.mark.bad_input("config", "pad_grid that is not a multiple of size_divisor (48 with 32)",
                       "ConfigError naming both keys")
def test_pad_grid_must_be_a_multiple_of_the_size_divisor():
    with pytest.raises(ConfigError, match=r"pad_grid \(48\) must be a multiple of size_divisor \(32\)"):
        load_detection_config(None, ["--pad_grid", "48"])
    assert load_detection_config(None, ["--pad_grid", "64"]).pad_grid == 64
