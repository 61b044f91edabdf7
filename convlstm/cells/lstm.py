"""ConvLSTM (Shi et al. 2015), with and without peephole connections."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from convlstm import packed, winograd
from convlstm.cells.base import GateNorm, RecurrentCell, conv, gate_bias, with_input
from convlstm.errors import ConfigError, ShapeError
from convlstm.winograd import WinogradSequence

Conv = Callable[[Tensor], Tensor]

PEEPHOLES = ("none", "channel", "position")


def lstm_update(z: Tensor, c: Tensor, z_more: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The plain ConvLSTM update from gate pre-activations z (+ z_more) (B, 4C, H, W), gates in
    order input, forget, candidate, output: c' = σ(f) c + σ(i) tanh(g), h' = σ(o) tanh(c').
    The eager reference; the fast path runs the same update as compiled kernels with a
    hand-written backward (convlstm.gates), tested equal to this one."""
    if z_more is not None:
        z = z + z_more
    i, f, g, o = z.chunk(4, dim=1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


class ConvLSTMCell(RecurrentCell):
    """ConvLSTM. State (h, c). Without peepholes (the default):

        [i, f, g, o] = N(W * [x, h] + b)       (one convolution for all four gates)
        c' = σ(f) ⊙ c + σ(i) ⊙ tanh(g)
        h' = σ(o) ⊙ tanh(N_c(c'))

    With `peephole="channel"` or `"position"` (Shi et al. 2015, eq. 3) the input and forget
    gates also see W_ci ⊙ c and W_cf ⊙ c, and the output gate sees W_co ⊙ c':

        i = σ(z_i + W_ci ⊙ c)    f = σ(z_f + W_cf ⊙ c)    o = σ(z_o + W_co ⊙ c')

    The peephole weights are parameters of shape (C, 1, 1) ("channel", the default of the
    peephole cell) or (C, H, W) ("position", as in the paper: then `grid_size=(H, W)` is
    required and other grid sizes are refused). They start at zero, so training starts from
    the plain ConvLSTM.

    `norm` ("none", "layer", "group"; see GateNorm) normalises the gate pre-activations (N) and
    the memory before the output tanh (N_c), as in the layer-normalised LSTM of Ba et al. 2016.
    `in_channels=0` makes a cell with no input (the top of Shi et al.'s forecaster): x is None.
    """

    state_size = 2
    fused_update = None  # set by convlstm.speed: convlstm.gates' update for the plain cell

    def __init__(
        self,
        *,
        in_channels: int,
        hidden_channels: int,
        kernel_size: int = 3,
        bias: bool = True,
        forget_bias: float = 1.0,
        norm: str = "none",
        peephole: str = "none",
        grid_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__(
            in_channels=in_channels, hidden_channels=hidden_channels, kernel_size=kernel_size
        )
        if peephole not in PEEPHOLES:
            raise ConfigError(f"peephole must be one of {', '.join(PEEPHOLES)}, got {peephole!r}")
        if peephole == "position" and (grid_size is None or len(grid_size) != 2):
            raise ConfigError("per-position peepholes need grid_size=(H, W) of the cell's grid")
        c = hidden_channels
        self.norm = GateNorm(norm, gates=4, channels=c)
        self.cell_norm = GateNorm(norm, gates=1, channels=c)
        # Gate order along the output channels: input, forget, candidate, output.
        self.conv = conv(in_channels + c, 4 * c, kernel_size, bias=bias and norm == "none")
        shift = gate_bias(self.conv, self.norm)
        if shift is not None:
            with torch.no_grad():
                shift[c : 2 * c].fill_(forget_bias)
        self.peephole = peephole
        self.grid_size = tuple(grid_size) if peephole == "position" else None
        if peephole != "none":
            shape = (c, 1, 1) if peephole == "channel" else (c, *self.grid_size)
            self.w_ci = nn.Parameter(torch.zeros(shape))
            self.w_cf = nn.Parameter(torch.zeros(shape))
            self.w_co = nn.Parameter(torch.zeros(shape))

    def step(
        self, x: Tensor | None, state: tuple[Tensor, ...], conv: Conv | None = None
    ) -> tuple[Tensor, Tensor]:
        h, c = state
        return self._update((self.conv if conv is None else conv)(with_input(x, h)), c)

    def open_sequence(self) -> Conv | None:
        """The gate convolution for the steps of one sequence (see sequence_scope), or None
        for the plain self.conv."""
        if self.winograd_now():
            return self._winograd(self.conv.bias)
        if self.sequence_grads_now():
            return self._sequence_conv(self.conv.weight, self.conv.bias)
        return None

    def step_convs(self, make) -> Conv:
        return make(self.conv)

    def _winograd(self, bias: Tensor | None, channels: tuple[int, int] | None = None) -> Conv:
        """x -> W[:, lo:hi] * x + b by Winograd for one sequence (channels (lo, hi), all by
        default), the filter transformed once (or taken from an open shared_transforms
        scope), its gradient folded in its domain (not with checkpointing: autograd sums the
        steps' gradients, recomputed in backward, itself)."""
        return WinogradSequence(
            self.conv.weight, bias, batch_grad=not self.checkpointing, channels=channels
        )

    def _sequence_conv(self, weight: Tensor, bias: Tensor | None, batch: bool = True) -> Conv:
        """x -> W * x + b for one sequence, its gradients made through convlstm.wgrad while
        grad is enabled: the weight's batched over the steps (with batch and batched_wgrad),
        the input's as a forward convolution (forward_dgrad)."""
        made = self.wgrad_conv(weight, bias, self.kernel_size // 2, batch)
        return made or (lambda x: F.conv2d(x, weight, bias, padding=self.kernel_size // 2))

    # The hoisted form (convlstm.speed): W * [x, h] = W_x * x + W_h * h, so the input part can
    # be computed for many frames in one convolution, and W_h * h skipped while h is zero.
    def split_weights(self) -> tuple[Conv, Conv]:
        """(W_x * . + b, W_h * .), made once per sequence: W_x and W_h dense, in the autocast
        dtype if autocast is on (so the per-step convolutions neither copy nor cast them),
        Winograd-transformed with `winograd` (one transform of W for both, shared with the
        forecast steps' W inside a winograd.shared_transforms scope); W_h's gradient batched
        with `batched_wgrad`; both input gradients by forward convolutions with
        `forward_dgrad`; without autograd, with `packed`, both from kept packs."""
        if self.winograd_now():
            n, c = self.in_channels, self.conv.weight.shape[1]
            with winograd.shared_transforms():  # one transform serves both parts
                return self._winograd(self.conv.bias, (0, n)), self._winograd(None, (n, c))
        weight = self.conv.weight
        n = self.in_channels
        if self.packs_now():
            dtype = packed.compute_dtype(weight)
            return (
                packed.kept_conv(self.conv, dtype, (0, n)),
                packed.kept_conv(self.conv, dtype, (n, weight.shape[1]), bias=False),
            )
        kind = weight.device.type
        if torch.is_autocast_enabled(kind):
            weight = weight.to(torch.get_autocast_dtype(kind))
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        w_x = weight[:, :n].contiguous(memory_format=layout)
        w_h = weight[:, n:].contiguous(memory_format=layout)
        return (
            self._sequence_conv(w_x, self.conv.bias, batch=False),
            self._sequence_conv(w_h, None, batch=True),
        )

    def project_input(self, x: Tensor, weights: tuple[Conv, Conv]) -> Tensor:
        """W_x * x + b for frames x (N, C_in, H, W) -> (N, 4C, H, W)."""
        return weights[0](x)

    def step_projected(
        self,
        from_x: Tensor,
        state: tuple[Tensor, ...],
        weights: tuple[Conv, Conv],
        zero_state: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """step() given project_input(x); zero_state: h is known to be zero (skip W_h * h)."""
        h, c = state
        return self._update(from_x, c, None if zero_state else weights[1](h))

    def _update(self, z: Tensor, c: Tensor, z_more: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(h', c') from the gate convolution's output z (+ z_more) (B, 4C, H, W) and c."""
        if self.grid_size is not None and tuple(c.shape[-2:]) != self.grid_size:
            raise ShapeError(
                f"per-position peephole weights were built for a {self.grid_size[0]}x"
                f"{self.grid_size[1]} grid, got {c.shape[-2]}x{c.shape[-1]}"
            )
        # (torch.compile, convlstm.compiled, traces the plain update and fuses it itself)
        if self.fused_update is not None and not torch.compiler.is_compiling():
            return self.fused_update(z, c, z_more)
        if self.peephole == "none" and self.norm.kind == "none":
            return lstm_update(z, c, z_more)
        z = self.norm(z if z_more is None else z + z_more)
        i, f, g, o = z.chunk(4, dim=1)
        if self.peephole != "none":
            i = i + self.w_ci * c
            f = f + self.w_cf * c
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        if self.peephole != "none":
            o = o + self.w_co * c
        h = torch.sigmoid(o) * torch.tanh(self.cell_norm(c))
        return h, c


class PeepholeConvLSTMCell(ConvLSTMCell):
    """ConvLSTM with peephole connections (Shi et al. 2015, eq. 3); per-channel by default."""

    def __init__(self, *, peephole: str = "channel", **kwargs) -> None:
        if peephole == "none":
            raise ConfigError("a peephole cell needs peephole='channel' or 'position'")
        super().__init__(peephole=peephole, **kwargs)
