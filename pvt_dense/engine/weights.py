"""The weights a dense-prediction run starts from: its backbone's pretrained ones (`build_backbone`) or, fine-tuning,
a whole model's (`starting_weights`, `load_starting_weights`)."""
from ..checkpoint.whole_model import load_whole_model, print_report
from ..models import create_backbone
from .config_fields import check_backbone_options, config_for_checkpoint, resolve_backbone_norm_eps


def build_backbone(cfg):
    """The PVT backbone a config names, with its pretrained weights loaded (strictly; classifier checkpoints drop
    their cls token, final norm and head with a note)."""
    check_backbone_options(cfg)
    return create_backbone(cfg.backbone, out_indices=tuple(cfg.out_indices), pretrained=cfg.pretrained or None,
                           drop_path_rate=cfg.drop_path_rate, frozen_stages=cfg.frozen_stages,
                           recompute_stages=tuple(cfg.recompute_stages),
                           norm_eps_style=resolve_backbone_norm_eps(cfg))


def starting_weights(cfg):
    """(cfg with its backbone eps style resolved, the `load_from` checkpoint or ''): fine-tuning starts from a
    whole-model checkpoint's weights only; a resumable run in ckpt_save_dir still takes precedence (`resume`)."""
    if cfg.load_from:
        return config_for_checkpoint(cfg, cfg.load_from)[0], cfg.load_from
    return type(cfg)(cfg, backbone_norm_eps=resolve_backbone_norm_eps(cfg)), ""


def load_starting_weights(model, checkpoint):
    """Fine-tuning: a whole-model checkpoint's weights into `model` (nothing when `checkpoint` is ''), the
    classification head skipped, with a warning, where the class count differs (mmdetection's `load_from`)."""
    if checkpoint:
        print_report(load_whole_model(model, checkpoint, skip_mismatched_classifier=True))
