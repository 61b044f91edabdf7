"""3x3 and 5x5 convolutions by Winograd's minimal filtering F(4x4, 3x3) and F(2x2, 5x5).

A direct 3x3 convolution spends 9 multiply-adds per output pixel and channel pair, a 5x5 one
25. Winograd's algorithm cuts the (zero-padded) input into overlapping 6x6 tiles (stride 4
for 3x3 filters, 2 for 5x5), maps each tile and each filter into a 6x6 "Winograd domain",
multiplies there elementwise, and maps the products back to output tiles (4x4 or 2x2; Lavin
and Gray, 2016): 36 products per 16 outputs (2.25 per output, against 9) for 3x3 filters,
36 per 4 (9 per output, against 25) for 5x5. Both use the interpolation points 0, 1, -1, 2,
-2 and infinity, so they share the input transform. Summed over input channels, the
elementwise products are 36 independent matrix products, one per tile position: (tiles,
C_in) @ (C_in, C_out). On a CPU, where a training step is bound by the convolutions'
arithmetic, that is the only way to be much faster than the direct convolution; the
transforms are small matrix products of their own.

The result equals the direct convolution in exact arithmetic (float64 agrees to about 1e-13);
in float32 the transforms cost about one more decimal digit (relative error about 1e-5
instead of 1e-6). The backward pass is written by hand in the same domain: the input
gradient by the transposed transforms, the filter gradient in the Winograd domain (mapped
back to the filter by autograd through `transform_weight`).

The four tile transforms (input tiles, products back to outputs, and their transposes for
the backward) run as C kernels, one pass each (convlstm/tiles.c, compiled on first use by
convlstm.native), for float32 and float64 CPU tensors. In PyTorch each is two small matrix
products plus the copies that cut out tiles and put them back: about 45% of a 3x3 Winograd
convolution at batch 16, where the C kernels take about 20%. Without a C compiler, and on
other devices and dtypes, the PyTorch code below runs instead (tested equal).

    v = transform_weight(weight)        # (36, C_in, C_out), once per sequence
    y = winograd_conv(x, v, 3)          # = F.conv2d(x, weight, padding=1), x (N, C_in, H, W)
"""

from __future__ import annotations

import ctypes
import functools

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function
from torch.autograd.function import once_differentiable
from torch.utils.weak import WeakIdKeyDictionary

from convlstm import native
from convlstm.wgrad import StepTape, refuse_second_order, share

A = 6  # input tile, for both filter sizes
KERNEL_SIZES = (3, 5)
_OUTPUT_TILE = {3: 4, 5: 2}  # filter size r -> output tile m = A - r + 1

# Points 0, 1, -1, 2, -2 and infinity (Lavin and Gray, 2016). B^T depends only on the points;
# G's row for point p is s_p (1, p, .., p^(r-1)) with the scales s_p below (infinity: the
# filter's last tap); A^T's row i is (p^i for the points), with a 1 at infinity in the last.
_BT = [
    [4, 0, -5, 0, 1, 0],
    [0, -4, -4, 1, 1, 0],
    [0, 4, -4, -1, 1, 0],
    [0, -2, -1, 2, 1, 0],
    [0, 2, -1, -2, 1, 0],
    [0, 4, 0, -5, 0, 1],
]
_POINTS = (0, 1, -1, 2, -2)
_SCALES = (1 / 4, -1 / 6, -1 / 6, 1 / 24, 1 / 24)


def _g_rows(r: int) -> list[list[float]]:
    rows = [[s * p**j for j in range(r)] for s, p in zip(_SCALES, _POINTS, strict=True)]
    return rows + [[0] * (r - 1) + [1]]


def _at_rows(m: int) -> list[list[int]]:
    return [[p**i for p in _POINTS] + [int(i == m - 1)] for i in range(m)]


@functools.cache
def _matrices(dtype: torch.dtype, device: torch.device, r: int = 3) -> tuple[Tensor, ...]:
    """The 1-D transforms of F(m, r): B^T (6, 6), G (6, r), A^T (m, 6) in `dtype` (exact in
    binary but for G's sixths and twelfths, rounded once)."""

    def matrix(rows) -> Tensor:
        return torch.tensor(rows, dtype=torch.float64).to(dtype=dtype, device=device)

    with torch.inference_mode(False):  # cached: must stay usable outside inference mode
        return matrix(_BT), matrix(_g_rows(r)), matrix(_at_rows(_OUTPUT_TILE[r]))


