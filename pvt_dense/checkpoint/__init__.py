"""Checkpoints from every source: official PyTorch, HuggingFace, MindCV and pvt_dense, read without running code;
whole detectors and segmentors also from OpenMMLab (official PVT releases, mmdetection 3.x / mmsegmentation 1.x).

This layer knows files and names only: it imports nothing from the models, the engine or the tasks. Conversion,
which builds the model the weights must fit, is `pvt_dense.conversion`."""
from .whole_model import WholeModelInfo, WholeModelLoadReport, load_whole_model, read_whole_model_info
from .load import LoadReport, infer_model_name, load_pretrained, native_checkpoint, read_checkpoint, save_native

__all__ = ["WholeModelInfo", "WholeModelLoadReport", "LoadReport", "infer_model_name", "load_whole_model",
           "load_pretrained", "native_checkpoint", "read_checkpoint", "read_whole_model_info", "save_native"]
