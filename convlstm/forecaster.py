"""The interface every forecasting model shares:

state = model.encode(context)                    # context (B, T, C, H, W); continue with state=
preds = model.forecast(state, horizon)           # (B, horizon, C, H, W)
preds = model(context, horizon)                  # the two above in one call
state = model.step(frame, state)                 # one frame (B, C, H, W): streaming
"""

from __future__ import annotations

from torch import Tensor, nn

from convlstm import winograd
from convlstm.config import ModelConfig
from convlstm.errors import ShapeError
from convlstm.layers import check_video


def output_activation(name: str) -> nn.Module:
    return nn.Sigmoid() if name == "sigmoid" else nn.Identity()


class Forecaster(nn.Module):
    """Base of every model: encode, forecast, step, and the two in one call."""

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
        # the CPU fast path transforms each Winograd filter once for encode and forecast
        with winograd.shared_transforms():
            return self.forecast(self.encode(context), horizon, targets, teacher_mask)

    def _check_context(self, context: Tensor) -> None:
        check_video(context, "context")
        if context.shape[2] != self.config.in_channels:
            raise ShapeError(
                f"model expects {self.config.in_channels} channels per frame, "
                f"got {context.shape[2]}"
            )
        size = self.config.frame_size
        if size and tuple(context.shape[-2:]) != tuple(size):
            raise ShapeError(
                f"model was built for {size[0]}x{size[1]} frames, "
                f"got {context.shape[-2]}x{context.shape[-1]}"
            )

    @staticmethod
    def _check_horizon(horizon: int) -> None:
        if horizon < 1:
            raise ShapeError(f"horizon must be at least 1, got {horizon}")
