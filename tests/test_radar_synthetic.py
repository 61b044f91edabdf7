"""Tests for datasets.radar_synthetic: the synthetic precipitation radar generator."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from convlstm.errors import ConfigError
from convlstm.units import rainrate_to_dbz, rainrate_to_pixel
from datasets import radar_synthetic as rs
from datasets.radar_synthetic import (
    FIXED_TEST_SEED,
    VALIDATION_SEED,
    SyntheticRadar,
    SyntheticRadarSpec,
    fixed_test_set,
    generate,
    latent_field,
    motion,
)
from tests.conftest import cuda_or_skip

SMALL = SyntheticRadarSpec(height=64, width=64, num_frames=6)
# Steady translation only: the true shift between frames is the drawn velocity.
STEADY = SyntheticRadarSpec(
    height=64, width=64, num_frames=4, speed=(2.0, 3.0), deformation=0.0, turn_deg=0.0
)


# ----------------------------------------------------------------------------- helpers


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two equally shaped tensors (float64)."""
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def shift(frame: torch.Tensor, dx: float, dy: float) -> torch.Tensor:
    """frame (H, W) moved by (dx, dy) px (bilinear): out(x) = frame(x - d)."""
    h, w = frame.shape
    jj, ii = torch.meshgrid(torch.arange(w) - dx, torch.arange(h) - dy, indexing="xy")
    grid = torch.stack([2 * jj / (w - 1) - 1, 2 * ii / (h - 1) - 1], -1)[None].float()
    return F.grid_sample(frame[None, None], grid, align_corners=True)[0, 0]


