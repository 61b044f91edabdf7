"""Real radar data as rain-rate sequences: national composites, HKO-7 PNGs, SEVIR, arrays.

Every reader except :func:`read_sevir_vil` returns a :class:`RadarSequence`:

- ``rate``: float32 (T, H, W), rain rate in mm/h. NaN = no data (outside radar range, a
  masked pixel, the file's fill value); 0 = no rain. Finite values are >= 0.
- ``times``: one naive ``datetime`` per frame, strictly increasing, as the files give
  them (the national composites: UTC, from the file name; BoM: the end of the
  accumulation period).
- ``step_minutes``: the nominal step, the shortest interval between frames unless given.
  Every interval must be a whole multiple of it, or the reader refuses the data. A longer
  interval is a gap (missing frames): it is recorded (:attr:`RadarSequence.gaps`), never
  bridged or filled, and :func:`datasets.radar_windows.windows` skips every window that
  crosses one.

Formats and their conversions to mm/h (:mod:`convlstm.units` does every Z-R conversion):

- FMI PGM (:func:`read_fmi`, pysteps' ``import_fmi_pgm``): dBZ = (pixel - 64) / 2, pixel
  255 is no data (pysteps gives NaN); R from Z = 223 R^1.53 (``FMI_ZR``). Pixel 0
  (-32 dBZ, "no echo", what pysteps reports as the zero value) becomes 0 mm/h.
- ODIM HDF5 (:func:`read_odim`, pysteps' ``import_odim_hdf5``): quantity RATE is mm/h
  already (pysteps' metadata says so: the reader checks); undetect is 0, nodata NaN.
  Quantity DBZH is converted with ``zr`` (Marshall-Palmer by default).
- BoM Rainfields 3 NetCDF (:func:`read_bom`): ``precipitation`` is the accumulation in mm
  (``kg m-2``) over the file's period (``valid_time - start_time``), so mm/h =
  mm * 60 / period minutes; the fill value and negative flag values are NaN. Frames are
  read with netCDF4 directly because pysteps' ``import_bom_rf3`` walks the coordinate
  variables in Python (0.7 s a file on files without ``valid_min``: 100 s for a day of
  10-minute files); pysteps reads the first file for the georeferencing in
  ``meta["pysteps"]``, and the tests check that both give the same values.
- HKO-7-style PNG folders (:func:`read_png_frames`): 8-bit grayscale, pixel / 255 =
  (dBZ + 10) / 70, R from Z = 58.53 R^1.56 by default (``HKO7_ZR``); an optional mask
  folder of same-named PNGs (nonzero = valid) turns masked pixels into NaN.
- NumPy ``.npy``/``.npz`` (:func:`read_numpy`) and NetCDF variables (:func:`read_netcdf`)
  of shape (T, H, W) in ``units`` "mmh", "dbz" (through ``zr``) or "pixel" (HKO-7 pixel
  values: uint8 0..255 or floats in [0, 1], through ``zr``).
- SEVIR VIL HDF5 (:func:`read_sevir_vil`): VIL is not a rain rate, so the frames stay in
  SEVIR's 0..255 VIL pixel units (thresholds :data:`SEVIR_VIL_THRESHOLDS`).

Optional dependencies (``pip install -e '.[radar]'``): pysteps (FMI, ODIM), h5py (SEVIR),
netCDF4 (BoM) and xarray (NetCDF arrays) are imported only by the readers that need them.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from itertools import pairwise
from numbers import Integral
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from convlstm.errors import ConfigError, DataError, ShapeError
from convlstm.units import FMI_ZR, HKO7_ZR, MARSHALL_PALMER, dbz_to_rainrate, pixel_to_rainrate

__all__ = [
    "ENV_DIR",
    "FMI_PGM_UNDETECT_DBZ",
    "SEVIR_VIL_STEP_MINUTES",
    "SEVIR_VIL_THRESHOLDS",
    "UNITS",
    "RadarSequence",
    "SevirVil",
    "detect_format",
    "find_events",
    "parse_time",
    "radar_root",
    "read_bom",
    "read_event",
    "read_fmi",
    "read_netcdf",
    "read_numpy",
    "read_odim",
    "read_png_frames",
    "read_sevir_vil",
]

ENV_DIR = "CONVLSTM_RADAR_DIR"
DEFAULT_RADAR_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "radar"
INSTALL_HINT = "pip install -e '.[radar]'"

FMI_PGM_UNDETECT_DBZ = -32.0  # pixel 0 of FMI's PGM composites: no echo
# SEVIR's standard VIL thresholds in its pixel units (CSI is reported at these).
SEVIR_VIL_THRESHOLDS = (16, 74, 133, 160, 181, 219)
SEVIR_VIL_STEP_MINUTES = 5  # 49 frames span 4 hours
UNITS = ("mmh", "dbz", "pixel")

# Suffixes of each folder format (lower case); the order is the detection order.
_FORMATS = {
    "fmi_pgm": (".pgm", ".pgm.gz"),
    "odim_hdf5": (".hdf", ".h5", ".hdf5"),
    "bom_rf3": (".nc",),
    "png": (".png",),
}
_BOM_NAME = re.compile(r"\.prcp-[^.]+\.nc$", re.IGNORECASE)  # 66_20201031_001000.prcp-c10.nc


def _is_int(x: object) -> bool:
    return isinstance(x, Integral) and not isinstance(x, bool)


# ----------------------------------------------------------------------------- sequence


@dataclass
class RadarSequence:
    """Rain-rate frames of one event; see the module docstring for the conventions.

    ``rate`` float32 (T, H, W) in mm/h with NaN for no data, ``times`` one datetime per
    frame, ``step_minutes`` the nominal step (every interval a multiple of it; longer ones
    are gaps), ``source`` where the data came from, ``meta`` anything else (format, file
    names, the Z-R relation used, pysteps' georeferencing).
    """

    rate: np.ndarray
    times: list[datetime]
    step_minutes: int
    source: str
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        rate = self.rate
        if not isinstance(rate, np.ndarray) or rate.dtype != np.float32:
            got = f"{rate.dtype} array" if isinstance(rate, np.ndarray) else type(rate).__name__
            raise DataError(f"RadarSequence.rate must be a float32 NumPy array, got {got}")
        if rate.ndim != 3 or 0 in rate.shape:
            raise ShapeError(
                f"RadarSequence.rate must be (T, H, W) with no empty axis, got shape {rate.shape}"
            )
        if not isinstance(self.source, str) or not self.source:
            raise DataError(f"RadarSequence.source must be a non-empty str, got {self.source!r}")
        if not isinstance(self.meta, dict):
            raise DataError(f"RadarSequence.meta must be a dict, got {type(self.meta).__name__}")
        step = self.step_minutes
        if not _is_int(step) or step <= 0:
            raise DataError(f"RadarSequence.step_minutes must be a positive int, got {step!r}")
        self.step_minutes = int(step)
        self.times = list(self.times)
        if len(self.times) != len(rate):
            raise DataError(
                f"{self.source}: {len(self.times)} times for {len(rate)} frames (one per frame)"
            )
        if not all(isinstance(t, datetime) for t in self.times):
            raise DataError(f"{self.source}: times must be datetime objects")
        _check_times(self.times, self.step_minutes, self.source)
        # fmin/fmax skip NaN (no data); what is left must be a finite rate >= 0.
        lo = float(np.fmin.reduce(rate, axis=None))
        hi = float(np.fmax.reduce(rate, axis=None))
        if lo < 0 or np.isinf(hi):
            bad = lo if lo < 0 else hi
            raise DataError(
                f"{self.source}: rain rates must be finite and >= 0 mm/h (NaN = no data),"
                f" found {bad:g}"
            )

    def __len__(self) -> int:
        return len(self.rate)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.rate.shape)  # type: ignore[return-value]

    @property
    def valid(self) -> np.ndarray:
        """Boolean (T, H, W): True where there is data."""
        return np.isfinite(self.rate)

    @property
    def intervals(self) -> list[int]:
        """Minutes between consecutive frames (T - 1 of them)."""
        return [int((b - a).total_seconds()) // 60 for a, b in pairwise(self.times)]

    @property
    def gaps(self) -> list[tuple[int, int]]:
        """``(i, missing)`` for each gap: ``missing`` frames are absent before frame ``i``."""
        return [
            (i + 1, interval // self.step_minutes - 1)
            for i, interval in enumerate(self.intervals)
            if interval > self.step_minutes
        ]

    @property
    def num_missing(self) -> int:
        """Frames missing inside the sequence's time span."""
        return sum(missing for _, missing in self.gaps)

    def segments(self) -> list[tuple[int, int]]:
        """``(start, stop)`` frame ranges without a gap inside (``stop`` exclusive)."""
        starts = [0] + [i for i, _ in self.gaps]
        stops = [i for i, _ in self.gaps] + [len(self)]
        return list(zip(starts, stops, strict=True))

    def wet_fraction(self, threshold: float) -> float:
        """Share of the valid pixels with a rate >= ``threshold`` mm/h (NaN if none valid)."""
        valid = int(np.count_nonzero(self.valid))
        wet = int(np.count_nonzero(self.rate >= threshold))  # NaN compares False
        return wet / valid if valid else float("nan")


def _check_times(times: Sequence[datetime], step_minutes: int, what: str) -> None:
    step = 60 * step_minutes
    for a, b in pairwise(times):
        try:
            seconds = (b - a).total_seconds()
        except TypeError as e:  # naive and aware datetimes mixed
            raise DataError(f"{what}: times cannot be compared ({e})") from e
        if seconds <= 0:
            raise DataError(f"{what}: times must increase, but {b} follows {a}")
        if seconds % step:
            raise DataError(
                f"{what}: the interval {a} -> {b} ({seconds / 60:g} min) is not a multiple"
                f" of the {step_minutes}-minute step"
            )


def _infer_step(times: Sequence[datetime], step_minutes: int | None, what: str) -> int:
    """The given step, or the shortest interval between frames (whole minutes)."""
    if step_minutes is not None:
        if not _is_int(step_minutes) or step_minutes <= 0:
            raise ConfigError(f"step_minutes must be a positive int, got {step_minutes!r}")
        return int(step_minutes)
    if len(times) < 2:
        raise DataError(f"{what}: cannot infer the time step from one frame; pass step_minutes")
    seconds = min((b - a).total_seconds() for a, b in pairwise(times))
    if seconds <= 0:
        raise DataError(f"{what}: times must be distinct and increasing")
    if seconds % 60:
        raise DataError(f"{what}: the shortest interval ({seconds:g} s) is not whole minutes")
    return int(seconds) // 60


# ----------------------------------------------------------------------------- file names


_TIME_PATTERNS = (
    # (regex, strptime format of the joined groups); first match that parses wins.
    (re.compile(r"(?<!\d)(\d{8})[_T-]?(\d{6})(?!\d)"), "%Y%m%d%H%M%S"),  # RMI, BoM
    (re.compile(r"RAD(\d{12})(?!\d)", re.IGNORECASE), "%y%m%d%H%M%S"),  # HKO-7: RADyymmddHHMMSS
    (re.compile(r"(?<!\d)(\d{8})[_T-]?(\d{4})(?!\d)"), "%Y%m%d%H%M"),  # FMI, YYYYMMDDHHMM.png
)


def parse_time(name: str) -> datetime:
    """The time in a radar file name: ``YYYYMMDDHHMMSS`` or ``YYYYMMDD_HHMMSS``
    (RMI, BoM), ``YYYYMMDDHHMM`` (FMI, ``YYYYMMDDHHMM.png``), ``RADyymmddHHMMSS`` (HKO-7).
    """
    for regex, fmt in _TIME_PATTERNS:
        for match in regex.finditer(name):
            try:
                return datetime.strptime("".join(match.groups()), fmt)
            except ValueError:
                continue  # digits that are not a date: try the next match or pattern
    raise DataError(
        f"no time found in the file name {name!r} (expected e.g. YYYYMMDDHHMM[SS]);"
        " pass time_from_name"
    )


def _has_suffix(path: Path, suffixes: Sequence[str]) -> bool:
    name = path.name.lower()
    return not name.startswith(".") and any(name.endswith(s) for s in suffixes)


def _folder(path: str | os.PathLike, what: str) -> Path:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise DataError(f"{what} folder {folder} does not exist or is not a folder")
    return folder


def _timed_files(
    folder: Path,
    suffixes: Sequence[str],
    what: str,
    time_from_name: Callable[[str], datetime] | None = None,
) -> tuple[list[datetime], list[Path]]:
    """The folder's files of a format, sorted by the time in their names."""
    paths = [p for p in folder.iterdir() if p.is_file() and _has_suffix(p, suffixes)]
    if not paths:
        listed = ", ".join(f"*{s}" for s in suffixes)
        raise DataError(f"{what} folder {folder} is empty: no {listed} files")
    parse = time_from_name or parse_time
    timed = sorted((parse(p.name), p.name, p) for p in paths)
    for (t0, n0, _), (t1, n1, _) in pairwise(timed):
        if t0 == t1:
            raise DataError(f"{what} folder {folder}: {n0} and {n1} have the same time {t0}")
    return [t for t, _, _ in timed], [p for _, _, p in timed]


def _workers(workers: int | None, n: int) -> int:
    if workers is None:
        return max(1, min(8, os.cpu_count() or 1, n))
    if not _is_int(workers) or workers <= 0:
        raise ConfigError(f"workers must be a positive int, got {workers!r}")
    return int(workers)


def _read_frames(
    paths: Sequence[Path],
    read_one: Callable[[Path], tuple[np.ndarray, dict]],
    what: str,
    workers: int = 1,
) -> tuple[np.ndarray, dict]:
    """Stack ``read_one(path)`` frames into float32 (T, H, W); also the first file's meta.

    ``read_one`` returns (frame float (H, W), meta); any exception it raises becomes a
    DataError naming the file.
    """

    def guarded(path: Path) -> tuple[np.ndarray, dict]:
        try:
            frame, meta = read_one(path)
        except DataError:
            raise
        except Exception as e:  # pysteps, h5py, netCDF4 and PIL raise many kinds
            reason = str(e).splitlines()[0] if str(e) else ""
            raise DataError(f"cannot read {what} file {path}: {type(e).__name__}: {reason}") from e
        frame = np.asarray(frame)
        if frame.ndim != 2:
            raise DataError(f"{what} file {path} holds an array of shape {frame.shape}, not 2-D")
        return frame, meta

    first, meta = guarded(paths[0])
    out = np.empty((len(paths), *first.shape), dtype=np.float32)
    out[0] = first

    def store(i: int) -> None:
        frame, _ = guarded(paths[i])
        if frame.shape != first.shape:
            raise DataError(
                f"{what} file {paths[i]} is {frame.shape[0]}x{frame.shape[1]}, but"
                f" {paths[0].name} is {first.shape[0]}x{first.shape[1]}"
            )
        out[i] = frame

    rest = range(1, len(paths))
    if workers > 1 and len(paths) > 2:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(store, rest))  # list(): re-raises the first error
    else:
        for i in rest:
            store(i)
    return out, meta


