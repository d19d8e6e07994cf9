"""Exact GELU, LayerNorm, Linear, attention and convolution for MindSpore on the CPU, as fused C++ kernels (`ops.Custom`, func_type="aot").

Why: in MindSpore 2.10 graph mode on the CPU, exact (erf) `nn.GELU` becomes Erf, Div, Mul and Add kernels that
take ~45% of the PVT-Tiny forward (batch 8, 224x224: ~290 of ~650 ms of op time); on the stage-1 MLP activation
(25088, 512) it costs ~200 ms where PyTorch's GELU costs ~30 ms. An element-wise composite accurate to 1e-6 needs
about as many passes (one multiply on that tensor: ~10 ms), so it cannot win. One fused pass can: the GELU kernel
below takes ~23 ms there (~11 ms inside the model graph), its backward ~13 ms. `nn.LayerNorm` is already cheap in
a graph's forward; the LayerNorm kernel's gain is in the backward (~7 vs ~78 ms on (8, 3136, 64), op level).

Linear (`Dense`): oneDNN's sgemm from the libdnnl inside MindSpore's CPU wheel, with the bias fused and the rows
split over this library's threads; backward gives dx, dW and db (summed in double) in one kernel. Single-threaded
PVT-Tiny forward CPU time, MatMul + BiasAdd -> this kernel: 117 -> 107 ms at batch 1, 1192 -> 992 ms at batch 8
(224x224). Attention (`PvtAttention`): per head softmax(scale q k^T) v in blocks of 64 query rows with the same
sgemm, so the score matrix is never stored (800x1344 has 67200 x 1050 scores per stage-1 block). It reads q (B, N, C)
and kv (B, M, 2C) as the q and kv Linear layers write them, so no head transpose, key/value split or scaling pass
runs around it. Its backward (`PvtAttentionGrad`) recomputes each block's probabilities the same way and
accumulates dq, dk and dv without an N x M tensor. Single-threaded CPU time vs BatchMatMul + Softmax (before the
token layouts): PVT-Tiny forward 758 -> 702 ms (224x224, batch 8), 3554 -> 3239 ms (800x1344). Without libdnnl
only GELU and LayerNorm are compiled.

Convolution (`PvtConv2dStride1/2/4`, inference): a k x k convolution with "same" padding as im2col per block of
output rows into the same sgemm; `models.conv.MatmulConv2d` runs it in eval mode (see there for the speed) and
Semantic FPN's conv-BN-ReLU folds its norm into it and lets it apply the ReLU. `RunningArgmax`, on the host
through ctypes: the segmentation masks' argmax over class maps.

Accuracy (float32; measured against float64 references, see tests/test_fast_ops.py and tests/test_fast_dense.py):
- GELU(x) = x/2 * erfc(-x/sqrt 2), with erfc(a) = t * exp(-a^2 + P(t)), t = 1/(1 + a/2) and P a degree-9
  polynomial fitted for this file (relative error of erfc ~1e-7 down to the float range). Max abs error 4e-7
  on |x| <= 12 (PyTorch's own CPU GELU: 4e-7), exact 0/x tails, NaN/inf as PyTorch. The gradient
  Phi(x) + x phi(x) has max abs error 2e-7.
- LayerNorm: two-pass mean and biased variance per row, eps inside the square root, as `nn.LayerNorm`.
  The backward recomputes the row statistics instead of storing them and sums dgamma/dbeta in double.

The kernels' sources are `pvt_dense/models/kernels/` (a shared header and one source per kernel family),
compiled into one library in this user's private cache, trusted and loaded by `kernel_library` (which says how)
when the first Cell is built. When the kernels are unavailable for any reason (a library that cannot be built,
trusted or loaded, no compiler, a device target other than CPU, a non-float32 input, or `PVT_DENSE_FAST_OPS=0`),
the Cells fall back to MindSpore's own operators with the same semantics, warning once per process saying why.
Shapes are checked where MindSpore infers them and again in the kernels, so a misuse is an error, never an
out-of-bounds read.

Threads: `PVT_DENSE_NUM_THREADS` (see `kernel_library.default_thread_count`). A graph exported with
`mindspore.export` refers to the compiled library by path: export with `PVT_DENSE_FAST_OPS=0` for a MINDIR that
runs elsewhere.
"""
import contextlib
import ctypes
import os
import platform
import threading
import warnings

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import initializer

