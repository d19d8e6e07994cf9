r"""Evaluate a Semantic FPN checkpoint: mIoU, mAcc, aAcc and a per-class IoU/Acc table on val_split.

    python tools/eval_seg.py --config configs/segmentation/semfpn_pvt_tiny_ade20k_40k.yaml \
        --ckpt_path runs/semfpn_pvt_tiny/semfpn_pvt_tiny_best.ckpt --data_dir /path/to/ADEChallengeData2016

--ckpt_path may also be an official PVT Semantic FPN release or an mmsegmentation 1.x checkpoint (.pth).
--test_mode slide evaluates large images by sliding windows; other config keys work as in train_seg.py.
"""
import sys

from pvt_dense.cli import run_tool, tool_config


def main(argv=None):
    from pvt_dense.segmentation.config import EVAL_FIELDS, load_segmentation_config
    from pvt_dense.segmentation.evaluation import evaluate_checkpoint, print_evaluation
    cfg = tool_config(argv, __doc__, load_segmentation_config, EVAL_FIELDS,
                      {"ckpt_path": "--ckpt_path PATH is required (train_seg.py's, an official PVT Semantic FPN "
                       ".pth or an mmsegmentation 1.x one)"}, defaults={"distribute": False})
    if cfg is None:
        return 0
    print_evaluation(evaluate_checkpoint(cfg, cfg.ckpt_path))
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
