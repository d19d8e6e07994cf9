"""The one table from model names to builders, and the two entry points users call."""
from ..checkpoint.load import load_pretrained
from ..checkpoint.sizes import SizeSignature, register_sizes
from ..errors import PVTDenseError
from .pvt import PVT_SPECS, PVTBackbone, PVTClassifier, PVTSpec
from .pvt_v2 import PVT_V2_SPECS, PVTv2Backbone, PVTv2Classifier, PVTv2Spec

# Every model name and its spec: PVT v1 (pvt_tiny ... pvt_large) and PVT v2 (pvt_v2_b0 ... pvt_v2_b5, pvt_v2_b2_li).
MODEL_SPECS = {**PVT_SPECS, **PVT_V2_SPECS}

# What the checkpoint layer needs to name the size of a state dict (`pvt_dense.checkpoint.sizes`).
register_sizes({name: SizeSignature(tuple(spec.depths), spec.embed_dims[0], isinstance(spec, PVTv2Spec),
                                    getattr(spec, "linear", False))
                for name, spec in MODEL_SPECS.items()})

# The spec's type picks the (backbone, classifier) classes.
_BUILDERS = {PVTSpec: (PVTBackbone, PVTClassifier), PVTv2Spec: (PVTv2Backbone, PVTv2Classifier)}


class UnknownModelError(PVTDenseError, KeyError):
    def __str__(self):
        return self.args[0]


def list_models():
    return sorted(MODEL_SPECS)


def get_spec(name):
    if name not in MODEL_SPECS:
        raise UnknownModelError(f"unknown model name {name!r}; valid names: {', '.join(list_models())}")
    return MODEL_SPECS[name]


def is_v2(name):
    """Whether `name` is a PVT v2 size."""
    return isinstance(get_spec(name), PVTv2Spec)


def create_backbone(name, out_indices=(0, 1, 2, 3), pretrained=None, drop_path_rate=0.0, frozen_stages=-1,
                    recompute_stages=(), strict=True, norm_eps_style="official"):
    """Build a PVT (v1 or v2) backbone returning the selected stage maps (see `PVTBackbone`, `PVTv2Backbone`).

    `pretrained` is a checkpoint path in any supported format (official PyTorch .pth, HuggingFace .bin or
    .safetensors, MindCV or pvt_dense .ckpt; for v2 also timm and mmdetection); a classifier checkpoint loads too
    (its cls token, final norm and head are dropped with a note). `norm_eps_style` ("official" or "mmdet", see
    `NORM_EPS_STYLES`) must be the one the weights were trained with.
    """
    spec = get_spec(name).with_norm_eps_style(norm_eps_style)
    backbone_class = _BUILDERS[type(spec)][0]
    net = backbone_class(spec, out_indices=out_indices, drop_path_rate=drop_path_rate, frozen_stages=frozen_stages,
                         recompute_stages=recompute_stages)
    net.model_name = name
    if pretrained:
        load_pretrained(net, pretrained, strict=strict)
    return net


def create_model(name, num_classes=1000, pretrained=None, drop_path_rate=0.0, drop_rate=0.0, strict=True):
    """Build the PVT (v1 or v2) ImageNet classifier; `pretrained` as in `create_backbone` (a head of another class
    count is dropped, with a note, so the model can be fine-tuned)."""
    spec = get_spec(name)
    classifier_class = _BUILDERS[type(spec)][1]
    net = classifier_class(spec, num_classes=num_classes, drop_path_rate=drop_path_rate, drop_rate=drop_rate)
    net.model_name = name
    if pretrained:
        load_pretrained(net, pretrained, strict=strict)
    return net
