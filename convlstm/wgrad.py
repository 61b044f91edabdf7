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

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function
from torch.autograd.function import once_differentiable

_conv_backward = torch.ops.aten.convolution_backward


class _Tape:
    """One sequence's per-step (input, output gradient) pairs, in the order backward meets them.
    Kept apart from WeightGradBatch (which holds the weight, whose autograd node holds the
    tape), and the pairs are kept detached, so that no reference cycle keeps a step's
    tensors alive after backward."""

    def __init__(self, padding: int) -> None:
        self.padding = padding
        self.inputs: list[Tensor] = []
        self.grads: list[Tensor] = []


def refuse_second_order(grad: Tensor, option: str) -> None:
    """Per-sequence gradients are made outside autograd's graph: no create_graph."""
    if grad.requires_grad:
        raise RuntimeError(
            f"SpeedOptions.{option} makes gradients that cannot be differentiated again: "
            "no create_graph=True with it"
        )


def head_will_run(head) -> bool:
    """Whether this backward reaches the per-sequence head (`head`: its autograd node, or
    None): a step keeps its tensors only then. Not, say, in autograd.grad of the inputs
    alone, whose steps a later full backward would count again."""
    return head is not None and torch._C._will_engine_execute_node(head)


def _grads(tape: _Tape, x: Tensor, grad: Tensor, weight: Tensor, mask: list[bool]):
    p = tape.padding
    bias_sizes = [weight.shape[0]] if mask[2] else None
    return _conv_backward(
        grad, x, weight, bias_sizes, [1, 1], [p, p], [1, 1], False, [0, 0], 1, mask
    )


class _Head(Function):
    """The weight (and bias) as seen by the steps; its backward runs once every step's
    backward has, and computes their weight and bias gradients in one call."""

    @staticmethod
    def forward(ctx, tape: _Tape, weight: Tensor, *bias: Tensor):
        ctx.tape = tape
        ctx.save_for_backward(weight)
        ctx.set_materialize_grads(False)  # the steps send no gradient here: no zeros to add
        return (weight.view_as(weight), *(b.view_as(b) for b in bias))

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        tape = ctx.tape
        (weight,) = ctx.saved_tensors
        has_bias = len(grads) == 2
        out: list[Tensor | None] = [None, None]
        if tape.inputs:
            x, grad = torch.cat(tape.inputs), torch.cat(tape.grads)
            tape.inputs, tape.grads = [], []
            _, out[0], out[1] = _grads(tape, x, grad, weight, [False, True, has_bias])
        for i, g in enumerate(grads):  # other uses of the returned weight / bias, if any
            if g is not None:
                out[i] = g if out[i] is None else out[i] + g
        return (None, *out[: 1 + has_bias])


class _TapedConv(Function):
    """F.conv2d whose backward returns the input gradient and hands (input, gradient) to the
    batch for the weight's."""

    @staticmethod
    def forward(ctx, x: Tensor, tape: _Tape, weight: Tensor, *bias: Tensor):
        ctx.tape = tape
        ctx.head = weight.grad_fn  # _Head's node, None when nothing needs the weight's gradient
        ctx.save_for_backward(x, weight)
        with torch.autocast(x.device.type, enabled=False):  # operands are already cast
            return F.conv2d(x, weight, bias[0] if bias else None, padding=tape.padding)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        refuse_second_order(grad, "batched_wgrad")
        x, weight = ctx.saved_tensors
        dx = None
        if ctx.needs_input_grad[0]:
            dx = _grads(ctx.tape, x, grad, weight, [True, False, False])[0]
        # detached, so the kept tensors hold no graph that leads back to the tape
        if head_will_run(ctx.head):
            ctx.tape.inputs.append(x.detach())
            ctx.tape.grads.append(grad.detach())
        return (dx, None, None, *([None] * (len(ctx.needs_input_grad) - 3)))


class WeightGradBatch:
    """Stride-1, `padding`-padded convolutions with one weight (C_out, C_in, k, k) and optional
    bias over one sequence, whose weight and bias gradients are computed once, batched.
    Under autocast the weight, bias and inputs are cast once to its dtype, as F.conv2d would."""

    def __init__(self, weight: Tensor, bias: Tensor | None, padding: int) -> None:
        kind = weight.device.type
        if torch.is_autocast_enabled(kind):
            dtype = torch.get_autocast_dtype(kind)
            weight = weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        self.tape = _Tape(padding)
        params = _Head.apply(self.tape, weight, *([] if bias is None else [bias]))
        self.weight, *rest = params
        self.bias = rest[0] if rest else None

    def conv(self, x: Tensor) -> Tensor:
        bias = [] if self.bias is None else [self.bias]
        return _TapedConv.apply(x.to(self.weight.dtype), self.tape, self.weight, *bias)
