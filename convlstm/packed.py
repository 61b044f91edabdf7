"""Convolutions from weights packed once into oneDNN's blocked layout (the CPU).

PyTorch's CPU convolution hands oneDNN the weight as a plain tensor, and oneDNN reorders it
into its blocked layout at every call. For a recurrent cell, which applies the same weight at
every step, that reorder is repeated work, and at small batches it costs as much as the
convolution itself: one ConvLSTM-S gate convolution (256 -> 512 channels, 5x5, a 16x16 grid)
took 1.1 ms at batch 1 in bf16 from a plain channels-last weight, 0.54 ms from a packed one,
and 3.5 ms under autocast, which also casts the weight at every call (a 2-core Xeon with
AMX-BF16). Here the weight is cast and packed once and the convolution runs from the pack
(`torch.ops.mkldnn._convolution_pointwise`, the operator torch.compile's CPU backend uses for
frozen weights); the result is the same convolution (equal bits where measured).

    conv = kept_conv(cell.conv, torch.bfloat16)   # packed on first use, kept while unchanged
    z = conv(x)                                   # = F.conv2d(x, W, b, padding=k // 2) in bf16

A kept pack is remade when the weight changes in place (its version counter moves: optimizer
steps, load_state_dict, copy_), but not after a change made through `.data`, as for
convlstm.winograd.kept_transform. Inference-mode weights (no version counter) and other
devices are not packed (`serves`); nor is anything where this PyTorch has no oneDNN.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

# dtypes a pack is made in: float32 and bf16 (autocast's dtype on an AMX CPU)
DTYPES = (torch.float32, torch.bfloat16)


@functools.cache
def available() -> bool:
    """Whether this PyTorch runs convolutions from packed weights (built with oneDNN)."""
    return torch.backends.mkldnn.is_available() and hasattr(
        torch.ops.mkldnn, "_convolution_pointwise"
    )


def compute_dtype(weight: Tensor) -> torch.dtype:
    """The dtype F.conv2d would run in here: autocast's, when it is on (it leaves float64
    alone), else the weight's."""
    kind = weight.device.type
    if torch.is_autocast_enabled(kind) and weight.dtype != torch.float64:
        return torch.get_autocast_dtype(kind)
    return weight.dtype


def serves(x: Tensor, weight: Tensor) -> bool:
    """Whether a convolution of x with `weight` can run from a pack: on the CPU, in float32
    or bf16, for a weight with a version counter, where oneDNN is built in and enabled."""
    return (
        x.device.type == "cpu"
        and weight.device.type == "cpu"
        and not weight.is_inference()
        and compute_dtype(weight) in DTYPES
        and available()
        and torch.backends.mkldnn.enabled
    )


def pack(weight: Tensor, padding: int, input_shape: tuple[int, ...]) -> Tensor:
    """`weight` (C_out, C_in, k, k), already in the compute dtype, in oneDNN's blocked layout
    for stride-1 convolutions with `padding` of inputs shaped like `input_shape` (other
    shapes get the right result, but possibly far slower: keep a pack per shape). Not
    differentiable."""
    dense = weight.detach().contiguous()
    p = [padding, padding]
    return torch._C._nn.mkldnn_reorder_conv2d_weight(
        dense.to_mkldnn(), p, [1, 1], [1, 1], 1, list(input_shape)
    )


def packed_conv(x: Tensor, packed: Tensor, bias: Tensor | None, padding: int) -> Tensor:
    """F.conv2d(x, W, bias, padding=padding) for packed = pack(W, ...), x cast to W's dtype;
    returns channels-last (N, C_out, H, W). Not differentiable."""
    x = x.to(packed.dtype).contiguous(memory_format=torch.channels_last)
    p = [padding, padding]
    return torch.ops.mkldnn._convolution_pointwise(
        x, packed, bias, p, [1, 1], [1, 1], 1, "none", [], ""
    )


