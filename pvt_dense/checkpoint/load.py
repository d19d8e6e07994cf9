"""Read a checkpoint of any supported format, turn it into native names, fit it to a model, and report.

Formats: official PyTorch PVT (.pth), HuggingFace transformers (.bin / .safetensors), MindCV (.ckpt) and our own
(.ckpt). Reading never executes code from the file and never imports torch. Nothing is loaded silently: every
key that is dropped, missing or reshaped is reported, and unexplained differences are errors.
"""
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from typing import List

import numpy as np

from ..atomic import publish, temp_path_for
from ..errors import CheckpointError
from ..messages import first_line, shorten
from .keymaps import to_native
from .mindspore_ckpt import load_mindspore_checkpoint
from .safetensors_reader import read_safetensors
from .sizes import SIZE_TABLE, infer_model_name  # noqa: F401  (part of this module's API)
from .torch_reader import read_torch_state_dict


def sniff_format(path):
    """'mindspore', 'safetensors' or 'torch', from the file's content (extensions lie).

    A safetensors file starts with its header length as 8 little-endian bytes, whose first byte can be anything,
    including pickle's 0x80 or zip's 'P'. So it is recognised first, and only by a self-consistent header: a length
    that fits the file, followed by exactly that many bytes of one JSON object whose tensor ranges fit the data.
    Then zip (torch >= 1.6), then pickle (legacy torch); MindSpore's protobuf is whatever is left.
    """
    with open(path, "rb") as handle:
        head = handle.read(16)
        if not head:
            raise CheckpointError(f"checkpoint file is empty: {path}")
        if _is_safetensors(handle, os.fstat(handle.fileno()).st_size):
            return "safetensors"
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06") or head[:1] == b"\x80":
        return "torch"
    return "mindspore"


# The safetensors library refuses larger headers too.
_SAFETENSORS_HEADER_LIMIT = 100 * 1024 * 1024


def _is_safetensors(handle, file_size):
    handle.seek(0)
    length_bytes = handle.read(8)
    if len(length_bytes) < 8:
        return False
    header_size = int.from_bytes(length_bytes, "little")
    if not 2 <= header_size <= min(file_size - 8, _SAFETENSORS_HEADER_LIMIT):
        return False
    first = handle.read(1)
    if first != b"{":  # cheap refusal before reading a header of up to 100 MB
        return False
    try:
        header = json.loads((first + handle.read(header_size - 1)).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False
    if not isinstance(header, dict):
        return False
    data_size = file_size - 8 - header_size
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_size):
            return False
    return True


def read_mindspore_checkpoint(path):
    try:
        if path.endswith(".ckpt"):
            params = load_mindspore_checkpoint(path)
        else:
            # MindSpore refuses names not ending in lowercase ".ckpt" (OUT.CKPT, a .bin that is MindSpore data):
            # hand it a link of an acceptable name in a private temporary folder.
            with tempfile.TemporaryDirectory(prefix="pvt_dense-") as folder:
                link = os.path.join(folder, "checkpoint.ckpt")
                os.symlink(os.path.abspath(path), link)
                params = load_mindspore_checkpoint(link)
    except Exception as err:  # MindSpore raises ValueError/RuntimeError with long C++ traces
        raise CheckpointError(f"cannot read MindSpore checkpoint {path}: {shorten(first_line(err))}") from None
    state = {}
    for name, value in params.items():
        if isinstance(value, str):
            continue  # metadata MindSpore stores beside the weights (save_checkpoint's append_dict), never a weight
        try:
            array = value.asnumpy() if hasattr(value, "asnumpy") else np.asarray(value)
        except Exception as err:  # map tensors, strings and other non-weight entries
            raise CheckpointError(f"MindSpore checkpoint {path}: entry {shorten(repr(name))} is not a plain tensor "
                                  f"({type(value).__name__}: {shorten(str(err))})") from None
        state[name] = array
    if not state:
        raise CheckpointError(f"MindSpore checkpoint {path} holds no parameters")
    return state


# Longer names or longer runs of digits (layer indices) than any real checkpoint has; checking them here keeps
# int() of a 5000-digit index and megabyte-long names out of the key mapping.
_MAX_NAME_LENGTH = 512
_MAX_INDEX_DIGITS = 6
# Integer tensors a state dict may legitimately hold: counters, never weights.
_INTEGER_BUFFER_SUFFIXES = ("num_batches_tracked",)


