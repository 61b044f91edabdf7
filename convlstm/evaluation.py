"""Evaluation of any forecaster (a model or a baseline) on a fixed set of sequences."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from convlstm.errors import ShapeError
from convlstm.layers import check_video
from convlstm.metrics import VideoMetrics

Predictor = Callable[
    [Tensor, int], Tensor
]  # (context (B, Tc, C, H, W), horizon) -> (B, horizon, ...)


@torch.no_grad()
def evaluate(
    predict: Predictor,
    sequences: Tensor,
    *,
    context_frames: int,
    horizon: int,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Metrics of `predict` over sequences (N, T, C, H, W), T >= context_frames + horizon.

    Returns VideoMetrics.compute(): per-frame-sum and per-pixel MSE/MAE, SSIM, PSNR, averaged
    and per lead time.
    """
    check_video(sequences, "evaluation sequences")
    if sequences.shape[1] < context_frames + horizon:
        raise ShapeError(
            f"evaluation sequences have {sequences.shape[1]} frames; "
            f"need context_frames + horizon = {context_frames + horizon}"
        )
    device = torch.device(device)
    metrics = VideoMetrics()
    for start in range(0, sequences.shape[0], batch_size):
        batch = sequences[start : start + batch_size].to(device, non_blocking=True)
        context = batch[:, :context_frames]
        truth = batch[:, context_frames : context_frames + horizon]
        with autocast(device, autocast_dtype):
            preds = predict(context, horizon)
        metrics.update(preds.float(), truth.float())
    return metrics.compute()


def autocast(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast for a reduced dtype, or a no-op context for full precision."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
