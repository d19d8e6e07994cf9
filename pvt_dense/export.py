"""Export a model at a fixed input shape for deployment: MINDIR (mindspore.load + nn.GraphCell runs it) or ONNX.

What can be exported is one explicit table, `EXPORT_TASKS`, from task names to a config loader and a builder:
- "backbone": the dense backbone; outputs the selected stage maps (N, C_i, H // s_i, W // s_i);
- "classifier": the ImageNet classifier; outputs logits (N, num_classes);
- "detector": RetinaNet; outputs per-level class logits then box deltas (decode and NMS outside the graph);
- "segmentor": Semantic FPN; outputs logits (N, num_classes, H, W).
A task's builder receives the loaded (checked) config and the checkpoint path and returns the Cell to export; a
new task is one table line.

The exported graph uses MindSpore's own operators, never pvt_dense's compiled CPU kernels (a graph with those names
this machine's .so file by path and would not run elsewhere); the numbers are the same to ~1e-6. The file is written
atomically, with a JSON sidecar that records the input shape, output shapes, preprocessing, checkpoint and
versions, and by default the exported graph is loaded back and compared with the model before it is kept.

ONNX: MindSpore 2.10's exporter has no Erf (exact GELU), no bilinear resize, no Unstack and no Reciprocal, so the
ONNX graph is the same model written with substitutes (`make_onnx_exportable`): GELU as x/2 + |x|/2 erf(|x|/sqrt2)
with a rational-exponential erf accurate to 1.5e-7, the position embeddings resized for the fixed shape ahead of
time with MindSpore's own bilinear resize (v1), PVT v2 "-li"'s adaptive 7x7 pooling as two constant matmuls for
the fixed grid, and Gather for Unstack. Checked with onnxruntime against the exact model (max difference ~3e-6 on
random weights; tests/test_export.py). Every task works for PVT v1 and v2 models alike.
"""
import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from typing import Callable

import numpy as np
from mindspore import nn, ops

from .atomic import publish, write_atomic
from .config import Field, load_config
from .data.transforms import IMAGENET_MEAN, IMAGENET_STD
from .errors import ConfigError, PVTDenseError
from .version import __version__

FORMATS = {"MINDIR": ".mindir", "ONNX": ".onnx"}


class ExportError(PVTDenseError):
    """An export request is invalid (shape, task, format, output path) or the exported graph is wrong."""


@dataclass(frozen=True)
class ExportTask:
    """How to export one kind of model: `load_config(config_file_or_None, overrides, model_name_or_None)` returns a
    checked Config; `build(config, ckpt_path)` returns the Cell in eval mode; `outputs` describes what it returns."""

    load_config: Callable
    build: Callable
    outputs: str


# --- backbone -----------------------------------------------------------------------------------------------------

def _backbone_schema():
    from .models import list_models
    return {
        "model": Field("pvt_tiny", str, choices=tuple(list_models())),
        "out_indices": Field([0, 1, 2, 3], list, "stages whose maps are outputs", item=int),
        "ckpt_path": Field("", str, "weights (any supported checkpoint format)"),
    }


def load_backbone_config(path, overrides, model_name):
    """A model name, or any YAML whose `model` (or `backbone`) names a PVT size; only those keys are read."""
    defaults = {"model": model_name} if model_name else {}
    if path:
        from .config import read_yaml
        raw = read_yaml(path)
        name = raw.get("backbone") if isinstance(raw.get("backbone"), str) else raw.get("model")
        if name is None:
            raise ConfigError(f"{path}: no 'model' or 'backbone' key naming the PVT size to export")
        defaults = {"model": name, **({"ckpt_path": raw["ckpt_path"]} if raw.get("ckpt_path") else {})}
    return load_config(_backbone_schema(), None, overrides, defaults=defaults)


def build_backbone(config, ckpt_path):
    from .models import create_backbone
    indices = tuple(config.out_indices)
    return create_backbone(config.model, out_indices=indices, pretrained=ckpt_path or None)


# --- classifier ---------------------------------------------------------------------------------------------------

def load_classifier_config(path, overrides, model_name):
    from .classification.config import load_classification_config
    return load_classification_config(path, overrides, defaults={"model": model_name} if model_name else None)


def build_classifier(config, ckpt_path):
    from .classification.build import load_classifier
    return load_classifier(config, ckpt_path)


