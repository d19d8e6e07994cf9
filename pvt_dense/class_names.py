"""Class names and category ids read from checkpoint metadata: checked before a model is built from them, and
printable whatever they hold.

A checkpoint's metadata is untrusted text. Bounds far above any real dataset (LVIS has 1203 classes, the longest
COCO / ADE20K / LVIS name is under 60 characters) keep a crafted file from sizing a model, a report or an output
file by its names; `printable` escapes control characters (newlines, ANSI escapes, NUL) so that a name cannot
forge or garble a line of a tool's output. The names themselves are kept as written (the JSON outputs escape
them the JSON way).
"""
from .errors import CheckpointError

MAX_CLASSES = 100_000
MAX_NAME_LENGTH = 256
_SHOWN = 120


def printable(text, limit=_SHOWN):
    """`text` with every non-printable character escaped as Python writes it (\\n, \\x1b, \\x00, \\u202e) and cut
    to `limit` characters: safe to print on one line."""
    text = str(text)
    escaped = "".join(char if char.isprintable() else repr(char)[1:-1] for char in text[:limit])
    return escaped + (f"... ({len(text)} characters)" if len(text) > limit else "")


def checked_class_names(value, label, key="class_names"):
    """`value` as a list of class names, or CheckpointError naming `label` (the file) and `key` when it is not a
    non-empty list of at most MAX_CLASSES strings of 1 to MAX_NAME_LENGTH characters. None stays None (the file
    names no classes)."""
    if value is None:
        return None
    if not isinstance(value, (list, tuple)):
        raise CheckpointError(f"{label}: its metadata's {key} is of type {type(value).__name__}, not a list of names")
    if not value:
        raise CheckpointError(f"{label}: its metadata's {key} is an empty list")
    if len(value) > MAX_CLASSES:
        raise CheckpointError(f"{label}: its metadata's {key} lists {len(value)} classes, more than the "
                              f"{MAX_CLASSES} any dense-prediction dataset has")
    for index, name in enumerate(value):
        if not isinstance(name, str):
            raise CheckpointError(f"{label}: its metadata's {key}[{index}] is of type {type(name).__name__}, "
                                  "not a string")
        if not 1 <= len(name) <= MAX_NAME_LENGTH:
            raise CheckpointError(f"{label}: its metadata's {key}[{index}] is {len(name)} characters long (a class "
                                  f"name has 1 to {MAX_NAME_LENGTH})")
    return [str(name) for name in value]


def checked_category_ids(value, count, label, key="category_ids"):
    """`value` as a list of `count` integer category ids (COCO's ids of the classes, in label order), or
    CheckpointError naming `label` and `key`. None stays None."""
    if value is None:
        return None
    if not isinstance(value, (list, tuple)):
        raise CheckpointError(f"{label}: its metadata's {key} is of type {type(value).__name__}, not a list of "
                              "integers")
    if len(value) != count:
        raise CheckpointError(f"{label}: its metadata's {key} has {len(value)} entries but it names {count} "
                              "classes")
    for index, item in enumerate(value):
        if type(item) is not int or not 0 <= item < 2 ** 63:
            shown = printable(repr(item), 40)
            raise CheckpointError(f"{label}: its metadata's {key}[{index}] is {shown}, not a non-negative integer")
    return [int(item) for item in value]
