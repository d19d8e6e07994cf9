"""The convolutions computed as matrix products against torch's conv2d: outputs and gradients, odd sizes, graph and
PyNative; and that each is a drop-in `nn.Conv2d` for checkpoints. `MatmulConv2d` (the necks' and heads' 3x3 convs,
PVT v2's patch embeddings), `DepthwiseConv2d` (v2's MLP), `PatchConv2d` (kernel == stride: PVT's patch embeddings
and spatial reductions)."""
import contextlib
import os

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn, ops

from pvt_dense.models import fast_ops
from pvt_dense.models.conv import DepthwiseConv2d, MatmulConv2d, PatchConv2d

torch = pytest.importorskip("torch")


def torch_conv(x, weight, bias, stride, padding, groups=1):
    """torch's conv2d output, and the gradients of sum(output * linspace(-1, 1)) for the input and the weight."""
    x_t = torch.tensor(x, requires_grad=True)
    w_t = torch.tensor(weight, requires_grad=True)
    b_t = torch.tensor(bias, requires_grad=True) if bias is not None else None
    out = torch.nn.functional.conv2d(x_t, w_t, b_t, stride=stride, padding=padding, groups=groups)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    return out.detach().numpy(), x_t.grad.numpy(), w_t.grad.numpy()


class WeightedSum(nn.Cell):
    """sum(model(x) * scale), the scalar whose gradients `torch_conv` takes."""

    def __init__(self, model, scale):
        super().__init__()
        self.model = model
        self.scale = scale

    def construct(self, inputs):
        return (self.model(inputs) * self.scale).sum()


def assert_equals_torch(model, weight, x, torch_result):
    """`model` (input image -> output map) against `torch_conv`'s output and input and weight gradients."""
    expected, grad_x, grad_w = torch_result
    np.testing.assert_allclose(model(ms.Tensor(x)).asnumpy(), expected, rtol=1e-5, atol=1e-5)
    scale = ms.Tensor(np.linspace(-1, 1, expected.size, dtype=np.float32).reshape(expected.shape))
    grads = ms.value_and_grad(WeightedSum(model, scale), 0, [weight])(ms.Tensor(x))[1]
    np.testing.assert_allclose(grads[0].asnumpy(), grad_x, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(grads[1][0].asnumpy(), grad_w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "im2col"])
@pytest.mark.parametrize("mode", [ms.GRAPH_MODE, ms.PYNATIVE_MODE])
# (2, 6, 45, 61): a map large enough for the kernels' 3x3 stride-1 forward to take Winograd's F(2x2, 3x3)
# (kernels/winograd.cc: 12 blocks of 128 tiles, at least two per thread up to 6 threads), odd on both sides.
@pytest.mark.parametrize("stride, has_bias, shape", [(1, True, (2, 6, 13, 17)), (2, True, (1, 6, 13, 16)),
                                                     (1, False, (1, 6, 7, 5)), (1, True, (2, 6, 45, 61))])
def test_output_and_gradients_equal_torch_conv2d(mode, stride, has_bias, shape, kernel):
    """Both paths, in training mode: the convolution kernels (forward and backward) and, where they are not
    available, MindSpore's Im2Col + BatchMatMul."""
    ms.set_context(mode=mode)
    try:
        rng = np.random.default_rng(0)
        with contextlib.nullcontext() if kernel else fast_ops.mindspore_ops_only():
            conv = MatmulConv2d(6, 5, 3, stride=stride, has_bias=has_bias)
        assert (conv.fused is not None) == kernel
        conv.set_train(True)
        conv.weight.set_data(ms.Tensor(rng.normal(size=(5, 6, 3, 3)).astype(np.float32)))
        bias = rng.normal(size=5).astype(np.float32) if has_bias else None
        if has_bias:
            conv.bias.set_data(ms.Tensor(bias))
        x = rng.normal(size=shape).astype(np.float32)
        assert_equals_torch(conv, conv.weight, x, torch_conv(x, conv.weight.asnumpy(), bias, stride, 1))
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)


