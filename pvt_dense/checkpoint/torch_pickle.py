"""The restricted unpickler behind `torch_reader`: it rebuilds a `torch.save` pickle's tensors as numpy arrays
without torch and without running the pickle's code.

Unpickling calls whatever the pickle names. `find_class` here hands out only harmless stand-ins: numpy
re-implementations of the few torch functions a state dict is rebuilt with, inert tokens for torch's storage and
dtype names, and a few container types. Any other global ends in `UnsafeCheckpointError` before it is even looked
up. Full training checkpoints need three more kinds of global, each again served by a stand-in that runs none of
the original code: `argparse.Namespace` becomes a `PickledNamespace` (also through `copyreg._reconstructor` or
`copyreg.__newobj__`), and numpy scalars, arrays and dtypes are rebuilt from their raw bytes, for bool and numeric
dtypes only.

Where a tensor's bytes live is the container format's business (`torch_containers`): the unpickler asks a storage
source (`storage(key, element_type, numel, view) -> Storage`) for them.
"""
import _compat_pickle
import collections
import io
import math
import pickle
import pickletools
import struct
from typing import NamedTuple, Optional

import numpy as np

from ..errors import CheckpointError, UnsafeCheckpointError
from .safetensors_reader import decode_elements

# numpy 1.x cannot hold more dimensions; no real weight comes close.
_MAX_DIMS = 32
# Far beyond any real storage (256 TiB of bytes), yet small enough that offsets times strides times item sizes
# stay well inside int64 for numpy.
_SIZE_LIMIT = 2 ** 48
# A state dict pickle costs ~31 opcodes per tensor (torch 2: 125k for 4000 tensors, a training checkpoint with
# AdamW moments of a 1000-tensor model); the largest PVT detector with its optimizer has ~4000 tensors, and the cap
# leaves room for 32 000. Walking and loading a pickle costs time and memory per opcode (a tiny deflated record can
# inflate into millions of empty containers), so the count is capped far above any real checkpoint.
_MAX_PICKLE_OPCODES = 1_000_000


class _ElementType(NamedTuple):
    """One torch scalar type: its pickled names, how its elements lie in the file, which dtype we return."""
    dtype_name: str  # pickled as torch.<dtype_name> for _rebuild_tensor_v3
    storage_name: Optional[str]  # pickled as torch.<storage_name> in storage references; None: untyped only
    stored: np.dtype  # little-endian; flipped for the rare big-endian zip file
    loaded: np.dtype


def _element_type(dtype_name, storage_name, stored, loaded):
    return _ElementType(dtype_name, storage_name, np.dtype(stored), np.dtype(loaded))


_ELEMENT_TYPES = (
    _element_type("float32", "FloatStorage", "<f4", np.float32),
    _element_type("float16", "HalfStorage", "<f2", np.float16),
    _element_type("bfloat16", "BFloat16Storage", "<u2", np.float32),  # numpy has no bfloat16: widen it
    _element_type("float64", "DoubleStorage", "<f8", np.float64),
    _element_type("complex64", "ComplexFloatStorage", "<c8", np.complex64),
    _element_type("complex128", "ComplexDoubleStorage", "<c16", np.complex128),
    _element_type("int64", "LongStorage", "<i8", np.int64),
    _element_type("int32", "IntStorage", "<i4", np.int32),
    _element_type("int16", "ShortStorage", "<i2", np.int16),
    _element_type("int8", "CharStorage", "i1", np.int8),
    _element_type("uint8", "ByteStorage", "u1", np.uint8),
    _element_type("bool", "BoolStorage", "u1", np.bool_),
    _element_type("uint16", None, "<u2", np.uint16),
    _element_type("uint32", None, "<u4", np.uint32),
    _element_type("uint64", None, "<u8", np.uint64),
)
_BY_DTYPE_NAME = {element_type.dtype_name: element_type for element_type in _ELEMENT_TYPES}
_BY_STORAGE_NAME = {element_type.storage_name: element_type for element_type in _ELEMENT_TYPES
                    if element_type.storage_name}
