"""The plain ConvLSTM gate update with a hand-written backward, for the fast path.

    update = fused_lstm_update(compiled=True)
    h, c = update(z, c, z_more)          # the same function as cells.lstm.lstm_update

Why: torch.compile of lstm_update and its autograd-derived backward fuses the backward into
one kernel that also concatenates the four gate gradients; on an H100 that kernel ran at
about a ninth of memory bandwidth (192 us against 17 us forward, ConvLSTM-S at batch 64).
Here the forward and the backward are two plain pointwise functions (compiled separately on
the fast path): the backward recomputes the gates from z and writes each gate's gradient
as its own tensor, and one concatenation (a plain copy) assembles them.

Arithmetic runs in at least float32 (the gate pre-activations may be bf16 / fp16 under
autocast); h and c come out in the promoted dtype of the inputs, as in the eager update,
and each gradient in its input's dtype. With `low_precision_h`, h comes out in the
pre-activations' dtype where that is bf16 or fp16 (under autocast): where every use of h is
a convolution that autocast would cast it for, the forward values are the same, and the
casts (and half of h's bytes) go; the gradients of h then arrive and are summed in that
dtype. c stays in float32. The backward is not itself differentiable (no double backward).

On the CPU, `native_lstm_update()` runs the forward in one C pass that keeps the gate
activations, and the whole backward in another (convlstm/gates.c): no recomputation, no
concatenation, dz written in z's layout.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from convlstm import native
from convlstm.cells.base import AUTOCAST_DTYPES
from convlstm.cells.lstm import lstm_update


def _result_dtype(z: Tensor, c: Tensor, z_more: Tensor | None) -> torch.dtype:
    """The dtype of eager lstm_update's h and c: its inputs' promoted dtype."""
    dtype = torch.promote_types(z.dtype, c.dtype)
    return dtype if z_more is None else torch.promote_types(dtype, z_more.dtype)


def _gates(z: Tensor, c: Tensor, z_more: Tensor | None) -> tuple[Tensor, ...]:
    acc = torch.promote_types(_result_dtype(z, c, z_more), torch.float32)
    z = z.to(acc) if z_more is None else z.to(acc) + z_more.to(acc)
    zi, zf, zg, zo = z.chunk(4, dim=1)
    return torch.sigmoid(zi), torch.sigmoid(zf), torch.tanh(zg), torch.sigmoid(zo), c.to(acc)


def _h_dtype(z: Tensor, z_more: Tensor | None, out: torch.dtype, low: bool) -> torch.dtype:
    """h's dtype: `out`, or with `low` the pre-activations' where they are bf16 or fp16."""
    narrow = z.dtype in AUTOCAST_DTYPES
    same = z_more is None or z_more.dtype == z.dtype
    return z.dtype if low and narrow and same else out


def gates_forward(
    z: Tensor, c: Tensor, z_more: Tensor | None, low_precision_h: bool = False
) -> tuple[Tensor, Tensor]:
    """(h', c') from pre-activations z (+ z_more) (B, 4C, H, W) and the memory c (B, C, H, W)."""
    out = _result_dtype(z, c, z_more)
    i, f, g, o, c_acc = _gates(z, c, z_more)
    c_new = f * c_acc + i * g
    h_dtype = _h_dtype(z, z_more, out, low_precision_h)
    return (o * torch.tanh(c_new)).to(h_dtype), c_new.to(out)


def gates_backward(
    z: Tensor, c: Tensor, z_more: Tensor | None, dh: Tensor, dc_new: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (d z_i, d z_f, d z_g, d z_o, d c) from those of h' and c' (gates recomputed)."""
    i, f, g, o, c_acc = _gates(z, c, z_more)
    acc = c_acc.dtype
    tc = torch.tanh(f * c_acc + i * g)
    dh, dc_new = dh.to(acc), dc_new.to(acc)
    dc_total = dc_new + dh * o * (1 - tc * tc)
    gate_grads = (
        dc_total * g * i * (1 - i),
        dc_total * c_acc * f * (1 - f),
        dc_total * i * (1 - g * g),
        dh * tc * o * (1 - o),
    )
    # in z's dtype (half the bytes under autocast), unless z_more needs another dtype
    grad_dtype = z.dtype if z_more is None or z_more.dtype == z.dtype else acc
    return (*(d.to(grad_dtype) for d in gate_grads), (dc_total * f).to(c.dtype))