def check_raw_state(state, label):
    """Refuse entries no PVT weight file has: non-string or absurd names, non-array values, object/string data."""
    for name, value in state.items():
        if not isinstance(name, str):
            raise CheckpointError(f"{label}: tensor name {shorten(repr(name))} is not a string")
        if re.search(r"\d{%d}" % (_MAX_INDEX_DIGITS + 1), name):
            raise CheckpointError(f"{label}: tensor name {shorten(repr(name))} has an index of more than "
                                  f"{_MAX_INDEX_DIGITS} digits")
        if len(name) > _MAX_NAME_LENGTH:
            raise CheckpointError(f"{label}: tensor name {shorten(repr(name))} is longer than any weight name "
                                  f"({len(name)} characters)")
        if not isinstance(value, np.ndarray) or value.dtype.kind not in "biufc":
            kind = f"{value.dtype} data" if isinstance(value, np.ndarray) else f"a {type(value).__name__}"
            raise CheckpointError(f"{label}: entry {shorten(repr(name))} holds {kind}, not a numeric tensor")
    return state


def check_weight_dtypes(state, label):
    """Weights must be real floating point; integer, bool and complex tensors would load as garbage silently."""
    for name, value in state.items():
        if value.dtype.kind != "f" and not name.endswith(_INTEGER_BUFFER_SUFFIXES):
            raise CheckpointError(f"{label}: tensor {shorten(repr(name))} has dtype {value.dtype}, not a floating "
                                  f"point weight")


