"""The backbone and run keys shared by the detection and segmentation configs."""
import pytest

from pvt_dense.config import load_config
from pvt_dense.engine.config_fields import BACKBONE_FIELDS, RUN_FIELDS
from pvt_dense.engine.weights import build_backbone
from pvt_dense.errors import ConfigError

SCHEMA = {**RUN_FIELDS, **BACKBONE_FIELDS}


def test_one_word_switches_the_backbone_and_the_declared_channels():
    small = build_backbone(load_config(SCHEMA, overrides=["--backbone", "pvt_small", "--out_indices", "1", "2",
                                                          "3"]))
    assert small.out_channels == (128, 320, 512) and small.strides == (8, 16, 32)
    assert len(small.stages) == 4


@pytest.mark.bad_input("config", "backbone: pvt_huge (an unknown name)", "ConfigError listing the valid backbones")
def test_unknown_backbone_lists_the_choices():
    with pytest.raises(ConfigError, match="pvt_large"):
        load_config(SCHEMA, overrides=["--backbone", "pvt_huge"])


@pytest.mark.parametrize("overrides, message", [
    (["--out_indices", "2", "1"], "out_indices"),
    (["--out_indices", "0", "4"], "out_indices"),
    (["--out_indices", "0", "1", "--recompute_stages", "3"], "recompute_stages"),
])
@pytest.mark.bad_input("config", "out_indices / recompute_stages naming stages the backbone does not have",
                       "ConfigError naming the key")
def test_inconsistent_backbone_options_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_backbone(load_config(SCHEMA, overrides=overrides))


@pytest.mark.bad_input("config", "pretrained: a checkpoint file that does not exist", "CheckpointError naming it")
def test_missing_pretrained_file_is_named(tmp_path):
    from pvt_dense.errors import CheckpointError
    missing = tmp_path / "nowhere.ckpt"
    with pytest.raises(CheckpointError, match="nowhere.ckpt"):
        build_backbone(load_config(SCHEMA, overrides=["--pretrained", str(missing)]))


@pytest.mark.parametrize("loader, old, new, value", [
    ("detection", "flip_ratio", "flip_prob", 0.25),
    ("detection", "pad_divisor", "size_divisor", 64),
    ("detection", "head_feat_channels", "head_channels", 128),
    ("detection", "eval_interval", "eval_interval_epochs", 3),
    ("segmentation", "eval_max_images", "max_eval_images", 7),
])
def test_old_config_keys_still_load_with_a_note_naming_the_new_key(loader, old, new, value, tmp_path, capsys):
    from pvt_dense.detection.config import load_detection_config
    from pvt_dense.segmentation.config import load_segmentation_config
    load = load_detection_config if loader == "detection" else load_segmentation_config
    path = tmp_path / "old.yaml"
    path.write_text(f"{old}: {value}\n")
    cfg = load(path)
    assert cfg[new] == value and old not in cfg
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and repr(old) in notes[0] and repr(new) in notes[0] and str(path) in notes[0]
    assert load(overrides=[f"--{old}", str(value)])[new] == value  # the command line too
    assert f"config key {old!r} is now {new!r}" in capsys.readouterr().err
    assert load(overrides=[f"--{new}", str(value)])[new] == value
    assert "note:" not in capsys.readouterr().err
