"""Convolutions computed as matrix products, because MindSpore 2.10's CPU convolutions are slow.

`PatchConv2d`: kernel size == stride, no padding (PVT's patch embeddings and spatial reductions). Each output
pixel is one linear map of one k x k patch, so the whole convolution is a reshape and one matrix product.
Measured on a 2-core AMD EPYC: oneDNN's convolution (implementation "jit_uni_ncsp:conv+ref:any") spent 420 of the
470 ms of a PVT-Tiny 224x224 forward in these 10 convolutions.

`MatmulConv2d`: a k x k convolution computed as MindSpore's Im2Col (`ops.unfold`) and one matrix product.
`DepthwiseConv2d`: PVT v2's depth-wise 3x3 convolution, the same way with one product per channel.

MindSpore 2.10's CPU kernel for 3x3 convolutions is 20-30x slower than PyTorch's on the same machine (measured:
256 -> 256 channels on a 16x24 map, 1.2-1.7 s against 0.07 s; 79 s on RetinaNet's 100x168 P3 map), while its matrix
products and 1x1 convolutions run at full speed. The FPN's output and extra convs, RetinaNet's head and the Semantic
FPN head are all 3x3 convolutions, so they dominated detection and segmentation time. `MatmulConv2d` is an
`nn.Conv2d` (same parameters, names, shapes and init, so checkpoints load unchanged) whose forward multiplies
the weight reshaped to (out, in*k*k) by the Im2Col columns of the input: the same sums in another order (float32
rounding differs at ~1e-6 relative). It costs k*k times the input's memory for the columns while it runs (and,
in training, keeps them for the weight gradient).

Where the CPU kernels are available (float32, strides 1, 2 and 4 with "same" padding) `MatmulConv2d` runs its own
kernels instead (`PvtConv2dStride*` and `PvtConv2dGrad` in kernels/conv.cc): each block of output rows is unfolded
into a per-thread buffer and multiplied by the weight with one sgemm, forward and backward, so the whole columns
never exist and none are kept for the backward. Measured on one thread of a Xeon (AVX-512), forward GFLOP/s: 256
channels at 100x168, 141 (Im2Col + BatchMatMul: 88-108; PyTorch 148); 128 channels at 128x176, 127 (33-36; PyTorch
152). RetinaNet-PVT-Tiny's training step at 800x1216, batch 2 (`tools/benchmark.py --cases det_train`, loaded
machine): peak 13.2 -> 9.1 GB, 38 -> 18 s. Semantic FPN's conv-BN-ReLU blocks in eval mode fold the norm into the
forward kernel and let it apply the ReLU (segmentation/semfpn_head.py). The paragraphs below are about the Im2Col
path, which stays for everything else (PVT_DENSE_FAST_OPS=0, other strides or paddings, other dtypes).

Two other ways were measured and dropped: stacking k*k shifted slices (MindSpore's StridedSlice copies ~60M
elements/s, 0.7 s of PVT v2-B0's forward in its 7x7 patch embedding), and padding with `ops.pad`, whose gradient
hangs in MindSpore 2.10 on 1x1 maps (RetinaNet's P7 for inputs up to 128 px: the second training call never
returns). Im2Col pads by itself.

Memory: MindSpore 2.10's CPU Transpose kernel keeps a table of ~8 bytes per element from graph compilation on, and
an element-wise kernel that broadcasts an input (Add, Mul, ...) ~8 bytes per output element per broadcast input. So
the product is one BatchMatMul against the weight broadcast over the batch (ops.matmul's gradient would transpose
the columns, twice their size in tables per convolution; BatchMatMul's reads its operands transposed in place) and
the bias goes in with BiasAdd: RetinaNet's training step at 400x608 peaked at 8.6 GB before, 5.4 GB
after (`tests/test_matmul_conv.py` bounds both).
"""
import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from .fast_ops import kernels_for_new_cell


