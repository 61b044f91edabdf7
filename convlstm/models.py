"""The convolutional forecasting models (the interface is in convlstm.forecaster):

    state = model.encode(context)                    # context (B, T, C, H, W); continue with state=
    preds = model.forecast(state, horizon)           # (B, horizon, C, H, W)
    preds = model(context, horizon)                  # the two above in one call

`encode` can be fed one frame at a time (streaming) and gives the same state as one long call
(except a bidirectional encoder, which reads the whole context at once).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from convlstm import packed
from convlstm.cells import CELLS, make_cell
from convlstm.cells.base import sequence_scope
from convlstm.config import ModelConfig
from convlstm.errors import ShapeError
from convlstm.fc_lstm import FCLSTMForecaster
from convlstm.forecaster import Forecaster, output_activation
from convlstm.layers import (
    ConvRNN,
    DownStage,
    StateMerge,
    TemporalAttention,
    UpStage,
    patchify,
    run_cell,
    stack_time,
    unpatchify,
)


def cell_options(config: ModelConfig, grid: tuple[int, int] | None) -> dict[str, Any]:
    """The keyword arguments of `config.cell` that the config sets, for a layer whose grid is
    `grid` (H, W), or None when the frame size is not fixed."""
    options: dict[str, Any] = {"kernel_size": config.kernel_size, "norm": config.norm}
    if config.cell in ("convlstm", "peephole_convlstm", "sa_convlstm"):
        options["forget_bias"] = config.forget_bias
    if config.cell == "peephole_convlstm":
        options["peephole"] = config.peephole
        if config.peephole == "position":
            options["grid_size"] = grid
    if config.cell == "trajgru":
        options["links"] = config.trajgru_links
    if config.cell == "sa_convlstm":
        options["key_channels"] = config.attention_channels
    return options


def _grid(config: ModelConfig, reduction: int) -> tuple[int, int] | None:
    if not config.frame_size:
        return None
    height, width = config.frame_size
    return height // reduction, width // reduction


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
        options = cell_options(config, _grid(config, config.patch_size))
        for i, hidden in enumerate(config.hidden_channels):
            cell = make_cell(
                config.cell,
                in_channels=grid_channels if i == 0 else config.hidden_channels[i - 1],
                hidden_channels=hidden,
                **options,
            )
            layers.append(ConvRNN(cell))
        self.layers = nn.ModuleList(layers)
        self.head = packed.Conv2d(config.hidden_channels[-1], grid_channels, kernel_size=1)
        self.out_act = output_activation(config.output_activation)

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
        self._check_horizon(horizon)
        if teacher_mask is not None and targets is None:
            raise ShapeError("teacher_mask needs targets")
        preds = [state.prediction]
        with sequence_scope([layer.cell for layer in self.layers]):
            for k in range(horizon - 1):
                feed = state.prediction
                if teacher_mask is not None:
                    use_truth = teacher_mask[:, k].view(-1, 1, 1, 1)  # (B, 1, 1, 1)
                    feed = torch.where(use_truth, targets[:, k].to(feed.dtype), feed)
                state = self.step(feed, state)
                preds.append(state.prediction)
        return torch.stack(preds, dim=1)  # (B, horizon, C, H, W)


class EncoderState(NamedTuple):
    layers: list  # one cell state per layer, bottom first
    memory: list | None  # encoder_attention: each layer's outputs (B, T, C, h, w); else None


class EncoderForecaster(Forecaster):
    """Shi et al. (2015, 2017): an encoder of RNN layers behind strided convolutions reads the
    context; a forecaster of RNN layers mirrors it (top first, transposed convolutions going up
    in resolution) and starts from the encoder's final states. The forecaster takes no frames
    as input (its top cell has no input), so any horizon can be rolled out from one state.

    bidirectional: each encoder layer also runs a second cell backwards over the context; the
    next layer reads both directions' outputs (concatenated), and the forecaster starts from
    StateMerge(forward final state, backward final state) (the backward pass ends at frame 0).
    encoder_attention: after each forecaster cell, TemporalAttention over the encoder layer's
    outputs at the same resolution adds a context vector to what goes up (not to the state).
    """

    feeds_back = False  # the forecaster is not fed frames: scheduled sampling does not apply
    # set by convlstm.speed.apply_speed: the forecaster runs layer by layer, its lower layers'
    # input convolutions hoisted over all steps (the same function; see _forecast_by_layer),
    # except in training with checkpointing (whose memory it would spend); without grad, in
    # windows of NO_GRAD_WINDOW steps (less memory: no backward needs the activations)
    hoist = False
    NO_GRAD_WINDOW = 10

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        hidden = config.hidden_channels
        strides = config.stage_strides
        grid_channels = config.in_channels * config.patch_size**2
        directions = 2 if config.bidirectional else 1
        n = len(hidden)

        def cell(in_channels: int, i: int) -> nn.Module:
            grid = _grid(config, config.patch_size * math.prod(strides[: i + 1]))
            return make_cell(
                config.cell,
                in_channels=in_channels,
                hidden_channels=hidden[i],
                **cell_options(config, grid),
            )

        self.down = nn.ModuleList(
            DownStage(
                in_channels=grid_channels if i == 0 else directions * hidden[i - 1],
                out_channels=hidden[i],
                stride=strides[i],
            )
            for i in range(n)
        )
        self.encoder = nn.ModuleList(ConvRNN(cell(hidden[i], i)) for i in range(n))
        if config.bidirectional:
            self.backward_encoder = nn.ModuleList(ConvRNN(cell(hidden[i], i)) for i in range(n))
            state_size = CELLS[config.cell].state_size
            self.merge = nn.ModuleList(
                StateMerge(channels=hidden[i], state_size=state_size) for i in range(n)
            )
        # Forecaster layer i takes the upsampled output of layer i+1; the top one takes nothing.
        self.forecaster = nn.ModuleList(cell(0 if i == n - 1 else hidden[i], i) for i in range(n))
        if config.encoder_attention:
            self.attention = nn.ModuleList(
                TemporalAttention(
                    channels=hidden[i],
                    memory_channels=directions * hidden[i],
                    key_channels=config.attention_channels,
                )
                for i in range(n)
            )
        self.up = nn.ModuleList(
            UpStage(
                in_channels=hidden[i],
                out_channels=hidden[i - 1] if i > 0 else hidden[0],
                stride=strides[i],
            )
            for i in range(n)
        )
        self.head = packed.Conv2d(hidden[0], grid_channels, kernel_size=1)
        self.out_act = output_activation(config.output_activation)

    def encode(self, context: Tensor, state: EncoderState | None = None) -> EncoderState:
        """Read context frames (B, T, C, H, W); returns one state per layer, bottom first."""
        self._check_context(context)
        if self.config.bidirectional and state is not None:
            raise ShapeError(
                "a bidirectional encoder reads the whole context in one call; "
                "it cannot continue from a state (no streaming)"
            )
        b, t = context.shape[:2]
        x = patchify(context.flatten(0, 1), self.patch)  # (B*T, Cp, h, w)
        states = [None] * len(self.encoder) if state is None else list(state.layers)
        outputs = []
        for i, (down, rnn) in enumerate(zip(self.down, self.encoder, strict=True)):
            x = down(x).unflatten(0, (b, t))  # (B, T, C_i, h_i, w_i)
            out, states[i] = rnn(x, states[i])
            if self.config.bidirectional:
                back, back_state = self.backward_encoder[i](x.flip(1))
                out = torch.cat([out, back.flip(1)], dim=2)  # (B, T, 2 C_i, h_i, w_i)
                states[i] = self.merge[i](states[i], back_state)
            outputs.append(out)
            x = out.flatten(0, 1)  # (B*T, C, h_i, w_i)
        memory = None
        if self.config.encoder_attention:
            memory = outputs
            if state is not None and state.memory is not None:
                pairs = zip(state.memory, outputs, strict=True)
                memory = [torch.cat(pair, dim=1) for pair in pairs]  # along time
        return EncoderState(states, memory)

    def forecast(
        self,
        state: EncoderState,
        horizon: int,
        targets: Tensor | None = None,
        teacher_mask: Tensor | None = None,
    ) -> Tensor:
        """Roll out `horizon` frames (B, horizon, C, H, W) from the encoder's states: step by
        step through the layers, or with `hoist` layer by layer (_forecast_by_layer)."""
        self._check_horizon(horizon)
        if teacher_mask is not None:
            raise ShapeError(
                "EncoderForecaster is not fed frames while forecasting: no teacher_mask"
            )
        states = list(state.layers)
        keys_values = None
        if self.config.encoder_attention:
            pairs = zip(self.attention, state.memory, strict=True)
            keys_values = [attention.keys_values(memory) for attention, memory in pairs]
        checkpointing = torch.is_grad_enabled() and any(  # (it acts under grad only)
            getattr(cell, "checkpointing", False) for cell in self.forecaster
        )
        if self.hoist and horizon > 1 and not checkpointing:
            # without grad in windows of steps: a window's activations are alive at once
            window = horizon if torch.is_grad_enabled() else self.NO_GRAD_WINDOW
            parts = []
            for start in range(0, horizon, window):
                steps = min(window, horizon - start)
                parts.append(self._forecast_by_layer(states, steps, keys_values))
            return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        preds = []
        with sequence_scope(list(self.forecaster)):
            for _ in range(horizon):
                x = None
                for i in reversed(range(len(self.forecaster))):
                    h, states[i] = self.forecaster[i](x, states[i])
                    if keys_values is not None:
                        h = self.attention[i](h, *keys_values[i])
                    x = self.up[i](h)  # (B, C_{i-1}, h_{i-1}, w_{i-1})
                preds.append(unpatchify(self.out_act(self.head(x)), self.patch))
        return torch.stack(preds, dim=1)  # (B, horizon, C, H, W)

    def _forecast_by_layer(self, states: list, steps: int, keys_values: list | None) -> Tensor:
        """`steps` steps of forecast's rollout with the loops turned round: each layer over
        every step, top first; `states` (one per layer) are advanced in place. No layer reads
        a lower one, so this is the same function; but each lower layer's inputs (the
        upsampled outputs of the layer above) are then known for every step, so its
        input-to-state convolution runs once over all of them (hoisted, as in the encoder),
        and the up-sampling stages and the head run once over all steps. The cost: a whole
        layer's activations over the steps are alive at once, not one step's."""
        x = None  # (B, steps, C, h, w): what the layer above sends down
        for i in reversed(range(len(self.forecaster))):
            out, states[i] = run_cell(self.forecaster[i], x, states[i], True, steps=steps)
            if keys_values is not None:
                out = stack_time([self.attention[i](h, *keys_values[i]) for h in out.unbind(1)])
            b = out.shape[0]
            up = self.up[i](out.transpose(0, 1).flatten(0, 1))  # time-major (T*B, ...)
            x = up.unflatten(0, (steps, b)).transpose(0, 1)
            del out, up
        grid = self.out_act(self.head(x.transpose(0, 1).flatten(0, 1)))
        frames = unpatchify(grid, self.patch).unflatten(0, (steps, b))
        return frames.transpose(0, 1).contiguous()  # (B, steps, C, H, W)


MODELS: dict[str, type[Forecaster]] = {
    "stacked": StackedForecaster,
    "encoder_forecaster": EncoderForecaster,
    "fc_lstm": FCLSTMForecaster,
}


def build_model(config: ModelConfig) -> Forecaster:
    """The model that `config` describes, freshly initialised."""
    return MODELS[config.architecture](config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
