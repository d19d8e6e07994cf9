from .factory import MODEL_SPECS, create_backbone, create_model, list_models
from .pvt import PVT_SPECS, FeatureInfo, PVTBackbone, PVTClassifier, PVTSpec
from .pvt_v2 import PVT_V2_SPECS, PVTv2Backbone, PVTv2Classifier, PVTv2Spec

__all__ = ["create_backbone", "create_model", "list_models", "MODEL_SPECS", "PVT_SPECS", "PVTSpec", "PVTBackbone",
           "PVTClassifier", "FeatureInfo", "PVT_V2_SPECS", "PVTv2Spec", "PVTv2Backbone", "PVTv2Classifier"]
