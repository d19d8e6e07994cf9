"""Pretrain a PVT classifier on an ImageNet-layout dataset with the reference recipe.

    python tools/train_cls.py --config configs/classification/pvt_tiny.yaml --data_dir /path/to/imagenet
    python tools/train_cls.py --config ... --data_dir ... --distribute False          # one process
    msrun --worker_num=8 --local_worker_num=8 python tools/train_cls.py --config ... --data_dir ...
    mpirun -n 8 python tools/train_cls.py --config ... --data_dir ...                  # Ascend/GPU clusters

Any config key can be overridden as --key value (e.g. --batch_size 64 --lr 0.001); an unknown key is an error.
Training resumes from the newest checkpoint in ckpt_save_dir unless --resume '' is given.
"""
import sys

from pvt_dense.cli import run_tool, split_config_argument


def main(argv=None):
    if argv is None and any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(__doc__)
        return 0
    from pvt_dense.classification.config import load_classification_config
    from pvt_dense.classification.train import train_classifier
    config, overrides = split_config_argument(argv)
    cfg = load_classification_config(config, overrides)
    train_classifier(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
