"""PVT as the backbone of a mindyolo model YAML: rows `PVTBackbone` and `PVTFeature`, model name `yolov8_pvt`.

In the YAML, one `PVTBackbone` row (row 0: it reads the image) runs pvt_dense's `PVTBackbone`, and one
`PVTFeature` row per stage map hands that map to the rows below, which read it by row index as they read any
mindyolo layer:

    network:
      model_name: yolov8_pvt
      backbone:
        - [-1, 1, PVTBackbone, [pvt_tiny, "drop_path_rate=0.1", "pretrained='pvt_tiny.pth'"]]  # 0
        - [0, 1, PVTFeature, [1]]  # 1-P3/8   128 channels
        - [0, 1, PVTFeature, [2]]  # 2-P4/16  320
        - [0, 1, PVTFeature, [3]]  # 3-P5/32  512
      head:
        - [-1, 1, Upsample, [None, 2, 'nearest']]
        - [[-1, 2], 1, Concat, [1]]
        ...

`PVTBackbone` args: the PVT size (v1 `pvt_tiny` ... or v2 `pvt_v2_b0` ...), then `key=value` options of
`pvt_dense.create_backbone` (`pretrained`, `drop_path_rate`, `frozen_stages`, `recompute_stages`, `strict`) and
`normalize` (default True: mindyolo feeds RGB in [0, 1], which the row normalises with the ImageNet mean and std
that PVT's weights were trained with). The stages it returns are the ones the `PVTFeature` rows ask for (0-based, as
`out_indices`: stage 1 is stride 8), so they are never written twice.

Why a model entry point (`yolov8_pvt`) rather than module names mindyolo evaluates: mindyolo's `parse_model` knows
the output channels of its own layers only; for any other module it assumes the input's channel count, and it
has no notion of a layer that returns several maps. The entry point hands `parse_model` a copy of the YAML in
which the PVT rows are replaced by stand-ins that its own rules count correctly (a parameter-free placeholder
for row 0, fed an input of g channels, and a `Concat` of C/g copies of it for each stage map of C channels, g
being the greatest common divisor of the maps' channels), lets mindyolo's own model class (`YOLOv8`) build and
initialise the neck and head from that, then puts the PVT cells in the stand-ins' places. So every mindyolo row
type keeps its own channel rules, the head is mindyolo's, mindyolo's weight initialisation never touches the
transformer's weights, and the model is the object mindyolo's loss, EMA, trainer and checkpoints expect.

This depends on `parse_model`'s internals (its channel rules, and the `model`/`save`/`layers_param` attributes of
its `Model`), so `register()` refuses any mindyolo but 0.5.0.

mindyolo's `train.py` creates the model from `network.model_name` before it imports anything of ours; run it
through `python -m pvt_dense.integrations.mindyolo path/to/mindyolo/train.py --config ...`, which registers the
model and then runs the script unchanged, or call `register()` first in your own script.
"""
import ast
import math
import os
import runpy
import sys
from copy import deepcopy
from functools import reduce

import numpy as np
from mindspore import Tensor, nn

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..errors import ConfigError
from ..models.factory import create_backbone, get_spec

__all__ = ["SUPPORTED_MINDYOLO", "BACKBONE_ROW", "FEATURE_ROW", "PVTBackboneRow", "PVTFeature", "build_model",
           "check_mindyolo_version", "is_registered", "main", "register"]  # register() appends the model names

SUPPORTED_MINDYOLO = "0.5.0"
BACKBONE_ROW = "PVTBackbone"
FEATURE_ROW = "PVTFeature"
BACKBONE_OPTIONS = ("pretrained", "drop_path_rate", "frozen_stages", "recompute_stages", "strict", "normalize")

# mindyolo's register_model reads this table for pretrained URLs; none are published for these models.
default_cfgs = {}

_registered = set()


class PVTBackboneRow(nn.Cell):
    """The `PVTBackbone` row: mindyolo's images (RGB scaled to [0, 1] by its `image_norm`) normalised with the
    ImageNet mean and std that PVT's pretrained weights expect (unless `normalize=False`), then pvt_dense's
    `PVTBackbone`. Returns its tuple of stage maps."""

    def __init__(self, backbone, normalize=True):
        super().__init__()
        self.backbone = backbone
        self.normalize = bool(normalize)
        self.mean = Tensor(np.array(IMAGENET_MEAN, np.float32).reshape(1, 3, 1, 1) / 255.0)
        self.std = Tensor(np.array(IMAGENET_STD, np.float32).reshape(1, 3, 1, 1) / 255.0)

    def construct(self, x):
        if self.normalize:
            x = (x - self.mean) / self.std
        return self.backbone(x)


