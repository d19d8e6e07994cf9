"""The one config mechanism: a YAML file, then command-line overrides, checked against a typed schema.

A schema is a plain dict of key -> `Field`. Files are read with `yaml.safe_load`, so a config can hold only
numbers, strings, booleans, lists and mappings: it can never name a Python object to build. Every key a user writes
must exist in the schema, every value must have the field's type and lie in its range or choices; otherwise a
`ConfigError` names the key, the file and what is allowed.
"""
import difflib
import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import yaml

from .atomic import write_atomic
from .errors import ConfigError
from .messages import short_repr

# Every int a config holds ends up in numpy, MindSpore or a C library: nothing beyond int64 is meaningful.
INT64_MIN, INT64_MAX = -2 ** 63, 2 ** 63 - 1
# A config has tens of values; YAML aliases can make a few hundred bytes stand for billions ("billion laughs").
MAX_YAML_VALUES = 100_000
TRUE_WORDS = {"true", "yes", "y", "on", "1"}
FALSE_WORDS = {"false", "no", "n", "off", "0"}


@dataclass(frozen=True)
class Field:
    """One config key: its default, its kind (bool/int/float/str/list/dict), and what values it allows.

    `item` is the element kind of a list; `length` fixes a list's length; `choices` lists the allowed values;
    `low`/`high` bound numbers (inclusive); `optional` lets the value be null (None).
    """

    default: Any
    kind: type
    help: str = ""
    choices: Optional[Sequence[Any]] = None
    low: Optional[float] = None
    high: Optional[float] = None
    item: Optional[type] = None
    length: Optional[int] = None
    optional: bool = False

    def describe(self):
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        name = "finite float" if self.kind is float else self.kind.__name__
        if self.kind is list and self.item is not None:
            name = f"a list of {self.length or ''} {self.item.__name__}".replace("  ", " ")
        bounds = ""
        if self.low is not None and self.high is not None:
            bounds = f" in [{self.low}, {self.high}]"
        elif self.low is not None:
            bounds = f" >= {self.low}"
        elif self.high is not None:
            bounds = f" <= {self.high}"
        return name + bounds + (" or null" if self.optional else "")


class _StrictLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses duplicate keys (which would otherwise silently keep the last value)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            # Checked before merge keys ('<<: *base') are flattened in: overriding a merged key is what they are for.
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    duplicate = key in seen
                except TypeError:  # an unhashable key; SafeLoader reports it
                    break
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {short_repr(key)}", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node, limit):
    """How many values `node` stands for once every alias is expanded, counting up to just past `limit`."""
    sizes, open_nodes = {}, set()

    def size(current):
        key = id(current)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            return limit + 1  # a recursive alias stands for infinitely many values
        open_nodes.add(key)
        total = 1
        if isinstance(current, yaml.SequenceNode):
            children = current.value
        elif isinstance(current, yaml.MappingNode):
            children = [child for pair in current.value for child in pair]
        else:
            children = ()
        for child in children:
            total += size(child)
            if total > limit:
                break
        open_nodes.discard(key)
        sizes[key] = total
        return total

    return size(node)


def safe_load_bounded(text):
    """`yaml.safe_load`, refusing duplicate keys and documents whose aliases expand to more than MAX_YAML_VALUES
    values. Raises yaml.YAMLError (or ValueError for the alias bound)."""
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, MAX_YAML_VALUES) > MAX_YAML_VALUES:
            raise ValueError(f"its aliases expand to more than {MAX_YAML_VALUES} values")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _coerce_scalar(kind, value):
    """Turn `value` (from YAML or a command-line string) into `kind`, or raise ValueError."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in TRUE_WORDS | FALSE_WORDS:
            return value.strip().lower() in TRUE_WORDS
        raise ValueError
    if kind is int:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, float) and not value.is_integer():
            raise ValueError
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError
        result = int(value) if not isinstance(value, str) else int(value.strip())
        if not INT64_MIN <= result <= INT64_MAX:
            raise ValueError
        return result
    if kind is float:
        if isinstance(value, bool):
            raise ValueError
        result = float(value)
        if not math.isfinite(result):  # nan compares false with every bound, so ranges alone cannot catch it
            raise ValueError
        return result
    if kind is str:
        if isinstance(value, (dict, list)):
            raise ValueError
        return str(value)
    if kind is dict:
        if not isinstance(value, dict):
            raise ValueError
        return dict(value)
    raise ValueError


def coerce(key, field, value, origin):
    """The checked value of `key`, or a ConfigError naming the key, where it came from and what is allowed."""
    def fail(reason=""):
        raise ConfigError(f"{origin}: {key} = {short_repr(value)} is not allowed: expected {field.describe()}"
                          + (f" ({reason})" if reason else ""))

    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "~")):
        if field.optional:
            return None
        fail("this key cannot be null")
    try:
        if field.kind is list:
            if isinstance(value, str):
                value = safe_load_bounded(value)
            if isinstance(value, tuple):
                value = list(value)
            if not isinstance(value, list):
                raise ValueError
            result = [_coerce_scalar(field.item, v) for v in value] if field.item else list(value)
            if field.length is not None and len(result) != field.length:
                fail(f"needs {field.length} values")
        else:
            result = _coerce_scalar(field.kind, value)
    except yaml.YAMLError as err:
        fail(f"not valid YAML: {str(getattr(err, 'problem', None) or err)[:200]}")
    except (ValueError, TypeError, OverflowError, RecursionError):
        fail()
    if field.choices is not None and result not in field.choices:
        fail()
    numbers = result if isinstance(result, list) else [result]
    for number in numbers:
        if isinstance(number, (int, float)) and not isinstance(number, bool):
            if field.low is not None and number < field.low or field.high is not None and number > field.high:
                fail("out of range")
    return result


class Config(dict):
    """A checked config: a dict whose keys also read as attributes (`cfg.lr`)."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    def __setattr__(self, key, value):
        self[key] = value


