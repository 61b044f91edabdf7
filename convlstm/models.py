"""Forecasting models. Both share one interface:

    state = model.encode(context)                    # context (B, T, C, H, W); continue with state=
    preds = model.forecast(state, horizon)           # (B, horizon, C, H, W)
    preds = model(context, horizon)                  # the two above in one call

`encode` can be fed one frame at a time (streaming) and gives the same state as one long call.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from convlstm.cells import make_cell
from convlstm.config import ModelConfig
from convlstm.errors import ShapeError
from convlstm.layers import ConvRNN, DownStage, UpStage, check_video, patchify, unpatchify


def _activation(name: str) -> nn.Module:
    return nn.Sigmoid() if name == "sigmoid" else nn.Identity()


class Forecaster(nn.Module):
    """The interface both model shapes share: encode, forecast, step, and the two in one call."""

    feeds_back = False  # whether forecast() can be fed true frames (teacher forcing)

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.patch = config.patch_size

    def encode(self, context: Tensor, state=None):
        raise NotImplementedError

    def forecast(self, state, horizon: int, targets=None, teacher_mask=None) -> Tensor:
        raise NotImplementedError

    def step(self, frame: Tensor, state):
        """Feed one frame (B, C, H, W); the same as encode() of a one-frame sequence."""
        return self.encode(frame.unsqueeze(1), state)

    def forward(
        self,
        context: Tensor,
        horizon: int,
        targets: Tensor | None = None,
        teacher_mask: Tensor | None = None,
    ) -> Tensor:
        return self.forecast(self.encode(context), horizon, targets, teacher_mask)

    def _check_context(self, context: Tensor) -> None:
        check_video(context, "context")
        if context.shape[2] != self.config.in_channels:
            raise ShapeError(
                f"model expects {self.config.in_channels} channels per frame, "
                f"got {context.shape[2]}"
            )


class StackedState(NamedTuple):
    layers: list  # one cell state per layer, bottom first
    prediction: Tensor  # the model's prediction of the next frame, (B, C, H, W)


class StackedForecaster(Forecaster):
    """A stack of cells that predicts the next frame at every step (OpenSTL's ConvLSTM layout).

    Frames are cut into patch x patch blocks (64x64x1 -> 16x16x16 for patch 4); layer l sees layer
    l-1's hidden state; a 1x1 convolution maps the top hidden state to the next (patched) frame.
    While forecasting, each step is fed the previous prediction, or, where `teacher_mask` says so
    (scheduled sampling in training), the true previous frame.
    """

    feeds_back = True  # forecast() can be fed true frames instead of its own predictions

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        grid_channels = config.in_channels * config.patch_size**2
        layers = []
        for i, hidden in enumerate(config.hidden_channels):
            cell = make_cell(
                config.cell,
                in_channels=grid_channels if i == 0 else config.hidden_channels[i - 1],
                hidden_channels=hidden,
                kernel_size=config.kernel_size,
                forget_bias=config.forget_bias,
            )
            layers.append(ConvRNN(cell))
        self.layers = nn.ModuleList(layers)
        self.head = nn.Conv2d(config.hidden_channels[-1], grid_channels, kernel_size=1)
        self.out_act = _activation(config.output_activation)

    def _predict(self, top_hidden: Tensor) -> Tensor:
        return unpatchify(self.out_act(self.head(top_hidden)), self.patch)  # (B, C, H, W)

    def encode(self, context: Tensor, state: StackedState | None = None) -> StackedState:
        """Read context frames (B, T, C, H, W), layer by layer over the whole sequence."""
        return self._encode(context, state, every_step=False)[0]

    def encode_with_predictions(
        self, context: Tensor, state: StackedState | None = None
    ) -> tuple[StackedState, Tensor]:
        """encode(), plus the prediction made after every context frame: (B, T, C, H, W), where
        [:, t] predicts frame t + 1 (OpenSTL trains on these and the forecast: 19 frames)."""
        return self._encode(context, state, every_step=True)

    def _encode(
        self, context: Tensor, state: StackedState | None, every_step: bool
    ) -> tuple[StackedState, Tensor | None]:
        self._check_context(context)
        b, t = context.shape[:2]
        x = patchify(context.flatten(0, 1), self.patch).unflatten(0, (b, t))  # (B, T, Cp, h, w)
        layer_states = [None] * len(self.layers) if state is None else list(state.layers)
        for i, layer in enumerate(self.layers):
            x, layer_states[i] = layer(x, layer_states[i])  # (B, T, C_hid_i, h, w)
        if not every_step:
            return StackedState(layer_states, self._predict(x[:, -1])), None
        preds = self._predict(x.flatten(0, 1)).unflatten(0, (b, t))  # (B, T, C, H, W)
        return StackedState(layer_states, preds[:, -1]), preds

    def forecast(
        self,
        state: StackedState,
        horizon: int,
        targets: Tensor | None = None,
        teacher_mask: Tensor | None = None,
    ) -> Tensor:
        """Roll out `horizon` frames (B, horizon, C, H, W).

        teacher_mask (B, horizon - 1) bool: where True, step k+1 is fed targets[:, k] instead of
        the prediction of frame k (scheduled sampling). targets is (B, >= horizon - 1, C, H, W).
        """
        if horizon < 1:
            raise ShapeError(f"horizon must be at least 1, got {horizon}")
        if teacher_mask is not None and targets is None:
            raise ShapeError("teacher_mask needs targets")
        preds = [state.prediction]
        for k in range(horizon - 1):
            feed = state.prediction
            if teacher_mask is not None:
                use_truth = teacher_mask[:, k].view(-1, 1, 1, 1)  # (B, 1, 1, 1)
                feed = torch.where(use_truth, targets[:, k].to(feed.dtype), feed)
            state = self.step(feed, state)
            preds.append(state.prediction)
        return torch.stack(preds, dim=1)  # (B, horizon, C, H, W)


class EncoderForecaster(Forecaster):
    """Shi et al. (2015, 2017): an encoder of RNN layers behind strided convolutions reads the
    context; a forecaster of RNN layers mirrors it (top first, transposed convolutions going up
    in resolution) and starts from the encoder's final states. The forecaster takes no frames
    as input (its top cell has no input), so any horizon can be rolled out from one state.
    """

    feeds_back = False  # the forecaster is not fed frames: scheduled sampling does not apply

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        hidden = config.hidden_channels
        strides = config.stage_strides
        grid_channels = config.in_channels * config.patch_size**2
        n = len(hidden)

        def cell(in_channels: int, i: int) -> nn.Module:
            return make_cell(
                config.cell,
                in_channels=in_channels,
                hidden_channels=hidden[i],
                kernel_size=config.kernel_size,
                forget_bias=config.forget_bias,
            )

        self.down = nn.ModuleList(
            DownStage(
                in_channels=grid_channels if i == 0 else hidden[i - 1],
                out_channels=hidden[i],
                stride=strides[i],
            )
            for i in range(n)
        )
        self.encoder = nn.ModuleList(ConvRNN(cell(hidden[i], i)) for i in range(n))
        # Forecaster layer i takes the upsampled output of layer i+1; the top one takes nothing.
        self.forecaster = nn.ModuleList(cell(0 if i == n - 1 else hidden[i], i) for i in range(n))
        self.up = nn.ModuleList(
            UpStage(
                in_channels=hidden[i],
                out_channels=hidden[i - 1] if i > 0 else hidden[0],
                stride=strides[i],
            )
            for i in range(n)
        )
        self.head = nn.Conv2d(hidden[0], grid_channels, kernel_size=1)
        self.out_act = _activation(config.output_activation)

    def encode(self, context: Tensor, state: list | None = None) -> list:
        """Read context frames (B, T, C, H, W); returns one state per layer, bottom first."""
        self._check_context(context)
        b, t = context.shape[:2]
        x = patchify(context.flatten(0, 1), self.patch)  # (B*T, Cp, h, w)
        states = [None] * len(self.encoder) if state is None else list(state)
        for i, (down, rnn) in enumerate(zip(self.down, self.encoder, strict=True)):
            x = down(x).unflatten(0, (b, t))  # (B, T, C_i, h_i, w_i)
            x, states[i] = rnn(x, states[i])
            x = x.flatten(0, 1)  # (B*T, C_i, h_i, w_i)
        return states

    def forecast(
        self,
        state: list,
        horizon: int,
        targets: Tensor | None = None,
        teacher_mask: Tensor | None = None,
    ) -> Tensor:
        """Roll out `horizon` frames (B, horizon, C, H, W) from the encoder's states."""
        if horizon < 1:
            raise ShapeError(f"horizon must be at least 1, got {horizon}")
        if teacher_mask is not None:
            raise ShapeError(
                "EncoderForecaster is not fed frames while forecasting: no teacher_mask"
            )
        states = list(state)
        preds = []
        for _ in range(horizon):
            x = None
            for i in reversed(range(len(self.forecaster))):
                h, states[i] = self.forecaster[i](x, states[i])
                x = self.up[i](h)  # (B, C_{i-1}, h_{i-1}, w_{i-1})
            preds.append(unpatchify(self.out_act(self.head(x)), self.patch))
        return torch.stack(preds, dim=1)  # (B, horizon, C, H, W)


MODELS: dict[str, type[Forecaster]] = {
    "stacked": StackedForecaster,
    "encoder_forecaster": EncoderForecaster,
}


def build_model(config: ModelConfig) -> Forecaster:
    """The model that `config` describes, freshly initialised."""
    return MODELS[config.architecture](config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