# torch >= 2 pickles storages of dtypes without a typed storage class as untyped bytes.
_UNTYPED_STORAGE_GLOBALS = {("torch", "UntypedStorage"), ("torch.storage", "UntypedStorage")}
_BYTES = _BY_DTYPE_NAME["uint8"]


class Storage(NamedTuple):
    """A storage as the pickle refers to it. `raw` is None while the legacy reader only maps the file."""
    element_type: _ElementType
    raw: Optional[memoryview]
    byteorder: str  # numpy's "<" or ">"


# Everything the C unpickler raises for malformed input; anything else would be a bug in this module.
_UNPICKLING_ERRORS = (pickle.UnpicklingError, EOFError, ValueError, TypeError, LookupError, AttributeError,
                      OverflowError, RecursionError)
_MEMO_WRITES = {"PUT", "BINPUT", "LONG_BINPUT"}
_MEMO_READS = {"GET", "BINGET", "LONG_BINGET"}


def reader_error(path, reason):
    return CheckpointError(f"cannot read PyTorch checkpoint {path}: {' '.join(str(reason).split())}")


def describe_value(value):
    """A short description of an untrusted value, safe for huge integers and deep nesting."""
    if type(value) is int and abs(value) < 10 ** 30:
        return str(value)
    if type(value) is str and len(value) <= 80:
        return repr(value)
    return f"a {type(value).__name__}"


class MemoryBudget:
    """Caps the bytes of all arrays rebuilt from one file, so that overlapping views cannot exhaust memory."""

    def __init__(self, limit, path):
        self.limit, self.path, self.spent = limit, path, 0

    def spend(self, nbytes):
        self.spent += nbytes
        if self.spent > self.limit:
            raise reader_error(self.path, f"its tensors would need more than {self.limit} bytes, far more than the "
                                          f"file holds; refusing what looks like a crafted file")


# ----------------------------------------------------------------------------- stand-ins for training state


class PickledNamespace:
    """An `argparse.Namespace` read from a checkpoint (a training script's `args`), holding plain data only.

    Attributes read as on the original (`args.lr`, `"lr" in args`); `to_dict()` gives them all, and
    `argparse.Namespace(**args.to_dict())` makes a real Namespace. Nothing of argparse is imported or called.
    """
    __slots__ = ("_attributes",)
    __hash__ = None  # mutable and compared by value, as argparse.Namespace

    def __new__(cls, **_attributes):
        # NEWOBJ creates the instance through here without calling __init__, and passes the pickle's arguments
        # positionally: a Namespace has none, so any would be a TypeError, reported as a corrupt pickle.
        namespace = super().__new__(cls)
        namespace._attributes = {}
        return namespace

    def __init__(self, **attributes):
        self._attributes.update(attributes)

    def __setstate__(self, state):
        # BUILD lands here: it may add attributes and do nothing else, so it never reaches the instance's own
        # attribute lookup (as an instance __dict__ would, letting a later BUILD find a planted __setstate__).
        if type(state) is not dict or not all(type(name) is str for name in state):
            raise pickle.UnpicklingError("an argparse.Namespace's state is not a dict of attribute names")
        if not hasattr(self, "_attributes"):  # made by copyreg._reconstructor, which bypasses __new__
            self._attributes = {}
        self._attributes.update(state)

    def __getstate__(self):
        return dict(self._attributes)

    def __getattr__(self, name):
        # Dunder names are what copy, pickle and friends probe for hooks; the file's data must never answer them.
        if name == "_attributes" or (name.startswith("__") and name.endswith("__")):
            raise AttributeError(name)
        try:
            return self._attributes[name]
        except KeyError:
            raise AttributeError(f"the pickled namespace has no attribute {name!r}") from None

    def __contains__(self, name):
        return name in self._attributes

    def __eq__(self, other):
        if not isinstance(other, PickledNamespace):
            return NotImplemented
        return self._attributes == other._attributes

    def __repr__(self):
        return f"PickledNamespace({', '.join(f'{name}={value!r}' for name, value in self._attributes.items())})"

    def to_dict(self):
        return dict(self._attributes)


class _Token:
    """Handed out for a class that may only appear as an argument of one of our stand-ins, never be called."""
    __slots__ = ("name",)

    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return self.name

    def __setstate__(self, state):
        # Tokens are shared by every load; without this, BUILD's slot-state branch could rename one.
        raise pickle.UnpicklingError(f"it applies BUILD to the global {self.name}")