class PVTFeature(nn.Cell):
    """One stage map out of the tuple the `PVTBackbone` row returns: (B, C, H / stride, W / stride)."""

    def __init__(self, position, stage, channels, stride):
        super().__init__()
        self.position = position
        self.stage = stage
        self.channels = channels
        self.stride = stride

    def construct(self, maps):
        return maps[self.position]


class _StandIn(nn.Cell):
    """Takes the PVT rows' places while mindyolo's parse_model counts channels; never run."""

    def construct(self, x):
        return x


def check_mindyolo_version():
    """Raise ConfigError unless the installed mindyolo is the version this integration was written against."""
    try:
        import mindyolo
    except ImportError as err:
        raise ConfigError(f"pvt_dense's mindyolo integration needs mindyolo=={SUPPORTED_MINDYOLO}, which does not "
                          f"import: {err} (mindyolo 0.5.0 imports pkg_resources: install setuptools<81)") from None
    version = getattr(mindyolo, "__version__", "unknown")
    if version != SUPPORTED_MINDYOLO:
        raise ConfigError(f"pvt_dense's mindyolo integration is written against mindyolo=={SUPPORTED_MINDYOLO} "
                          f"(it relies on how mindyolo.models.model_factory.parse_model counts channels); found "
                          f"mindyolo {version}. Install mindyolo=={SUPPORTED_MINDYOLO}.")
    return version


# --------------------------------------------------------------------------------------------- reading the YAML