def test_same_parameters_as_nn_conv2d():
    mine, theirs = MatmulConv2d(4, 8, 3), nn.Conv2d(4, 8, 3, pad_mode="pad", padding=1, has_bias=True)
    assert isinstance(mine, nn.Conv2d)
    assert [(p.name, p.shape) for p in mine.get_parameters()] == [(p.name, p.shape) for p in theirs.get_parameters()]
    x = ms.Tensor(np.random.default_rng(1).normal(size=(1, 4, 9, 11)).astype(np.float32))
    theirs.weight.set_data(mine.weight.value())
    theirs.bias.set_data(ops.ones(8, ms.float32))
    mine.bias.set_data(ops.ones(8, ms.float32))
    np.testing.assert_allclose(mine(x).asnumpy(), theirs(x).asnumpy(), rtol=1e-5, atol=1e-5)


class PatchTokensAsImage(nn.Cell):
    """A PatchConv2d's token output (from the image, or from the image's tokens) laid out as the conv's map."""

    def __init__(self, conv, layout, shape):
        super().__init__()
        self.conv = conv
        self.from_image = layout == "image"
        self.batch, self.channels, self.height, self.width = shape

    def construct(self, inputs):
        batch, height, width, patch = self.batch, self.height, self.width, self.conv.patch
        if self.from_image:
            tokens, rows, cols = self.conv.image_to_tokens(inputs)
        else:
            tokens = self.conv.tokens_to_tokens(
                inputs.reshape(batch, self.channels, height * width).transpose(0, 2, 1), height, width)
            rows, cols = height // patch, width // patch
        return tokens.transpose(0, 2, 1).reshape(batch, self.conv.out_channels, rows, cols)


@pytest.mark.parametrize("mode", [ms.GRAPH_MODE, ms.PYNATIVE_MODE])
@pytest.mark.parametrize("layout", ["image", "tokens", "conv"])
@pytest.mark.parametrize("patch, shape", [(4, (2, 3, 16, 12)), (2, (1, 6, 13, 9)), (3, (1, 6, 8, 7))])
def test_patch_conv_equals_torch_conv2d(mode, layout, patch, shape):
    """Odd sizes leave rows and columns past the last whole patch, which the convolution drops."""
    ms.set_context(mode=mode)
    try:
        rng = np.random.default_rng(patch)
        channels = shape[1]
        conv = PatchConv2d(channels, 5, patch)
        conv.weight.set_data(ms.Tensor(rng.normal(size=(5, channels, patch, patch)).astype(np.float32)))
        bias = rng.normal(size=5).astype(np.float32)
        conv.bias.set_data(ms.Tensor(bias))
        x = rng.normal(size=shape).astype(np.float32)
        model = conv if layout == "conv" else PatchTokensAsImage(conv, layout, shape)
        assert_equals_torch(model, conv.weight, x, torch_conv(x, conv.weight.asnumpy(), bias, patch, 0))
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)


def test_patch_conv_has_the_parameters_of_nn_conv2d():
    mine, theirs = PatchConv2d(4, 8, 2), nn.Conv2d(4, 8, 2, stride=2, pad_mode="valid", has_bias=True)
    assert isinstance(mine, nn.Conv2d)
    assert [(p.name, p.shape) for p in mine.get_parameters()] == [(p.name, p.shape) for p in theirs.get_parameters()]


HANG_SCRIPT = """
import numpy as np, mindspore as ms
from mindspore import nn
from pvt_dense.models.conv import MatmulConv2d
ms.set_context(mode=ms.GRAPH_MODE)
conv = MatmulConv2d(4, 3, 3, stride={stride})
conv.set_train(True)  # the training path (eval mode runs the inference kernel)
class Loss(nn.Cell):
    def __init__(self):
        super().__init__()
        self.conv = conv
    def construct(self, x):
        return (self.conv(x) ** 2).sum()
step = ms.value_and_grad(Loss(), 0, conv.trainable_params())
x = ms.Tensor(np.ones((2, 4, 1, 1), np.float32))
for _ in range(3):
    step(x)[0].asnumpy()
print("done")
"""


@pytest.mark.parametrize("stride", [1, 2])
def test_training_calls_on_a_one_pixel_map_return(stride, tmp_path):
    """RetinaNet's P7 is 1x1 for small inputs; with ops.pad the second training call on such a map never
    returned (MindSpore 2.10, CPU). A subprocess, so that a hang fails this test instead of the suite."""
    import subprocess
    import sys
    script = tmp_path / "train_on_one_pixel.py"  # graph mode compiles from source files only
    script.write_text(HANG_SCRIPT.format(stride=stride))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("done")


