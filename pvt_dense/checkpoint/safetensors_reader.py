"""Read HuggingFace `.safetensors` files into numpy arrays, by hand.

The format is an 8-byte little-endian header length, a JSON header mapping each tensor name to its dtype, shape
and byte range, then the raw little-endian tensor bytes. Nothing in it can execute code, but every number in the
header is checked against the file before anything is allocated, so a corrupt or crafted file ends in a
`CheckpointError` rather than a MemoryError or a read past the end.
"""
import json
import math
import os

import numpy as np

from ..errors import CheckpointError

# The reference implementation refuses larger headers too; a real one is a few hundred bytes per tensor.
_HEADER_SIZE_LIMIT = 100 * 1024 * 1024
# numpy 1.x cannot hold more dimensions; no real weight comes close.
_MAX_DIMS = 32

# safetensors dtype name -> (layout of one element in the file, dtype of the array we return)
_DTYPES = {
    "F64": (np.dtype("<f8"), np.dtype(np.float64)),
    "F32": (np.dtype("<f4"), np.dtype(np.float32)),
    "F16": (np.dtype("<f2"), np.dtype(np.float16)),
    "BF16": (np.dtype("<u2"), np.dtype(np.float32)),
    "I64": (np.dtype("<i8"), np.dtype(np.int64)),
    "I32": (np.dtype("<i4"), np.dtype(np.int32)),
    "I16": (np.dtype("<i2"), np.dtype(np.int16)),
    "I8": (np.dtype("i1"), np.dtype(np.int8)),
    "U8": (np.dtype("u1"), np.dtype(np.uint8)),
    "BOOL": (np.dtype("u1"), np.dtype(np.bool_)),
}


def bfloat16_bits_to_float32(bits):
    """Widen bfloat16 values, given as their uint16 bit patterns, to float32 (exact: bf16 is float32's top half)."""
    return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)


def decode_elements(elements, loaded_dtype):
    """Turn an array of raw file elements into a fresh, contiguous, native-endian array of `loaded_dtype`.

    bfloat16 arrives as uint16 bit patterns and booleans as bytes; everything else only needs its byte order
    fixed. The result never shares memory with `elements`.
    """
    if elements.dtype.kind == "u" and np.dtype(loaded_dtype).kind == "f":  # bfloat16, as its uint16 bit pattern
        return bfloat16_bits_to_float32(elements)
    if loaded_dtype == np.bool_:
        # A byte other than 0 or 1 would make a numpy bool that compares unequal to True; normalise it.
        return np.not_equal(elements, 0)
    return np.array(elements, dtype=loaded_dtype, order="C", copy=True)


def read_safetensors(path):
    """Read every tensor of a `.safetensors` file into a dict of name -> numpy array, in header order.

    BF16 tensors are widened to float32. Raises `CheckpointError` for anything that is not a well-formed file.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as stream:
            file_size = os.fstat(stream.fileno()).st_size
            header, data_start = _read_header(stream, file_size, path)
            entries = _validate_entries(header, file_size - data_start, path)
            return {name: _read_tensor(stream, data_start, entry, name, path) for name, entry in entries.items()}
    except OSError as error:
        raise CheckpointError(f"cannot read safetensors file {path}: {error.strerror or error}") from error


def _fail(path, reason):
    return CheckpointError(f"cannot read safetensors file {path}: {reason}")


def _read_header(stream, file_size, path):
    length_bytes = stream.read(8)
    if len(length_bytes) < 8:
        raise _fail(path, f"the file is {file_size} bytes, too short for the 8-byte header length")
    header_size = int.from_bytes(length_bytes, "little")
    if header_size > file_size - 8:
        raise _fail(path, f"the header claims {header_size} bytes but only {file_size - 8} follow (truncated?)")
    if header_size > _HEADER_SIZE_LIMIT:
        raise _fail(path, f"the header claims {header_size} bytes, more than the {_HEADER_SIZE_LIMIT} allowed")
    header_bytes = stream.read(header_size)
    if len(header_bytes) != header_size:
        raise _fail(path, "the file ended inside the header")
    try:
        header = json.loads(header_bytes.decode("utf-8"), object_pairs_hook=_refuse_duplicate_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise _fail(path, f"the header is not valid JSON ({error})") from error
    if not isinstance(header, dict):
        raise _fail(path, f"the header is a JSON {type(header).__name__}, not an object")
    return header, 8 + header_size


def _refuse_duplicate_keys(pairs):
    result = {}
    for key, value in pairs:
        if key in result:
            # json.loads turns ValueError into nothing special; _read_header reports it as invalid JSON.
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _validate_entries(header, data_size, path):
    """Check every tensor entry against the data section; return name -> (stored dtype, loaded dtype, shape,
    begin, end)."""
    entries = {}
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict):
                raise _fail(path, "__metadata__ must be a JSON object")
            continue
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise _fail(path, f"entry {name!r} must have exactly the keys dtype, shape and data_offsets")
        dtype_name, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype_name not in _DTYPES:
            raise _fail(path, f"tensor {name!r} has unsupported dtype {dtype_name!r}; "
                              f"supported: {', '.join(_DTYPES)}")
        stored, loaded = _DTYPES[dtype_name]
        if not _is_list_of_sizes(shape) or len(shape) > _MAX_DIMS:
            raise _fail(path, f"tensor {name!r} has an invalid shape {shape!r}")
        if not _is_list_of_sizes(offsets) or len(offsets) != 2:
            raise _fail(path, f"tensor {name!r} has invalid data_offsets {offsets!r}")
        begin, end = offsets
        if not begin <= end <= data_size:
            raise _fail(path, f"tensor {name!r} spans bytes [{begin}, {end}) but the data section holds "
                              f"{data_size} bytes")
        expected = math.prod(shape) * stored.itemsize
        if end - begin != expected:
            raise _fail(path, f"tensor {name!r} of dtype {dtype_name} and shape {shape} needs {expected} bytes "
                              f"but spans {end - begin}")
        entries[name] = (stored, loaded, tuple(shape), begin, end)
    _refuse_overlaps(entries, path)
    return entries


def _is_list_of_sizes(value):
    return isinstance(value, list) and all(type(item) is int and item >= 0 for item in value)


def _refuse_overlaps(entries, path):
    # Overlapping ranges would let a small file expand into arbitrarily many copies of its data.
    ranges = sorted((begin, end, name) for name, (_, _, _, begin, end) in entries.items() if end > begin)
    for (_, previous_end, previous_name), (begin, _, name) in zip(ranges, ranges[1:]):
        if begin < previous_end:
            raise _fail(path, f"tensors {previous_name!r} and {name!r} overlap in the data section")


def _read_tensor(stream, data_start, entry, name, path):
    stored, loaded, shape, begin, end = entry
    raw = np.empty(end - begin, dtype=np.uint8)
    stream.seek(data_start + begin)
    if stream.readinto(raw) != raw.size:
        raise _fail(path, f"the file ended inside tensor {name!r}")
    elements = raw.view(stored).reshape(shape)
    if elements.dtype == loaded:  # already native and final: the buffer is ours, no second copy needed
        return elements
    return decode_elements(elements, loaded)
