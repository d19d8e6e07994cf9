import os
import sys

os.environ.setdefault("GLOG_v", "3")
# devtools/ (benchmark, bad-input table, HF reference model) sits beside the package, outside what is installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mindspore as ms  # noqa: E402
import pytest  # noqa: E402

ms.set_device("CPU")
ms.set_context(mode=ms.PYNATIVE_MODE)


@pytest.fixture
def pynative():
    """Run a test eagerly (no per-shape graph compile), restoring PyNative afterwards for the next test."""
    ms.set_context(mode=ms.PYNATIVE_MODE)
    yield
    ms.set_context(mode=ms.PYNATIVE_MODE)


@pytest.fixture
def graph_mode():
    ms.set_context(mode=ms.GRAPH_MODE)
    yield
    ms.set_context(mode=ms.PYNATIVE_MODE)