MEMORY_SCRIPT = """
import sys
import numpy as np, mindspore as ms
from mindspore import nn, ops
from pvt_dense.models.conv import MatmulConv2d
ms.set_context(mode=ms.GRAPH_MODE)
def resident_bytes():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS"))
in_channels, out_channels, size = (int(arg) for arg in sys.argv[1:4])
conv = MatmulConv2d(in_channels, out_channels, 3)
conv.set_train(True)  # the training path (eval mode runs the inference kernel)
class Loss(nn.Cell):
    def __init__(self):
        super().__init__()
        self.conv = conv
    def construct(self, x):
        return ops.relu(self.conv(x)).sum()
class Gradients(nn.Cell):
    def __init__(self):
        super().__init__()
        self.loss = Loss()
        self.weights = ms.ParameterTuple(conv.trainable_params())
        self.grad = ops.GradOperation(get_all=True, get_by_list=True)
    def construct(self, x):
        return self.grad(self.loss, self.weights)(x)
x = ms.Tensor(np.ones((2, in_channels, size, size), np.float32))
net = Gradients()
before = resident_bytes()
net.compile(x)
compiled = resident_bytes()
net(x)[0][0].asnumpy()
print(compiled - before, resident_bytes() - compiled)
"""


def conv_gradients_memory(tmp_path, in_channels, out_channels, size, kernel=True):
    """(resident bytes added by compiling, then by the first call of) the gradients of sum(MatmulConv2d(x)) in
    graph mode, for x (2, in_channels, size, size), in a fresh process so that the differences are its own."""
    import subprocess
    import sys
    script = tmp_path / "conv_gradients_memory.py"
    script.write_text(MEMORY_SCRIPT)
    env = dict(os.environ, PVT_DENSE_FAST_OPS="1" if kernel else "0")
    result = subprocess.run([sys.executable, str(script), str(in_channels), str(out_channels), str(size)],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    compiled, called = (int(value) for value in result.stdout.split()[-2:])
    return compiled, called


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "im2col"])
def test_compiling_the_training_graph_allocates_far_less_than_the_columns(tmp_path, kernel):
    """ops.matmul's gradient transposed the im2col columns, and each Transpose kernel holds a table of 8 bytes per
    element from graph compilation on: compiling one 3x3 conv's training graph took ~2x its columns in resident
    memory, held for the graph's life (~1.3 GB of RetinaNet's head at 400x608)."""
    compiled, _ = conv_gradients_memory(tmp_path, 256, 256, 96, kernel)
    columns_bytes = 2 * 256 * 9 * 96 * 96 * 4  # 170 MB; ~50 MB is the compilation's own, whatever the sizes
    assert compiled < 0.75 * columns_bytes


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "im2col"])
def test_the_bias_costs_no_memory_beyond_the_output(tmp_path, kernel):
    """`out + bias.reshape(1, C, 1)` is a broadcasting Add, whose kernel keeps 8 bytes per output element for the
    broadcast input (MindSpore 2.10, CPU): twice the output, for the graph's life (~0.4 GB of RetinaNet's head at
    400x608). With few input channels the columns are small and the first call needs about the output (67 MB)
    and its gradient (67 MB); the broadcast Add added 134 MB."""
    _, called = conv_gradients_memory(tmp_path, 4, 512, 128, kernel)
    output_bytes = 2 * 512 * 128 * 128 * 4
    assert called < 2.8 * output_bytes


@pytest.mark.parametrize("mode", [ms.GRAPH_MODE, ms.PYNATIVE_MODE])
@pytest.mark.parametrize("shape", [(2, 6, 7, 5), (1, 4, 1, 1)])
def test_depthwise_conv_equals_torch_grouped_conv2d(mode, shape):
    ms.set_context(mode=mode)
    try:
        rng = np.random.default_rng(3)
        channels = shape[1]
        conv = DepthwiseConv2d(channels, 3)
        conv.weight.set_data(ms.Tensor(rng.normal(size=(channels, 1, 3, 3)).astype(np.float32)))
        bias = rng.normal(size=channels).astype(np.float32)
        conv.bias.set_data(ms.Tensor(bias))
        x = rng.normal(size=shape).astype(np.float32)
        assert_equals_torch(conv, conv.weight, x, torch_conv(x, conv.weight.asnumpy(), bias, 1, 1, groups=channels))
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)


