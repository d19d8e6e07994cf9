"""Read PyTorch checkpoints (`torch.save` files) into numpy arrays, without torch and without running their code.

The pickle is read by the restricted unpickler of `torch_pickle` (nothing in the file is executed), its tensors'
bytes by the zip or legacy container reader of `torch_containers`; this module tells the two formats apart, caps
the memory one file may claim, and finds the state dict inside a training checkpoint.

Full training checkpoints, as the PVT and DeiT training scripts save them (`{"model": ..., "optimizer": ...,
"lr_scheduler": ..., "scaler": ..., "epoch": ..., "args": argparse.Namespace, "max_accuracy": ...}`), come back
with their `args` as a `PickledNamespace`; optimizer, scheduler and GradScaler states are plain dicts of numbers
and tensors already.

Every size read from the file is checked before it is used, so a corrupt or crafted file fails with a one-line
`CheckpointError` naming it, rather than with a MemoryError, a hang, or a read past the end.
"""
import os

import numpy as np

from ..errors import CheckpointError

from .torch_containers import read_legacy_checkpoint, read_zip_checkpoint
from .torch_pickle import PickledNamespace  # noqa: F401  (what an argparse.Namespace comes back as)
from .torch_pickle import MemoryBudget, describe_value, reader_error

# Overlapping views (tied weights, transposes, slices of one storage) may legitimately need more memory than the
# file, but a handful of small records claiming thousands of copies of a big storage is an attack, not weights.
_EXPANSION_FACTOR = 4
_EXPANSION_SLACK = 64 * 1024 * 1024
# Whatever the file's size, no PVT checkpoint needs more: the largest detector or segmentor (PVT v1 Large, v2 b5)
# with its AdamW moments is under 2 GiB of tensors.
_HARD_BYTE_LIMIT = 8 * 1024 ** 3
# A state dict that wraps its tensors in one of these keys is unwrapped by read_torch_state_dict.
_WRAPPER_KEYS = ("state_dict", "model", "model_state", "model_state_dict")
_DATA_PARALLEL_PREFIX = "module."


def read_torch_checkpoint(path):
    """Unpickle a `torch.save` file (zip or legacy format) with every tensor turned into a numpy array.

    Containers come back as they were saved (dicts, OrderedDicts, lists, tuples, numbers, strings); each tensor
    or Parameter becomes a fresh C-contiguous array of its shape and dtype (bfloat16 is widened to float32).
    An `argparse.Namespace` (a training script's `args`) comes back as a `PickledNamespace`, and numpy scalars,
    arrays and dtypes as numpy scalars, fresh C-contiguous arrays and dtypes.
    Raises `UnsafeCheckpointError` if the pickle names anything a checkpoint of weights and training state never
    needs, and `CheckpointError` if the file is unreadable, truncated or inconsistent.
    """
    path = os.fspath(path)
    try:
        file_size = os.path.getsize(path)
        with open(path, "rb") as stream:
            head = stream.read(4)
    except OSError as error:
        raise reader_error(path, error.strerror or str(error)) from error
    budget = MemoryBudget(min(_EXPANSION_FACTOR * file_size + _EXPANSION_SLACK, _HARD_BYTE_LIMIT), path)
    if not head:
        raise reader_error(path, "the file is empty")
    if head in (b"PK\x03\x04", b"PK\x05\x06"):  # a zip's first record, or the end record of an empty zip
        return read_zip_checkpoint(path, file_size, budget)
    if head[:1] == b"\x80":  # pickle's PROTO opcode, which every legacy file starts with
        return read_legacy_checkpoint(path, budget)
    raise reader_error(path, f"it is neither a zip-format nor a legacy PyTorch checkpoint (it starts with {head!r})")


def read_torch_state_dict(path):
    """Read a PyTorch checkpoint and return its state dict as a plain dict of name -> numpy array.

    Accepts a bare state dict or one wrapped as {"state_dict": ...}, {"model": ...}, {"model_state": ...} or
    {"model_state_dict": ...} (other entries, such as the optimizer state and `args` of a training checkpoint,
    are ignored), and drops the "module."
    prefix that DataParallel adds to every name.
    """
    path = os.fspath(path)
    checkpoint = read_torch_checkpoint(path)
    state_dict = _find_state_dict(checkpoint, levels_left=3)
    if state_dict is None:
        raise CheckpointError(f"{path} holds no state dict (a dict of name -> tensor); "
                              f"{_describe_top_level(checkpoint)}")
    return _strip_data_parallel_prefix(state_dict, path)


# ------------------------------------------------------------------------------------ state-dict unwrapping


def _find_state_dict(value, levels_left):
    if not isinstance(value, dict):
        return None
    if value and all(isinstance(name, str) and isinstance(tensor, np.ndarray) for name, tensor in value.items()):
        return value
    if levels_left == 0:
        return None
    for key in _WRAPPER_KEYS:
        if key in value:
            found = _find_state_dict(value[key], levels_left - 1)
            if found is not None:
                return found
    return None


def _describe_top_level(checkpoint):
    if not isinstance(checkpoint, dict):
        return f"the file holds {describe_value(checkpoint)}"
    keys = [describe_value(key) for key in list(checkpoint)[:20]]
    more = f" and {len(checkpoint) - 20} more" if len(checkpoint) > 20 else ""
    return f"its top-level keys are [{', '.join(keys)}]{more}"


def _strip_data_parallel_prefix(state_dict, path):
    result = {}
    for name, tensor in state_dict.items():
        short_name = name[len(_DATA_PARALLEL_PREFIX):] if name.startswith(_DATA_PARALLEL_PREFIX) else name
        if short_name in result:
            raise CheckpointError(f"{path} has two tensors named {short_name!r} once the DataParallel "
                                  f"'{_DATA_PARALLEL_PREFIX}' prefix is dropped")
        result[short_name] = tensor
    return result