def _pysteps_importers(what: str):
    try:
        # pysteps prints where it found its config file on import unless told otherwise.
        with contextlib.redirect_stdout(io.StringIO()):
            from pysteps.io import importers
    except ImportError as e:
        raise DataError(f"reading {what} needs pysteps ({e}): {INSTALL_HINT}") from e
    return importers


def _optional(module: str, what: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise DataError(f"reading {what} needs {module} ({e}): {INSTALL_HINT}") from e


def _meta(fmt: str, folder: Path, paths: Sequence[Path], **extra: Any) -> dict[str, Any]:
    return {"format": fmt, "folder": str(folder), "files": [p.name for p in paths], **extra}


def _check_zr(zr: object) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in zr)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ConfigError(f"zr must be a pair (a, b) of Z = a R^b, got {zr!r}") from None
    if not (a > 0 and b > 0 and np.isfinite(a) and np.isfinite(b)):
        raise ConfigError(f"zr must be a pair of positive numbers (a, b), got {zr!r}")
    return a, b


# ----------------------------------------------------------------------------- composites


def read_fmi(
    folder: str | os.PathLike,
    *,
    zr: tuple[float, float] = FMI_ZR,
    step_minutes: int | None = None,
    workers: int | None = None,
) -> RadarSequence:
    """FMI PGM composites (``*.pgm[.gz]``, time ``YYYYMMDDHHMM`` in the name) in mm/h.

    pysteps gives dBZ with NaN for pixel 255 (no data); pixel 0 (-32 dBZ, no echo) is
    set to 0 mm/h, the rest converted with Z = a R^b (FMI's 223, 1.53 by default). The
    step is the shortest interval between files unless ``step_minutes`` is given.
    """
    folder = _folder(folder, "FMI PGM")
    times, paths = _timed_files(folder, _FORMATS["fmi_pgm"], "FMI PGM")
    importers = _pysteps_importers("FMI PGM")
    zr = _check_zr(zr)

    def one(path: Path) -> tuple[np.ndarray, dict]:
        dbz, _, meta = importers.import_fmi_pgm(str(path), gzipped=path.name.endswith(".gz"))
        if meta.get("unit") != "dBZ":
            raise DataError(f"FMI PGM file {path}: pysteps reports unit {meta.get('unit')!r}")
        rate = dbz_to_rainrate(dbz, zr)
        rate[dbz <= FMI_PGM_UNDETECT_DBZ] = 0.0  # NaN (no data) compares False: stays NaN
        return rate, meta

    rate, meta = _read_frames(paths, one, "FMI PGM", _workers(workers, len(paths)))
    info = _meta("fmi_pgm", folder, paths, quantity="rain rate from dBZ", zr=zr, pysteps=meta)
    step = _infer_step(times, step_minutes, str(folder))
    return RadarSequence(rate, times, step, f"fmi:{folder}", info)


