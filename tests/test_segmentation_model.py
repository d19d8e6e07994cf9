"""Semantic FPN model: shapes at odd sizes, the head's structure, the loss against torch's cross entropy, the
configs, and what a checkpoint holds. Logits, loss, gradients and masks against mmsegmentation itself are in
test_segmentation_mmseg.py."""
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pvt_dense.errors import ConfigError
from pvt_dense.models import create_backbone
from pvt_dense.models.fpn import build_neck
from pvt_dense.segmentation.build import build_segmentor
from pvt_dense.segmentation.config import load_segmentation_config
from pvt_dense.segmentation.segmentor import (EncoderDecoder, SegmentorInference, SegmentorWithLoss,
                                              ignore_cross_entropy)
from pvt_dense.segmentation.semfpn_head import ConvBNReLU, SemanticFPNHead, Upsample2x

ROOT = Path(__file__).resolve().parents[1]
# PVT v1's recipes; v2's are checked in test_parity_v2.py.
ADE_CONFIGS = sorted(p for p in (ROOT / "configs" / "segmentation").glob("semfpn_pvt_*_ade20k_40k.yaml")
                     if "pvt_v2" not in p.stem)


@pytest.fixture(scope="module")
def small_segmentor():
    ms.set_context(mode=ms.PYNATIVE_MODE)
    backbone = create_backbone("pvt_tiny")
    neck = build_neck(backbone, out_channels=32, num_outs=4)
    head = SemanticFPNHead(neck.out_channels, neck.strides, num_classes=5, channels=16)
    return EncoderDecoder(backbone, neck, head)


def test_odd_sizes_give_stride_4_logits_and_input_size_inference(small_segmentor, pynative):
    size = (97, 131)  # stages floor to 24x32, 12x16, 6x8, 3x4: the head's upsampled maps must be resized to fit
    x = ms.Tensor(np.random.default_rng(0).normal(size=(2, 3) + size).astype(np.float32))
    small_segmentor.set_train(False)
    logits = small_segmentor(x)
    assert logits.shape == (2, 5, size[0] // 4, size[1] // 4)
    (full,) = SegmentorInference(small_segmentor)(x)
    assert full.shape == (2, 5) + size and np.isfinite(full.asnumpy()).all()
    labels = ms.Tensor(np.random.default_rng(1).integers(0, 5, (2,) + size).astype(np.int32))
    small_segmentor.set_train(True)
    loss = SegmentorWithLoss(small_segmentor)(x, labels)
    assert np.isfinite(float(loss.asnumpy()))


def test_head_has_one_block_per_factor_of_two_down_to_stride_4():
    head = SemanticFPNHead((8, 8, 8, 8), (4, 8, 16, 32), num_classes=3, channels=4)
    blocks = [sum(isinstance(c, ConvBNReLU) for c in level.cell_list) for level in head.scale_heads]
    upsamples = [sum(isinstance(c, Upsample2x) for c in level.cell_list) for level in head.scale_heads]
    assert blocks == [1, 1, 2, 3] and upsamples == [0, 1, 2, 3]
    with pytest.raises(ConfigError, match="power-of-two"):
        SemanticFPNHead((8, 8), (4, 12), num_classes=3)


@pytest.mark.parametrize("avg_non_ignore", [False, True])
def test_loss_matches_torch_cross_entropy_with_ignore_index(avg_non_ignore, pynative):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 6, 7)).astype(np.float32)
    labels = rng.integers(0, 5, (2, 6, 7))
    labels[rng.random((2, 6, 7)) < 0.3] = 255
    ours = float(ignore_cross_entropy(ms.Tensor(logits), ms.Tensor(labels.astype(np.int32)),
                                      avg_non_ignore=avg_non_ignore).asnumpy())
    summed = F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels), ignore_index=255, reduction="sum")
    expected = summed / ((labels != 255).sum() if avg_non_ignore else labels.size)
    assert ours == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("path", ADE_CONFIGS, ids=[p.stem for p in ADE_CONFIGS])