def radial_spectrum(fields: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Radially averaged power spectrum of (N, S, S) fields: wavenumbers (cycles/px), power."""
    n, s, _ = fields.shape
    x = fields.double() - fields.double().mean(dim=(1, 2), keepdim=True)
    power = (torch.fft.fft2(x).abs() ** 2).mean(0)  # (S, S)
    k = torch.fft.fftfreq(s, dtype=torch.float64)
    radius = torch.sqrt(k[:, None] ** 2 + k[None, :] ** 2) * s  # in units of 1 / S
    bins = radius.round().long().flatten()
    sums = torch.zeros(int(bins.max()) + 1, dtype=torch.float64).index_add_(
        0, bins, power.flatten()
    )
    counts = torch.bincount(bins).double()
    r = np.arange(1, s // 2)
    return r / s, (sums / counts).numpy()[1 : s // 2]


def spectral_slope(fields: torch.Tensor, kmin: float = 1 / 32, kmax: float = 1 / 4) -> float:
    k, p = radial_spectrum(fields)
    m = (k >= kmin) & (k <= kmax)
    return float(np.polyfit(np.log(k[m]), np.log(p[m]), 1)[0])


def wet_fraction(rain: torch.Tensor) -> np.ndarray:
    """(N, T, 1, H, W) rain rates -> (N, T) share of pixels at or above 0.5 mm/h."""
    return (rain >= 0.5).double().mean(dim=(2, 3, 4)).numpy()


# ----------------------------------------------------------------------------- basics


def test_shape_dtype_range():
    x = generate(SMALL, 3, seed=0)
    assert x.shape == (3, 6, 1, 64, 64) and x.dtype == torch.float32 and x.device.type == "cpu"
    assert torch.isfinite(x).all()
    assert x.min() >= 0 and x.max() <= SMALL.max_rate
    wet = x[x > 0]
    assert (x == 0).any() and wet.min() >= SMALL.min_rate  # dry is exactly 0, no drizzle below
    assert (x >= 0.5).any() and (x >= 5).any()
    rect = generate(SyntheticRadarSpec(height=40, width=72, num_frames=3), [0, 5], seed=1)
    assert rect.shape == (2, 3, 1, 40, 72)


def test_default_spec_is_documented_shape():
    spec = SyntheticRadarSpec()
    assert (spec.height, spec.width, spec.num_frames, spec.step_minutes) == (128, 128, 25, 5.0)
    assert spec.wet_fraction == (0.1, 0.4) and spec.speed == (0.5, 3.0)
    assert spec.spectral_exponent == 3.0 and spec.units == "mmh"
    # The domain covers the largest motion: 24 steps of 3 px plus rotation and strain.
    hp, wp = spec.domain_shape
    assert hp % 2 == 0 and 128 + 72 < hp <= 2 * 128 + 2 * 72


def test_units_agree_with_convlstm_units():
    rate = generate(SMALL, [0, 1], seed=3)
    pixel = generate(SyntheticRadarSpec(height=64, width=64, num_frames=6, units="pixel"), 2, 3)
    dbz = generate(SyntheticRadarSpec(height=64, width=64, num_frames=6, units="dbz"), 2, 3)
    torch.testing.assert_close(pixel, rainrate_to_pixel(rate), rtol=0, atol=1e-6)
    assert pixel.min() >= 0 and pixel.max() <= 1 and torch.equal(pixel == 0, rate == 0)
    wet = rate > 0
    torch.testing.assert_close(dbz[wet], rainrate_to_dbz(rate[wet]), rtol=0, atol=1e-4)
    assert (dbz[~wet] == 0).all() and dbz.min() >= 0 and dbz.max() <= 70
    # Another Z-R relation changes the reflectivity, not the rain behind it.
    mp = SyntheticRadarSpec(height=64, width=64, num_frames=6, units="dbz", zr=(200.0, 1.6))
    torch.testing.assert_close(
        generate(mp, 2, 3)[wet], rainrate_to_dbz(rate[wet], (200.0, 1.6)), rtol=0, atol=1e-4
    )


# ----------------------------------------------------------------------------- determinism


def test_same_key_same_sequence_and_different_keys_differ():
    a = generate(SMALL, [4, 9], seed=11)
    assert torch.equal(a, generate(SMALL, [4, 9], seed=11))
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(a, generate(SMALL, [4, 9], seed=12))


def test_subset_equals_slice_of_full_batch():
    # 37 sequences span two internal chunks of 32; every row is its own (seed, index).
    spec = SyntheticRadarSpec(height=32, width=24, num_frames=4)
    full = generate(spec, 37, seed=5)
    assert torch.equal(generate(spec, [3, 7], seed=5), full[[3, 7]])
    assert torch.equal(generate(spec, [36, 0, 33], seed=5), full[[36, 0, 33]])
    assert torch.equal(generate(spec, range(30, 37), seed=5), full[30:])
    assert torch.equal(latent_field(spec, [33], seed=5)[0], latent_field(spec, 34, seed=5)[33])
    m, m2 = motion(spec, 37, 5), motion(spec, [36], 5)
    np.testing.assert_array_equal(m.departure[36], m2.departure[0])
    # Index arrays of NumPy or torch work too.
    assert torch.equal(generate(spec, np.array([3, 7]), seed=5), full[[3, 7]])
    assert torch.equal(generate(spec, torch.tensor([3, 7]), seed=5), full[[3, 7]])


def test_fixed_test_set_and_dataset_splits():
    spec = SyntheticRadarSpec(height=32, width=32, num_frames=3)
    test = fixed_test_set(spec, 5)
    assert torch.equal(test[:3], fixed_test_set(spec, 3))  # a prefix
    assert torch.equal(test, generate(spec, 5, FIXED_TEST_SEED))
    val = fixed_test_set(spec, 2, seed=VALIDATION_SEED)
    assert not torch.equal(val, test[:2])

    train = SyntheticRadar(spec, length=4, seed=0)
    assert len(train) == 4 and torch.equal(train[2], generate(spec, [2], 0)[0])
    assert torch.equal(train[-1], train[3])
    loader = torch.utils.data.DataLoader(train, batch_size=4)
    assert torch.equal(next(iter(loader)), generate(spec, 4, 0))
    assert torch.equal(SyntheticRadar(spec, 5, split="test")[4], test[4])
    with pytest.raises(IndexError):
        train[4]
    with pytest.raises(ConfigError, match="reserved for the test"):
        SyntheticRadar(spec, 4, seed=FIXED_TEST_SEED)
    with pytest.raises(ConfigError, match="takes no seed"):
        SyntheticRadar(spec, 4, seed=1, split="test")
    with pytest.raises(ConfigError, match="split must be"):
        SyntheticRadar(spec, 4, seed=1, split="dev")


# ----------------------------------------------------------------------------- statistics


def test_wet_fraction_in_range():
    spec = SyntheticRadarSpec(height=64, width=64, num_frames=13)
    rain = generate(spec, 16, seed=0)
    drawn = motion(spec, 16, 0).wet_fraction
    lo, hi = spec.wet_fraction
    assert (drawn >= lo).all() and (drawn <= hi).all() and drawn.max() - drawn.min() > 0.1
    wet = wet_fraction(rain)
    # Frame 0: the threshold is the (1 - f) quantile, so round(f * 4096) pixels are wet
    # (a float32 tie at the threshold may add one).
    np.testing.assert_allclose(wet[:, 0], drawn, atol=1.5 / (64 * 64))
    # Later frames: rain moves in and out and grows and decays, so each sequence wanders
    # (on 64x64 the mean |f_t - f_0| grows to about 0.06 after 12 steps, the window having
    # moved up to 36 px) but nothing drifts: over 16 sequences the mean of f_t - f_0 has a
    # standard error of about 0.015, and seeds 0-3 stay within 0.035 of 0. One step moves
    # little rain across the 0.5 mm/h contour (at most 0.055 in seeds 0-3).
    drift = (wet - wet[:, :1]).mean(axis=0)
    assert np.abs(drift).max() < 0.05, drift
    assert np.abs(wet[:, 1] - wet[:, 0]).max() < 0.08
    assert (wet > 0.01).all() and (wet < 0.7).all()
    # A fixed fraction holds at frame 0 whatever the field.
    fixed = SyntheticRadarSpec(height=64, width=64, num_frames=2, wet_fraction=(0.3, 0.3))
    np.testing.assert_allclose(wet_fraction(generate(fixed, 4, 1))[:, 0], 0.3, atol=2e-4)


def test_rain_rate_distribution_is_radar_like():
    # Among pixels >= 0.5 mm/h the pySTEPS sample composites have 14-49 % >= 2 mm/h and
    # 0.3-3.6 % >= 10 mm/h; the generator (log_rate_std 1.6) sits in that band.
    rain = generate(SyntheticRadarSpec(height=64, width=64, num_frames=4), 16, seed=2)
    wet = rain[rain >= 0.5]
    assert 0.1 < (wet >= 2).double().mean() < 0.5
    assert 0.002 < (wet >= 10).double().mean() < 0.08
    # Light rain fringes the wet areas: 0.1 .. 0.5 mm/h pixels exist.
    assert ((rain > 0) & (rain < 0.5)).double().mean() > 0.02


@pytest.mark.parametrize("beta", [3.0, 2.0])
def test_power_spectrum_follows_the_exponent(beta):
    spec = SyntheticRadarSpec(height=64, width=64, num_frames=4, spectral_exponent=beta)
    z = latent_field(spec, 16, seed=7)[:, :, 0]  # (N, T, H, W)
    # Scales 4..32 px. Loose: the outer scale (64 px) flattens the largest of them, the
    # non-periodic crop leaks a little power, and later frames are interpolated (bicubic).
    for t in (0, 3):
        assert abs(spectral_slope(z[:, t]) + beta) < 0.5
    if beta == 3.0:
        # The log rain rate (floored at 0.1 mm/h, as pySTEPS does) keeps a radar-like slope.
        rain = generate(spec, 16, seed=7)[:, 0, 0]
        assert abs(spectral_slope(torch.log(rain.clamp_min(0.1))) + beta) < 0.8


def test_advection_by_the_true_motion():
    rain = generate(STEADY, 8, seed=0)[:, :, 0]
    mot = motion(STEADY, 8, 0)
    inner = (slice(8, -8), slice(8, -8))  # away from the edges, where rain enters
    for b in range(8):
        dx, dy = mot.translation[b, 1]  # steady: every step moves by this much
        assert 2.0 <= math.hypot(dx, dy) <= 3.0
        a, c = rain[b, 1], rain[b, 2]
        moved = corr(shift(a, dx, dy)[inner], c[inner])
        still = corr(a[inner], c[inner])
        assert moved > still + 0.1 and moved > 0.6, (b, moved, still)
        # The best integer shift of frame 1 onto frame 2 is the true motion, to a pixel.
        scores = {
            (sx, sy): corr(torch.roll(a, (sy, sx), (0, 1))[inner], c[inner])
            for sx in range(-5, 6)
            for sy in range(-5, 6)
        }
        sx, sy = max(scores, key=scores.get)
        assert math.hypot(sx - dx, sy - dy) <= 1.5, (b, (sx, sy), (dx, dy))


def test_rain_advects_in_from_outside():
    # After 12 steps of 2-3 px the upwind quarter of the frame holds air that was outside
    # at frame 0: it rains there as much as elsewhere (not zeros from a border).
    spec = SyntheticRadarSpec(
        height=64, width=64, num_frames=13, speed=(2.0, 3.0), deformation=0.0, turn_deg=0.0
    )
    rain = generate(spec, 16, seed=4)[:, -1, 0]
    mot = motion(spec, 16, 4)
    upwind = []
    for b in range(16):
        dx, dy = mot.translation[b, 0]
        if abs(dx) >= abs(dy):
            band = rain[b, :, :16] if dx > 0 else rain[b, :, -16:]
        else:
            band = rain[b, :16] if dy > 0 else rain[b, -16:]
        upwind.append(float((band >= 0.5).double().mean()))
    overall = float((rain >= 0.5).double().mean())
    assert np.mean(upwind) > 0.5 * overall and max(upwind) > 0.2


def test_growth_and_decay_in_the_lagrangian_frame():
    # Without motion the Eulerian frame is the Lagrangian one: the field decorrelates with
    # lag (cells grow and decay), yet stays recognisable from one 5-min step to the next.
    still = SyntheticRadarSpec(height=64, width=64, num_frames=9, speed=(0.0, 0.0), deformation=0)
    z = latent_field(still, 8, seed=1)[:, :, 0]
    rho = [np.mean([corr(z[b, 0], z[b, lag]) for b in range(8)]) for lag in (1, 2, 4, 8)]
    assert all(x > y + 0.03 for x, y in zip(rho, rho[1:], strict=False)), rho
    assert 0.8 < rho[0] < 0.99 and rho[-1] < 0.8, rho
    # Small scales decorrelate faster than large ones (STEPS): split the field in Fourier
    # space at a 12 px wavelength and compare lag-1 correlations.
    k = torch.sqrt(torch.fft.fftfreq(64)[:, None] ** 2 + torch.fft.fftfreq(64)[None, :] ** 2)

    def band(x, small):
        mask = (k > 1 / 12) if small else (k <= 1 / 12)
        return torch.fft.ifft2(torch.fft.fft2(x.double()) * mask).real

    fine = np.mean([corr(band(z[b, 0], True), band(z[b, 1], True)) for b in range(8)])
    coarse = np.mean([corr(band(z[b, 0], False), band(z[b, 1], False)) for b in range(8)])
    assert fine < coarse - 0.1, (fine, coarse)

    # With motion, following the air (the departure maps) explains the next frame better
    # than standing still, and the Lagrangian correlation still falls with lag.
    spec = SyntheticRadarSpec(height=64, width=64, num_frames=9)
    z = latent_field(spec, 8, seed=2)[:, :, 0]
    dep = motion(spec, 8, 2).departure  # (N, T, 2, 3)
    lagrangian = {lag: [] for lag in (1, 4, 8)}
    eulerian = []
    for b in range(8):
        for lag in lagrangian:
            follow, valid = _follow(z[b, 0], dep[b, 0], dep[b, lag])
            lagrangian[lag].append(corr(follow[valid], z[b, lag][valid]))
        eulerian.append(corr(z[b, 0], z[b, 1]))
    rho = [np.mean(v) for v in lagrangian.values()]
    assert rho[0] > np.mean(eulerian) + 0.05 and rho[0] > rho[1] > rho[2], (rho, eulerian)


def _follow(frame: torch.Tensor, dep_from: np.ndarray, dep_to: np.ndarray):
    """Frame at time t, carried with the air to the pixels of time t2 (bilinear), and the
    mask of pixels whose air was inside the frame at time t."""
    h, w = frame.shape
    cx, cy = (w - 1) / 2, (h - 1) / 2
    jj, ii = np.meshgrid(np.arange(w) - cx, np.arange(h) - cy)
    pts = np.stack([jj, ii, np.ones_like(jj)], -1)  # (H, W, 3)
    origin = pts @ dep_to.T  # frame-0 position of each pixel's air at t2
    p, q = dep_from[:, :2], dep_from[:, 2]
    at_t = (origin - q) @ np.linalg.inv(p).T  # its position at time t
    gx, gy = 2 * (at_t[..., 0] + cx) / (w - 1) - 1, 2 * (at_t[..., 1] + cy) / (h - 1) - 1
    grid = torch.from_numpy(np.stack([gx, gy], -1)).float()[None]
    out = F.grid_sample(frame[None, None], grid, align_corners=True)[0, 0]
    return out, torch.from_numpy((np.abs(gx) <= 1) & (np.abs(gy) <= 1))


# ----------------------------------------------------------------------------- motion


def test_motion_ranges_and_slow_drift():
    spec = SyntheticRadarSpec()  # defaults: 0.5-3 px/step, 30 deg turn, 0.5 px deformation
    mot = motion(spec, 64, seed=0)
    assert mot.translation.shape == (64, 24, 2) and mot.gradient.shape == (64, 24, 2, 2)
    assert mot.departure.shape == (64, 25, 2, 3)
    speed = np.hypot(mot.translation[..., 0], mot.translation[..., 1])
    assert speed.min() >= 0.5 and speed.max() <= 3.0 and speed.max() - speed.min() > 2
    angle = np.arctan2(mot.translation[..., 1], mot.translation[..., 0])
    turn = np.abs(np.angle(np.exp(1j * (angle - angle[:, :1]))))
    assert turn.max() <= math.radians(30) + 1e-9
    # Slow: the drift weight (1 - cos(pi t / 24 + phase)) / 2 changes by at most pi / 48 per
    # step, times at most 2.5 px/step of speed change and 3 px/step * 30 deg of turn.
    step = np.linalg.norm(np.diff(mot.translation, axis=1), axis=-1)
    assert step.max() <= math.pi / 48 * (2.5 + 3 * math.radians(30)) and step.mean() < 0.05
    # Divergence-free rotation and strain, within the documented bound.
    g = mot.gradient
    np.testing.assert_allclose(g[..., 0, 0] + g[..., 1, 1], 0, atol=1e-15)
    norm = np.linalg.norm(g, ord=2, axis=(-2, -1))
    assert norm.max() <= spec.deformation / 64 + 1e-12 and norm.max() > 0.5 * spec.deformation / 64
    np.testing.assert_array_equal(mot.departure[:, 0], np.tile(np.eye(2, 3), (64, 1, 1)))
    # Directions cover the circle.
    assert np.ptp(angle[:, 0]) > 5


def test_step_back_is_the_exact_flow():
    # exp(-M) of the augmented affine generator [[G, u], [0, 0]] is the one-step backward map.
    rng = np.random.default_rng(0)
    for _ in range(5):
        e1, e2, w = rng.normal(0, 0.3, 3)
        u = rng.normal(0, 2, 2)
        g = (e1, e2 - w, e2 + w, -e1)
        m = torch.zeros(3, 3, dtype=torch.float64)
        m[:2, :2] = torch.tensor(g, dtype=torch.float64).view(2, 2)
        m[:2, 2] = torch.from_numpy(u)
        ref = torch.linalg.matrix_exp(-m).numpy()
        e, p = rs._step_back(tuple(u), g)
        np.testing.assert_allclose(np.array(e).reshape(2, 2), ref[:2, :2], atol=1e-13)
        np.testing.assert_allclose(p, ref[:2, 2], atol=1e-13)


def test_departure_points_stay_inside_the_domain():
    # The domain bound holds for the extreme settings too (fast, strongly deformed, long).
    spec = SyntheticRadarSpec(
        height=32, width=48, num_frames=30, speed=(3.0, 3.0), deformation=1.5, turn_deg=180
    )
    mot = motion(spec, 64, seed=9)
    rs._grid_coefficients(mot.departure, spec)  # raises if a departure point leaves it


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("height", 0, "height must be a positive int"),
        ("width", 7, "height and width must be at least 8"),
        ("num_frames", 2.5, "num_frames must be a positive int"),
        ("wet_fraction", (0.4, 0.1), "wet_fraction must be a pair"),
        ("wet_fraction", (0.0, 0.3), "0 < low <= high < 1"),
        ("wet_fraction", 0.3, "wet_fraction must be a pair"),
        ("speed", (-1.0, 2.0), "speed must be a pair"),
        ("speed", (1.0, float("nan")), "speed must be a pair"),
        ("speed", (0.5, 500.0), "generation domain"),
        ("spectral_exponent", 0.0, "spectral_exponent must be a finite number > 0"),
        ("spectral_exponent", 9.0, "spectral_exponent must be <= 8"),
        ("deformation", -0.1, "deformation must be a finite number >= 0"),
        ("turn_deg", 200.0, "turn_deg must be <= 180"),
        ("step_minutes", True, "step_minutes must be a finite number > 0"),
        ("lifetime_minutes", float("inf"), "lifetime_minutes must be a finite number > 0"),
        ("outer_scale", -5.0, "outer_scale must be None or a finite number > 0"),
        ("min_rate", 0.6, "min_rate < 0.5 < max_rate"),
        ("max_rate", 0.4, "min_rate < 0.5 < max_rate"),
        ("units", "mm/h", "units must be one of mmh, dbz, pixel"),
        ("zr", (200.0, -1.0), "zr must be a pair"),
    ],
)
def test_bad_spec_is_a_config_error(field, value, message):
    with pytest.raises(ConfigError, match=message) as info:
        SyntheticRadarSpec(**{field: value})
    assert "\n" not in str(info.value) and field in str(info.value)


def test_bad_arguments_are_config_errors():
    with pytest.raises(ConfigError, match="seed must be an int"):
        generate(SMALL, 2, seed=-1)
    with pytest.raises(ConfigError, match="count must be a positive int"):
        generate(SMALL, 0, seed=0)
    with pytest.raises(ConfigError, match="at least one index"):
        generate(SMALL, [], seed=0)
    with pytest.raises(ConfigError, match="indices must be ints >= 0"):
        generate(SMALL, [1, -2], seed=0)
    with pytest.raises(ConfigError, match="count or a sequence of ints"):
        generate(SMALL, "12", seed=0)
    with pytest.raises(ConfigError, match="not a torch device"):
        generate(SMALL, 1, seed=0, device="gpu0")
    with pytest.raises(ConfigError, match="rng must be one of"):
        generate(SMALL, 1, seed=0, rng="philox")
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        generate(SMALL, 1, seed=0, rng="cuda")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            generate(SMALL, 1, seed=0, device="cuda")
    with pytest.raises(ConfigError, match="count must be a positive int"):
        fixed_test_set(SMALL, 0)
    spec = SyntheticRadarSpec(wet_fraction=[0.2, 0.3])  # a list is taken as a pair
    assert spec.wet_fraction == (0.2, 0.3)


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
def test_cuda_matches_cpu_and_device_rng_is_deterministic():
    device = cuda_or_skip()
    spec = SyntheticRadarSpec(height=64, width=64, num_frames=8)
    cpu = generate(spec, 6, seed=3)
    gpu = generate(spec, 6, seed=3, device=device)
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float32
    # Same random numbers (NumPy), different FFT libraries: equal up to float rounding,
    # except where rounding moves a pixel across the min_rate edge (0 vs ~0.1 mm/h).
    close = torch.isclose(gpu.cpu(), cpu, rtol=1e-3, atol=1e-3)
    assert close.double().mean() > 0.999
    lat_cpu, lat_gpu = latent_field(spec, 6, 3), latent_field(spec, 6, 3, device=device)
    torch.testing.assert_close(lat_gpu.cpu(), lat_cpu, rtol=0, atol=1e-3)
    fast = generate(spec, 6, seed=3, device=device, rng="cuda")
    assert torch.equal(fast, generate(spec, 6, seed=3, device=device, rng="cuda"))
    assert torch.equal(fast[[1, 4]], generate(spec, [1, 4], seed=3, device=device, rng="cuda"))
    assert not torch.equal(fast.cpu(), cpu)
    wet = (fast[:, 0] >= 0.5).double().mean(dim=(1, 2, 3)).cpu().numpy()
    np.testing.assert_allclose(wet, motion(spec, 6, 3).wet_fraction, atol=2 / 4096)
