"""Training losses: element-wise means over every element of (B, T, C, H, W) tensors.

Every loss computes in float32 (float64 inputs stay float64) so that bf16/fp16 predictions
from an autocast region do not lose precision in the reduction.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from convlstm.errors import ConfigError, ShapeError

__all__ = ["LOSSES", "bce", "get_loss", "mae", "mse", "mse_mae"]

LossFn = Callable[[Tensor, Tensor], Tensor]

# Keeps log() finite: BCE of a prediction of exactly 0 or 1 is infinite.
BCE_EPS = 1e-7


def _prepare(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    if pred.shape != target.shape:
        raise ShapeError(
            f"prediction shape {tuple(pred.shape)} does not match target shape "
            f"{tuple(target.shape)}."
        )
    dtype = torch.float64 if torch.float64 in (pred.dtype, target.dtype) else torch.float32
    return pred.to(dtype), target.to(dtype)


def mse(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over every element."""
    pred, target = _prepare(pred, target)
    return F.mse_loss(pred, target)


def mae(pred: Tensor, target: Tensor) -> Tensor:
    """Mean absolute error over every element."""
    pred, target = _prepare(pred, target)
    return F.l1_loss(pred, target)


def bce(pred: Tensor, target: Tensor) -> Tensor:
    """Binary cross-entropy of probabilities `pred` in [0, 1] against `target` in [0, 1].

    `pred` is clamped to [BCE_EPS, 1 - BCE_EPS] first (the clamp has zero gradient outside).
    """
    pred, target = _prepare(pred, target)
    # F.binary_cross_entropy refuses to run inside a CUDA autocast region; the inputs are
    # already float32 here, so leaving autocast changes nothing numerically.
    with torch.autocast(device_type=pred.device.type, enabled=False):
        return F.binary_cross_entropy(pred.clamp(BCE_EPS, 1.0 - BCE_EPS), target)


def mse_mae(pred: Tensor, target: Tensor) -> Tensor:
    """MSE + MAE (each a mean over every element)."""
    pred, target = _prepare(pred, target)
    return F.mse_loss(pred, target) + F.l1_loss(pred, target)


LOSSES: dict[str, LossFn] = {"mse": mse, "mae": mae, "bce": bce, "mse+mae": mse_mae}


def get_loss(name: str) -> LossFn:
    """The loss function called `name`: one of "mse", "mae", "bce", "mse+mae"."""
    try:
        return LOSSES[name]
    except (KeyError, TypeError):
        valid = ", ".join(repr(k) for k in LOSSES)
        raise ConfigError(f"unknown loss {name!r}; valid names are {valid}.") from None
