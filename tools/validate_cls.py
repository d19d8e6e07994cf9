"""Validate a PVT classifier checkpoint: top-1, top-5 and loss on data_dir/val.

    python tools/validate_cls.py --model=pvt_tiny --data_dir /path/to/imagenet --ckpt_path /path/to/ckpt

--ckpt_path takes every format `pretrained=` takes (official .pth, HuggingFace, MindCV or pvt_dense .ckpt).
Other config keys (--config FILE, --batch_size, --crop_pct, --num_classes, ...) work as in train_cls.py.
"""
import sys

from pvt_dense.cli import run_tool, split_config_argument


def main(argv=None):
    if argv is None and any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(__doc__)
        return 0
    from pvt_dense.classification.config import load_classification_config
    from pvt_dense.classification.evaluation import validate_classifier
    config, overrides = split_config_argument(argv)
    cfg = load_classification_config(config, overrides, defaults={"distribute": False, "batch_size": 32})
    result = validate_classifier(cfg)
    print(f"{cfg.model} on {cfg.data_dir}/{cfg.val_split}: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%"
          f"  loss {result['loss']:.4f}  ({result['samples']} images"
          + (f", {result['skipped_images']} unreadable skipped" if result["skipped_images"] else "") + ")")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
