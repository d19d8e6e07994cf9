"""pvt_dense's PVT inside mindcv: `mindcv.models.create_model("pvt_tiny", ...)` builds our models.

`register()` (called by `import pvt_dense` when mindcv 0.3.0 is installed) puts eleven entry points, `pvt_tiny` ...
`pvt_large` and `pvt_v2_b0` ... `pvt_v2_b5`, `pvt_v2_b2_li`, into mindcv's model registry with mindcv's own
`register_model`. The v1 names replace mindcv's PVT entries, which do not run on MindSpore 2.10
(`ops.ResizeBilinear` is gone, float16 position embeddings give NaN in training, only 224x224 inputs). The v2
names replace mindcv's `mindcv.models.pvtv2` entries (which have no `features_only` and a fixed-size patch
embedding); MindCV's published v2 `.ckpt` files (`patch_embed_list.*`, `block_list.*`, `norm_list.*`) load into
ours. mindcv's classes stay importable from `mindcv.models.pvt` / `mindcv.models.pvtv2`; only the names in the
registry point at ours.

What a mindcv user gets:
- `create_model(name, num_classes=..., drop_rate=..., drop_path_rate=...)`: a `PVTClassifier` (logits).
- `create_model(name, features_only=True, out_indices=[1, 2, 3])`: a `PVTBackbone` returning those stage maps,
  with `out_channels` and a `feature_info` whose entries read both ways: `info.channels` / `info.stride`
  (pvt_dense) and `info["chs"]` / `info["reduction"]` (mindcv).
- `checkpoint_path=`: any checkpoint pvt_dense reads (MindCV's published `.ckpt` with `Blocks.*` names and float16
  position embeddings, checkpoints that mindcv's train.py saved with optimizer state beside the weights, official
  `.pth`, HuggingFace), loaded strictly with a report. `ema=True` loads the `ema.*` copy, as mindcv does.
- `pretrained=True`: MindCV's published weights for that size, downloaded with mindcv's own downloader.

How `checkpoint_path=` reaches our loader: mindcv's `create_model` builds the model, then calls the name
`load_model_checkpoint` in `mindcv.models.model_factory`. That loader matches parameters by name, so MindCV-named
weights would silently not load into a model with pvt_dense's names (its result is ignored). `register()` rebinds
that one name to a function that sends our two model classes to pvt_dense's loader and every other model to the
function it replaced, unchanged. Nothing else in mindcv is touched.
"""
import os
import sys
import types

from ..checkpoint.keymaps import NATIVE, NATIVE_MODULES, detect_format
from ..checkpoint.load import load_state, read_checkpoint
from ..errors import CheckpointError, ConfigError
from ..models.factory import create_backbone, create_model, list_models
from ..models.pvt import FeatureInfo, PVTBackbone, PVTClassifier
from ..models.pvt_v2 import PVTv2Classifier

__all__ = ["SUPPORTED_MINDCV", "MindCVFeatureInfo", "check_mindcv_version", "is_registered", "load_checkpoint",
           "register"]  # register() appends the four entry points, as mindcv's register_model does

SUPPORTED_MINDCV = "0.3.0"

# Filled by register() from mindcv's own table, so `mindcv.models.is_model_pretrained` and `pretrained=True` use
# MindCV's published URLs without a copy of them here.
default_cfgs = {}

_registered = False


class MindCVFeatureInfo(FeatureInfo):
    """A `FeatureInfo` that also answers mindcv's dict keys: `chs`, `reduction`, `name`."""

    def __getitem__(self, key):
        if key == "chs":
            return self.channels
        if key == "reduction":
            return self.stride
        if key == "name":
            return f"stages.{self.stage}"
        raise KeyError(key)

    def get(self, key, default=None):
        try:
            return self[key]
        except KeyError:
            return default

    def keys(self):
        return ("chs", "reduction", "name")


def _mindcv_version():
    import mindcv
    _drop_module_annotations()
    return getattr(mindcv, "__version__", "unknown")


