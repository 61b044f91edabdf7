"""Nowcasting verification in torch: contingency scores, FSS and balanced errors, per lead time.

Both classes accumulate on the tensors' device without a host sync in `update` (so they can sit
inside a GPU evaluation loop); `compute` syncs once and returns plain Python numbers. Inputs are
(B, T, H, W) or (B, T, 1, H, W) tensors, T being the lead times; T is fixed by the first update.

`ContingencyScores` (thresholds in the data's units, e.g. mm/h), matching `pysteps.verification`:
- Events: the contingency table (hits, misses, false alarms, correct negatives) uses
  value > threshold, as `pysteps.verification.detcatscores.det_cat_fct` does; the FSS uses
  value >= threshold, as `pysteps.verification.spatialscores.fss_accum` does. The two differ
  only for values exactly equal to a threshold (which quantised data, e.g. dBZ in 0.5 steps,
  can have). Thresholds are compared in the input's floating dtype (float32 input: a float32
  comparison), as NumPy compares an array with a Python float.
- POD = H / (H + M), FAR = F / (H + F), CSI = H / (H + M + F),
  HSS = 2 (H CN - M F) / ((H + M)(M + CN) + (H + F)(F + CN)), from int64 counts.
  A score whose denominator is 0 is undefined and returned as NaN (pysteps gives NaN too), never
  a silent 0 or 1: e.g. no observed and no forecast events make POD, FAR, CSI and HSS NaN; observed
  events with no forecast events give POD 0, CSI 0 and FAR NaN.
- Excluded pixels: where `mask` is False, or where pred or obs is not finite, the pair is left out
  of the contingency table. (pysteps does not drop them, whatever its docstring says: NaN > thr is
  False there, so a NaN pair counts as a correct negative and a NaN forecast over an observed
  event as a miss. Exclusion keeps out-of-domain pixels from inflating the correct negatives.)
- FSS (Roberts and Lean 2008) per threshold, scale and lead time, as `fss_accum`/`fss_compute`:
  binary fields, fractions by an s x s box filter equal to scipy.ndimage.uniform_filter(size=s,
  mode="constant", cval=0) (zeros outside the field; for even s the window covers rows and
  columns i - s//2 .. i + s - 1 - s//2, scipy's placement), then, summed over fields,
  FSS = 1 - sum (Sf - So)^2 / sum (Sf^2 + So^2); NaN when no field has any event. As in pysteps, a
  non-finite value is a non-event in its own field only (the other field keeps its value there),
  and a masked pixel is a non-event in both fields: the filter still runs over the whole field
  and every position enters the sums, as pysteps does with NaN (outside-radar) pixels.
- "Pooled" scores come from counts (or FSS sums) summed over lead times, not the mean of the
  per-lead scores: the same as accumulating every lead's fields into one pysteps table.

`BalancedErrors`: B-MSE and B-MAE of Shi et al. 2017 (HKO-7): per-pixel weights from the observed
rain rate (`convlstm.units.balance_weights`: 1 below 2 mm/h, then 2, 5, 10, 30 from 2, 5, 10,
30 mm/h), the weighted squared / absolute error of the values given (HKO-7 pixel values in the
benchmark, used as given, not clamped) summed over each frame's pixels and averaged over frames.
Masked pixels and pixels where pred, obs or the rate is not finite get weight 0.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from convlstm.errors import ConfigError, ShapeError
from convlstm.units import balance_weights

__all__ = ["BalancedErrors", "ContingencyScores", "box_sum"]

COUNT_NAMES = ("hits", "misses", "false_alarms", "correct_negatives")
SCORE_NAMES = ("pod", "far", "csi", "hss")


# --------------------------------------------------------------------------------- helpers


def _as_frames(x: Tensor, name: str) -> Tensor:
    """(B, T, H, W) or (B, T, 1, H, W) -> (B, T, H, W)."""
    if not isinstance(x, Tensor):
        raise ShapeError(f"{name} must be a torch tensor, got {type(x).__name__}.")
    if x.dim() == 5:
        if x.shape[2] != 1:
            raise ShapeError(
                f"{name} of shape {tuple(x.shape)} has {x.shape[2]} channels; "
                "verification takes single-channel (B, T, 1, H, W) or (B, T, H, W) fields."
            )
        return x.squeeze(2)
    if x.dim() != 4:
        raise ShapeError(
            f"expected {name} shaped (B, T, H, W) or (B, T, 1, H, W), got {tuple(x.shape)}."
        )
    return x


def _float_dtype(*tensors: Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    if dtype in (torch.float32, torch.float64):
        return dtype
    return torch.float32  # integers, bool, half and bfloat16 are compared in float32


def _acc_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _prepare(named: dict[str, Tensor], mask: Tensor | None, num_leads: int | None):
    """Checks shapes; returns the fields as (B, T, H, W) in one float dtype and the mask."""
    shapes = {name: tuple(x.shape) for name, x in named.items() if isinstance(x, Tensor)}
    frames = {name: _as_frames(x, name) for name, x in named.items()}
    first, *rest = named
    for name in rest:
        if shapes[name] != shapes[first]:
            raise ShapeError(
                f"{name} shape {shapes[name]} does not match {first} shape {shapes[first]}."
            )
    ref = frames[first]
    t = ref.shape[1]
    if num_leads is not None and t != num_leads:
        raise ShapeError(
            f"{first} has {t} lead times but earlier updates had {num_leads}; "
            "reset() before evaluating another setting."
        )
    dtype = _float_dtype(*frames.values())
    frames = {name: x.detach().to(dtype) for name, x in frames.items()}
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            kind = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
            raise ConfigError(f"mask must be a bool tensor (True = verify the pixel), got {kind}.")
        if mask.dim() == 5 and mask.shape[2] == 1:
            mask = mask.squeeze(2)
        try:
            mask = torch.broadcast_to(mask, ref.shape)
        except RuntimeError:
            raise ShapeError(
                f"mask of shape {tuple(mask.shape)} does not broadcast to the fields' "
                f"(B, T, H, W) shape {tuple(ref.shape)}."
            ) from None
    return frames, mask


def _box_sum_1d(x: Tensor, size: int, dim: int) -> Tensor:
    n = x.shape[dim]
    before = size // 2
    after = size - 1 - before
    pad = [0, 0] * (x.dim() - 1 - (dim % x.dim())) + [before + 1, after]
    c = torch.cumsum(F.pad(x, pad), dim=dim, dtype=x.dtype)  # c[k] = sum of x[..k - before - 1]
    return c.narrow(dim, size, n) - c.narrow(dim, 0, n)


def box_sum(x: Tensor, size: int) -> Tensor:
    """Sums of an integer tensor (..., H, W) over size x size windows with zeros outside.

    The window of output (i, j) covers rows i - size//2 .. i + size - 1 - size//2 (and likewise
    columns), scipy.ndimage's placement for origin 0, so `box_sum(x, s) / s**2` is
    `scipy.ndimage.uniform_filter(x, size=s, mode="constant", cval=0)` for odd and even s.
    Exact for integers (computed by cumulative sums, whatever the size).
    """
    return _box_sum_1d(_box_sum_1d(x, size, -1), size, -2)


def _ratio(num: float, den: float) -> float:
    return num / den if den != 0 else math.nan


def _scores(h: int, m: int, f: int, cn: int) -> dict:
    hss_den = (h + m) * (m + cn) + (h + f) * (f + cn)
    return {
        "pod": _ratio(h, h + m),
        "far": _ratio(f, h + f),
        "csi": _ratio(h, h + m + f),
        "hss": _ratio(2 * (h * cn - m * f), hss_den),
        "hits": h,
        "misses": m,
        "false_alarms": f,
        "correct_negatives": cn,
    }


def _fss(numer: float, denom: float) -> float:
    return 1.0 - numer / denom if denom != 0 else math.nan


# ------------------------------------------------------------------------- contingency + FSS


class ContingencyScores:
    """Streaming POD, FAR, CSI, HSS and FSS per threshold and lead time (see the module doc).

    Args:
        thresholds: event thresholds in the data's units (e.g. mm/h), finite, at least one.
        fss_scales: FSS window sizes in pixels (ints >= 1, odd or even); () computes no FSS.
    """

    def __init__(self, thresholds: Sequence[float], fss_scales: Sequence[int] = ()) -> None:
        try:
            thresholds = [float(t) for t in thresholds]
        except (TypeError, ValueError):
            raise ConfigError(
                f"thresholds must be a sequence of numbers, got {thresholds!r}."
            ) from None
        if not thresholds:
            raise ConfigError("thresholds must contain at least one threshold.")
        bad = [t for t in thresholds if not math.isfinite(t)]
        if bad:
            raise ConfigError(f"thresholds must be finite numbers, got {bad[0]}.")
        scales = []
        for s in fss_scales:
            if isinstance(s, bool):
                raise ConfigError(f"FSS scales must be integers >= 1 (pixels), got {s!r}.")
            try:
                s = operator.index(s)
            except TypeError:
                raise ConfigError(
                    f"FSS scales must be integers >= 1 (pixels), got {s!r}."
                ) from None
            if s < 1:
                raise ConfigError(f"FSS scales must be integers >= 1 (pixels), got {s}.")
            scales.append(s)
        self.thresholds: tuple[float, ...] = tuple(thresholds)
        self.fss_scales: tuple[int, ...] = tuple(scales)
        self.reset()

    def reset(self) -> None:
        """Forget every update."""
        self._num_leads: int | None = None
        self._num_sequences = 0
        self._counts: Tensor | None = None  # (4, K, T) int64: hits, misses, f. alarms, c. neg.
        self._fss_sums: Tensor | None = None  # (2, K, S, T): sum (Sf - So)^2, sum Sf^2 + So^2

    @property
    def num_sequences(self) -> int:
        return self._num_sequences

    @torch.no_grad()
    def update(self, pred: Tensor, obs: Tensor, mask: Tensor | None = None) -> None:
        """Add a batch of forecasts `pred` and observations `obs` of the same shape,
        (B, T, H, W) or (B, T, 1, H, W). `mask` (bool, True = verify), if given, has that shape
        or one that broadcasts to (B, T, H, W), e.g. an (H, W) radar-domain mask."""
        frames, mask = _prepare({"pred": pred, "obs": obs}, mask, self._num_leads)
        pred, obs = frames["pred"], frames["obs"]
        b, t = pred.shape[:2]
        pred_ok = torch.isfinite(pred)
        obs_ok = torch.isfinite(obs)
        if mask is not None:
            pred_ok &= mask
            obs_ok &= mask
        valid = pred_ok & obs_ok
        num_valid = valid.sum(dim=(0, 2, 3))  # (T,) int64
        rows = []
        for thr in self.thresholds:
            # A Python float is compared in the tensor's dtype, as NumPy does (NEP 50).
            fe = (pred > thr) & valid
            oe = (obs > thr) & valid
            hits = (fe & oe).sum(dim=(0, 2, 3))
            false_alarms = fe.sum(dim=(0, 2, 3)) - hits
            misses = oe.sum(dim=(0, 2, 3)) - hits
            rows.append(
                torch.stack([hits, misses, false_alarms, num_valid - hits - misses - false_alarms])
            )
        counts = torch.stack(rows, dim=1)  # (4, K, T)
        fss = self._fss_batch(pred, obs, pred_ok, obs_ok) if self.fss_scales else None
        if self._counts is None:
            self._counts = counts
            self._fss_sums = fss
        else:
            self._counts += counts.to(self._counts.device)
            if fss is not None:
                assert self._fss_sums is not None
                self._fss_sums += fss.to(self._fss_sums.device)
        self._num_leads = t
        self._num_sequences += b

    def _fss_batch(self, pred: Tensor, obs: Tensor, pred_ok: Tensor, obs_ok: Tensor) -> Tensor:
        acc = _acc_dtype(pred.device)
        out = []
        for thr in self.thresholds:
            fe = ((pred >= thr) & pred_ok).to(torch.int32)
            oe = ((obs >= thr) & obs_ok).to(torch.int32)
            per_scale = []
            for s in self.fss_scales:
                sf = box_sum(fe, s).to(acc) / (s * s)
                so = box_sum(oe, s).to(acc) / (s * s)
                numer = (sf - so).square().sum(dim=(0, 2, 3))
                denom = (sf.square() + so.square()).sum(dim=(0, 2, 3))
                per_scale.append(torch.stack([numer, denom]))
            out.append(torch.stack(per_scale, dim=1))  # (2, S, T)
        return torch.stack(out, dim=1)  # (2, K, S, T)

    def compute(self) -> dict:
        """Scores per threshold, pooled over lead times and per lead time.

        Returns a dict: `thresholds` (list), `fss_scales` (list), `num_sequences`, `num_leads`,
        and `per_threshold`, a list in the order of `thresholds` of dicts with `threshold`,
        the pooled `pod`, `far`, `csi`, `hss` (floats, NaN when undefined), `hits`, `misses`,
        `false_alarms`, `correct_negatives` (ints), `fss` (a list over `fss_scales` of pooled
        FSS) and `per_lead`: the same names -> lists over lead times (`fss`: a list over scales
        of lists over lead times). Raises ConfigError when there has been no update.
        """
        if self._counts is None or self._num_leads is None:
            raise ConfigError("ContingencyScores.compute() was called before any update().")
        counts = self._counts.tolist()  # [4][K][T] ints, one sync
        fss = self._fss_sums.tolist() if self._fss_sums is not None else None
        t = self._num_leads
        per_threshold = []
        for k, thr in enumerate(self.thresholds):
            h, m, f, cn = (counts[i][k] for i in range(4))
            entry: dict = {"threshold": thr, **_scores(sum(h), sum(m), sum(f), sum(cn))}
            leads = [_scores(h[j], m[j], f[j], cn[j]) for j in range(t)]
            per_lead: dict = {key: [row[key] for row in leads] for key in leads[0]}
            if fss is not None:
                numer, denom = fss[0][k], fss[1][k]
                entry["fss"] = [_fss(sum(n), sum(d)) for n, d in zip(numer, denom, strict=True)]
                per_lead["fss"] = [
                    [_fss(nj, dj) for nj, dj in zip(n, d, strict=True)]
                    for n, d in zip(numer, denom, strict=True)
                ]
            else:
                entry["fss"] = []
                per_lead["fss"] = []
            entry["per_lead"] = per_lead
            per_threshold.append(entry)
        return {
            "thresholds": list(self.thresholds),
            "fss_scales": list(self.fss_scales),
            "num_sequences": self._num_sequences,
            "num_leads": t,
            "per_threshold": per_threshold,
        }


# ---------------------------------------------------------------------------- balanced errors


class BalancedErrors:
    """Streaming B-MSE and B-MAE (HKO-7, Shi et al. 2017) per lead time; see the module doc."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget every update."""
        self._num_leads: int | None = None
        self._num_sequences = 0
        self._sums: Tensor | None = None  # (2, T): weighted squared and absolute errors

    @property
    def num_sequences(self) -> int:
        return self._num_sequences

    @torch.no_grad()
    def update(
        self, pred: Tensor, obs: Tensor, obs_rate: Tensor, mask: Tensor | None = None
    ) -> None:
        """Add a batch: `pred` and `obs` (the values the error is taken on, e.g. HKO-7 pixels)
        and `obs_rate` (the observed rain rate in mm/h, which sets the weights), all of the same
        shape (B, T, H, W) or (B, T, 1, H, W); `mask` (bool, True = verify) broadcasts to it."""
        frames, mask = _prepare(
            {"pred": pred, "obs": obs, "obs_rate": obs_rate}, mask, self._num_leads
        )
        pred, obs, rate = frames["pred"], frames["obs"], frames["obs_rate"]
        b, t = pred.shape[:2]
        acc = _acc_dtype(pred.device)
        valid = torch.isfinite(pred) & torch.isfinite(obs) & torch.isfinite(rate)
        if mask is not None:
            valid &= mask
        weights = torch.where(valid, balance_weights(rate.to(acc)), 0.0)
        err = torch.where(valid, pred.to(acc) - obs.to(acc), 0.0)
        sums = torch.stack(
            [
                (weights * err.square()).sum(dim=(0, 2, 3)),
                (weights * err.abs()).sum(dim=(0, 2, 3)),
            ]
        )  # (2, T), summed over frames' pixels and the batch
        if self._sums is None:
            self._sums = sums
        else:
            self._sums += sums.to(self._sums.device)
        self._num_leads = t
        self._num_sequences += b

    def compute(self) -> dict:
        """Returns `b_mse`, `b_mae` (averaged over sequences and lead times), `per_lead`
        (`b_mse`, `b_mae` -> lists over lead times) and `num_sequences`. Raises ConfigError
        when there has been no update."""
        if self._sums is None or self._num_leads is None:
            raise ConfigError("BalancedErrors.compute() was called before any update().")
        n, t = self._num_sequences, self._num_leads
        sq, ab = self._sums.tolist()
        per_lead = {"b_mse": [s / n for s in sq], "b_mae": [s / n for s in ab]}
        return {
            "b_mse": sum(sq) / (n * t),
            "b_mae": sum(ab) / (n * t),
            "per_lead": per_lead,
            "num_sequences": n,
        }
