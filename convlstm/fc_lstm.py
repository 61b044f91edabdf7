"""FC-LSTM (Srivastava et al. 2015): the fully connected LSTM baseline over flattened frames."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from convlstm.config import ModelConfig
from convlstm.errors import ShapeError
from convlstm.forecaster import Forecaster, output_activation


class FCState(NamedTuple):
    layers: list  # (h, c) per encoder layer, each (B, units), bottom first
    last_frame: Tensor  # the last frame read, (B, C, H, W): the decoder's first input


def _lstm_stack(input_size: int, units: tuple[int, ...], forget_bias: float) -> nn.ModuleList:
    cells = nn.ModuleList()
    for i, n in enumerate(units):
        cell = nn.LSTMCell(input_size if i == 0 else units[i - 1], n)
        with torch.no_grad():  # torch's gate order is i, f, g, o; one of the two biases is enough
            cell.bias_ih[n : 2 * n].fill_(forget_bias)
            cell.bias_hh[n : 2 * n].zero_()
        cells.append(cell)
    return cells


class FCLSTMForecaster(Forecaster):
    """An encoder LSTM stack reads flattened frames (C*H*W inputs); a decoder stack with its own
    weights (the "conditional future predictor") starts from the encoder's final states and is
    fed the previous frame at every step: first the last context frame, then its own prediction
    (or, where `teacher_mask` says so, the true frame). A linear layer maps the decoder's top
    state to the next frame. The frame size is fixed at construction (`frame_size`).
    Our choices where the paper leaves room: the decoder's first input is the last context
    frame (not a blank frame), the cells have no peepholes, and torch's LSTMCell carries two
    bias vectors (the forget bias is set on one).
    """

    feeds_back = True

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        height, width = config.frame_size
        self.frame_shape = (config.in_channels, height, width)
        size = config.in_channels * height * width
        units = config.hidden_channels
        self.encoder = _lstm_stack(size, units, config.forget_bias)
        self.decoder = _lstm_stack(size, units, config.forget_bias)
        self.head = nn.Linear(units[-1], size)
        self.out_act = output_activation(config.output_activation)

    @staticmethod
    def _run(cells: nn.ModuleList, x: Tensor, states: list) -> Tensor:
        for i, cell in enumerate(cells):
            states[i] = cell(x, states[i])  # (h, c), each (B, units_i)
            x = states[i][0]
        return x

    def encode(self, context: Tensor, state: FCState | None = None) -> FCState:
        """Read context frames (B, T, C, H, W)."""
        self._check_context(context)
        states = [None] * len(self.encoder) if state is None else list(state.layers)
        flat = context.flatten(2)  # (B, T, C*H*W)
        for t in range(flat.shape[1]):
            self._run(self.encoder, flat[:, t], states)
        return FCState(states, context[:, -1])

    def forecast(
        self,
        state: FCState,
        horizon: int,
        targets: Tensor | None = None,
        teacher_mask: Tensor | None = None,
    ) -> Tensor:
        """Roll out `horizon` frames (B, horizon, C, H, W); teacher_mask (B, horizon - 1): where
        True, step k+1 is fed targets[:, k] instead of the prediction of frame k."""
        self._check_horizon(horizon)
        if teacher_mask is not None and targets is None:
            raise ShapeError("teacher_mask needs targets")
        states = list(state.layers)  # the decoder starts from the encoder's final states
        feed, preds = state.last_frame, []
        for k in range(horizon):
            if k > 0:
                feed = preds[-1]
                if teacher_mask is not None:
                    use_truth = teacher_mask[:, k - 1].view(-1, 1, 1, 1)  # (B, 1, 1, 1)
                    feed = torch.where(use_truth, targets[:, k - 1].to(feed.dtype), feed)
            top = self._run(self.decoder, feed.flatten(1), states)  # (B, units)
            preds.append(self.out_act(self.head(top)).unflatten(1, self.frame_shape))
        return torch.stack(preds, dim=1)  # (B, horizon, C, H, W)
