"""Export a model at a fixed input shape for deployment: MINDIR (mindspore.load + nn.GraphCell runs it) or ONNX.

One idea per file:
- `tasks.py`: what can be exported, one explicit table `EXPORT_TASKS` from task names to a config loader and a
  builder ("backbone": stage maps; "classifier": logits; "detector": RetinaNet's per-level class logits then box
  deltas, decode and NMS outside the graph; "segmentor": Semantic FPN logits). A task's builder receives the loaded
  (checked) config and the checkpoint path and returns the Cell to export; a new task is one table line.
- `exporter.py`: the export itself. The graph uses MindSpore's own operators, never pvt_dense's compiled CPU
  kernels (a graph with those names this machine's .so file by path and would not run elsewhere); the numbers are
  the same to ~1e-6. The file is written atomically, with a JSON sidecar that records the input shape, output
  shapes, preprocessing, checkpoint and versions, and by default the exported graph is loaded back and compared
  with the model before it is kept.
- `onnx_substitutes.py`: MindSpore 2.10's ONNX exporter has no Erf (exact GELU), no bilinear resize, no Unstack and
  no Reciprocal, so the ONNX graph is the same model written with exact-equivalent substitutes
  (`make_onnx_exportable`). Checked with onnxruntime against the exact model (max difference ~3e-6 on random
  weights; tests/test_export.py). Every task works for PVT v1 and v2 models alike.
"""
from .exporter import (FORMATS, check_protocol_shape, detector_shapes_for_images, export_model, load_exported,
                       parse_shape, resolve_task, sha256_of)
from .onnx_substitutes import FixedGridAveragePool, PolynomialGELU, SplitPair, make_onnx_exportable
from .tasks import EXPORT_TASKS, ExportError, ExportTask

__all__ = ["EXPORT_TASKS", "ExportTask", "ExportError", "FORMATS", "FixedGridAveragePool", "PolynomialGELU",
           "SplitPair", "check_protocol_shape", "detector_shapes_for_images", "export_model", "load_exported",
           "make_onnx_exportable", "parse_shape", "resolve_task", "sha256_of"]
