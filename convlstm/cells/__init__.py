"""Recurrent cells. Every cell has one interface:

    state = cell.init_state(batch, height, width)      # zeros, on the cell's device
    h, state = cell(x, state)                          # x: (B, C_in, H, W); state=None -> zeros

`h` is the cell's output (B, C_hidden, H, W); `state` is a tuple of (B, C_hidden, H, W) tensors
whose first entry is h (ConvLSTM: (h, c); GRUs and the plain RNN: (h,); SA-ConvLSTM: (h, c, m)).
Every cell takes `in_channels`, `hidden_channels`, `kernel_size`, `bias` and `norm`;
`in_channels=0` builds a cell without input (then x is None).
"""

from __future__ import annotations

from torch import nn

from convlstm.cells.base import NORMS, GateNorm, RecurrentCell
from convlstm.cells.gru import ConvGRUCell, ConvRNNCell, TrajGRUCell, warp
from convlstm.cells.lstm import ConvLSTMCell, PeepholeConvLSTMCell
from convlstm.cells.sa_lstm import SAConvLSTMCell, SelfAttentionMemory
from convlstm.errors import ConfigError

CELLS: dict[str, type[RecurrentCell]] = {
    "convlstm": ConvLSTMCell,
    "peephole_convlstm": PeepholeConvLSTMCell,
    "convgru": ConvGRUCell,
    "trajgru": TrajGRUCell,
    "sa_convlstm": SAConvLSTMCell,
    "convrnn": ConvRNNCell,
}


def make_cell(name: str, **kwargs) -> nn.Module:
    """Build the cell registered as `name` with keyword arguments."""
    if name not in CELLS:
        raise ConfigError(f"unknown cell {name!r}; choose one of {', '.join(sorted(CELLS))}")
    return CELLS[name](**kwargs)


__all__ = [
    "CELLS",
    "NORMS",
    "ConvGRUCell",
    "ConvLSTMCell",
    "ConvRNNCell",
    "GateNorm",
    "PeepholeConvLSTMCell",
    "RecurrentCell",
    "SAConvLSTMCell",
    "SelfAttentionMemory",
    "TrajGRUCell",
    "make_cell",
    "warp",
]