from . import kernel_library
from .kernel_library import KernelLibraryError

ENV_SWITCH = "PVT_DENSE_FAST_OPS"
# the strides the convolution kernel has an entry for (PvtConv2dStride1/2/4), each with "same" padding
CONV_STRIDES = (1, 2, 4)


def _known(*shapes):
    return all(all(d >= 0 for d in shape) for shape in shapes)


def _require(ok, kernel, expected, shapes):
    if not ok:
        raise ValueError(f"pvt_dense {kernel} kernel: expected {expected}, got shapes "
                         f"{', '.join(str(tuple(s)) for s in shapes)}")


def _gelu_shape(*shapes):
    return shapes[0]


def _gelu_grad_shape(x, dy):
    _require(not _known(x, dy) or list(x) == list(dy), "GELU backward", "x and dy of one shape", (x, dy))
    return x


def _layer_norm_shape(x, gamma, beta, eps):
    _require(len(x) >= 1, "LayerNorm", "x with at least one axis", (x,))
    if _known(x, gamma, beta):
        _require(list(gamma) == [x[-1]] and list(beta) == [x[-1]], "LayerNorm",
                 "gamma and beta of shape (C,) for x (..., C)", (x, gamma, beta))
    return x


def _layer_norm_grad_shape(x, gamma, dy, eps):
    _require(len(x) >= 1, "LayerNorm backward", "x with at least one axis", (x,))
    if _known(x, gamma, dy):
        _require(list(gamma) == [x[-1]] and list(dy) == list(x), "LayerNorm backward",
                 "gamma (C,) and dy like x (..., C)", (x, gamma, dy))
    return x, gamma, gamma


def _dense_shape(x, w, b):
    _require(len(x) >= 1 and len(w) == 2 and len(b) == 1, "Dense", "x (..., K), weight (N, K), bias (N,)",
             (x, w, b))
    if _known(x, w, b):
        _require(w[1] == x[-1] and b[0] == w[0], "Dense", "x (..., K), weight (N, K), bias (N,)", (x, w, b))
    return list(x[:-1]) + [w[0]]


def _mlp_shape(x, w1, b1, w2, b2):
    _dense_shape(x, w1, b1)
    return _dense_shape(list(x[:-1]) + [w1[0]], w2, b2)


def _dense_grad_shape(x, w, dy):
    _require(len(x) >= 1 and len(w) == 2 and len(dy) == len(x), "Dense backward",
             "x (..., K), weight (N, K), dy (..., N)", (x, w, dy))
    if _known(x, w, dy):
        _require(w[1] == x[-1] and list(dy) == list(x[:-1]) + [w[0]], "Dense backward",
                 "x (..., K), weight (N, K), dy (..., N)", (x, w, dy))
    return x, w, [w[0]]


def _attention_shape(q, kv, meta):
    expected = "q (B, N, C), kv (B, M, 2C) and meta [heads, scale]"
    _require(len(q) == 3 and len(kv) == 3 and len(meta) == 1, "attention", expected, (q, kv, meta))
    if _known(q, kv, meta):
        _require(kv[0] == q[0] and kv[2] == 2 * q[2] and meta[0] == 2, "attention", expected, (q, kv, meta))
    return q


def _attention_bias_shape(q, kv, meta, bias):
    _attention_shape(q, kv, meta)
    _require(len(bias) == 2, "attention", "a key bias (B, M)", (kv, bias))
    if _known(kv, bias):
        _require(list(bias) == [kv[0], kv[1]], "attention", "a key bias (B, M) for kv (B, M, 2C)", (kv, bias))
    return q


def _attention_grad_shape(q, kv, meta, dout):
    _attention_shape(q, kv, meta)
    _require(not _known(q, dout) or list(dout) == list(q), "attention backward", "dout shaped like q", (q, dout))
    return q, kv


