"""A k x k convolution computed as one matrix product over the k*k shifted views of the padded input (im2col).

MindSpore 2.10's CPU kernel for 3x3 convolutions is 20-30x slower than PyTorch's on the same machine (measured:
256 -> 256 channels on a 16x24 map, 1.2-1.7 s against 0.07 s; 79 s on RetinaNet's 100x168 P3 map), while its matrix
products and 1x1 convolutions run at full speed. The FPN's output and extra convs, RetinaNet's head and the Semantic
FPN head are all 3x3 convolutions, so they dominated detection and segmentation time. `MatmulConv2d` is an
`nn.Conv2d` (same parameters, names, shapes and init, so checkpoints load unchanged) whose forward stacks the k*k
strided views of the zero-padded input along the channels and multiplies by the weight reshaped to
(out, k*k*in): the same sums in another order (float32 rounding differs at ~1e-6 relative). It costs k*k times the
input's memory for the stacked views while it runs. Inference only: in training mode it is MindSpore's convolution.
"""
from mindspore import nn, ops


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

    def construct(self, x):
        if self.training:
            # Training keeps MindSpore's convolution: with the im2col form in its graph, a 64x64 RetinaNet training
            # run (50 steps, 23 s with nn.Conv2d) did not finish its first steps in 100 s.
            return super().construct(x)
        batch, channels, height, width = x.shape
        kernel, step, pad = self.kernel, self.step, self.pad_size
        out_h = (height + 2 * pad - kernel) // step + 1
        out_w = (width + 2 * pad - kernel) // step + 1
        if step == 1:
            if pad > 0:
                x = ops.pad(x, (pad, pad, pad, pad))
            views = ()
            for dy in range(kernel):
                for dx in range(kernel):
                    views = views + (x[:, :, dy:dy + out_h, dx:dx + out_w],)
        else:
            # Strided slices have a broken gradient in graph mode (StridedSliceGrad "input memory out of bounds"):
            # split each axis into (position, phase) instead, so every tap is a phase and a step-1 window.
            rows = -(-(kernel + step * (out_h - 1)) // step) * step
            cols = -(-(kernel + step * (out_w - 1)) // step) * step
            x = ops.pad(x, (pad, cols - width - pad, pad, rows - height - pad))
            x = x.reshape(batch, channels, rows // step, step, cols // step, step)
            views = ()
            for dy in range(kernel):
                for dx in range(kernel):
                    views = views + (x[:, :, dy // step:dy // step + out_h, dy % step,
                                       dx // step:dx // step + out_w, dx % step],)
        columns = ops.concat(views, 1).reshape(batch, kernel * kernel * channels, out_h * out_w)
        # weight (out, in, ky, kx) -> (out, ky, kx, in): the order of the stacked views
        weight = self.weight.transpose(0, 2, 3, 1).reshape(self.out_channels, kernel * kernel * channels)
        out = ops.matmul(weight, columns)
        if self.with_bias:
            out = out + self.bias.reshape(1, self.out_channels, 1)
        return out.reshape(batch, self.out_channels, out_h, out_w)
