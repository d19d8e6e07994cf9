"""Short pieces of error messages: untrusted names, values and long lists never flood a message."""
import reprlib

_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxstring = _SHORT_REPR.maxother = 60
_SHORT_REPR.maxlist = _SHORT_REPR.maxdict = _SHORT_REPR.maxtuple = 8
_SHORT_REPR.maxlevel = 3


def first_line(err, limit=None):
    """The first line of an exception's text (its type's name when it has none), cut to `limit` characters."""
    lines = str(err).strip().splitlines()
    text = lines[0] if lines else type(err).__name__
    return text if limit is None or len(text) <= limit else text[:limit] + "..."


def shorten(text, limit=120):
    """`text` cut to `limit` characters: untrusted names and values never flood an error message."""
    text = str(text)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def short_repr(value, limit=200):
    """repr of an untrusted value, bounded in length whatever its size or nesting (shared YAML aliases included)."""
    text = _SHORT_REPR.repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def examples(items, n=4, quote=False):
    """The first `n` of `items` (repr'ed with `quote`), then how many there are in all when there are more."""
    items = list(items)
    shown = ", ".join(repr(k) if quote else str(k) for k in items[:n])
    return shown + (f", ... ({len(items)} in all)" if len(items) > n else "")
