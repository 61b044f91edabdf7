"""Recurrent cells. Every cell has one interface:

    state = cell.init_state(batch, height, width)      # zeros, on the cell's device
    h, state = cell(x, state)                          # x: (B, C_in, H, W); state=None -> zeros

`h` is the cell's output (B, C_hidden, H, W); `state` is whatever the cell carries between steps.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from convlstm.errors import ConfigError, ShapeError

LSTMState = tuple[Tensor, Tensor]  # (h, c), each (B, C_hidden, H, W)


class ConvLSTMCell(nn.Module):
    """ConvLSTM (Shi et al. 2015) without peepholes.

        [i, f, g, o] = W * [x, h] + b          (one convolution for all four gates)
        c' = σ(f) ⊙ c + σ(i) ⊙ tanh(g)
        h' = σ(o) ⊙ tanh(c')

    `in_channels=0` makes a cell with no input (the top of Shi et al.'s forecaster): then x is None.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        hidden_channels: int,
        kernel_size: int = 3,
        bias: bool = True,
        forget_bias: float = 1.0,
    ) -> None:
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
        # Gate order along the output channels: input, forget, candidate, output.
        self.conv = nn.Conv2d(
            in_channels + hidden_channels,
            4 * hidden_channels,
            kernel_size,
            padding=kernel_size // 2,
            bias=bias,
        )
        if bias:
            with torch.no_grad():
                self.conv.bias[hidden_channels : 2 * hidden_channels].fill_(forget_bias)

    def init_state(
        self,
        batch: int,
        height: int,
        width: int,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> LSTMState:
        weight = self.conv.weight
        shape = (batch, self.hidden_channels, height, width)
        h = torch.zeros(shape, device=device or weight.device, dtype=dtype or weight.dtype)
        return h, torch.zeros_like(h)

    def forward(self, x: Tensor | None, state: LSTMState | None = None) -> tuple[Tensor, LSTMState]:
        if self.in_channels == 0:
            if x is not None:
                raise ShapeError("this cell was built with in_channels=0 and takes x=None")
            if state is None:
                raise ShapeError("a cell without input needs a state to start from")
            h, c = state
            stacked = h
        else:
            if x is None or x.dim() != 4:
                got = None if x is None else tuple(x.shape)
                raise ShapeError(f"ConvLSTMCell expects x of shape (B, C, H, W), got {got}")
            if x.shape[1] != self.in_channels:
                raise ShapeError(
                    f"ConvLSTMCell was built for {self.in_channels} input channels, "
                    f"got {x.shape[1]}"
                )
            if state is None:
                state = self.init_state(
                    x.shape[0], x.shape[2], x.shape[3], device=x.device, dtype=x.dtype
                )
            h, c = state
            stacked = torch.cat([x, h.to(x.dtype)], dim=1)  # (B, C_in + C_hid, H, W)
        gates = self.conv(stacked)  # (B, 4 * C_hid, H, W)
        i, f, g, o = gates.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, (h, c)


CELLS: dict[str, type[nn.Module]] = {"convlstm": ConvLSTMCell}


def make_cell(name: str, **kwargs) -> nn.Module:
    """Build the cell registered as `name` with keyword arguments."""
    if name not in CELLS:
        raise ConfigError(f"unknown cell {name!r}; choose one of {', '.join(sorted(CELLS))}")
    return CELLS[name](**kwargs)