def test_ade20k_recipes_load_and_carry_the_official_values(path):
    cfg = load_segmentation_config(path)
    assert cfg.backbone == path.stem.split("_")[2].join(["pvt_", ""])
    assert (cfg.lr, cfg.weight_decay, cfg.total_iters, cfg.power, cfg.min_lr) == (2e-4, 1e-4, 40000, 0.9, 0.0)
    assert cfg.batch_size * 8 == 32 and cfg.distribute is True
    assert (cfg.num_classes, cfg.reduce_zero_label, cfg.neck_channels, cfg.head_channels) == (150, True, 256, 128)
    assert (cfg.train_scale, cfg.ratio_range, cfg.crop_size, cfg.cat_max_ratio) == (
        [2048, 512], [0.5, 2.0], [512, 512], 0.75)
    assert (cfg.test_scale, cfg.size_divisor, cfg.test_mode, cfg.dropout_ratio) == ([2048, 512], 32, "whole", 0.1)


def test_demo_config_matches_the_demo_data():
    from pvt_dense.data.digits_segmentation import class_names
    cfg = load_segmentation_config(ROOT / "configs/demo/semfpn_pvt_tiny_digits.yaml")
    # The demo merges the digits into one class (see the config's header); background is a class, not ignored.
    assert cfg.class_names == ["background", "digit"] == class_names(10, merge_digits=True)
    assert cfg.num_classes == 2 and cfg.reduce_zero_label is False


@pytest.mark.bad_input("segmentation config", "an unknown backbone / neck name or a misspelt key",
                       "ConfigError naming the key and listing the valid values or keys")
def test_unknown_names_and_keys_list_what_is_valid():
    with pytest.raises(ConfigError, match="backbone.*pvt_large.*pvt_tiny"):
        load_segmentation_config(ADE_CONFIGS[0], ["--backbone", "pvt_huge"])
    with pytest.raises(ConfigError, match="neck.*'fpn'"):
        load_segmentation_config(ADE_CONFIGS[0], ["--neck", "bifpn"])
    with pytest.raises(ConfigError, match="crop_sise.*crop_size"):
        load_segmentation_config(ADE_CONFIGS[0], ["--crop_sise", "512", "512"])
    with pytest.raises(ConfigError, match="class_names"):
        load_segmentation_config(None, ["--num_classes", "3", "--class_names", "a", "b"])


def test_checkpoint_state_holds_batchnorm_statistics_and_optimizer_moments(pynative):
    from pvt_dense.engine.optim import build_adamw
    from pvt_dense.engine.train_step import TrainStep
    from pvt_dense.engine.train_step import training_state_parameters as state_parameters
    cfg = load_segmentation_config(None, ["--neck_channels", "8", "--head_channels", "8", "--num_classes", "3",
                                          "--frozen_stages", "4"])
    net = build_segmentor(cfg)
    optimizer = build_adamw(net, cfg, [1e-3] * 4)
    names = {p.name for p in state_parameters(net, optimizer, TrainStep(SegmentorWithLoss(net), optimizer))}
    moving = {p.name for p in net.get_parameters() if "moving_" in p.name}
    assert moving and moving <= names  # not trainable, but a resumed run needs them
    assert {p.name for p in net.get_parameters()} <= names
    assert any("adam_m" in n for n in names) and "loss_scale" in names
    assert not any(n.startswith("learning_rate") for n in names)


def test_merged_digit_labels_are_the_digit_labels_merged(tmp_path):
    import glob

    import cv2
    from pvt_dense.data.digits_segmentation import make_digits_segmentation
    per_digit = make_digits_segmentation(tmp_path / "digits", train_images=3, val_images=1)
    merged = make_digits_segmentation(tmp_path / "merged", train_images=3, val_images=1, merge_digits=True)
    assert (per_digit["num_classes"], merged["num_classes"]) == (11, 2)
    labels = sorted(glob.glob(str(tmp_path / "digits" / "annotations" / "*" / "*.png")))
    assert len(labels) == 4
    for path in labels:
        digits = cv2.imread(path, cv2.IMREAD_UNCHANGED)
        twin = cv2.imread(path.replace(str(tmp_path / "digits"), str(tmp_path / "merged")), cv2.IMREAD_UNCHANGED)
        assert digits.max() > 1  # a digit class other than "0", so the merge is visible
        np.testing.assert_array_equal(twin, (digits > 0).astype(twin.dtype))