def _both_axes(m: Tensor, t: Tensor) -> Tensor:
    """t (k, k, rest) -> m t m^T over the two leading axes: (j, j, rest) for m (j, k); two
    matrix products, no copies between them."""
    k, rest = t.shape[0], t.shape[2:]
    first = (m @ t.reshape(k, -1)).view(m.shape[0], k, -1)  # over axis 0
    return torch.matmul(m, first).view(m.shape[0], m.shape[0], *rest)  # over axis 1


def transform_weight(weight: Tensor) -> Tensor:
    """3x3 or 5x5 filters (C_out, C_in, r, r) -> the Winograd domain (36, C_in, C_out);
    differentiable."""
    if (
        weight.dim() != 4
        or weight.shape[-1] != weight.shape[-2]
        or weight.shape[-1] not in (KERNEL_SIZES)
    ):
        raise ValueError(
            f"transform_weight takes (C_out, C_in, r, r) with r 3 or 5, got {tuple(weight.shape)}"
        )
    _, g, _ = _matrices(weight.dtype, weight.device, weight.shape[-1])
    c_out, c_in = weight.shape[:2]
    return _both_axes(g, weight.permute(2, 3, 1, 0)).reshape(A * A, c_in, c_out)


# weight -> ((storage pointer, version counter, dtype, shape, device), transform_weight(weight))
_KEPT = WeakIdKeyDictionary()  # by identity: a tensor's == is elementwise


def kept_transform(weight: Tensor) -> Tensor:
    """transform_weight(weight) for inference, without autograd: made once and kept (for as
    long as `weight` lives) while the weight is unchanged, so that a model run one step at a
    time does not transform its filters at every step. Unchanged means the same tensor, the
    same storage and the same version counter, which every in-place change bumps (optimizer
    steps, load_state_dict, copy_, nn.init), but not one made through `weight.data`, which
    has a version counter of its own. Costs the transformed filters' memory (36 / r^2 of the
    weight's: 1.44x for 5x5, 4x for 3x3)."""
    state = (weight.data_ptr(), weight._version, weight.dtype, weight.shape, weight.device)
    kept = _KEPT.get(weight)
    if kept is not None and kept[0] == state:
        return kept[1]
    with torch.no_grad():
        v = transform_weight(weight)
    _KEPT[weight] = (state, v)
    return v


def _tiles(shape: tuple[int, ...], m: int) -> tuple[int, int]:
    h, w = shape[-2:]
    return -(-h // m), -(-w // m)


_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


@functools.cache
def _c_function(name: str, suffix: str):
    lib = native.load("tiles")
    if lib is None:
        return None
    fn = getattr(lib, f"{name}_{suffix}")
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_long] * 5
    fn.restype = ctypes.c_int
    return fn


def _kernel(name: str, t: Tensor):
    """convlstm/tiles.c's `name` for t's dtype, or None: then the PyTorch code below runs
    (other devices and dtypes, no C compiler)."""
    if t.device.type != "cpu" or t.dtype not in _SUFFIX:
        return None
    return _c_function(name, _SUFFIX[t.dtype])


def _run(fn, src: Tensor, dst: Tensor, n: int, h: int, w: int, c: int, m: int) -> None:
    status = fn(src.data_ptr(), dst.data_ptr(), n, h, w, c, m)
    if status == 1:
        raise MemoryError("winograd: the C tile transform could not allocate its scratch")
    if status != 0:
        raise ValueError(f"winograd: the C tile transforms take output tiles of 2 or 4, not {m}")


def _in_c(name, src: Tensor, shape, n, h, w, c, m, dense=Tensor.contiguous) -> Tensor | None:
    """tiles.c's `name` from `src` (made dense by `dense`) into a new tensor of `shape`, or
    None where there is no C kernel for src (the caller's PyTorch code runs then)."""
    fn = _kernel(name, src)
    if fn is None:
        return None
    out = src.new_empty(shape)
    _run(fn, dense(src), out, n, h, w, c, m)
    return out


