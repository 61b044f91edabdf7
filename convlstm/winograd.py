"""3x3 convolutions by Winograd's minimal filtering F(4x4, 3x3): fewer multiplications.

A direct 3x3 convolution spends 9 multiply-adds per output pixel and channel pair. F(4x4, 3x3)
cuts the (zero-padded) input into overlapping 6x6 tiles (stride 4), maps each tile and each
3x3 filter into a 6x6 "Winograd domain", multiplies there elementwise (36 products per 16
outputs: 2.25 per output), and maps the products back to 4x4 output tiles (Lavin and Gray,
2016). Summed over input channels, the elementwise products are 36 independent matrix
products, one per tile position: (tiles, C_in) @ (C_in, C_out). On a CPU, where a training
step is bound by the convolutions' arithmetic, that is the only way to be much faster than
the direct convolution; the transforms are small matrix products of their own.

The result equals the direct convolution in exact arithmetic (float64 agrees to about 1e-13);
in float32 the transforms cost about one more decimal digit (relative error about 1e-5
instead of 1e-6). The backward pass is written by hand in the same domain: the input
gradient by the transposed transforms, the filter gradient in the Winograd domain (mapped
back to the 3x3 filter by autograd through `transform_weight`).

The four tile transforms (input tiles, products back to outputs, and their transposes for
the backward) run as C kernels, one pass each (convlstm/tiles.c, compiled on first use by
convlstm.native), for float32 and float64 CPU tensors. In PyTorch each is two small matrix
products plus the copies that cut out tiles and put them back: about 45% of a Winograd
convolution at batch 16, where the C kernels take about 20%. Without a C compiler, and on
other devices and dtypes, the PyTorch code below runs instead (tested equal).

    v = transform_weight(weight)        # (36, C_in, C_out), once per sequence
    y = winograd_conv3x3(x, v)          # = F.conv2d(x, weight, padding=1), x (N, C_in, H, W)
"""

from __future__ import annotations

import ctypes
import functools

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from convlstm import native
from convlstm.wgrad import StepTape, refuse_second_order, share

M, R = 4, 3  # output tile, filter size
A = M + R - 1  # input tile: 6

# F(4, 3) with interpolation points 0, 1, -1, 2, -2 and infinity (Lavin and Gray, 2016).
_BT = [
    [4, 0, -5, 0, 1, 0],
    [0, -4, -4, 1, 1, 0],
    [0, 4, -4, -1, 1, 0],
    [0, -2, -1, 2, 1, 0],
    [0, 2, -1, -2, 1, 0],
    [0, 4, 0, -5, 0, 1],
]
_G = [
    [1 / 4, 0, 0],
    [-1 / 6, -1 / 6, -1 / 6],
    [-1 / 6, 1 / 6, -1 / 6],
    [1 / 24, 1 / 12, 1 / 6],
    [1 / 24, -1 / 12, 1 / 6],
    [0, 0, 1],
]
_AT = [
    [1, 1, 1, 1, 1, 0],
    [0, 1, -1, 2, -2, 0],
    [0, 1, 1, 4, 4, 0],
    [0, 1, -1, 8, -8, 1],
]


