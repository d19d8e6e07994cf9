"""The export: a model of one `EXPORT_TASKS` task at a fixed input shape, written atomically as MINDIR or ONNX with
a JSON sidecar (input shape, output shapes, preprocessing, checkpoint and versions), the exported graph loaded back
and compared with the model before it is kept (ONNX through onnxruntime)."""
import hashlib
import json
import os
import shutil
import sys
import tempfile

import numpy as np

from ..atomic import publish, write_atomic
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..errors import ConfigError
from ..version import __version__
from .onnx_substitutes import make_onnx_exportable
from .tasks import EXPORT_TASKS, ExportError

FORMATS = {"MINDIR": ".mindir", "ONNX": ".onnx"}


def _run_onnx(path, pixels):
    try:
        import onnxruntime
    except ImportError:
        raise ExportError("verifying an ONNX export needs onnxruntime (pip install -e .[export]); or pass "
                          "--no-verify") from None
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: pixels})


# --- shapes and the export --------------------------------------------------------------------------------------------

def parse_shape(text):
    """'1x3x800x1344' -> (1, 3, 800, 1344): four positive integers, 3 channels (NCHW RGB)."""
    parts = str(text).lower().replace("*", "x").replace(",", "x").split("x")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise ExportError(f"--shape must be NxCxHxW (e.g. 1x3x800x1344), got {text!r}") from None
    if len(shape) != 4 or min(shape) <= 0:
        raise ExportError(f"--shape must be four positive integers NxCxHxW (e.g. 1x3x800x1344), got {text!r}")
    if shape[1] != 3:
        raise ExportError(f"--shape must have 3 channels (RGB, NCHW), got {shape[1]} in {text!r}")
    return shape


def resolve_task(config_or_model, task=None, overrides=()):
    """(task name, loaded config) for a model name or a config file; without `task`, a model name means the
    backbone and a file means the first task (in table order, backbone last) whose config schema accepts it."""
    from ..models import list_models
    is_model_name = config_or_model in list_models()
    if not is_model_name and not os.path.isfile(str(config_or_model)):
        raise ExportError(f"--config must be a config file or a model name ({', '.join(list_models())}), got "
                          f"{config_or_model!r}")
    path, name = (None, config_or_model) if is_model_name else (config_or_model, None)
    if task is not None:
        if task not in EXPORT_TASKS:
            raise ExportError(f"unknown task {task!r}; valid: {', '.join(EXPORT_TASKS)}")
        return task, EXPORT_TASKS[task].load_config(path, overrides, name)
    if is_model_name:
        return "backbone", EXPORT_TASKS["backbone"].load_config(None, overrides, name)
    reasons = []
    for candidate in [t for t in EXPORT_TASKS if t != "backbone"] + ["backbone"]:
        try:
            return candidate, EXPORT_TASKS[candidate].load_config(path, overrides, None)
        except ConfigError as err:
            reasons.append(f"{candidate}: {err}")
    raise ExportError(f"{config_or_model} is not a config of any exportable task; pass --task. "
                      + " | ".join(reasons))


def _check_input_shape(net, task, shape):
    """A clear error for a shape the model cannot take (PVT models check their input in __call__, which export
    does not go through)."""
    spec = getattr(net, "spec", None)
    if spec is None:
        return
    from ..models.pvt import check_image_batch
    last_stage = getattr(net, "num_stages", len(spec.depths)) - 1
    try:
        check_image_batch(shape, getattr(net, "in_channels", 3), spec.strides[last_stage], f"the {task}")
    except ValueError as err:
        raise ExportError(f"cannot export at shape {'x'.join(map(str, shape))}: {err}") from None