def read_odim(
    folder: str | os.PathLike,
    *,
    qty: str = "RATE",
    zr: tuple[float, float] = MARSHALL_PALMER,
    step_minutes: int | None = None,
) -> RadarSequence:
    """ODIM HDF5 composites (``*.hdf``, ``*.h5``, ``*.hdf5``) such as RMI's QPE, in mm/h.

    ``qty="RATE"`` (mm/h, the default) or ``"DBZH"`` (dBZ, converted with ``zr``). pysteps
    sets ``undetect`` to 0 mm/h and ``nodata`` to NaN. Files are read one at a time:
    h5py serialises all calls anyway. The step is the shortest interval between files unless
    ``step_minutes`` is given.
    """
    if qty not in ("RATE", "DBZH"):
        raise ConfigError(f"ODIM qty must be 'RATE' or 'DBZH', got {qty!r}")
    folder = _folder(folder, "ODIM HDF5")
    times, paths = _timed_files(folder, _FORMATS["odim_hdf5"], "ODIM HDF5")
    importers = _pysteps_importers("ODIM HDF5")
    zr = _check_zr(zr)

    def one(path: Path) -> tuple[np.ndarray, dict]:
        values, _, meta = importers.import_odim_hdf5(str(path), qty=qty)
        unit = meta.get("unit")
        if unit == "mm/h":
            return values, meta
        if unit == "dBZ":
            return dbz_to_rainrate(values, zr), meta
        raise DataError(f"ODIM file {path}: unexpected unit {unit!r} for quantity {qty}")

    rate, meta = _read_frames(paths, one, "ODIM HDF5")
    meta.pop("accutime", None)  # pysteps sets 15 min whatever the file says: misleading
    extra = {"quantity": qty} | ({"zr": zr} if qty == "DBZH" else {})
    info = _meta("odim_hdf5", folder, paths, pysteps=meta, **extra)
    step = _infer_step(times, step_minutes, str(folder))
    return RadarSequence(rate, times, step, f"odim:{folder}", info)


