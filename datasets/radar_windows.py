"""Radar sequences -> training samples: crop, block-average, sliding windows, model units.

Conventions (those of :mod:`datasets.radar_io`): rates in mm/h, NaN = no data.

- :func:`crop_center` and :func:`block_average` return new :class:`RadarSequence` objects
  with the same times and step; ``meta`` records what was done.
- :func:`block_average`: a block with more than half of its pixels without data is no
  data (NaN); otherwise it is the mean of its valid pixels. A block exactly half valid is
  kept.
- :func:`windows` cuts (N, context + horizon, H, W) windows every ``stride`` frames from
  frame 0 and skips (and counts) the ones that cross a time gap: a window never joins
  frames that are more than one step apart.
- :func:`to_model_units` gives what the models read: HKO-7 pixel values in [0, 1]
  (:func:`convlstm.units.rainrate_to_pixel`) with no data -> 0, plus the validity mask.
"""

from __future__ import annotations

import dataclasses
from numbers import Integral
from typing import NamedTuple

import numpy as np

from convlstm.errors import ConfigError, DataError, ShapeError
from convlstm.units import HKO7_ZR, rainrate_to_pixel
from datasets.radar_io import RadarSequence

__all__ = ["Windows", "block_average", "crop_center", "to_model_units", "windows"]


def _is_int(x: object) -> bool:
    return isinstance(x, Integral) and not isinstance(x, bool)


def _check_sequence(seq: object, what: str) -> RadarSequence:
    if not isinstance(seq, RadarSequence):
        raise DataError(f"{what} takes a RadarSequence, got {type(seq).__name__}")
    return seq


def _with(seq: RadarSequence, rate: np.ndarray, **meta: object) -> RadarSequence:
    return dataclasses.replace(seq, rate=rate, times=list(seq.times), meta={**seq.meta, **meta})


def crop_center(seq: RadarSequence, size: int | tuple[int, int]) -> RadarSequence:
    """The central ``size`` (square) or ``(height, width)`` pixels of every frame.

    An odd margin leaves the extra pixel at the bottom / right. ``meta["crop"]`` is
    ``(top, left, height, width)`` in the input's pixels.
    """
    seq = _check_sequence(seq, "crop_center")
    h_in, w_in = seq.rate.shape[1:]
    pair = (size, size) if _is_int(size) else size
    if not (isinstance(pair, tuple | list) and len(pair) == 2 and all(_is_int(v) for v in pair)):
        raise ConfigError(f"crop size must be an int or (height, width), got {size!r}")
    h, w = int(pair[0]), int(pair[1])
    if h <= 0 or w <= 0:
        raise ConfigError(f"crop size must be positive, got {h}x{w}")
    if h > h_in or w > w_in:
        raise ShapeError(f"crop {h}x{w} is larger than the {h_in}x{w_in} frames")
    top, left = (h_in - h) // 2, (w_in - w) // 2
    rate = np.ascontiguousarray(seq.rate[:, top : top + h, left : left + w])
    return _with(seq, rate, crop=(top, left, h, w))


