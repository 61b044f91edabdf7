"""Trivial forecasts that every model result is reported beside.

Each takes the context (B, T, C, H, W) and a horizon, and returns a new (not aliased)
forecast tensor (B, horizon, C, H, W) with the context's dtype and device.

`persistence` is Eulerian persistence (the last frame stays where it is);
`lagrangian_persistence` is the optical-flow extrapolation baseline of radar nowcasting
(the last frame moves on with the motion seen in the context: OpenCV dense flow plus
semi-Lagrangian advection with `cv2.remap`). Its building blocks `optical_flow` and
`advect` work on NumPy arrays.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from torch import Tensor

from convlstm.errors import ConfigError, ShapeError

__all__ = [
    "FLOW_METHODS",
    "FLOW_PAIRS",
    "advect",
    "blank",
    "constant",
    "lagrangian_persistence",
    "mean_image",
    "optical_flow",
    "persistence",
]


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


# --- Lagrangian persistence (optical-flow extrapolation) -----------------------------------
#
# Conventions, shared by `optical_flow`, `advect` and `lagrangian_persistence`:
# - A flow is an (H, W, 2) float32 array in pixels per time step, (dx, dy) order as OpenCV's:
#   flow[y, x] = (dx, dy) says that the content at (x, y) in frame t is at (x + dx, y + dy)
#   in frame t + 1, i.e. frame_t(y, x) ~ frame_t+1(y + dy, x + dx). That is OpenCV's own
#   convention for calcOpticalFlowFarneback and DISOpticalFlow.calc(I0, I1), and it is
#   pysteps' velocity V (2, H, W) with V[0] = dx, V[1] = dy: V = flow.transpose(2, 0, 1).
# - NaN (no data) counts as 0, "no rain", in every input frame.
# - Outside the domain there is no rain: a trajectory that leaves the grid samples 0.

FLOW_METHODS = ("dis", "farneback")
FLOW_PAIRS = 3  # the motion is the mean flow of the last min(T - 1, FLOW_PAIRS) frame pairs

# DIS preset MEDIUM: finest scale 1, 8x8 patches every 3 pixels, 25 gradient-descent steps
# and variational refinement. Against FAST/ULTRAFAST it samples patches more densely, and
# the variational refinement (absent in ULTRAFAST) smooths the field and fills the large
# textureless no-rain areas from their surroundings, which matters for radar fields; on
# 128x128 grids it costs about a millisecond a pair, so there is no reason to go faster.
DIS_PRESET = cv2.DISOPTICAL_FLOW_PRESET_MEDIUM
# OpenCV's DIS refuses frames under ~12 px a side and crashes the process (segmentation fault,
# OpenCV 5.0) on thin ones, e.g. 12x40; from 16 px a side up every size works.
DIS_MIN_SIZE = 16

# Farneback: pyramid halving (OpenCV stops it at ~32 px, so on 100-200 px grids only one or
# two coarser levels exist, whatever `levels` says), 41x41 Gaussian-weighted averaging windows,
# 5 iterations a level, polynomial expansion over 7x7 neighbourhoods with sigma 1.5 (the
# value OpenCV's documentation pairs with poly_n = 7). The large window is what lets the
# estimate reach across the textureless no-rain areas and follow motions of 3-5 px/step on
# such small grids (with 15x15 windows it fails there); rain moves smoothly, so the blur
# of the motion field it brings costs little.
FARNEBACK_PARAMS = dict(
    pyr_scale=0.5,
    levels=3,
    winsize=41,
    iterations=5,
    poly_n=7,
    poly_sigma=1.5,
    flags=cv2.OPTFLOW_FARNEBACK_GAUSSIAN,
)


def _check_method(method: str) -> None:
    if method not in FLOW_METHODS:
        raise ConfigError(f"unknown optical-flow method {method!r}; choose one of {FLOW_METHODS}.")


def _check_value_range(value_range) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value_range)
    except (TypeError, ValueError):
        raise ConfigError(f"value_range must be a pair (low, high), got {value_range!r}.") from None
    if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
        raise ConfigError(f"value_range needs finite low < high, got {value_range!r}.")
    return lo, hi


def _to_uint8(frames: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Frames in value units (NaN = 0) to uint8: lo -> 0, hi -> 255, clipped."""
    x = np.nan_to_num(frames.astype(np.float32), nan=0.0, posinf=hi, neginf=lo)
    x = (x - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def optical_flow(
    frames: np.ndarray, *, method: str = "dis", value_range: tuple[float, float] = (0.0, 1.0)
) -> np.ndarray:
    """Motion (H, W, 2) float32, pixels per step, (dx, dy), of a sequence of frames (T, H, W).

    The frames (NaN = 0) are scaled from `value_range` to 0..255 (clipped) and the flow from
    frame t to t + 1 is estimated with OpenCV's DIS (preset MEDIUM) or Farneback for the last
    min(T - 1, FLOW_PAIRS) pairs; the result is their mean. Content at p in one frame is at
    p + flow(p) in the next (see the conventions above).
    """
    _check_method(method)
    lo, hi = _check_value_range(value_range)
    frames = np.asarray(frames)
    if frames.ndim != 3 or frames.shape[0] < 2:
        raise ShapeError(
            f"optical_flow needs frames (T, H, W) with T >= 2, got shape {frames.shape}."
        )
    if method == "dis" and min(frames.shape[1:]) < DIS_MIN_SIZE:
        raise ShapeError(
            f"DIS optical flow needs frames of at least {DIS_MIN_SIZE}x{DIS_MIN_SIZE} pixels, got "
            f"{frames.shape[1]}x{frames.shape[2]}; use method='farneback' for smaller grids."
        )
    images = _to_uint8(frames, lo, hi)
    pairs = min(frames.shape[0] - 1, FLOW_PAIRS)
    if method == "dis":
        dis = cv2.DISOpticalFlow_create(DIS_PRESET)
        estimate = lambda a, b: dis.calc(a, b, None)
    else:
        estimate = lambda a, b: cv2.calcOpticalFlowFarneback(a, b, None, **FARNEBACK_PARAMS)
    flow = np.zeros((*frames.shape[1:], 2), np.float32)
    for t in range(frames.shape[0] - 1 - pairs, frames.shape[0] - 1):
        flow += estimate(images[t], images[t + 1])
    return flow / pairs


def advect(frame: np.ndarray, flow: np.ndarray, steps: int, *, midpoint: bool = True) -> np.ndarray:
    """Semi-Lagrangian backward advection of `frame` (H, W) along `flow` (H, W, 2).

    Returns (steps, H, W) float32: the frame after 1, ..., steps time steps. Each target pixel
    is traced back along the flow one step at a time and the frame is sampled there with
    bilinear interpolation (`cv2.remap`); positions outside the grid read 0 ("no rain
    advected in"), NaN in the frame counts as 0. The flow is interpolated bilinearly along
    the trajectory, clamped to the nearest edge value outside the grid.

    With `midpoint` (the default, as pysteps' `semilagrangian.extrapolate` with its default
    n_iter = 1) each backward step p -> p - v uses the velocity at the step's midpoint,
    v = flow(p - flow(p) / 2); without it, the explicit step p -> p - flow(p) (pysteps'
    n_iter = 0).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be an integer >= 1, got {steps!r}.")
    frame = np.asarray(frame)
    flow = np.asarray(flow)
    if frame.ndim != 2 or flow.shape != (*frame.shape, 2):
        raise ShapeError(
            f"advect needs a frame (H, W) and a flow (H, W, 2); got {frame.shape} and {flow.shape}."
        )
    if not np.all(np.isfinite(flow)):
        raise ConfigError("the flow holds non-finite values.")
    h, w = frame.shape
    src = np.nan_to_num(frame.astype(np.float32), nan=0.0)
    flow_x, flow_y = (np.ascontiguousarray(flow[..., i], np.float32) for i in range(2))
    grid_x, grid_y = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))

    def flow_at(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        vx = _sample(flow_x, x, y, cv2.BORDER_REPLICATE)
        return vx, _sample(flow_y, x, y, cv2.BORDER_REPLICATE)

    out = np.empty((steps, h, w), np.float32)
    back_x, back_y = np.zeros_like(grid_x), np.zeros_like(grid_y)  # target pixel -> its source
    vx, vy = flow_x, flow_y  # the velocity at the trajectory's current end
    for k in range(steps):
        if midpoint:
            vx, vy = flow_at(grid_x + back_x - vx / 2, grid_y + back_y - vy / 2)
        back_x, back_y = back_x - vx, back_y - vy
        x, y = grid_x + back_x, grid_y + back_y
        vx, vy = flow_at(x, y)
        out[k] = _sample(src, x, y, cv2.BORDER_CONSTANT)
    return out


def _sample(image: np.ndarray, x: np.ndarray, y: np.ndarray, border: int) -> np.ndarray:
    """Bilinear samples of a one-channel float32 image at float32 positions (x, y).

    One channel at a time on purpose: OpenCV's remap keeps float positions exact for
    one-channel float images but rounds them to 1/32 pixel for multi-channel ones (and for
    all images before OpenCV 5). BORDER_CONSTANT reads 0 outside the image, with bilinear
    weights across the edge; BORDER_REPLICATE reads the nearest edge pixel.
    """
    return cv2.remap(image, x, y, cv2.INTER_LINEAR, borderMode=border, borderValue=0.0)


def lagrangian_persistence(
    context: Tensor,
    horizon: int,
    *,
    method: str = "dis",
    value_range: tuple[float, float] = (0.0, 1.0),
) -> Tensor:
    """Optical-flow extrapolation: the last context frame moved on along the context's motion.

    context (B, T, 1, H, W) with T >= 2 -> forecast (B, horizon, 1, H, W), same dtype and
    device. Per sequence, on the CPU: `optical_flow` of the context frames (mean flow of the
    last pairs; `value_range` is what maps to 0..255 for the flow estimate, e.g. (0, 1) for
    HKO-7 pixel values), then `advect` of the last frame for `horizon` steps. NaN counts as 0
    and no rain enters from outside the grid. Use it as an `evaluate()` predictor directly or
    through functools.partial(lagrangian_persistence, method=..., value_range=...).
    """
    b, c, h, w = _check(context, horizon)
    _check_method(method)
    _check_value_range(value_range)
    if c != 1:
        raise ShapeError(f"lagrangian_persistence needs one channel (C = 1), got C = {c}.")
    if context.shape[1] < 2:
        raise ShapeError(
            f"lagrangian_persistence needs at least 2 context frames, got T = {context.shape[1]}."
        )
    frames = context.detach()[:, :, 0].to("cpu", torch.float32).numpy()  # (B, T, H, W)
    out = np.empty((b, horizon, 1, h, w), np.float32)
    for i in range(b):
        flow = optical_flow(frames[i], method=method, value_range=value_range)
        out[i, :, 0] = advect(frames[i, -1], flow, horizon)
    return torch.from_numpy(out).to(device=context.device, dtype=context.dtype)