def _literal(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # an unquoted path or name stays a string, as mindyolo does for args it cannot evaluate


def _backbone_args(row):
    args = list(row[3]) if len(row) > 3 and row[3] is not None else []
    names = [a for a in args if not (isinstance(a, str) and "=" in a)]
    if len(names) != 1 or not isinstance(names[0], str):
        raise ConfigError(f"the {BACKBONE_ROW} row's args must be one PVT size ('pvt_tiny', ...) and key=value "
                          f"options; got {args}")
    name = names[0]
    try:
        get_spec(name)
    except KeyError as err:  # pvt_dense's UnknownModelError, which lists the valid names
        raise ConfigError(str(err)) from None
    options = {}
    for arg in args:
        if isinstance(arg, str) and "=" in arg:
            key, value = arg.split("=", 1)
            key = key.strip()
            if key == "out_indices":
                raise ConfigError(f"{BACKBONE_ROW} takes no out_indices: the stages it returns are the ones the "
                                  f"{FEATURE_ROW} rows ask for")
            if key not in BACKBONE_OPTIONS:
                raise ConfigError(f"unknown {BACKBONE_ROW} option {key!r}; valid: {', '.join(BACKBONE_OPTIONS)}")
            options[key] = _literal(value.strip())
    for key in ("recompute_stages",):
        if key in options:
            options[key] = tuple(options[key])
    return name, options


def _module_name(row):
    return row[2] if isinstance(row[2], str) else getattr(row[2], "__name__", "")


def plan_rows(cfg):
    """Check the PVT rows of a network config; returns (name, options, {row index: stage}) in row order."""
    rows = list(cfg["backbone"]) + list(cfg["head"])
    for index, row in enumerate(rows):
        if not isinstance(row, (list, tuple)) or len(row) < 3:
            raise ConfigError(f"network row {index} is not [from, repeats, module, args]: {row}")
    backbone_rows = [i for i, row in enumerate(rows) if _module_name(row) == BACKBONE_ROW]
    if backbone_rows != [0]:
        raise ConfigError(f"a PVT network has exactly one {BACKBONE_ROW} row, the first of `backbone:` (it reads "
                          f"the image); found it at rows {backbone_rows}")
    first = rows[0]
    if first[0] != -1 or first[1] != 1:
        raise ConfigError(f"the {BACKBONE_ROW} row must read the image once: [-1, 1, {BACKBONE_ROW}, [...]], got "
                          f"{first}")
    name, options = _backbone_args(first)
    features = {}
    for index, row in enumerate(rows):
        if _module_name(row) != FEATURE_ROW:
            continue
        args = list(row[3]) if len(row) > 3 and row[3] is not None else []
        if row[0] != 0 or row[1] != 1 or len(args) != 1 or not isinstance(args[0], int):
            raise ConfigError(f"row {index}: a {FEATURE_ROW} row is [0, 1, {FEATURE_ROW}, [stage]] (it reads the "
                              f"{BACKBONE_ROW} row), got {row}")
        stage = args[0]
        if not 0 <= stage < len(get_spec(name).depths):
            raise ConfigError(f"row {index}: stage {stage} does not exist; PVT stages are 0..3 (strides 4..32)")
        if stage in features.values():
            raise ConfigError(f"row {index}: stage {stage} is already taken by another {FEATURE_ROW} row")
        features[index] = stage
    for index, row in enumerate(rows[1:], start=1):
        if index in features:
            continue
        sources = row[0] if isinstance(row[0], (list, tuple)) else [row[0]]
        reads_tuple = [s for s in sources if s == 0 or (s == -1 and index == 1)]
        if reads_tuple:
            raise ConfigError(f"row {index} ({_module_name(row)}) reads the {BACKBONE_ROW} row, which returns a "
                              f"tuple of maps; read a {FEATURE_ROW} row instead")
    if not features:
        raise ConfigError(f"a PVT network needs at least one {FEATURE_ROW} row to take a stage map from "
                          f"{BACKBONE_ROW}")
    if list(features.values()) != sorted(features.values()):
        raise ConfigError(f"{FEATURE_ROW} rows must take stages in increasing order, got {list(features.values())}")
    return name, options, features


def _stand_in_config(cfg, features, channels):
    """A copy of `cfg` whose PVT rows parse_model counts as they will be: (input channels, config)."""
    unit = reduce(math.gcd, channels.values())
    standin = deepcopy(cfg)
    rows = [list(row) for row in list(cfg["backbone"]) + list(cfg["head"])]
    rows[0] = [-1, 1, _StandIn, []]  # unknown module: parse_model gives it its input's channels, `unit`
    from mindyolo.models.layers import Concat
    for index, stage in features.items():
        rows[index] = [[0] * (channels[stage] // unit), 1, Concat, [1]]  # parse_model sums its inputs' channels
    split = len(cfg["backbone"])
    standin.backbone, standin.head = rows[:split], rows[split:]  # a mindyolo Config: keys and attributes
    return unit, standin


# ---------------------------------------------------------------------------------------------- building models


def _as_config(cfg):
    from mindyolo.utils.config import Config
    return cfg if isinstance(cfg, Config) else Config(dict(cfg))


def _find_parsed_model(net):
    from mindyolo.models.model_factory import Model
    found = [(name, cell) for name, cell in net.cells_and_names() if isinstance(cell, Model)]
    if len(found) != 1:
        raise ConfigError(f"expected one mindyolo Model inside {type(net).__name__}, found {len(found)}")
    return found[0]


def build_model(base, cfg, in_channels=3, num_classes=None, **kwargs):
    """Build mindyolo model `base` (e.g. 'yolov8') from a network config whose backbone is PVT rows.

    `cfg` is the `network` section of a mindyolo YAML (a mindyolo `Config` or a dict). Returns the object
    `mindyolo.models.create_model(base, ...)` returns, with the PVT backbone in its rows.
    """
    from mindyolo.models.registry import is_model, model_entrypoint
    if in_channels != 3:
        raise ConfigError(f"PVT takes 3-channel images; in_channels={in_channels} is not supported")
    if not is_model(base):
        raise ConfigError(f"mindyolo has no model {base!r} to put a PVT backbone in")
    cfg = _as_config(cfg)
    name, options, features = plan_rows(cfg)
    spec = get_spec(name)
    stages = tuple(features.values())
    channels = {stage: spec.embed_dims[stage] for stage in stages}
    unit, standin = _stand_in_config(cfg, features, channels)

    net = model_entrypoint(base)(cfg=standin, in_channels=unit, num_classes=num_classes, **kwargs)

    normalize = options.pop("normalize", True)
    backbone = PVTBackboneRow(create_backbone(name, out_indices=stages, **options), normalize=normalize)
    model_path, model = _find_parsed_model(net)
    cells = {0: backbone}
    for index, stage in features.items():
        cells[index] = PVTFeature(stages.index(stage), stage, channels[stage], spec.strides[stage])
    prefix = f"{model_path}.model." if model_path else "model."
    recompute_layers = cfg.get("recompute_layers", 0) if cfg.get("recompute", False) else 0
    for index, cell in cells.items():
        source = -1 if index == 0 else 0
        count = sum(p.size for p in cell.get_parameters())
        cell.i, cell.f, cell.type, cell.np = index, source, str(type(cell)), count
        model.model[index] = cell
        model.layers_param[index] = (index, source, str(type(cell)), count)
        if index < recompute_layers:
            cell.recompute()
    model.save = sorted(set(model.save))  # the stand-in Concats listed row 0 once per input
    for index, cell in cells.items():
        # CellList.__setitem__ names parameters relative to the list; give them the names every other row has.
        cell.update_parameters_name(f"{prefix}{index}.")
    if hasattr(net, "cfg"):
        net.cfg = cfg
    net.pvt_backbone = name
    return net


def _entry_point(base):
    def entry(cfg, in_channels=3, num_classes=None, **kwargs):
        return build_model(base, cfg, in_channels=in_channels, num_classes=num_classes, **kwargs)

    entry.__name__ = entry.__qualname__ = f"{base}_pvt"  # mindyolo's register_model names the model after it
    entry.__doc__ = f"mindyolo's {base} with the PVT backbone its YAML's PVTBackbone/PVTFeature rows describe."
    return entry


def _wrong_model_name(*args, **kwargs):
    raise ConfigError(f"{BACKBONE_ROW}/{FEATURE_ROW} rows are built by the PVT models of pvt_dense, not by "
                      "mindyolo's own: set network.model_name to yolov8_pvt (or <model>_pvt)")


def register(bases=("yolov8",)):
    """Register `<base>_pvt` in mindyolo's model registry for each base model (default: yolov8_pvt); idempotent.

    Raises ConfigError if mindyolo is missing or is not version 0.5.0.
    """
    check_mindyolo_version()
    from mindyolo.models import model_factory
    from mindyolo.models.registry import is_model, register_model
    # With a stock model_name, mindyolo's parse_model evaluates the row names in model_factory's namespace and
    # would stop at a bare NameError; these names say what to change instead.
    for row_name in (BACKBONE_ROW, FEATURE_ROW):
        if not hasattr(model_factory, row_name):
            setattr(model_factory, row_name, _wrong_model_name)
    names = []
    for base in bases:
        if not is_model(base):
            raise ConfigError(f"mindyolo has no model {base!r} to put a PVT backbone in")
        name = f"{base}_pvt"
        if name not in _registered:
            entry = _entry_point(base)
            globals()[name] = entry  # register_model lists the name in this module's __all__
            register_model(entry)
            _registered.add(name)
        names.append(name)
    return names


def is_registered(name="yolov8_pvt"):
    return name in _registered


# ------------------------------------------------------------------------------------------------------ launcher

USAGE = """usage: python -m pvt_dense.integrations.mindyolo SCRIPT [ARGS ...]

Registers the yolov8_pvt model with mindyolo, then runs SCRIPT (mindyolo's train.py, test.py, predict.py, or
your own) as __main__ with ARGS, unchanged. Example:

  python -m pvt_dense.integrations.mindyolo ~/mindyolo/train.py \\
      --config configs/detection/yolov8_pvt_tiny_coco.yaml --device_target CPU
"""


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    script = argv[0]
    if not os.path.isfile(script):
        print(f"error: script not found: {script}\n\n{USAGE}", file=sys.stderr)
        return 2
    register()
    saved_argv, saved_path = sys.argv, list(sys.path)
    # As `python SCRIPT ARGS` would: the script sees its own argv, and its directory comes first on sys.path
    # (mindyolo's train.py imports test.py from beside it).
    sys.argv = [script] + argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    return 0


if __name__ == "__main__":
    # Run the copy that `import pvt_dense.integrations.mindyolo` gives, so the registered entry points live in it.
    from pvt_dense.integrations.mindyolo import main as _main
    sys.exit(_main())