def read_bom(
    folder: str | os.PathLike, *, step_minutes: int | None = None, georef: bool = True
) -> RadarSequence:
    """BoM Rainfields 3 NetCDF (``*.prcp-*.nc``): accumulations in mm -> rate in mm/h.

    mm/h = mm * 60 / (the file's accumulation period in minutes, ``valid_time -
    start_time``; the step when the file lacks them). NetCDF's fill value -> NaN, and so
    are negative values (other flags: raw -2, i.e. -0.1 mm, occurs in the 2020 Brisbane
    files, where pysteps passes it on; their count is ``meta["negative_as_nodata"]``). The
    step is the shortest interval between files (the accumulation period for a single
    file) unless ``step_minutes`` is given. ``georef`` adds pysteps' georeferencing of the
    first file to ``meta["pysteps"]`` (needs pysteps; the frames themselves need netCDF4).
    """
    folder = _folder(folder, "BoM Rainfields")
    times, paths = _timed_files(folder, _FORMATS["bom_rf3"], "BoM Rainfields")
    netcdf4 = _optional("netCDF4", "BoM Rainfields NetCDF")
    step = _infer_step(times, step_minutes, str(folder)) if len(times) > 1 or step_minutes else None
    periods: set[float] = set()
    negative = [0]

    def one(path: Path) -> tuple[np.ndarray, dict]:
        with netcdf4.Dataset(path) as ds:
            if "precipitation" not in ds.variables:
                raise DataError(f"BoM file {path} has no 'precipitation' variable")
            var = ds.variables["precipitation"]
            units = getattr(var, "units", None)
            values = np.ma.filled(var[:].astype(np.float64), np.nan)  # CF scale, fill -> NaN
            minutes = step
            if "valid_time" in ds.variables and "start_time" in ds.variables:
                end, begin = ds.variables["valid_time"][...], ds.variables["start_time"][...]
                minutes = (int(end) - int(begin)) / 60
        below = values < 0  # flag values other than the fill value (-2 in c10 files)
        if below.any():
            negative[0] += int(np.count_nonzero(below))
            values[below] = np.nan
        if units in ("mm/h", "mm h-1"):
            return values, {}
        if units not in ("kg m-2", "mm"):
            raise DataError(f"BoM file {path}: precipitation in unexpected units {units!r}")
        if minutes is None or minutes <= 0:
            raise DataError(f"BoM file {path}: no valid accumulation period; pass step_minutes")
        periods.add(minutes)
        return values * (60.0 / minutes), {}

    rate, _ = _read_frames(paths, one, "BoM Rainfields")
    info = _meta("bom_rf3", folder, paths, quantity="rain rate from accumulation")
    if periods:
        info["accumulation_minutes"] = sorted(periods)
    info["negative_as_nodata"] = negative[0]
    if step is None:  # a single file
        if len(periods) != 1 or not float(next(iter(periods))).is_integer():
            raise DataError(f"{folder}: cannot tell the time step of one file; pass step_minutes")
        step = int(next(iter(periods)))
    if georef:
        importers = _pysteps_importers("BoM Rainfields georeferencing")
        try:
            info["pysteps"] = importers.import_bom_rf3(str(paths[0]))[2]
        except Exception as e:  # pysteps raises many kinds
            raise DataError(f"pysteps cannot read BoM file {paths[0]}: {e}") from e
    return RadarSequence(rate, times, step, f"bom:{folder}", info)


