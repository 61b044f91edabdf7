"""What every cell shares: argument checks, the zero state, and the optional gate normalisation."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from convlstm import packed, winograd
from convlstm.errors import ConfigError, ShapeError
from convlstm.wgrad import SequenceConv

NORMS = ("none", "layer", "group")


class RecurrentCell(nn.Module):
    """Base of every cell: `h, state = cell(x, state)` with `state` a tuple of (B, C, H, W)
    tensors whose first entry is h. Subclasses set `state_size` (how many tensors) and
    implement `step(x, state)`; x is None for a cell built with `in_channels=0`."""

    state_size = 1
    # Speed options, set by convlstm.speed.apply_speed (the defaults are the eager reference):
    checkpointing = False  # recompute each step's activations in backward (less memory)
    channels_last = False  # new zero states in channels-last memory format
    winograd = False  # 3x3 / 5x5 convolutions by Winograd (cells with step_convs; the CPU)
    # the convolutions from weights packed once for oneDNN (convlstm.packed; the CPU): kept
    # packs without autograd (cells with step_convs), and with batched_wgrad in training
    packed = False
    # the convolutions' weight gradients made once per sequence (convlstm.wgrad), for the
    # cells whose open_sequence supports it (ConvLSTM, ConvGRU, ConvRNN)
    batched_wgrad = False
    # each step's input gradient as a forward convolution with the flipped filter (same cells)
    forward_dgrad = False
    sequence_conv = None  # what open_sequence made, while a sequence is open (sequence_scope)

    def __init__(self, *, in_channels: int, hidden_channels: int, kernel_size: int) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ConfigError(f"kernel_size must be odd (same padding), got {kernel_size}")
        if in_channels < 0 or hidden_channels < 1:
            raise ConfigError(
                f"need in_channels >= 0 and hidden_channels >= 1, got {in_channels}, "
                f"{hidden_channels}"
            )
        self.in_channels = in_channels
        self.hidden_channels = hidden_channels
        self.kernel_size = kernel_size

    def init_state(
        self,
        batch: int,
        height: int,
        width: int,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> tuple[Tensor, ...]:
        # States take the parameters' dtype, so under autocast they stay in float32 (the memory
        # accumulates over many steps) while the convolutions run in bf16 / fp16.
        weight = self.first_parameter()
        shape = (batch, self.hidden_channels, height, width)
        device, dtype = device or weight.device, dtype or weight.dtype
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        return tuple(
            torch.zeros(shape, device=device, dtype=dtype).contiguous(memory_format=layout)
            for _ in range(self.state_size)
        )

    def forward(self, x: Tensor | None, state: tuple[Tensor, ...] | None = None):
        state = self.prepare_state(x, state)
        # the open sequence's convolutions, passed in, so that a checkpointed step recomputed
        # in backward (after the sequence closed) runs the same ones
        convs = self.sequence_conv
        if convs is None and (self.winograd or self.packed) and not torch.is_grad_enabled():
            weight = self.first_parameter()  # inference one step at a time:
            if self.winograd_now(weight) and winograd.keeps_per_step(state[0], weight):
                convs = self.step_convs(winograd.step_conv)
            elif self.packs_now(weight):
                convs = self.step_convs(packed.step_conv)
        if convs is None:
            state = self.run_step(self.step, x, state)
        else:
            state = self.run_step(self.step, x, state, convs)
        return state[0], state

    def winograd_now(self, weight: Tensor | None = None) -> bool:
        """Whether the convolutions run by Winograd now; `weight`: self.first_parameter(),
        where the caller has it already."""
        # Winograd's transforms lose too much in bf16 / fp16: under autocast the convolutions
        # stay direct (and run in the autocast dtype, as asked); nor is Winograd's C code
        # traced by torch.compile (convlstm.compiled), which gets the plain convolution
        if not self.winograd or torch.compiler.is_compiling():
            return False
        weight = self.first_parameter() if weight is None else weight
        return not torch.is_autocast_enabled(weight.device.type)

    def sequence_grads_now(self) -> bool:
        """Whether the convolutions of a sequence opened now make their gradients through
        convlstm.wgrad (batched_wgrad or forward_dgrad, while grad is enabled)."""
        return (self.batched_wgrad or self.forward_dgrad) and torch.is_grad_enabled()

    def wgrad_conv(
        self, weight: Tensor, bias: Tensor | None, padding: int, batch: bool = True
    ) -> Callable[[Tensor], Tensor] | None:
        """x -> W * x + b for one sequence, its gradients made through convlstm.wgrad as the
        options say while grad is enabled: the weight's and bias's once over the steps (with
        `batch` and batched_wgrad; with `packed`, from the weight packed once for oneDNN, the
        CPU), the input's by a forward convolution (forward_dgrad); None where neither
        applies (a plain convolution then)."""
        batch = batch and self.batched_wgrad
        if not ((batch or self.forward_dgrad) and torch.is_grad_enabled()):
            return None
        made = SequenceConv(
            weight,
            bias,
            padding,
            batch_wgrad=batch,
            forward_dgrad=self.forward_dgrad,
            packed=self.packed,
        )
        return made.conv

    def packs_now(self, weight: Tensor | None = None) -> bool:
        """Whether the convolutions run from kept packs now (convlstm.packed): with `packed`,
        without autograd, where packs serve (the CPU, float32 or bf16); `weight`:
        self.first_parameter(), where the caller has it already."""
        if not self.packed or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return False
        weight = self.first_parameter() if weight is None else weight
        return packed.serves(weight, weight)

    def first_parameter(self) -> Tensor:
        """next(self.parameters()), without the generators behind it: asked at every step,
        where those cost about 35 us a cell (a tenth of a small model's streamed frame)."""
        found = _first_parameter(self)
        if found is None:
            raise ValueError(f"{type(self).__name__} has no parameters")
        return found

    def step_convs(self, make):
        """The cell's convolutions for one step without autograd, each made by `make` from its
        nn.Conv2d (winograd.step_conv, packed.step_conv), in the form its step() takes them;
        for the cells that have Winograd and packed convolutions."""
        raise NotImplementedError

    def run_step(self, step, *args) -> tuple[Tensor, ...]:
        """step(*args), recomputed in backward instead of stored when checkpointing."""
        if self.checkpointing and torch.is_grad_enabled():
            # no cell draws random numbers: skipping the RNG state keeps CUDA graphs legal
            return checkpoint(step, *args, use_reentrant=False, preserve_rng_state=False)
        return step(*args)

    def prepare_state(
        self, x: Tensor | None, state: tuple[Tensor, ...] | None
    ) -> tuple[Tensor, ...]:
        """Check x (B, C_in, H, W) or None against the cell and `state`; zeros if state is None."""
        name = type(self).__name__
        if self.in_channels == 0:
            if x is not None:
                raise ShapeError(f"this {name} was built with in_channels=0 and takes x=None")
            if state is None:
                raise ShapeError("a cell without input needs a state to start from")
        else:
            if x is None or x.dim() != 4:
                got = None if x is None else tuple(x.shape)
                raise ShapeError(f"{name} expects x of shape (B, C, H, W), got {got}")
            if x.shape[1] != self.in_channels:
                raise ShapeError(
                    f"{name} was built for {self.in_channels} input channels, got {x.shape[1]}"
                )
            if state is None:
                b, _, height, width = x.shape
                state = self.init_state(b, height, width, device=x.device)  # parameter dtype
        if len(state) != self.state_size:
            raise ShapeError(f"{name} carries {self.state_size} state tensors, got {len(state)}")
        expected = (self.hidden_channels, *(x.shape[-2:] if x is not None else state[0].shape[-2:]))
        for s in state:
            if s.dim() != 4 or tuple(s.shape[1:]) != expected:
                raise ShapeError(
                    f"{name} state tensors must be (B, {expected[0]}, {expected[1]}, "
                    f"{expected[2]}), got {tuple(s.shape)}"
                )
        if any(s.dtype in AUTOCAST_DTYPES for s in state) and not torch.is_autocast_enabled(
            state[0].device.type
        ):
            # made under autocast (h in bf16: low_precision_h), continued outside it: in the
            # parameters' dtype, which the convolutions then run in
            dtype = self.first_parameter().dtype
            if dtype not in AUTOCAST_DTYPES:
                return tuple(s.to(dtype) if s.dtype in AUTOCAST_DTYPES else s for s in state)
        return tuple(state)

    def step(self, x: Tensor | None, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        raise NotImplementedError


# autocast's dtypes, which a state made under it may hold (convlstm.gates' low_precision_h)
AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)


def _first_parameter(module: nn.Module) -> Tensor | None:
    """The first of module.parameters(): its own in order, then its children's, depth first."""
    for p in module._parameters.values():
        if p is not None:
            return p
    for child in module._modules.values():
        if child is not None and (p := _first_parameter(child)) is not None:
            return p
    return None


@contextmanager
def sequence_scope(cells) -> Iterator[None]:
    """While open, each cell of `cells` that has `open_sequence` (and no open sequence yet)
    runs its steps' gate convolution through what that returns: work that is the same for
    every step (a weight transform, a batched weight gradient) is done once per sequence.
    Closing it ends the sequence; a cell with nothing to do per sequence is left as is."""
    opened = []
    for cell in cells:
        if getattr(cell, "open_sequence", None) is not None and cell.sequence_conv is None:
            made = cell.open_sequence()
            if made is not None:
                cell.sequence_conv = made
                opened.append(cell)
    try:
        yield
    finally:
        for cell in opened:  # back to the class's None, not an instance attribute that a
            del cell.sequence_conv  # compiled step (convlstm.compiled) would see as a change


def conv(in_channels: int, out_channels: int, kernel_size: int, bias: bool = True) -> nn.Conv2d:
    """A 'same'-padded convolution."""
    return nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)


