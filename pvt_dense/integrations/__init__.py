"""PVT inside other frameworks, without editing their files.

- `pvt_dense.integrations.mindcv`: `mindcv.models.create_model("pvt_tiny", ...)` builds pvt_dense models.
  Registered by `import pvt_dense` (it costs ~0.2 s on top of MindSpore's import); `register()` does it explicitly.
- `pvt_dense.integrations.mindyolo`: the `yolov8_pvt` model for mindyolo YAMLs. Registered on request only
  (`pvt_dense.integrations.mindyolo.register()`, or `python -m pvt_dense.integrations.mindyolo train.py ...`), so
  that `import pvt_dense` never imports mindyolo.
"""
import importlib.util
import warnings

__all__ = ["autoregister"]


def autoregister():
    """What `import pvt_dense` runs: register with mindcv when mindcv is installed.

    Never raises: without mindcv nothing happens; with another mindcv version a warning says why the PVT entries
    are not registered.
    """
    if importlib.util.find_spec("mindcv") is None:
        return
    from ..errors import ConfigError
    from . import mindcv
    try:
        mindcv.register()
    except ConfigError as err:
        warnings.warn(f"pvt_dense did not register its PVT models with mindcv: {err}", RuntimeWarning, stacklevel=2)
