"""Synthetic precipitation radar sequences with the statistics that matter for nowcasting.

Each sequence is built in three layers (all vectorised over a batch; one loop over time):

1. **A Lagrangian Gaussian field** ``z_t`` on a periodic generation domain larger than the
   output. Its Fourier modes follow an AR(1) process, so the field is stationary in time with
   the power spectrum ``P(k) ~ (k^2 + k0^2)^(-beta / 2)`` (``k`` in cycles per pixel,
   ``beta = spectral_exponent``, default 3 as measured on radar rain fields, e.g. the RMI
   and FMI composites in ``shared/data/radar`` give 2.6-3.0 for the log rain rate;
   ``k0 = 1 / outer_scale``), and the mean is zero::

       F_t(k) = phi(k) F_{t-1}(k) + sqrt(1 - phi(k)^2) sqrt(P(k)) eps_t(k)
       phi(k) = exp(-step_minutes / tau(k)),
       tau(k) = lifetime_minutes * (wavelength / lifetime_scale) ** lifetime_exponent

   with wavelength ``1 / |k|`` px. Defaults (120 min at 32 px, exponent 1.3): features 64 px
   across have an e-folding time of 4.9 h (lag-1 correlation 0.983 at 5 min), 12 px ones
   33 min (0.86), 6 px ones 13 min (0.68), 2 px ones 3 min (0.22): small scales decorrelate
   faster than large ones, as in STEPS, so cells grow and decay while they move. This is a
   fit to the lag-1 Lagrangian correlations of the pySTEPS cascade (8 levels, LK motion) of
   the RMI and FMI 1-km, 5-min composites in ``shared/data/radar``: 0.98 at 50-70 km,
   0.95 at 25-30 km, 0.85-0.88 at 12-14 km, 0.53 at 6 km.
2. **Advection.** Frame ``t`` shows the field ``z_t`` at the departure points of its pixels:
   the points that the motion field carries onto the pixel centres in ``t`` steps
   (semi-Lagrangian backward warping with ``grid_sample``, bicubic). The motion field is
   affine about the grid centre, ``v(x) = u + G (x - c)`` in px per step: a translation ``u``
   (speed uniform in ``speed``, direction uniform in [0, 2 pi)) plus a divergence-free
   rotation and strain ``G = [[e1, e2 - w], [e2 + w, -e1]]`` whose norm ``|w| + |(e1, e2)|``
   adds at most ``deformation`` px/step at distance ``min(H, W) / 2`` from the centre. The
   parameters drift slowly: they move between two random states ``a`` and ``b`` (direction
   of ``b`` turned by up to ``turn_deg`` from ``a``) as ``a + (b - a) (1 - cos(pi t /
   drift_steps + phase)) / 2``, ``drift_steps = drift_minutes / step_minutes``, so they
   never leave their ranges. Each step is integrated exactly (closed-form exponential of the
   affine field at the step's midpoint) and the departure maps are composed, so a frame is
   interpolated once from the field, never from an earlier, already smoothed frame. The
   generation domain covers every departure point (a bound derived from the spec), so rain
   advects in from outside the output instead of zeros.
3. **Rain rate.** Per sequence, a wet fraction ``f`` is drawn uniformly from
   ``wet_fraction``. Frame 0 of the sampled field fixes ``thr``, its ``(1 - f)`` quantile
   (so exactly ``round(f H W)`` pixels of frame 0 are at or above 0.5 mm/h), and ``s``, its
   spread (half the 16-84 % quantile range). All frames then map through the same log-normal
   transform::

       R = 0.5 * exp(log_rate_std * (z - thr) / s)   [mm/h]
       R = 0 where R < min_rate (dry);  R = min(R, max_rate)

   so the wet fraction holds exactly at frame 0 and drifts afterwards only as rain moves in
   and out, grows and decays. Light rain (``min_rate`` .. 0.5 mm/h) fringes the wet areas.
   ``log_rate_std`` 1.6 gives a mean and spread of ln R over the wet pixels of about 0.25-0.3
   and 0.8, and 24-27 % / 2-3 % of them at or above 2 / 10 mm/h (pySTEPS samples: RMI
   2021-07-04 0.3-0.5, 0.85, 28-36 %, 2.6-3.6 %; FMI 2016-09-28 0.1, 0.6, 13-14 %, 0.4 %).

Units (``spec.units``): ``"mmh"`` rain rate, 0 = dry; ``"dbz"`` 10 log10(a R^b) with ``spec.zr``
(HKO-7's by default), dry (and anything below 0 dBZ) = 0; ``"pixel"`` the HKO-7 pixel value
``convlstm.units.rainrate_to_pixel`` (dry = 0). Frames are ``step_minutes`` (5) apart; the
spec's speeds are in px per step and its time scales in minutes, which ``step_minutes``
turns into steps (so it is more than a label: halving it at fixed speeds slows the
evolution relative to the motion).

Determinism. Sequence ``index`` of ``seed`` draws everything from
``np.random.default_rng([seed, index, 0x52414441])`` alone: 12 uniforms for motion and wet
fraction, one 63-bit integer (the seed of the ``rng="cuda"`` stream), then the field's
standard normals, frame by frame. So a sequence never depends on call order, batch
composition, chunking or worker count: ``generate(spec, [3, 7], seed)`` equals rows 3 and 7
of ``generate(spec, 10, seed)`` bit for bit on CPU. ``units`` and ``zr`` only change how
the same rain is expressed; the grid, frame count, speeds and deformation set the
generation domain, so changing them (or the spectrum or lifetimes) changes the sequences.
With the default ``rng="numpy"`` the random numbers come from NumPy on the CPU for every
device, so a CUDA device gives the same sequences as the CPU up to float rounding (cuFFT
and MKL round differently; the rain transform amplifies a field error e to about 1.6 e
relative), except where rounding moves a pixel across the ``min_rate`` edge. ``rng="cuda"``
draws the normals on the GPU instead (torch Philox, seeded per sequence with 63 bits):
faster there, still deterministic per (seed, index) and independent of the batch, but
different sequences from the CPU's. (The CUDA path is covered by a ``gpu``-marked test that
had not run on a GPU when this was written.)

Splits. Training streams use seeds ``0 <= seed < 2**32`` (e.g. one seed per epoch);
the fixed test set uses ``FIXED_TEST_SEED = 2**32`` and the validation set
``VALIDATION_SEED = 2**32 + 1``, outside that range, so no training stream can draw a test
sequence (distinct seeds are distinct PCG64 streams). ``fixed_test_set(spec, n)`` generates
it on the CPU; its first ``n`` sequences do not depend on ``n``.

Speed: see ``generate`` (about 15-20 sequences/s of 128x128x25 on 2 CPU cores).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np
import torch
import torch.nn.functional as F

from convlstm.errors import ConfigError
from convlstm.units import HKO7_ZR, rainrate_to_dbz, rainrate_to_pixel

__all__ = [
    "FIXED_TEST_SEED",
    "VALIDATION_SEED",
    "WET_RATE",
    "Motion",
    "SyntheticRadar",
    "SyntheticRadarSpec",
    "fixed_test_set",
    "generate",
    "latent_field",
    "motion",
]

WET_RATE = 0.5  # mm/h: the rate at which the wet fraction is counted
FIXED_TEST_SEED = 2**32  # reserved: training seeds are below 2**32
VALIDATION_SEED = 2**32 + 1
TRAIN_SEED_LIMIT = 2**32
UNITS = ("mmh", "dbz", "pixel")
RNGS = ("numpy", "cuda")
MAX_DOMAIN = 4096  # px per axis of the generation domain
_STREAM_TAG = 0x52414441  # "RADA": keeps these streams apart from other generators' [seed, i]
_NUM_UNIFORMS = 12
_INTERP_MARGIN = 2  # bicubic reads 2 px beyond the cell that holds a point
_CHUNK = {"cpu": 32, "cuda": 128}  # sequences generated together (memory bound only)


def _is_int(x: object) -> bool:
    return isinstance(x, Integral) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool) and math.isfinite(x)


def _smooth_even(n: int) -> int:
    """Smallest even integer >= n whose only prime factors are 2, 3 and 5 (fast FFT sizes)."""
    m = max(2, n + (n % 2))
    while True:
        k = m
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        if k == 1:
            return m
        m += 2


@dataclass(frozen=True)
class SyntheticRadarSpec:
    """Grid, motion, evolution and rain statistics of generated radar sequences.

    Speeds are in px per step, time scales in minutes (``step_minutes`` per step).
    """

    height: int = 128
    width: int = 128
    num_frames: int = 25  # e.g. 5 context + 20 target
    step_minutes: float = 5.0
    wet_fraction: tuple[float, float] = (0.10, 0.40)  # share of pixels >= 0.5 mm/h at frame 0
    speed: tuple[float, float] = (0.5, 3.0)  # translation at the grid centre, px/step
    deformation: float = 0.5  # px/step rotation + strain add at distance min(H, W) / 2
    turn_deg: float = 30.0  # direction change between the two drift states
    drift_minutes: float = 120.0  # time between the two drift states (half period)
    spectral_exponent: float = 3.0  # beta in P(k) ~ (k^2 + k0^2)^(-beta / 2)
    outer_scale: float | None = None  # px, 1 / k0; None: max(height, width)
    lifetime_minutes: float = 120.0  # e-folding time of features lifetime_scale px across
    lifetime_scale: float = 32.0  # px
    lifetime_exponent: float = 1.3  # lifetime ~ wavelength ** lifetime_exponent
    log_rate_std: float = 1.6  # d ln R per unit spread of the field
    min_rate: float = 0.1  # mm/h; lower rates are set to 0 (dry)
    max_rate: float = 150.0  # mm/h; higher rates are clipped
    units: str = "mmh"  # "mmh", "dbz" or "pixel" (HKO-7)
    zr: tuple[float, float] = HKO7_ZR  # (a, b) of Z = a R^b for "dbz" and "pixel"

    def __post_init__(self) -> None:
        for name in ("height", "width", "num_frames"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ConfigError(
                    f"SyntheticRadarSpec.{name} must be a positive int, got {value!r}"
                )
        if self.height < 8 or self.width < 8:
            raise ConfigError(
                "SyntheticRadarSpec height and width must be at least 8,"
                f" got {self.height}x{self.width}"
            )
        positive = (
            "step_minutes",
            "drift_minutes",
            "spectral_exponent",
            "lifetime_minutes",
            "lifetime_scale",
            "log_rate_std",
            "max_rate",
        )
        for name in positive:
            value = getattr(self, name)
            if not _is_real(value) or value <= 0:
                raise ConfigError(
                    f"SyntheticRadarSpec.{name} must be a finite number > 0, got {value!r}"
                )
        for name in ("deformation", "turn_deg", "lifetime_exponent", "min_rate"):
            value = getattr(self, name)
            if not _is_real(value) or value < 0:
                raise ConfigError(
                    f"SyntheticRadarSpec.{name} must be a finite number >= 0, got {value!r}"
                )
        if self.outer_scale is not None and (
            not _is_real(self.outer_scale) or self.outer_scale <= 0
        ):
            raise ConfigError(
                "SyntheticRadarSpec.outer_scale must be None or a finite number > 0,"
                f" got {self.outer_scale!r}"
            )
        self._check_pair("wet_fraction", lambda lo, hi: 0 < lo <= hi < 1, "0 < low <= high < 1")
        self._check_pair("speed", lambda lo, hi: 0 <= lo <= hi, "0 <= low <= high")
        self._check_pair("zr", lambda a, b: a > 0 and b > 0, "a > 0 and b > 0")
        if self.turn_deg > 180:
            raise ConfigError(f"SyntheticRadarSpec.turn_deg must be <= 180, got {self.turn_deg!r}")
        if self.spectral_exponent > 8:
            raise ConfigError(
                "SyntheticRadarSpec.spectral_exponent must be <= 8 (radar rain fields: ~3),"
                f" got {self.spectral_exponent!r}"
            )
        if not self.min_rate < WET_RATE < self.max_rate:
            raise ConfigError(
                f"SyntheticRadarSpec needs min_rate < {WET_RATE} < max_rate (mm/h), got"
                f" min_rate={self.min_rate!r}, max_rate={self.max_rate!r}"
            )
        if self.units not in UNITS:
            raise ConfigError(
                f"SyntheticRadarSpec.units must be one of {', '.join(UNITS)}, got {self.units!r}"
            )
        hp, wp = self.domain_shape
        if max(hp, wp) > MAX_DOMAIN:
            raise ConfigError(
                f"SyntheticRadarSpec needs a {hp}x{wp} generation domain (at most {MAX_DOMAIN}"
                " px a side) to cover the motion: lower speed, deformation or num_frames"
            )

    def _check_pair(self, name: str, ok, rule: str) -> None:
        value = getattr(self, name)
        pair = tuple(value) if isinstance(value, (tuple, list)) else None
        if pair is None or len(pair) != 2 or not all(_is_real(v) for v in pair) or not ok(*pair):
            raise ConfigError(
                f"SyntheticRadarSpec.{name} must be a pair (low, high) of finite numbers with"
                f" {rule}, got {value!r}"
                if name != "zr"
                else f"SyntheticRadarSpec.zr must be a pair (a, b) with {rule}, got {value!r}"
            )
        object.__setattr__(self, name, (float(pair[0]), float(pair[1])))

    @property
    def gradient_bound(self) -> float:
        """Largest norm of the velocity gradient G, per step: deformation / (min(H, W) / 2)."""
        return self.deformation / (min(self.height, self.width) / 2.0)

    @property
    def outer_scale_px(self) -> float:
        return float(max(self.height, self.width)) if self.outer_scale is None else self.outer_scale

    @property
    def domain_shape(self) -> tuple[int, int]:
        """(rows, cols) of the periodic generation domain.

        A departure point is ``P_t y + q_t`` (``y`` relative to the grid centre) with
        ``|P_t - I| <= e^(g t) - 1`` and, over all frames, the centre's departure points
        ``q_t`` within ``d_c = (s / g)(e^(g t) - 1)`` of each other (Gronwall; ``s`` the top
        speed, ``g`` the gradient bound, ``t = num_frames - 1``). Along an axis of ``n``
        pixels the departure points therefore span at most ``n - 1 + 2 d_r + d_c`` with
        ``d_r = (e^(g t) - 1) |y|max``; add the interpolation margins, round up to an FFT
        size.
        """
        g, t, s = self.gradient_bound, self.num_frames - 1, self.speed[1]
        try:
            growth = math.expm1(g * t)
        except OverflowError:
            growth = math.inf
        d_c = s * t if g == 0 else s / g * growth
        half_diag = 0.5 * math.hypot(self.height - 1, self.width - 1)
        d_r = growth * half_diag
        shape = []
        for n in (self.height, self.width):
            extent = n - 1 + 2 * d_r + d_c + 2 * _INTERP_MARGIN + 1
            if not math.isfinite(extent) or extent > 4 * MAX_DOMAIN:
                shape.append(4 * MAX_DOMAIN)
            else:
                shape.append(_smooth_even(math.ceil(extent)))
        return shape[0], shape[1]


# ----------------------------------------------------------------------------- keys


def _check_seed(seed: object) -> int:
    if not _is_int(seed) or seed < 0 or seed >= 2**63:
        raise ConfigError(f"synthetic radar seed must be an int in [0, 2**63), got {seed!r}")
    return int(seed)


def _check_indices(indices: object) -> list[int]:
    if _is_int(indices):
        if indices <= 0:
            raise ConfigError(f"synthetic radar count must be a positive int, got {indices!r}")
        return list(range(int(indices)))
    if isinstance(indices, (str, bytes)) or not isinstance(indices, (Sequence, range)):
        if isinstance(indices, torch.Tensor) and indices.ndim == 1:
            indices = indices.tolist()
        elif isinstance(indices, np.ndarray) and indices.ndim == 1:
            indices = indices.tolist()
        else:
            raise ConfigError(
                "synthetic radar indices must be a count or a sequence of ints,"
                f" got {type(indices).__name__}"
            )
    out = list(indices)
    if not out:
        raise ConfigError("synthetic radar generation needs at least one index")
    for i in out:
        if not _is_int(i) or i < 0:
            raise ConfigError(f"synthetic radar indices must be ints >= 0, got {i!r}")
    return [int(i) for i in out]


def _device(device: object) -> torch.device:
    try:
        dev = torch.device("cpu" if device is None else device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"synthetic radar device {device!r} is not a torch device: {e}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"synthetic radar device {device!r} asked for, but CUDA is not available")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"synthetic radar device must be a CPU or CUDA device, got {device!r}")
    return dev


def _rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, index, _STREAM_TAG])


# ----------------------------------------------------------------------------- motion


@dataclass(frozen=True)
class Motion:
    """Motion of N sequences of T frames (float64 NumPy arrays, x = column, y = row, px).

    - ``translation`` (N, T - 1, 2): velocity ``u`` (dx, dy) at the grid centre during the
      step from frame t to t + 1 (px/step, at the step's midpoint);
    - ``gradient`` (N, T - 1, 2, 2): the velocity gradient ``G`` (per step) of that step;
    - ``departure`` (N, T, 2, 3): affine maps ``[P | q]`` taking a pixel's position in
      frame t, relative to the grid centre ``((W - 1) / 2, (H - 1) / 2)``, to the position
      of the same air in frame 0 (frame 0's map is the identity);
    - ``wet_fraction`` (N,): the drawn share of frame-0 pixels at or above 0.5 mm/h.
    """

    translation: np.ndarray
    gradient: np.ndarray
    departure: np.ndarray
    wet_fraction: np.ndarray


def _series(delta: float) -> tuple[float, float, float]:
    """c = sum d^n/(2n)!, s = sum d^n/(2n+1)!, k = sum d^n/(2n+2)! (cosh-like, entire)."""
    c = s = k = 0.0
    term = 1.0  # d^n / (2n)!
    for n in range(60):
        c += term
        s += term / (2 * n + 1)
        k += term / ((2 * n + 1) * (2 * n + 2))
        term *= delta / ((2 * n + 1) * (2 * n + 2))
        if abs(term) < 1e-18:
            break
    return c, s, k


def _step_back(u: tuple[float, float], g: tuple[float, float, float, float]):
    """The exact one-step backward map of the constant field v(r) = u + G r: r -> E r + p.

    G is traceless, so G^2 = delta I with delta = -det G, and
    exp(-G) = c I - s G,  int_0^-1 exp(sG) ds = -s I + k G  (c, s, k from ``_series``).
    """
    g00, g01, g10, g11 = g
    c, s, k = _series(-(g00 * g11 - g01 * g10))
    e = (c - s * g00, -s * g01, -s * g10, c - s * g11)
    p0 = -s * u[0] + k * (g00 * u[0] + g01 * u[1])
    p1 = -s * u[1] + k * (g10 * u[0] + g11 * u[1])
    return e, (p0, p1)


def _motion_one(u: np.ndarray, spec: SyntheticRadarSpec):
    """Per-step (u, G) and departure maps of one sequence from its 12 uniforms (scalar libm
    math, so the result cannot depend on the batch it is computed in)."""
    u = [float(x) for x in u]
    lo, hi = spec.speed
    speed_a, speed_b = lo + (hi - lo) * u[0], lo + (hi - lo) * u[1]
    theta_a = 2.0 * math.pi * u[2]
    theta_b = theta_a + math.radians(spec.turn_deg) * (2.0 * u[3] - 1.0)
    phase = 2.0 * math.pi * u[4]
    gmax = spec.gradient_bound

    def deformation(m, r, psi):  # |w| + |(e1, e2)| = m <= gmax
        mag = gmax * m
        w = mag * (2.0 * r - 1.0)
        e = mag - abs(w)
        return w, e * math.cos(2 * math.pi * psi), e * math.sin(2 * math.pi * psi)

    def_a, def_b = deformation(*u[5:8]), deformation(*u[8:11])
    drift_steps = spec.drift_minutes / spec.step_minutes
    steps = spec.num_frames - 1
    trans = np.zeros((steps, 2))
    grad = np.zeros((steps, 2, 2))
    dep = np.zeros((spec.num_frames, 2, 3))
    p = (1.0, 0.0, 0.0, 1.0)  # departure map of frame 0: identity
    q = (0.0, 0.0)
    dep[0] = ((p[0], p[1], q[0]), (p[2], p[3], q[1]))
    for t in range(1, spec.num_frames):
        mid = t - 0.5
        a = (1.0 - math.cos(math.pi * mid / drift_steps + phase)) / 2.0  # in [0, 1]
        speed = speed_a + (speed_b - speed_a) * a
        theta = theta_a + (theta_b - theta_a) * a
        w, e1, e2 = (x + (y - x) * a for x, y in zip(def_a, def_b, strict=True))
        vel = (speed * math.cos(theta), speed * math.sin(theta))
        gm = (e1, e2 - w, e2 + w, -e1)
        e, off = _step_back(vel, gm)
        # A_t = A_{t-1} o B_t: P_t = P_{t-1} E, q_t = P_{t-1} off + q_{t-1}
        q = (p[0] * off[0] + p[1] * off[1] + q[0], p[2] * off[0] + p[3] * off[1] + q[1])
        p = (
            p[0] * e[0] + p[1] * e[2],
            p[0] * e[1] + p[1] * e[3],
            p[2] * e[0] + p[3] * e[2],
            p[2] * e[1] + p[3] * e[3],
        )
        trans[t - 1] = vel
        grad[t - 1] = ((gm[0], gm[1]), (gm[2], gm[3]))
        dep[t] = ((p[0], p[1], q[0]), (p[2], p[3], q[1]))
    return trans, grad, dep


def _wet_fraction(u: np.ndarray, spec: SyntheticRadarSpec) -> float:
    lo, hi = spec.wet_fraction
    return lo + (hi - lo) * float(u[11])


def motion(spec: SyntheticRadarSpec, indices: int | Sequence[int], seed: int) -> Motion:
    """The motion (and drawn wet fraction) of sequences ``indices`` of ``seed``."""
    seed, indices = _check_seed(seed), _check_indices(indices)
    parts = []
    for index in indices:
        u = _rng(seed, index).random(_NUM_UNIFORMS)
        parts.append((*_motion_one(u, spec), _wet_fraction(u, spec)))
    trans, grad, dep, wet = zip(*parts, strict=True)
    return Motion(np.stack(trans), np.stack(grad), np.stack(dep), np.array(wet))


# ----------------------------------------------------------------------------- the field


def _spectrum(spec: SyntheticRadarSpec, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Amplitudes a0 (initial), c (innovation) and AR coefficients phi on the rfft grid,
    each (Hp, Wp // 2 + 1, 1) float32, for unit-variance noise in real and imaginary parts."""
    hp, wp = spec.domain_shape
    ky = torch.fft.fftfreq(hp, dtype=torch.float64)[:, None]
    kx = torch.fft.rfftfreq(wp, dtype=torch.float64)[None, :]
    k2 = ky**2 + kx**2  # (Hp, Wf)
    k0 = 1.0 / spec.outer_scale_px
    power = (k2 + k0**2) ** (-spec.spectral_exponent / 2.0)
    power[0, 0] = 0.0  # zero mean
    # Total power over the full (Hermitian) spectrum: the columns 1 .. Wp/2 - 1 stand for
    # two modes each (kx and -kx).
    weight = torch.full_like(kx, 2.0)
    weight[0, 0] = 1.0
    weight[0, -1] = 1.0  # Nyquist column (Wp is even)
    total = float((power * weight).sum())
    # Var(z) = sum_k E|F_k|^2 = 1 with norm="forward"; noise has E|eps|^2 = 2.
    a0 = torch.sqrt(power / (2.0 * total))
    wavelength = 1.0 / torch.sqrt(k2.clamp_min(1e-300))
    tau = spec.lifetime_minutes * (wavelength / spec.lifetime_scale) ** spec.lifetime_exponent
    phi = torch.exp(-spec.step_minutes / tau)
    phi[0, 0] = 1.0
    c = a0 * torch.sqrt(1.0 - phi**2)
    return tuple(x.to(torch.float32)[..., None].to(device) for x in (a0, c, phi))


def _hermitian(noise: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Make the kx = 0 and Nyquist columns of (B, Hp, Wf, 2) noise Hermitian along ky,
    keeping E|eps|^2 = 2 per mode, so irfft2 is well defined (and equal on CPU and CUDA)."""
    cols = noise[:, :, :: noise.shape[2] - 1]  # (B, Hp, 2 columns, 2): a view
    mirror = cols[:, flip]  # row -ky
    scale = 1.0 / math.sqrt(2.0)
    sym = torch.stack(
        ((cols[..., 0] + mirror[..., 0]) * scale, (cols[..., 1] - mirror[..., 1]) * scale), -1
    )
    cols.copy_(sym)
    return noise


class _Noise:
    """Standard normals (B, Hp, Wf, 2) per frame, one independent stream per sequence."""

    def __init__(self, keys, shape, device, rng: str):
        self.shape, self.device, self.rng = shape, device, rng
        gens = [_rng(seed, index) for seed, index in keys]
        for g in gens:
            g.random(_NUM_UNIFORMS)  # motion and wet fraction come first
        cuda_seeds = [int(g.integers(0, 2**63)) for g in gens]
        if rng == "cuda":
            self.gens = [torch.Generator(device=device).manual_seed(s) for s in cuda_seeds]
        else:
            self.gens = gens

    def next(self) -> torch.Tensor:
        b = len(self.gens)
        if self.rng == "cuda":
            out = torch.empty((b, *self.shape), device=self.device)
            for i, g in enumerate(self.gens):
                torch.randn(self.shape, generator=g, device=self.device, out=out[i])
            return out
        out = torch.empty((b, *self.shape))
        arr = out.numpy()
        for i, g in enumerate(self.gens):
            g.standard_normal(out=arr[i], dtype=np.float32)
        return out.to(self.device)


def _grid_coefficients(dep: np.ndarray, spec: SyntheticRadarSpec) -> torch.Tensor:
    """Per (sequence, frame) affine coefficients (B, T, 2, 3) float64 of grid_sample's
    normalised coordinates (x, y) in the pixel's column j, row i and 1.

    Each sequence's departure points are centred in the generation domain (the field is
    statistically homogeneous and periodic, so where the band sits is free); the domain
    bound guarantees they stay ``_INTERP_MARGIN`` px inside it.
    """
    h, w = spec.height, spec.width
    hp, wp = spec.domain_shape
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    corners = np.array([[-cx, -cy, 1.0], [cx, -cy, 1.0], [-cx, cy, 1.0], [cx, cy, 1.0]])
    pts = np.einsum("btij,cj->btci", dep, corners)  # (B, T, 4, 2): departures of corners
    lo, hi = pts.min(axis=(1, 2)), pts.max(axis=(1, 2))  # (B, 2)
    size = np.array([wp - 1.0, hp - 1.0])
    margin = (size - (hi - lo)) / 2.0
    if np.any(margin < _INTERP_MARGIN):
        raise AssertionError("departure points leave the generation domain (domain bound bug)")
    origin = lo - margin  # domain pixel (0, 0) in centred coordinates
    # Normalised coordinate (align_corners=True): 2 (a - origin) / size - 1, with
    # a = P (j - cx, i - cy) + q.
    coef = dep.copy()  # (B, T, 2, 3)
    coef[..., 2] = dep[..., 2] - dep[..., 0] * cx - dep[..., 1] * cy - origin[:, None, :]
    coef = coef * (2.0 / size)[None, None, :, None]
    coef[..., 2] -= 1.0
    return torch.from_numpy(coef)


def _grid(coef: torch.Tensor, spec: SyntheticRadarSpec) -> torch.Tensor:
    """grid_sample grid (B, H, W, 2) from one frame's coefficients (B, 2, 3), on their device:
    ``(c0 j + c2) + c1 i`` per axis, as an outer sum of a row and a column.

    Elementwise arithmetic, so every sequence's grid is exact whatever the batch.
    """
    jj = torch.arange(spec.width, dtype=coef.dtype, device=coef.device)
    ii = torch.arange(spec.height, dtype=coef.dtype, device=coef.device)
    axes = []
    for axis in range(2):
        c = coef[:, axis, :, None]  # (B, 3, 1)
        row = c[:, 0] * jj + c[:, 2]  # (B, W)
        col = c[:, 1] * ii  # (B, H)
        axes.append(row[:, None, :] + col[:, :, None])  # (B, H, W)
    return torch.stack(axes, dim=-1)


def _sampled_field(
    spec: SyntheticRadarSpec, seed: int, indices: list[int], device: torch.device, rng: str
) -> tuple[torch.Tensor, np.ndarray]:
    """The Gaussian field at every frame's pixels, (B, T, H, W) float32, and wet fractions."""
    b, t_len = len(indices), spec.num_frames
    hp, wp = spec.domain_shape
    mot = motion(spec, indices, seed)
    coef = _grid_coefficients(mot.departure, spec).to(device, torch.float32)  # (B, T, 2, 3)
    a0, c, phi = _spectrum(spec, device)
    flip = (-torch.arange(hp, device=device)) % hp
    noise = _Noise([(seed, i) for i in indices], (hp, wp // 2 + 1, 2), device, rng)
    out = torch.empty((b, t_len, spec.height, spec.width), device=device)
    state = _hermitian(noise.next(), flip).mul_(a0)  # (B, Hp, Wf, 2) = Fourier modes F_0
    for t in range(t_len):
        if t > 0:
            state.mul_(phi).addcmul_(_hermitian(noise.next(), flip), c)
        field = _inverse_fft(torch.view_as_complex(state), (hp, wp))
        out[:, t] = F.grid_sample(
            field[:, None],  # (B, 1, Hp, Wp)
            _grid(coef[:, t], spec),  # (B, H, W, 2)
            mode="bicubic",
            padding_mode="border",
            align_corners=True,
        )[:, 0]
    return out, mot.wet_fraction


def _inverse_fft(modes: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """irfft2 of each sequence's modes (B, Hp, Wf) -> (B, Hp, Wp). On the CPU one sequence at
    a time: MKL's batched transform rounds a sequence differently depending on its place in
    the batch (seen on an AVX-512 Xeon, not on an AVX2 EPYC), and a sequence must not depend
    on which others are generated with it. It costs at most 0.7 ms per 32 sequences and
    frame (96x96 domains; nothing from 160x160 up)."""
    if modes.device.type != "cpu":
        return torch.fft.irfft2(modes, s=shape, norm="forward")
    return torch.stack([torch.fft.irfft2(m, s=shape, norm="forward") for m in modes])


def _frame0_stats(field: torch.Tensor, wet: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: the threshold (exactly round(f n) pixels of frame 0 at or above it) and
    the spread (half the 16-84 % range), each (B, 1, 1, 1). Order statistics only, so they
    are exact and independent of the batch."""
    b = field.shape[0]
    v = field[:, 0].reshape(b, -1).sort(dim=1).values  # (B, n)
    n = v.shape[1]
    n_wet = np.clip(np.rint(wet * n).astype(np.int64), 1, n)
    idx = torch.from_numpy(n - n_wet).to(field.device)[:, None]
    thr = v.gather(1, idx)[:, 0]
    lo, hi = int(0.15866 * n), min(n - 1, int(0.84134 * n))
    spread = ((v[:, hi] - v[:, lo]) / 2.0).clamp_min(1e-12)
    return thr.view(b, 1, 1, 1), spread.view(b, 1, 1, 1)


def _to_units(rate: torch.Tensor, spec: SyntheticRadarSpec) -> torch.Tensor:
    if spec.units == "mmh":
        return rate
    if spec.units == "pixel":
        return rainrate_to_pixel(rate, spec.zr)
    dbz = rainrate_to_dbz(rate, spec.zr)  # -inf where dry
    return torch.where(rate > 0, dbz, torch.zeros_like(dbz)).clamp_min_(0.0)


def _chunks(indices: list[int], device: torch.device):
    size = _CHUNK[device.type]
    for lo in range(0, len(indices), size):
        yield lo, indices[lo : lo + size]


def _check_rng(rng: object, device: torch.device) -> str:
    if rng not in RNGS:
        raise ConfigError(f"synthetic radar rng must be one of {', '.join(RNGS)}, got {rng!r}")
    if rng == "cuda" and device.type != "cuda":
        raise ConfigError(f"synthetic radar rng='cuda' needs a CUDA device, got {device}")
    return rng


def generate(
    spec: SyntheticRadarSpec,
    indices: int | Sequence[int],
    seed: int,
    device: str | torch.device | None = None,
    *,
    rng: str = "numpy",
) -> torch.Tensor:
    """Sequences ``indices`` (or ``range(count)``) of ``seed``: float32 (N, T, 1, H, W).

    Values in ``spec.units`` on ``device`` (default CPU); see the module docstring for the
    model, the determinism and CPU/CUDA equality. Row ``i`` is sequence ``(seed,
    indices[i])`` whatever else is in the call.

    Speed, 128x128 and 25 frames at batch 32 on the project's shared 2-core CPU VM (torch
    2.14, MKL FFT): 19-20 sequences/s on 2 threads with ``OMP_WAIT_POLICY=PASSIVE``; 12-16/s
    on 1 thread (DataLoader workers run 1 thread each); only ~5/s on 2 threads with the
    default OpenMP busy-waiting, which stalls every small torch op on this VM (not specific
    to this generator). 64x64 and 20 frames: ~54/s on 1 thread. The time goes to the
    normals (NumPy, ~30 %), the inverse FFT of the (250, 250) generation domain (~25 %),
    bicubic sampling (~15 %) and the AR(1) update (~15 %).
    """
    out, chunks = _standardised(spec, indices, seed, device, rng)
    for lo, chunk, rate in chunks:
        rate.mul_(spec.log_rate_std)  # (B, T, H, W)
        # exp and log one sequence at a time: CPU kernels may round an element differently
        # depending on where it falls in the tensor (vector body or scalar tail of a
        # thread's range), and a sequence must not depend on its batch. The other steps
        # are exactly rounded elementwise arithmetic and run on the whole chunk.
        for i in range(len(chunk)):
            torch.exp(rate[i], out=rate[i])
        rate.mul_(WET_RATE)  # exp(0) * 0.5 = 0.5 exactly at the threshold
        rate.masked_fill_(rate < spec.min_rate, 0.0).clamp_max_(spec.max_rate)
        if spec.units == "mmh":
            out[lo : lo + len(chunk), :, 0] = rate
        else:
            for i in range(len(chunk)):
                out[lo + i, :, 0] = _to_units(rate[i], spec)
    return out


def latent_field(
    spec: SyntheticRadarSpec,
    indices: int | Sequence[int],
    seed: int,
    device: str | torch.device | None = None,
    *,
    rng: str = "numpy",
) -> torch.Tensor:
    """The Gaussian field behind ``generate``'s rain, standardised at frame 0: float32
    (N, T, 1, H, W) ``(z - thr) / s``, so 0 is the 0.5 mm/h contour and
    ``R = 0.5 exp(log_rate_std * value)`` before ``min_rate`` and ``max_rate``."""
    out, chunks = _standardised(spec, indices, seed, device, rng)
    for lo, chunk, field in chunks:
        out[lo : lo + len(chunk), :, 0] = field
    return out


def _standardised(spec, indices, seed, device, rng):
    """(empty output (N, T, 1, H, W), an iterator of (first row, indices, (field - thr) / s)
    per chunk): the checked arguments and the latent field standardised at frame 0."""
    seed, indices = _check_seed(seed), _check_indices(indices)
    dev = _device(device)
    rng = _check_rng(rng, dev)
    out = torch.empty((len(indices), spec.num_frames, 1, spec.height, spec.width), device=dev)

    def chunks():
        for lo, chunk in _chunks(indices, dev):
            field, wet = _sampled_field(spec, seed, chunk, dev, rng)
            thr, spread = _frame0_stats(field, wet)
            yield lo, chunk, (field - thr).div_(spread)

    return out, chunks()


def fixed_test_set(
    spec: SyntheticRadarSpec,
    count: int,
    seed: int = FIXED_TEST_SEED,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """The fixed synthetic test set: sequences 0 .. count - 1 of ``FIXED_TEST_SEED``.

    (N, T, 1, H, W) float32 in ``spec.units``. No training stream (seed < 2**32) can hold
    one of these; a smaller ``count`` gives a prefix of a larger one. Use
    ``seed=VALIDATION_SEED`` for a validation set. Generated with NumPy's random numbers,
    so it is the same on every device up to float rounding.
    """
    if not _is_int(count) or count <= 0:
        raise ConfigError(f"fixed_test_set count must be a positive int, got {count!r}")
    return generate(spec, count, seed, device)


class SyntheticRadar(torch.utils.data.Dataset):
    """``length`` generated sequences; item i is sequence ``(seed, i)``, (T, 1, H, W) float32.

    ``split="train"`` takes a seed below 2**32 (pass a new seed per epoch for fresh data);
    ``split="test"`` and ``"validation"`` take no seed and use ``FIXED_TEST_SEED`` and
    ``VALIDATION_SEED``. Items are generated on the CPU (in DataLoader workers, say).
    """

    def __init__(
        self,
        spec: SyntheticRadarSpec,
        length: int,
        seed: int | None = None,
        split: str = "train",
    ) -> None:
        if not isinstance(spec, SyntheticRadarSpec):
            raise ConfigError(f"spec must be a SyntheticRadarSpec, got {type(spec).__name__}")
        if not _is_int(length) or length <= 0:
            raise ConfigError(f"SyntheticRadar length must be a positive int, got {length!r}")
        reserved = {"test": FIXED_TEST_SEED, "validation": VALIDATION_SEED}
        if split == "train":
            if not _is_int(seed) or not 0 <= seed < TRAIN_SEED_LIMIT:
                raise ConfigError(
                    f"SyntheticRadar training seed must be an int in [0, 2**32), got {seed!r}"
                    " (larger seeds are reserved for the test and validation sets)"
                )
        elif split in reserved:
            if seed is not None:
                raise ConfigError(f"SyntheticRadar split={split!r} takes no seed, got {seed!r}")
            seed = reserved[split]
        else:
            raise ConfigError(
                f"SyntheticRadar split must be 'train', 'validation' or 'test', got {split!r}"
            )
        self.spec, self.length, self.seed, self.split = spec, int(length), int(seed), split

    def __len__(self) -> int:
        return self.length

    def _index(self, i: int) -> int:
        if not _is_int(i):
            raise TypeError(f"SyntheticRadar indices must be ints, got {type(i).__name__}")
        j = int(i) + self.length if i < 0 else int(i)
        if not 0 <= j < self.length:
            raise IndexError(f"index {i} out of range for SyntheticRadar of length {self.length}")
        return j

    def __getitem__(self, i: int) -> torch.Tensor:
        return generate(self.spec, [self._index(i)], self.seed)[0]

    def __getitems__(self, indices: Sequence[int]) -> list[torch.Tensor]:
        # DataLoader calls this with a whole batch of indices: generate them in one go.
        batch = generate(self.spec, [self._index(i) for i in indices], self.seed)
        return list(batch.unbind(0))