def _conv_shape(stride):
    """The shape function of the convolution kernel's entry for `stride`, "same" padding (k odd, pad k // 2)."""
    def shape(x, w, b, meta):
        expected = "x (B, C, H, W), weight (O, C, k, k) with k odd, bias (O) and meta [stride, pad, relu]"
        _require(len(x) == 4 and len(w) == 4 and len(b) == 1 and len(meta) == 1, "convolution", expected,
                 (x, w, b, meta))
        if _known(x, w, b, meta):
            _require(w[1] == x[1] and w[2] == w[3] and w[2] % 2 == 1 and b[0] == w[0] and meta[0] == 3,
                     "convolution", expected, (x, w, b, meta))
        return [x[0], w[0], (x[2] - 1) // stride + 1, (x[3] - 1) // stride + 1]
    return shape


def _conv_bprop(conv_grad, relu):
    """The convolution's gradients from its backward kernel (`PvtConv2dGrad`: per block of output rows, the block's
    columns rebuilt, never those of the whole input); with the ReLU fused the incoming gradient is first zeroed
    where the output is."""

    def bprop(x, w, b, meta, out, dout):
        if relu:
            dout = dout * (out > 0).astype(dout.dtype)
        dx, dw, db = conv_grad(x, w, dout, meta)
        return dx, dw, db, ops.zeros_like(meta)
    return bprop


def _conv_grad_shape(x, w, dy, meta):
    _require(len(x) == 4 and len(w) == 4 and len(dy) == 4 and len(meta) == 1, "convolution backward",
             "x (B, C, H, W), weight (O, C, k, k), dy (B, O, OH, OW) and meta [stride, pad, relu]", (x, w, dy, meta))
    return x, w, [w[0]]


def _focal_loss_shape(logits, labels, meta):
    _require(len(logits) == 3 and len(labels) == 2 and len(meta) == 1 and
             (not _known(logits, labels, meta) or (list(labels) == list(logits[:2]) and list(meta) == [2])),
             "PvtFocalLoss", "logits (B, N, K), labels (B, N), meta (2,)", (logits, labels, meta))
    return list(logits[:2])


def _same_dtype(*dtypes):
    return dtypes[0]


class _Kernels:
    """The Custom primitives, with their bprops, made once per process."""

    def __init__(self, library, has_dense=False, handle=None):
        if ":" in library:
            raise KernelLibraryError(f"the kernel library path must not contain ':' ({library})")
        self.handle = handle  # the ctypes handle: keeps the checked library loaded for MindSpore's own dlopen
        self.library, self.has_dense, self._conv2d, self._conv_grad = library, has_dense, {}, None
        self.threads = None
        if handle is not None:
            handle.PvtSetThreadCount.argtypes = [ctypes.c_int]
            handle.PvtSetThreadCount.restype = ctypes.c_int
            self.threads = handle.PvtSetThreadCount(kernel_library.default_thread_count())
            handle.PvtArgmaxUpdate.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p,
                                               ctypes.c_void_p]
            handle.PvtArgmaxUpdate.restype = ctypes.c_int
        gelu_grad = ops.Custom(f"{library}:PvtGeluGrad", out_shape=_gelu_grad_shape, out_dtype=_same_dtype,
                               func_type="aot")

        def gelu_bprop(x, out, dout):
            return (gelu_grad(x, dout),)

        layer_norm_grad = ops.Custom(f"{library}:PvtLayerNormGrad", out_shape=_layer_norm_grad_shape,
                                     out_dtype=lambda x, g, dy, e: (x, g, g), func_type="aot")

        def layer_norm_bprop(x, gamma, beta, eps, out, dout):
            dx, dgamma, dbeta = layer_norm_grad(x, gamma, dout, eps)
            return dx, dgamma, dbeta, ops.zeros_like(eps)

        self.dense = self.gelu_dense = self.attention = self.attention_bias = self.mlp = None
        if has_dense:
            dense_grad = ops.Custom(f"{library}:PvtDenseGrad", out_shape=_dense_grad_shape,
                                    out_dtype=lambda x, w, dy: (x, w, w), func_type="aot")

            def dense_bprop(x, weight, bias, out, dout):
                return dense_grad(x, weight, dout)

            gelu_dense_grad = ops.Custom(f"{library}:PvtGeluDenseGrad", out_shape=_dense_grad_shape,
                                         out_dtype=lambda h, w, dy: (h, w, w), func_type="aot")

            def gelu_dense_bprop(h, weight, bias, out, dout):
                return gelu_dense_grad(h, weight, dout)

            self.gelu_dense = ops.Custom(f"{library}:PvtGeluDense", out_shape=_dense_shape,
                                         out_dtype=lambda h, w, b: h, func_type="aot", bprop=gelu_dense_bprop)
            attention_grad = ops.Custom(f"{library}:PvtAttentionGrad", out_shape=_attention_grad_shape,
                                        out_dtype=lambda q, kv, meta, dout: (q, kv), func_type="aot")

            def attention_bprop(q, kv, meta, out, dout):
                dq, dkv = attention_grad(q, kv, meta, dout)
                return dq, dkv, ops.zeros_like(meta)

            self.attention = ops.Custom(f"{library}:PvtAttention", out_shape=_attention_shape,
                                        out_dtype=lambda q, kv, meta: q, func_type="aot", bprop=attention_bprop)
            # inference only (size buckets mask padded keys with it): no bprop
            self.attention_bias = ops.Custom(f"{library}:PvtAttentionBias", out_shape=_attention_bias_shape,
                                             out_dtype=lambda q, kv, meta, bias: q, func_type="aot")
            self.dense = ops.Custom(f"{library}:PvtDense", out_shape=_dense_shape,
                                    out_dtype=lambda x, w, b: x, func_type="aot", bprop=dense_bprop)

            def mlp_bprop(x, w1, b1, w2, b2, out, dout):
                hidden = self.dense(x, w1, b1)  # recomputed: the forward keeps no hidden activations
                dh, dw2, db2 = gelu_dense_grad(hidden, w2, dout)
                dx, dw1, db1 = dense_grad(x, w1, dh)
                return dx, dw1, db1, dw2, db2

            # inference (the training step keeps fc1's output for the backward through Dense + GeluDense)
            self.mlp = ops.Custom(f"{library}:PvtMlp", out_shape=_mlp_shape,
                                  out_dtype=lambda x, w1, b1, w2, b2: x, func_type="aot", bprop=mlp_bprop)
        self.gelu = ops.Custom(f"{library}:PvtGelu", out_shape=_gelu_shape, out_dtype=_same_dtype,
                               func_type="aot", bprop=gelu_bprop)
        self.layer_norm = ops.Custom(f"{library}:PvtLayerNorm", out_shape=_layer_norm_shape, out_dtype=_same_dtype,
                                     func_type="aot", bprop=layer_norm_bprop)
        focal_loss_grad = ops.Custom(f"{library}:PvtFocalLossGrad", out_shape=lambda x, labels, meta, dy: x,
                                     out_dtype=lambda x, labels, meta, dy: x, func_type="aot")

        def focal_loss_bprop(logits, labels, meta, out, dout):
            return focal_loss_grad(logits, labels, meta, dout), ops.zeros_like(labels), ops.zeros_like(meta)

        # RetinaNet's focal loss per anchor: logits (B, N, K), target class (B, N; -1 none), [alpha, gamma].
        self.focal_loss = ops.Custom(f"{library}:PvtFocalLoss", out_shape=_focal_loss_shape,
                                     out_dtype=lambda x, labels, meta: x, func_type="aot", bprop=focal_loss_bprop)
        # The training step's gradients in, [global norm, all finite] out (no bprop: never differentiated).
        self.global_norm = ops.Custom(f"{library}:PvtGlobalNorm", out_shape=lambda *shapes: [2],
                                      out_dtype=lambda *dtypes: ms.float32, func_type="aot")


    def conv2d(self, kernel_size, stride, pad, relu=False):
        """The convolution kernel for a k x k convolution with this stride and padding (and a ReLU on its output
        when `relu`: pass meta[2] = 1 then), or None where it has no entry (strides other than CONV_STRIDES,
        padding other than k // 2 with k odd) or no sgemm. One primitive per (stride, relu), made once; all share
        one kernel name per stride, whose output shape is the same with or without the ReLU. Its gradient is the
        backward kernel's (`PvtConv2dGrad`)."""
        if not self.has_dense or stride not in CONV_STRIDES or kernel_size % 2 != 1 or pad != kernel_size // 2:
            return None
        key = (stride, bool(relu))
        if self._conv_grad is None:
            self._conv_grad = ops.Custom(f"{self.library}:PvtConv2dGrad", out_shape=_conv_grad_shape,
                                         out_dtype=lambda x, w, dy, meta: (x, w, w), func_type="aot")
        if key not in self._conv2d:
            self._conv2d[key] = ops.Custom(f"{self.library}:PvtConv2dStride{stride}", out_shape=_conv_shape(stride),
                                           out_dtype=lambda x, w, b, meta: x, func_type="aot",
                                           bprop=_conv_bprop(self._conv_grad, relu))
        return self._conv2d[key]


