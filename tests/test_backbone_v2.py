"""The PVT v2 backbone keeps v1's contract: selected stages, declared channels and strides, frozen stages,
recomputed stages, the official drop-path schedule, clear errors for bad inputs, the same numbers in both modes."""
import mindspore as ms
import numpy as np
import pytest

import pvt_dense
from pvt_dense.models.pvt_v2 import PVT_V2_SPECS, PVTv2Backbone


def test_selected_stages_declare_what_they_return(pynative, images):
    net = pvt_dense.create_backbone("pvt_v2_b0", out_indices=(1, 3))
    assert isinstance(net, PVTv2Backbone) and len(net.stages) == 4
    assert net.out_channels == (64, 256) and net.strides == (8, 32)
    assert [(i.stage, i.channels, i.stride) for i in net.feature_info] == [(1, 64, 8), (3, 256, 32)]
    net.set_train(False)
    outs = net(images(70, 45))
    # ceil divisions: 70x45 -> 18x12 -> 9x6 -> 5x3 -> 3x2
    assert [o.shape for o in outs] == [(1, 64, 9, 6), (1, 256, 3, 2)]
    assert PVT_V2_SPECS["pvt_v2_b0"].stage_grids(70, 45) == ((18, 12), (9, 6), (5, 3), (3, 2))
    shallow = pvt_dense.create_backbone("pvt_v2_b0", out_indices=(0, 1))
    assert len(shallow.stages) == 2  # stages after the last output are not built


def test_frozen_recomputed_and_drop_path_schedule(pynative, images):
    net = pvt_dense.create_backbone("pvt_v2_b0", frozen_stages=2, recompute_stages=(3,), drop_path_rate=0.2)
    frozen = [p.name for p in net.get_parameters() if not p.requires_grad]
    assert frozen and all(name.startswith(("stages.0.", "stages.1.")) for name in frozen)
    assert "stages.1.norm.gamma" in frozen and "stages.0.patch_embed.proj.weight" in frozen
    assert not any(p.requires_grad is False for p in net.stages[2].get_parameters())
    rates = [block.drop_path.drop_prob for stage in net.stages for block in stage.blocks]
    # Frozen stages have no drop path; the others keep the official linspace(0, 0.2, 8) over all blocks.
    assert rates[:4] == [0.0] * 4
    np.testing.assert_allclose(rates[4:], np.linspace(0.0, 0.2, 8)[4:], atol=1e-7)
    # A frozen stage computes the same in train and eval mode.
    x = images(64, 64)
    net.set_train(True)
    train_out = net.stages[0](x)[0].asnumpy()
    net.set_train(False)
    np.testing.assert_array_equal(train_out, net.stages[0](x)[0].asnumpy())


def test_graph_and_pynative_agree(graph_mode, images):
    net = pvt_dense.create_backbone("pvt_v2_b2_li", out_indices=(0, 1, 2, 3))
    net.set_train(False)
    x = images(65, 79)
    graph = [o.asnumpy() for o in net(x)]
    ms.set_context(mode=ms.PYNATIVE_MODE)
    eager = [o.asnumpy() for o in net(x)]
    assert [g.shape[2:] for g in graph] == [(17, 20), (9, 10), (5, 5), (3, 3)]
    for g, e in zip(graph, eager, strict=True):
        np.testing.assert_allclose(g, e, atol=1e-5, rtol=1e-5)


@pytest.mark.bad_input("backbone input tensor", "a 3-D tensor, 4 channels or a 16x16 image given to pvt_v2_b0",
                       "ValueError: '4-D NCHW', '3 input channels', 'at least 32x32'")
def test_bad_inputs_are_clear_errors(pynative):
    net = pvt_dense.create_backbone("pvt_v2_b0")
    with pytest.raises(ValueError, match="4-D NCHW"):
        net(ms.Tensor(np.zeros((3, 64, 64), np.float32)))
    with pytest.raises(ValueError, match="3 input channels"):
        net(ms.Tensor(np.zeros((1, 4, 64, 64), np.float32)))
    with pytest.raises(ValueError, match="at least 32x32"):
        net(ms.Tensor(np.zeros((1, 3, 16, 16), np.float32)))
    with pytest.raises(ValueError, match="no cls token"):
        from pvt_dense.models.pvt_v2 import build_v2_stages
        build_v2_stages(PVT_V2_SPECS["pvt_v2_b0"], 0.0, with_cls_token=True)
