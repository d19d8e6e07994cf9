"""Regenerate docs/bad_inputs.md, the table of bad inputs the tests try, from their @pytest.mark.bad_input marks.

    python tools/bad_input_table.py            # write docs/bad_inputs.md
    python tools/bad_input_table.py --check    # exit 1, saying what differs, when docs/bad_inputs.md is stale

The test modules are parsed, not imported. Exit status: 0 done or up to date, 1 stale (--check), 2 a mark that
cannot be read (not string literals, or not on a test).
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # devtools/, not installed
from pvt_dense.cli import run_tool  # noqa: E402
from devtools.bad_inputs import collect_bad_inputs, stale_table_message, write_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 when stale")
    parser.add_argument("--tests", type=Path, default=ROOT / "tests", help="folder of test modules (tests/*.py)")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "bad_inputs.md", help="the table to write")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    rows = collect_bad_inputs(args.tests)
    kinds = len({row.kind for row in rows})
    if args.check:
        problem = stale_table_message(args.output, rows)
        if problem:
            print(problem, file=sys.stderr)
            return 1
        print(f"{args.output} is up to date: {len(rows)} bad inputs in {kinds} kinds")
        return 0
    write_table(args.output, rows)
    print(f"wrote {args.output}: {len(rows)} bad inputs in {kinds} kinds")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