_LOCK = threading.Lock()
_STATE = {}


def kernels():
    """The compiled kernels, or None (with one warning per process saying why) when they cannot be used."""
    with _LOCK:
        if "kernels" not in _STATE:
            _STATE["kernels"], _STATE["reason"] = None, None
            if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
                _STATE["reason"] = f"disabled by {ENV_SWITCH}"
            elif platform.system() != "Linux":
                _STATE["reason"] = "MindSpore's aot Custom ops need Linux"
            else:
                try:
                    _STATE["kernels"] = _Kernels(*kernel_library.build_library())
                except Exception as err:  # any failure here must only cost speed, never the model
                    _STATE["kernels"] = None
                    _STATE["reason"] = f"{type(err).__name__}: {err}"
                    warnings.warn(f"pvt_dense fast GELU/LayerNorm kernels unavailable, using MindSpore's "
                                  f"operators (slower, same results): {_STATE['reason']}", RuntimeWarning,
                                  stacklevel=3)
        return _STATE["kernels"]


_FORCED_OFF = []


@contextlib.contextmanager
def mindspore_ops_only():
    """Cells built inside this block use MindSpore's own operators, whatever the kernels' availability.

    For `mindspore.export`: a graph with the Custom kernels names this machine's compiled library by path, so a
    MINDIR exported from it would not run anywhere else.
    """
    _FORCED_OFF.append(True)
    try:
        yield
    finally:
        _FORCED_OFF.pop()


