"""3x3 and 5x5 convolutions by Winograd's minimal filtering F(4x4, 3x3) and F(4x4, 5x5).

A direct 3x3 convolution spends 9 multiply-adds per output pixel and channel pair, a 5x5 one
25. Winograd's algorithm cuts the (zero-padded) input into overlapping a x a tiles at stride
4 (a = 6 for 3x3 filters, 8 for 5x5), maps each tile and each filter into an a x a "Winograd
domain", multiplies there elementwise, and maps the products back to 4x4 output tiles (Lavin
and Gray, 2016): 36 products per 16 outputs (2.25 per output, against 9) for 3x3 filters,
64 per 16 (4 per output, against 25) for 5x5. Summed over input channels, the elementwise
products are a * a independent matrix products, one per tile position: (tiles, C_in) @
(C_in, C_out). On a CPU, where a training step is bound by the convolutions' arithmetic,
that is the only way to be much faster than the direct convolution; the transforms are
small matrix products of their own. (F(2x2, 5x5), with 6x6 tiles, needs 9 products per
output: ConvLSTM-S trained at 1.85x eager with it, at 2.6x with F(4x4, 5x5), on a 2-core
CPU at batch 2.)

The result equals the direct convolution in exact arithmetic (float64 agrees to about 1e-13);
in float32 the transforms cost one to two more decimal digits (relative error 3e-6 to 1.1e-5,
depending on the CPU, against 3e-7 to 1e-6 for the direct convolution). The backward pass is
written by hand in the same domain: the input gradient by the transposed transforms, the
filter gradient in the Winograd domain (mapped back to the filter by autograd through
`transform_weight`).

The four tile transforms (input tiles, products back to outputs, and their transposes for
the backward) run as C kernels, one pass each (convlstm/tiles.c, compiled on first use by
convlstm.native), for float32 and float64 CPU tensors. In PyTorch each is two small matrix
products plus the copies that cut out tiles and put them back: about 45% of a 3x3 Winograd
convolution at batch 16, where the C kernels take about 20%. Without a C compiler, and on
other devices and dtypes, the PyTorch code below runs instead (tested equal).

    v = transform_weight(weight)        # (36, C_in, C_out) for 3x3, once per sequence
    y = winograd_conv(x, v, 3)          # = F.conv2d(x, weight, padding=1), x (N, C_in, H, W)
"""

from __future__ import annotations

import ctypes
import functools
import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function
from torch.autograd.function import once_differentiable
from torch.utils.weak import WeakIdKeyDictionary

from convlstm import native
from convlstm.wgrad import refuse_second_order, share

M = 4  # output tile, for both filter sizes
KERNEL_SIZES = (3, 5)
_TILE = {3: 6, 5: 8}  # filter size r -> input tile a = M + r - 1

# Interpolation points (and infinity) for each input tile a (Lavin and Gray, 2016). The
# matrices follow from the points p (ascending coefficients; P the finite points):
#   B^T (a x a): row j the polynomial prod over P without p_j of (x - q), padded with a 0;
#                the last row prod over all of P of (x - q);
#   G (a x r):   row j (1, p_j, .., p_j^(r-1)) / prod over P without p_j of (p_j - q); the
#                last row (infinity) the filter's last tap;
#   A^T (M x a): row i (p^i for P), with a 1 at infinity in the last row.
_POINTS = {
    6: (0, 1, -1, 2, -2),
    8: (0, 1, -1, 2, -2, Fraction(1, 2), Fraction(-1, 2)),
}


def _polynomial(roots) -> list[Fraction]:
    """Ascending coefficients of the product of (x - q) over roots."""
    coeffs = [Fraction(1)]
    for q in roots:
        shifted = [Fraction(0), *coeffs]
        coeffs = [s - q * c for s, c in zip(shifted, [*coeffs, Fraction(0)], strict=True)]
    return coeffs


