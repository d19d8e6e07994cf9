"""The native .ckpt file as pvt_dense writes it: parameters plus one JSON metadata entry, a CRC trailer, published
under its final name only through `os.replace` of a fsynced temporary. Training checkpoints
(`pvt_dense.engine.checkpoints`) and whole-model checkpoints (`pvt_dense.checkpoint.whole_model`) are both such files."""
import json
import os

import numpy as np

from ..errors import CheckpointError
from ..messages import examples, first_line
from .mindspore_ckpt import load_mindspore_checkpoint

# Nested dicts are refused by save_checkpoint's append_dict, strings are stored verbatim, so the metadata travels
# as one JSON string under a name no MindSpore parameter has.
META_KEY = "pvt_dense_meta_json"
# Every temporary starts with this, including the `.tmp` MindSpore derives from our temporary's name while it
# writes, so one pattern finds what a killed process left behind.
# save_checkpoint(crc_check=True) ends the file with b"crc_num" and a 10-byte CRC32; a file cut anywhere lacks it.
_CRC_MARK = b"crc_num"
_CRC_TRAILER_SIZE = len(_CRC_MARK) + 10


def has_crc_trailer(path):
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        if handle.tell() < _CRC_TRAILER_SIZE:
            return False
        handle.seek(-_CRC_TRAILER_SIZE, os.SEEK_END)
        return handle.read(len(_CRC_MARK)) == _CRC_MARK


def read_checkpoint_meta(path):
    """The metadata of a complete checkpoint this module wrote; CheckpointError saying why a file does not qualify.

    Completeness is checked in full: the CRC trailer must be there (a file cut at a record boundary still parses)
    and MindSpore must parse the whole file with its CRC, which also catches flipped bytes inside tensor data.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if not has_crc_trailer(path):
        raise CheckpointError(f"checkpoint {path} is incomplete (truncated: no CRC trailer)")
    try:
        stored = load_mindspore_checkpoint(path, crc_check=True, choice_func=lambda name: name == META_KEY)
    except Exception as err:  # ValueError/RuntimeError with C++ traces, whatever the damage was
        raise CheckpointError(f"checkpoint {path} cannot be read: {first_line(err)}") from None
    if not isinstance(stored.get(META_KEY), str):
        raise CheckpointError(f"checkpoint {path} has no training metadata (not written by CheckpointManager)")
    try:
        meta = json.loads(stored[META_KEY])
    except ValueError as err:
        raise CheckpointError(f"checkpoint {path} has unreadable metadata: {err}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {path} has metadata that is not a JSON object")
    return meta


def save_entries(params):
    """Parameters, Cells, or a name -> array dict, as save_checkpoint's list of {"name", "data"}, one per name."""
    import mindspore as ms
    from mindspore import nn

    entries = {}

    def add(name, data, owner):
        if name in entries:
            # An optimizer lists the network's own Parameters again: the same object is not a conflict.
            if entries[name][1] is owner:
                return
            raise CheckpointError(f"two different parameters are both named {name!r}; a checkpoint keys by name")
        entries[name] = (data, owner)

    if isinstance(params, dict):
        for name, value in params.items():
            if isinstance(value, (ms.Parameter, ms.Tensor)):
                add(str(name), value, value)
            else:
                add(str(name), ms.Tensor(np.asarray(value)), value)
    else:
        items = [params] if isinstance(params, (nn.Cell, ms.Parameter)) else list(params)
        for item in items:
            if isinstance(item, nn.Cell):
                for _, param in item.parameters_and_names():
                    add(param.name, param, param)
            elif isinstance(item, ms.Parameter):
                add(item.name, item, item)
            else:
                raise CheckpointError(f"cannot save {type(item).__name__}: pass Parameters, Cells or a dict of arrays")
    if not entries:
        raise CheckpointError("nothing to save: the parameter list is empty")
    if META_KEY in entries:
        raise CheckpointError(f"a parameter is named {META_KEY!r}, the name reserved for the checkpoint's metadata")
    return [{"name": name, "data": data} for name, (data, _) in entries.items()]