def unknown_key_error(key, schema, origin):
    close = difflib.get_close_matches(key, list(schema), n=3) if isinstance(key, str) and len(key) < 200 else []
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    return ConfigError(f"{origin}: unknown config key {short_repr(key)}{hint} "
                       f"(valid keys: {', '.join(sorted(schema))})")


def read_yaml(path):
    """A YAML mapping from `path`, read with safe_load; a clear error for a missing file or bad YAML."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as handle:
            data = safe_load_bounded(handle)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or err
        raise ConfigError(f"{path}: not valid YAML{where}: {str(problem)[:200]}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    except (ValueError, RecursionError) as err:
        raise ConfigError(f"{path}: refused: {str(err)[:200] or type(err).__name__}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of key: value, got a {type(data).__name__}")
    return data


def parse_overrides(args):
    """['--lr', '0.1', '--scale', '0.08', '1.0', '--distribute=False'] -> [('lr', '0.1'), ('scale', [...]), ...].

    Values stay strings (lists for several words); `coerce` gives them their types.
    """
    pairs, key, values = [], None, []
    for arg in args:
        if arg.startswith("--"):
            if key is not None:
                pairs.append((key, values))
            body = arg[2:]
            if "=" in body:
                key, value = body.split("=", 1)
                values = [value]
            else:
                key, values = body, []
            key = key.replace("-", "_")
        else:
            if key is None:
                raise ConfigError(f"unexpected command-line argument {short_repr(arg)}: overrides are written "
                                  "--key value")
            values.append(arg)
    if key is not None:
        pairs.append((key, values))
    result = []
    for key, values in pairs:
        if not values:
            result.append((key, "true"))  # a bare flag: --distribute
        elif len(values) == 1:
            result.append((key, values[0]))
        else:
            result.append((key, values))
    return result


def renamed_key_note(old, new, origin):
    """The one line that tells a user an old config key still works and names the key that replaces it."""
    return f"note: {origin}: config key {old!r} is now {new!r}; the old name still works for now"


def load_config(schema, path=None, overrides=(), defaults=None, renamed=None):
    """Defaults of `schema`, then the YAML file at `path`, then `overrides` (pairs or '--key value' words).

    `renamed` maps old key names to the schema's: an old name sets the new key, with a one-line note on stderr.
    Returns a `Config` with every schema key set and checked.
    """
    values = {key: field.default for key, field in schema.items()}
    sources = []
    if defaults:
        sources.append(("defaults", dict(defaults)))
    if path:
        sources.append((os.fspath(path), read_yaml(path)))
    if overrides:
        pairs = parse_overrides(list(overrides)) if overrides and isinstance(overrides[0], str) else list(overrides)
        sources.append(("command line", dict(pairs)))
    for origin, data in sources:
        for key, value in data.items():
            if renamed and key in renamed and key not in schema:
                print(renamed_key_note(key, renamed[key], origin), file=sys.stderr)
                key = renamed[key]
            if key not in schema:
                raise unknown_key_error(key, schema, origin)
            values[key] = coerce(key, schema[key], value, origin)
    return Config(values)


def dump_config(config, path):
    """Write the resolved config next to the run's outputs, atomically."""
    return write_atomic(path, yaml.safe_dump(dict(config), sort_keys=False).encode("utf-8"))
