"""Weight gradients batched over time: one large product per weight per sequence.

A recurrent cell applies the same convolution at every step, so autograd computes that
weight's gradient step by step (one small GEMM each) and adds the pieces, in the compute dtype
(bf16 under autocast, where the weight is cast once per sequence). `WeightGradBatch` keeps
each step's input and output gradient instead and computes the weight and bias gradients
once, over all steps stacked along the batch, when the backward pass reaches the weight: the
same sum, in one convolution backward (accumulated inside the call, rounded to the compute
dtype once).

    batch = WeightGradBatch(weight, bias, padding)   # once per sequence, with grad enabled
    for t in range(T):
        z = batch.conv(x_t)                          # F.conv2d(x_t, weight, bias, padding=...)

Each step's backward computes only its input gradient. The inputs and gradients of every step
stay in memory until the weight's gradient is made (more peak memory, about one gate tensor
per step); so this does not combine with activation checkpointing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from convlstm import packed as packing
from convlstm.packed import SequencePacks

_conv_backward = torch.ops.aten.convolution_backward


class StepTape:
    """What the steps of one sequence keep for a gradient made once, when backward reaches the
    parameters they share (see `share`): two tensors per step, in the order backward meets
    the steps, detached, so nothing kept leads back through the graph to the tape (no
    reference cycle). `finish(tape, *params)` then makes those parameters' gradients.
    (convlstm.winograd.FilterTape folds each step into a running total instead.)"""

    def __init__(self, finish: Callable[..., tuple[Tensor | None, ...]]) -> None:
        self.finish = finish
        self.firsts: list[Tensor] = []
        self.seconds: list[Tensor] = []

    def keep(self, head, first: Tensor, second: Tensor) -> None:
        """Keep a step's pair if this backward reaches `head` (the shared parameters' node):
        not, say, in autograd.grad of the inputs alone, whose steps a later full backward
        would count again."""
        if head is not None and torch._C._will_engine_execute_node(head):
            self.firsts.append(first.detach())
            self.seconds.append(second.detach())

    @property
    def kept(self) -> bool:
        return bool(self.firsts)

    def join(self, dim: int) -> tuple[Tensor, Tensor]:
        """All steps' firsts and seconds, each concatenated along `dim`; one list at a time,
        each let go once joined (less memory at the peak)."""
        firsts = self.firsts[0] if len(self.firsts) == 1 else torch.cat(self.firsts, dim)
        self.firsts = []
        seconds = self.seconds[0] if len(self.seconds) == 1 else torch.cat(self.seconds, dim)
        self.seconds = []
        return firsts, seconds


def refuse_second_order(grad: Tensor, option: str) -> None:
    """Per-sequence gradients are made outside autograd's graph: no create_graph."""
    if grad.requires_grad:
        raise RuntimeError(
            f"SpeedOptions.{option} makes gradients that cannot be differentiated again: "
            "no create_graph=True with it"
        )


class _Head(Function):
    """The shared parameters as the steps see them; its backward runs once every step's
    backward has, and makes their gradients from the tape in one go."""

    @staticmethod
    def forward(ctx, tape: StepTape, *params: Tensor):
        ctx.tape = tape
        ctx.save_for_backward(*params)
        ctx.set_materialize_grads(False)  # the steps send no gradient here: no zeros to add
        return tuple(p.view_as(p) for p in params)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        tape = ctx.tape
        made = tape.finish(tape, *ctx.saved_tensors) if tape.kept else (None,) * len(grads)
        out = [  # plus other uses of the returned parameters, if any
            m if g is None else (g if m is None else m + g)
            for m, g in zip(made, grads, strict=True)
        ]
        return (None, *out)


def share(tape: StepTape, *params: Tensor) -> tuple[Tensor, ...]:
    """`params` for the steps of one sequence: their gradients come from `tape.finish`."""
    return _Head.apply(tape, *params)


def _grads(padding: int, x: Tensor, grad: Tensor, weight: Tensor, mask: list[bool]):
    p = padding
    bias_sizes = [weight.shape[0]] if mask[2] else None
    return _conv_backward(
        grad, x, weight, bias_sizes, [1, 1], [p, p], [1, 1], False, [0, 0], 1, mask
    )


class _TapedConv(Function):
    """F.conv2d whose backward returns the input gradient and keeps (input, gradient) for
    the weight's; with packs (convlstm.packed.SequencePacks), both convolutions run from
    them."""

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        tape: StepTape,
        padding: int,
        packs: SequencePacks | None,
        weight: Tensor,
        *bias: Tensor,
    ):
        ctx.tape, ctx.padding, ctx.packs = tape, padding, packs
        ctx.head = weight.grad_fn  # _Head's node, None when nothing needs the weight's gradient
        ctx.save_for_backward(x, weight)
        with torch.autocast(x.device.type, enabled=False):  # operands are already cast
            if packs is not None:
                return packs.conv(x)
            return F.conv2d(x, weight, bias[0] if bias else None, padding=padding)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        refuse_second_order(grad, "batched_wgrad")
        x, weight = ctx.saved_tensors
        dx = None
        if ctx.needs_input_grad[0]:
            if ctx.packs is not None:
                dx = ctx.packs.input_grad(grad)
            else:
                dx = _grads(ctx.padding, x, grad, weight, [True, False, False])[0]
        ctx.packs = None  # not kept alive by a graph that outlives its backward
        ctx.tape.keep(ctx.head, x, grad)
        return (dx, None, None, None, None, *([None] * (len(ctx.needs_input_grad) - 5)))


class WeightGradBatch:
    """Stride-1, `padding`-padded convolutions with one weight (C_out, C_in, k, k) and optional
    bias over one sequence, whose weight and bias gradients are computed once, batched.
    Under autocast the weight, bias and inputs are cast once to its dtype, as F.conv2d would.
    With `packed`, where convlstm.packed serves (the CPU, float32 or bf16), each step's
    convolution and input gradient run from the weight packed once per sequence for oneDNN
    (SequencePacks)."""

    def __init__(
        self, weight: Tensor, bias: Tensor | None, padding: int, packed: bool = False
    ) -> None:
        kind = weight.device.type
        if torch.is_autocast_enabled(kind):
            dtype = torch.get_autocast_dtype(kind)
            weight = weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        self.padding = padding

        def finish(tape: StepTape, weight: Tensor, *bias: Tensor):
            x, grad = tape.join(0)  # all steps stacked along the batch
            _, dw, db = _grads(padding, x, grad, weight, [False, True, bool(bias)])
            return (dw, db)[: 1 + len(bias)]

        self.tape = StepTape(finish)
        self.weight, *rest = share(self.tape, weight, *([] if bias is None else [bias]))
        self.bias = rest[0] if rest else None
        self.packs = None
        if packed and packing.serves(weight, weight):
            self.packs = SequencePacks(self.weight, self.bias, padding)

    def conv(self, x: Tensor) -> Tensor:
        bias = [] if self.bias is None else [self.bias]
        x = x.to(self.weight.dtype)
        return _TapedConv.apply(x, self.tape, self.padding, self.packs, self.weight, *bias)