# --- detector and segmentor ---------------------------------------------------------------------------------------

def _config_file_needed(task, path, folder):
    if not path:
        raise ExportError(f"the {task} task needs its config file: --config configs/{folder}/....yaml")


def load_detector_config(path, overrides, model_name):
    _config_file_needed("detector", path, "detection")
    from .detection.config import load_detection_config
    return load_detection_config(path, overrides)


def build_detector(config, ckpt_path):
    """RetinaNet with the weights of a training checkpoint (or the config's backbone weights and a fresh head)."""
    if ckpt_path:
        from .detection.build import load_detector
        return load_detector(config, ckpt_path)
    from .detection.build import build_retinanet
    detector = build_retinanet(config)
    detector.set_train(False)
    return detector


def load_segmentor_config(path, overrides, model_name):
    _config_file_needed("segmentor", path, "segmentation")
    from .segmentation.config import load_segmentation_config
    return load_segmentation_config(path, overrides)


def build_segmentor(config, ckpt_path):
    """Semantic FPN (BatchNorm statistics included) returning logits upsampled to the input size."""
    from .segmentation.build import build_segmentor as build_network, load_trained_segmentor
    from .segmentation.segmentor import SegmentorInference
    network = load_trained_segmentor(config, ckpt_path) if ckpt_path else build_network(config)
    network.set_train(False)
    return SegmentorInference(network)


EXPORT_TASKS = {
    "backbone": ExportTask(load_backbone_config, build_backbone,
                           "stage maps (N, C_i, H / s_i, W / s_i), rounded down (PVT v1) or up (v2)"),
    "classifier": ExportTask(load_classifier_config, build_classifier, "logits (N, num_classes)"),
    "detector": ExportTask(load_detector_config, build_detector,
                           "per-level class logits (N, A*K, H_l, W_l) then box deltas (N, A*4, H_l, W_l), P3..P7; "
                           "decode and NMS with pvt_dense.detection.postprocess"),
    "segmentor": ExportTask(load_segmentor_config, build_segmentor, "logits (N, num_classes, H, W)"),
}


# --- ONNX: exact-equivalent substitutes for what MindSpore 2.10 cannot export ----------------------------------------

class PolynomialGELU(nn.Cell):
    """Exact (erf) GELU from operators MindSpore's ONNX exporter knows (Abs, Mul, Add, RealDiv, Exp).

    erf(a) for a >= 0 is 1 - t P(t) exp(-a^2), t = 1 / (1 + p a) (Abramowitz & Stegun 7.1.26, |error| <= 1.5e-7),
    and x (1 + erf(x / sqrt 2)) = x + |x| erf(|x| / sqrt 2), so no sign or select is needed. GELU error:
    <= 0.75e-7 |x| + float32 round-off, far inside the 1e-4 parity bound.
    """

    def __init__(self):
        super().__init__()
        self.divide = ops.RealDiv()  # 1 / y would become Reciprocal, which the exporter lacks

    def construct(self, x):
        magnitude = ops.abs(x)
        a = magnitude * 0.7071067811865476
        t = self.divide(ops.ones_like(a), 1.0 + 0.3275911 * a)
        poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
        erf_a = 1.0 - poly * ops.exp(-a * a)
        return 0.5 * (x + magnitude * erf_a)


class SplitPair(nn.Cell):
    """(x[0], x[1]): what ops.Unstack(axis=0) gives for a leading axis of 2, from Gather, which ONNX has."""

    def construct(self, pair):
        return pair[0], pair[1]


def _replace_cells(net, predicate, make):
    for name, cell in list(net.cells_and_names()):
        if name and predicate(cell):
            parent_name, _, attribute = name.rpartition(".")
            parent = net if not parent_name else dict(net.cells_and_names())[parent_name]
            setattr(parent, attribute, make())