_OBJECT = _Token("builtins.object")
_NDARRAY = _Token("numpy.ndarray")
# Globals that are data, not functions: returned as they are, the only type among them being our own namespace,
# because NEWOBJ (how protocol 2 pickles a Namespace) refuses anything but a type.
_INERT_GLOBALS = {("argparse", "Namespace"): PickledNamespace, ("builtins", "object"): _OBJECT,
                  ("numpy", "ndarray"): _NDARRAY}
# Bool and numeric dtypes as numpy pickles their names; no object, string, void, datetime or platform-sized
# float type, so every element is a fixed number of plain bytes.
_NUMPY_DTYPE_CODES = frozenset({"b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", "c8",
                                "c16"})
_NUMPY_BYTE_ORDERS = ("<", ">", "|", "=")


class _StandIn:
    """A numpy object under construction, swapped for the real one once the pickle is loaded.

    BUILD applies to whatever object the pickle built, so handing it a real dtype or array would call numpy's
    own __setstate__; a stand-in keeps BUILD within our checks. Unhashable, so it can never be a dict key or set
    member, the two places the final swap does not look.
    """
    __slots__ = ()
    __hash__ = None

    def resolve(self, path):
        raise NotImplementedError


class _PickledDtype(_StandIn):
    """numpy.dtype(code, align, copy), followed by BUILD with numpy's state tuple, which sets the byte order."""
    __slots__ = ("code", "byteorder")

    def __init__(self, code):
        self.code, self.byteorder = code, "="

    def __setstate__(self, state):
        # Version 3 with no subarray, fields, explicit size or flags: the only state of a bool or numeric dtype.
        if not (type(state) is tuple and len(state) == 8 and state[0] == 3 and state[1] in _NUMPY_BYTE_ORDERS
                and state[2:] == (None, None, None, -1, -1, 0)):
            raise pickle.UnpicklingError(f"numpy dtype {self.code!r} has an unexpected state")
        self.byteorder = state[1]

    @property
    def stored(self):
        dtype = np.dtype(self.code)
        return dtype.newbyteorder(self.byteorder) if self.byteorder in "<>" else dtype

    def resolve(self, path):
        return self.stored.newbyteorder("=")  # as the arrays come back: native byte order


class _PickledArray(_StandIn):
    """A numpy array or scalar; an array from numpy's _reconstruct is empty until BUILD brings its data."""
    __slots__ = ("value", "_fill")

    def __init__(self, value=None, fill=None):
        self.value, self._fill = value, fill

    def __setstate__(self, state):
        if self._fill is None or self.value is not None:
            raise pickle.UnpicklingError("it applies BUILD to a numpy array or scalar that is already complete")
        self.value = self._fill(state)

    def resolve(self, path):
        if self.value is None:
            raise reader_error(path, "a numpy array is reconstructed but its data never follows")
        return self.value


def _describe_global(value):
    """The name of a global a stand-in was given, for refusal messages."""
    if value is PickledNamespace:
        return "argparse.Namespace"
    if isinstance(value, _Token):
        return value.name
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    if callable(value) and isinstance(getattr(value, "__qualname__", None), str):
        return value.__qualname__
    return describe_value(value)


