"""The two container formats of `torch.save` files, each a storage source for the restricted unpickler
(`torch_pickle`):

* zip (torch >= 1.6): `<archive>/data.pkl` holds the object, each storage is a record `<archive>/data/<key>`, and
  `<archive>/byteorder` says how its numbers were written;
* legacy (`_use_new_zipfile_serialization=False`): five pickles in a row (magic number, protocol version, system
  info, the object, the list of storage keys), then every storage in the order of that list, as an int64 element
  count followed by the raw little-endian elements.

Every size read from the file (record sizes and counts, element counts) is checked before it is used.
"""
import struct
import zipfile
import zlib

from .torch_pickle import NoStorages, Storage, describe_value, load_pickle, reader_error, storage_bytes

_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL_VERSION = 1001
# One record per storage plus three: a PVT detector's training checkpoint has a few thousand.
_MAX_ZIP_RECORDS = 20_000
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, OSError, ValueError,
               NotImplementedError, RuntimeError, struct.error, OverflowError)


# -------------------------------------------------------------------------------------------------- zip format


def _zip_record_count(path):
    """The record count an archive's end record declares, read before zipfile builds one object per record (which
    costs ~0.5 KB each: a 100 MB directory of empty records would cost gigabytes). None if zipfile cannot tell."""
    end_record = getattr(zipfile, "_EndRecData", None)
    if end_record is None:
        return None
    with open(path, "rb") as handle:
        found = end_record(handle)
    return None if not found else found[zipfile._ECD_ENTRIES_TOTAL]


def read_zip_checkpoint(path, file_size, budget):
    try:
        count = _zip_record_count(path)
    except _ZIP_ERRORS:
        count = None  # zipfile itself reports the damage below
    if count is not None and count > _MAX_ZIP_RECORDS:
        raise reader_error(path, f"its zip directory declares {count} records, far more than any checkpoint has "
                                 f"(at most {_MAX_ZIP_RECORDS}); refusing what looks like a crafted file")
    try:
        archive = zipfile.ZipFile(path)
    except _ZIP_ERRORS as error:
        raise reader_error(path, f"it is not a readable zip archive ({error}); truncated download?") from error
    with archive:
        prefix = _archive_prefix(archive, path)
        storages = _ZipStorages(archive, prefix, path, file_size, budget.limit)
        pickle_bytes = storages.read_record(prefix + "data.pkl")
        obj, _ = load_pickle(pickle_bytes, 0, path, storages, budget)
        return obj


def _archive_prefix(archive, path):
    """The top-level folder that torch names after the file; it holds data.pkl."""
    pickles = [name for name in archive.namelist() if name.count("/") == 1 and name.endswith("/data.pkl")]
    if len(pickles) != 1:
        found = "no" if not pickles else f"{len(pickles)}"
        raise reader_error(path, f"the zip holds {found} <archive>/data.pkl records, so it is no torch.save checkpoint")
    return pickles[0][:-len("data.pkl")]


class _ZipStorages:
    """Storages of a zip checkpoint, one record each, read once however many tensors share them."""

    def __init__(self, archive, prefix, path, file_size, size_limit):
        self.archive, self.prefix, self.path = archive, prefix, path
        self.file_size, self.size_limit = file_size, size_limit
        self.records = {}
        self.inflated = 0  # bytes of every record read so far: one budget for the whole archive
        self.byteorder = self._byteorder()

    def _byteorder(self):
        if self.prefix + "byteorder" not in self.archive.namelist():
            return "<"  # files written before torch recorded it came from little-endian machines
        recorded = self.read_record(self.prefix + "byteorder")
        if recorded not in (b"little", b"big"):
            raise reader_error(self.path, f"its byteorder record says {recorded[:20]!r}, not 'little' or 'big'")
        return "<" if recorded == b"little" else ">"

    def storage(self, key, element_type, numel, view):
        if view is not None:
            raise reader_error(self.path, "a zip checkpoint never holds storage views")
        if key not in self.records:
            self.records[key] = memoryview(self.read_record(f"{self.prefix}data/{key}"))
        raw = self.records[key]
        nbytes = numel * element_type.stored.itemsize
        if nbytes > len(raw):
            raise reader_error(self.path, f"storage {key!r} should hold {numel} {element_type.dtype_name} elements "
                                          f"({nbytes} bytes) but its record has {len(raw)} bytes")
        return Storage(element_type, raw[:nbytes], self.byteorder)

    def read_record(self, name):
        try:
            info = self.archive.getinfo(name)
        except KeyError:
            raise reader_error(self.path, f"record {name!r} is missing; truncated or incomplete file?") from None
        # zipfile trusts the sizes in the directory; check them so a crafted entry cannot demand huge buffers.
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise reader_error(self.path, f"record {name!r} uses an unsupported compression method")
        if info.header_offset + info.compress_size > self.file_size:
            raise reader_error(self.path, f"record {name!r} runs past the end of the file; truncated?")
        if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
            raise reader_error(self.path, f"record {name!r} has inconsistent sizes in the zip directory")
        if info.file_size > self.size_limit:
            raise reader_error(self.path, f"record {name!r} claims {info.file_size} bytes, far more than the file "
                                          "holds")
        self.inflated += info.file_size
        if self.inflated > self.size_limit:
            raise reader_error(self.path, f"its records decompress to more than {self.size_limit} bytes in all, "
                                          f"far more than the file holds; refusing what looks like a crafted file")
        try:
            return self.archive.read(info)
        except _ZIP_ERRORS as error:
            raise reader_error(self.path, f"record {name!r} is corrupt ({error})") from error


