"""The package's layers import only downward (the import-linter contract in setup.cfg) and no module imports
itself back through others, function-level imports included (grimp reads every import statement in a file)."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _lint_imports():
    script = shutil.which("lint-imports", path=os.path.dirname(sys.executable)) or shutil.which("lint-imports")
    if script is None:
        pytest.fail("lint-imports is not installed (it is in the [test] extra: pip install -e '.[test]')")
    return script


def test_layers_contract_is_kept():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([_lint_imports(), "--config", os.path.join(ROOT, "setup.cfg"), "--no-cache"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "1 kept, 0 broken" in result.stdout


def _cycles(graph, modules):
    """Tarjan's strongly connected components of more than one module: each is an import cycle."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(start):
        # iterative, so a deep import chain cannot hit the recursion limit
        work = [(start, iter(sorted(graph.find_modules_directly_imported_by(start) & modules)))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child) & modules))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))

    for module in sorted(modules):
        if module not in index:
            visit(module)
    return found


def test_cycle_finder_finds_a_cycle():
    class Graph:
        edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}

        def find_modules_directly_imported_by(self, module):
            return set(self.edges.get(module, ()))

    assert _cycles(Graph(), {"a", "b", "c", "d"}) == [["a", "b", "c"]]


def test_no_import_cycle_between_modules():
    import grimp  # installed with import-linter
    sys.path.insert(0, ROOT)
    try:
        graph = grimp.build_graph("pvt_dense", cache_dir=None)
    finally:
        sys.path.remove(ROOT)
    modules = set(graph.modules)
    assert "pvt_dense.checkpoint.whole_model" in modules
    assert _cycles(graph, modules) == []
