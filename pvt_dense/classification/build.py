"""Builders of the classification task: the PVT classifier from a checked config (`build_classifier`), its
loss-wrapped training network (`training_network`, the same pair of names in every task's build.py), and a
classifier with a checkpoint's weights for validation and export (`load_classifier`)."""
from .config import official_recipe_overrides


def build_classifier(cfg, load_pretrained=True):
    """The classifier `cfg.model` with `cfg.num_classes` outputs, its starting weights from `cfg.ckpt_path`
    (non-strict: a pretrained file with another head fine-tunes) unless `load_pretrained=False`, cast to the
    config's mixed precision."""
    from ..models import create_model
    from ..models.fast_ops import mixed_precision
    net = create_model(cfg.model, num_classes=cfg.num_classes, drop_path_rate=cfg.drop_path_rate,
                       drop_rate=cfg.drop_rate, pretrained=(cfg.ckpt_path or None) if load_pretrained else None,
                       strict=False)
    if cfg.amp_level != "O0":
        # In place; LayerNorm and GELU stay float32 under O2 (see fast_ops.mixed_precision).
        mixed_precision(net, cfg.amp_level)
    return net


def training_network(classifier, cfg):
    """The classifier with mindcv's loss (`cfg.loss`, label smoothing): what the train step differentiates (it
    keeps the classifier's parameter names)."""
    from mindcv.loss import create_loss
    from mindspore import nn
    return nn.WithLossCell(classifier, create_loss(name=cfg.loss, label_smoothing=cfg.label_smoothing))


def gradient_clip(cfg):
    """The gradient-norm clip of the run (0: none); the official recipe sets its own."""
    clip = cfg.clip_value if cfg.clip_grad else 0.0
    if cfg.official_recipe:
        official_clip, official_value, _ = official_recipe_overrides(cfg)
        clip = official_value if official_clip else clip
    return clip


def load_classifier(cfg, ckpt_path):
    """The classifier of `cfg` with every weight of `ckpt_path` (strict: a checkpoint of another head is refused),
    in evaluation mode."""
    from ..models import create_model
    net = create_model(cfg.model, num_classes=cfg.num_classes, pretrained=ckpt_path or None)
    net.set_train(False)
    return net
