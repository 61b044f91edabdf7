"""Tests for datasets.radar_io and datasets.radar_windows.

Loaders run on small files written to tmp_path; the real composites in
``../shared/data/radar`` (or ``$CONVLSTM_RADAR_DIR``) are read once per module and the
tests skip with a message when they are absent.
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.util
import io
import os
import sys
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from convlstm.errors import ConfigError, DataError, ShapeError
from convlstm.units import (
    FMI_ZR,
    HKO7_ZR,
    MARSHALL_PALMER,
    dbz_to_rainrate,
    pixel_to_rainrate,
    rainrate_to_pixel,
)
from datasets import radar_io
from datasets.radar_formats import (
    SEVIR_VIL_THRESHOLDS,
    read_netcdf,
    read_numpy,
    read_png_frames,
    read_sevir_vil,
)
from datasets.radar_io import (
    RadarSequence,
    detect_format,
    find_events,
    parse_time,
    read_bom,
    read_event,
    read_fmi,
    read_odim,
)
from datasets.radar_windows import block_average, crop_center, to_model_units, windows

needs_pysteps = pytest.mark.skipif(
    importlib.util.find_spec("pysteps") is None, reason="pysteps is not installed"
)
T0 = datetime(2020, 1, 1, 12, 0)


def minutes(*offsets: int) -> list[datetime]:
    return [T0 + timedelta(minutes=m) for m in offsets]


def seq_of(rate: np.ndarray, offsets: list[int] | None = None, step: int = 5) -> RadarSequence:
    offsets = list(range(0, step * len(rate), step)) if offsets is None else offsets
    return RadarSequence(rate.astype(np.float32), minutes(*offsets), step, "test")


# ----------------------------------------------------------------------------- sequence


def test_sequence_properties_and_gaps():
    rate = np.zeros((5, 2, 3), np.float32)
    rate[0, 0, 0] = np.nan
    rate[1] = 3.0
    seq = seq_of(rate, [0, 5, 20, 25, 35])
    assert seq.shape == (5, 2, 3) and len(seq) == 5
    assert seq.intervals == [5, 15, 5, 10]
    assert seq.gaps == [(2, 2), (4, 1)]  # 2 frames missing before frame 2, 1 before frame 4
    assert seq.num_missing == 3
    assert seq.segments() == [(0, 2), (2, 4), (4, 5)]
    assert seq.valid.sum() == 29
    assert seq.wet_fraction(0.5) == pytest.approx(6 / 29)
    assert seq_of(np.zeros((3, 2, 2))).gaps == []


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(rate=np.zeros((2, 3, 3))), DataError, "float32"),
        (dict(rate=np.zeros((3, 3), np.float32)), ShapeError, r"\(T, H, W\)"),
        (dict(rate=np.zeros((2, 0, 3), np.float32)), ShapeError, "no empty axis"),
        (dict(times=minutes(0)), DataError, "1 times for 2 frames"),
        (dict(times=minutes(5, 0)), DataError, "must increase"),
        (dict(times=minutes(0, 7)), DataError, "not a multiple of the 5-minute step"),
        (dict(times=["a", "b"]), DataError, "datetime objects"),
        (dict(step_minutes=0), DataError, "positive int"),
        (dict(step_minutes=2.5), DataError, "positive int"),
        (dict(source=""), DataError, "non-empty str"),
        (dict(meta=[]), DataError, "must be a dict"),
        (dict(rate=np.full((2, 3, 3), -1, np.float32)), DataError, "found -1"),
        (dict(rate=np.full((2, 3, 3), np.inf, np.float32)), DataError, "finite and >= 0"),
    ],
)
def test_sequence_validation(change, error, match):
    args = dict(
        rate=np.zeros((2, 3, 3), np.float32), times=minutes(0, 5), step_minutes=5, source="s"
    )
    with pytest.raises(error, match=match):
        RadarSequence(**{**args, **change})


def test_sequence_all_nan_is_valid():
    seq = seq_of(np.full((2, 2, 2), np.nan))
    assert np.isnan(seq.wet_fraction(0.5))


@pytest.mark.parametrize(
    "name, expected",
    [
        (
            "201609281445_fmi.radar.composite.lowest_FIN_SUOMI1.pgm.gz",
            datetime(2016, 9, 28, 14, 45),
        ),
        ("20210704155000.rad.best.comp.rate.qpe.hdf", datetime(2021, 7, 4, 15, 50)),
        ("2_20180616_100600.prcp-cscn.nc", datetime(2018, 6, 16, 10, 6)),
        ("66_20201031_001000.prcp-c10.nc", datetime(2020, 10, 31, 0, 10)),
        ("RAD090101123400.png", datetime(2009, 1, 1, 12, 34)),
        ("202001011205.png", datetime(2020, 1, 1, 12, 5)),
        ("frame_20200101T120500.png", datetime(2020, 1, 1, 12, 5)),
    ],
)
def test_parse_time(name, expected):
    assert parse_time(name) == expected


def test_parse_time_without_time():
    with pytest.raises(DataError, match="no time found in the file name 'frame_007.png'"):
        parse_time("frame_007.png")


# ----------------------------------------------------------------------------- PNG frames


def write_png(path: Path, pixels: np.ndarray, mode: str = "L") -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).convert(mode).save(path)


def png_event(tmp_path: Path, offsets=(0, 6, 12), masks: bool = True):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (len(offsets), 6, 8), dtype=np.uint8)
    valid = rng.random((len(offsets), 6, 8)) > 0.3
    for k, t in enumerate(minutes(*offsets)):
        name = f"{t:%Y%m%d%H%M}.png"
        write_png(tmp_path / "frames" / name, frames[k])
        if masks:
            write_png(tmp_path / "masks" / name, (valid[k] * 255).astype(np.uint8))
    return frames, valid


def test_png_round_trip_with_masks(tmp_path):
    frames, valid = png_event(tmp_path)
    seq = read_png_frames(tmp_path / "frames", mask_folder=tmp_path / "masks", workers=2)
    assert seq.shape == (3, 6, 8) and seq.rate.dtype == np.float32
    assert seq.times == minutes(0, 6, 12) and seq.step_minutes == 6 and seq.gaps == []
    expected = pixel_to_rainrate(frames / 255.0, HKO7_ZR)
    np.testing.assert_array_equal(seq.valid, valid)
    np.testing.assert_allclose(seq.rate[valid], expected[valid], rtol=1e-6)
    # back to model units: the original pixels, 0 where masked
    pixels, mask = to_model_units(seq)
    np.testing.assert_array_equal(mask, valid)
    np.testing.assert_allclose(pixels, np.where(valid, frames / 255.0, 0.0), atol=1e-6)
    assert seq.meta["format"] == "png" and seq.meta["zr"] == HKO7_ZR


def test_png_zr_and_no_masks(tmp_path):
    frames, _ = png_event(tmp_path, masks=False)
    seq = read_event(tmp_path / "frames", zr=MARSHALL_PALMER)
    assert not np.isnan(seq.rate).any()
    np.testing.assert_allclose(
        seq.rate, pixel_to_rainrate(frames / 255.0, MARSHALL_PALMER), rtol=1e-6
    )


def test_png_gaps_and_step(tmp_path):
    png_event(tmp_path, offsets=(0, 6, 12, 30, 36), masks=False)
    seq = read_png_frames(tmp_path / "frames")
    assert seq.step_minutes == 6 and seq.gaps == [(3, 2)] and seq.num_missing == 2
    # a coarser step given explicitly that the intervals do not fit
    with pytest.raises(DataError, match="not a multiple of the 12-minute step"):
        read_png_frames(tmp_path / "frames", step_minutes=12)


def test_png_single_frame_needs_step(tmp_path):
    png_event(tmp_path, offsets=(0,), masks=False)
    with pytest.raises(DataError, match="cannot infer the time step from one frame"):
        read_png_frames(tmp_path / "frames")
    assert read_png_frames(tmp_path / "frames", step_minutes=6).step_minutes == 6


def test_png_custom_time_parser(tmp_path):
    for k in range(3):
        write_png(tmp_path / f"img_{k:03d}.png", np.zeros((4, 4), np.uint8))

    def from_index(name: str) -> datetime:
        return T0 + timedelta(minutes=10 * int(name[4:7]))

    seq = read_png_frames(tmp_path, time_from_name=from_index)
    assert seq.step_minutes == 10 and seq.times[-1] == T0 + timedelta(minutes=20)


def test_png_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"PNG frame folder .*empty is empty: no \*\.png files"):
        read_png_frames(empty)
    with pytest.raises(DataError, match="does not exist or is not a folder"):
        read_png_frames(tmp_path / "nowhere")

    png_event(tmp_path, masks=False)
    masks = tmp_path / "masks"
    masks.mkdir()
    with pytest.raises(DataError, match=r"no mask .*202001011200\.png for the frame"):
        read_png_frames(tmp_path / "frames", mask_folder=masks)

    rgb = tmp_path / "rgb"
    write_png(rgb / "202001011200.png", np.zeros((4, 4), np.uint8), mode="RGB")
    write_png(rgb / "202001011205.png", np.zeros((4, 4), np.uint8), mode="RGB")
    with pytest.raises(DataError, match="is mode RGB, not 8-bit grayscale"):
        read_png_frames(rgb)

    broken = tmp_path / "broken"
    write_png(broken / "202001011200.png", np.zeros((4, 4), np.uint8))
    (broken / "202001011205.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match=r"cannot read PNG frame file .*202001011205\.png"):
        read_png_frames(broken)

    sizes = tmp_path / "sizes"
    write_png(sizes / "202001011200.png", np.zeros((4, 4), np.uint8))
    write_png(sizes / "202001011205.png", np.zeros((4, 5), np.uint8))
    with pytest.raises(DataError, match=r"202001011205\.png is 4x5, but 202001011200\.png is 4x4"):
        read_png_frames(sizes)

    same = tmp_path / "same"
    write_png(same / "202001011200.png", np.zeros((4, 4), np.uint8))
    write_png(same / "RAD200101120000.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(DataError, match="have the same time 2020-01-01 12:00:00"):
        read_png_frames(same)


# ----------------------------------------------------------------------------- SEVIR


def write_sevir(path: Path, n: int = 3, size: int = 12, frames: int = 49) -> np.ndarray:
    import h5py

    vil = np.random.default_rng(1).integers(0, 256, (n, size, size, frames), dtype=np.uint8)
    with h5py.File(path, "w") as f:
        f.create_dataset("id", data=np.array([f"S{800000 + i}".encode() for i in range(n)]))
        f.create_dataset("vil", data=vil, chunks=(1, size, size, frames))
    return vil


def test_sevir_round_trip(tmp_path):
    path = tmp_path / "SEVIR_VIL_STORMEVENTS_2018_0101_0630.h5"
    vil = write_sevir(path)
    out = read_sevir_vil(path)
    assert out.frames.shape == (3, 49, 12, 12) and out.frames.dtype == np.uint8
    np.testing.assert_array_equal(out.frames, vil.transpose(0, 3, 1, 2))
    assert out.ids == ["S800000", "S800001", "S800002"]
    picked = read_sevir_vil(path, indices=[2, 0], as_float=True)
    assert picked.frames.dtype == np.float32 and picked.ids == ["S800002", "S800000"]
    np.testing.assert_array_equal(picked.frames[0], vil[2].transpose(2, 0, 1))
    frames, ids = read_sevir_vil(path, indices=[])
    assert frames.shape == (0, 49, 12, 12) and ids == []
    assert SEVIR_VIL_THRESHOLDS == (16, 74, 133, 160, 181, 219)


def test_sevir_errors(tmp_path):
    import h5py

    with pytest.raises(DataError, match="SEVIR file .* does not exist"):
        read_sevir_vil(tmp_path / "none.h5")
    path = tmp_path / "vil.h5"
    write_sevir(path, n=2)
    with pytest.raises(DataError, match=r"has 2 events; bad indices \[2\]"):
        read_sevir_vil(path, indices=[0, 2])
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.create_dataset("ir069", data=np.zeros((1, 4, 4, 2), np.int16))
    with pytest.raises(DataError, match=r"has no 'vil' dataset \(it has \['ir069'\]\)"):
        read_sevir_vil(other)
    wrong = tmp_path / "wrong.h5"
    with h5py.File(wrong, "w") as f:
        f.create_dataset("vil", data=np.zeros((4, 4, 2), np.float32))
    with pytest.raises(DataError, match="'vil' is float32 .* expected uint8"):
        read_sevir_vil(wrong)
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5 at all")
    with pytest.raises(DataError, match="cannot read SEVIR file"):
        read_sevir_vil(junk)


# ----------------------------------------------------------------------------- NumPy


def test_npy_with_step(tmp_path):
    rate = np.random.default_rng(2).gamma(0.5, 2.0, (4, 5, 6)).astype(np.float32)
    rate[0, 0, 0] = np.nan
    np.save(tmp_path / "rate.npy", rate)
    seq = read_numpy(tmp_path / "rate.npy", step_minutes=10, start=T0)
    np.testing.assert_array_equal(seq.rate, rate)
    assert seq.times == minutes(0, 10, 20, 30) and seq.step_minutes == 10
    assert seq.meta["times"] == "made up from start and step_minutes"
    with pytest.raises(DataError, match="no times in the data; pass times= or step_minutes="):
        read_numpy(tmp_path / "rate.npy")
    with pytest.raises(ConfigError, match="is a .npy file: it has no keys"):
        read_numpy(tmp_path / "rate.npy", key="rain", step_minutes=5)


def test_npz_with_times_and_gap(tmp_path):
    dbz = np.random.default_rng(3).uniform(-10, 60, (4, 3, 3))
    times = np.array(minutes(0, 5, 10, 25), dtype="datetime64[s]")
    np.savez(tmp_path / "event.npz", dbz=dbz, other=dbz[:1], time=times)
    seq = read_numpy(tmp_path / "event.npz", key="dbz", units="dbz", zr=MARSHALL_PALMER)
    np.testing.assert_allclose(seq.rate, dbz_to_rainrate(dbz, MARSHALL_PALMER), rtol=1e-6)
    assert seq.step_minutes == 5 and seq.gaps == [(3, 2)] and seq.meta["zr"] == MARSHALL_PALMER
    with pytest.raises(ConfigError, match=r"holds arrays \['dbz', 'other'\]: pass key="):
        read_numpy(tmp_path / "event.npz")
    with pytest.raises(DataError, match="has no array 'rain'"):
        read_numpy(tmp_path / "event.npz", key="rain")
    # explicit times win over the file's
    seq = read_numpy(tmp_path / "event.npz", key="dbz", units="dbz", times=minutes(0, 6, 12, 18))
    assert seq.step_minutes == 6
    # ISO strings work too
    np.savez(
        tmp_path / "iso.npz",
        r=np.zeros((2, 2, 2)),
        time=np.array(["2020-01-01T00:00", "2020-01-01T00:10"]),
    )
    assert read_numpy(tmp_path / "iso.npz").step_minutes == 10


def test_numpy_units_and_nodata(tmp_path):
    pixels = np.array([[[0, 255], [128, 7]]], dtype=np.uint8).repeat(2, axis=0)
    np.save(tmp_path / "p.npy", pixels)
    seq = read_numpy(tmp_path / "p.npy", units="pixel", step_minutes=6, nodata=7)
    expected = pixel_to_rainrate(pixels / 255.0, HKO7_ZR)
    assert np.isnan(seq.rate[:, 1, 1]).all()
    np.testing.assert_allclose(seq.rate[:, 0], expected[:, 0], rtol=1e-6)
    floats = pixels / 255.0
    np.save(tmp_path / "f.npy", floats)
    np.testing.assert_allclose(
        read_numpy(tmp_path / "f.npy", units="pixel", step_minutes=6).rate, expected, rtol=1e-6
    )
    np.save(tmp_path / "big.npy", floats * 2)
    with pytest.raises(DataError, match=r"uint8 0..255 or floats in \[0, 1\], found 0..2"):
        read_numpy(tmp_path / "big.npy", units="pixel", step_minutes=6)
    np.save(tmp_path / "neg.npy", np.full((2, 2, 2), -1.0))
    with pytest.raises(DataError, match="negative rain rates .* pass nodata=VALUE"):
        read_numpy(tmp_path / "neg.npy", step_minutes=5)
    assert np.isnan(read_numpy(tmp_path / "neg.npy", step_minutes=5, nodata=-1).rate).all()
    with pytest.raises(ConfigError, match="units must be one of mmh, dbz, pixel, got 'mm'"):
        read_numpy(tmp_path / "neg.npy", step_minutes=5, units="mm")
    with pytest.raises(ConfigError, match=r"zr must be a pair \(a, b\)"):
        read_numpy(tmp_path / "neg.npy", step_minutes=5, units="dbz", zr=200)
    np.save(tmp_path / "flat.npy", np.zeros((4, 4)))
    with pytest.raises(ShapeError, match=r"must be \(T, H, W\) .* got shape \(4, 4\)"):
        read_numpy(tmp_path / "flat.npy", step_minutes=5)
    (tmp_path / "junk.npy").write_bytes(b"garbage")
    with pytest.raises(DataError, match="cannot read array file"):
        read_numpy(tmp_path / "junk.npy", step_minutes=5)
    with pytest.raises(DataError, match="array file .* does not exist"):
        read_numpy(tmp_path / "missing.npy", step_minutes=5)


# ----------------------------------------------------------------------------- NetCDF


def write_netcdf(path: Path, values: np.ndarray, offsets, dims=("time", "y", "x"), **attrs):
    import xarray as xr

    times = np.array(minutes(*offsets), dtype="datetime64[ns]")
    order = [("time", "y", "x").index(d) for d in dims]
    var = xr.DataArray(values.transpose(order), dims=dims, attrs=attrs)
    xr.Dataset({"rain": var}, coords={"time": times}).to_netcdf(path)


def test_netcdf_round_trip_with_gap(tmp_path):
    rate = np.random.default_rng(4).gamma(0.5, 2.0, (4, 3, 5)).astype(np.float32)
    rate[1, 2, 2] = np.nan
    write_netcdf(tmp_path / "r.nc", rate, (0, 10, 20, 50))
    seq = read_netcdf(tmp_path / "r.nc", "rain")
    np.testing.assert_array_equal(seq.rate, rate)
    assert seq.times == minutes(0, 10, 20, 50) and seq.step_minutes == 10
    assert seq.gaps == [(3, 2)]
    # other dimension order and times out of order: transposed and sorted
    write_netcdf(tmp_path / "t.nc", rate[::-1], (50, 20, 10, 0), dims=("y", "x", "time"))
    seq = read_netcdf(tmp_path / "t.nc", "rain")
    np.testing.assert_array_equal(seq.rate, rate)
    assert seq.meta["dims"] == ["time", "y", "x"]


def test_netcdf_units_and_errors(tmp_path):
    dbz = np.random.default_rng(5).uniform(0, 50, (3, 2, 2))
    write_netcdf(tmp_path / "d.nc", dbz, (0, 5, 10))
    seq = read_netcdf(tmp_path / "d.nc", "rain", units="dbz")
    np.testing.assert_allclose(seq.rate, dbz_to_rainrate(dbz, HKO7_ZR), rtol=1e-6)
    with pytest.raises(DataError, match=r"has no variable 'precip' \(it has \['rain'\]\)"):
        read_netcdf(tmp_path / "d.nc", "precip")
    with pytest.raises(DataError, match="has no 'valid_time' dimension"):
        read_netcdf(tmp_path / "d.nc", "rain", time="valid_time")
    (tmp_path / "junk.nc").write_bytes(b"CDF not really")
    with pytest.raises(DataError, match="cannot read NetCDF file"):
        read_netcdf(tmp_path / "junk.nc", "rain")
    write_netcdf(tmp_path / "dup.nc", dbz, (0, 5, 5))
    with pytest.raises(DataError, match="times must be distinct and increasing"):
        read_netcdf(tmp_path / "dup.nc", "rain")


# ----------------------------------------------------------------------------- composites


def write_fmi_pgm(folder: Path, t: datetime, pixels: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    h, w = pixels.shape
    header = f"P5\n# obstime {t:%Y%m%d%H%M}\n{w} {h}\n255\n".encode()
    path = folder / f"{t:%Y%m%d%H%M}_fmi.radar.composite.lowest_FIN_SUOMI1.pgm.gz"
    path.write_bytes(gzip.compress(header + pixels.astype(np.uint8).tobytes()))
    return path


@needs_pysteps
def test_fmi_pgm_conversion_and_gap(tmp_path):
    pixels = np.array([[0, 64, 255], [100, 254, 1]], dtype=np.uint8)
    for t in minutes(0, 5, 15):
        write_fmi_pgm(tmp_path / "fmi", t, pixels)
    seq = read_event(tmp_path / "fmi")
    assert seq.meta["format"] == "fmi_pgm" and seq.step_minutes == 5 and seq.gaps == [(2, 1)]
    frame = seq.rate[0]
    assert frame[0, 0] == 0.0  # pixel 0: -32 dBZ, no echo
    assert np.isnan(frame[0, 2])  # pixel 255: no data
    dbz = (pixels.astype(float) - 64) / 2
    for r, c in [(0, 1), (1, 0), (1, 1), (1, 2)]:
        assert frame[r, c] == pytest.approx(dbz_to_rainrate(dbz[r, c], FMI_ZR), rel=1e-6)
    assert frame[0, 1] == pytest.approx((1 / 223) ** (1 / 1.53), rel=1e-6)  # 0 dBZ


@needs_pysteps
def test_fmi_errors(tmp_path, monkeypatch):
    write_fmi_pgm(tmp_path / "fmi", T0, np.zeros((2, 2)))
    bad = tmp_path / "fmi" / "202001011205_fmi.radar.composite.lowest_FIN_SUOMI1.pgm.gz"
    bad.write_bytes(b"not gzip")
    with pytest.raises(DataError, match=r"cannot read FMI PGM file .*202001011205_fmi"):
        read_fmi(tmp_path / "fmi")
    bad.unlink()
    for name in ("pysteps", "pysteps.io", "pysteps.io.importers"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(
        DataError, match=r"reading FMI PGM needs pysteps .*pip install -e '\.\[radar\]'"
    ):
        read_fmi(tmp_path / "fmi")


def write_odim(path: Path, data: np.ndarray, quantity: str = "RATE", **what) -> None:
    import h5py

    with h5py.File(path, "w") as f:
        f.attrs["Conventions"] = np.bytes_("ODIM_H5/V2_2")
        where = f.create_group("where")
        where.attrs["projdef"] = np.bytes_(
            "+proj=lcc +lat_1=49.83 +lat_2=51.17 +lat_0=50.8 +lon_0=4.36 +x_0=649328"
            " +y_0=665262 +ellps=GRS80 +units=m +no_defs"
        )
        for key, value in dict(LL_lat=47.4, LL_lon=-0.27, UR_lat=53.7, UR_lon=9.66).items():
            where.attrs[key] = value
        dataset = f.create_group("dataset1")
        dataset.create_group("where").attrs.update(dict(xscale=1000.0, yscale=1000.0))
        data1 = dataset.create_group("data1")
        data1.create_group("what").attrs.update(dict(quantity=np.bytes_(quantity), **what))
        data1.create_dataset("data", data=data)


@needs_pysteps
def test_odim_rate_and_dbzh(tmp_path):
    rate = np.array([[0.0, np.nan, 1.5], [2.0, 0.0, 30.0]], dtype=np.float32)
    folder = tmp_path / "odim"
    folder.mkdir()
    for t in minutes(0, 5):
        write_odim(folder / f"{t:%Y%m%d%H%M%S}.rad.best.comp.rate.qpe.hdf", rate)
    seq = read_event(folder)
    assert seq.meta["format"] == "odim_hdf5" and seq.step_minutes == 5
    np.testing.assert_array_equal(seq.rate[1], rate)
    # DBZH as uint8 with gain/offset, nodata 255 and undetect 0
    raw = np.array([[0, 255], [100, 200]], dtype=np.uint8)
    dbzh = tmp_path / "dbzh"
    dbzh.mkdir()
    for t in minutes(0, 10):
        write_odim(
            dbzh / f"{t:%Y%m%d%H%M%S}.h5",
            raw,
            "DBZH",
            gain=0.5,
            offset=-32.0,
            nodata=255.0,
            undetect=0.0,
        )
    seq = read_odim(dbzh, qty="DBZH")
    assert np.isnan(seq.rate[0, 0, 1]) and seq.step_minutes == 10
    assert seq.rate[0, 1, 0] == pytest.approx(dbz_to_rainrate(18.0, MARSHALL_PALMER), rel=1e-6)
    assert seq.rate[0, 0, 0] == pytest.approx(dbz_to_rainrate(-30.0, MARSHALL_PALMER), rel=1e-5)
    with pytest.raises(
        DataError, match="cannot read ODIM HDF5 file .*: OSError: requested quantity RATE"
    ):
        read_odim(dbzh)
    with pytest.raises(ConfigError, match="ODIM qty must be 'RATE' or 'DBZH', got 'ACRR'"):
        read_odim(dbzh, qty="ACRR")


def write_bom(path: Path, raw: np.ndarray, start: datetime, period: int, units="kg m-2"):
    import netCDF4

    epoch = datetime(1970, 1, 1)
    with netCDF4.Dataset(path, "w") as ds:
        ds.createDimension("y", raw.shape[0])
        ds.createDimension("x", raw.shape[1])
        for name, when in (
            ("start_time", start),
            ("valid_time", start + timedelta(minutes=period)),
        ):
            var = ds.createVariable(name, "i8", ())
            var.units = "seconds since 1970-01-01 00:00:00 UTC"
            var[...] = int((when - epoch).total_seconds())
        for axis in ("x", "y"):
            var = ds.createVariable(axis, "f4", (axis,))
            var.units = "km"
            var[:] = np.arange(raw.shape[0 if axis == "y" else 1]) * 0.5
        var = ds.createVariable("precipitation", "i2", ("y", "x"), fill_value=-1)
        var.units = units
        var.scale_factor = 0.05
        var.add_offset = 0.0
        var.set_auto_maskandscale(False)
        var[:] = raw


def test_bom_accumulation_to_rate(tmp_path):
    pytest.importorskip("netCDF4")
    raw = np.array([[0, 20, -1], [-2, 100, 3]], dtype=np.int16)  # 0.05 mm per unit
    folder = tmp_path / "bom"
    folder.mkdir()
    for t in minutes(0, 6, 18):  # named by the end of the accumulation period
        write_bom(folder / f"2_{t:%Y%m%d_%H%M%S}.prcp-cscn.nc", raw, t - timedelta(minutes=6), 6)
    assert detect_format(folder) == "bom_rf3"
    seq = read_bom(folder, georef=False)
    assert seq.step_minutes == 6 and seq.gaps == [(2, 1)]
    assert seq.meta["accumulation_minutes"] == [6.0] and seq.meta["negative_as_nodata"] == 3
    expected = raw * 0.05 * 60 / 6  # mm over 6 min -> mm/h
    frame = seq.rate[0]
    assert np.isnan(frame[0, 2]) and np.isnan(frame[1, 0])  # fill value, flag -2
    np.testing.assert_allclose(
        frame[[0, 0, 1, 1], [0, 1, 1, 2]], expected[[0, 0, 1, 1], [0, 1, 1, 2]], rtol=1e-6
    )
    # one file: the step is its accumulation period
    single = tmp_path / "single"
    single.mkdir()
    write_bom(single / "66_20201031_001000.prcp-c10.nc", raw, datetime(2020, 10, 31), 10)
    assert read_bom(single, georef=False).step_minutes == 10
    write_bom(single / "66_20201031_002000.prcp-c10.nc", raw, datetime(2020, 10, 31), 10, "K")
    with pytest.raises(DataError, match="precipitation in unexpected units 'K'"):
        read_bom(single, georef=False)


# ----------------------------------------------------------------------------- events


def test_detect_format_and_find_events(tmp_path, monkeypatch):
    png_event(tmp_path / "root" / "hko" / "day1", masks=False)
    (tmp_path / "root" / "notes").mkdir()
    (tmp_path / "root" / "notes" / "README.txt").write_text("hello")
    assert find_events(tmp_path / "root") == [tmp_path / "root" / "hko" / "day1" / "frames"]
    monkeypatch.setenv(radar_io.ENV_DIR, str(tmp_path / "root"))
    assert radar_io.radar_root() == tmp_path / "root"
    assert len(find_events()) == 1
    monkeypatch.setenv(radar_io.ENV_DIR, str(tmp_path / "absent"))
    with pytest.raises(
        DataError, match=r"radar folder .*absent does not exist \(set \$CONVLSTM_RADAR_DIR"
    ):
        find_events()
    with pytest.raises(DataError, match="unknown format: .*notes holds no radar files"):
        read_event(tmp_path / "root" / "notes")
    mixed = tmp_path / "mixed"
    write_png(mixed / "202001011200.png", np.zeros((2, 2), np.uint8))
    (mixed / "202001011205.h5").write_bytes(b"")
    with pytest.raises(DataError, match="mixes formats: odim_hdf5, png"):
        read_event(mixed)
    other_nc = tmp_path / "nc"
    other_nc.mkdir()
    (other_nc / "era5_rain.nc").write_bytes(b"")
    with pytest.raises(
        DataError, match=r"not a BoM Rainfields file .*read_netcdf\(path, variable\)"
    ):
        detect_format(other_nc)
    assert find_events(tmp_path) == [tmp_path / "root" / "hko" / "day1" / "frames"]


# ----------------------------------------------------------------------------- windows


def block_average_loop(rate: np.ndarray, f: int) -> np.ndarray:
    t, h, w = rate.shape
    out = np.empty((t, h // f, w // f), np.float32)
    for k in range(t):
        for i in range(h // f):
            for j in range(w // f):
                block = rate[k, i * f : (i + 1) * f, j * f : (j + 1) * f]
                valid = block[np.isfinite(block)]
                out[k, i, j] = valid.mean() if 2 * valid.size >= f * f else np.nan
    return out


def test_block_average_with_nans():
    rng = np.random.default_rng(6)
    rate = rng.gamma(0.5, 2.0, (3, 12, 16)).astype(np.float32)
    rate[rng.random(rate.shape) < 0.4] = np.nan
    rate[0, :4, :4] = np.nan  # an all-NaN block
    rate[0, :4, 4:12] = 1.0
    rate[0, :2, 4:12] = np.nan  # 8 of 16 without data: exactly half, kept
    rate[0, 2, 8] = np.nan  # 9 of 16: more than half, no data
    seq = seq_of(rate)
    out = block_average(seq, 4)
    assert out.shape == (3, 3, 4) and out.rate.dtype == np.float32
    np.testing.assert_allclose(out.rate, block_average_loop(rate, 4), rtol=1e-6)
    assert np.isnan(out.rate[0, 0, 0]) and np.isfinite(out.rate[0, 0, 1])
    assert np.isnan(out.rate[0, 0, 2])
    assert out.meta["block_factor"] == 4 and out.times == seq.times
    assert block_average(out, 1).meta["block_factor"] == 4
    assert block_average(block_average(seq, 2), 2).meta["block_factor"] == 4
    with pytest.raises(ShapeError, match=r"block factor 5 does not divide the 12x16 frames; crop"):
        block_average(seq, 5)
    with pytest.raises(ConfigError, match="block factor must be a positive int, got 0"):
        block_average(seq, 0)


def test_crop_center():
    rate = np.arange(2 * 7 * 9, dtype=np.float32).reshape(2, 7, 9)
    seq = seq_of(rate)
    out = crop_center(seq, 4)
    np.testing.assert_array_equal(out.rate, rate[:, 1:5, 2:6])
    assert out.meta["crop"] == (1, 2, 4, 4)
    np.testing.assert_array_equal(crop_center(seq, (7, 3)).rate, rate[:, :, 3:6])
    with pytest.raises(ShapeError, match="crop 8x8 is larger than the 7x9 frames"):
        crop_center(seq, 8)
    with pytest.raises(ConfigError, match="crop size must be an int or"):
        crop_center(seq, "4")
    with pytest.raises(DataError, match="crop_center takes a RadarSequence, got ndarray"):
        crop_center(rate, 4)


def test_windows_count_content_and_gaps():
    rate = np.arange(8, dtype=np.float32)[:, None, None] * np.ones((1, 2, 3), np.float32)
    seq = seq_of(rate)
    frames, starts, skipped = windows(seq, context=3, horizon=2, stride=1)
    assert frames.shape == (4, 5, 2, 3) and skipped == 0
    np.testing.assert_array_equal(starts, [0, 1, 2, 3])
    np.testing.assert_array_equal(frames[2, :, 0, 0], [2, 3, 4, 5, 6])
    assert windows(seq, 3, 2, stride=2).starts.tolist() == [0, 2]
    # a gap between frames 4 and 5 (10 minutes at a 5-minute step)
    gappy = seq_of(rate, [0, 5, 10, 15, 20, 30, 35, 40])
    out = windows(gappy, 2, 1)
    assert out.starts.tolist() == [0, 1, 2, 5] and out.skipped == 2
    assert (np.diff(out.frames[:, :, 0, 0], axis=1) == 1).all()  # consecutive frames only
    none = windows(gappy, 4, 2, stride=1)
    assert none.frames.shape == (0, 6, 2, 3) and none.skipped == 3
    with pytest.raises(DataError, match="too few frames: test has 8, one window needs 10"):
        windows(seq, 6, 4)
    with pytest.raises(ConfigError, match="stride must be an int >= 1, got 0"):
        windows(seq, 3, 2, stride=0)
    with pytest.raises(ConfigError, match="context must be an int >= 1"):
        windows(seq, 0, 2)


def test_to_model_units():
    rate = np.array([[0.0, np.nan], [1.0, 1000.0]], dtype=np.float32)
    pixels, mask = to_model_units(rate)
    assert pixels.dtype == np.float32 and mask.tolist() == [[True, False], [True, True]]
    assert pixels[0, 0] == 0 and pixels[0, 1] == 0 and pixels[1, 1] == 1
    assert pixels[1, 0] == pytest.approx(rainrate_to_pixel(1.0))
    pixels_mp, _ = to_model_units(rate, MARSHALL_PALMER)
    assert pixels_mp[1, 0] == pytest.approx(rainrate_to_pixel(1.0, MARSHALL_PALMER))
    with pytest.raises(DataError, match="negative rain rates"):
        to_model_units(np.array([-1.0]))
    with pytest.raises(DataError, match="takes float rain rates"):
        to_model_units(np.array([1, 2]))


# ----------------------------------------------------------------------------- real data

REAL_ROOT = Path(
    os.environ.get(radar_io.ENV_DIR)
    or Path(__file__).resolve().parents[1].parent / "shared" / "data" / "radar"
)
# folder: (frames, (H, W), step, wet fractions at 0.5 / 2 / 5 / 10 mm/h from the README)
REAL_EVENTS = {
    "fmi_pgm/20160928": (40, (1226, 760), 5, (0.154, 0.021, 0.0025, 0.0004)),
    "fmi_pgm/20170509": (40, (1226, 760), 5, (0.028, 0.003, 0.0003, 0.0)),
    "rmi/radqpe/20210704": (39, (700, 700), 5, (0.066, 0.022, 0.0074, 0.0021)),
    "bom/prcp-cscn/2/2018/06/16": (61, (512, 512), 6, (0.311, 0.153, 0.042, 0.0083)),
    "bom/prcp-c10/66/2020/10/31": (144, (512, 512), 10, None),
}


@pytest.fixture(scope="module")
def real_events():
    """Every real event read once: {folder: sequence}."""
    if not all((REAL_ROOT / name).is_dir() for name in REAL_EVENTS):
        pytest.skip(f"no real radar samples in {REAL_ROOT} (set ${radar_io.ENV_DIR})")
    if importlib.util.find_spec("pysteps") is None:
        pytest.skip("pysteps is not installed: pip install -e '.[radar]'")
    with contextlib.redirect_stdout(io.StringIO()):
        import pysteps.io  # noqa: F401 - one-off import cost (3 s), not the readers'
    return {name: read_event(REAL_ROOT / name) for name in REAL_EVENTS}


def test_real_events_are_found():
    if not REAL_ROOT.is_dir():
        pytest.skip(f"no real radar samples in {REAL_ROOT} (set ${radar_io.ENV_DIR})")
    found = {p.relative_to(REAL_ROOT).as_posix() for p in find_events(REAL_ROOT)}
    assert set(REAL_EVENTS) <= found


@pytest.mark.parametrize("name", list(REAL_EVENTS))
def test_real_event(real_events, name):
    frames, size, step, wet = REAL_EVENTS[name]
    seq = real_events[name]
    assert seq.shape == (frames, *size) and seq.rate.dtype == np.float32
    assert seq.step_minutes == step and seq.gaps == []
    assert seq.times[1] - seq.times[0] == timedelta(minutes=step)
    if wet is not None:
        got = [seq.wet_fraction(threshold) for threshold in (0.5, 2, 5, 10)]
        np.testing.assert_allclose(got, wet, atol=0.01)
        assert abs(got[0] - wet[0]) < 0.002  # the README's 3 digits
    if name.startswith(("fmi", "rmi")):
        assert np.isnan(seq.rate).mean() > 0.2  # outside radar range is no data
    assert seq.meta["pysteps"]["projection"]


@needs_pysteps
def test_real_values_agree_with_pysteps(real_events):
    from pysteps.io import importers
    from pysteps.utils import conversion

    # FMI: pysteps' own dBZ -> rain rate (its metadata's Z = 223 R^1.53), bar no-echo pixels.
    seq = real_events["fmi_pgm/20160928"]
    path = REAL_ROOT / "fmi_pgm/20160928" / seq.meta["files"][7]
    dbz, _, meta = importers.import_fmi_pgm(str(path), gzipped=True)
    ref, _ = conversion.to_rainrate(dbz, meta)
    echo = dbz > -32
    np.testing.assert_allclose(seq.rate[7][echo], ref[echo], rtol=1e-5)
    assert (seq.rate[7][dbz == -32] == 0).all()
    np.testing.assert_array_equal(np.isnan(seq.rate[7]), np.isnan(ref))
    # RMI: pysteps' values as they are (mm/h).
    seq = real_events["rmi/radqpe/20210704"]
    path = REAL_ROOT / "rmi/radqpe/20210704" / seq.meta["files"][20]
    ref, _, meta = importers.import_odim_hdf5(str(path))
    assert meta["unit"] == "mm/h"
    np.testing.assert_allclose(seq.rate[20], ref, rtol=1e-6)
    # BoM: pysteps' accumulation (mm) * 60 / period; its negative flags are our no data.
    for name, index in (("bom/prcp-cscn/2/2018/06/16", 30), ("bom/prcp-c10/66/2020/10/31", 0)):
        seq = real_events[name]
        ref, _, meta = importers.import_bom_rf3(str(REAL_ROOT / name / seq.meta["files"][index]))
        ref = np.ma.filled(ref, np.nan) * 60 / meta["accutime"]
        ref[ref < 0] = np.nan
        np.testing.assert_allclose(seq.rate[index], ref, rtol=1e-6)
        np.testing.assert_array_equal(np.isnan(seq.rate[index]), np.isnan(ref))
    assert real_events["bom/prcp-c10/66/2020/10/31"].meta["negative_as_nodata"] > 0


def test_real_event_to_windows(real_events):
    seq = real_events["rmi/radqpe/20210704"]
    small = block_average(crop_center(seq, 512), 4)
    assert small.shape == (39, 128, 128)
    frames, starts, skipped = windows(small, context=5, horizon=5, stride=5)
    assert frames.shape == (6, 10, 128, 128) and skipped == 0
    pixels, mask = to_model_units(frames)
    assert pixels.min() >= 0 and pixels.max() <= 1 and 0 < mask.mean() < 1