def _drop_module_annotations():
    """Replace annotations that hold a module object in mindcv's functions by the module's name.

    mindcv 0.3.0's `models/pit.py` annotates `act_layer: nn.cell` (the module `mindspore.nn.cell`, not the class
    `nn.Cell`). That annotation keeps the module alive past `mindspore.nn`'s teardown at interpreter exit, so
    Python wipes it (`Cell` becomes None) before `__main__`, whose globals usually hold the user's Cells: each of
    them then prints `Exception ignored in: <function Cell.__del__ ...> AttributeError: 'NoneType' object has no
    attribute 'total_instance_count'` as it is freed. Without the reference the module dies with `mindspore.nn`
    while its dict (and `Cell`) lives on in its functions' globals, as it does when mindcv is not imported.
    """
    for name, module in list(sys.modules.items()):
        if not (name == "mindcv" or name.startswith("mindcv.")) or module is None:
            continue
        for value in list(vars(module).values()):
            functions = vars(value).values() if isinstance(value, type) else (value,)
            for function in functions:
                if not isinstance(function, types.FunctionType) or function.__module__ != name:
                    continue
                annotations = function.__annotations__
                if any(isinstance(v, types.ModuleType) for v in annotations.values()):
                    function.__annotations__ = {k: v.__name__ if isinstance(v, types.ModuleType) else v
                                                for k, v in annotations.items()}


def check_mindcv_version():
    """Raise ConfigError unless the installed mindcv is the version this integration was written against."""
    try:
        version = _mindcv_version()
    except ImportError as err:
        raise ConfigError(f"pvt_dense's mindcv integration needs mindcv=={SUPPORTED_MINDCV}, which does not "
                          f"import: {err}") from None
    if version != SUPPORTED_MINDCV:
        raise ConfigError(f"pvt_dense's mindcv integration is written against mindcv=={SUPPORTED_MINDCV} (it hooks "
                          f"mindcv.models.model_factory.load_model_checkpoint); found mindcv {version}. Install "
                          f"mindcv=={SUPPORTED_MINDCV}, or build models with pvt_dense.create_model / "
                          "create_backbone directly.")
    return version


def _build(name, pretrained=False, num_classes=1000, in_channels=3, features_only=False, out_indices=(0, 1, 2, 3),
           drop_rate=0.0, drop_path_rate=0.0, frozen_stages=-1, recompute_stages=(), **unknown):
    if unknown:
        raise ConfigError(f"{name} (pvt_dense, through mindcv.create_model) got unknown argument(s) "
                          f"{', '.join(sorted(unknown))}; it takes num_classes, pretrained, in_channels=3, "
                          "drop_rate, drop_path_rate, checkpoint_path, and with features_only=True also out_indices, "
                          "frozen_stages, recompute_stages")
    if in_channels != 3:
        raise ConfigError(f"{name} takes 3-channel images; in_channels={in_channels} is not supported")
    if features_only:
        if drop_rate:
            raise ConfigError(f"{name} with features_only=True has no dropout (drop_rate={drop_rate}); use "
                              "drop_path_rate")
        net = create_backbone(name, out_indices=tuple(out_indices), drop_path_rate=drop_path_rate,
                              frozen_stages=frozen_stages, recompute_stages=tuple(recompute_stages))
        net.feature_info = tuple(MindCVFeatureInfo(i.stage, i.channels, i.stride) for i in net.feature_info)
    else:
        if frozen_stages != -1 or recompute_stages:
            raise ConfigError(f"{name}: frozen_stages and recompute_stages apply to features_only=True models")
        net = create_model(name, num_classes=num_classes, drop_rate=drop_rate, drop_path_rate=drop_path_rate)
    if pretrained:
        load_checkpoint(net, _download_pretrained(name))
    return net


def _download_pretrained(name):
    from mindcv.models.helpers import get_checkpoint_download_root
    from mindcv.utils.download import DownLoad
    url = default_cfgs.get(name, {}).get("url")
    if not url:
        raise CheckpointError(f"mindcv lists no published weights for {name}")
    root = get_checkpoint_download_root()
    os.makedirs(root, exist_ok=True)
    DownLoad().download_url(url, path=root)  # skips the download when the file is already there
    return os.path.join(root, os.path.basename(url))


def _entry_point(name):
    def entry(pretrained=False, num_classes=1000, in_channels=3, **kwargs):
        return _build(name, pretrained=pretrained, num_classes=num_classes, in_channels=in_channels, **kwargs)

    entry.__name__ = entry.__qualname__ = name  # mindcv's register_model takes the model name from __name__
    entry.__doc__ = (f"{name} from pvt_dense (mindcv entry point): a PVTClassifier, or with features_only=True a "
                     "PVTBackbone returning the out_indices stage maps.")
    return entry


