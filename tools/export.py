"""Export a PVT model at a fixed input shape: MINDIR (mindspore.load + nn.GraphCell) or ONNX (onnxruntime).

    python tools/export.py --config pvt_tiny --ckpt_path pvt_tiny.pth --shape 1x3x800x1344 --format MINDIR \
        --output pvt_tiny_backbone.mindir                                   # backbone: four stage maps
    python tools/export.py --config configs/classification/pvt_tiny.yaml --ckpt_path ckpt/best.ckpt \
        --shape 1x3x224x224                                                 # classifier: logits
    python tools/export.py --config pvt_small --task classifier --num_classes 100 --shape 1x3x224x224
    python tools/export.py --config pvt_tiny --ckpt_path pvt_tiny.pth --shape 1x3x800x1344 --format ONNX

--config is a model name (exports the backbone unless --task says otherwise) or a config file (the task is the
first one whose config schema accepts the file; --task picks one). Remaining --key value pairs override config keys
(e.g. --out_indices 1 2 3). The exported graph is loaded back and compared with the model before it is kept
(--no-verify skips that; ONNX verification needs onnxruntime: pip install -e .[export]); a JSON sidecar records
shapes, preprocessing, checkpoint and versions.
"""
import argparse
import sys

from pvt_dense.cli import run_tool


def build_parser():
    from pvt_dense.export import EXPORT_TASKS, FORMATS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", "-c", required=True, help="config file or model name (pvt_tiny ... pvt_large)")
    parser.add_argument("--task", choices=list(EXPORT_TASKS), default=None)
    parser.add_argument("--ckpt_path", "--ckpt-path", default=None,
                        help="weights in any supported format (default: the config's ckpt_path; none: random)")
    parser.add_argument("--shape", default="1x3x800x1344", help="input NxCxHxW (default 1x3x800x1344)")
    parser.add_argument("--format", default="MINDIR", type=str.upper, choices=list(FORMATS))
    parser.add_argument("--output", default=None, help="output file (default: outputs/export/<model>_<task>_"
                        "<shape>.<ext>)")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="do not load the exported graph back to compare it with the model")
    parser.add_argument("--device", default="CPU", choices=("CPU", "GPU", "Ascend"))
    return parser


def main(argv=None):
    import os

    import mindspore as ms

    from pvt_dense.export import FORMATS, export_model, parse_shape, resolve_task
    args, overrides = build_parser().parse_known_args(argv)
    ms.set_device(args.device)
    ms.set_context(mode=ms.GRAPH_MODE)
    shape = parse_shape(args.shape)
    output = args.output
    if output is None:
        task, config = resolve_task(args.config, args.task, overrides)
        model_name = config.get("model") or config.get("backbone")
        output = os.path.join("outputs", "export", f"{model_name}_{task}_{'x'.join(map(str, shape))}"
                              f"{FORMATS[args.format]}")
    if not (args.ckpt_path or _config_has_ckpt(args.config)):
        print("warning: no --ckpt_path: the exported weights are random", file=sys.stderr)
    info = export_model(args.config, output, shape=shape, task=args.task, ckpt_path=args.ckpt_path,
                        file_format=args.format, overrides=overrides, verify=args.verify)
    verified = (f"; loaded back, max |difference| {info['verified_max_abs_diff']:.2g}"
                if info["verified_max_abs_diff"] is not None else "")
    print(f"exported {info['task']} {info['model']} at {args.shape} to {info['path']}{verified}")
    print(f"outputs: {[o['shape'] for o in info['outputs']]}; metadata: {info['path']}.json")
    return 0


def _config_has_ckpt(config):
    import os
    if not os.path.isfile(config):
        return False
    from pvt_dense.config import read_yaml
    return bool(read_yaml(config).get("ckpt_path"))


if __name__ == "__main__":
    sys.exit(run_tool(main))
