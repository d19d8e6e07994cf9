"""Numerical parity with an implementation not written here: HuggingFace transformers' PVT on torch CPU.

Random weights are made on the torch side, saved the way HF saves them (.bin pickle and .safetensors), converted by
our converter and loaded into our MindSpore model. Two adjustments turn HF's PVT into the official model, and both
are made on the torch side only, where they are visible (devtools/hf_reference.py):
- HF uses one LayerNorm eps (1e-6) everywhere; the official code uses 1e-5 in the patch-embedding and
  spatial-reduction norms. We set those two norms' eps to the official value.
- For the dense forward (stage maps), HF always carries the cls token into the last stage and resizes position
  embeddings by reshaping the learned table to the *target* grid, which only works at the pretraining size. The
  official dense backbone has no cls token and resizes the learned grid bilinearly (align_corners=False). We drop
  the cls token and substitute that resize.
"""
import mindspore as ms
import numpy as np
import pytest

import pvt_dense
from devtools.hf_reference import as_official_dense_backbone, hf_pvt_config, set_official_norm_eps
from pvt_dense.conversion import convert_checkpoint
from pvt_dense.models.pvt import PVT_SPECS

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
TOLERANCE = 1e-4


def randomise(model, seed):
    """Replace HF's init (unit LayerNorms, zero biases) with weights where every tensor matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "layer_norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.2 * noise)
            elif param.dim() >= 2 and "embeddings" not in name and "cls_token" not in name:
                fan_in = param[0].numel()
                param.copy_(noise / fan_in ** 0.5)
            else:
                param.copy_(0.1 * noise)


def hf_stage_maps(pvt_model, pixels, depths):
    hidden = pvt_model(torch.from_numpy(pixels), output_hidden_states=True).hidden_states
    maps, height, width = [], pixels.shape[2], pixels.shape[3]
    for stage, stride in enumerate((4, 2, 2, 2)):
        height, width = height // stride, width // stride
        tokens = hidden[sum(depths[: stage + 1]) - 1]
        maps.append(tokens.reshape(tokens.shape[0], height, width, -1).permute(0, 3, 1, 2).numpy())
    return maps


@pytest.fixture(scope="module", params=[("pvt_tiny", ms.GRAPH_MODE), ("pvt_small", ms.PYNATIVE_MODE)],
                ids=["pvt_tiny-graph", "pvt_small-pynative"])
def hf_checkpoints(request, tmp_path_factory):
    name, mode = request.param
    torch.manual_seed(0)
    model = transformers.PvtForImageClassification(hf_pvt_config(PVT_SPECS[name])).eval()
    randomise(model, seed=len(name))
    set_official_norm_eps(model.pvt)
    folder = tmp_path_factory.mktemp(name)
    bin_path, st_path = folder / "pytorch_model.bin", folder / "model.safetensors"
    torch.save(model.state_dict(), bin_path)
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(st_path))
    return name, mode, model, bin_path, st_path


def run_in_mode(mode, fn):
    ms.set_context(mode=mode)
    try:
        return fn()
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)


def test_logits_match_hf_at_224(hf_checkpoints, tmp_path):
    name, mode, model, bin_path, st_path = hf_checkpoints
    pixels = np.random.default_rng(1).standard_normal((2, 3, 224, 224)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(pixels)).logits.numpy()
    converted = tmp_path / f"{name}.ckpt"
    report = convert_checkpoint(bin_path, converted)
    assert report.clean and report.source_format == "huggingface"
    for source in (converted, st_path):
        net = pvt_dense.create_model(name, pretrained=str(source))
        net.set_train(False)
        logits = run_in_mode(mode, lambda: net(ms.Tensor(pixels)).asnumpy())
        assert np.abs(expected).max() > 1.0, "weights too tame for the comparison to mean anything"
        np.testing.assert_allclose(logits, expected, rtol=0, atol=TOLERANCE, err_msg=str(source))


def test_stage_maps_match_official_dense_forward_at_odd_size(hf_checkpoints):
    name, mode, model, bin_path, _ = hf_checkpoints
    dense = as_official_dense_backbone(model.pvt)
    pixels = np.random.default_rng(2).standard_normal((1, 3, 160, 211)).astype(np.float32)
    with torch.no_grad():
        expected = hf_stage_maps(dense, pixels, PVT_SPECS[name].depths)
    # A classifier checkpoint loads into the backbone: cls slot, final norm and head are dropped.
    net = pvt_dense.create_backbone(name, pretrained=str(bin_path))
    net.set_train(False)
    outs = run_in_mode(mode, lambda: [o.asnumpy() for o in net(ms.Tensor(pixels))])
    for stage, (ours, theirs) in enumerate(zip(outs, expected, strict=True)):
        assert ours.shape == theirs.shape, stage
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=TOLERANCE, err_msg=f"stage {stage + 1}")