pvt_tiny = _entry_point("pvt_tiny")
pvt_small = _entry_point("pvt_small")
pvt_medium = _entry_point("pvt_medium")
pvt_large = _entry_point("pvt_large")
pvt_v2_b0 = _entry_point("pvt_v2_b0")
pvt_v2_b1 = _entry_point("pvt_v2_b1")
pvt_v2_b2 = _entry_point("pvt_v2_b2")
pvt_v2_b2_li = _entry_point("pvt_v2_b2_li")
pvt_v2_b3 = _entry_point("pvt_v2_b3")
pvt_v2_b4 = _entry_point("pvt_v2_b4")
pvt_v2_b5 = _entry_point("pvt_v2_b5")
_ENTRY_POINTS = (pvt_tiny, pvt_small, pvt_medium, pvt_large, pvt_v2_b0, pvt_v2_b1, pvt_v2_b2, pvt_v2_b2_li, pvt_v2_b3,
                 pvt_v2_b4, pvt_v2_b5)
assert sorted(fn.__name__ for fn in _ENTRY_POINTS) == list_models()  # one entry per PVT size

# Every native parameter name starts with one of these; anything else in a native-named file (optimizer moments,
# learning rates, step counters that mindcv's train.py saves next to the weights) is training state.
_NATIVE_ROOTS = frozenset(template.split(".")[0] for template in NATIVE_MODULES)


def load_checkpoint(net, path, ema=False, strict=True, verbose=True):
    """Load `path` into a pvt_dense model the way mindcv's `checkpoint_path=` would, in any format pvt_dense reads.

    `ema=True` loads the `ema.*` weights (mindcv's convention for an EMA copy saved beside the model); otherwise
    they are ignored. Optimizer state saved beside the weights is ignored with a note. Returns a `LoadReport`.
    """
    raw = read_checkpoint(path)
    notes = []
    ema_state = {key[len("ema."):]: value for key, value in raw.items() if key.startswith("ema.")}
    if ema:
        if not ema_state:
            raise CheckpointError(f"ema=True but {path} holds no ema.* weights")
        raw = ema_state
        notes.append(f"loaded the EMA weights (ema.*) of {path}")
    elif ema_state:
        raw = {key: value for key, value in raw.items() if not key.startswith("ema.")}
        notes.append(f"ignored {len(ema_state)} ema.* weights (pass ema=True to load them)")
    # A model that mindcv trained carries native names; whatever else its train.py saved beside them (optimizer
    # moments under any prefix, learning rates, step counters) is training state. Other formats are sorted out by
    # to_native.
    if detect_format(raw) == NATIVE:
        training = sorted(key for key in raw if key.split(".")[0] not in _NATIVE_ROOTS)
        if training:
            raw = {key: value for key, value in raw.items() if key.split(".")[0] in _NATIVE_ROOTS}
            notes.append(f"ignored {len(training)} training-state entries (e.g. {training[0]!r})")
    return load_state(net, raw, path, notes, strict=strict, verbose=verbose)


def _hook_checkpoint_loader(model_factory):
    replaced = model_factory.load_model_checkpoint
    if getattr(replaced, "_pvt_dense_hook", False):
        return

    def load_model_checkpoint(model, checkpoint_path="", ema=False, auto_mapping=False):
        if isinstance(model, (PVTBackbone, PVTClassifier, PVTv2Classifier)):
            # auto_mapping (fuzzy name matching) has nothing to do: every format is mapped exactly.
            load_checkpoint(model, checkpoint_path, ema=ema)
            return None
        return replaced(model, checkpoint_path, ema, auto_mapping)

    load_model_checkpoint._pvt_dense_hook = True
    load_model_checkpoint.__wrapped__ = replaced
    model_factory.load_model_checkpoint = load_model_checkpoint


def register():
    """Make `mindcv.models.create_model("pvt_tiny" ... "pvt_large")` build pvt_dense models; idempotent.

    Raises ConfigError if mindcv is missing or not version 0.3.0.
    """
    global _registered
    if _registered:
        return
    check_mindcv_version()
    from mindcv.models import model_factory
    from mindcv.models import pvt as mindcv_pvt
    from mindcv.models import pvtv2 as mindcv_pvtv2
    from mindcv.models.registry import register_model
    published = {**mindcv_pvt.default_cfgs, **mindcv_pvtv2.default_cfgs}
    for name in list_models():
        default_cfgs[name] = dict(published.get(name, {"url": ""}))
    for entry in _ENTRY_POINTS:
        register_model(entry)
    _hook_checkpoint_loader(model_factory)
    _registered = True


def is_registered():
    return _registered
