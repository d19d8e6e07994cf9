"""Validate a classifier checkpoint (any supported format) on an ImageNet-layout val split."""
from ..errors import PVTDenseError


def validate_classifier(cfg):
    """top-1 / top-5 / loss of cfg.ckpt_path on data_dir/val_split; returns the result dict."""
    from ..engine.recipe import set_device_and_mode
    from ..models import create_model
    from .data import ImageFolderSource, build_eval_loader, scan_image_folder
    from .train import evaluate

    if not cfg.ckpt_path:
        raise PVTDenseError("validation needs --ckpt_path (a checkpoint to validate)")
    set_device_and_mode(cfg)
    paths, labels, classes = scan_image_folder(cfg.data_dir, cfg.val_split)
    net = create_model(cfg.model, num_classes=cfg.num_classes, pretrained=cfg.ckpt_path)
    if len(classes) != cfg.num_classes:
        raise PVTDenseError(f"{cfg.ckpt_path} has {cfg.num_classes} classes but {cfg.data_dir}/{cfg.val_split} has "
                            f"{len(classes)} class folders; pass --num_classes {len(classes)} if the head matches")
    source = ImageFolderSource(paths, labels, shuffle=False, batch_size=cfg.batch_size)
    result = evaluate(net, build_eval_loader(source, cfg, cfg.num_classes))
    result["skipped_images"] = len(source.bad_files)
    return result
