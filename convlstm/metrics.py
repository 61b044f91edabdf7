"""Video metrics per frame and per lead time: MSE/MAE in two conventions, SSIM, PSNR.

Conventions (see DESIGN.md, "Metrics and baselines"):
- `mse_frame` / `mae_frame`: error summed over a frame's C*H*W pixels on [0, 1], averaged
  over sequences and frames (OpenSTL's convention; Moving MNIST tables use it).
- `mse_pixel` / `mae_pixel`: the plain per-pixel mean.
- `ssim`: Wang et al. 2004 with an 11x11 Gaussian window (sigma 1.5), K1=0.01, K2=0.03,
  data range 1, population covariance, averaged over the "valid" positions only; the same
  numbers as `skimage.metrics.structural_similarity(x, y, gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=1.0)` per frame and channel, averaged over
  channels. Implemented here in torch.
- `psnr`: 10 log10(1 / per-pixel MSE) per frame with data range 1, MSE floored at 1e-10
  (so identical frames score 100 dB), averaged over frames (not the PSNR of the mean MSE).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from convlstm.errors import ConfigError, ShapeError

__all__ = ["SSIM_WINDOW", "VideoMetrics", "psnr_per_frame", "ssim_per_frame"]

SSIM_SIGMA = 1.5
SSIM_RADIUS = 5  # int(3.5 * sigma + 0.5), scikit-image's truncation for gaussian_weights=True
SSIM_WINDOW = 2 * SSIM_RADIUS + 1
SSIM_K1 = 0.01
SSIM_K2 = 0.03
PSNR_MSE_FLOOR = 1e-10

METRIC_NAMES = ("mse_frame", "mae_frame", "mse_pixel", "mae_pixel", "ssim", "psnr")


def _check_pair(pred: Tensor, target: Tensor) -> None:
    if pred.dim() != 5:
        raise ShapeError(
            f"expected (B, T, C, H, W) tensors, got a prediction of shape {tuple(pred.shape)}."
        )
    if pred.shape != target.shape:
        raise ShapeError(
            f"prediction shape {tuple(pred.shape)} does not match target shape "
            f"{tuple(target.shape)}."
        )


def _compute_dtype(pred: Tensor, target: Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (pred.dtype, target.dtype) else torch.float32


def _gaussian_taps(dtype: torch.dtype, device: torch.device) -> Tensor:
    # Built in float64 and cast, as scipy.ndimage.gaussian_filter1d builds its kernel; built
    # on the device itself because a host-to-device copy would synchronise the stream.
    build = torch.float32 if device.type == "mps" else torch.float64
    x = torch.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=build, device=device)
    taps = torch.exp(-0.5 * (x / SSIM_SIGMA) ** 2)
    return (taps / taps.sum()).to(dtype)


def ssim_per_frame(pred: Tensor, target: Tensor) -> Tensor:
    """SSIM of every frame of (B, T, C, H, W) tensors on [0, 1] -> (B, T).

    Computed in float32 (float64 if either input is float64), with autocast disabled.
    Inputs are not clamped. Frames must be at least 11x11 (the window must fit).
    """
    _check_pair(pred, target)
    b, t, c, h, w = pred.shape
    if h < SSIM_WINDOW or w < SSIM_WINDOW:
        raise ShapeError(
            f"SSIM needs frames of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {h}x{w}."
        )
    dtype = _compute_dtype(pred, target)
    with torch.autocast(device_type=pred.device.type, enabled=False):
        x = pred.to(dtype).reshape(b * t * c, 1, h, w)  # (N, 1, H, W), N = B*T*C
        y = target.to(dtype).reshape(b * t * c, 1, h, w)
        stack = torch.cat([x, y, x * x, y * y, x * y], dim=1)  # (N, 5, H, W)
        taps = _gaussian_taps(dtype, pred.device)
        # Separable Gaussian, one group per quantity; no padding = scikit-image's crop.
        stack = F.conv2d(stack, taps.view(1, 1, -1, 1).expand(5, 1, -1, 1), groups=5)
        stack = F.conv2d(stack, taps.view(1, 1, 1, -1).expand(5, 1, 1, -1), groups=5)
        ux, uy, uxx, uyy, uxy = stack.unbind(dim=1)  # each (N, H-10, W-10)
        vx = uxx - ux * ux
        vy = uyy - uy * uy
        vxy = uxy - ux * uy
        c1 = SSIM_K1**2
        c2 = SSIM_K2**2
        s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
        return s.mean(dim=(-2, -1)).reshape(b, t, c).mean(dim=-1)  # (B, T)


def psnr_per_frame(pred: Tensor, target: Tensor) -> Tensor:
    """PSNR in dB of every frame of (B, T, C, H, W) tensors, data range 1 -> (B, T).

    The per-pixel MSE is floored at 1e-10, so identical frames give 100 dB, not inf.
    """
    _check_pair(pred, target)
    dtype = _compute_dtype(pred, target)
    err = (pred.to(dtype) - target.to(dtype)).square().mean(dim=(2, 3, 4))  # (B, T)
    return -10.0 * torch.log10(err.clamp_min(PSNR_MSE_FLOOR))


class VideoMetrics:
    """Streaming video metrics over batches of (B, T, C, H, W) predictions on [0, 1].

    `update` clamps predictions to [0, 1] (a model's raw output may overshoot; the target is
    used as given) and accumulates per-lead-time sums on the tensors' device without a host
    sync, so it can sit inside a GPU evaluation loop. `compute` syncs once and returns plain
    Python numbers. Every update must have the same T, C, H, W.

    SSIM needs frames of at least 11x11; for smaller frames (tiny test configs) it is not
    computed and reported as NaN, while the other metrics work as usual.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget every update."""
        self._frame_shape: tuple[int, int, int, int] | None = None  # (T, C, H, W)
        self._sums: dict[str, Tensor] = {}
        self._num_sequences = 0

    @property
    def num_sequences(self) -> int:
        return self._num_sequences

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add a batch: `pred` and `target` of the same shape (B, T, C, H, W)."""
        _check_pair(pred, target)
        b, t, c, h, w = pred.shape
        if self._frame_shape is not None and (t, c, h, w) != self._frame_shape:
            raise ShapeError(
                f"frames of shape (T, C, H, W) = {(t, c, h, w)} differ from the earlier "
                f"updates' {self._frame_shape}; reset() before evaluating another setting."
            )
        dtype = _compute_dtype(pred, target)
        pred = pred.detach().to(dtype).clamp(0.0, 1.0)
        target = target.detach().to(dtype)
        err = pred - target
        per_frame = {
            "sq": err.square().sum(dim=(2, 3, 4)),  # (B, T), summed over a frame's pixels
            "abs": err.abs().sum(dim=(2, 3, 4)),
            "psnr": psnr_per_frame(pred, target),
        }
        if h >= SSIM_WINDOW and w >= SSIM_WINDOW:
            per_frame["ssim"] = ssim_per_frame(pred, target)
        # Sums over many thousand frames: accumulate in float64 where the device has it.
        acc_dtype = torch.float32 if pred.device.type == "mps" else torch.float64
        for key, value in per_frame.items():
            value = value.sum(dim=0).to(acc_dtype)  # (T,)
            if key in self._sums:
                self._sums[key] += value.to(self._sums[key].device)
            else:
                self._sums[key] = value
        self._frame_shape = (t, c, h, w)
        self._num_sequences += b

    def all_reduce(self) -> None:
        """Sum the accumulators over the ranks of the default process group (DDP evaluation).

        Every rank must have had at least one update with the same frame shape. A no-op when
        torch.distributed is not initialised.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        self._require_updates()
        keys = sorted(self._sums)
        first = self._sums[keys[0]]
        count = torch.tensor([float(self._num_sequences)], dtype=first.dtype, device=first.device)
        flat = torch.cat([self._sums[k].to(first.device) for k in keys] + [count])
        dist.all_reduce(flat)
        t = first.numel()
        for i, key in enumerate(keys):
            self._sums[key] = flat[i * t : (i + 1) * t].clone()
        self._num_sequences = int(round(flat[-1].item()))

    def _require_updates(self) -> None:
        if self._frame_shape is None or self._num_sequences == 0:
            raise ConfigError("VideoMetrics.compute() was called before any update().")

    def compute(self) -> dict:
        """Averages over all sequences and lead times, and `per_lead` lists of T values.

        Returns a dict with `mse_frame`, `mae_frame`, `mse_pixel`, `mae_pixel`, `ssim`,
        `psnr` (floats), `per_lead` (the same names -> lists of T floats), `num_sequences`
        and `num_frames` (ints). Raises ConfigError when there has been no update.
        """
        self._require_updates()
        assert self._frame_shape is not None
        t, c, h, w = self._frame_shape
        n = self._num_sequences
        pixels = c * h * w
        keys = sorted(self._sums)
        # One device-to-host copy for everything.
        rows = torch.stack([self._sums[k].to(self._sums[keys[0]].device) for k in keys]).tolist()
        sums = dict(zip(keys, rows, strict=True))
        per_lead = {
            "mse_frame": [s / n for s in sums["sq"]],
            "mae_frame": [s / n for s in sums["abs"]],
            "mse_pixel": [s / (n * pixels) for s in sums["sq"]],
            "mae_pixel": [s / (n * pixels) for s in sums["abs"]],
            "ssim": [s / n for s in sums["ssim"]] if "ssim" in sums else [math.nan] * t,
            "psnr": [s / n for s in sums["psnr"]],
        }
        result: dict = {name: sum(per_lead[name]) / t for name in METRIC_NAMES}
        result["per_lead"] = per_lead
        result["num_sequences"] = n
        result["num_frames"] = n * t
        return result
