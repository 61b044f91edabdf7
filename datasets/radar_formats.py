"""Radar data in the formats people keep beside the national composites: HKO-7-style PNG
frame folders, NumPy and NetCDF arrays (as rain-rate :class:`~datasets.radar_io.RadarSequence`
objects), and SEVIR VIL HDF5 (in SEVIR's own pixel units). Conventions: see
:mod:`datasets.radar_io`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from convlstm.errors import ConfigError, DataError, ShapeError
from convlstm.units import HKO7_ZR, dbz_to_rainrate, pixel_to_rainrate
from datasets.radar_io import (
    _FORMATS,
    UNITS,
    RadarSequence,
    _check_zr,
    _folder,
    _infer_step,
    _is_int,
    _meta,
    _optional,
    _read_frames,
    _timed_files,
    _workers,
)

__all__ = [
    "SEVIR_VIL_STEP_MINUTES",
    "SEVIR_VIL_THRESHOLDS",
    "SevirVil",
    "read_netcdf",
    "read_numpy",
    "read_png_frames",
    "read_sevir_vil",
]

# SEVIR's standard VIL thresholds in its pixel units (CSI is reported at these).
SEVIR_VIL_THRESHOLDS = (16, 74, 133, 160, 181, 219)
SEVIR_VIL_STEP_MINUTES = 5  # 49 frames span 4 hours


def _pixels_to_rate(
    values: np.ndarray, units: str, zr: tuple[float, float], nodata: float | None, what: str
) -> np.ndarray:
    """Array in ``units`` -> float32 rain rate in mm/h (``nodata`` and NaN -> NaN)."""
    if units not in UNITS:
        raise ConfigError(f"units must be one of {', '.join(UNITS)}, got {units!r}")
    zr = _check_zr(zr)
    if values.dtype.kind not in "uif":
        raise DataError(f"{what} holds {values.dtype} values, not numbers")
    missing = values == nodata if nodata is not None else None
    if units == "pixel":
        if values.dtype == np.uint8:
            pixel = values / 255.0
        else:
            pixel = values.astype(np.float64)
            check = np.isfinite(pixel) if missing is None else np.isfinite(pixel) & ~missing
            finite = pixel[check]
            if finite.size and (finite.min() < 0 or finite.max() > 1):
                raise DataError(
                    f"{what}: HKO-7 pixel values must be uint8 0..255 or floats in [0, 1],"
                    f" found {finite.min():g}..{finite.max():g}"
                )
        rate = pixel_to_rainrate(pixel, zr)
    elif units == "dbz":
        rate = dbz_to_rainrate(values.astype(np.float64), zr)
    else:
        rate = values.astype(np.float64)
    rate = rate.astype(np.float32)
    if missing is not None:
        rate[missing] = np.nan
    if units == "mmh":
        negative = rate < 0
        if negative.any():
            raise DataError(
                f"{what}: negative rain rates (min {float(rate[negative].min()):g});"
                " pass nodata=VALUE if they mark missing data"
            )
    return rate


def _to_datetimes(values: object, what: str) -> list[datetime]:
    arr = np.asarray(values)
    try:
        if arr.dtype.kind == "M":
            if np.isnat(arr).any():
                raise DataError(f"{what}: NaT in the times")
            return list(arr.astype("datetime64[us]").astype(datetime))
        if arr.dtype.kind in "US":
            return [datetime.fromisoformat(str(v)) for v in arr.astype(str)]
        if arr.dtype == object and all(isinstance(v, datetime) for v in arr.ravel()):
            return list(arr.ravel())
    except ValueError as e:
        raise DataError(f"{what}: unreadable times ({e})") from e
    raise DataError(
        f"{what}: times must be datetimes, datetime64 or ISO strings, got {arr.dtype} values"
    )


def _timed_sequence(
    rate: np.ndarray,
    times: list[datetime] | None,
    step_minutes: int | None,
    start: datetime | None,
    source: str,
    meta: dict[str, Any],
) -> RadarSequence:
    if times is None:
        if step_minutes is None:
            raise DataError(f"{source}: no times in the data; pass times= or step_minutes=")
        step = _infer_step([], step_minutes, source)
        if start is not None and not isinstance(start, datetime):
            raise ConfigError(f"start must be a datetime, got {type(start).__name__}")
        first = start or datetime(1970, 1, 1)
        times = [first + timedelta(minutes=step * i) for i in range(len(rate))]
        meta["times"] = "made up from start and step_minutes"
    else:
        if len(times) != len(rate):
            raise DataError(f"{source}: {len(times)} times for {len(rate)} frames")
        order = np.argsort(np.array(times, dtype="datetime64[us]"), kind="stable")
        if (order != np.arange(len(order))).any():  # e.g. a NetCDF written out of order
            rate = rate[order]
            times = [times[i] for i in order]
        step = _infer_step(times, step_minutes, source)
    return RadarSequence(rate, times, step, source, meta)


def _check_3d(values: np.ndarray, what: str) -> None:
    if values.ndim != 3 or 0 in values.shape:
        raise ShapeError(f"{what} must be (T, H, W) with no empty axis, got shape {values.shape}")


def read_png_frames(
    folder: str | os.PathLike,
    *,
    mask_folder: str | os.PathLike | None = None,
    zr: tuple[float, float] = HKO7_ZR,
    step_minutes: int | None = None,
    time_from_name: Callable[[str], datetime] | None = None,
    workers: int | None = None,
) -> RadarSequence:
    """HKO-7-style frames: one 8-bit grayscale PNG per frame, time in the name.

    pixel / 255 = (dBZ + 10) / 70 and Z = a R^b (HKO-7's 58.53, 1.56 by default): the
    inverse of :func:`convlstm.units.rainrate_to_pixel`, so pixel 0 is the rate of
    -10 dBZ (0.017 mm/h with HKO-7's a, b). With ``mask_folder``, each frame needs a PNG of
    the same name there; its zero pixels become NaN. The step is the shortest interval
    unless ``step_minutes`` is given; ``time_from_name`` overrides :func:`parse_time`.
    """
    folder = _folder(folder, "PNG frame")
    times, paths = _timed_files(folder, _FORMATS["png"], "PNG frame", time_from_name)
    masks = None if mask_folder is None else _folder(mask_folder, "PNG mask")
    image = _optional("PIL.Image", "PNG frames")
    zr = _check_zr(zr)

    def load(path: Path) -> np.ndarray:
        with image.open(path) as im:
            if im.mode != "L":
                raise DataError(f"PNG {path} is mode {im.mode}, not 8-bit grayscale (L)")
            return np.asarray(im)

    def one(path: Path) -> tuple[np.ndarray, dict]:
        pixels = load(path)
        rate = pixel_to_rainrate(pixels / 255.0, zr)
        if masks is not None:
            mask_path = masks / path.name
            if not mask_path.is_file():
                raise DataError(f"no mask {mask_path} for the frame {path.name}")
            mask = load(mask_path)
            if mask.shape != pixels.shape:
                raise DataError(f"mask {mask_path} is {mask.shape}, its frame {pixels.shape}")
            rate[mask == 0] = np.nan
        return rate, {}

    rate, _ = _read_frames(paths, one, "PNG frame", _workers(workers, len(paths)))
    step = _infer_step(times, step_minutes, str(folder))
    info = _meta("png", folder, paths, quantity="rain rate from HKO-7 pixels", zr=zr)
    if masks is not None:
        info["mask_folder"] = str(masks)
    return RadarSequence(rate, times, step, f"png:{folder}", info)


def read_numpy(
    path: str | os.PathLike,
    *,
    key: str | None = None,
    units: str = "mmh",
    zr: tuple[float, float] = HKO7_ZR,
    times: Sequence[datetime] | np.ndarray | None = None,
    step_minutes: int | None = None,
    start: datetime | None = None,
    nodata: float | None = None,
    times_key: str = "time",
) -> RadarSequence:
    """A (T, H, W) array from ``.npy`` or ``.npz`` (``key`` names the array) as mm/h.

    ``units``: "mmh", "dbz" (through ``zr``) or "pixel" (HKO-7 pixels through ``zr``).
    ``nodata`` marks missing values (NaN always does). Times, first that applies:
    ``times``; the ``.npz`` array ``times_key`` (datetime64 or ISO strings); else made up
    from ``start`` (default 1970-01-01) and ``step_minutes`` (then required).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"array file {path} does not exist")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"cannot read array file {path}: {e}") from e
    file_times = None
    if isinstance(loaded, np.ndarray):
        if key is not None:
            raise ConfigError(f"{path} is a .npy file: it has no keys (got key={key!r})")
        values = loaded
    else:
        with loaded:
            names = [n for n in loaded.files if n != times_key]
            if key is None:
                if len(names) != 1:
                    raise ConfigError(f"{path} holds arrays {names}: pass key= to choose one")
                key = names[0]
            if key not in loaded.files:
                raise DataError(f"{path} has no array {key!r} (it has {loaded.files})")
            try:
                values = loaded[key]
                if times_key in loaded.files and times is None:
                    file_times = loaded[times_key]
            except (OSError, ValueError, EOFError) as e:
                raise DataError(f"cannot read array {key!r} of {path}: {e}") from e
    what = f"{path}" + (f"[{key}]" if key is not None else "")
    _check_3d(values, what)
    rate = _pixels_to_rate(values, units, zr, nodata, what)
    if times is None and file_times is not None:
        times = file_times
    parsed = None if times is None else _to_datetimes(times, what)
    meta = {"format": "numpy", "file": str(path), "key": key, "units": units}
    if units != "mmh":
        meta["zr"] = _check_zr(zr)
    return _timed_sequence(rate, parsed, step_minutes, start, f"numpy:{what}", meta)


