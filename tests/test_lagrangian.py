"""Lagrangian persistence: optical flow (OpenCV DIS/Farneback) and semi-Lagrangian advection."""

import functools

import cv2
import numpy as np
import pytest
import torch

from convlstm.baselines import advect, lagrangian_persistence, optical_flow, persistence
from convlstm.errors import ConfigError, ShapeError

N = 96  # grid size of the synthetic cases
CONTEXT, HORIZON = 4, 8


def _blobs(seed=0, count=40):
    """A rain-like field: Gaussian cells of many sizes and intensities, as a function of (x, y)
    that can be evaluated anywhere, so shifted and rotated frames are exact."""
    rng = np.random.default_rng(seed)
    cx, cy = rng.uniform(-30, N + 30, (2, count))
    sigma = rng.uniform(2.5, 8.0, count)
    amp = rng.uniform(0.2, 1.0, count)

    def field(x, y):
        d2 = (x[..., None] - cx) ** 2 + (y[..., None] - cy) ** 2
        return np.minimum((amp * np.exp(-d2 / (2 * sigma**2))).sum(-1), 1.0).astype(np.float32)

    return field


def _translated(velocity, frames=CONTEXT + HORIZON, seed=0):
    """frames (T, N, N): frame t is the field moved by t * velocity = (dx, dy)."""
    field = _blobs(seed)
    y, x = np.mgrid[0:N, 0:N].astype(np.float64)
    return np.stack([field(x - t * velocity[0], y - t * velocity[1]) for t in range(frames)])


def _rotated(omega, frames=CONTEXT + HORIZON, seed=0):
    """frames (T, N, N): frame t is the field rotated by t * omega (radians) about the centre."""
    field = _blobs(seed)
    y, x = np.mgrid[0:N, 0:N].astype(np.float64) - (N - 1) / 2
    out = []
    for t in range(frames):
        c, s = np.cos(-t * omega), np.sin(-t * omega)  # the inverse rotation finds the source
        out.append(field(c * x - s * y + (N - 1) / 2, s * x + c * y + (N - 1) / 2))
    return np.stack(out)


def _interior(margin):
    mask = np.zeros((N, N), bool)
    mask[margin:-margin, margin:-margin] = True
    return mask


def _corr(a, b, mask):
    return float(np.corrcoef(a[mask], b[mask])[0, 1])


# Flow tolerances. The frames are quantised to uint8 (1/255 of the range) and DIS matches
# 8x8 patches; on these smooth fields its error is about 0.02 px (median), so a median of
# 0.1 px and a 90th percentile of 0.25 px per step leave room for other OpenCV builds while
# still failing on any wrong sign, axis swap or scale (the speeds are 1 to 3 px/step).
@pytest.mark.parametrize("method", ["dis", "farneback"])
@pytest.mark.parametrize("velocity", [(2.0, -1.0), (1.5, 0.75)])  # integer, sub-pixel
def test_flow_and_forecast_of_a_translation(method, velocity):
    frames = _translated(velocity)
    flow = optical_flow(frames[:CONTEXT], method=method)
    assert flow.shape == (N, N, 2) and flow.dtype == np.float32
    # rain region of the last context frame, away from the edges (inflow has no texture)
    region = (frames[CONTEXT - 1] > 0.05) & _interior(12)
    error = np.abs(flow - np.asarray(velocity, np.float32)).max(-1)[region]
    assert np.median(error) < 0.1 and np.quantile(error, 0.9) < 0.25

    forecast = advect(frames[CONTEXT - 1], flow, HORIZON)
    assert forecast.shape == (HORIZON, N, N) and forecast.dtype == np.float32
    for k in (1, 4, HORIZON):
        truth, last = frames[CONTEXT - 1 + k], frames[CONTEXT - 1]
        mask = _interior(int(np.ceil(3 * k)) + 2)  # what did not flow in from outside
        assert _corr(forecast[k - 1], truth, mask) > 0.95
        mse = np.mean((forecast[k - 1] - truth)[mask] ** 2)
        assert mse < 0.1 * np.mean((last - truth)[mask] ** 2)  # far better than persistence


