"""A recurrent convolution's gradients made otherwise than autograd's step by step: weight
gradients batched over time, and input gradients as forward convolutions.

A recurrent cell applies the same convolution at every step, so autograd computes that
weight's gradient step by step (one small GEMM each) and adds the pieces, in the compute dtype
(bf16 under autocast, where the weight is cast once per sequence). With `batch_wgrad`,
`SequenceConv` keeps each step's input and output gradient instead and computes the weight
and bias gradients once, over all steps stacked along the batch, when the backward pass
reaches the weight: the same sum, in one convolution backward (accumulated inside the call,
rounded to the compute dtype once). With `forward_dgrad` each step's input gradient is a
forward convolution with the filter transposed and flipped once per sequence, which may run
faster kernels than the library's data gradient.

    conv = SequenceConv(weight, bias, padding).conv  # once per sequence, with grad enabled
    for t in range(T):
        z = conv(x_t)                                # F.conv2d(x_t, weight, bias, padding=...)

With batch_wgrad each step's backward computes only its input gradient. The inputs and
gradients of every step stay in memory until the weight's gradient is made (more peak memory,
about one gate tensor per step); so it does not combine with activation checkpointing.
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


def flipped(weight: Tensor) -> Tensor:
    """The filter whose forward convolution of an output gradient is the input gradient of a
    stride-1 convolution with `weight` (C_out, C_in, k, k): in and out channels swapped, each
    k x k kernel rotated by 180 degrees (the padding becomes k - 1 - padding)."""
    return weight.transpose(0, 1).flip(-2, -1)


class _SequenceStep(Function):
    """F.conv2d whose backward makes the input gradient (with `turned`, the flipped filter,
    as a forward convolution; with packs, convlstm.packed.SequencePacks, from them) and, with
    a tape, keeps (input, gradient) for the weight's, else makes the weight and bias
    gradients itself."""

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        tape: StepTape | None,
        padding: int,
        packs: SequencePacks | None,
        turned: Tensor | None,
        weight: Tensor,
        *bias: Tensor,
    ):
        ctx.tape, ctx.padding, ctx.packs, ctx.turned = tape, padding, packs, turned
        ctx.head = weight.grad_fn  # _Head's node, None when nothing needs the weight's gradient
        ctx.save_for_backward(x, weight)
        with torch.autocast(x.device.type, enabled=False):  # operands are already cast
            if packs is not None:
                return packs.conv(x)
            return F.conv2d(x, weight, bias[0] if bias else None, padding=padding)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        refuse_second_order(grad, "batched_wgrad" if ctx.tape is not None else "forward_dgrad")
        x, weight = ctx.saved_tensors
        wants = ctx.needs_input_grad
        has_bias = len(wants) > 6
        dx = dw = db = None
        with torch.autocast(grad.device.type, enabled=False):
            if wants[0] and ctx.packs is not None:
                dx = ctx.packs.input_grad(grad)
            elif wants[0] and ctx.turned is not None:
                dx = F.conv2d(grad, ctx.turned, padding=weight.shape[-1] - 1 - ctx.padding)
            elif wants[0]:
                dx = _grads(ctx.padding, x, grad, weight, [True, False, False])[0]
            if ctx.tape is not None:
                ctx.tape.keep(ctx.head, x, grad)
            elif wants[5] or (has_bias and wants[6]):
                mask = [False, wants[5], has_bias and wants[6]]
                _, dw, db = _grads(ctx.padding, x, grad, weight, mask)
        ctx.packs = ctx.turned = None  # not kept alive by a graph that outlives its backward
        return (dx, None, None, None, None, dw, *([db] if has_bias else []))


class SequenceConv:
    """Stride-1, `padding`-padded convolutions with one weight (C_out, C_in, k, k) and optional
    bias over one sequence (its steps, or the hoisted call over all its frames), whose
    gradients are made in one of these ways:
    - batch_wgrad: the weight and bias gradients once, over all steps stacked along the batch
      (the module's docstring);
    - forward_dgrad: each step's input gradient as a forward convolution of its output
      gradient with the filter transposed and flipped (`flipped`, made once per sequence),
      the same sum in another order; on an H100 cuDNN's data-gradient kernels ran at half
      its forward rate at ConvLSTM-S's step shapes (session 5);
    - neither: as autograd would (a plain F.conv2d does that with less overhead).
    Under autocast the weight, bias and inputs are cast once to its dtype, as F.conv2d would.
    With `packed` and batch_wgrad, where convlstm.packed serves (the CPU, float32 or bf16),
    each step's convolution and input gradient run from the weight packed once per sequence
    for oneDNN (SequencePacks)."""

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor | None,
        padding: int,
        *,
        batch_wgrad: bool = True,
        forward_dgrad: bool = False,
        packed: bool = False,
    ) -> None:
        kind = weight.device.type
        if torch.is_autocast_enabled(kind):
            dtype = torch.get_autocast_dtype(kind)
            weight = weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        self.padding = padding
        self.tape = None
        if batch_wgrad:

            def finish(tape: StepTape, weight: Tensor, *bias: Tensor):
                x, grad = tape.join(0)  # all steps stacked along the batch
                _, dw, db = _grads(padding, x, grad, weight, [False, True, bool(bias)])
                return (dw, db)[: 1 + len(bias)]

            self.tape = StepTape(finish)
            weight, *rest = share(self.tape, weight, *([] if bias is None else [bias]))
            bias = rest[0] if rest else None
        self.weight, self.bias = weight, bias
        self.turned = None
        if forward_dgrad:
            channels_last = not weight.is_contiguous() and weight.is_contiguous(
                memory_format=torch.channels_last
            )
            layout = torch.channels_last if channels_last else torch.contiguous_format
            self.turned = flipped(weight.detach()).contiguous(memory_format=layout)
        self.packs = None
        if batch_wgrad and packed and packing.serves(weight, weight):
            self.packs = SequencePacks(self.weight, self.bias, padding)

    def conv(self, x: Tensor) -> Tensor:
        bias = [] if self.bias is None else [self.bias]
        x = x.to(self.weight.dtype)
        return _SequenceStep.apply(
            x, self.tape, self.padding, self.packs, self.turned, self.weight, *bias
        )
