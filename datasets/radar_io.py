"""Real radar data as rain-rate sequences: national composites, HKO-7 PNGs, SEVIR, arrays.

This module holds the sequence type, the national composites' readers and event discovery;
:mod:`datasets.radar_formats` holds the readers of HKO-7 PNGs, arrays and SEVIR.
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
  SEVIR's 0..255 VIL pixel units (thresholds ``datasets.radar_formats.SEVIR_VIL_THRESHOLDS``).

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
from datetime import datetime
from itertools import pairwise
from numbers import Integral
from pathlib import Path
from typing import Any

import numpy as np

from convlstm.errors import ConfigError, DataError, ShapeError
from convlstm.units import FMI_ZR, MARSHALL_PALMER, dbz_to_rainrate

__all__ = [
    "ENV_DIR",
    "FMI_PGM_UNDETECT_DBZ",
    "UNITS",
    "RadarSequence",
    "detect_format",
    "find_events",
    "parse_time",
    "radar_root",
    "read_bom",
    "read_event",
    "read_fmi",
    "read_odim",
]

ENV_DIR = "CONVLSTM_RADAR_DIR"
DEFAULT_RADAR_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "radar"
INSTALL_HINT = "pip install -e '.[radar]'"

FMI_PGM_UNDETECT_DBZ = -32.0  # pixel 0 of FMI's PGM composites: no echo
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
    from datasets.radar_formats import read_png_frames  # that module imports this one

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