class SequencePacks:
    """One weight's packs for the steps of one training sequence (convlstm.wgrad): its
    convolution, and its input gradient, which is the convolution of the output gradient with
    the filter flipped and its two channel axes swapped (stride 1, 'same' padding, odd square
    filters). Each is packed on first use, for each input shape, and not kept: the weights
    change at every training step. `weight` and `bias` are taken in the dtype they come in
    (autocast's, cast once)."""

    def __init__(self, weight: Tensor, bias: Tensor | None, padding: int) -> None:
        self.weight = weight.detach()
        self.bias = None if bias is None else bias.detach()
        self.padding = padding
        self._forward: dict[tuple[int, ...], Tensor] = {}  # input shape -> pack
        self._backward: dict[tuple[int, ...], Tensor] = {}

    def conv(self, x: Tensor) -> Tensor:
        """F.conv2d(x, weight, bias, padding=padding)."""
        packed = self._forward.get(tuple(x.shape))
        if packed is None:
            packed = self._forward[tuple(x.shape)] = pack(self.weight, self.padding, x.shape)
        return packed_conv(x, packed, self.bias, self.padding)

    def input_grad(self, grad: Tensor) -> Tensor:
        """The gradient of conv(x) with respect to x, given the gradient of its output."""
        self._forward.clear()  # backward has begun: the forward's packs are done with
        padding = self.weight.shape[-1] - 1 - self.padding
        packed = self._backward.get(tuple(grad.shape))
        if packed is None:
            # from the contiguous layout, flipped first: the transposed copy then moves whole
            # rows of k * k taps (from a channels-last weight it took 2-3x as long)
            flipped = self.weight.contiguous().flip(2, 3).transpose(0, 1)
            packed = self._backward[tuple(grad.shape)] = pack(flipped, padding, grad.shape)
        return packed_conv(grad, packed, None, padding)


# weight -> {(dtype, lo, hi, with bias, input shape): (state, pack, bias)}, for as long as the
# weight lives, at most KEPT_PER_WEIGHT of them (a stream, a forecast's steps and its hoisted
# context need three shapes, the two halves of a hoisted ConvLSTM weight one each more)
KEPT_PER_WEIGHT = 6
_KEPT: WeakIdKeyDictionary = WeakIdKeyDictionary()


def kept_conv(
    conv: nn.Conv2d,
    dtype: torch.dtype,
    channels: tuple[int, int] | None = None,
    bias: bool = True,
) -> Callable[[Tensor], Tensor]:
    """x -> conv's convolution (over its input channels lo:hi, all by default; with its bias
    unless bias=False) in `dtype` from a pack kept while conv's weight and bias are unchanged
    (checked at every call), for inference (no autograd). `conv`: stride 1, symmetric
    padding, one group."""
    weight, b = conv.weight, conv.bias if bias else None
    lo, hi = channels if channels is not None else (0, weight.shape[1])
    padding = conv.padding[0]
    per_weight = _KEPT.setdefault(weight, {})

    def run(x: Tensor) -> Tensor:
        # one pack per input shape: oneDNN chooses the blocked layout for the shape, and a
        # pack made for another can fall off its fast kernels (a ConvGRU input convolution
        # at batch 2 from a pack made for batch 20 took 48 ms, against 0.6 ms)
        key = (dtype, lo, hi, b is not None, tuple(x.shape))
        state = (
            weight.data_ptr(),
            weight._version,
            weight.dtype,
            weight.shape,
            None if b is None else (b.data_ptr(), b._version),
        )
        kept = per_weight.pop(key, None)  # put back last: the least recently used goes first
        if kept is None or kept[0] != state:
            with torch.no_grad():
                part = weight[:, lo:hi].to(dtype)
                kept = (state, pack(part, padding, x.shape), None if b is None else b.to(dtype))
            while len(per_weight) >= KEPT_PER_WEIGHT:
                per_weight.pop(next(iter(per_weight)))
        per_weight[key] = kept
        return packed_conv(x, kept[1], kept[2], padding)

    return run


def step_conv(conv: nn.Conv2d) -> Callable[[Tensor], Tensor]:
    """kept_conv(conv) in the dtype F.conv2d would run in now (autocast's, or the weight's)."""
    return kept_conv(conv, compute_dtype(conv.weight))


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same parameters and state dict) that, with `packed` set (convlstm.speed),
    runs from a kept pack where no autograd is recording, on the CPU (serves): a model's
    output head, say, at every streamed frame."""

    packed = False

    def forward(self, x: Tensor) -> Tensor:
        if (
            self.packed
            and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
            and self.stride == (1, 1)
            and self.dilation == (1, 1)
            and self.groups == 1
            and self.padding_mode == "zeros"
            and isinstance(self.padding, tuple)
            and self.padding[0] == self.padding[1]
            and self.kernel_size[0] == self.kernel_size[1]
            and serves(x, self.weight)
        ):
            return step_conv(self)(x)
        return super().forward(x)