def _rows(a: int) -> tuple[list[list[Fraction]], ...]:
    """B^T, G and A^T of F(M x M, r x r) with input tile a = M + r - 1, exactly."""
    points = [Fraction(p) for p in _POINTS[a]]
    r = a - M + 1
    others = [[q for q in points if q != p] for p in points]
    bt = [[*_polynomial(rest), Fraction(0)] for rest in others] + [_polynomial(points)]
    g = [
        [p**k / math.prod(p - q for q in rest) for k in range(r)]
        for p, rest in zip(points, others, strict=True)
    ]
    g.append([Fraction(0)] * (r - 1) + [Fraction(1)])
    at = [[p**i for p in points] + [Fraction(int(i == M - 1))] for i in range(M)]
    return bt, g, at


@functools.cache
def _matrices(dtype: torch.dtype, device: torch.device, a: int) -> tuple[Tensor, ...]:
    """The 1-D transforms for input tile a: B^T (a, a), G (a, r), A^T (M, a) in `dtype`
    (exact in binary but for G's thirds, fifths and ninths, rounded once)."""

    def matrix(rows) -> Tensor:
        values = [[float(x) for x in row] for row in rows]
        return torch.tensor(values, dtype=torch.float64).to(dtype=dtype, device=device)

    with torch.inference_mode(False):  # cached: must stay usable outside inference mode
        return tuple(matrix(rows) for rows in _rows(a))


def _both_axes(m: Tensor, t: Tensor) -> Tensor:
    """t (k, k, rest) -> m t m^T over the two leading axes: (j, j, rest) for m (j, k); two
    matrix products, no copies between them."""
    k, rest = t.shape[0], t.shape[2:]
    first = (m @ t.reshape(k, -1)).view(m.shape[0], k, -1)  # over axis 0
    return torch.matmul(m, first).view(m.shape[0], m.shape[0], *rest)  # over axis 1


def transform_weight(weight: Tensor) -> Tensor:
    """3x3 or 5x5 filters (C_out, C_in, r, r) -> the Winograd domain (a * a, C_in, C_out),
    a = 6 or 8; differentiable."""
    if (
        weight.dim() != 4
        or weight.shape[-1] != weight.shape[-2]
        or weight.shape[-1] not in KERNEL_SIZES
    ):
        raise ValueError(
            f"transform_weight takes (C_out, C_in, r, r) with r 3 or 5, got {tuple(weight.shape)}"
        )
    a = _TILE[weight.shape[-1]]
    _, g, _ = _matrices(weight.dtype, weight.device, a)
    c_out, c_in = weight.shape[:2]
    return _both_axes(g, weight.permute(2, 3, 1, 0)).reshape(a * a, c_in, c_out)


# weight -> ((storage pointer, version counter, dtype, shape, device), transform_weight(weight))
_KEPT = WeakIdKeyDictionary()  # by identity: a tensor's == is elementwise


def kept_transform(weight: Tensor) -> Tensor:
    """transform_weight(weight) for inference, without autograd: made once and kept (for as
    long as `weight` lives) while the weight is unchanged, so that a model run one step at a
    time does not transform its filters at every step. Unchanged means the same tensor, the
    same storage and the same version counter, which every in-place change bumps (optimizer
    steps, load_state_dict, copy_, nn.init), but not one made through `weight.data`, which
    has a version counter of its own. Costs the transformed filters' memory (a^2 / r^2 of
    the weight's: 4x for 3x3, 2.56x for 5x5)."""
    state = (weight.data_ptr(), weight._version, weight.dtype, weight.shape, weight.device)
    kept = _KEPT.get(weight)
    if kept is not None and kept[0] == state:
        return kept[1]
    with torch.no_grad():
        v = transform_weight(weight)
    _KEPT[weight] = (state, v)
    return v


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
    bias = [ctypes.c_void_p] if name == "output_from" else []  # its optional bias
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_long] * 5 + bias
    fn.restype = ctypes.c_int
    return fn


