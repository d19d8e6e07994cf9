"""ImageNet-style pretraining on a tiny class-folder dataset: it learns, it resumes exactly, it fails cleanly."""
import json
import re
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn, ops

from pvt_dense.classification.config import load_classification_config
from pvt_dense.classification.evaluation import evaluate
from pvt_dense.classification.train import ClassificationRun, NonFiniteLossError
from pvt_dense.data.digits import make_digits_imagenet
from pvt_dense.checkpoint.mindspore_ckpt import load_mindspore_checkpoint
from pvt_dense.engine.checkpoints import read_checkpoint_meta
from pvt_dense.engine.train_step import TrainStep
from pvt_dense.errors import ConfigError, PVTDenseError

ROOT = Path(__file__).resolve().parents[1]
# PVT v1's recipes; v2's are checked in test_parity_v2.py.
CONFIGS = sorted(p for p in (ROOT / "configs" / "classification").glob("*.yaml") if not p.stem.startswith("pvt_v2"))

# MindCV's PVT page (configs/pvt/*_ascend.yaml): epochs, lr, drop path, loss scale.
SEED_RECIPES = {
    "pvt_tiny": (450, 5e-4, 0.1, 1024),
    "pvt_small": (500, 5e-4, 0.1, 1024),
    "pvt_medium": (400, 1e-3, 0.3, 1024),
    "pvt_large": (400, 1e-3, 0.3, 300),
}