def _nhwc(x: Tensor) -> Tensor:
    """(N, C, H, W) -> its dense NHWC storage (a view for channels-last tensors)."""
    return x.permute(0, 2, 3, 1).contiguous()


def _input_tiles(x: Tensor, m: int = 4) -> Tensor:
    """x (N, C, H, W) -> the Winograd-domain input (36, N*th*tw, C) for output tiles m x m."""
    n, c, h, w = x.shape
    th, tw = _tiles(x.shape, m)
    u = _in_c("input_tiles", x, (A * A, n * th * tw, c), n, h, w, c, m, dense=_nhwc)
    if u is not None:
        return u
    pad = (A - m) // 2
    padded = F.pad(x, (pad, tw * m + pad - w, pad, th * m + pad - h))
    s = padded.stride()
    tiles = padded.as_strided(
        (A, A, n, th, tw, c), (s[2], s[3], s[0], m * s[2], m * s[3], s[1])
    ).reshape(A, A, -1)  # (6, 6, N*th*tw*C), one copy
    b, _, _ = _matrices(x.dtype, x.device)
    return _both_axes(b, tiles).view(A * A, n * th * tw, c)


def _output_from(prod: Tensor, n: int, h: int, w: int, m: int = 4) -> Tensor:
    """Winograd-domain products (36, N*th*tw, C_out) -> y (N, C_out, H, W), channels-last."""
    c_out = prod.shape[-1]
    y = _in_c("output_from", prod, (n, h, w, c_out), n, h, w, c_out, m)
    if y is not None:
        return y.permute(0, 3, 1, 2)
    _, _, at = _matrices(prod.dtype, prod.device, A - m + 1)
    th, tw = _tiles((h, w), m)
    y = _both_axes(at, prod.reshape(A, A, -1)).view(m, m, n, th, tw, c_out)
    y = y.permute(2, 3, 0, 4, 1, 5).reshape(n, th * m, tw * m, c_out)  # NHWC, one copy
    return y[:, :h, :w].permute(0, 3, 1, 2)


def _grad_tiles(grad: Tensor, m: int = 4) -> Tensor:
    """dL/dy (N, C_out, H, W) -> dL/d(products) (36, N*th*tw, C_out): the output map's
    transpose."""
    n, c_out, h, w = grad.shape
    th, tw = _tiles(grad.shape, m)
    dm = _in_c("grad_tiles", grad, (A * A, n * th * tw, c_out), n, h, w, c_out, m, dense=_nhwc)
    if dm is not None:
        return dm
    g = grad.permute(0, 2, 3, 1)  # NHWC view (a copy below unless channels-last already)
    if (th * m, tw * m) != (h, w):
        g = F.pad(g, (0, 0, 0, tw * m - w, 0, th * m - h))
    g = g.reshape(n, th, m, tw, m, c_out).permute(2, 4, 0, 1, 3, 5).reshape(m, m, -1)
    _, _, at = _matrices(grad.dtype, grad.device, A - m + 1)
    return _both_axes(at.t(), g).view(A * A, n * th * tw, c_out)


