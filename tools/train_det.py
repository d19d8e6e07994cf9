"""Train RetinaNet + FPN on a PVT backbone with a COCO-layout dataset (the official 1x recipe by default).

    python tools/train_det.py --config configs/detection/retinanet_pvt_tiny_fpn_1x_coco.yaml --data_dir /path/to/coco
    python tools/train_det.py --config ... --data_dir ... --distribute False          # one process
    msrun --worker_num=8 --local_worker_num=8 python tools/train_det.py --config ... --data_dir ...
    mpirun -n 8 python tools/train_det.py --config ... --data_dir ...                  # Ascend/GPU clusters

data_dir holds annotations/instances_{train,val}2017.json and the train2017/ and val2017/ image folders. Any config
key can be overridden as --key value (--backbone pvt_large --pretrained pvt_large.pth --batch_size 1); an unknown
key is an error. Training resumes from the newest checkpoint in ckpt_save_dir unless --resume '' is given.
--load_from PATH starts fine-tuning from a whole RetinaNet's weights (ours, an official PVT release, mmdetection
3.x); iteration, optimizer and schedule start fresh, and a resumable run in ckpt_save_dir still takes precedence.
"""
import sys

from pvt_dense.cli import run_tool, split_config_argument


def main(argv=None):
    if argv is None and any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(__doc__)
        return 0
    from pvt_dense.detection.config import load_detection_config
    from pvt_dense.detection.train import train_detector
    config, overrides = split_config_argument(argv)
    state = train_detector(load_detection_config(config, overrides))
    if state["metrics"]:
        print(f"final box AP {state['metrics']['AP']:.4f} (AP50 {state['metrics']['AP50']:.4f}); checkpoints in "
              f"{state['run_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
