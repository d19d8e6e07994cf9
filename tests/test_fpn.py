"""The FPN neck against an independent torch implementation of mmdetection's FPN forward, at odd input sizes."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mindspore as ms
from pvt_dense.errors import ConfigError
from pvt_dense.models import create_backbone
from pvt_dense.models.fpn import FPN, build_neck


def torch_fpn(fpn, features):
    """mmdet FPN.forward written with torch functional ops, weights taken from our cell."""
    def conv(cell, x):
        weight = torch.from_numpy(cell.weight.asnumpy())
        bias = torch.from_numpy(cell.bias.asnumpy())
        return F.conv2d(x, weight, bias, stride=cell.stride[-1], padding=cell.kernel_size[-1] // 2)

    inputs = [torch.from_numpy(f) for f in features]
    laterals = [conv(c, inputs[i + fpn.start_level]) for i, c in enumerate(fpn.lateral_convs)]
    for i in range(len(laterals) - 1, 0, -1):
        laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[2:],
                                                          mode="nearest")
    outs = [conv(c, lat) for c, lat in zip(fpn.fpn_convs, laterals, strict=True)]
    extra = fpn.num_outs - len(outs)
    if extra and fpn.extra_source is None:
        for _ in range(extra):
            outs.append(F.max_pool2d(outs[-1], 1, stride=2))
    elif extra:
        source = {"on_input": inputs[-1], "on_lateral": laterals[-1], "on_output": outs[-1]}[fpn.extra_source]
        outs.append(conv(fpn.extra_convs[0], source))
        for i in range(1, extra):
            previous = F.relu(outs[-1]) if fpn.relu_before_extra_convs else outs[-1]
            outs.append(conv(fpn.extra_convs[i], previous))
    return [o.numpy() for o in outs]


def random_features(rng, channels, sizes):
    return [rng.standard_normal((2, c, h, w)).astype(np.float32) for c, (h, w) in zip(channels, sizes, strict=True)]


# Map sizes of a PVT backbone at 97x131 input: floors at every stage, so the top-down sizes are not exact 2x.
ODD_SIZES = [(24, 32), (12, 16), (6, 8), (3, 4)]
ODD_SIZES_2 = [(25, 33), (12, 16), (6, 8), (3, 4)]


@pytest.mark.parametrize("options", [
    dict(start_level=1, num_outs=5, add_extra_convs="on_input"),            # RetinaNet
    dict(start_level=0, num_outs=4),                                          # Semantic FPN
    dict(start_level=0, num_outs=6, add_extra_convs=None),                    # max-pool extras
    dict(start_level=1, num_outs=5, add_extra_convs="on_output", relu_before_extra_convs=True),
    dict(start_level=1, num_outs=4, add_extra_convs="on_lateral"),
])
@pytest.mark.parametrize("sizes", [ODD_SIZES, ODD_SIZES_2])
def test_fpn_matches_torch_reference(options, sizes):
    channels = (16, 24, 40, 48)
    fpn = FPN(channels, (4, 8, 16, 32), out_channels=8, **options)
    features = random_features(np.random.default_rng(0), channels, sizes)
    ours = fpn(tuple(ms.Tensor(f) for f in features))
    reference = torch_fpn(fpn, features)
    assert len(ours) == len(reference) == fpn.num_outs == len(fpn.strides)
    for level, (a, b) in enumerate(zip(ours, reference, strict=True)):
        assert a.shape == b.shape, level
        np.testing.assert_allclose(a.asnumpy(), b, atol=1e-5, rtol=1e-5)


def test_fpn_declares_strides_and_channels_from_the_backbone(graph_mode):
    backbone = create_backbone("pvt_tiny")
    neck = build_neck(backbone, out_channels=32, start_level=1, num_outs=5, add_extra_convs="on_input")
    assert neck.strides == (8, 16, 32, 64, 128)
    assert neck.out_channels == (32,) * 5
    x = ms.Tensor(np.random.default_rng(1).standard_normal((1, 3, 97, 131)).astype(np.float32))

    class Net(ms.nn.Cell):
        def __init__(self):
            super().__init__()
            self.backbone, self.neck = backbone, neck

        def construct(self, x):
            return self.neck(self.backbone(x))

    outs = Net()(x)
    # 3x3 stride-2 convs with padding 1 give ceil(h / 2) at each extra level.
    assert [tuple(o.shape) for o in outs] == [(1, 32, 12, 16), (1, 32, 6, 8), (1, 32, 3, 4), (1, 32, 2, 2),
                                               (1, 32, 1, 1)]


@pytest.mark.parametrize("kwargs, message", [
    (dict(in_channels=(8, 8), in_strides=(4, 16)), "double"),
    (dict(in_channels=(8, 8), in_strides=(4, 8), start_level=2), "start_level"),
    (dict(in_channels=(8, 8), in_strides=(4, 8), num_outs=1), "num_outs"),
    (dict(in_channels=(8, 8), in_strides=(4, 8), add_extra_convs="on_top"), "add_extra_convs"),
    (dict(in_channels=(8, 8, 8), in_strides=(4, 8)), "one stride per input"),
])
def test_fpn_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        FPN(**kwargs)


def test_unknown_neck_lists_valid_names():
    with pytest.raises(ConfigError, match="valid necks: fpn"):
        build_neck(create_backbone("pvt_tiny"), name="bifpn")
