r"""Train Semantic FPN on a PVT backbone (ADE20K, iteration-based, poly lr, AdamW).

    python tools/train_seg.py --config configs/segmentation/semfpn_pvt_tiny_ade20k_40k.yaml \
        --data_dir /path/to/ADEChallengeData2016 --pretrained /path/to/pvt_tiny.pth
    msrun --worker_num=8 --local_worker_num=8 python tools/train_seg.py --config ... --data_dir ...
    mpirun -n 8 python tools/train_seg.py --config ... --data_dir ...                 # Ascend/GPU clusters
    python tools/train_seg.py --config ... --data_dir ... --distribute False          # one process

Any config key can be overridden as --key value; an unknown key is an error. Training resumes from the newest
checkpoint in ckpt_save_dir unless --resume '' is given. --load_from PATH starts fine-tuning from a whole Semantic
FPN's weights (ours, an official PVT release, mmsegmentation 1.x); iteration and optimizer start fresh.
"""
import sys

from pvt_dense.cli import run_tool, split_config_argument


def main(argv=None):
    if argv is None and any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(__doc__)
        return 0
    from pvt_dense.segmentation.config import load_segmentation_config
    from pvt_dense.segmentation.train import train_segmentor
    config, overrides = split_config_argument(argv)
    cfg = load_segmentation_config(config, overrides)
    state = train_segmentor(cfg)
    if state.get("best_metric") is not None:
        print(f"done: {state['iteration']} iterations, best mIoU {100 * state['best_metric']:.2f} "
              f"(checkpoints in {cfg.ckpt_save_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