def _kernel(name: str, t: Tensor):
    """convlstm/tiles.c's `name` for t's dtype, or None: then the PyTorch code below runs
    (other devices and dtypes, no C compiler)."""
    if t.device.type != "cpu" or t.dtype not in _SUFFIX:
        return None
    return _c_function(name, _SUFFIX[t.dtype])


def _run(fn, src: Tensor, dst: Tensor, n: int, h: int, w: int, c: int, a: int, *more) -> None:
    status = fn(src.data_ptr(), dst.data_ptr(), n, h, w, c, a, *more)
    if status == 1:
        raise MemoryError("winograd: the C tile transform could not allocate its scratch")
    if status != 0:
        raise ValueError(f"winograd: the C tile transforms take input tiles of 6 or 8, not {a}")


def _in_c(
    name, src: Tensor, shape, n, h, w, c, a, dense=Tensor.contiguous, more=()
) -> Tensor | None:
    """tiles.c's `name` from `src` (made dense by `dense`) into a new tensor of `shape` (`more`:
    its further arguments), or None where there is no C kernel for src (the caller's PyTorch
    code runs then)."""
    fn = _kernel(name, src)
    if fn is None:
        return None
    out = src.new_empty(shape)
    _run(fn, dense(src), out, n, h, w, c, a, *more)
    return out


def _nhwc(x: Tensor) -> Tensor:
    """(N, C, H, W) -> its dense NHWC storage (a view for channels-last tensors)."""
    return x.permute(0, 2, 3, 1).contiguous()


def _input_tiles(x: Tensor, a: int) -> Tensor:
    """x (N, C, H, W) -> the Winograd-domain input (a * a, N*th*tw, C) for input tiles a x a."""
    n, c, h, w = x.shape
    th, tw = _tiles(x.shape)
    u = _in_c("input_tiles", x, (a * a, n * th * tw, c), n, h, w, c, a, dense=_nhwc)
    if u is not None:
        return u
    pad = (a - M) // 2
    padded = F.pad(x, (pad, tw * M + a - M - pad - w, pad, th * M + a - M - pad - h))
    s = padded.stride()
    tiles = padded.as_strided(
        (a, a, n, th, tw, c), (s[2], s[3], s[0], M * s[2], M * s[3], s[1])
    ).reshape(a, a, -1)  # (a, a, N*th*tw*C), one copy
    b, _, _ = _matrices(x.dtype, x.device, a)
    return _both_axes(b, tiles).view(a * a, n * th * tw, c)


def _output_from(prod: Tensor, n: int, h: int, w: int, a: int, bias: Tensor | None = None):
    """Winograd-domain products (a * a, N*th*tw, C_out) -> y (N, C_out, H, W), channels-last,
    plus bias (C_out) if given: added in the same pass in C (one pass over y less)."""
    c_out = prod.shape[-1]
    if bias is not None:
        if tuple(bias.shape) != (c_out,):  # the C pass reads c_out values: no broadcasting
            raise ValueError(f"winograd: a bias of {c_out} values, got {tuple(bias.shape)}")
        bias = bias.to(prod.dtype).contiguous()
    more = (None if bias is None else bias.data_ptr(),)
    y = _in_c("output_from", prod, (n, h, w, c_out), n, h, w, c_out, a, more=more)
    if y is not None:
        return y.permute(0, 3, 1, 2)
    _, _, at = _matrices(prod.dtype, prod.device, a)
    th, tw = _tiles((h, w))
    y = _both_axes(at, prod.reshape(a, a, -1)).view(M, M, n, th, tw, c_out)
    y = y.permute(2, 3, 0, 4, 1, 5).reshape(n, th * M, tw * M, c_out)  # NHWC, one copy
    if bias is not None:
        y += bias
    return y[:, :h, :w].permute(0, 3, 1, 2)