# Small and deterministic: no augmentation, no dropout, so runs can be compared bit for bit.
SMALL_RUN = ["--distribute", "False", "--num_classes", "10", "--image_resize", "32", "--amp_level", "O0",
             "--auto_augment", "null", "--mixup", "0", "--cutmix", "0", "--re_prob", "0", "--hflip", "0",
             "--warmup_epochs", "0", "--num_parallel_workers", "1", "--loss_scale", "1", "--drop_path_rate", "0",
             "--label_smoothing", "0", "--crop_pct", "1.0", "--scale", "1.0", "1.0", "--ratio", "1.0", "1.0",
             "--progress_bar", "False", "--scheduler", "constant", "--mode", "0"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    make_digits_imagenet(root, image_size=32, limit_per_class=10, val_fraction=0.2)
    return root


def config_for(data_dir, ckpt_dir, *extra):
    return load_classification_config(ROOT / "configs/classification/pvt_tiny.yaml",
                                      SMALL_RUN + ["--data_dir", str(data_dir), "--ckpt_save_dir", str(ckpt_dir),
                                                   *map(str, extra)])


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_recipe_loads_builds_and_matches_the_seed_table(path):
    import pvt_dense
    cfg = load_classification_config(path)
    assert (cfg.epoch_size, cfg.lr, cfg.drop_path_rate, cfg.loss_scale) == SEED_RECIPES[cfg.model]
    # Shared by the four recipes on MindCV's PVT page.
    assert (cfg.batch_size, cfg.weight_decay, cfg.opt, cfg.label_smoothing) == (128, 0.05, "adamw", 0.1)
    assert (cfg.mixup, cfg.cutmix, cfg.re_prob, cfg.crop_pct) == (0.8, 1.0, 0.25, 0.9)
    assert (cfg.auto_augment, cfg.interpolation, cfg.warmup_epochs, cfg.min_lr) == (
        "randaug-m9-mstd0.5-inc1", "bicubic", 10, 1e-6)
    assert cfg.amp_level == "O2" and cfg.distribute is True
    assert path.stem == cfg.model
    net = pvt_dense.create_model(cfg.model, num_classes=cfg.num_classes, drop_path_rate=cfg.drop_path_rate)
    assert net.head.weight.shape == (1000, 512)


@pytest.mark.bad_input("config",
                       "--lrr (a typo), --hflip 1.5, --model pvt_huge, a YAML with a !!python/object/apply:os.system "
                       "tag, epoch_size: ten",
                       "ConfigError naming the key with a suggestion, the allowed range or values, or the file and "
                       "key; the tag is refused as 'not valid YAML'")
def test_config_errors_name_the_key_and_the_allowed_values(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'lrr'; did you mean lr"):
        load_classification_config(None, ["--lrr", "0.1"])
    with pytest.raises(ConfigError, match="hflip = '1.5'.*float in \\[0.0, 1.0\\]"):
        load_classification_config(None, ["--hflip", "1.5"])
    with pytest.raises(ConfigError, match="model = 'pvt_huge'.*one of 'pvt_large'"):
        load_classification_config(None, ["--model", "pvt_huge"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: !!python/object/apply:os.system ['echo owned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_classification_config(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("epoch_size: ten\n")
    with pytest.raises(ConfigError, match=f"{re.escape(str(typo))}: epoch_size = 'ten'"):
        load_classification_config(typo)
    # MindCV's style of boolean flags keeps working.
    assert load_classification_config(None, ["--distribute", "False"]).distribute is False
    assert load_classification_config(None, ["--scale_lr_with_batch"]).scale_lr_with_batch is True


def test_linear_lr_scaling_is_one_flag():
    from pvt_dense.classification.config import effective_lr
    recipe = ROOT / "configs/classification/pvt_tiny.yaml"
    cfg = load_classification_config(recipe, ["--batch_size", "64", "--scale_lr_with_batch"])
    assert effective_lr(cfg, world_size=2) == pytest.approx(5e-4 * 128 / 1024)
    assert effective_lr(load_classification_config(ROOT / "configs/classification/pvt_tiny.yaml"), 2) == 5e-4


def test_official_recipe_switch_changes_decay_groups_and_clipping(tmp_path):
    import pvt_dense
    from pvt_dense.classification.train import no_decay_names
    net = pvt_dense.create_model("pvt_tiny", num_classes=10)
    mindcv_style = no_decay_names(net, True)
    official = no_decay_names(net, True, ("pos_embed", "cls_token"))
    assert all(name.endswith(("bias", "gamma", "beta")) for name in mindcv_style)
    assert official - mindcv_style == {"cls_token", "stages.0.pos_embed", "stages.1.pos_embed", "stages.2.pos_embed",
                                       "stages.3.pos_embed"}
    from pvt_dense.classification.config import official_recipe_overrides
    assert official_recipe_overrides(load_classification_config(None, ["--model", "pvt_large"]))[:2] == (True, 1.0)
    assert official_recipe_overrides(load_classification_config(None, ["--model", "pvt_tiny"]))[0] is False


class TinyLoss(nn.Cell):
    def __init__(self):
        super().__init__()
        self.dense = nn.Dense(4, 3)

    def construct(self, x, y):
        return ops.cross_entropy(self.dense(x), y)


@pytest.mark.bad_input("training run (crash, interrupt, NaN)",
                       "a batch of inf inputs with loss scale 1024 (graph and PyNative)",
                       "overflow reported and the update skipped, weights unchanged (mindcv's TrainStep writes "
                       "non-finite weights)")
@pytest.mark.parametrize("mode", [ms.GRAPH_MODE, ms.PYNATIVE_MODE], ids=["graph", "pynative"])
def test_train_step_skips_overflowing_updates_which_mindcv_train_step_applies(mode):
    from mindcv.utils.train_step import TrainStep as MindcvTrainStep
    ms.set_context(mode=mode)
    try:
        x = ms.Tensor(np.full((4, 4), np.inf, np.float32))
        y = ms.Tensor(np.array([0, 1, 2, 0], np.int32))
        ours = TinyLoss()
        before = ours.dense.weight.asnumpy().copy()
        step = TrainStep(ours, nn.SGD(ours.trainable_params(), learning_rate=0.1), loss_scale=1024.0)
        loss, overflow, _ = step(x, y)
        assert bool(overflow.asnumpy())
        np.testing.assert_array_equal(ours.dense.weight.asnumpy(), before)
        theirs = TinyLoss()
        theirs_step = MindcvTrainStep(theirs, nn.SGD(theirs.trainable_params(), learning_rate=0.1),
                                      scale_sense=ms.Tensor(1024.0, ms.float32))
        theirs_step(x, y)
        # mindcv's step (fixed loss scale) wrote the non-finite update into the weights and reported nothing.
        assert not np.isfinite(theirs.dense.weight.asnumpy()).all()
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)


def test_mindcv_adamw_matches_torch_adamw():
    torch = pytest.importorskip("torch")
    from mindcv.optim.adamw import AdamW
    rng = np.random.default_rng(0)
    weight0 = rng.standard_normal((3, 4)).astype(np.float32)
    grads = [rng.standard_normal((3, 4)).astype(np.float32) for _ in range(5)]
    param = ms.Parameter(ms.Tensor(weight0), name="w")
    optimizer = AdamW([param], learning_rate=1e-2, weight_decay=0.05, eps=1e-8)
    reference = torch.nn.Parameter(torch.from_numpy(weight0.copy()))
    torch_optimizer = torch.optim.AdamW([reference], lr=1e-2, weight_decay=0.05, eps=1e-8)
    for grad in grads:
        optimizer((ms.Tensor(grad),))
        reference.grad = torch.from_numpy(grad)
        torch_optimizer.step()
    np.testing.assert_allclose(param.asnumpy(), reference.detach().numpy(), atol=1e-6)


def test_training_learns_the_digits(digits, tmp_path):
    cfg = config_for(digits, tmp_path / "run", "--batch_size", 16, "--epoch_size", 25, "--lr", 1e-3,
                     "--val_while_train", "False", "--weight_decay", 0.0)
    trainer = ClassificationRun(cfg)
    trainer.fit()
    train_accuracy = evaluate(trainer.net, trainer_eval_loader(trainer, cfg, "train"))["top1"]
    assert train_accuracy >= 90.0, train_accuracy
    log = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(log) == 25 and (tmp_path / "run" / "curves.png").exists()
    # validate_cls's path (checkpoint file -> fresh model -> loader) agrees with the in-memory model.
    from pvt_dense.classification.evaluation import validate_classifier
    last = tmp_path / "run" / "pvt_tiny_e0025_s0000125.ckpt"
    result = validate_classifier(config_for(digits, tmp_path / "run", "--batch_size", 16, "--val_split", "train",
                                            "--ckpt_path", last))
    assert result["top1"] == pytest.approx(train_accuracy)


def trainer_eval_loader(trainer, cfg, split):
    from pvt_dense.classification.data import ImageFolderSource, build_eval_loader, scan_image_folder
    paths, labels, _ = scan_image_folder(cfg.data_dir, split)
    return build_eval_loader(ImageFolderSource(paths, labels, shuffle=False, batch_size=cfg.batch_size), cfg,
                             cfg.num_classes)


def weights_of(trainer):
    return {p.name: p.asnumpy().copy() for p in trainer.state_parameters()}


# The reference recipe's augmentation (configs/classification/*.yaml) on 32x32 images; drop path stays 0 (its masks
# come from MindSpore's op-level generators, which a checkpoint cannot restore).
FULL_AUGMENTATION = ("--auto_augment", "randaug-m9-mstd0.5-inc1", "--mixup", 0.8, "--cutmix", 1.0, "--cutmix_prob",
                     1.0, "--re_prob", 0.25, "--hflip", 0.5, "--scale", 0.08, 1.0, "--ratio", 0.75, 1.3333,
                     "--label_smoothing", 0.1)


def test_augmented_batches_depend_only_on_their_place_in_the_epoch(digits, tmp_path):
    # The batches under the resume test below: with the full recipe, batch k of an epoch is the same whether it is
    # made after batches 0..k-1 (an uninterrupted run) or first (a resumed run), and differs from epoch to epoch.
    from pvt_dense.classification.data import ImageFolderSource, build_training_batches, scan_image_folder
    cfg = config_for(digits, tmp_path / "run", "--batch_size", 8, *FULL_AUGMENTATION)
    paths, labels, _ = scan_image_folder(cfg.data_dir, "train")

    def batches(shuffle, epoch, start_batch, count):
        source = ImageFolderSource(paths, labels, seed=3, shuffle=shuffle, batch_size=8)
        training = build_training_batches(source, cfg, cfg.num_classes)
        return [training.batch(epoch, index) for index in range(start_batch, start_batch + count)]

    whole, again, from_second = batches(True, 1, 0, 3), batches(True, 1, 0, 3), batches(True, 1, 1, 2)
    assert whole[0][1].shape == (8, 10) and not np.isin(whole[0][1], (0.0, 1.0)).all()  # mixed soft labels
    for ours, theirs in zip(whole, again, strict=True):
        np.testing.assert_array_equal(ours[0], theirs[0])
    for ours, theirs in zip(whole[1:], from_second, strict=True):
        np.testing.assert_array_equal(ours[0], theirs[0])
        np.testing.assert_array_equal(ours[1], theirs[1])
    # unshuffled, epochs 1 and 2 hold the same images in the same order but draw again: the augmentation is random
    assert not np.array_equal(batches(False, 1, 0, 1)[0][0], batches(False, 2, 0, 1)[0][0])


@pytest.mark.bad_input("training run (crash, interrupt, NaN)",
                       "a run killed after epoch 1 and again mid-epoch 2, then resumed (augmentation off, and the "
                       "full recipe: RandAugment, random resized crop, flip, random erasing, mixup/cutmix)",
                       "the resumed run reaches the uninterrupted run's step count and weights (to 1e-6); "
                       "metrics.jsonl/.csv list every epoch once (the last finished epoch survives each resume)")
@pytest.mark.parametrize("augmentation", [(), FULL_AUGMENTATION], ids=["no-augmentation", "full-augmentation"])
def test_interrupted_and_resumed_runs_reach_the_same_weights(digits, tmp_path, augmentation):
    # PyNative: four trainers would each compile the same graph; what is resumed does not depend on the mode.
    common = ("--batch_size", 16, "--max_steps_per_epoch", 3, "--lr", 1e-3, "--val_while_train", "False",
              "--mode", 1, *augmentation)
    straight = ClassificationRun(config_for(digits, tmp_path / "straight", "--epoch_size", 3, *common))
    straight.fit()

    # Killed after epoch 1 and mid-way through epoch 2 (a step checkpoint), then resumed twice.
    ClassificationRun(config_for(digits, tmp_path / "resumed", "--epoch_size", 1, *common)).fit()
    partial = ClassificationRun(config_for(digits, tmp_path / "resumed", "--epoch_size", 3, "--save_every_steps", 2,
                                           *common))

    class Crash(Exception):
        pass

    class CrashOnThirdStep:
        """The real train step, except that the process 'dies' on the third step of this session."""

        def __init__(self, step):
            self.step, self.calls = step, 0
            self.scale, self.clean_steps = step.scale, step.clean_steps

        def __call__(self, *inputs):
            self.calls += 1
            if self.calls == 3:  # the third step of epoch 2, after the step-2 checkpoint
                raise Crash()
            return self.step(*inputs)

    partial.train_step = CrashOnThirdStep(partial.train_step)
    with pytest.raises(Crash):
        partial.fit()
    resumed = ClassificationRun(config_for(digits, tmp_path / "resumed", "--epoch_size", 3, *common))
    resumed.fit()
    assert resumed.state["iteration"] == straight.state["iteration"] == 9
    # Every resume keeps the records of the epochs its checkpoint finished: each epoch is listed once.
    for run in ("straight", "resumed"):
        logged = [json.loads(line)["epoch"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        table = (tmp_path / run / "metrics.csv").read_text().splitlines()
        assert logged == [1, 2, 3] and [row.split(",")[0] for row in table[1:]] == ["1", "2", "3"], run
    expected, actual = weights_of(straight), weights_of(resumed)
    assert set(expected) == set(actual)
    for name in expected:
        # Same data order, same lr steps, same optimizer moments: equal up to float32 rounding of the kernels.
        np.testing.assert_allclose(actual[name], expected[name], rtol=0, atol=1e-6, err_msg=name)


@pytest.mark.bad_input("training run (crash, interrupt, NaN)",
                       "lr=1e30 (the loss diverges)",
                       "NonFiniteLossError: training stops and the last good checkpoint is kept; no saved checkpoint "
                       "holds non-finite weights")
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(digits, tmp_path):
    cfg = config_for(digits, tmp_path / "run", "--batch_size", 16, "--epoch_size", 3, "--max_steps_per_epoch", 2,
                     "--lr", 1e30, "--val_while_train", "False", "--opt", "sgd", "--weight_decay", 0.0)
    trainer = ClassificationRun(cfg)
    with pytest.raises(NonFiniteLossError) as stopped:
        trainer.fit()
    # The message only promises a kept checkpoint when one exists.
    saved = list((tmp_path / "run").glob("*.ckpt"))
    assert ("last good checkpoint is kept" if saved else "No checkpoint was written") in str(stopped.value)
    for path in (tmp_path / "run").glob("*.ckpt"):
        meta = read_checkpoint_meta(str(path))
        params = load_mindspore_checkpoint(str(path))
        assert all(np.isfinite(v.asnumpy()).all() for k, v in params.items() if k != "pvt_dense_meta_json"), meta


@pytest.mark.bad_input("training data",
                       "a truncated PNG in a class folder; a dataset without its val folder; num_classes=1000 for 10 "
                       "class folders",
                       "the image is skipped and counted (skipped_samples, its path recorded); PVTDenseError 'missing "
                       "split folder ... val' / 'num_classes is 1000 but ... has 10 class folders'")
def test_corrupt_images_are_skipped_and_counted_and_missing_splits_are_clear(digits, tmp_path):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(digits, data)
    broken = data / "train" / "n00000003" / "zz_broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    cfg = config_for(data, tmp_path / "run", "--batch_size", 16, "--epoch_size", 1, "--val_while_train", "False")
    trainer = ClassificationRun(cfg)
    state = trainer.fit()
    assert state["skipped_samples"] == 1
    assert str(broken) in [trainer.train_source.paths[i] for i in trainer.train_source.bad_files]
    shutil.rmtree(data / "val")
    with pytest.raises(PVTDenseError, match="missing split folder .*val"):
        ClassificationRun(config_for(data, tmp_path / "run2", "--epoch_size", 1, "--batch_size", 16))
    with pytest.raises(PVTDenseError, match="num_classes is 1000 but .* has 10 class folders"):
        ClassificationRun(load_classification_config(None, SMALL_RUN + ["--data_dir", str(digits), "--num_classes",
                                                                        "1000", "--ckpt_save_dir",
                                                                        str(tmp_path / "r3")]))


def mixed_precision_of(net, kinds):
    """{the mixed-precision types of net's cells of `kinds`}: what PyNative casts their operators' inputs to and
    graph mode inserts casts for."""
    return {str(cell.mixed_precision_type) for _, cell in net.cells_and_names() if isinstance(cell, kinds)}


def test_o2_keeps_layer_norm_and_gelu_in_float32_with_a_loss_close_to_o0(digits, tmp_path):
    from pvt_dense.models.fast_ops import GELU, LayerNorm
    common = ("--batch_size", 16, "--epoch_size", 1, "--max_steps_per_epoch", 3, "--lr", 1e-3, "--val_while_train",
              "False", "--mode", 1, "--loss_scale", 1024)
    o0 = ClassificationRun(config_for(digits, tmp_path / "o0", *common))
    o0.fit()
    o2 = ClassificationRun(config_for(digits, tmp_path / "o2", *common, "--amp_level", "O2"))
    o2.fit()
    assert mixed_precision_of(o2.net, (LayerNorm,)) == mixed_precision_of(o2.net, (GELU,)) == {
        "MixedPrecisionType.FP32"}
    # the rest of the network is float16 (the classifier head, for one)
    assert str(o2.net.head.mixed_precision_type) == "MixedPrecisionType.FP16"
    assert o2.state["overflow_steps"] == 0
    loss = {name: [json.loads(line)["train_loss"]
                   for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()] for name in ("o0", "o2")}
    # three AdamW steps from the same weights on the same batches; float16 matmuls change the loss in the 3rd digit
    assert abs(loss["o2"][0] - loss["o0"][0]) <= 5e-3 * abs(loss["o0"][0]), loss


def test_mindspores_own_o2_would_cast_the_fused_layer_norm_and_gelu_to_float16():
    # Why the trainer uses fast_ops.mixed_precision: MindSpore's O2 black list holds nn.LayerNorm, not these Cells
    # (and the float32 kernels refuse the float16 inputs MindSpore would then give them).
    import pvt_dense
    from pvt_dense.models.fast_ops import GELU, LayerNorm, mixed_precision
    plain = pvt_dense.create_model("pvt_tiny", num_classes=10)
    ms.amp.auto_mixed_precision(plain, "O2")
    assert mixed_precision_of(plain, (LayerNorm, GELU)) == {"MixedPrecisionType.FP16"}
    ours = pvt_dense.create_model("pvt_tiny", num_classes=10)
    mixed_precision(ours, "O2")
    assert mixed_precision_of(ours, (LayerNorm, GELU)) == {"MixedPrecisionType.FP32"}
    assert str(ours.head.mixed_precision_type) == "MixedPrecisionType.FP16"
