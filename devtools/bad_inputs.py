"""docs/bad_inputs.md: the bad or untrusted inputs the tests feed pvt_dense and what each gets, read from the tests.

A test that feeds one bad input carries `@pytest.mark.bad_input(kind, given, behaviour)`. The marks are read from
the test sources with `ast`, never by importing the test modules (that would import MindSpore, torch and every
fixture, and run module-level code just to build a table). Recognised places, the same ones pytest applies marks
from:

    @pytest.mark.bad_input(...)                  on a test function, a test method or a Test class
    pytestmark = pytest.mark.bad_input(...)      in a module or a Test class (or a list of marks)
    pytest.param(..., marks=pytest.mark.bad_input(...))   in a parametrize, inline or in a module-level list

The three arguments must be string literals (adjacent literals are joined); their text is Markdown. A mark found
anywhere else, or with other arguments, is a `BadInputMarkError` naming the file and line, so no mark is silently
left out of the table.
"""
import ast
from dataclasses import dataclass
from pathlib import Path

from pvt_dense.atomic import write_atomic
from pvt_dense.errors import PVTDenseError

MARK = "bad_input"
FIELDS = ("kind", "given", "behaviour")
REGENERATE = "python tools/bad_input_table.py"

INTRO = f"""\
# Bad inputs and what pvt_dense does with them

<!-- Generated from the tests' bad_input marks by `{REGENERATE}`; edit the marks, not this file. -->

Each row is a test that feeds pvt_dense one bad or untrusted input (a crafted checkpoint, a broken image, a wrong
config value, a crash in the middle of a run, ...) and checks what pvt_dense does with it. The rows come from the
`@pytest.mark.bad_input(kind, given, behaviour)` marks of the tests in `tests/`: after adding or changing one, run
`{REGENERATE}`. `make test` fails while this file is stale (`tests/test_bad_input_table.py`), and
`{REGENERATE} --check` tells without writing anything.
"""


class BadInputMarkError(PVTDenseError):
    """A bad_input mark the table cannot read: arguments that are not string literals, or a place that is no test."""


@dataclass(frozen=True)
class BadInputRow:
    kind: str
    given: str
    behaviour: str
    test: str  # "tests/test_x.py::test_name", "...::TestClass::test_name", "...::test_name[id]" or "tests/test_x.py"
    line: int  # of the mark, for ordering


def _is_mark_reference(node):
    """`pytest.mark.bad_input` or `mark.bad_input` (after `from pytest import mark`)."""
    if not (isinstance(node, ast.Attribute) and node.attr == MARK):
        return False
    owner = node.value
    return (isinstance(owner, ast.Attribute) and owner.attr == "mark" and isinstance(owner.value, ast.Name)
            and owner.value.id == "pytest") or (isinstance(owner, ast.Name) and owner.id == "mark")


def _is_mark_call(node):
    return isinstance(node, ast.Call) and _is_mark_reference(node.func)


def _is_param_call(node):
    func = node.func if isinstance(node, ast.Call) else None
    return (isinstance(func, ast.Attribute) and func.attr == "param" and isinstance(func.value, ast.Name)
            and func.value.id == "pytest") or (isinstance(func, ast.Name) and func.id == "param")


def _is_parametrize_call(node):
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "parametrize"


def _mark_calls_in(value):
    """The bad_input calls in a `marks=` or `pytestmark =` value: one mark or a list/tuple of marks."""
    items = value.elts if isinstance(value, (ast.List, ast.Tuple)) else [value]
    return [item for item in items if _is_mark_call(item)]


def _string_literal(node):
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return " ".join(node.value.split())
    return None