# --------------------------------------------------------------------------------------------- the unpickler


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles one pickle of a checkpoint, resolving only the globals a state dict is built from."""

    def __init__(self, pickle_bytes, path, storages, budget):
        super().__init__(io.BytesIO(pickle_bytes))
        self._path, self._storages, self._budget = path, storages, budget
        self._callables = {
            ("collections", "OrderedDict"): collections.OrderedDict,
            ("builtins", "set"): set,
            ("builtins", "frozenset"): frozenset,
            ("_codecs", "encode"): self._encode_latin1,
            ("builtins", "bytes"): self._empty_bytes,
            ("torch._utils", "_rebuild_tensor"): self._rebuild_tensor,
            ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor_v2,
            ("torch._utils", "_rebuild_tensor_v3"): self._rebuild_tensor_v3,
            ("torch._utils", "_rebuild_parameter"): self._rebuild_parameter,
            ("torch._utils", "_rebuild_parameter_with_state"): self._rebuild_parameter_with_state,
            ("copyreg", "_reconstructor"): self._reconstructor,
            ("copyreg", "__newobj__"): self._newobj,
            ("numpy", "dtype"): self._numpy_dtype,
        }
        for core in ("numpy.core", "numpy._core"):  # numpy 1 and numpy 2 names
            self._callables.update({
                (f"{core}.multiarray", "scalar"): self._numpy_scalar,
                (f"{core}.multiarray", "_reconstruct"): self._numpy_reconstruct,
                (f"{core}.numeric", "_frombuffer"): self._numpy_frombuffer,
            })
        # Set once the result holds a stand-in, so that plain state dicts skip the walk that swaps them out.
        self.made_stand_ins = False

    def find_class(self, module, name):
        pickled_as = f"{module}.{name}"
        # Protocols 0 to 2 write Python 2 names (copy_reg, __builtin__, commands.Popen for subprocess.Popen);
        # pickle's own find_class translates them, so ours must too, both to allow and to name what it refuses.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name),
                                                       (_compat_pickle.IMPORT_MAPPING.get(module, module), name))
        if (module, name) in self._callables:
            return _fresh_callable(self._callables[module, name], f"{module}.{name}")
        if (module, name) in _INERT_GLOBALS:
            return _INERT_GLOBALS[module, name]
        if module == "torch" and name in _BY_STORAGE_NAME:
            return _BY_STORAGE_NAME[name]
        if (module, name) in _UNTYPED_STORAGE_GLOBALS:
            return _BYTES
        if module == "torch" and name in _BY_DTYPE_NAME:
            return _BY_DTYPE_NAME[name]
        alias = f" (pickled as '{pickled_as}')" if pickled_as != f"{module}.{name}" else ""
        raise UnsafeCheckpointError(f"refused to load global '{module}.{name}'{alias} from {self._path}: "
                                    f"a checkpoint of weights and training state never needs it")

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or len(pid) not in (5, 6) or pid[0] != "storage":
            raise reader_error(self._path, f"it refers to {describe_value(pid)} where only tensor storages may appear")
        _, element_type, key, _location, numel = pid[:5]
        view = pid[5] if len(pid) == 6 else None
        if not isinstance(element_type, _ElementType):
            raise reader_error(self._path, f"a storage has type {describe_value(element_type)}, not a torch storage "
                                           "type")
        if not isinstance(key, str):
            raise reader_error(self._path, f"a storage key is {describe_value(key)}, not a string")
        numel = _checked_size(numel, "storage size", self._path)
        if view is not None:
            if not (isinstance(view, tuple) and len(view) == 3 and isinstance(view[0], str)):
                raise reader_error(self._path, f"storage {key!r} has a malformed view description")
            view = (_checked_size(view[1], "storage view offset", self._path),
                    _checked_size(view[2], "storage view size", self._path))
        return self._storages.storage(key, element_type, numel, view)

    # Stand-ins for torch functions. They take torch's positional signatures; the autograd details that follow
    # the geometry (requires_grad, hooks, metadata, Parameter state) have no numpy meaning and are dropped.

    def _rebuild_tensor(self, storage, storage_offset, size, stride):
        if not isinstance(storage, Storage):
            raise reader_error(self._path, f"a tensor is built on {describe_value(storage)} instead of a storage")
        return self._materialize(storage, storage.element_type, storage_offset, size, stride)

    def _rebuild_tensor_v2(self, storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                           metadata=None):
        return self._rebuild_tensor(storage, storage_offset, size, stride)

    def _rebuild_tensor_v3(self, storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,
                           metadata=None):
        if not isinstance(storage, Storage):
            raise reader_error(self._path, f"a tensor is built on {describe_value(storage)} instead of a storage")
        if not isinstance(dtype, _ElementType):
            raise reader_error(self._path, f"a tensor has dtype {describe_value(dtype)}, not a torch dtype")
        return self._materialize(storage, dtype, storage_offset, size, stride)

    def _rebuild_parameter(self, data, requires_grad, backward_hooks):
        # data is None only during the legacy reader's mapping pass, where no tensor is materialized.
        if data is not None and not isinstance(data, np.ndarray):
            raise reader_error(self._path, f"a Parameter wraps {describe_value(data)} instead of a tensor")
        return data

    def _rebuild_parameter_with_state(self, data, requires_grad, backward_hooks, state):
        return self._rebuild_parameter(data, requires_grad, backward_hooks)

    def _encode_latin1(self, text, encoding="latin1"):
        # Protocol-2 pickles store bytes objects as _codecs.encode(text, "latin1"); no other use is allowed.
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
            raise reader_error(self._path, "it calls _codecs.encode other than to rebuild a bytes object")
        return text.encode("latin-1")

    def _empty_bytes(self, *args):
        # Protocols 0 to 2 store an empty bytes object (an empty numpy array's data) as bytes().
        if args:
            raise reader_error(self._path, "it calls bytes other than to rebuild an empty bytes object")
        return b""

    # Stand-ins for the copyreg helpers that rebuild plain instances. The originals call base.__new__ and
    # base.__init__ of whatever class the pickle names, so ours accept our inert namespace and nothing else.

    def _reconstructor(self, cls, base, state):
        # How protocols 0 and 1 pickle an instance of a plain class: copyreg._reconstructor(cls, object, None).
        if cls is not PickledNamespace or base is not _OBJECT or state is not None:
            raise UnsafeCheckpointError(
                f"refused copyreg._reconstructor({_describe_global(cls)}, {_describe_global(base)}, "
                f"{describe_value(state)}) in {self._path}: it is only allowed to rebuild an argparse.Namespace")
        return PickledNamespace()

    def _newobj(self, cls, *args):
        if cls is not PickledNamespace or args:
            raise UnsafeCheckpointError(f"refused copyreg.__newobj__({_describe_global(cls)}, ...) in {self._path}: "
                                        f"it is only allowed to create an argparse.Namespace")
        return PickledNamespace()

    # Stand-ins for numpy's unpickling functions: bytes in, a fresh array of a checked dtype out.

    def _numpy_dtype(self, code, align=False, copy=True):
        if type(code) is not str or type(align) not in (bool, int) or type(copy) not in (bool, int):
            raise reader_error(self._path, "numpy.dtype is called other than to rebuild a pickled dtype")
        if code not in _NUMPY_DTYPE_CODES:
            if code.startswith("O"):
                # Object arrays exist to hold arbitrary Python objects, the very thing this reader refuses.
                raise UnsafeCheckpointError(f"refused numpy object dtype {code!r} in {self._path}: only bool and "
                                            f"numeric numpy data is read")
            raise reader_error(self._path, f"it holds numpy data of dtype {describe_value(code)}; only bool and "
                                           f"numeric numpy data is read")
        self.made_stand_ins = True
        return _PickledDtype(code)

    def _numpy_scalar(self, dtype, data):
        if not isinstance(dtype, _PickledDtype):
            raise reader_error(self._path, f"a numpy scalar has dtype {describe_value(dtype)}, not a numpy dtype")
        elements = self._numpy_elements(data, dtype, (), "C")
        return _PickledArray(value=elements[()])

    def _numpy_reconstruct(self, subtype, shape, typecode):
        # numpy pickles every ndarray as _reconstruct(ndarray, (0,), b"b") followed by BUILD with the contents.
        if subtype is not _NDARRAY or shape != (0,) or typecode != b"b":
            raise reader_error(self._path, "numpy's _reconstruct is called other than to rebuild a plain ndarray")
        self.made_stand_ins = True
        return _PickledArray(fill=self._numpy_array_state)

    def _numpy_array_state(self, state):
        if type(state) is tuple and len(state) == 5 and state[0] == 1:
            state = state[1:]  # version 1; older numpy wrote the same four fields without a version
        if not (type(state) is tuple and len(state) == 4):
            raise reader_error(self._path, "a numpy array's state is not (shape, dtype, is_fortran, data)")
        shape, dtype, is_fortran, data = state
        if not isinstance(dtype, _PickledDtype) or type(is_fortran) is not bool:
            raise reader_error(self._path, "a numpy array's state has no numpy dtype or no memory order")
        return self._numpy_elements(data, dtype, shape, "F" if is_fortran else "C")

    def _numpy_frombuffer(self, buffer, dtype, shape, order):
        # Protocol 5 pickles contiguous arrays as _frombuffer(buffer, dtype, shape, order), with no BUILD.
        if not isinstance(dtype, _PickledDtype) or order not in ("C", "F"):
            raise reader_error(self._path, "numpy's _frombuffer is called other than to rebuild a plain ndarray")
        return _PickledArray(value=self._numpy_elements(buffer, dtype, shape, order))

    def _numpy_elements(self, data, dtype, shape, order):
        path = self._path
        if type(data) not in (bytes, bytearray):
            raise reader_error(path, f"numpy data is {describe_value(data)}, not bytes")
        if not isinstance(shape, tuple):
            raise reader_error(path, "a numpy array's shape is not a tuple")
        if len(shape) > _MAX_DIMS:
            raise reader_error(path, f"a numpy array has {len(shape)} dimensions, more than numpy's {_MAX_DIMS}")
        shape = tuple(_checked_size(extent, "numpy array size", path) for extent in shape)
        stored = dtype.stored
        if math.prod(shape) * stored.itemsize != len(data):
            raise reader_error(path, f"a numpy array of shape {shape} and dtype {stored} comes with {len(data)} bytes")
        self._budget.spend(len(data))
        # Bools are read as bytes: decode_elements normalises bytes other than 0 and 1.
        raw = np.frombuffer(data, dtype=np.uint8 if stored.kind == "b" else stored).reshape(shape, order=order)
        elements = decode_elements(raw, stored.newbyteorder("="))
        # np.ascontiguousarray would turn a scalar's 0-d array into 1-d.
        return elements if elements.flags.c_contiguous else elements.copy(order="C")

    def _materialize(self, storage, element_type, storage_offset, size, stride):
        path = self._path
        offset = _checked_size(storage_offset, "storage offset", path)
        if not isinstance(size, tuple) or not isinstance(stride, tuple):
            raise reader_error(path, "a tensor's size or stride is not a tuple")
        shape = tuple(_checked_size(extent, "tensor size", path) for extent in size)
        strides = tuple(_checked_size(step, "tensor stride", path) for step in stride)
        if len(shape) != len(strides):
            raise reader_error(path, f"a tensor has {len(shape)} sizes but {len(strides)} strides")
        if len(shape) > _MAX_DIMS:
            raise reader_error(path, f"a tensor has {len(shape)} dimensions, more than numpy's {_MAX_DIMS}")
        if storage.raw is None:
            return None
        count = math.prod(shape)
        if count == 0:
            return np.empty(shape, dtype=element_type.loaded)
        stored = element_type.stored.newbyteorder(storage.byteorder)
        available = len(storage.raw) // stored.itemsize
        last_element = offset + sum((extent - 1) * step for extent, step in zip(shape, strides))
        if last_element >= available:
            raise reader_error(path, f"a tensor of shape {shape} reaches element {last_element} of a storage that "
                                     f"holds {available} {element_type.dtype_name} elements")
        self._budget.spend(count * element_type.loaded.itemsize)
        elements = np.frombuffer(storage.raw, dtype=stored, count=available)
        view = np.lib.stride_tricks.as_strided(elements[offset:], shape=shape,
                                               strides=[step * stored.itemsize for step in strides],
                                               writeable=False)
        return decode_elements(view, element_type.loaded)


def _fresh_callable(function, qualified_name):
    # A new object per lookup: a BUILD opcode aimed at it can only decorate this throwaway, never a shared function.
    def call(*args):
        return function(*args)
    call.__qualname__ = qualified_name  # names it in refusal messages
    return call


def _checked_size(value, what, path):
    if type(value) is not int or not 0 <= value < _SIZE_LIMIT:
        raise reader_error(path, f"a {what} is {describe_value(value)}, not an integer in [0, 2**48)")
    return value


def _end_of_pickle(data, start, path):
    """Walk the opcodes of the pickle at `data[start:]` without executing them, and return where it ends.

    The C unpickler allocates whatever string length or memo index a pickle claims before it checks that the
    data really holds that much, so a few crafted bytes could demand terabytes. Walking the opcodes first proves
    every length fits the data and every memo index is one the pickle could have filled, so the real load
    afterwards allocates no more than the pickle's own size suggests.
    """
    stream = io.BytesIO(data)
    stream.seek(start)
    memo_entries = 0
    try:
        for count, (opcode, argument, _) in enumerate(pickletools.genops(stream)):
            if count >= _MAX_PICKLE_OPCODES:
                raise reader_error(path, f"its pickle has more than {_MAX_PICKLE_OPCODES} opcodes, far more than any "
                                         f"state dict needs; refusing what looks like a crafted file")
            if opcode.name == "MEMOIZE":
                memo_entries += 1
            elif opcode.name in _MEMO_WRITES:
                if not 0 <= argument <= memo_entries:
                    raise reader_error(path, f"its pickle stores memo entry {describe_value(argument)} out of sequence")
                memo_entries = max(memo_entries, argument + 1)
            elif opcode.name in _MEMO_READS:
                if not 0 <= argument < memo_entries:
                    raise reader_error(path, f"its pickle reads memo entry {describe_value(argument)}, which was "
                                             "never stored")
            elif opcode.name == "FRAME" and argument > len(data) - stream.tell():
                raise reader_error(path, "its pickle is truncated (a frame runs past the end)")
    except CheckpointError:
        raise
    except (ValueError, EOFError, OverflowError, struct.error) as error:
        raise reader_error(path, f"its pickle is truncated or corrupt ({error})") from error
    return stream.tell()


def load_pickle(data, start, path, storages, budget):
    """Unpickle the pickle at `data[start:]`; return the object and the position right after the pickle."""
    end = _end_of_pickle(data, start, path)
    unpickler = _RestrictedUnpickler(data[start:end], path, storages, budget)
    try:
        obj = unpickler.load()
    except CheckpointError:
        raise
    except _UNPICKLING_ERRORS as error:
        raise reader_error(path, f"its pickle is corrupt ({type(error).__name__}: {error})") from error
    if unpickler.made_stand_ins:
        obj = _resolve_stand_ins(obj, path)
    return obj, end


def _resolve_stand_ins(root, path):
    """Swap every numpy stand-in in a loaded object for the dtype, array or scalar it stands for."""
    resolved = {}  # id -> (original, replacement); holding the original keeps its id from being reused
    open_tuples, cyclic_tuples = set(), set()

    def resolve(value):
        if isinstance(value, _StandIn):
            return value.resolve(path)
        if type(value) not in (dict, collections.OrderedDict, list, tuple, PickledNamespace):
            return value  # sets and dict keys are hashable, so they cannot hold a stand-in
        key = id(value)
        if key in resolved:
            if key in open_tuples:
                cyclic_tuples.add(key)
            return resolved[key][1]
        resolved[key] = (value, value)
        if isinstance(value, PickledNamespace):
            resolve(value._attributes)
        elif isinstance(value, dict):
            changes = [(name, new) for name, item in value.items() if (new := resolve(item)) is not item]
            for name, new in changes:
                value[name] = new
        elif isinstance(value, list):
            for index, item in enumerate(value):
                new = resolve(item)
                if new is not item:
                    value[index] = new
        else:
            open_tuples.add(key)
            items = tuple(resolve(item) for item in value)
            open_tuples.discard(key)
            if any(new is not old for new, old in zip(items, value)):
                # Whatever reached this tuple through itself already holds the old one, and a tuple is immutable.
                if key in cyclic_tuples:
                    raise reader_error(path, "a tuple that contains itself holds numpy data")
                resolved[key] = (value, items)
                return items
        return value

    try:
        return resolve(root)
    except RecursionError:
        raise reader_error(path, "its objects are nested too deeply") from None


class NoStorages:
    """Storage source for the pickles that must not hold tensors (legacy header and key list)."""

    def __init__(self, path):
        self.path = path

    def storage(self, key, element_type, numel, view):
        raise reader_error(self.path, "a tensor storage appears where the format has none")



def storage_bytes(element_type, numel):
    return numel * element_type.stored.itemsize