def _overlap_add(t: Tensor, tiles: int, m: int) -> Tensor:
    """t (6, tiles, rest) -> (tiles + k - 1) * m rows (rest): tile i's 6 rows added at rows
    m i .. m i + 5 (k = ceil(6 / m) chunks of m rows each)."""
    k = -(-A // m)
    rows = t.new_zeros(tiles + k - 1, m, *t.shape[2:])
    for j in range(k):
        chunk = t[j * m : (j + 1) * m]
        rows[j : j + tiles, : chunk.shape[0]] += chunk.movedim(1, 0)
    return rows.flatten(0, 1)


def _input_grad(du: Tensor, shape: tuple[int, ...], m: int = 4) -> Tensor:
    """dL/d(input tiles) (36, N*th*tw, C) -> dL/dx (N, C, H, W): the input map's transpose,
    overlapping tiles summed (fold)."""
    n, c, h, w = shape
    th, tw = _tiles(shape, m)
    dx = _in_c("input_grad", du, (n, h, w, c), n, h, w, c, m)
    if dx is not None:
        return dx.permute(0, 3, 1, 2)
    b, _, _ = _matrices(du.dtype, du.device)
    dt = _both_axes(b.t(), du.reshape(A, A, -1)).view(A, A, n, th, tw, c)
    # overlap-add of the 6-row tiles at stride m, one axis at a time
    rows = _overlap_add(dt.permute(0, 3, 1, 2, 4, 5), th, m)  # (padded rows, 6, N, tw, C)
    cols = _overlap_add(rows.permute(1, 3, 0, 2, 4), tw, m)  # (padded cols, rows, N, C)
    pad = (A - m) // 2
    return cols[pad : w + pad, pad : h + pad].permute(2, 3, 1, 0)


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
    def forward(ctx, x: Tensor, v: Tensor, tape: StepTape | None, m: int) -> Tensor:
        u = _input_tiles(x, m)
        ctx.save_for_backward(u, v)
        ctx.shape, ctx.m = tuple(x.shape), m
        ctx.tape = tape
        ctx.head = v.grad_fn if tape is not None else None
        return _output_from(torch.bmm(u, v), x.shape[0], x.shape[2], x.shape[3], m)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        refuse_second_order(grad, "winograd")
        u, v = ctx.saved_tensors
        dm = _grad_tiles(grad, ctx.m)
        dx = dv = None
        if ctx.needs_input_grad[0]:
            dx = _input_grad(torch.bmm(dm, v.transpose(1, 2)), ctx.shape, ctx.m)
        if ctx.tape is not None:
            ctx.tape.keep(ctx.head, u, dm)  # folded into the filter gradient
        elif ctx.needs_input_grad[1]:
            dv = torch.bmm(u.transpose(1, 2), dm)
        return dx, dv, None, None


def _check(x: Tensor, v: Tensor, kernel_size: int) -> None:
    if kernel_size not in KERNEL_SIZES:
        raise ValueError(f"winograd_conv takes 3x3 or 5x5 filters, not {kernel_size}x{kernel_size}")
    if x.dim() != 4 or v.dim() != 3 or v.shape[0] != A * A or x.shape[1] != v.shape[1]:
        raise ValueError(
            f"winograd_conv takes x (N, C_in, H, W) and v (36, C_in, C_out), got "
            f"{tuple(x.shape)} and {tuple(v.shape)}"
        )


def winograd_conv(x: Tensor, v: Tensor, kernel_size: int, bias: Tensor | None = None) -> Tensor:
    """F.conv2d(x, weight, bias, padding=kernel_size // 2) for v = transform_weight(weight),
    weight (C_out, C_in, kernel_size, kernel_size), kernel_size 3 or 5 (v's shape does not
    say which); x (N, C_in, H, W) of v's dtype; returns (N, C_out, H, W), channels-last."""
    _check(x, v, kernel_size)
    y = _WinogradConv.apply(x, v, None, _OUTPUT_TILE[kernel_size])
    return y if bias is None else y + bias.view(1, -1, 1, 1)


class WinogradSequence:
    """x -> F.conv2d(x, weight, bias, padding=r // 2) for the steps of one sequence, r x r
    filters with r 3 or 5. The filter is transformed once (in the weight's dtype; inputs are
    cast to it; meant for float32 and float64, not autocast). With batch_grad, while grad is
    enabled, each step's filter gradient is added in place into one total as backward meets
    the step, and the total is handed to autograd once, when backward reaches the filter: no
    per-step gradient tensor and no sum of them. (Stacking all the steps' tiles for one
    product instead measured slower: the concatenation costs more than the product saves.)"""

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor | None,
        batch_grad: bool = True,
        transformed: Tensor | None = None,
    ) -> None:
        """`transformed`: transform_weight(weight), made already (kept_transform); weight is
        then read only for its filter size."""
        v = transform_weight(weight) if transformed is None else transformed
        self.tape = None
        if batch_grad and torch.is_grad_enabled() and v.requires_grad:
            self.tape = StepTape(_filter_grad, fold=_fold_filter_grad)
            (v,) = share(self.tape, v)
        self.v, self.bias, self.kernel_size = v, bias, weight.shape[-1]

    def __call__(self, x: Tensor) -> Tensor:
        x = x.to(self.v.dtype)
        _check(x, self.v, self.kernel_size)
        y = _WinogradConv.apply(x, self.v, self.tape, _OUTPUT_TILE[self.kernel_size])
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)
