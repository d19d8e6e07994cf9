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


# --- helpers shared by several test files, as fixtures ------------------------------------------------------------

@pytest.fixture(scope="session")
def images():
    """images(height, width, batch=1, seed=0, uniform=False): a random (batch, 3, height, width) float32 ms.Tensor,
    standard normal, or uniform in [0, 1) with `uniform`."""
    import numpy as np

    def make(height, width, batch=1, seed=0, uniform=False):
        rng = np.random.default_rng(seed)
        shape = (batch, 3, height, width)
        return ms.Tensor((rng.random(shape) if uniform else rng.standard_normal(shape)).astype(np.float32))
    return make


@pytest.fixture(scope="session")
def free_port():
    """free_port(): a TCP port free on localhost at the time of the call (for a launcher's master address)."""
    import socket

    def find():
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]
    return find


@pytest.fixture(scope="session")
def load_tool():
    """load_tool(name): tools/<name>.py as a module (tools/ is a folder of scripts, not a package), to call its
    `main` in-process."""
    import importlib.util
    from pathlib import Path

    tools = Path(__file__).resolve().parents[1] / "tools"

    def load(name):
        spec = importlib.util.spec_from_file_location(f"tool_{name}", tools / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return load


@pytest.fixture(scope="session")
def write_photos():
    """write_photos(folder, {name: (H, W, 3) uint8 RGB}): each image written with OpenCV under its name (the
    extension picks the codec); {name: pathlib.Path}, in the order given."""
    from pathlib import Path

    import cv2
    import numpy as np

    def write(folder, photos):
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = {}
        for name, rgb in photos.items():
            paths[name] = folder / name
            assert cv2.imwrite(str(paths[name]), np.ascontiguousarray(rgb[:, :, ::-1]))
        return paths
    return write