# ----------------------------------------------------------------------------------------------- legacy format


def read_legacy_checkpoint(path, budget):
    try:
        with open(path, "rb") as stream:
            data = stream.read()
    except OSError as error:
        raise reader_error(path, error.strerror or str(error)) from error
    no_storages = NoStorages(path)
    magic, position = load_pickle(data, 0, path, no_storages, budget)
    if magic != _LEGACY_MAGIC_NUMBER:
        raise reader_error(path, "it starts with a pickle but not with PyTorch's magic number")
    protocol, position = load_pickle(data, position, path, no_storages, budget)
    if protocol != _LEGACY_PROTOCOL_VERSION:
        raise reader_error(path, f"its legacy protocol version is {describe_value(protocol)}, expected 1001")
    sys_info, object_start = load_pickle(data, position, path, no_storages, budget)
    if not isinstance(sys_info, dict):
        raise reader_error(path, "its system-info record is not a dict")

    # The storages' bytes follow the key list, which follows the object pickle, but only the object pickle says
    # how large each storage is. So map the storages with a first, tensor-less pass, then load for real.
    storages = _LegacyStorages(data, path)
    _, keys_start = load_pickle(data, object_start, path, storages, budget)
    keys, data_start = load_pickle(data, keys_start, path, no_storages, budget)
    if not isinstance(keys, list) or not all(isinstance(key, str) for key in keys):
        raise reader_error(path, "its storage key list is not a list of strings")
    storages.locate(keys, data_start)
    obj, _ = load_pickle(data, object_start, path, storages, budget)
    return obj


class _LegacyStorages:
    """Storages of a legacy file: declared while mapping (no bytes yet), then served once `locate` has run."""

    def __init__(self, data, path):
        self.data, self.path = data, path
        self.declared = {}  # key -> (element type, element count)
        self.starts = None  # key -> offset of the storage's first byte in data

    def storage(self, key, element_type, numel, view):
        if self.starts is None:
            declared = self.declared.setdefault(key, (element_type, numel))
            if storage_bytes(*declared) != storage_bytes(element_type, numel):
                raise reader_error(self.path, f"storage {key!r} is declared with two different sizes")
            return Storage(element_type, None, "<")
        start = self.starts[key]
        raw = memoryview(self.data)[start:start + storage_bytes(element_type, numel)]
        if view is not None:
            view_offset, view_size = view
            if view_offset + view_size > numel:
                raise reader_error(self.path, f"a view of storage {key!r} reaches past its {numel} elements")
            itemsize = element_type.stored.itemsize
            raw = raw[view_offset * itemsize:(view_offset + view_size) * itemsize]
        return Storage(element_type, raw, "<")

    def locate(self, keys, position):
        """Walk the storage section in key-list order, checking each element count against its declaration."""
        starts = {}
        for key in keys:
            if key in starts:
                raise reader_error(self.path, f"storage {key!r} is listed twice")
            if key not in self.declared:
                raise reader_error(self.path, f"storage {key!r} is listed but no tensor uses it")
            element_type, numel = self.declared[key]
            count_bytes = self.data[position:position + 8]
            if len(count_bytes) < 8:
                raise reader_error(self.path, f"the file ends before storage {key!r}; truncated?")
            count = int.from_bytes(count_bytes, "little", signed=True)
            if count != numel:
                raise reader_error(self.path, f"storage {key!r} is stored with {count} elements, declared with {numel}")
            starts[key] = position + 8
            position += 8 + storage_bytes(element_type, numel)
            if position > len(self.data):
                raise reader_error(self.path, f"the file ends inside storage {key!r}; truncated?")
        missing = self.declared.keys() - starts.keys()
        if missing:
            raise reader_error(self.path, f"storage {sorted(missing)[0]!r} is used by a tensor but not stored")
        self.starts = starts

