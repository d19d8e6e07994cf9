"""Checkpoints from every source: official PyTorch, HuggingFace, MindCV and pvt_dense, read without running code."""
from .convert import convert_checkpoint
from .load import LoadReport, infer_model_name, load_pretrained, native_checkpoint, read_checkpoint, save_native

__all__ = ["convert_checkpoint", "LoadReport", "infer_model_name", "load_pretrained", "native_checkpoint",
           "read_checkpoint", "save_native"]
