"""Pictures of forecasts: side-by-side animation frames, animated GIFs and still PNG strips.

Inputs are (B, T, C, H, W) tensors (any device or dtype) or NumPy arrays with values on
[0, 1]; values outside are clamped and NaN is drawn black. One channel is drawn grey,
three channels RGB. Files are written atomically: a temporary file in the target folder,
then `os.replace`, so a failed write never leaves a partial file behind.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

import numpy as np
import torch
from PIL import Image

from convlstm.errors import ConfigError, ShapeError

__all__ = [
    "comparison_frames",
    "contingency_video",
    "panel_frames",
    "save_gif",
    "save_panels_gif",
    "save_strip_png",
]

SEPARATOR_PX = 2
SEPARATOR_VALUE = 200  # light grey, distinct from both a black and a white background

ArrayLike = torch.Tensor | np.ndarray


def _to_uint8(video: ArrayLike, name: str) -> np.ndarray:
    """(B, T, C, H, W) on [0, 1] -> uint8 (B, T, H, W, C)."""
    array = np.asarray(_numpy(video), dtype=np.float32)
    if array.ndim != 5:
        raise ShapeError(f"{name} must be (B, T, C, H, W), got shape {array.shape}.")
    if array.shape[2] not in (1, 3):
        raise ShapeError(f"{name} must have 1 or 3 channels to be drawn, got {array.shape[2]}.")
    if array.shape[1] == 0:
        raise ShapeError(f"{name} has no frames (T = 0).")
    array = np.clip(np.nan_to_num(array, nan=0.0), 0.0, 1.0)
    return np.rint(array * 255.0).astype(np.uint8).transpose(0, 1, 3, 4, 2)


def _check_scale(scale: int) -> None:
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ConfigError(f"scale must be an integer >= 1, got {scale!r}.")


def _prepare_panels(panels: dict[str, ArrayLike], scale: int) -> list[np.ndarray]:
    _check_scale(scale)
    videos = [_to_uint8(v, n) for n, v in panels.items()]
    shapes = {(v.shape[0],) + v.shape[2:] for v in videos}  # (B, H, W, C) of each
    if len(shapes) != 1:
        raise ShapeError(
            f"{', '.join(panels)} must share B, C, H and W, got shapes "
            f"{[tuple(v.shape) for v in videos]} as (B, T, H, W, C)."
        )
    return videos


def _prepare(
    context: ArrayLike, truth: ArrayLike, forecast: ArrayLike, scale: int
) -> list[np.ndarray]:
    return _prepare_panels({"context": context, "truth": truth, "forecast": forecast}, scale)


def _upscale(frame: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour upscaling of (H, W, C)."""
    return frame.repeat(scale, axis=0).repeat(scale, axis=1)


def _finish(canvas: np.ndarray) -> np.ndarray:
    # Grey frames drop the channel axis so they map straight onto Pillow's "L" mode.
    return canvas[..., 0] if canvas.shape[-1] == 1 else canvas


def comparison_frames(
    context: ArrayLike,
    truth: ArrayLike,
    forecast: ArrayLike,
    max_sequences: int = 4,
    scale: int = 2,
) -> np.ndarray:
    """Animation frames showing context | truth | forecast side by side.

    Frame k shows context[k], truth[k] and forecast[k] (a shorter panel holds its last
    frame), one row per sequence for the first `max_sequences` of the batch, panels
    upscaled by `scale` (nearest neighbour) and separated by 2-pixel light-grey lines.
    Returns uint8 (K, H', W') for one channel or (K, H', W', 3) for RGB, where K is the
    longest panel's T.
    """
    return panel_frames(
        {"context": context, "truth": truth, "forecast": forecast}, max_sequences, scale
    )


def panel_frames(
    panels: dict[str, ArrayLike], max_sequences: int = 4, scale: int = 2
) -> np.ndarray:
    """Animation frames showing any named panels side by side, like `comparison_frames`."""
    if isinstance(max_sequences, bool) or not isinstance(max_sequences, int) or max_sequences < 1:
        raise ConfigError(f"max_sequences must be an integer >= 1, got {max_sequences!r}.")
    if not panels:
        raise ConfigError("panel_frames needs at least one panel.")
    videos = _prepare_panels(panels, scale)
    b, _, h, w, c = videos[0].shape
    rows = min(b, max_sequences)
    ph, pw = h * scale, w * scale
    num_frames = max(v.shape[1] for v in videos)
    height = rows * ph + (rows - 1) * SEPARATOR_PX
    width = len(videos) * pw + (len(videos) - 1) * SEPARATOR_PX
    canvas = np.full((num_frames, height, width, c), SEPARATOR_VALUE, dtype=np.uint8)
    for k in range(num_frames):
        for row in range(rows):
            top = row * (ph + SEPARATOR_PX)
            for col, video in enumerate(videos):
                left = col * (pw + SEPARATOR_PX)
                frame = video[row, min(k, video.shape[1] - 1)]  # (H, W, C)
                canvas[k, top : top + ph, left : left + pw] = _upscale(frame, scale)
    return _finish(canvas)


