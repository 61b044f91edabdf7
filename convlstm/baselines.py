"""Trivial forecasts that every model result is reported beside.

Each takes the context (B, T, C, H, W) and a horizon, and returns a new (not aliased)
forecast tensor (B, horizon, C, H, W) with the context's dtype and device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from convlstm.errors import ConfigError, ShapeError

__all__ = ["blank", "constant", "mean_image", "persistence"]


def _check(context: Tensor, horizon: int) -> tuple[int, int, int, int]:
    if context.dim() != 5:
        raise ShapeError(f"expected a (B, T, C, H, W) context, got shape {tuple(context.shape)}.")
    if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
        raise ConfigError(f"horizon must be an integer >= 1, got {horizon!r}.")
    b, _, c, h, w = context.shape
    return b, c, h, w


def persistence(context: Tensor, horizon: int) -> Tensor:
    """Repeat the last context frame `horizon` times."""
    b, c, h, w = _check(context, horizon)
    if context.shape[1] == 0:
        raise ShapeError("persistence needs at least one context frame, got T = 0.")
    return context[:, -1:].expand(b, horizon, c, h, w).clone()


def blank(context: Tensor, horizon: int) -> Tensor:
    """All-zero frames."""
    b, c, h, w = _check(context, horizon)
    return context.new_zeros((b, horizon, c, h, w))


def constant(context: Tensor, horizon: int, value: float) -> Tensor:
    """Frames filled with `value` (e.g. the training set's mean pixel value)."""
    b, c, h, w = _check(context, horizon)
    return context.new_full((b, horizon, c, h, w), float(value))


def mean_image(context: Tensor, horizon: int, image: Tensor) -> Tensor:
    """A given per-pixel mean image (C, H, W) (e.g. over the training set), repeated."""
    b, c, h, w = _check(context, horizon)
    image = torch.as_tensor(image)
    if tuple(image.shape) != (c, h, w):
        raise ShapeError(
            f"mean image of shape {tuple(image.shape)} does not match the context's frame "
            f"shape {(c, h, w)}."
        )
    image = image.to(dtype=context.dtype, device=context.device)
    return image.expand(b, horizon, c, h, w).clone()
