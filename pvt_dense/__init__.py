"""pvt_dense: the Pyramid Vision Transformer (PVT v1 and v2) as a dense-prediction backbone on MindSpore."""
from .models import (MODEL_SPECS, PVT_SPECS, PVT_V2_SPECS, FeatureInfo, PVTBackbone, PVTClassifier, PVTSpec,
                     PVTv2Backbone, PVTv2Classifier, PVTv2Spec, create_backbone, create_model, list_models)
from .version import __version__

__all__ = ["__version__", "create_backbone", "create_model", "list_models", "MODEL_SPECS", "PVT_SPECS", "PVTSpec",
           "PVTBackbone", "PVTClassifier", "FeatureInfo", "PVT_V2_SPECS", "PVTv2Spec", "PVTv2Backbone",
           "PVTv2Classifier"]

# mindcv's create_model("pvt_tiny", ...) builds these models once pvt_dense is imported (mindyolo: see
# pvt_dense.integrations.mindyolo, registered on demand because importing mindyolo is slow).
from .integrations import autoregister as _autoregister  # noqa: E402

_autoregister()
