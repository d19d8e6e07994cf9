from .factory import create_backbone, create_model, list_models
from .pvt import PVT_SPECS, FeatureInfo, PVTBackbone, PVTClassifier, PVTSpec

__all__ = ["create_backbone", "create_model", "list_models", "PVT_SPECS", "PVTSpec", "PVTBackbone",
           "PVTClassifier", "FeatureInfo"]