def _holder_cell(params):
    """Loose Parameters as a Cell, the only thing load_param_into_net accepts; ParameterTuple keeps their names."""
    from mindspore import ParameterTuple, nn

    class ParameterHolder(nn.Cell):
        def __init__(self):
            super().__init__()
            self.held = ParameterTuple(params)

    return ParameterHolder()


def _load_targets(cells_or_params):
    import mindspore as ms
    from mindspore import nn

    if isinstance(cells_or_params, (nn.Cell, ms.Parameter)):
        items = [cells_or_params]
    elif isinstance(cells_or_params, dict):
        items = list(cells_or_params.values())
    else:
        items = list(cells_or_params)
    cells = [item for item in items if isinstance(item, nn.Cell)]
    loose = [item for item in items if isinstance(item, ms.Parameter)]
    others = [type(item).__name__ for item in items if not isinstance(item, (nn.Cell, ms.Parameter))]
    if others:
        raise CheckpointError(f"cannot load a checkpoint into {', '.join(sorted(set(others)))}: pass Cells, "
                              "optimizers or Parameters")
    if loose:
        cells.append(_holder_cell(loose))
    if not cells:
        raise CheckpointError("nothing to load the checkpoint into")
    return cells


def load_checkpoint_into(path, cells_or_params):
    """Load a checkpoint into Cells/optimizers/Parameters, all or nothing; return its metadata ({} if none).

    Every target parameter must be in the file with the same shape and dtype: a resumed run that silently keeps
    freshly initialised moments or a step counter at 0 trains differently without any error. Names in the file
    that no target asks for (an optimizer's state when evaluating) are fine.
    """
    import mindspore as ms
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = load_mindspore_checkpoint(path, crc_check=has_crc_trailer(path))
    except Exception as err:
        raise CheckpointError(f"checkpoint {path} cannot be read: {first_line(err)}") from None
    meta_text = state.pop(META_KEY, None)
    try:
        meta = json.loads(meta_text) if isinstance(meta_text, str) else {}
    except ValueError as err:
        raise CheckpointError(f"checkpoint {path} has unreadable metadata: {err}") from None
    state = {name: value for name, value in state.items() if isinstance(value, ms.Parameter)}

    cells = _load_targets(cells_or_params)
    missing, mismatched = [], []
    for cell in cells:
        for _, param in cell.parameters_and_names():
            stored = state.get(param.name)
            if stored is None:
                missing.append(param.name)
            elif tuple(stored.shape) != tuple(param.shape) or stored.dtype != param.dtype:
                mismatched.append(f"{param.name} (file {tuple(stored.shape)} {stored.dtype}, "
                                  f"model {tuple(param.shape)} {param.dtype})")
    # Checked before anything is assigned, so a refused checkpoint leaves the model exactly as it was.
    problems = []
    if missing:
        problems.append(f"{len(set(missing))} parameters are not in it: {examples(sorted(set(missing)), 8)}")
    if mismatched:
        problems.append(f"{len(set(mismatched))} do not fit: {examples(sorted(set(mismatched)), 4)}")
    if problems:
        raise CheckpointError(f"checkpoint {path} does not fit: " + "; ".join(problems))

    for cell in cells:
        try:
            # strict_load=True: otherwise MindSpore retries unmatched names by suffix and could fill `weight`
            # from `moment1.weight`, and converts dtypes silently.
            not_loaded, _ = ms.load_param_into_net(cell, state, strict_load=True)
        except (RuntimeError, TypeError, ValueError) as err:
            raise CheckpointError(f"checkpoint {path} could not be loaded: {first_line(err)}") from None
        if not_loaded:
            raise CheckpointError(f"checkpoint {path}: {len(not_loaded)} parameters were not loaded: "
                                  f"{examples(sorted(set(not_loaded)), 8)}")
    return meta
