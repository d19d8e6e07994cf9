"""Export a PVT model (v1 or v2) at fixed input shapes: MINDIR (mindspore.load + nn.GraphCell) or ONNX (onnxruntime).

    python tools/export.py --config pvt_tiny --ckpt_path pvt_tiny.pth --shape 1x3x800x1344 --format MINDIR \
        --output pvt_tiny_backbone.mindir                                   # backbone: four stage maps
    python tools/export.py --config configs/classification/pvt_v2_b0.yaml --ckpt_path ckpt/best.ckpt \
        --shape 1x3x224x224                                                 # classifier: logits
    python tools/export.py --config pvt_small --task classifier --num_classes 100 --shape 1x3x224x224
    python tools/export.py --config pvt_tiny --ckpt_path pvt_tiny.pth --shape 1x3x800x1344 --format ONNX
    python tools/export.py --config configs/detection/retinanet_pvt_v2_b0_fpn_1x_coco.yaml --ckpt_path det.ckpt \
        --for_image_sizes 480x640 640x480 427x640                           # detector: one graph per input size

An exported graph has one fixed input shape, so --shape is required; several
shapes give one file each, named after its shape. Detector and segmentor shapes must be what their test protocol
feeds the network (height and width multiples of size_divisor, 32 by default); --for_image_sizes
(detector) computes those shapes for the original image sizes you will feed, so each graph reproduces the test
protocol for its images exactly.

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
    parser.add_argument("--config", "-c", required=True,
                        help="config file or model name (pvt_tiny ... pvt_large, pvt_v2_b0 ... b5, pvt_v2_b2_li)")
    parser.add_argument("--task", choices=list(EXPORT_TASKS), default=None)
    parser.add_argument("--ckpt_path", "--ckpt-path", default=None,
                        help="weights in any supported format (default: the config's ckpt_path; none: random)")
    parser.add_argument("--shape", nargs="+", default=None,
                        help="input NxCxHxW, one or more (e.g. 1x3x800x1344 1x3x1344x800): one graph each")
    parser.add_argument("--for_image_sizes", "--for-image-sizes", nargs="+", default=None, metavar="HxW",
                        help="detector: export the test protocol's input shape for images of these sizes")
    parser.add_argument("--format", default="MINDIR", type=str.upper, choices=list(FORMATS))
    parser.add_argument("--output", default=None, help="output file; with several shapes, each file is this name "
                        "with _<shape> before the extension (default: outputs/export/<model>_<task>_<shape>.<ext>)")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="do not load the exported graph back to compare it with the model")
    parser.add_argument("--device", default="CPU", choices=("CPU", "GPU", "Ascend"))
    return parser


def main(argv=None):
    import os

    import mindspore as ms

    from pvt_dense.export import FORMATS, ExportError, detector_shapes_for_images, export_model, parse_shape, \
        resolve_task
    args, overrides = build_parser().parse_known_args(argv)
    if (args.shape is None) == (args.for_image_sizes is None):
        raise ExportError("give the input shape(s) to export: --shape NxCxHxW [...] (e.g. 1x3x224x224), or, for "
                          "a detector, --for_image_sizes HxW [...]; an exported graph has one fixed input shape")
    task, config = resolve_task(args.config, args.task, overrides)
    if args.shape is not None:
        shapes = [parse_shape(text) for text in args.shape]
    else:
        if task != "detector":
            raise ExportError(f"--for_image_sizes is for the detector; the {task} takes --shape")
        shapes = detector_shapes_for_images(config, [_image_size(text) for text in args.for_image_sizes])
    shapes = list(dict.fromkeys(shapes))
    ms.set_device(args.device)
    ms.set_context(mode=ms.GRAPH_MODE)
    model_name = config.get("model") or config.get("backbone")
    extension = FORMATS[args.format]
    if not (args.ckpt_path or _config_has_ckpt(args.config)):
        print("warning: no --ckpt_path: the exported weights are random", file=sys.stderr)
    for shape in shapes:
        shape_name = "x".join(map(str, shape))
        if args.output is None:
            output = os.path.join("outputs", "export", f"{model_name}_{task}_{shape_name}{extension}")
        elif len(shapes) == 1:
            output = args.output
        else:
            stem = args.output[:-len(extension)] if args.output.lower().endswith(extension) else args.output
            output = f"{stem}_{shape_name}{extension}"
        info = export_model(args.config, output, shape=shape, task=args.task, ckpt_path=args.ckpt_path,
                            file_format=args.format, overrides=overrides, verify=args.verify)
        verified = (f"; loaded back, max |difference| {info['verified_max_abs_diff']:.2g}"
                    if info["verified_max_abs_diff"] is not None else "")
        print(f"exported {info['task']} {info['model']} at {shape_name} to {info['path']}{verified}")
        print(f"outputs: {[o['shape'] for o in info['outputs']]}; metadata: {info['path']}.json")
    return 0


def _image_size(text):
    parts = str(text).lower().split("x")
    try:
        height, width = (int(p) for p in parts)
    except ValueError:
        from pvt_dense.export import ExportError
        raise ExportError(f"--for_image_sizes takes HxW image sizes (e.g. 480x640), got {text!r}") from None
    return height, width


def _config_has_ckpt(config):
    import os
    if not os.path.isfile(config):
        return False
    from pvt_dense.config import read_yaml
    return bool(read_yaml(config).get("ckpt_path"))


if __name__ == "__main__":
    sys.exit(run_tool(main))
