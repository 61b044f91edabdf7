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
from convlstm.units import HKO7_ZR, pixel_to_rainrate
from convlstm.verification import BalancedErrors, ContingencyScores

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
    _check_sequences(sequences, context_frames + horizon)
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


@torch.no_grad()
def evaluate_nowcast(
    predict: Predictor,
    sequences: Tensor,
    *,
    context_frames: int,
    horizon: int,
    thresholds: tuple[float, ...],
    masks: Tensor | None = None,
    fss_scales: tuple[int, ...] = (),
    zr: tuple[float, float] = HKO7_ZR,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Nowcast verification of `predict` on radar sequences (N, T, 1, H, W) in HKO-7 pixels.

    Forecasts and truth are turned into rain rates (mm/h, through Z = a R^b with `zr`) and
    scored at `thresholds` (mm/h): contingency scores and FSS per threshold and lead time,
    pooled over the whole set; B-MSE and B-MAE on the pixel values with HKO-7's weights.
    `masks` (N, T, 1, H, W) bool marks valid pixels (False = no data, left out of every score).
    """
    _check_sequences(sequences, context_frames + horizon)
    if masks is not None and masks.shape != sequences.shape:
        raise ShapeError(
            f"masks of shape {tuple(masks.shape)} do not match the sequences' "
            f"{tuple(sequences.shape)}"
        )
    device = torch.device(device)
    scores = ContingencyScores(thresholds, fss_scales=fss_scales)
    balanced = BalancedErrors()
    future = slice(context_frames, context_frames + horizon)
    for start in range(0, sequences.shape[0], batch_size):
        batch = sequences[start : start + batch_size].to(device, non_blocking=True)
        truth = batch[:, future].float()
        mask = None
        if masks is not None:  # (B, horizon, H, W) bool
            mask = masks[start : start + batch_size, future, 0].to(device, torch.bool)
        with autocast(device, autocast_dtype):
            preds = predict(batch[:, :context_frames], horizon)
        preds = preds.float().clamp(0.0, 1.0)  # the pixel scale's range: -10 .. 60 dBZ
        truth_rate = pixel_to_rainrate(truth, zr)
        scores.update(pixel_to_rainrate(preds, zr), truth_rate, mask=mask)
        balanced.update(preds, truth, truth_rate, mask=mask)
    return {"scores": scores.compute(), "balanced": balanced.compute()}


def _check_sequences(sequences: Tensor, frames: int) -> None:
    check_video(sequences, "evaluation sequences")
    if sequences.shape[1] < frames:
        raise ShapeError(
            f"evaluation sequences have {sequences.shape[1]} frames; "
            f"need context_frames + horizon = {frames}"
        )


def autocast(device: torch.device, dtype: torch.dtype | None, cache: bool = True):
    """torch.autocast for a reduced dtype, or a no-op context for full precision. CUDA graph
    capture needs cache=False (no cast weights kept from outside the graph)."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=cache)
