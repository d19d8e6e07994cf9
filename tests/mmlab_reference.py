"""mmdetection 3.3 / mmsegmentation 1.2 as test references: `require_mmdet()` / `require_mmseg()` import them with
the torchvision-based stand-in for mmcv's compiled operators (devtools/mmlab_stand_in.py), or skip the test where
the frameworks are not installed."""
import pytest

from devtools.mmlab_stand_in import batched_nms, import_mmlab, install_mmcv_ops_stand_in, nms  # noqa: F401


def _require(package):
    for dependency in ("torch", "torchvision", "mmengine", "mmcv"):
        pytest.importorskip(dependency)
    install_mmcv_ops_stand_in()
    pytest.importorskip(package)
    return import_mmlab(package)


def require_mmdet():
    return _require("mmdet")


def require_mmseg():
    return _require("mmseg")