class PatchConv2d(nn.Conv2d):
    """nn.Conv2d(in, out, kernel_size=patch, stride=patch, pad_mode="valid", has_bias=True) computed as one matrix
    product over the patches. Same Parameters (`weight` (out, in, k, k), `bias`) as the convolution, so
    checkpoints load unchanged; like PyTorch's convolution, rows and columns past the last whole patch are dropped.

    `construct` maps (B, C, H, W) -> (B, out, H//k, W//k) as the convolution does. `image_to_tokens` and
    `tokens_to_tokens` give the output as tokens (B, h*w, out) straight away, which is the layout PVT wants next,
    so neither side pays a transpose to and from channels-first."""

    def __init__(self, in_channels, out_channels, patch_size, **kwargs):
        if not isinstance(patch_size, int):
            raise ValueError(f"PatchConv2d takes a square int patch_size, got {patch_size!r}")
        super().__init__(in_channels, out_channels, kernel_size=patch_size, stride=patch_size, pad_mode="valid",
                         has_bias=True, **kwargs)
        self.patch = patch_size
        # MindSpore's MatMul (oneDNN's sgemm): as fast here as the fused Dense kernel of fast_ops, and it follows
        # O2 mixed precision, which casts every operator input inside a float16 Cell in PyNative mode.
        self.matmul = ops.MatMul(transpose_b=True)
        self.bias_add = ops.BiasAdd()

    def construct(self, x):
        tokens, height, width = self.image_to_tokens(x)
        batch = tokens.shape[0]
        return tokens.transpose(0, 2, 1).reshape(batch, self.out_channels, height, width)

    def image_to_tokens(self, x):
        """(B, C, H, W) -> tokens (B, h*w, out), h, w."""
        batch, channels, height, width = x.shape
        k = self.patch
        rows, cols = height // k, width // k
        if rows * k != height or cols * k != width:
            x = x[:, :, :rows * k, :cols * k]
        patches = x.reshape(batch, channels, rows, k, cols, k).transpose(0, 2, 4, 1, 3, 5)
        patches = patches.reshape(batch, rows * cols, channels * k * k)
        weight = self.weight.reshape(self.out_channels, channels * k * k)
        return self.project(patches, weight), rows, cols

    def tokens_to_tokens(self, tokens, height, width):
        """Tokens (B, height*width, C) of a row-major grid -> tokens (B, h*w, out) of the reduced grid."""
        batch, _, channels = tokens.shape
        k = self.patch
        rows, cols = height // k, width // k
        grid = tokens.reshape(batch, height, width, channels)
        if rows * k != height or cols * k != width:
            grid = grid[:, :rows * k, :cols * k]
        patches = grid.reshape(batch, rows, k, cols, k, channels).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(batch, rows * cols, k * k * channels)
        # weight (out, in, ky, kx) -> (out, ky, kx, in): the order of a patch's channels-last values
        weight = self.weight.transpose(0, 2, 3, 1).reshape(self.out_channels, k * k * channels)
        return self.project(patches, weight)

    def project(self, patches, weight):
        batch, count, size = patches.shape
        out = self.matmul(patches.reshape(batch * count, size), weight.astype(patches.dtype))
        return self.bias_add(out, self.bias.astype(patches.dtype)).reshape(batch, count, self.out_channels)


