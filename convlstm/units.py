"""Radar unit conversions: rain rate (mm/h) <-> reflectivity (dBZ) <-> HKO-7 pixel values.

- Z = a R^b (Z in mm^6/m^3, R in mm/h) and dBZ = 10 log10 Z. Named (a, b) pairs:
  `MARSHALL_PALMER` (200, 1.6), `HKO7_ZR` (58.53, 1.56, the HKO-7 benchmark's), `FMI_ZR`
  (223, 1.53, what the Finnish Meteorological Institute uses for its composites).
- HKO-7 pixel: p = (dBZ + 10) / 70, clipped to [0, 1] (dBZ -10 .. 60). The radar models in
  this project read and predict frames in these units, whatever the source's units were.
- A rain rate of 0 is -inf dBZ, which clips to pixel 0; pixel 0 maps back to the rain rate of
  -10 dBZ (0.017 mm/h with HKO-7's a, b), far below any verification threshold.

Every function takes NumPy arrays or torch tensors (or Python floats) and returns the same kind.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "FMI_ZR",
    "HKO7_BALANCE_THRESHOLDS",
    "HKO7_BALANCE_WEIGHTS",
    "HKO7_ZR",
    "MARSHALL_PALMER",
    "balance_weights",
    "dbz_to_pixel",
    "dbz_to_rainrate",
    "pixel_to_dbz",
    "pixel_to_rainrate",
    "rainrate_to_dbz",
    "rainrate_to_pixel",
]

MARSHALL_PALMER = (200.0, 1.6)
HKO7_ZR = (58.53, 1.56)
FMI_ZR = (223.0, 1.53)
DBZ_MIN, DBZ_RANGE = -10.0, 70.0  # HKO-7 pixel = (dBZ - DBZ_MIN) / DBZ_RANGE

# Shi et al. 2017 (HKO-7): weight 1 below 2 mm/h, 2 from 2, 5 from 5, 10 from 10, 30 from 30.
HKO7_BALANCE_THRESHOLDS = (2.0, 5.0, 10.0, 30.0)
HKO7_BALANCE_WEIGHTS = (1.0, 2.0, 5.0, 10.0, 30.0)


def _log10(x):
    if isinstance(x, torch.Tensor):
        return torch.log10(x)
    with np.errstate(divide="ignore"):  # log10(0) = -inf is the intended value
        return np.log10(x)


def _clip01(x):
    if isinstance(x, torch.Tensor):
        return x.clamp(0.0, 1.0)
    return np.clip(x, 0.0, 1.0)


def rainrate_to_dbz(rate, zr: tuple[float, float] = HKO7_ZR):
    """dBZ = 10 log10(a R^b); a rate of 0 gives -inf."""
    a, b = zr
    return 10.0 * math.log10(a) + 10.0 * b * _log10(rate)


def dbz_to_rainrate(dbz, zr: tuple[float, float] = HKO7_ZR):
    """R = (10^(dBZ/10) / a)^(1/b); -inf dBZ gives 0."""
    a, b = zr
    return 10.0 ** ((dbz - 10.0 * math.log10(a)) / (10.0 * b))


def dbz_to_pixel(dbz):
    """HKO-7 pixel value (dBZ + 10) / 70, clipped to [0, 1]."""
    return _clip01((dbz - DBZ_MIN) / DBZ_RANGE)


def pixel_to_dbz(pixel):
    return pixel * DBZ_RANGE + DBZ_MIN


def rainrate_to_pixel(rate, zr: tuple[float, float] = HKO7_ZR):
    """Rain rate (mm/h) to HKO-7 pixel values through Z = a R^b."""
    return dbz_to_pixel(rainrate_to_dbz(rate, zr))


def pixel_to_rainrate(pixel, zr: tuple[float, float] = HKO7_ZR):
    """HKO-7 pixel values to rain rate (mm/h) through Z = a R^b."""
    return dbz_to_rainrate(pixel_to_dbz(pixel), zr)


def balance_weights(rate, thresholds=HKO7_BALANCE_THRESHOLDS, weights=HKO7_BALANCE_WEIGHTS):
    """Per-pixel weights of the balanced MSE/MAE from rain rates (mm/h): weights[0] below
    thresholds[0], weights[i + 1] from thresholds[i] up (rates >= threshold)."""
    if len(weights) != len(thresholds) + 1:
        raise ValueError("balance weights need one more weight than thresholds")
    out = rate * 0.0 + weights[0]
    for i, threshold in enumerate(thresholds):
        out = out + (weights[i + 1] - weights[i]) * (rate >= threshold)
    return out