def _detached(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    return tuple(None if t is None else t.detach() for t in tensors)


class _FusedUpdate(torch.autograd.Function):
    """The kernels see one kind of call per dtype and z_more's presence: inputs detached (a
    compiled kernel is specialised on requires_grad too), and the gradients of h' and c' in
    z's layout. Autograd's zeros for an unused output are contiguous, and the first one of a
    sequence (c' of the last step) kept every c gradient of a channels-last layer in the
    other layout: each compiled backward read and wrote c's gradient across the layout. On
    the CUDA option set, ConvLSTM-S's training step compiled 10 kernels; now 4."""

    @staticmethod
    def forward(ctx, z, c, z_more, kernels, low_precision_h):
        forward, _ = kernels
        ctx.kernels = kernels
        ctx.set_materialize_grads(False)  # an unused output's zeros are made in its layout
        ctx.save_for_backward(z, c, z_more)
        h, c_new = forward(*_detached(z, c, z_more), low_precision_h)
        ctx.outputs = [(t.shape, t.dtype) for t in (h, c_new)]
        return h, c_new

    @staticmethod
    @once_differentiable
    def backward(ctx, dh, dc_new):
        _, backward = ctx.kernels
        z, c, z_more = _detached(*ctx.saved_tensors)
        layout = _dense_layout(z)  # the cells' layout (convolution outputs are dense)
        dh, dc_new = (
            torch.empty(shape, dtype=dtype, device=z.device, memory_format=layout).zero_()
            if grad is None
            else grad.contiguous(memory_format=layout)
            for grad, (shape, dtype) in zip((dh, dc_new), ctx.outputs, strict=True)
        )
        *gate_grads, dc = backward(z, c, z_more, dh, dc_new)
        # written in z's memory format, which the gate convolution's backward reads
        dz = torch.cat(gate_grads, dim=1, out=torch.empty_like(z, dtype=gate_grads[0].dtype))
        dz_more = None if z_more is None else dz.to(z_more.dtype)
        return dz.to(z.dtype), dc, dz_more, None, None


_COMPILED: list[tuple[Callable, Callable]] = []


def _compiled_kernels() -> tuple[Callable, Callable]:
    """gates_forward and gates_backward compiled once per process, with dynamic shapes so that
    training, evaluation and streaming batches share them; the remaining variants (with and
    without z_more, layouts, dtypes) are more than dynamo's default of 8, hence the limit."""
    if not _COMPILED:
        import torch._dynamo  # noqa: F401  (its config below)

        config = torch._dynamo.config
        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        setattr(config, name, max(getattr(config, name), 64))
        compile_ = lambda fn: torch.compile(fn, dynamic=True)  # noqa: E731
        _COMPILED.append((compile_(gates_forward), compile_(gates_backward)))
    return _COMPILED[0]


def fused_lstm_update(
    compiled: bool = True, low_precision_h: bool = False
) -> Callable[..., tuple[Tensor, Tensor]]:
    """`update(z, c, z_more=None) -> (h', c')`: lstm_update with the hand-written backward;
    `compiled` runs forward and backward as torch.compile'd kernels (else eagerly);
    `low_precision_h`: h in z's dtype where that is bf16 or fp16 (the module's docstring)."""
    kernels = _compiled_kernels() if compiled else (gates_forward, gates_backward)

    def update(z: Tensor, c: Tensor, z_more: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return _FusedUpdate.apply(z, c, z_more, kernels, low_precision_h)

    return update


# (z's dtype, c's dtype) -> gates.c's kernels: one dtype throughout, or autocast's bf16
# pre-activations with a float32 memory
_NATIVE_DTYPES = {
    (torch.float32, torch.float32): "f32",
    (torch.float64, torch.float64): "f64",
    (torch.bfloat16, torch.float32): "bf16",
}


@functools.cache
def _native_kernels(suffix: str) -> tuple | None:
    """gates.c's (forward, backward) for a dtype suffix, or None (no C compiler)."""
    lib = native.load("gates")
    if lib is None:
        return None
    kernels = (getattr(lib, f"lstm_forward_{suffix}"), getattr(lib, f"lstm_backward_{suffix}"))
    for fn in kernels:
        fn.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_long] * 3 + [ctypes.c_int]
        fn.restype = None
    return kernels


def _dense_layout(t: Tensor) -> torch.memory_format:
    """channels-last where t is stored so (and not also contiguous), else contiguous."""
    if not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _native_forward(
    z: Tensor, c: Tensor, z_more: Tensor | None, kernel, h_dtype: torch.dtype | None = None
):
    """gates.c's forward pass: (h', c', the activations, c and t = tanh(c') as it read and
    wrote them, in one dense layout); h' in `h_dtype` (the kernel's: c's unless told)."""
    layout = _dense_layout(z)
    z, c = z.contiguous(memory_format=layout), c.contiguous(memory_format=layout)
    more = None if z_more is None else z_more.contiguous(memory_format=layout)
    act = torch.empty_like(z, dtype=c.dtype)  # the memory's dtype: float32 under autocast
    c_new, t = torch.empty_like(c), torch.empty_like(c)
    h = torch.empty_like(c, dtype=h_dtype or c.dtype)
    b, ch, height, width = c.shape
    tensors = (z, more, c, act, c_new, t, h)
    nhwc = int(layout == torch.channels_last)
    kernel(*(None if x is None else x.data_ptr() for x in tensors), b, ch, height * width, nhwc)
    return h, c_new, act, c, t


class _NativeUpdate(torch.autograd.Function):
    """lstm_update as two C passes (convlstm/gates.c): the forward saves the gate activations,
    and the backward writes dz in z's layout, instead of autograd's dozen kernels each way and
    the concatenation of the four gate gradients. The forward's sigmoid and tanh are gates.c's
    own (vectorised, within a few units in the last place of PyTorch's)."""

    @staticmethod
    def forward(ctx, z, c, z_more, kernels, h_dtype):
        h, c_new, act, c, t = _native_forward(z, c, z_more, kernels[0], h_dtype)
        ctx.kernel, ctx.more, ctx.z_dtype = kernels[1], z_more is not None, z.dtype
        ctx.h_dtype = h.dtype  # the dtype the backward kernel reads dh in
        ctx.save_for_backward(act, c, t)
        return h, c_new

    @staticmethod
    @once_differentiable
    def backward(ctx, dh, dc_new):
        act, c, t = ctx.saved_tensors
        layout = _dense_layout(act)  # dense already: the forward made it
        dh = dh.to(ctx.h_dtype)
        c, t, dh, dc_new = (x.contiguous(memory_format=layout) for x in (c, t, dh, dc_new))
        dz, dc = torch.empty_like(act, dtype=ctx.z_dtype), torch.empty_like(c)
        b, ch, h, w = c.shape
        tensors = (act, c, t, dh, dc_new, dz, dc)
        nhwc = int(layout == torch.channels_last)
        ctx.kernel(*(x.data_ptr() for x in tensors), b, ch, h * w, nhwc)
        return dz, dc, dz if ctx.more else None, None, None


def native_lstm_update(
    low_precision_h: bool = False,
) -> Callable[..., tuple[Tensor, Tensor]] | None:
    """`update(z, c, z_more=None) -> (h', c')`: lstm_update as one C kernel forward and one
    backward (convlstm/gates.c), for float32 / float64 CPU tensors of one dtype, or bf16
    pre-activations (autocast) with a float32 memory, at full shapes (anything else, e.g. a
    broadcast c, runs lstm_update). Under bf16 the arithmetic is float32 throughout, as in
    fused_lstm_update (the eager update rounds each activation to bf16), h' and c' are
    float32 and dz bf16. Without grad the C forward runs too: its saved activations are
    dropped, and one pass still beats the eager update's dozen kernels (ConvLSTM-S streamed
    at batch 1 in bf16: 4.45 against 4.91 ms per frame; float32: 13.1 against 13.6; a
    2-core Xeon). With `low_precision_h`, where z is bf16 and c float32 and grad is enabled,
    h' comes out in bf16 (rounded to nearest even from the same float32 value) and its
    gradient is read in bf16, as for fused_lstm_update. None where the C kernels can't be
    built (no C compiler)."""
    if native.load("gates") is None:
        return None

    def update(z: Tensor, c: Tensor, z_more: Tensor | None = None) -> tuple[Tensor, Tensor]:
        kernels = None
        gates = z.dim() == 4 and z.shape[1] % 4 == 0
        # the C pass takes every tensor at full size: no broadcasting (the eager update does)
        full = gates and c.shape == (z.shape[0], z.shape[1] // 4, *z.shape[2:])
        same = z_more is None or (z_more.dtype == z.dtype and z_more.shape == z.shape)
        if z.device.type == "cpu" and full and same:
            suffix = _NATIVE_DTYPES.get((z.dtype, c.dtype))
            kernels = None if suffix is None else _native_kernels(suffix)
        if kernels is None:
            bf16_float32 = z.dtype == torch.bfloat16 and c.dtype == torch.float32
            if bf16_float32 and not torch.is_grad_enabled():
                # float32 arithmetic as in the C pass, not bf16 gates (eager autocast)
                z, z_more = z.float(), None if z_more is None else z_more.float()
            return lstm_update(z, c, z_more)
        if not torch.is_grad_enabled():  # nothing to save: no autograd node (about 10 us)
            return _native_forward(z, c, z_more, kernels[0])[:2]
        if low_precision_h and suffix == "bf16":
            return _NativeUpdate.apply(z, c, z_more, _native_kernels("bf16h"), torch.bfloat16)
        return _NativeUpdate.apply(z, c, z_more, kernels, None)

    return update