def test_forecast_of_a_rotation():
    omega = 0.03  # rad/step: up to 1.4 px/step at the grid's edge
    frames = _rotated(omega)
    flow = optical_flow(frames[:CONTEXT])
    y, x = np.mgrid[0:N, 0:N] - (N - 1) / 2
    region = (frames[CONTEXT - 1] > 0.05) & _interior(12)
    truth_flow = np.stack([-omega * y, omega * x], -1)  # tangential velocity
    assert np.median(np.abs(flow - truth_flow).max(-1)[region]) < 0.15
    forecast = advect(frames[CONTEXT - 1], flow, HORIZON)
    for k in (1, HORIZON):
        truth = frames[CONTEXT - 1 + k]
        mask = (x**2 + y**2) < (N / 2 - 4) ** 2  # inside the circle nothing flows in
        assert _corr(forecast[k - 1], truth, mask) > 0.95
        persistence_mse = np.mean((frames[CONTEXT - 1] - truth)[mask] ** 2)
        assert np.mean((forecast[k - 1] - truth)[mask] ** 2) < 0.25 * persistence_mse


def test_advect_constant_flow_is_a_shift_and_zero_flow_the_identity():
    frame = _translated((0, 0), frames=1)[0]
    flow = np.broadcast_to(np.float32([2.0, -3.0]), (N, N, 2))
    out = advect(frame, flow, 3)
    for k in (1, 2, 3):
        # content moves by k * (2, -3): out[k - 1][y, x] = frame[y + 3k, x - 2k]
        expected = np.zeros_like(frame)
        expected[: N - 3 * k, 2 * k :] = frame[3 * k :, : N - 2 * k]
        np.testing.assert_allclose(out[k - 1], expected, atol=1e-5)  # edges included: 0 flows in
    still = advect(frame, np.zeros((N, N, 2), np.float32), 2)
    np.testing.assert_allclose(still, np.stack([frame, frame]), atol=1e-6)
    # NaN (no data) is no rain
    holed = frame.copy()
    holed[10:20, 10:20] = np.nan
    out = advect(holed, np.zeros((N, N, 2), np.float32), 1)[0]
    assert np.isfinite(out).all() and np.all(out[10:20, 10:20] == 0)


@pytest.mark.parametrize("midpoint", [True, False])
def test_advect_matches_pysteps_semilagrangian(midpoint):
    extrapolate = pytest.importorskip("pysteps.extrapolation.semilagrangian").extrapolate
    frame = _translated((0, 0), frames=1, seed=3)[0]
    y, x = np.mgrid[0:N, 0:N] / N
    # a smooth, non-uniform flow, so that the trajectories bend
    flow = np.stack([1.5 + np.sin(2 * np.pi * y), -0.7 + 0.8 * np.cos(2 * np.pi * x)], -1).astype(
        np.float32
    )
    velocity = flow.transpose(2, 0, 1).astype(np.float64)  # pysteps: V[0] = dx, V[1] = dy
    steps = 6
    ours = advect(frame, flow, steps, midpoint=midpoint)
    theirs = extrapolate(frame, velocity, steps, outval=0.0, n_iter=1 if midpoint else 0)
    # Same scheme, same bilinear weights: in OpenCV >= 5 (exact one-channel float remap) they
    # differ by float32 rounding only (measured 2e-7). OpenCV 4 rounds positions to 1/32 px, an
    # error of up to |gradient| / 32 per sample (the field's gradient is at most 0.3 / px).
    tol = 1e-5 if int(cv2.__version__.split(".")[0]) >= 5 else 2e-2
    for k in range(steps):
        # the boundary differs on purpose (OpenCV interpolates towards 0 across the edge,
        # scipy's "constant" mode reads 0 at once): compare where trajectories stay inside
        mask = _interior(int(np.ceil(2.5 * (k + 1))) + 2)
        np.testing.assert_allclose(ours[k][mask], theirs[k][mask], atol=tol)