@functools.cache
def _matrices(dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """The 1-D transforms B^T (6, 6), G (6, 3), A^T (4, 6) in `dtype` (exact in binary but for
    G's sixths and twelfths, rounded once)."""

    def matrix(rows) -> Tensor:
        return torch.tensor(rows, dtype=torch.float64).to(dtype=dtype, device=device)

    with torch.inference_mode(False):  # cached: must stay usable outside inference mode
        return matrix(_BT), matrix(_G), matrix(_AT)


def _both_axes(m: Tensor, t: Tensor) -> Tensor:
    """t (k, k, rest) -> m t m^T over the two leading axes: (j, j, rest) for m (j, k); two
    matrix products, no copies between them."""
    k, rest = t.shape[0], t.shape[2:]
    first = (m @ t.reshape(k, -1)).view(m.shape[0], k, -1)  # over axis 0
    return torch.matmul(m, first).view(m.shape[0], m.shape[0], *rest)  # over axis 1


def transform_weight(weight: Tensor) -> Tensor:
    """3x3 filters (C_out, C_in, 3, 3) -> the Winograd domain (36, C_in, C_out); differentiable."""
    if weight.dim() != 4 or weight.shape[-2:] != (R, R):
        raise ValueError(f"transform_weight takes (C_out, C_in, 3, 3), got {tuple(weight.shape)}")
    _, g, _ = _matrices(weight.dtype, weight.device)
    c_out, c_in = weight.shape[:2]
    return _both_axes(g, weight.permute(2, 3, 1, 0)).reshape(A * A, c_in, c_out)


def _tiles(shape: tuple[int, ...]) -> tuple[int, int]:
    h, w = shape[-2:]
    return -(-h // M), -(-w // M)


_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


@functools.cache
def _c_function(name: str, suffix: str):
    lib = native.load("tiles")
    if lib is None:
        return None
    fn = getattr(lib, f"{name}_{suffix}")
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_long] * 4
    fn.restype = ctypes.c_int
    return fn


def _kernel(name: str, t: Tensor):
    """convlstm/tiles.c's `name` for t's dtype, or None: then the PyTorch code below runs
    (other devices and dtypes, no C compiler)."""
    if t.device.type != "cpu" or t.dtype not in _SUFFIX:
        return None
    return _c_function(name, _SUFFIX[t.dtype])


def _run(fn, src: Tensor, dst: Tensor, n: int, h: int, w: int, c: int) -> None:
    if fn(src.data_ptr(), dst.data_ptr(), n, h, w, c) != 0:
        raise MemoryError("winograd: the C tile transform could not allocate its scratch")


def _in_c(name, src: Tensor, shape, n, h, w, c, dense=Tensor.contiguous) -> Tensor | None:
    """tiles.c's `name` from `src` (made dense by `dense`) into a new tensor of `shape`, or
    None where there is no C kernel for src (the caller's PyTorch code runs then)."""
    fn = _kernel(name, src)
    if fn is None:
        return None
    out = src.new_empty(shape)
    _run(fn, dense(src), out, n, h, w, c)
    return out


def _nhwc(x: Tensor) -> Tensor:
    """(N, C, H, W) -> its dense NHWC storage (a view for channels-last tensors)."""
    return x.permute(0, 2, 3, 1).contiguous()


def _input_tiles(x: Tensor) -> Tensor:
    """x (N, C, H, W) -> the Winograd-domain input (36, N*th*tw, C)."""
    n, c, h, w = x.shape
    th, tw = _tiles(x.shape)
    u = _in_c("input_tiles", x, (A * A, n * th * tw, c), n, h, w, c, dense=_nhwc)
    if u is not None:
        return u
    padded = F.pad(x, (1, tw * M + 1 - w, 1, th * M + 1 - h))  # (N, C, th*4 + 2, tw*4 + 2)
    s = padded.stride()
    tiles = padded.as_strided(
        (A, A, n, th, tw, c), (s[2], s[3], s[0], M * s[2], M * s[3], s[1])
    ).reshape(A, A, -1)  # (6, 6, N*th*tw*C), one copy
    b, _, _ = _matrices(x.dtype, x.device)
    return _both_axes(b, tiles).view(A * A, n * th * tw, c)


def _output_from(m: Tensor, n: int, h: int, w: int) -> Tensor:
    """Winograd-domain products (36, N*th*tw, C_out) -> y (N, C_out, H, W), channels-last."""
    c_out = m.shape[-1]
    y = _in_c("output_from", m, (n, h, w, c_out), n, h, w, c_out)
    if y is not None:
        return y.permute(0, 3, 1, 2)
    _, _, at = _matrices(m.dtype, m.device)
    th, tw = _tiles((h, w))
    y = _both_axes(at, m.reshape(A, A, -1)).view(M, M, n, th, tw, c_out)
    y = y.permute(2, 3, 0, 4, 1, 5).reshape(n, th * M, tw * M, c_out)  # NHWC, one copy
    return y[:, :h, :w].permute(0, 3, 1, 2)


def _grad_tiles(grad: Tensor) -> Tensor:
    """dL/dy (N, C_out, H, W) -> dL/d(products) (36, N*th*tw, C_out): the output map's
    transpose."""
    n, c_out, h, w = grad.shape
    th, tw = _tiles(grad.shape)
    dm = _in_c("grad_tiles", grad, (A * A, n * th * tw, c_out), n, h, w, c_out, dense=_nhwc)
    if dm is not None:
        return dm
    g = grad.permute(0, 2, 3, 1)  # NHWC view (a copy below unless channels-last already)
    if (th * M, tw * M) != (h, w):
        g = F.pad(g, (0, 0, 0, tw * M - w, 0, th * M - h))
    g = g.reshape(n, th, M, tw, M, c_out).permute(2, 4, 0, 1, 3, 5).reshape(M, M, -1)
    _, _, at = _matrices(grad.dtype, grad.device)
    return _both_axes(at.t(), g).view(A * A, n * th * tw, c_out)


def _input_grad(du: Tensor, shape: tuple[int, ...]) -> Tensor:
    """dL/d(input tiles) (36, N*th*tw, C) -> dL/dx (N, C, H, W): the input map's transpose,
    overlapping tiles summed (fold)."""
    n, c, h, w = shape
    th, tw = _tiles(shape)
    dx = _in_c("input_grad", du, (n, h, w, c), n, h, w, c)
    if dx is not None:
        return dx.permute(0, 3, 1, 2)
    b, _, _ = _matrices(du.dtype, du.device)
    dt = _both_axes(b.t(), du.reshape(A, A, -1)).view(A, A, n, th, tw, c)
    # overlap-add of the 6-row tiles at stride 4, one axis at a time: rows 0-3 of tile t land
    # on 4t..4t+3, rows 4-5 on the next tile's first two
    rows = dt.new_zeros(th + 1, M, A, n, tw, c)
    rows[:th] = dt[:M].permute(3, 0, 1, 2, 4, 5)
    rows[1:, : A - M] += dt[M:].permute(3, 0, 1, 2, 4, 5)
    rows = rows.view((th + 1) * M, A, n, tw, c)  # (padded rows, tile cols, N, tw, C)
    cols = rows.new_zeros(tw + 1, M, (th + 1) * M, n, c)
    cols[:tw] = rows[:, :M].permute(3, 1, 0, 2, 4)
    cols[1:, : A - M] += rows[:, M:].permute(3, 1, 0, 2, 4)
    padded = cols.view((tw + 1) * M, (th + 1) * M, n, c)  # (W, H, N, C)
    return padded[1 : w + 1, 1 : h + 1].permute(2, 3, 1, 0)


def _fold_filter_grad(total: Tensor | None, u: Tensor, dm: Tensor) -> Tensor:
    """One step's dL/dv = u^T dm, added in place into the sequence's total."""
    if total is None:
        return torch.bmm(u.transpose(1, 2), dm)
    return total.baddbmm_(u.transpose(1, 2), dm)


def _filter_grad(tape: StepTape, v: Tensor) -> tuple[Tensor | None]:
    """dL/dv over all the steps of a sequence, folded as backward met them."""
    return (tape.take_total(),)


class _WinogradConv(Function):
    @staticmethod
    def forward(ctx, x: Tensor, v: Tensor, tape: StepTape | None) -> Tensor:
        u = _input_tiles(x)
        ctx.save_for_backward(u, v)
        ctx.shape = tuple(x.shape)
        ctx.tape = tape
        ctx.head = v.grad_fn if tape is not None else None
        return _output_from(torch.bmm(u, v), x.shape[0], x.shape[2], x.shape[3])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        refuse_second_order(grad, "winograd")
        u, v = ctx.saved_tensors
        dm = _grad_tiles(grad)
        dx = dv = None
        if ctx.needs_input_grad[0]:
            dx = _input_grad(torch.bmm(dm, v.transpose(1, 2)), ctx.shape)
        if ctx.tape is not None:
            ctx.tape.keep(ctx.head, u, dm)  # folded into the filter gradient
        elif ctx.needs_input_grad[1]:
            dv = torch.bmm(u.transpose(1, 2), dm)
        return dx, dv, None


def _check(x: Tensor, v: Tensor) -> None:
    if x.dim() != 4 or v.dim() != 3 or v.shape[0] != A * A or x.shape[1] != v.shape[1]:
        raise ValueError(
            f"winograd_conv3x3 takes x (N, C_in, H, W) and v (36, C_in, C_out), got "
            f"{tuple(x.shape)} and {tuple(v.shape)}"
        )


def winograd_conv3x3(x: Tensor, v: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.conv2d(x, weight, bias, padding=1) for v = transform_weight(weight); x (N, C_in, H,
    W) of v's dtype; returns (N, C_out, H, W) in channels-last memory format."""
    _check(x, v)
    y = _WinogradConv.apply(x, v, None)
    return y if bias is None else y + bias.view(1, -1, 1, 1)


class WinogradSequence:
    """x -> F.conv2d(x, weight, bias, padding=1) for the steps of one sequence. The filter is
    transformed once (in the weight's dtype; inputs are cast to it; meant for float32 and
    float64, not autocast). With batch_grad, while grad is enabled, each step's filter
    gradient is added in place into one total as backward meets the step, and the total is
    handed to autograd once, when backward reaches the filter: no per-step gradient tensor
    and no sum of them. (Stacking all the steps' tiles for one product instead measured
    slower: the concatenation costs more than the product saves.)"""

    def __init__(self, weight: Tensor, bias: Tensor | None, batch_grad: bool = True) -> None:
        v = transform_weight(weight)
        self.tape = None
        if batch_grad and torch.is_grad_enabled() and v.requires_grad:
            self.tape = StepTape(_filter_grad, fold=_fold_filter_grad)
            (v,) = share(self.tape, v)
        self.v, self.bias = v, bias

    def __call__(self, x: Tensor) -> Tensor:
        x = x.to(self.v.dtype)
        _check(x, self.v)
        y = _WinogradConv.apply(x, self.v, self.tape)
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)
