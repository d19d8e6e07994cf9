"""Write a `.safetensors` file's bytes from numpy arrays, with no torch or safetensors package needed (the reader
is `safetensors_reader`)."""
import json
import struct

import numpy as np

from ..errors import CheckpointError

_SAFETENSORS_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.float64): "F64",
                       np.dtype(np.int64): "I64", np.dtype(np.int32): "I32"}


def safetensors_bytes(state):
    """A `.safetensors` file's bytes: 8-byte little-endian header length, JSON header (names, dtypes, shapes, byte
    ranges; padded with spaces to 8 bytes), then the little-endian tensors in header order."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, value in state.items():
        array = np.ascontiguousarray(value)
        if array.dtype not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"cannot write {name} ({array.dtype}) to a .safetensors file")
        blob = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)