class _ModuleMarks:
    """The bad_input marks of one test module, each tied to the test it applies to."""

    def __init__(self, source, display_name):
        self.name = display_name
        try:
            self.tree = ast.parse(source, filename=display_name)
        except SyntaxError as err:
            raise BadInputMarkError(f"cannot parse {display_name}: {err}") from None
        self.rows = []
        self.claimed = set()
        # Module-level `NAME = [...]` values, for parametrize argvalues given by name.
        self.constants = {target.id: statement.value for statement in self.tree.body
                          if isinstance(statement, ast.Assign) for target in statement.targets
                          if isinstance(target, ast.Name)}

    def fail(self, node, message):
        raise BadInputMarkError(f"{self.name}:{node.lineno}: {message}")

    def claim(self, call, test):
        values = dict(zip(FIELDS, call.args))
        if len(call.args) > len(FIELDS):
            self.fail(call, f"bad_input takes three arguments ({', '.join(FIELDS)}), got {len(call.args)}")
        for keyword in call.keywords:
            if keyword.arg not in FIELDS or keyword.arg in values:
                self.fail(call, f"bad_input got an unexpected or repeated argument {keyword.arg}=")
            values[keyword.arg] = keyword.value
        missing = [field for field in FIELDS if field not in values]
        if missing:
            self.fail(call, f"bad_input needs {', '.join(FIELDS)}; {', '.join(missing)} missing")
        texts = {}
        for field, node in values.items():
            text = _string_literal(node)
            if not text:
                self.fail(call, f"bad_input's {field} must be a non-empty string literal (adjacent literals are "
                                f"joined), not {ast.unparse(node)}")
            texts[field] = text
        self.claimed.add(id(call))
        self.rows.append(BadInputRow(test=test, line=call.lineno, **texts))

    def claim_params(self, parametrize, test):
        """pytest.param(..., marks=bad_input(...)) in a parametrize decorator's argument values."""
        argvalues = parametrize.args[1] if len(parametrize.args) > 1 else next(
            (k.value for k in parametrize.keywords if k.arg == "argvalues"), None)
        if isinstance(argvalues, ast.Name):
            argvalues = self.constants.get(argvalues.id)
        if argvalues is None:
            return
        for param in (node for node in ast.walk(argvalues) if _is_param_call(node)):
            keywords = {k.arg: k.value for k in param.keywords}
            if "marks" not in keywords:
                continue
            param_id = _string_literal(keywords["id"]) if "id" in keywords else None
            for call in _mark_calls_in(keywords["marks"]):
                self.claim(call, f"{test}[{param_id}]" if param_id else test)

    def claim_decorated(self, node, test, collected_prefix):
        """Marks on a function or class and in its parametrize decorators (and a class's own pytestmark)."""
        sources = list(node.decorator_list)
        if isinstance(node, ast.ClassDef):
            sources += [statement.value for statement in node.body if isinstance(statement, ast.Assign)
                        and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in statement.targets)]
        before = len(self.rows)
        for source in sources:
            for call in _mark_calls_in(source):
                self.claim(call, test)
            if _is_parametrize_call(source):
                self.claim_params(source, test)
        if len(self.rows) > before and not node.name.startswith(collected_prefix):
            self.fail(node, f"bad_input on {node.name}, which pytest does not collect (its name does not start "
                            f"with {collected_prefix!r})")

    def collect(self):
        for statement in self.tree.body:
            if isinstance(statement, ast.Assign) and any(
                    isinstance(t, ast.Name) and t.id == "pytestmark" for t in statement.targets):
                for call in _mark_calls_in(statement.value):
                    self.claim(call, self.name)
            elif isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self.claim_decorated(statement, f"{self.name}::{statement.name}", "test")
            elif isinstance(statement, ast.ClassDef):
                self.claim_decorated(statement, f"{self.name}::{statement.name}", "Test")
                for item in statement.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        self.claim_decorated(item, f"{self.name}::{statement.name}::{item.name}", "test")
        # Whatever is left is a mark the table would silently miss (or pytest would never apply).
        calls = [node for node in ast.walk(self.tree) if _is_mark_call(node)]
        called = {id(call.func) for call in calls}
        for node in ast.walk(self.tree):
            if _is_mark_reference(node) and id(node) not in called:
                self.fail(node, f"bad_input needs its arguments: @pytest.mark.bad_input({', '.join(FIELDS)})")
        for call in calls:
            if id(call) not in self.claimed:
                self.fail(call, "a bad_input mark that is not on a test: put it on the test function or class, in "
                                "pytestmark, or in pytest.param(..., marks=...) of the test's parametrize")
        return self.rows


def marks_in_source(source, display_name):
    """The BadInputRows of one test module's source; `display_name` (e.g. "tests/test_x.py") names it in rows."""
    return _ModuleMarks(source, display_name).collect()


def collect_bad_inputs(tests_dir):
    """The BadInputRows of every tests_dir/*.py, in file and line order."""
    tests_dir = Path(tests_dir)
    if not tests_dir.is_dir():
        raise BadInputMarkError(f"no tests folder at {tests_dir}")
    rows = []
    for path in sorted(tests_dir.glob("*.py")):
        rows += marks_in_source(path.read_text(encoding="utf-8"), f"{tests_dir.name}/{path.name}")
    return rows


def _cell(text):
    # `|` ends a cell even inside code spans; `<` outside them would start an HTML tag and vanish.
    parts = text.replace("|", "\\|").split("`")
    return "`".join(part.replace("<", "&lt;") if index % 2 == 0 else part for index, part in enumerate(parts))


def render_table(rows):
    """The Markdown of docs/bad_inputs.md: the intro, a count per kind, then one section per kind."""
    kinds = sorted({row.kind for row in rows}, key=lambda kind: (kind.casefold(), kind))
    by_kind = {kind: sorted((row for row in rows if row.kind == kind),
                            key=lambda row: (row.test.split("::")[0], row.line, row.test)) for kind in kinds}
    lines = [INTRO, f"{len(rows)} bad inputs in {len(kinds)} kinds:", "", "| kind | tests |", "|---|---:|"]
    lines += [f"| {_cell(kind)} | {len(by_kind[kind])} |" for kind in kinds]
    for kind in kinds:
        lines += ["", f"## {kind}", "", "| input given | what pvt_dense does | test |", "|---|---|---|"]
        lines += [f"| {_cell(row.given)} | {_cell(row.behaviour)} | `{_cell(row.test)}` |" for row in by_kind[kind]]
    return "\n".join(lines) + "\n"


def write_table(path, rows):
    """Write docs/bad_inputs.md for `rows` (atomically: a reader never sees half a table)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(str(path), render_table(rows).encode("utf-8"))


def _table_rows(text):
    return {line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| input given |")}


def stale_table_message(path, rows, limit=10):
    """None when the file at `path` is what `rows` render to; otherwise what differs and how to fix it."""
    path = Path(path)
    fix = f"regenerate it with `{REGENERATE}`"
    if not path.is_file():
        return f"{path} does not exist; {fix}"
    actual, expected = path.read_text(encoding="utf-8"), render_table(rows)
    if actual == expected:
        return None
    missing = sorted(_table_rows(expected) - _table_rows(actual))
    gone = sorted(_table_rows(actual) - _table_rows(expected))
    lines = [f"{path} is stale: it differs from the bad_input marks in the tests "
             f"({len(missing)} table lines to add, {len(gone)} to remove); {fix}"]
    for sign, changed in (("+", missing), ("-", gone)):
        lines += [f"  {sign} {line}" for line in changed[:limit]]
        if len(changed) > limit:
            lines.append(f"  {sign} ... and {len(changed) - limit} more")
    if not missing and not gone:
        lines.append("  (the rows are the same; the text around them or their order differs)")
    return "\n".join(lines)