def check_protocol_shape(task, config, shape):
    """Detector and segmentor graphs take the test protocol's network input: an image resized keeping its ratio
    and padded (detector) or resized (segmentor) to multiples of `size_divisor` (32 by default). A
    graph at another size could never be fed an image prepared the way the published numbers were measured, so
    it is refused with the nearest sizes that work."""
    divisor = "size_divisor" if task in ("detector", "segmentor") else None
    step = int(config.get(divisor) or 1) if divisor else 1
    height, width = shape[2], shape[3]
    if step > 1 and (height % step or width % step):
        def nearest(size):
            return ", ".join(str(v) for v in sorted({max(step, size // step * step), -(-size // step) * step}))
        raise ExportError(f"cannot export the {task} at {'x'.join(map(str, shape))}: its test protocol feeds "
                          f"inputs whose height and width are multiples of {divisor} {step} (height {nearest(height)}"
                          f"; width {nearest(width)}); a graph has one fixed input size, so export one per size "
                          f"you will feed (several --shape values), e.g. --for_image_sizes HxW for the detector")


def detector_shapes_for_images(config, image_sizes, batch=1):
    """The distinct (batch, 3, H, W) network inputs of images of `image_sizes` ((height, width) pairs) under the
    detection test protocol (keep-ratio resize to `img_scale`, pad to `size_divisor`), sorted: the shapes to export
    so that every one of those images has a graph that reproduces the protocol exactly."""
    from ..data.transforms import network_input_size
    shapes = set()
    for height, width in image_sizes:
        if int(height) <= 0 or int(width) <= 0:
            raise ExportError(f"image sizes must be positive HxW, got {height}x{width}")
        shapes.add((batch, 3) + tuple(network_input_size(int(height), int(width), tuple(config.img_scale),
                                                       config.size_divisor)))
    return sorted(shapes)


def _output_shapes(path, shape):
    """Output shapes of an exported graph, read by running it once on zeros."""
    import mindspore as ms
    from mindspore import nn
    outputs = nn.GraphCell(ms.load(path))(ms.Tensor(np.zeros(shape, np.float32)))
    return [list(o.shape) for o in _outputs_as_tuple(outputs)]


def _outputs_as_tuple(outputs):
    return tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_model(config_or_model, output, shape, task=None, ckpt_path=None, file_format="MINDIR",
                 overrides=(), verify=True, tolerance=1e-4):
    """Export `task` (see EXPORT_TASKS) built from a config file or a model name at the fixed input `shape`
    (NxCxHxW; detector and segmentor: H and W multiples of their divisor, see `check_protocol_shape`).

    Writes `output` atomically (the format's extension is added when missing) plus `output + '.json'` with the
    metadata. With `verify`, the written graph is loaded with mindspore.load + nn.GraphCell and must give the
    model's outputs on a random input to `tolerance`; otherwise nothing is kept. Returns the metadata dict.
    """
    import mindspore as ms
    from mindspore import nn

    from ..models.fast_ops import mindspore_ops_only

    file_format = str(file_format).upper()
    if file_format not in FORMATS:
        raise ExportError(f"unknown format {file_format!r}; valid: {', '.join(FORMATS)}")
    if shape is None:
        raise ExportError("an exported graph has one fixed input shape: give it (e.g. 1x3x224x224)")
    shape = parse_shape("x".join(str(s) for s in shape)) if not isinstance(shape, str) else parse_shape(shape)
    task, config = resolve_task(config_or_model, task, overrides)
    if file_format == "ONNX" and task in ("detector", "segmentor"):
        raise ExportError(f"the {task} cannot be exported as ONNX: its FPN resizes feature maps (nearest/bilinear), "
                          "which MindSpore 2.10's ONNX exporter cannot write; export it as MINDIR (ONNX covers the "
                          "backbone and the classifier)")
    check_protocol_shape(task, config, shape)
    ckpt_path = ckpt_path or config.get("ckpt_path") or None
    if ckpt_path and not os.path.isfile(ckpt_path):
        raise ExportError(f"checkpoint not found: {ckpt_path}")
    extension = FORMATS[file_format]
    output = os.fspath(output)
    if not output.lower().endswith(extension):
        output += extension
    folder = os.path.dirname(os.path.abspath(output))
    os.makedirs(folder, exist_ok=True)

    with mindspore_ops_only():
        net = EXPORT_TASKS[task].build(config, ckpt_path)
    net.set_train(False)
    _check_input_shape(net, task, shape)
    pixels = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    reference = [o.asnumpy() for o in _outputs_as_tuple(net(ms.Tensor(pixels)))] if verify else None
    if file_format == "ONNX":
        make_onnx_exportable(net, shape)

    workdir = tempfile.mkdtemp(prefix=".tmp-export-", dir=folder)
    try:
        base = os.path.join(workdir, "model")
        written = base + extension
        if file_format == "ONNX":
            ms.onnx.export(net, ms.Tensor(np.zeros(shape, np.float32)), file_name=written)
        else:
            ms.export(net, ms.Tensor(np.zeros(shape, np.float32)), file_name=base, file_format=file_format)
        if not os.path.isfile(written):
            raise ExportError(f"mindspore.export wrote no {extension} file (got {os.listdir(workdir)})")
        if b"fast_ops-" in open(written, "rb").read():
            raise ExportError("the exported graph refers to pvt_dense's machine-local kernel library")
        max_diff = None
        if verify:
            if file_format == "ONNX":
                exported = _run_onnx(written, pixels)
            else:
                graph = nn.GraphCell(ms.load(written))
                exported = [o.asnumpy() for o in _outputs_as_tuple(graph(ms.Tensor(pixels)))]
            if len(exported) != len(reference) or any(a.shape != b.shape for a, b in zip(exported, reference)):
                raise ExportError(f"the exported graph returns shapes {[a.shape for a in exported]}, the model "
                                  f"{[b.shape for b in reference]}")
            max_diff = max(float(np.abs(a - b).max()) for a, b in zip(exported, reference))
            if not max_diff <= tolerance:
                raise ExportError(f"the exported graph differs from the model by {max_diff:.3g} "
                                  f"(> {tolerance}); nothing was written")
        if verify:
            output_shapes = [list(o.shape) for o in reference]
        elif file_format == "ONNX":
            output_shapes = None  # read them from the file with onnx / onnxruntime
        else:
            output_shapes = _output_shapes(written, shape)
        publish(written, output)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    metadata = {
        "task": task, "model": config.get("model") or config.get("backbone"), "format": file_format,
        "file": os.path.basename(output),
        "sha256": sha256_of(output), "input": {"name": "x", "shape": list(shape), "dtype": "float32",
                                               "layout": "NCHW, RGB",
                                               "preprocessing": {"mean": IMAGENET_MEAN, "std": IMAGENET_STD,
                                                                 "note": "(pixel - mean) / std on 0-255 RGB"}},
        "outputs": [{"shape": o, "dtype": "float32"} for o in output_shapes] if output_shapes else None,
        "outputs_meaning": EXPORT_TASKS[task].outputs, "checkpoint": os.path.abspath(ckpt_path) if ckpt_path else None,
        "checkpoint_sha256": sha256_of(ckpt_path) if ckpt_path else None, "verified_max_abs_diff": max_diff,
        "versions": {"pvt_dense": __version__, "mindspore": ms.__version__,
                     "python": sys.version.split()[0]},
    }
    if task == "detector":
        metadata["protocol"] = (f"reproduces the test protocol for images whose keep-ratio resize to img_scale "
                                f"{list(config.img_scale)}, padded to multiples of {config.size_divisor}, is "
                                f"{shape[2]}x{shape[3]} (detector_shapes_for_images)")
    if hasattr(net, "feature_info"):
        metadata["feature_info"] = [{"stage": f.stage, "channels": f.channels, "stride": f.stride}
                                    for f in net.feature_info]
    write_atomic(output + ".json", (json.dumps(metadata, indent=1) + "\n").encode())
    metadata["path"] = output
    return metadata


def load_exported(path):
    """An exported MINDIR as a callable `nn.GraphCell` (inputs and outputs as in the sidecar JSON)."""
    import mindspore as ms
    from mindspore import nn
    if not os.path.isfile(path):
        raise ExportError(f"exported model not found: {path}")
    return nn.GraphCell(ms.load(path))
