"""Shared plumbing of the command-line tools: user errors become one line, interrupts say how to resume."""
import os
import sys

os.environ.setdefault("GLOG_v", "3")  # MindSpore's C++ warnings drown the tools' own output


def run_tool(main, argv=None):
    """Call `main(argv)`; a PVTDenseError prints `error: ...` and exits 2, Ctrl-C exits 130."""
    from .errors import PVTDenseError
    try:
        return main(argv)
    except PVTDenseError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume (finished work is kept)", file=sys.stderr)
        return 130


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