def with_input(x: Tensor | None, h: Tensor) -> Tensor:
    """[x, h] along channels (just h for a cell without input); h follows x's dtype (autocast),
    unless h is in autocast's dtype already (convlstm.gates' low_precision_h) and x is float32:
    then x is cast to it, as the gate convolution would cast the whole (the same values,
    without a float32 concatenation); and x follows h's memory format (a channels-last state
    keeps the convolution's input channels-last, where a mixed concatenation would fall back to
    the contiguous format)."""
    if x is None:
        return h
    kind = h.device.type
    if (
        x.dtype == torch.float32
        and torch.is_autocast_enabled(kind)
        and h.dtype == torch.get_autocast_dtype(kind)
    ):
        x = x.to(h.dtype)
    channels_last = torch.channels_last
    if h.dim() == 4 and not h.is_contiguous() and h.is_contiguous(memory_format=channels_last):
        x = x.contiguous(memory_format=channels_last)
    return torch.cat([x, h.to(x.dtype)], dim=1)


class GateNorm(nn.Module):
    """Normalisation of `gates` stacked pre-activations, each of `channels` channels.

    "layer": each gate is normalised over its (C, H, W) (layer norm per gate, Ba et al. 2016);
    "group": each gate's channels are split into gcd(C, 8) groups normalised over (C/G, H, W);
    both with a learned per-channel scale and shift (GroupNorm), so any grid size works.
    "none": the identity. With a norm, the shift replaces the convolution's bias.
    """

    def __init__(self, kind: str, *, gates: int, channels: int) -> None:
        super().__init__()
        if kind not in NORMS:
            raise ConfigError(f"norm must be one of {', '.join(NORMS)}, got {kind!r}")
        self.kind = kind
        per_gate = 1 if kind == "layer" else math.gcd(channels, 8)
        self.norm = (
            nn.GroupNorm(gates * per_gate, gates * channels) if kind != "none" else nn.Identity()
        )

    def forward(self, z: Tensor) -> Tensor:
        return self.norm(z)


def gate_bias(conv_layer: nn.Conv2d, norm: GateNorm) -> Tensor | None:
    """The parameter that holds the gates' bias: the norm's shift when there is a norm."""
    return norm.norm.bias if norm.kind != "none" else conv_layer.bias