def _atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call `write(file)` on a temporary file next to `path`, then rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes the file 0600; give it the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def save_gif(
    path: str | os.PathLike,
    context: ArrayLike,
    truth: ArrayLike,
    forecast: ArrayLike,
    fps: float = 4,
    **kw,
) -> Path:
    """Write `comparison_frames(context, truth, forecast, **kw)` as a looping animated GIF.

    GIF stores frame times in 1/100 s, so the frame time is rounded to 10 ms. Pillow merges
    consecutive identical frames into one longer frame (the animation looks the same).
    """
    panels = {"context": context, "truth": truth, "forecast": forecast}
    return save_panels_gif(path, panels, fps=fps, **kw)


def save_panels_gif(
    path: str | os.PathLike, panels: dict[str, ArrayLike], fps: float = 4, **kw
) -> Path:
    """Write `panel_frames(panels, **kw)` as a looping animated GIF (see `save_gif`)."""
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0:
        raise ConfigError(f"fps must be a positive number, got {fps!r}.")
    frames = panel_frames(panels, **kw)
    images = [Image.fromarray(frame) for frame in frames]
    duration = max(10, int(round(100.0 / fps)) * 10)  # ms, a multiple of GIF's 10 ms tick

    def write(f: IO[bytes]) -> None:
        images[0].save(
            f,
            format="GIF",
            save_all=True,
            append_images=images[1:],
            duration=duration,
            loop=0,
        )

    return _atomic_write(path, write)


def contingency_video(forecast: ArrayLike, truth: ArrayLike, threshold: float) -> np.ndarray:
    """RGB (B, T, 3, H, W) on [0, 1] of where `forecast` and `truth` exceed `threshold` (events
    are values above it, as in convlstm.verification and pysteps): hits green, misses red,
    false alarms blue, correct negatives black, NaN truth grey."""
    f, t = (np.asarray(_numpy(v), dtype=np.float32) for v in (forecast, truth))
    if f.shape != t.shape or f.ndim != 5 or f.shape[2] != 1:
        raise ShapeError(
            f"forecast and truth must both be (B, T, 1, H, W), got {f.shape} and {t.shape}."
        )
    fe, te = f > threshold, t > threshold
    rgb = np.zeros(f.shape[:2] + (3,) + f.shape[3:], dtype=np.float32)
    for channel, where in ((1, fe & te), (0, te & ~fe), (2, fe & ~te)):
        rgb[:, :, channel] = where[:, :, 0]
    rgb[np.broadcast_to(np.isnan(t), rgb.shape)] = 0.5
    return rgb


def _numpy(video: ArrayLike) -> np.ndarray:
    if isinstance(video, torch.Tensor):
        return video.detach().to(device="cpu", dtype=torch.float32).numpy()
    return np.asarray(video)


def save_strip_png(
    path: str | os.PathLike,
    context: ArrayLike,
    truth: ArrayLike,
    forecast: ArrayLike,
    sequence: int = 0,
    scale: int = 2,
) -> Path:
    """Write a still PNG of one sequence: rows context, truth, forecast; time left to right.

    Frames are upscaled by `scale` and separated by 2-pixel light-grey lines; a row shorter
    than the longest is padded with grey.
    """
    videos = _prepare(context, truth, forecast, scale)
    b, _, h, w, c = videos[0].shape
    if isinstance(sequence, bool) or not isinstance(sequence, int) or not 0 <= sequence < b:
        raise ConfigError(f"sequence must be an index into the batch of {b}, got {sequence!r}.")
    ph, pw = h * scale, w * scale
    columns = max(v.shape[1] for v in videos)
    height = 3 * ph + 2 * SEPARATOR_PX
    width = columns * pw + (columns - 1) * SEPARATOR_PX
    canvas = np.full((height, width, c), SEPARATOR_VALUE, dtype=np.uint8)
    for row, video in enumerate(videos):
        top = row * (ph + SEPARATOR_PX)
        for k in range(video.shape[1]):
            left = k * (pw + SEPARATOR_PX)
            canvas[top : top + ph, left : left + pw] = _upscale(video[sequence, k], scale)
    image = Image.fromarray(_finish(canvas))
    return _atomic_write(path, lambda f: image.save(f, format="PNG"))
