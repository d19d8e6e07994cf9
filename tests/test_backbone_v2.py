"""What is particular to the PVT v2 backbone: frozen and recomputed stages with the official drop-path schedule, its
bad-input errors (the contract it shares with v1, parametrized over both: tests/test_backbone.py)."""
import mindspore as ms
import numpy as np
import pytest

import pvt_dense
from pvt_dense.models.pvt_v2 import PVT_V2_SPECS


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
