"""Using pvt_dense prints nothing at interpreter exit.

mindcv 0.3.0 (imported by `import pvt_dense`) annotated two functions with the module `mindspore.nn.cell`, which kept
that module alive until shutdown wiped it before `__main__`; every Cell in a script's globals then printed an
`Exception ignored in: <function Cell.__del__ ...>` traceback at exit (see `pvt_dense.integrations.mindcv`). These
tests run what a user runs, in fresh interpreters: the README's Python example and one tool.
"""
import os
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
    return dict(os.environ, PYTHONPATH=ROOT, GLOG_v="3", PVT_DENSE_NUM_THREADS="1", OMP_NUM_THREADS="1")


def readme_python_example():
    """The README's one Python block (under `## Python`)."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    blocks = re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
    assert len(blocks) == 1, "the README holds one Python example"
    return blocks[0]


def test_readme_example_prints_what_it_says_and_nothing_at_exit(tmp_path):
    code = readme_python_example()
    script = tmp_path / "readme_example.py"
    script.write_text(code)
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    # each print's comment in the README is its output
    expected = [line.split("#", 1)[1].strip() for line in code.splitlines() if line.startswith("print(")]
    assert run.stdout.splitlines() == expected
    assert run.stderr == ""


def test_a_plain_cell_in_main_with_pvt_dense_imported_exits_cleanly(tmp_path):
    script = tmp_path / "dense.py"
    script.write_text("import mindspore as ms\nimport numpy as np\nimport pvt_dense\n"
                      "net = ms.nn.SequentialCell([ms.nn.Dense(4, 4), ms.nn.Dense(4, 4)])\n"
                      "print(net(ms.Tensor(np.zeros((1, 4), np.float32))).shape)\n")
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert (run.returncode, run.stdout, run.stderr) == (0, "(1, 4)\n", "")


def test_mindcv_annotations_no_longer_hold_modules():
    import types

    import pvt_dense  # noqa: F401  (imports and registers with mindcv)
    mindcv_pit = pytest.importorskip("mindcv.models.pit")
    for cls in (mindcv_pit.Block, mindcv_pit.Mlp):
        annotations = cls.__init__.__annotations__
        assert annotations and not any(isinstance(v, types.ModuleType) for v in annotations.values())


def test_export_features_tool_exits_cleanly(tmp_path):
    from PIL import Image
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    run = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "export_features.py"), "--backbone", "pvt_tiny",
                          "--input", str(tmp_path / "a.png"), "--output", str(tmp_path / "features"),
                          "--short-side", "64", "--max-long-side", "96", "--no-progress"],
                         cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("exported 1 feature files")
    # the one thing it says on stderr is that the weights are random; nothing follows it
    assert run.stderr.splitlines() == ["warning: no --ckpt given: the features come from randomly initialised weights"]
