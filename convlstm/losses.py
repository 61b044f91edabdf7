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
from convlstm.units import balance_weights, pixel_to_rainrate

__all__ = ["LOSSES", "balanced_mse_mae", "bce", "get_loss", "mae", "mse", "mse_mae"]

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


def balanced_mse_mae(pred: Tensor, target: Tensor) -> Tensor:
    """Shi et al. 2017's balanced MSE + MAE for radar frames in HKO-7 pixel units.

    Each pixel's squared and absolute errors are weighted by the target's rain rate (HKO-7's
    Z = 58.53 R^1.56): 1 below 2 mm/h, 2 from 2, 5 from 5, 10 from 10 and 30 from 30 mm/h, so
    that the rare heavy rain is not drowned by the many dry pixels. Means over every element
    (Shi et al. sum over pixels; the factor only rescales the learning rate).
    """
    pred, target = _prepare(pred, target)
    weights = balance_weights(pixel_to_rainrate(target))
    error = pred - target
    return (weights * error.square()).mean() + (weights * error.abs()).mean()


LOSSES: dict[str, LossFn] = {
    "mse": mse,
    "mae": mae,
    "bce": bce,
    "mse+mae": mse_mae,
    "balanced_mse_mae": balanced_mse_mae,
}


def get_loss(name: str) -> LossFn:
    """The loss function called `name`: one of LOSSES' keys."""
    try:
        return LOSSES[name]
    except (KeyError, TypeError):
        valid = ", ".join(repr(k) for k in LOSSES)
        raise ConfigError(f"unknown loss {name!r}; valid names are {valid}.") from None
