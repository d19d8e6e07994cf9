"""The one table from model names to builders, and the two entry points users call."""
from ..errors import PVTDenseError
from .pvt import PVT_SPECS, PVTBackbone, PVTClassifier


class UnknownModelError(PVTDenseError, KeyError):
    def __str__(self):
        return self.args[0]


def list_models():
    return sorted(PVT_SPECS)


def get_spec(name):
    if name not in PVT_SPECS:
        raise UnknownModelError(f"unknown model name {name!r}; valid names: {', '.join(list_models())}")
    return PVT_SPECS[name]


def create_backbone(name, out_indices=(0, 1, 2, 3), pretrained=None, drop_path_rate=0.0, frozen_stages=-1,
                    recompute_stages=(), strict=True, norm_eps_style="official"):
    """Build a PVT backbone returning the selected stage maps (see `PVTBackbone`).

    `pretrained` is a checkpoint path in any supported format (official PyTorch .pth, HuggingFace .bin or
    .safetensors, MindCV or pvt_dense .ckpt); a classifier checkpoint loads too (its cls token, final norm and
    head are dropped with a note). `norm_eps_style` ("official" or "mmdet", see `NORM_EPS_STYLES`) must be the
    one the weights were trained with.
    """
    spec = get_spec(name).with_norm_eps_style(norm_eps_style)
    net = PVTBackbone(spec, out_indices=out_indices, drop_path_rate=drop_path_rate, frozen_stages=frozen_stages,
                      recompute_stages=recompute_stages)
    net.model_name = name
    if pretrained:
        from ..checkpoint import load_pretrained
        load_pretrained(net, pretrained, strict=strict)
    return net


def create_model(name, num_classes=1000, pretrained=None, drop_path_rate=0.0, drop_rate=0.0, strict=True):
    """Build the PVT ImageNet classifier; `pretrained` as in `create_backbone` (a head of another class count is
    dropped, with a note, so the model can be fine-tuned)."""
    net = PVTClassifier(get_spec(name), num_classes=num_classes, drop_path_rate=drop_path_rate, drop_rate=drop_rate)
    net.model_name = name
    if pretrained:
        from ..checkpoint import load_pretrained
        load_pretrained(net, pretrained, strict=strict)
    return net