def block_average(seq: RadarSequence, factor: int) -> RadarSequence:
    """Average ``factor`` x ``factor`` blocks (a 1 km grid with factor 4 -> 4 km).

    A block with more than half no-data (NaN) pixels is no data; otherwise it is the mean
    of its valid pixels. H and W must be divisible by ``factor`` (crop first).
    ``meta["block_factor"]`` multiplies any earlier factor.
    """
    seq = _check_sequence(seq, "block_average")
    if not _is_int(factor) or factor <= 0:
        raise ConfigError(f"block factor must be a positive int, got {factor!r}")
    factor = int(factor)
    t, h, w = seq.rate.shape
    if h % factor or w % factor:
        raise ShapeError(
            f"block factor {factor} does not divide the {h}x{w} frames; crop them first"
            f" (e.g. crop_center to {h - h % factor}x{w - w % factor})"
        )
    if factor == 1:
        return _with(seq, seq.rate.copy(), block_factor=seq.meta.get("block_factor", 1))
    blocks = seq.rate.reshape(t, h // factor, factor, w // factor, factor)  # (T, h, f, w, f)
    valid = np.isfinite(blocks)
    count = valid.sum(axis=(2, 4))  # (T, h, w) valid pixels per block
    total = np.where(valid, blocks, 0.0).sum(axis=(2, 4), dtype=np.float64)
    keep = 2 * count >= factor * factor  # at most half of the block without data
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(keep, total / count, np.nan).astype(np.float32)
    return _with(seq, mean, block_factor=seq.meta.get("block_factor", 1) * factor)


class Windows(NamedTuple):
    """``frames`` float32 (N, L, H, W) in mm/h (NaN = no data), ``starts`` (N,) the index
    of each window's first frame, ``skipped`` how many windows were refused for crossing a
    time gap."""

    frames: np.ndarray
    starts: np.ndarray
    skipped: int


def windows(seq: RadarSequence, context: int, horizon: int, stride: int = 1) -> Windows:
    """Windows of ``context + horizon`` consecutive frames, one every ``stride`` frames.

    Candidate windows start at frames 0, stride, 2 * stride, ...; those that contain a
    gap (an interval longer than the step) are skipped and counted in ``skipped``. Every
    frame's data are copied: crop or block-average first on large grids.
    """
    seq = _check_sequence(seq, "windows")
    for name, value, low in (
        ("context", context, 1),
        ("horizon", horizon, 0),
        ("stride", stride, 1),
    ):
        if not _is_int(value) or value < low:
            raise ConfigError(f"{name} must be an int >= {low}, got {value!r}")
    length = int(context) + int(horizon)
    t = len(seq)
    if t < length:
        raise DataError(
            f"too few frames: {seq.source} has {t}, one window needs {length}"
            f" (context {context} + horizon {horizon})"
        )
    # broken[i] is True when frames i and i + 1 are not one step apart.
    broken = np.array(seq.intervals, dtype=np.int64) != seq.step_minutes  # (T - 1,)
    crossings = np.concatenate([[0], np.cumsum(broken)])  # gaps before each frame
    candidates = np.arange(0, t - length + 1, int(stride))
    ok = crossings[candidates + length - 1] == crossings[candidates]
    starts = candidates[ok]
    frames = np.stack([seq.rate[s : s + length] for s in starts]) if len(starts) else None
    if frames is None:
        frames = np.empty((0, length, *seq.rate.shape[1:]), dtype=np.float32)
    return Windows(frames, starts, int(np.count_nonzero(~ok)))


def to_model_units(
    rate: np.ndarray | RadarSequence, zr: tuple[float, float] = HKO7_ZR
) -> tuple[np.ndarray, np.ndarray]:
    """Rain rates (mm/h, NaN = no data) -> (pixels, mask), both the shape of ``rate``.

    ``pixels`` float32 HKO-7 values in [0, 1] (:func:`convlstm.units.rainrate_to_pixel`
    with ``zr``), 0 where there is no data; ``mask`` bool, True where there is data (use
    it to leave no-data pixels out of losses and scores).
    """
    if isinstance(rate, RadarSequence):
        rate = rate.rate
    if not isinstance(rate, np.ndarray) or rate.dtype.kind != "f":
        got = f"{rate.dtype} array" if isinstance(rate, np.ndarray) else type(rate).__name__
        raise DataError(f"to_model_units takes float rain rates (mm/h), got {got}")
    mask = np.isfinite(rate)
    if (rate[mask] < 0).any():
        raise DataError(f"to_model_units: negative rain rates (min {float(rate[mask].min()):g})")
    pixels = rainrate_to_pixel(np.where(mask, rate, 0.0), zr).astype(np.float32)
    return pixels, mask