def bake_position_embeddings(net, shape):
    """Resize every stage's position embedding to the grid of the fixed input `shape` once, here, with
    MindSpore's bilinear resize, and store the result as the stage's table: the exported graph then needs no
    resize operator (the one ONNX export fails on) and computes the same numbers."""
    from mindspore import Parameter, Tensor
    if not hasattr(net.stages[0], "pos_embed"):
        return  # PVT v2: no position embedding to resize
    spec = net.spec
    height, width = shape[2], shape[3]
    for index, stage in enumerate(net.stages):
        height, width = height // spec.patch_sizes[index], width // spec.patch_sizes[index]
        if (height, width) == (stage.grid_h, stage.grid_w):
            continue
        table = stage.pos_embed
        if stage.with_cls_token:
            resized = ops.concat((table[:, :1], stage.resized_pos_embed(table[:, 1:], height, width)), 1)
        else:
            resized = stage.resized_pos_embed(table, height, width)
        stage.pos_embed = Parameter(Tensor(resized.asnumpy()), name=table.name, requires_grad=False)
        stage.grid_h, stage.grid_w = height, width
    return net


def adaptive_pool_matrix(size_in, size_out):
    """(size_out, size_in) averaging matrix of PyTorch's (and MindSpore's) adaptive average pooling: output i
    averages inputs floor(i * in / out) .. ceil((i + 1) * in / out) - 1."""
    matrix = np.zeros((size_out, size_in), np.float32)
    for i in range(size_out):
        start, end = (i * size_in) // size_out, -(-((i + 1) * size_in) // size_out)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


class FixedGridAveragePool(nn.Cell):
    """AdaptiveAvgPool2d for one known (h, w) input grid as two constant matmuls, P_h x P_w^T: the same averages,
    from MatMul, which ONNX has (MindSpore 2.10 cannot export AdaptiveAvgPool2D)."""

    def __init__(self, grid, output_size):
        from mindspore import Tensor
        super().__init__()
        self.grid = tuple(grid)
        self.rows = Tensor(adaptive_pool_matrix(grid[0], output_size))
        self.columns = Tensor(adaptive_pool_matrix(grid[1], output_size).T.copy())

    def construct(self, x):
        return ops.matmul(ops.matmul(self.rows, x), self.columns)


def fix_linear_attention_pools(net, shape):
    """PVT v2 "-li": each stage's 7x7 adaptive pooling as a `FixedGridAveragePool` for that stage's grid at the
    fixed input `shape`."""
    from .models.layers_v2 import LINEAR_POOL_SIZE, LinearSpatialReductionAttention
    if not hasattr(net.spec, "stage_grids"):
        return net  # PVT v1: no pooling
    for stage, grid in zip(net.stages, net.spec.stage_grids(shape[2], shape[3])):
        for _, cell in list(stage.cells_and_names()):
            if isinstance(cell, LinearSpatialReductionAttention):
                cell.pool = FixedGridAveragePool(grid, LINEAR_POOL_SIZE)
    return net


def make_onnx_exportable(net, shape):
    """The same model from operators MindSpore can write to ONNX: polynomial exact GELU, Gather instead of
    Unstack, convolutions instead of Im2Col + matmul, position embeddings resized (v1) and linear attention's
    adaptive pooling fixed (v2 "-li") for `shape` ahead of time. Build `net` with MindSpore's own operators
    (`fast_ops.mindspore_ops_only`)."""
    from .models.conv import DepthwiseConv2d, MatmulConv2d
    from .models.fast_ops import GELU
    from .models.layers import SpatialReductionAttention
    _replace_cells(net, lambda cell: isinstance(cell, GELU), PolynomialGELU)
    for _, cell in net.cells_and_names():
        if isinstance(cell, SpatialReductionAttention):
            cell.unstack_kv = SplitPair()
        if isinstance(cell, (MatmulConv2d, DepthwiseConv2d)):
            cell.framework_conv = True
    for _, cell in list(net.cells_and_names()):
        if hasattr(cell, "stages") and hasattr(cell, "spec"):  # the PVT itself, or a detector's backbone
            bake_position_embeddings(cell, shape)
            fix_linear_attention_pools(cell, shape)
    return net


def _run_onnx(path, pixels):
    try:
        import onnxruntime
    except ImportError:
        raise ExportError("verifying an ONNX export needs onnxruntime (pip install -e .[export]); or pass "
                          "--no-verify") from None
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: pixels})


# --- the export -----------------------------------------------------------------------------------------------------

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
    from .models import list_models
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
    from .models.pvt import check_image_batch
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
    from .data.transforms import network_input_size
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

    from .models.fast_ops import mindspore_ops_only

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


__all__ = ["EXPORT_TASKS", "ExportTask", "ExportError", "check_protocol_shape", "detector_shapes_for_images",
           "export_model", "load_exported", "parse_shape", "resolve_task"]
