"""The one rule that turns the name a user gave an input into the name of its output file, for every tool that writes
one file (or one set of files) per input: feature export, detection and segmentation inference.

* Relative names keep their folders ('a/b.png' -> 'a/b.png'), with either slash as separator; '.' and empty parts
  go, 'a/../b' collapses to 'b', and whatever would climb above the input ('../../x.png') is dropped.
* Absolute names (a list file of '/data/x.png', 'C:\\data\\x.png', '\\\\server\\share\\x.png') become their file
  name alone: the machine's folders are not mirrored into the output folder.
* The extension stays ('cat.jpg' and 'cat.png' are two inputs, so two outputs); a tool appends its own.
* Names equal up to case ('cat.jpg', 'CAT.JPG') get '~2', '~3', ... before the final extension, in input order, so
  nothing is overwritten even on case-insensitive file systems and a re-run gives the same names.
* Nothing is written outside the output folder, also not through a symlink that already exists inside it.
"""
import os
import posixpath
import re

from .errors import PVTDenseError

_DRIVE = re.compile(r"^[A-Za-z]:")
# Characters that are not portable in file names (Windows refuses them) or that terminals mangle.
_UNPORTABLE = re.compile(r'[\x00-\x1f<>:"|?*]')


def relative_output_name(name):
    """The cleaned relative output name of input `name`, '/'-separated, extension kept (see the module doc)."""
    text = os.fspath(name).replace("\\", "/")
    if text.startswith("/") or _DRIVE.match(text):
        parts = [part for part in text.split("/") if part not in ("", ".", "..")]
        parts = parts[-1:]
    else:
        collapsed = posixpath.normpath(text)
        parts = [part for part in collapsed.split("/") if part not in ("", ".", "..")]
    parts = [_UNPORTABLE.sub("_", part) for part in parts]
    if not parts:
        raise PVTDenseError(f"input name {name!r} leaves no usable output file name")
    return "/".join(parts)


def _with_copy_number(name, copy):
    folder, file_name = posixpath.split(name)
    stem, extension = posixpath.splitext(file_name)
    if not stem:  # '.png': the whole name is the stem
        stem, extension = file_name, ""
    return posixpath.join(folder, f"{stem}~{copy}{extension}")


class OutputNamer:
    """Gives each input, in order, an output name no earlier input (or reserved name) has, up to case."""

    def __init__(self, reserved=()):
        self.taken = {name.casefold() for name in reserved}

    def name_for(self, input_name, suffix=""):
        """`relative_output_name(input_name) + suffix`, made distinct with '~N' before its final extension."""
        base = relative_output_name(input_name) + suffix
        candidate, copy = base, 1
        while candidate.casefold() in self.taken:
            copy += 1
            candidate = _with_copy_number(base, copy)
        self.taken.add(candidate.casefold())
        return candidate


def output_names(names, suffix="", reserved=()):
    """`OutputNamer.name_for` of every name in `names`, in order."""
    namer = OutputNamer(reserved)
    return [namer.name_for(name, suffix) for name in names]


def contained_path(root, name):
    """`root/name`, or `PVTDenseError` when resolving symlinks already present under the root would land outside
    it (or on the root itself)."""
    root_real = os.path.realpath(root)
    target = os.path.join(root_real, *name.split("/"))
    resolved = os.path.realpath(target)
    if os.path.commonpath([root_real, resolved]) != root_real or resolved == root_real:
        raise PVTDenseError(f"output {name!r} would be written outside the output folder {root_real} (through a "
                            "symlink)")
    return target