class DepthwiseConv2d(nn.Conv2d):
    """nn.Conv2d(channels, channels, k, stride 1, padding k // 2, group=channels, has_bias=True) computed as
    MindSpore's Im2Col (`ops.unfold`) and one batched (1, k*k) x (k*k, H*W) product per channel. oneDNN's grouped
    convolution took ~100 ms for PVT v2-B0's 256-channel 56x56 map; shifted slices instead were ~14 ms each
    (MindSpore's StridedSlice copies ~60M elements/s). Same Parameters as the convolution, so checkpoints load
    unchanged."""

    def __init__(self, channels, kernel_size=3, **kwargs):
        if not isinstance(kernel_size, int) or kernel_size % 2 != 1:
            raise ValueError(f"DepthwiseConv2d takes an odd int kernel_size, got {kernel_size!r}")
        super().__init__(channels, channels, kernel_size, stride=1, pad_mode="pad", padding=kernel_size // 2,
                         group=channels, has_bias=True, **kwargs)
        self.kernel = kernel_size
        # True: MindSpore's convolution itself (ONNX has no Im2Col; `pvt_dense.export.make_onnx_exportable`)
        self.framework_conv = False
        self.bias_add = ops.BiasAdd()

    def construct(self, x):
        if self.framework_conv:
            return super().construct(x)
        batch, channels, height, width = x.shape
        taps = self.kernel * self.kernel
        # (B, C, k*k, H*W): each channel's k*k shifted copies, times that channel's k*k weights
        columns = ops.unfold(x, self.kernel, 1, self.kernel // 2, 1).reshape(batch, channels, taps, height * width)
        out = ops.matmul(self.weight.reshape(channels, 1, taps), columns)
        out = out.reshape(batch, channels, height, width)
        return self.bias_add(out, self.bias)


class MatmulConv2d(nn.Conv2d):
    """nn.Conv2d(in, out, kernel_size, stride, pad_mode="pad", padding=kernel_size // 2 or given, has_bias) with
    PyTorch's semantics (symmetric zero padding, floor output size), computed by im2col + matmul. Groups and
    dilation are not supported (the necks and heads use neither)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=None, has_bias=True, **kwargs):
        if not isinstance(kernel_size, int) or not isinstance(stride, int):
            raise ValueError("MatmulConv2d takes square int kernel_size and stride")
        padding = kernel_size // 2 if padding is None else padding
        if stride > padding + 1:
            raise ValueError(f"MatmulConv2d needs padding >= stride - 1, got stride {stride}, padding {padding}")
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, pad_mode="pad", padding=padding,
                         has_bias=has_bias, **kwargs)
        self.kernel = kernel_size
        self.step = stride
        self.pad_size = padding
        self.with_bias = has_bias
        # True: MindSpore's convolution itself (ONNX has no Im2Col; `pvt_dense.export.make_onnx_exportable`)
        self.framework_conv = False
        self.batch_matmul = ops.BatchMatMul()
        self.bias_add = ops.BiasAdd()
        # One kernel (im2col per block of output rows into sgemm; kernels/conv.cc) forward and backward, so the
        # whole k*k-times-the-input columns are never built (nor kept for the backward, as Im2Col's gradient
        # keeps them). Im2Col + BatchMatMul where the kernels are not available.
        compiled = kernels_for_new_cell()
        self.fused = compiled.conv2d(kernel_size, stride, padding) if compiled is not None else None
        self.fused_meta = Tensor([float(stride), float(padding), 0.0], ms.float32)
        self.zero_bias = None if has_bias else Tensor(np.zeros(out_channels, np.float32))

    def construct(self, x):
        if self.framework_conv:
            return super().construct(x)
        if self.fused is not None and x.dtype == ms.float32:
            bias = self.bias if self.with_bias else self.zero_bias
            return self.fused(x, self.weight, bias, self.fused_meta)
        batch, channels, height, width = x.shape
        kernel, step, pad = self.kernel, self.step, self.pad_size
        out_h = (height + 2 * pad - kernel) // step + 1
        out_w = (width + 2 * pad - kernel) // step + 1
        # (B, C*k*k, out_h*out_w), each column in the weight's (in, ky, kx) order
        columns = ops.unfold(x, kernel, 1, pad, step)
        weight = self.weight.reshape(self.out_channels, channels * kernel * kernel)
        # BatchMatMul and BiasAdd rather than ops.matmul and a broadcasting Add: see "Memory" in the module docstring
        out = self.batch_matmul(ops.broadcast_to(weight, (batch,) + weight.shape), columns)
        if self.with_bias:
            if out_h * out_w > 1:
                out = self.bias_add(out, self.bias)
            else:
                # BiasAddGrad refuses a 3-D (B, C, 1) input (RetinaNet's P7 on small images); a tiny broadcast
                out = out + self.bias.reshape(1, self.out_channels, 1)
        return out.reshape(batch, self.out_channels, out_h, out_w)