def kernels_for_new_cell():
    """The kernels a Cell being built now should use: None on a non-CPU target or inside `mindspore_ops_only`."""
    if _FORCED_OFF or ms.get_context("device_target") != "CPU":
        return None
    return kernels()


class RunningArgmax:
    """The argmax over channels of (H, W) float32 maps given one channel at a time (`add(plane)`, channels 0, 1, ...
    in order); `index` (int32) is numpy's argmax(axis=0) of the stacked maps: the first index on ties, NaN the
    largest. Through the kernel library when it is loaded, else numpy."""

    def __init__(self, shape):
        self.best = np.empty(shape, np.float32)
        self.index = np.zeros(shape, np.int32)
        self.count = 0
        compiled = kernels()
        self.handle = compiled.handle if compiled is not None else None

    def add(self, plane):
        plane = np.ascontiguousarray(plane, dtype=np.float32)
        if plane.shape != self.best.shape:
            raise ValueError(f"RunningArgmax: a map of shape {plane.shape}, expected {self.best.shape}")
        if self.handle is None or self.handle.PvtArgmaxUpdate(plane.ctypes.data, self.count, plane.size,
                                                              self.best.ctypes.data, self.index.ctypes.data) != 0:
            if self.count == 0:
                self.best[...] = plane
            else:
                take = ((plane > self.best) | np.isnan(plane)) & ~np.isnan(self.best)
                self.best[take] = plane[take]
                self.index[take] = self.count
        self.count += 1


def fast_ops_status():
    """(available, reason): whether the CPU kernels are in use and, if not, why."""
    available = kernels() is not None
    return available, _STATE.get("reason")


class GELU(nn.Cell):
    """Exact (erf) GELU, elementwise: a drop-in for `nn.GELU(approximate=False)`.

    Input and output: a float tensor of any shape. float32 on the CPU runs the fused kernel; anything else runs
    `nn.GELU(approximate=False)`.
    """

    def __init__(self):
        super().__init__()
        compiled = kernels_for_new_cell()
        self.use_kernel = compiled is not None
        self.kernel = compiled.gelu if self.use_kernel else None
        self.fallback = nn.GELU(approximate=False)

    def construct(self, x):
        if self.use_kernel and x.dtype == ms.float32:
            return self.kernel(x)
        return self.fallback(x)