def test_lagrangian_persistence_interface():
    seqs = np.stack([_translated((2.0, -1.0)), _translated((-1.0, 1.5), seed=1)])
    ctx = torch.from_numpy(seqs[:, :CONTEXT, None]).clone()  # (B, T, 1, H, W)
    before = ctx.clone()
    out = lagrangian_persistence(ctx, HORIZON)
    assert out.shape == (2, HORIZON, 1, N, N) and out.dtype == ctx.dtype
    assert torch.equal(ctx, before)  # the context is untouched ...
    out[:, :] = -1.0  # ... and the forecast is a new tensor
    assert torch.equal(ctx, before)

    out = lagrangian_persistence(ctx, HORIZON)
    truth = torch.from_numpy(seqs[:, CONTEXT:, None])
    mask = torch.from_numpy(_interior(26))
    lag_err = ((out - truth)[..., mask] ** 2).mean()
    eul_err = ((persistence(ctx, HORIZON) - truth)[..., mask] ** 2).mean()
    assert lag_err < 0.1 * eul_err

    # an evaluate() predictor: (context, horizon) -> forecast, any dtype
    predict = functools.partial(lagrangian_persistence, method="farneback", value_range=(0, 1))
    half = predict(ctx.to(torch.bfloat16), 3)
    assert half.dtype == torch.bfloat16 and half.device == ctx.device
    assert half.shape == (2, 3, 1, N, N)
    # NaN in the context counts as no rain
    holed = ctx.clone()
    holed[:, :, :, :5] = float("nan")
    assert torch.isfinite(lagrangian_persistence(holed, 2)).all()


def test_optical_flow_of_still_frames_is_zero_and_uses_the_last_pairs():
    frame = _translated((0, 0), frames=1)[0]
    assert np.abs(optical_flow(np.stack([frame, frame]))).max() < 0.05
    # only the last 3 pairs count: early frames that moved elsewhere change nothing
    moving = _translated((1.0, 1.0), frames=4)
    noise = np.random.default_rng(0).random((2, N, N)).astype(np.float32)
    np.testing.assert_array_equal(
        optical_flow(np.concatenate([noise, moving])), optical_flow(moving)
    )
    # values are scaled from value_range: rain rates up to 10 mm/h move like pixels on [0, 1]
    np.testing.assert_allclose(
        optical_flow(10 * moving, value_range=(0, 10)), optical_flow(moving), atol=1e-6
    )


def test_errors():
    frames = np.zeros((3, 16, 16), np.float32)
    with pytest.raises(ConfigError, match="unknown optical-flow method 'lk'"):
        optical_flow(frames, method="lk")
    with pytest.raises(ShapeError, match="T >= 2"):
        optical_flow(frames[:1])
    with pytest.raises(ShapeError, match="T >= 2"):
        optical_flow(frames[0])
    with pytest.raises(ShapeError, match="at least 16x16"):  # OpenCV's DIS crashes on 12x40
        optical_flow(np.zeros((2, 12, 40), np.float32))
    assert optical_flow(np.zeros((2, 12, 40)), method="farneback").shape == (12, 40, 2)
    with pytest.raises(ConfigError, match="low < high"):
        optical_flow(frames, value_range=(1.0, 0.0))
    with pytest.raises(ConfigError, match="steps"):
        advect(frames[0], np.zeros((16, 16, 2)), 0)
    with pytest.raises(ShapeError, match="flow"):
        advect(frames[0], np.zeros((16, 16)), 1)
    with pytest.raises(ConfigError, match="non-finite"):
        advect(frames[0], np.full((16, 16, 2), np.nan), 1)
    ctx = torch.zeros(1, 3, 1, 16, 16)
    with pytest.raises(ShapeError, match="C = 1"):
        lagrangian_persistence(torch.zeros(1, 3, 2, 16, 16), 2)
    with pytest.raises(ShapeError, match="at least 2 context frames"):
        lagrangian_persistence(ctx[:, :1], 2)
    with pytest.raises(ShapeError, match="B, T, C, H, W"):
        lagrangian_persistence(ctx[0], 2)
    with pytest.raises(ConfigError, match="horizon"):
        lagrangian_persistence(ctx, 0)
    with pytest.raises(ConfigError, match="unknown optical-flow method"):
        lagrangian_persistence(ctx, 2, method="lucas-kanade")