def test_depthwise_conv_has_the_parameters_of_nn_conv2d():
    mine = DepthwiseConv2d(8, 3)
    theirs = nn.Conv2d(8, 8, 3, pad_mode="pad", padding=1, group=8, has_bias=True)
    assert [(p.name, p.shape) for p in mine.get_parameters()] == [(p.name, p.shape) for p in theirs.get_parameters()]


@pytest.mark.parametrize("mode", [ms.GRAPH_MODE, ms.PYNATIVE_MODE])
@pytest.mark.parametrize("channels, out, kernel, stride, shape, has_bias", [
    (6, 5, 3, 1, (2, 6, 40, 50), True),     # 2,000 output pixels: several im2col blocks per image, over threads
    (6, 5, 3, 2, (1, 6, 13, 16), False),
    (3, 8, 7, 4, (1, 3, 29, 35), True),     # PVT v2's first patch embedding, odd sizes
    (4, 160, 3, 1, (1, 4, 3, 2), True),     # a map smaller than a block: the output channels split over threads
    (4, 3, 3, 2, (2, 4, 1, 1), True),       # RetinaNet's P7 of a small image
])
def test_inference_kernel_equals_torch_conv2d(mode, channels, out, kernel, stride, shape, has_bias):
    """In eval mode a float32 `MatmulConv2d` runs the fused convolution kernel (im2col per block of output rows
    into sgemm); its output and, when a gradient is taken anyway, its gradients are torch's."""
    ms.set_context(mode=mode)
    try:
        rng = np.random.default_rng(3)
        conv = MatmulConv2d(channels, out, kernel, stride=stride, has_bias=has_bias)
        assert conv.fused is not None and not conv.training
        conv.weight.set_data(ms.Tensor(rng.normal(size=(out, channels, kernel, kernel)).astype(np.float32)))
        bias = rng.normal(size=out).astype(np.float32) if has_bias else None
        if has_bias:
            conv.bias.set_data(ms.Tensor(bias))
        x = rng.normal(size=shape).astype(np.float32)
        assert_equals_torch(conv, conv.weight, x, torch_conv(x, conv.weight.asnumpy(), bias, stride, kernel // 2))
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)


@pytest.mark.parametrize("mode", [ms.GRAPH_MODE, ms.PYNATIVE_MODE])
def test_conv_bn_relu_in_eval_mode_folds_the_norm_into_the_kernel(mode):
    """Semantic FPN's conv-BN-ReLU block in eval mode (the norm's moving statistics folded into the convolution,
    the ReLU applied by its kernel) gives torch's conv -> batch_norm (eval) -> relu, and the same gradients."""
    from pvt_dense.segmentation.semfpn_head import ConvBNReLU
    ms.set_context(mode=mode)
    try:
        rng = np.random.default_rng(4)
        block = ConvBNReLU(6, 7)
        block.set_train(False)
        weight = rng.normal(size=(7, 6, 3, 3)).astype(np.float32)
        stats = {name: rng.uniform(0.5, 2.0, size=7).astype(np.float32) for name in ("gamma", "variance")}
        stats.update({name: rng.normal(size=7).astype(np.float32) for name in ("beta", "mean")})
        block.conv.weight.set_data(ms.Tensor(weight))
        for name, param in (("gamma", block.bn.gamma), ("beta", block.bn.beta), ("mean", block.bn.moving_mean),
                            ("variance", block.bn.moving_variance)):
            param.set_data(ms.Tensor(stats[name]))
        x = rng.normal(size=(2, 6, 11, 14)).astype(np.float32)
        x_t, w_t = torch.tensor(x, requires_grad=True), torch.tensor(weight, requires_grad=True)
        out = torch.nn.functional.conv2d(x_t, w_t, None, padding=1)
        out = torch.relu(torch.nn.functional.batch_norm(
            out, torch.tensor(stats["mean"]), torch.tensor(stats["variance"]), torch.tensor(stats["gamma"]),
            torch.tensor(stats["beta"]), training=False, eps=1e-5))
        assert (out.detach().numpy() == 0).mean() > 0.2  # the ReLU has work to do
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        assert_equals_torch(block, block.conv.weight, x, (out.detach().numpy(), x_t.grad.numpy(), w_t.grad.numpy()))
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