class LayerNorm(nn.Cell):
    """LayerNorm over the last axis: a drop-in for `nn.LayerNorm((channels,), epsilon=eps)`.

    Same semantics (biased variance, eps inside the square root) and the same float32 Parameters, `gamma` (ones)
    and `beta` (zeros), so checkpoints written with either load into the other.

    Input (..., channels); output the same shape.
    """

    def __init__(self, channels, eps=1e-5):
        super().__init__()
        self.channels = int(channels)
        self.eps = float(eps)
        self.gamma = Parameter(initializer("ones", (self.channels,), ms.float32), name="gamma")
        self.beta = Parameter(initializer("zeros", (self.channels,), ms.float32), name="beta")
        compiled = kernels_for_new_cell()
        self.use_kernel = compiled is not None
        self.kernel = compiled.layer_norm if self.use_kernel else None
        self.eps_tensor = Tensor([self.eps], ms.float32)
        self.fallback = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=self.eps)

    def construct(self, x):
        if self.use_kernel and x.dtype == ms.float32:
            return self.kernel(x, self.gamma, self.beta, self.eps_tensor)
        y, _, _ = self.fallback(x, self.gamma.astype(x.dtype), self.beta.astype(x.dtype))
        return y

    def extend_repr(self):
        return f"channels={self.channels}, eps={self.eps}, kernel={self.use_kernel}"


class Dense(nn.Cell):
    """y = x W^T + b over the last axis: a drop-in for `nn.Dense(in_channels, out_channels, has_bias=True)`.

    Same float32 Parameters, `weight` (out, in) and `bias` (out,), so checkpoints of either load into the other.
    float32 on the CPU runs one kernel per call (oneDNN's sgemm from MindSpore's own libdnnl, split over this
    library's threads, with the bias fused; backward likewise); anything else runs MatMul + BiasAdd.

    Input (..., in_channels); output (..., out_channels).
    """

    def __init__(self, in_channels, out_channels, weight_init="normal", bias_init="zeros"):
        super().__init__()
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.weight = Parameter(initializer(weight_init, (self.out_channels, self.in_channels), ms.float32),
                                name="weight")
        self.bias = Parameter(initializer(bias_init, (self.out_channels,), ms.float32), name="bias")
        compiled = kernels_for_new_cell()
        self.use_kernel = compiled is not None and compiled.dense is not None
        self.kernel = compiled.dense if self.use_kernel else None
        self.matmul = ops.MatMul(transpose_b=True)
        self.bias_add = ops.BiasAdd()

    def construct(self, x):
        if self.use_kernel and x.dtype == ms.float32:
            return self.kernel(x, self.weight, self.bias)
        out_shape = x.shape[:-1] + (self.out_channels,)
        y = self.matmul(x.reshape(-1, self.in_channels), self.weight.astype(x.dtype))
        return self.bias_add(y, self.bias.astype(x.dtype)).reshape(out_shape)

    def extend_repr(self):
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}, kernel={self.use_kernel}"


# Cells that stay in float32 under O2: MindSpore's own black list (BatchNorm, nn.LayerNorm) knows nothing of these
# Cells, so `auto_mixed_precision(net, "O2")` would cast them to float16, where they leave the fused kernels for
# MindSpore's float16 LayerNorm and GELU (a LayerNorm over float16 statistics is what O2 exists to avoid).
FLOAT32_UNDER_O2 = (LayerNorm, GELU)


def mixed_precision(network, amp_level):
    """`mindspore.amp.auto_mixed_precision(network, amp_level)`, except that O2 also keeps this module's LayerNorm
    and GELU in float32 (their outputs cast back to float16, as MindSpore does for its black list). Modifies
    `network` in place; returns the Cell to call (O2/O3 wrap it so its outputs are float32)."""
    if amp_level == "O2":
        black_list = ms.amp.get_black_list() + list(FLOAT32_UNDER_O2)
        return ms.amp.custom_mixed_precision(network, black_list=black_list)
    return ms.amp.auto_mixed_precision(network, amp_level)