# ----------------------------------------------------------------------------- other formats


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


# ----------------------------------------------------------------------------- events


def radar_root() -> Path:
    """The radar data root: ``$CONVLSTM_RADAR_DIR``, else ``../shared/data/radar``."""
    env = os.environ.get(ENV_DIR)
    return Path(env).expanduser() if env else DEFAULT_RADAR_DIR


def detect_format(folder: str | os.PathLike) -> str | None:
    """The format of a folder's frames from the file names: "fmi_pgm", "odim_hdf5",
    "bom_rf3" or "png"; None when it holds none. DataError when it mixes formats."""
    folder = _folder(folder, "radar event")
    found = set()
    for p in folder.iterdir():
        if not p.is_file():
            continue
        for fmt, suffixes in _FORMATS.items():
            if _has_suffix(p, suffixes):
                if fmt == "bom_rf3" and not _BOM_NAME.search(p.name):
                    raise DataError(
                        f"{p} is NetCDF but not a BoM Rainfields file (*.prcp-*.nc):"
                        " read it with read_netcdf(path, variable)"
                    )
                found.add(fmt)
                break
    if len(found) > 1:
        raise DataError(f"folder {folder} mixes formats: {', '.join(sorted(found))}")
    return found.pop() if found else None


def read_event(path: str | os.PathLike, **options: Any) -> RadarSequence:
    """Read an event folder in whichever format its file names say (see
    :func:`detect_format`); ``options`` go to that reader."""
    folder = _folder(path, "radar event")
    fmt = detect_format(folder)
    readers = {
        "fmi_pgm": read_fmi,
        "odim_hdf5": read_odim,
        "bom_rf3": read_bom,
        "png": read_png_frames,
    }
    if fmt is None:
        known = ", ".join(s for suffixes in _FORMATS.values() for s in suffixes)
        raise DataError(f"unknown format: {folder} holds no radar files ({known})")
    return readers[fmt](folder, **options)


def find_events(root: str | os.PathLike | None = None) -> list[Path]:
    """Every folder under ``root`` (default :func:`radar_root`) that :func:`read_event` can
    read, sorted. Folders :func:`detect_format` rejects (mixed formats, NetCDF files that
    are not BoM's) are left out: read those with the format's own reader."""
    base = Path(root).expanduser() if root is not None else radar_root()
    if not base.is_dir():
        hint = "" if root is not None else f" (set ${ENV_DIR} to the radar data folder)"
        raise DataError(f"radar folder {base} does not exist{hint}")
    events = []
    for dirpath, dirnames, _ in os.walk(base):
        dirnames.sort()
        try:
            fmt = detect_format(dirpath)
        except DataError:
            continue
        if fmt is not None:
            events.append(Path(dirpath))
    return sorted(events)
