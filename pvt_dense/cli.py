"""Shared plumbing of the command-line tools: user errors become one line, interrupts say how to resume."""
import os
import sys

from .messages import first_line

os.environ.setdefault("GLOG_v", "3")  # MindSpore's C++ warnings drown the tools' own output


TRACEBACK_ENV = "PVT_DENSE_TRACEBACK"


def run_tool(main, argv=None):
    """Call `main(argv)`; every failure becomes one `error: ...` line on stderr and a non-zero exit, never a
    traceback: a PVTDenseError (bad input, said as such) exits 2, an OS error (a path that cannot be read or
    written) exits 2 naming the path, running out of memory exits 2, anything else exits 1 with its first line.
    Ctrl-C exits 130. Set $PVT_DENSE_TRACEBACK=1 to get the traceback of an unexpected error instead."""
    from .errors import PVTDenseError
    try:
        return main(argv)
    except PVTDenseError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume (finished work is kept)", file=sys.stderr)
        return 130
    except MemoryError:
        print("error: out of memory (a smaller batch_size or image size, or fewer workers, needs less)",
              file=sys.stderr)
        return 2
    except OSError as err:
        where = f"{err.filename}: " if getattr(err, "filename", None) else ""
        print(f"error: {where}{err.strerror or first_line(err, 300)}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001  (the promise: one line, whatever went wrong)
        if os.environ.get(TRACEBACK_ENV):
            raise
        print(f"error: unexpected {type(err).__name__}: {first_line(err, 300)} (set {TRACEBACK_ENV}=1 for the "
              "traceback)", file=sys.stderr)
        return 1


def split_config_argument(argv):
    """(config path or None, the remaining '--key value' overrides) from a MindCV-style command line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    config, rest, index = None, [], 0
    while index < len(argv):
        arg = argv[index]
        if arg in ("-c", "--config"):
            if index + 1 >= len(argv):
                from .errors import ConfigError
                raise ConfigError("--config needs a path")
            config, index = argv[index + 1], index + 2
            continue
        if arg.startswith("--config="):
            config = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        index += 1
    return config, rest


def tool_config(argv, doc, load_task_config, fields, required=None, **options):
    """The checked config of an evaluation or inference tool, or None once `doc` is printed for -h / --help.

    The command line is `[--config FILE] --key value ...`; `load_task_config(path, overrides, extra_fields=fields,
    **options)` checks every key, the tool's own `fields` (checkpoint, input, output...) declared in the schema like
    the task's, so a wrong value or an unknown key is one ConfigError naming it. `required` maps keys that must not
    be empty to the message saying so, checked in order.
    """
    if argv is None and any(arg in ("-h", "--help") for arg in sys.argv[1:]):
        print(doc)
        return None
    path, overrides = split_config_argument(argv)
    cfg = load_task_config(path, overrides, extra_fields=fields, **options)
    for key, message in (required or {}).items():
        if not getattr(cfg, key):
            from .errors import ConfigError
            raise ConfigError(message)
    return cfg


def ensure_output_dir(path, option="--output"):
    """Create the output folder `path` up front, or a ConfigError naming `option`: a tool finds out that it cannot
    write its results before it spends minutes loading a model, not after."""
    from .errors import ConfigError
    path = os.fspath(path)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise ConfigError(f"{option} {path!r} exists and is not a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"{option} {path!r} cannot be created: {err.strerror or err}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {path!r} is not writable")
    return path
