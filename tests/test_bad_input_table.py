"""docs/bad_inputs.md against the tests' bad_input marks: up to date, parsed from every place pytest reads marks
from, and never naming a test that does not exist."""
import ast
import functools
import os
import re
import sys
from pathlib import Path

import pytest

from devtools.bad_inputs import (BadInputMarkError, BadInputRow, collect_bad_inputs, marks_in_source,
                                           render_table, stale_table_message, write_table)

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "docs" / "bad_inputs.md"

sys.path.insert(0, str(ROOT / "tools"))
import bad_input_table as table_tool  # noqa: E402  (tools/ is not a package)


# --- the real table -----------------------------------------------------------------------------------------------

def test_docs_table_is_up_to_date():
    problem = stale_table_message(TABLE, collect_bad_inputs(ROOT / "tests"))
    if problem:
        pytest.fail(problem, pytrace=False)


@functools.lru_cache(maxsize=None)
def defined_tests(path):
    """'test_x' and 'TestClass::test_x' names pytest would collect from `path`, found by parsing it."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test"):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            names.add(node.name)
            names.update(f"{node.name}::{item.name}" for item in node.body
                         if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name.startswith("test"))
    return names


def test_every_row_of_the_docs_table_names_an_existing_test():
    # Read straight from the Markdown, independently of the generator: a row left behind by a renamed or deleted
    # test is caught even when the generator itself is what went wrong.
    cited = re.findall(r"\| `(tests/[^`:\[]+\.py)((?:::\w+)*)(?:\[[^`]*\])?` \|$", TABLE.read_text(encoding="utf-8"),
                       re.MULTILINE)
    assert len(cited) >= 60  # the table is not silently empty
    stale = []
    for file, names in cited:
        path = ROOT / file
        if not path.is_file() or (names and names[2:] not in defined_tests(path)):
            stale.append(file + names)
    assert not stale, f"rows of {TABLE.name} name tests that do not exist: {stale}"


# --- the parser, on small synthetic modules -----------------------------------------------------------------------

SYNTHETIC = '''
import pytest
from pytest import mark

pytestmark = [pytest.mark.slow, pytest.mark.bad_input("config", "the whole module", "every test")]

BAD_VALUES = [1, pytest.param(2, marks=pytest.mark.bad_input("image", "from a list", "listed"), id="listed")]


@pytest.mark.bad_input("image", "an empty file",
                       "ImageReadError "
                       "naming it")
def test_empty_image():
    pass


@pytest.mark.parametrize("value", [0, pytest.param(-1, marks=[pytest.mark.slow,
                                                              mark.bad_input("config", "a | pipe", "<refused>")])])
def test_inline_param(value):
    pass


@pytest.mark.parametrize("value", BAD_VALUES)
def test_listed_param(value):
    pass


@pytest.mark.bad_input(kind="checkpoint", given="a class of cases", behaviour="errors")
class TestCases:
    pytestmark = pytest.mark.bad_input("checkpoint", "class pytestmark", "also the class")

    @mark.bad_input("checkpoint", "a method", "method row")
    def test_method(self):
        pass

    def helper(self):
        pass


def test_unmarked():
    pass
'''


def test_parser_finds_marks_in_every_place_pytest_reads_them():
    rows = marks_in_source(SYNTHETIC, "tests/test_synthetic.py")
    found = {(row.test, row.kind, row.given, row.behaviour) for row in rows}
    assert found == {
        ("tests/test_synthetic.py", "config", "the whole module", "every test"),
        ("tests/test_synthetic.py::test_empty_image", "image", "an empty file", "ImageReadError naming it"),
        ("tests/test_synthetic.py::test_inline_param", "config", "a | pipe", "<refused>"),
        ("tests/test_synthetic.py::test_listed_param[listed]", "image", "from a list", "listed"),
        ("tests/test_synthetic.py::TestCases", "checkpoint", "a class of cases", "errors"),
        ("tests/test_synthetic.py::TestCases", "checkpoint", "class pytestmark", "also the class"),
        ("tests/test_synthetic.py::TestCases::test_method", "checkpoint", "a method", "method row"),
    }
    assert len(rows) == len(found)


@pytest.mark.parametrize("source, message", [
    ('KIND = "image"\n@pytest.mark.bad_input(KIND, "given", "behaviour")\ndef test_a(): pass\n',
     r"test_bad.py:2: bad_input's kind must be a non-empty string literal .*, not KIND"),
    ('@pytest.mark.bad_input("image", f"{1}", "behaviour")\ndef test_a(): pass\n', "given must be a non-empty"),
    ('@pytest.mark.bad_input("image", "given", "")\ndef test_a(): pass\n', "behaviour must be a non-empty"),
    ('@pytest.mark.bad_input("image", "given")\ndef test_a(): pass\n', "behaviour missing"),
    ('@pytest.mark.bad_input("a", "b", "c", "d")\ndef test_a(): pass\n', "three arguments"),
    ('@pytest.mark.bad_input("a", "b", behavior="c")\ndef test_a(): pass\n', "unexpected or repeated argument"),
    ('@pytest.mark.bad_input\ndef test_a(): pass\n', "test_bad.py:1: bad_input needs its arguments"),
    ('@pytest.mark.bad_input("a", "b", "c")\ndef make_input(): pass\n', "make_input, which pytest does not collect"),
    ('@pytest.mark.bad_input("a", "b", "c")\nclass Cases:\n    def test_a(self): pass\n', "Cases, which pytest"),
    ('BAD = pytest.mark.bad_input("a", "b", "c")\n@BAD\ndef test_a(): pass\n', "test_bad.py:1: .* not on a test"),
    ('def test_a():\n    @pytest.mark.bad_input("a", "b", "c")\n    def inner(): pass\n', ":2: .* not on a test"),
    ('def test_a(:\n', "cannot parse tests/test_bad.py"),
])
def test_parser_refuses_marks_it_cannot_read(source, message):
    with pytest.raises(BadInputMarkError, match=message):
        marks_in_source(source, "tests/test_bad.py")


# --- rendering, checking and the command line ---------------------------------------------------------------------

def row(kind, test, line, given="given", behaviour="behaviour"):
    return BadInputRow(kind=kind, given=given, behaviour=behaviour, test=test, line=line)


def test_render_groups_by_kind_and_orders_rows_by_file_and_line():
    rows = [row("image", "tests/test_b.py::test_z", 5), row("Config", "tests/test_b.py::test_y", 9),
            row("image", "tests/test_a.py::test_late", 90),
            row("image", "tests/test_a.py::test_early", 3, given="a | b", behaviour="`<x>` <y>")]
    text = render_table(rows)
    assert text == render_table(list(reversed(rows)))  # the order marks are found in does not matter
    assert text.index("## Config") < text.index("## image")
    image = text[text.index("## image"):]
    assert image.index("test_early") < image.index("test_late") < image.index("test_z")
    assert "| a \\| b | `<x>` &lt;y> | `tests/test_a.py::test_early` |" in text
    assert "| Config | 1 |" in text and "| image | 3 |" in text and "4 bad inputs in 2 kinds" in text


def test_check_reports_rows_to_add_and_remove(tmp_path):
    path = tmp_path / "bad_inputs.md"
    assert "does not exist" in stale_table_message(path, [])
    old = [row("image", "tests/test_a.py::test_kept", 1), row("image", "tests/test_a.py::test_removed", 2)]
    write_table(path, old)
    assert stale_table_message(path, old) is None
    assert os.listdir(tmp_path) == ["bad_inputs.md"]  # no temporary left behind

    new = [old[0], row("image", "tests/test_a.py::test_added", 3)]
    message = stale_table_message(path, new)
    assert "is stale" in message and "python tools/bad_input_table.py" in message
    assert re.search(r"\+ .*test_added", message) and re.search(r"- .*test_removed", message)
    assert "test_kept" not in message
    path.write_text(path.read_text() + "\nhand-written note\n")
    assert "the text around them" in stale_table_message(path, old)


def test_command_line_writes_then_checks(tmp_path, capsys):
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "test_one.py").write_text(SYNTHETIC)
    output = tmp_path / "docs" / "bad_inputs.md"
    arguments = ["--tests", str(tests), "--output", str(output)]
    assert table_tool.main(arguments + ["--check"]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert table_tool.main(arguments) == 0
    assert "7 bad inputs in 3 kinds" in capsys.readouterr().out
    assert "`tests/test_one.py::TestCases::test_method`" in output.read_text()
    assert table_tool.main(arguments + ["--check"]) == 0

    (tests / "test_two.py").write_text('import pytest\n\n\n@pytest.mark.bad_input("image", "new", "row")\n'
                                       'def test_new():\n    pass\n')
    assert table_tool.main(arguments + ["--check"]) == 1
    assert "test_two.py::test_new" in capsys.readouterr().err

    (tests / "test_three.py").write_text('import pytest\n\n\n@pytest.mark.bad_input("image", NAME, "row")\n'
                                         'def test_new():\n    pass\n')
    from pvt_dense.cli import run_tool
    assert run_tool(table_tool.main, arguments) == 2
    assert "error: tests/test_three.py:4: bad_input's given must be" in capsys.readouterr().err