def _grad_tiles(grad: Tensor, a: int) -> Tensor:
    """dL/dy (N, C_out, H, W) -> dL/d(products) (a * a, N*th*tw, C_out): the output map's
    transpose."""
    n, c_out, h, w = grad.shape
    th, tw = _tiles(grad.shape)
    dm = _in_c("grad_tiles", grad, (a * a, n * th * tw, c_out), n, h, w, c_out, a, dense=_nhwc)
    if dm is not None:
        return dm
    g = grad.permute(0, 2, 3, 1)  # NHWC view (a copy below unless channels-last already)
    if (th * M, tw * M) != (h, w):
        g = F.pad(g, (0, 0, 0, tw * M - w, 0, th * M - h))
    g = g.reshape(n, th, M, tw, M, c_out).permute(2, 4, 0, 1, 3, 5).reshape(M, M, -1)
    _, _, at = _matrices(grad.dtype, grad.device, a)
    return _both_axes(at.t(), g).view(a * a, n * th * tw, c_out)


def _overlap_add(t: Tensor, tiles: int) -> Tensor:
    """t (a, tiles, rest) -> (tiles + k - 1) * M rows (rest): tile i's a rows added at rows
    M i .. M i + a - 1 (k = ceil(a / M) chunks of M rows each)."""
    k = -(-t.shape[0] // M)
    rows = t.new_zeros(tiles + k - 1, M, *t.shape[2:])
    for j in range(k):
        chunk = t[j * M : (j + 1) * M]
        rows[j : j + tiles, : chunk.shape[0]] += chunk.movedim(1, 0)
    return rows.flatten(0, 1)


def _input_grad(du: Tensor, shape: tuple[int, ...], a: int) -> Tensor:
    """dL/d(input tiles) (a * a, N*th*tw, C) -> dL/dx (N, C, H, W): the input map's
    transpose, overlapping tiles summed (fold)."""
    n, c, h, w = shape
    th, tw = _tiles(shape)
    dx = _in_c("input_grad", du, (n, h, w, c), n, h, w, c, a)
    if dx is not None:
        return dx.permute(0, 3, 1, 2)
    b, _, _ = _matrices(du.dtype, du.device, a)
    dt = _both_axes(b.t(), du.reshape(a, a, -1)).view(a, a, n, th, tw, c)
    # overlap-add of the a-row tiles at stride M, one axis at a time
    rows = _overlap_add(dt.permute(0, 3, 1, 2, 4, 5), th)  # (padded rows, a, N, tw, C)
    cols = _overlap_add(rows.permute(1, 3, 0, 2, 4), tw)  # (padded cols, rows, N, C)
    pad = (a - M) // 2
    return cols[pad : w + pad, pad : h + pad].permute(2, 3, 1, 0)


class FilterTape:
    """The filter gradient of the steps that share one transformed filter, for `share`: each
    step's u^T dm folded, as backward meets the step, into a total for the range of input
    channels the step used (the whole filter, or ConvLSTM's hoisted W_x or W_h), and the
    totals put together once, when backward reaches the filter. (Folding each step into a
    strided slice of one total measured 2x slower than into a dense total of its own.)"""

    def __init__(self) -> None:
        self.totals: dict[tuple[int, int], Tensor] = {}

    def keep(self, head, u: Tensor, dm: Tensor, channels: tuple[int, int]) -> None:
        """Fold a step's pair if this backward reaches `head` (the filter's node): not, say,
        in autograd.grad of the inputs alone, whose steps a later full backward would count
        again."""
        if head is not None and torch._C._will_engine_execute_node(head):
            total = self.totals.get(channels)
            u_t = u.detach().transpose(1, 2)
            if total is None:
                self.totals[channels] = torch.bmm(u_t, dm.detach())
            else:
                total.baddbmm_(u_t, dm.detach())

    @property
    def kept(self) -> bool:
        return bool(self.totals)

    @staticmethod
    def finish(tape: FilterTape, v: Tensor) -> tuple[Tensor]:
        """dL/dv over every step, the totals let go."""
        totals, tape.totals = tape.totals, {}
        whole = totals.pop((0, v.shape[1]), None)
        if whole is None:
            whole = v.new_zeros(v.shape)
        for (lo, hi), part in totals.items():
            whole[:, lo:hi] += part
        return (whole,)


class _WinogradConv(Function):
    @staticmethod
    def forward(ctx, x: Tensor, v: Tensor, tape: FilterTape | None, a: int, channels, bias):
        u = _input_tiles(x, a)
        ctx.save_for_backward(u, v)
        ctx.shape, ctx.a = tuple(x.shape), a
        ctx.tape, ctx.channels = tape, channels
        ctx.head = v.grad_fn if tape is not None else None
        return _output_from(torch.bmm(u, v), x.shape[0], x.shape[2], x.shape[3], a, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        refuse_second_order(grad, "winograd")
        u, v = ctx.saved_tensors
        dm = _grad_tiles(grad, ctx.a)
        dx = dv = db = None
        if ctx.needs_input_grad[5]:
            db = grad.sum((0, 2, 3))
        if ctx.needs_input_grad[0]:
            dx = _input_grad(torch.bmm(dm, v.transpose(1, 2)), ctx.shape, ctx.a)
        if ctx.tape is not None:
            ctx.tape.keep(ctx.head, u, dm, ctx.channels)  # folded into the filter gradient
        elif ctx.needs_input_grad[1]:
            dv = torch.bmm(u.transpose(1, 2), dm)
        return dx, dv, None, None, None, db


def _check(x: Tensor, v: Tensor, kernel_size: int) -> None:
    if kernel_size not in KERNEL_SIZES:
        raise ValueError(f"winograd_conv takes 3x3 or 5x5 filters, not {kernel_size}x{kernel_size}")
    a = _TILE[kernel_size]
    if x.dim() != 4 or v.dim() != 3 or v.shape[0] != a * a or x.shape[1] != v.shape[1]:
        raise ValueError(
            f"winograd_conv with {kernel_size}x{kernel_size} filters takes x (N, C_in, H, W) "
            f"and v ({a * a}, C_in, C_out), got {tuple(x.shape)} and {tuple(v.shape)}"
        )


def winograd_conv(x: Tensor, v: Tensor, kernel_size: int, bias: Tensor | None = None) -> Tensor:
    """F.conv2d(x, weight, bias, padding=kernel_size // 2) for v = transform_weight(weight),
    weight (C_out, C_in, kernel_size, kernel_size), kernel_size 3 or 5; x (N, C_in, H, W) of
    v's dtype; returns (N, C_out, H, W), channels-last."""
    _check(x, v, kernel_size)
    return _WinogradConv.apply(x, v, None, _TILE[kernel_size], None, bias)


def sequence_conv(conv: torch.nn.Conv2d, batch_grad: bool = True) -> WinogradSequence:
    """`conv` (3x3 or 5x5, 'same' padding) by Winograd for the steps of one sequence."""
    return WinogradSequence(conv.weight, conv.bias, batch_grad=batch_grad)


# A step of fewer tiles than this in all (a batch of 1 on a grid of up to 8x8) ran faster
# by the direct convolution (mmnist-cpu-small streamed at batch 1: 2.7 against 3.1 ms per
# frame): so few rows leave the products bound by reading the filters, which the 6x6
# Winograd domain makes 4x larger than the 3x3 originals.
MIN_STEP_TILES = 8


def keeps_per_step(x: Tensor, weight: Tensor) -> bool:
    """Whether a step without grad on x (N, C, H, W) runs by Winograd from the kept transform
    of `weight` (step_conv): on the CPU (a CUDA graph would replay a transform that new
    weights loaded in place do not reach), for a weight with a version counter (not one made
    in inference mode), and for steps of at least MIN_STEP_TILES tiles."""
    if x.device.type != "cpu" or weight.is_inference():
        return False
    th, tw = _tiles(x.shape)
    return x.shape[0] * th * tw >= MIN_STEP_TILES


def step_conv(conv: torch.nn.Conv2d) -> WinogradSequence:
    """`conv` by Winograd for a model run one step at a time without autograd: from its
    filters' kept transform (kept_transform), not one made at every step."""
    return WinogradSequence(conv.weight, conv.bias, transformed=kept_transform(conv.weight))


# While a shared_transforms scope is open: id(weight) -> (weight, key, transform, tape, spent)
_SHARED: ContextVar[dict | None] = ContextVar("winograd_shared", default=None)


@contextmanager
def shared_transforms() -> Iterator[None]:
    """While open, each filter is transformed once, when a WinogradSequence first asks for
    it, and every later WinogradSequence of the same weight (the whole filter or a range of
    its input channels) runs from that transform, with its filter gradient folded into the
    same tape: one training step that encodes (ConvLSTM's hoisted W_x and W_h) and then
    forecasts (the whole W) transforms each filter once, forward and backward, instead of
    twice. A transform made without grad (or with a different batch_grad) is not handed to a
    sequence with, nor one made before the weight changed, nor one a backward has gone
    through (its graph is freed: a scope may span several forwards and backwards, say for
    gradient accumulation). Nested scopes are one scope."""
    # (nested: one scope; traced by torch.compile, where Winograd steps aside: none)
    if torch.compiler.is_compiling() or _SHARED.get() is not None:
        yield
        return
    token = _SHARED.set({})
    try:
        yield
    finally:
        _SHARED.reset(token)


def _transform(weight: Tensor, batch_grad: bool) -> tuple[Tensor, FilterTape | None]:
    """(transform_weight(weight), its tape or None), or what the open shared_transforms scope
    made of this weight already."""
    grad = torch.is_grad_enabled() and weight.requires_grad
    shared = _SHARED.get() if not weight.is_inference() else None  # no version counter
    if shared is not None:
        key = (weight.data_ptr(), weight._version, grad, batch_grad)
        kept = shared.get(id(weight))
        if kept is not None and kept[0] is weight and kept[1] == key and not kept[4]:
            return kept[2], kept[3]
    v, tape, spent = transform_weight(weight), None, []
    if grad:  # a backward through the transform frees its graph: not to be handed out again
        v.register_hook(lambda g: spent.append(True))
    if batch_grad and grad:
        tape = FilterTape()
        (v,) = share(tape, v)
    if shared is not None:
        shared[id(weight)] = (weight, key, v, tape, spent)
    return v, tape


class WinogradSequence:
    """x -> F.conv2d(x, weight[:, lo:hi], bias, padding=r // 2) for the steps of one
    sequence, r x r filters with r 3 or 5, the input channels lo:hi of the weight (all by
    default). The filter is transformed once (in the weight's dtype; inputs are cast to it;
    meant for float32 and float64, not autocast), or taken from an open shared_transforms
    scope. With batch_grad, while grad is enabled, each step's filter gradient is added in
    place into one total as backward meets the step, and the total is handed to autograd
    once, when backward reaches the filter: no per-step gradient tensor and no sum of them.
    (Stacking all the steps' tiles for one product instead measured slower: the
    concatenation costs more than the product saves.)"""

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor | None,
        batch_grad: bool = True,
        transformed: Tensor | None = None,
        channels: tuple[int, int] | None = None,
    ) -> None:
        """`transformed`: transform_weight(weight), made already (kept_transform), used as
        it is; `channels` (lo, hi): a range of the weight's input channels."""
        if transformed is None:
            v, self.tape = _transform(weight, batch_grad)
        else:
            v, self.tape = transformed, None
        whole = (0, weight.shape[1])
        self.channels = whole if channels is None else tuple(channels)
        lo, hi = self.channels
        if not 0 <= lo < hi <= whole[1]:
            raise ValueError(f"channels {self.channels} are not a range of 0..{whole[1]}")
        self.v = v if self.channels == whole else v[:, lo:hi]
        self.bias, self.kernel_size = bias, weight.shape[-1]

    def __call__(self, x: Tensor) -> Tensor:
        x = x.to(self.v.dtype)
        _check(x, self.v, self.kernel_size)
        a = _TILE[self.kernel_size]
        return _WinogradConv.apply(x, self.v, self.tape, a, self.channels, self.bias)