def read_checkpoint(path):
    """Any supported checkpoint file -> flat dict of name -> numpy array, in the file's own names."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path}")
    kind = sniff_format(path)
    if kind == "torch":
        state = read_torch_state_dict(path)
    elif kind == "safetensors":
        state = read_safetensors(path)
    else:
        state = read_mindspore_checkpoint(path)
    return check_raw_state(state, path)


@dataclass
class LoadReport:
    """What happened to each key when a checkpoint met a model."""

    source_format: str = ""
    loaded: int = 0
    notes: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    mismatched: List[str] = field(default_factory=list)
    non_finite: List[str] = field(default_factory=list)

    @property
    def clean(self):
        return not (self.missing or self.unexpected or self.mismatched)

    def lines(self):
        out = [f"loaded {self.loaded} tensors ({self.source_format} format)"]
        out += [f"note: {note}" for note in self.notes]
        for label, keys in (("missing", self.missing), ("unexpected", self.unexpected),
                            ("shape mismatch", self.mismatched), ("non-finite values", self.non_finite)):
            if keys:
                shown = ", ".join(keys[:6]) + (f", ... ({len(keys)} in all)" if len(keys) > 6 else "")
                out.append(f"{label}: {shown}")
        return out

    def __str__(self):
        return "\n".join(self.lines())


def native_checkpoint(path):
    """Read `path` and convert it to native names; returns (state, source_format, notes)."""
    return to_native_with_format(read_checkpoint(path), path)


def to_native_with_format(raw, label):
    """(native state, source format, notes) of a state dict in any supported naming."""
    check_raw_state(raw, label)
    try:
        state, notes = to_native(raw)
    except CheckpointError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError) as err:
        raise CheckpointError(f"{label}: its tensors do not form a PVT state dict ({type(err).__name__}: "
                              f"{shorten(err)})") from None
    check_weight_dtypes(state, label)
    if not state:
        raise CheckpointError(f"{label} holds no model weights")
    source_format = notes[0][len("format: "):]  # to_native's first note names the format it read
    return state, source_format, notes[1:]


def fit_to_model(state, expected_shapes, has_cls_token):
    """Adapt a native state dict to a model's parameters: returns (fitted state, notes).

    Classifier checkpoints feed backbones (cls slot, final norm and head dropped); heads of another class count are
    dropped so the model can be fine-tuned.
    """
    state = dict(state)
    notes = []
    if not has_cls_token:
        dropped = [k for k in state if k == "cls_token" or k.startswith(("norm.", "head."))]
        for key in dropped:
            del state[key]
        last_pos = _last_stage_pos_key(state)
        if last_pos in expected_shapes and last_pos in state:
            pos = state[last_pos]
            if pos.ndim == 3 and pos.shape[1] == expected_shapes[last_pos][1] + 1:
                state[last_pos] = pos[:, 1:]
                dropped.append(f"{last_pos}[cls slot]")
        if dropped:
            notes.append(f"classifier checkpoint: dropped {', '.join(_modules_of(dropped))} (a backbone has no cls "
                         "token, final norm or head)")
        built = _built_stage_prefixes(expected_shapes)
        unbuilt = sorted({_stage_prefix(k) for k in state if k.startswith("stages.") and _stage_prefix(k) not in built})
        if unbuilt:
            state = {k: v for k, v in state.items() if _stage_prefix(k) not in unbuilt}
            notes.append(f"dropped the weights of {', '.join(unbuilt)}, which out_indices leaves unbuilt")
    for key in ("head.weight", "head.bias"):
        if key in state and key in expected_shapes and tuple(state[key].shape) != tuple(expected_shapes[key]):
            notes.append(f"dropped {key} of shape {tuple(state[key].shape)}: the model's head is "
                         f"{tuple(expected_shapes[key])} (fine-tuning to another class count)")
            del state[key]
    return state, notes


def _stage_prefix(key):
    return ".".join(key.split(".")[:2])


def _built_stage_prefixes(expected_shapes):
    return {_stage_prefix(k) for k in expected_shapes if k.startswith("stages.")}


def _last_stage_pos_key(state):
    stages = sorted({int(k.split(".")[1]) for k in state if re.match(r"^stages\.\d+\.pos_embed$", k)})
    return f"stages.{stages[-1]}.pos_embed" if stages else ""


def _modules_of(keys):
    return sorted({k if k.startswith("stages.") else k.split(".")[0] for k in keys})


def load_pretrained(net, path, strict=True, verbose=True):
    """Load checkpoint `path` (any supported format) into `net`; returns a `LoadReport`.

    With `strict` (the default) any missing, unexpected or mismatched key raises `CheckpointError` before a single
    weight is changed; without it, the matching weights load and the report says what did not.
    """
    return load_state(net, read_checkpoint(path), path, strict=strict, verbose=verbose)


def load_state(net, raw, label, notes=(), strict=True, verbose=True):
    """`load_pretrained` for a state dict already read (any naming); `label` names it in messages."""
    import mindspore as ms
    state, source_format, convert_notes = to_native_with_format(raw, label)
    params = {p.name: p for p in net.get_parameters()}
    expected_shapes = {name: tuple(p.shape) for name, p in params.items()}
    # A classifier (v1: cls token; v2: head) keeps what a backbone drops.
    is_classifier = "cls_token" in params or "head.weight" in params
    converted = state  # before fitting, which drops what the model lacks: the whole checkpoint tells its size
    state, fit_notes = fit_to_model(state, expected_shapes, has_cls_token=is_classifier)
    report = LoadReport(source_format=source_format, notes=list(notes) + convert_notes + fit_notes)
    report.missing = [name for name in params if name not in state]
    report.unexpected = [name for name in state if name not in params]
    report.mismatched = [f"{name} {tuple(state[name].shape)} vs model {expected_shapes[name]}" for name in state
                         if name in params and tuple(state[name].shape) != expected_shapes[name]]
    report.non_finite = [name for name, value in state.items()
                         if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all()]
    model_name = getattr(net, "model_name", type(net).__name__)
    if strict and not report.clean:
        raise CheckpointError(f"checkpoint {label} does not fit {model_name}{_other_size_hint(converted, model_name)}:"
                              "\n  " + "\n  ".join(report.lines()[1:]))
    for name, value in state.items():
        if name in params and tuple(value.shape) == expected_shapes[name]:
            params[name].set_data(ms.Tensor(np.ascontiguousarray(value, dtype=np.float32)))
            report.loaded += 1
    if verbose:
        print(f"[pvt_dense] {label} -> {model_name}: " + "\n  ".join(report.lines()))
    if report.non_finite:
        import warnings
        warnings.warn(f"checkpoint {label} has non-finite values in {len(report.non_finite)} tensors: "
                      f"{', '.join(report.non_finite[:4])}", RuntimeWarning, stacklevel=3)
    return report


def save_native(state_or_net, path):
    """Write a native MindSpore checkpoint atomically: a crash mid-write never leaves a corrupt file at `path`."""
    import mindspore as ms
    if isinstance(state_or_net, dict):
        entries = [{"name": k, "data": ms.Tensor(np.ascontiguousarray(v))} for k, v in state_or_net.items()]
    else:
        entries = state_or_net
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as err:
        reason = "a file is in the way of its folder" if isinstance(err, (FileExistsError, NotADirectoryError)) \
            else err.strerror or str(err)
        raise CheckpointError(f"cannot write checkpoint {path}: {reason} ({err.filename or directory})") from None
    # MindSpore writes the file itself, so the temporary is handed to it by name rather than through write_atomic.
    # MindSpore appends ".ckpt" to any name that does not end in it, so the temporary always does.
    tmp_path = temp_path_for(path, suffix=".ckpt")
    if os.path.isdir(path):
        raise CheckpointError(f"cannot write checkpoint {path}: it is a directory")
    try:
        ms.save_checkpoint(entries, tmp_path)
        publish(tmp_path, path)
    except OSError as err:
        raise CheckpointError(f"cannot write checkpoint {path}: {err.strerror or err}") from None
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
    return path


def _other_size_hint(state, model_name):
    inferred = infer_model_name(state)
    if inferred is None:
        return " (is it a checkpoint of another PVT size?)"
    if model_name not in SIZE_TABLE:  # a model built from its class, without a name
        return f" (the checkpoint's block counts and widths are {inferred}'s)"
    if inferred != model_name:
        return f" (it is a checkpoint of another PVT size: {inferred}, by its block counts and widths)"
    return ""
