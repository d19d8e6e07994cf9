"""ONNX: exact-equivalent substitutes for what MindSpore 2.10's exporter cannot write (Erf, bilinear resize,
Unstack, Reciprocal, AdaptiveAvgPool2D), applied to a model for one fixed input shape by `make_onnx_exportable`:
GELU as x/2 + |x|/2 erf(|x|/sqrt2) with a rational-exponential erf accurate to 1.5e-7, the position embeddings
resized ahead of time with MindSpore's own bilinear resize (v1), PVT v2 "-li"'s adaptive 7x7 pooling as two
constant matmuls for the fixed grid, and Gather for Unstack."""
import numpy as np
from mindspore import nn, ops


class PolynomialGELU(nn.Cell):
    """Exact (erf) GELU from operators MindSpore's ONNX exporter knows (Abs, Mul, Add, RealDiv, Exp).

    erf(a) for a >= 0 is 1 - t P(t) exp(-a^2), t = 1 / (1 + p a) (Abramowitz & Stegun 7.1.26, |error| <= 1.5e-7),
    and x (1 + erf(x / sqrt 2)) = x + |x| erf(|x| / sqrt 2), so no sign or select is needed. GELU error:
    <= 0.75e-7 |x| + float32 round-off, far inside the 1e-4 parity bound.
    """

    def __init__(self):
        super().__init__()
        self.divide = ops.RealDiv()  # 1 / y would become Reciprocal, which the exporter lacks

    def construct(self, x):
        magnitude = ops.abs(x)
        a = magnitude * 0.7071067811865476
        t = self.divide(ops.ones_like(a), 1.0 + 0.3275911 * a)
        poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
        erf_a = 1.0 - poly * ops.exp(-a * a)
        return 0.5 * (x + magnitude * erf_a)


class SplitPair(nn.Cell):
    """(x[0], x[1]): what ops.Unstack(axis=0) gives for a leading axis of 2, from Gather, which ONNX has."""

    def construct(self, pair):
        return pair[0], pair[1]


def _replace_cells(net, predicate, make):
    for name, cell in list(net.cells_and_names()):
        if name and predicate(cell):
            parent_name, _, attribute = name.rpartition(".")
            parent = net if not parent_name else dict(net.cells_and_names())[parent_name]
            setattr(parent, attribute, make())


def bake_position_embeddings(net, shape):
    """Resize every stage's position embedding to the grid of the fixed input `shape` once, here, with
    MindSpore's bilinear resize, and store the result as the stage's table: the exported graph then needs no
    resize operator (the one ONNX export fails on) and computes the same numbers."""
    from mindspore import Parameter, Tensor
    if not hasattr(net.stages[0], "pos_embed"):
        return  # PVT v2: no position embedding to resize
    spec = net.spec
    height, width = shape[2], shape[3]
    for index, stage in enumerate(net.stages):
        height, width = height // spec.patch_sizes[index], width // spec.patch_sizes[index]
        if (height, width) == (stage.grid_h, stage.grid_w):
            continue
        table = stage.pos_embed
        if stage.with_cls_token:
            resized = ops.concat((table[:, :1], stage.resized_pos_embed(table[:, 1:], height, width)), 1)
        else:
            resized = stage.resized_pos_embed(table, height, width)
        stage.pos_embed = Parameter(Tensor(resized.asnumpy()), name=table.name, requires_grad=False)
        stage.grid_h, stage.grid_w = height, width
    return net


def adaptive_pool_matrix(size_in, size_out):
    """(size_out, size_in) averaging matrix of PyTorch's (and MindSpore's) adaptive average pooling: output i
    averages inputs floor(i * in / out) .. ceil((i + 1) * in / out) - 1."""
    matrix = np.zeros((size_out, size_in), np.float32)
    for i in range(size_out):
        start, end = (i * size_in) // size_out, -(-((i + 1) * size_in) // size_out)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


class FixedGridAveragePool(nn.Cell):
    """AdaptiveAvgPool2d for one known (h, w) input grid as two constant matmuls, P_h x P_w^T: the same averages,
    from MatMul, which ONNX has (MindSpore 2.10 cannot export AdaptiveAvgPool2D)."""

    def __init__(self, grid, output_size):
        from mindspore import Tensor
        super().__init__()
        self.grid = tuple(grid)
        self.rows = Tensor(adaptive_pool_matrix(grid[0], output_size))
        self.columns = Tensor(adaptive_pool_matrix(grid[1], output_size).T.copy())

    def construct(self, x):
        return ops.matmul(ops.matmul(self.rows, x), self.columns)


def fix_linear_attention_pools(net, shape):
    """PVT v2 "-li": each stage's 7x7 adaptive pooling as a `FixedGridAveragePool` for that stage's grid at the
    fixed input `shape`."""
    from ..models.layers_v2 import LINEAR_POOL_SIZE, LinearSpatialReductionAttention
    if not hasattr(net.spec, "stage_grids"):
        return net  # PVT v1: no pooling
    for stage, grid in zip(net.stages, net.spec.stage_grids(shape[2], shape[3])):
        for _, cell in list(stage.cells_and_names()):
            if isinstance(cell, LinearSpatialReductionAttention):
                cell.pool = FixedGridAveragePool(grid, LINEAR_POOL_SIZE)
    return net


def make_onnx_exportable(net, shape):
    """The same model from operators MindSpore can write to ONNX: polynomial exact GELU, Gather instead of
    Unstack, convolutions instead of Im2Col + matmul, position embeddings resized (v1) and linear attention's
    adaptive pooling fixed (v2 "-li") for `shape` ahead of time. Build `net` with MindSpore's own operators
    (`fast_ops.mindspore_ops_only`)."""
    from ..models.conv import DepthwiseConv2d, MatmulConv2d
    from ..models.fast_ops import GELU
    from ..models.layers import SpatialReductionAttention
    _replace_cells(net, lambda cell: isinstance(cell, GELU), PolynomialGELU)
    for _, cell in net.cells_and_names():
        if isinstance(cell, SpatialReductionAttention):
            cell.unstack_kv = SplitPair()
        if isinstance(cell, (MatmulConv2d, DepthwiseConv2d)):
            cell.framework_conv = True
    for _, cell in list(net.cells_and_names()):
        if hasattr(cell, "stages") and hasattr(cell, "spec"):  # the PVT itself, or a detector's backbone
            bake_position_embeddings(cell, shape)
            fix_linear_attention_pools(cell, shape)
    return net
