"""Semantic FPN training end to end on a tiny deterministic set: it learns, it evaluates, it resumes exactly."""
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from pvt_dense.segmentation.ade20k import list_samples
from pvt_dense.segmentation.config import load_segmentation_config
from pvt_dense.segmentation.train import SegmentationRun

ROOT = Path(__file__).resolve().parents[1]
COLOURS = {1: (220, 40, 40), 2: (40, 200, 60), 3: (50, 70, 230)}  # class -> RGB of its shapes


def write_shapes_set(root, count=12, size=64, seed=0, evaluated=4):
    """ADE20K-layout set: grey noise with 1-3 filled rectangles/discs whose class is their colour (raw labels
    1..3, 0 = background). `count` training images; the first `evaluated` of them are also the validation split,
    so evaluating on "validation" measures the fit to (part of) the training set at a third of the cost."""
    rng = np.random.default_rng(seed)
    for index in range(count):
        image = np.clip(rng.normal(128, 25, (size, size, 3)), 0, 255).astype(np.uint8)
        label = np.zeros((size, size), np.uint8)
        for _ in range(int(rng.integers(1, 4))):
            cls = int(rng.integers(1, 4))
            top, left = (int(v) for v in rng.integers(0, size - 24, 2))
            h, w = (int(v) for v in rng.integers(18, 36, 2))
            mask = np.zeros_like(label)
            if rng.random() < 0.5:
                mask[top:top + h, left:left + w] = 1
            else:
                cv2.circle(mask, (left + w // 2, top + h // 2), min(h, w) // 2, 1, -1)
            image[mask == 1] = COLOURS[cls]
            label[mask == 1] = cls
        for split in ("training", "validation") if index < evaluated else ("training",):
            (root / "images" / split).mkdir(parents=True, exist_ok=True)
            (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(root / "images" / split / f"{index:03d}.png"), image[:, :, ::-1])
            cv2.imwrite(str(root / "annotations" / split / f"{index:03d}.png"), label)
    return root


# Small and fast: frozen random PVT-Tiny (only the FPN and the head train), 64x64 crops, no augmentation.
TINY_RUN = ["--num_classes", "4", "--reduce_zero_label", "False", "--distribute", "False", "--batch_size", "4",
            "--neck_channels", "64", "--head_channels", "32", "--drop_path_rate", "0", "--frozen_stages", "4",
            "--train_scale", "64", "64", "--ratio_range", "1.0", "1.0", "--crop_size", "64", "64",
            "--test_scale", "64", "64", "--eval_interval", "0", "--lr", "5e-3", "--progress_bar", "False",
            "--photometric", "False", "--flip_prob", "0.5", "--num_workers", "1",
            "--log_interval", "10", "--warmup_iters", "0"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short graph-mode training run shared by the tests below: (config, run, final state)."""
    import mindspore as ms
    shapes = write_shapes_set(tmp_path_factory.mktemp("shapes"))
    run_dir = tmp_path_factory.mktemp("run")
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        cfg = load_segmentation_config(None, TINY_RUN + ["--data_dir", str(shapes), "--ckpt_save_dir", str(run_dir),
                                                         "--total_iters", "40", "--mode", "0"])
        run = SegmentationRun(cfg)
        state = run.fit()
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    return cfg, run, state


def test_training_on_a_tiny_set_reaches_half_miou_on_it(trained):
    cfg, run, state = trained
    result = run.last_evaluation
    assert state["iteration"] == 40
    assert result["samples"] == len(list_samples(cfg.data_dir, "validation")) == 4
    # Far above chance: predicting background everywhere gives mIoU ~0.2 here.
    assert result["mIoU"] >= 0.5, result["IoU"]
    run_dir = Path(cfg.ckpt_save_dir)
    assert (run_dir / "metrics.csv").read_text().count("\n") >= 2
    assert (run_dir / f"semfpn_{cfg.backbone}_best.ckpt").exists()


def tool_arguments(cfg):
    return TINY_RUN + ["--data_dir", cfg.data_dir, "--mode", "1",
                       "--ckpt_path", str(Path(cfg.ckpt_save_dir) / f"semfpn_{cfg.backbone}_best.ckpt")]


def test_eval_tool_reproduces_the_training_evaluation_from_the_checkpoint(trained, capsys, pynative, load_tool):
    main = load_tool("eval_seg").main
    cfg, run, _ = trained
    assert main(tool_arguments(cfg)) == 0
    printed = capsys.readouterr().out
    miou = float(re.search(r"mIoU (\d+\.\d+)", printed).group(1))
    # Same weights and BatchNorm statistics read back from disk, PyNative instead of graph mode.
    assert miou == pytest.approx(100 * run.last_evaluation["mIoU"], abs=1.0)
    assert all(name in printed for name in ("aAcc", "mAcc", "IoU"))
    assert len([line for line in printed.splitlines() if line[:1].isdigit()]) == 4  # one row per class
    assert "(4 images)" in printed


def test_infer_tool_writes_masks_colours_and_overlays(trained, tmp_path, capsys, pynative, load_tool):
    main = load_tool("infer_seg").main
    cfg, _, _ = trained
    listing = tmp_path / "inputs.txt"
    listing.write_text("# two training images\n../images/training/000.png\n../images/training/005.png\n")
    listing = listing.rename(Path(cfg.data_dir) / "annotations" / "inputs.txt")
    out = tmp_path / "out"
    assert main(tool_arguments(cfg) + ["--input", str(listing), "--output", str(out)]) == 0
    assert "2 images segmented" in capsys.readouterr().out
    for kind, suffix in (("masks", ".png"), ("color", ".png"), ("overlay", ".jpg")):
        # The list's "../" names stay inside the output folder; the input's extension stays in the name.
        assert sorted(p.name for p in (out / kind / "images" / "training").iterdir()) == [
            "000.png" + suffix, "005.png" + suffix]
    mask = cv2.imread(str(out / "masks" / "images" / "training" / "000.png.png"), cv2.IMREAD_UNCHANGED)
    label = cv2.imread(str(Path(cfg.data_dir) / "annotations" / "training" / "000.png"), cv2.IMREAD_UNCHANGED)
    assert mask.shape == label.shape and (mask == label).mean() > 0.8
    # A second run finds everything done and rewrites nothing.
    assert main(tool_arguments(cfg) + ["--input", str(listing), "--output", str(out)]) == 0
    assert "0 images segmented into" in capsys.readouterr().out