def read_netcdf(
    path: str | os.PathLike,
    variable: str,
    *,
    units: str = "mmh",
    zr: tuple[float, float] = HKO7_ZR,
    time: str = "time",
    step_minutes: int | None = None,
    nodata: float | None = None,
) -> RadarSequence:
    """A NetCDF variable with dimensions (time, y, x) in any order, read with xarray.

    The ``time`` coordinate gives the times (sorted if they are not); the step is the
    shortest interval unless given, longer intervals are gaps. CF fill values and scale
    factors are applied by xarray (fill -> NaN). ``units`` and ``zr`` as in
    :func:`read_numpy`.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"NetCDF file {path} does not exist")
    xr = _optional("xarray", "NetCDF arrays")
    try:
        ds = xr.open_dataset(path)
    except Exception as e:  # xarray raises ValueError, OSError, ... per backend
        raise DataError(f"cannot read NetCDF file {path}: {type(e).__name__}: {e}") from e
    with ds:
        if variable not in ds.data_vars:
            raise DataError(f"{path} has no variable {variable!r} (it has {list(ds.data_vars)})")
        var = ds[variable]
        what = f"{path}:{variable}"
        if time not in var.dims:
            raise DataError(f"{what} has no {time!r} dimension (its dimensions: {var.dims})")
        if var.ndim != 3:
            raise ShapeError(f"{what} must have 3 dimensions (time, y, x), has {var.dims}")
        var = var.transpose(time, ...)
        try:
            values = np.asarray(var.values)
        except Exception as e:  # a truncated file fails only when the data are read
            raise DataError(f"cannot read {what}: {type(e).__name__}: {e}") from e
        times = _to_datetimes(var[time].values, what)
        dims = var.dims
    _check_3d(values, what)
    rate = _pixels_to_rate(values, units, zr, nodata, what)
    meta = {"format": "netcdf", "file": str(path), "variable": variable, "units": units}
    meta["dims"] = list(dims)
    if units != "mmh":
        meta["zr"] = _check_zr(zr)
    return _timed_sequence(rate, times, step_minutes, None, f"netcdf:{what}", meta)


class SevirVil(NamedTuple):
    """SEVIR VIL events: ``frames`` (N, 49, H, W) in VIL pixel units 0..255, ``ids``."""

    frames: np.ndarray
    ids: list[str] | None


def read_sevir_vil(
    path: str | os.PathLike, *, indices: Sequence[int] | None = None, as_float: bool = False
) -> SevirVil:
    """Events of a SEVIR VIL HDF5 file: datasets ``vil`` (N, H, W, T) uint8 and ``id``.

    Returns frames (N, T, H, W) (time second, as this project's loaders want): uint8, or
    float32 with the same values when ``as_float``. SEVIR frames are 384x384 at 1 km,
    T = 49 at 5-minute steps. VIL pixels are not rain rates: compare them with
    :data:`SEVIR_VIL_THRESHOLDS`. ``indices`` picks events (the catalog's
    ``file_index``); only those are read.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"SEVIR file {path} does not exist")
    h5py = _optional("h5py", "SEVIR HDF5")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise DataError(f"cannot read SEVIR file {path}: {e}") from e
    with f:
        if "vil" not in f:
            raise DataError(f"SEVIR file {path} has no 'vil' dataset (it has {list(f.keys())})")
        vil = f["vil"]
        if vil.ndim != 4 or vil.dtype != np.uint8:
            raise DataError(
                f"SEVIR file {path}: 'vil' is {vil.dtype} {vil.shape}, expected uint8"
                " (N, H, W, T) like (N, 384, 384, 49)"
            )
        n = vil.shape[0]
        if indices is None:
            picked = list(range(n))
        else:
            picked = list(indices)
            bad = [i for i in picked if not _is_int(i) or not 0 <= i < n]
            if bad:
                raise DataError(f"SEVIR file {path} has {n} events; bad indices {bad[:5]}")
        try:
            if indices is None:
                data = vil[()]
            else:
                data = np.stack([vil[i] for i in picked]) if picked else vil[0:0]
            ids = None
            if "id" in f:
                raw = f["id"][()]
                ids = [v.decode() if isinstance(v, bytes) else str(v) for v in raw[picked]]
        except OSError as e:
            raise DataError(f"cannot read SEVIR file {path}: {e}") from e
    frames = np.ascontiguousarray(data.transpose(0, 3, 1, 2))  # (N, H, W, T) -> (N, T, H, W)
    return SevirVil(frames.astype(np.float32) if as_float else frames, ids)
