import math

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from convlstm.errors import ConfigError, ShapeError
from convlstm.metrics import VideoMetrics, psnr_per_frame, ssim_per_frame


def _skimage_ssim(pred: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    """(B, T, C, H, W) -> (B, T) with scikit-image, averaged over channels."""
    b, t, c = pred.shape[:3]
    out = np.zeros((b, t))
    for i in range(b):
        for j in range(t):
            out[i, j] = np.mean(
                [
                    structural_similarity(
                        pred[i, j, k].numpy(),
                        target[i, j, k].numpy(),
                        gaussian_weights=True,
                        sigma=1.5,
                        use_sample_covariance=False,
                        data_range=1.0,
                    )
                    for k in range(c)
                ]
            )
    return out


def _structured(shape, seed):
    """Smooth blobs and edges, closer to real frames than white noise."""
    g = torch.Generator().manual_seed(seed)
    b, t, c, h, w = shape
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    frames = torch.zeros(shape, dtype=torch.float64)
    for i in range(b):
        for j in range(t):
            cy, cx = torch.rand(2, generator=g) * torch.tensor([h, w])
            blob = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 4.0**2))
            edge = (xx > w // 2 + j).double() * 0.5
            frames[i, j] = (0.6 * blob + edge).clamp(0, 1)
    return frames


def test_ssim_matches_skimage_random():
    g = torch.Generator().manual_seed(0)
    pred = torch.rand(2, 2, 1, 20, 24, generator=g, dtype=torch.float64)
    target = pred + 0.2 * torch.rand(2, 2, 1, 20, 24, generator=g, dtype=torch.float64)
    target = target.clamp(0, 1)
    ours = ssim_per_frame(pred, target)
    assert ours.shape == (2, 2) and ours.dtype == torch.float64
    np.testing.assert_allclose(ours.numpy(), _skimage_ssim(pred, target), atol=1e-5, rtol=0)


def test_ssim_matches_skimage_structured_rgb():
    pred = _structured((1, 2, 3, 32, 32), seed=1)
    target = _structured((1, 2, 3, 32, 32), seed=2)
    target[:, :, 1] = pred[:, :, 1] * 0.8  # one channel close, the others not
    ours = ssim_per_frame(pred, target)
    np.testing.assert_allclose(ours.numpy(), _skimage_ssim(pred, target), atol=1e-5, rtol=0)


def test_ssim_float32_close_and_identical_is_one():
    pred = _structured((1, 2, 1, 16, 16), seed=3)
    target = _structured((1, 2, 1, 16, 16), seed=4)
    f32 = ssim_per_frame(pred.float(), target.float())
    assert f32.dtype == torch.float32
    torch.testing.assert_close(f32.double(), ssim_per_frame(pred, target), atol=1e-4, rtol=0)
    same = ssim_per_frame(pred, pred)
    torch.testing.assert_close(same, torch.ones(1, 2, dtype=torch.float64))


def test_ssim_needs_window_sized_frames():
    with pytest.raises(ShapeError, match="11x11"):
        ssim_per_frame(torch.zeros(1, 1, 1, 10, 16), torch.zeros(1, 1, 1, 10, 16))


def test_psnr_hand_computed():
    pred = torch.zeros(1, 2, 1, 4, 4)
    target = torch.zeros(1, 2, 1, 4, 4)
    target[0, 0] = 0.1  # mse 0.01 -> 20 dB
    psnr = psnr_per_frame(pred, target)
    assert psnr[0, 0].item() == pytest.approx(20.0, abs=1e-4)
    assert psnr[0, 1].item() == pytest.approx(100.0)  # floored mse 1e-10


def test_frame_and_pixel_conventions_hand_computed():
    m = VideoMetrics()
    target = torch.zeros(1, 2, 1, 4, 4)
    pred = torch.zeros(1, 2, 1, 4, 4)
    pred[0, 0] = 0.5  # lead 0: 16 pixels off by 0.5; lead 1 exact
    m.update(pred, target)
    r = m.compute()
    assert r["per_lead"]["mse_frame"] == pytest.approx([4.0, 0.0])
    assert r["per_lead"]["mae_frame"] == pytest.approx([8.0, 0.0])
    assert r["per_lead"]["mse_pixel"] == pytest.approx([0.25, 0.0])
    assert r["per_lead"]["mae_pixel"] == pytest.approx([0.5, 0.0])
    assert r["mse_frame"] == pytest.approx(2.0)
    assert r["mse_pixel"] == pytest.approx(0.125)
    assert r["mae_frame"] == pytest.approx(4.0)
    assert r["per_lead"]["psnr"] == pytest.approx([-10 * math.log10(0.25), 100.0])
    assert r["num_sequences"] == 1 and r["num_frames"] == 2
    # 4x4 frames are smaller than the SSIM window: reported as NaN, the rest still works
    assert math.isnan(r["ssim"]) and len(r["per_lead"]["ssim"]) == 2


def test_streaming_equals_one_batch_and_per_lead_means():
    g = torch.Generator().manual_seed(5)
    a_pred, a_tgt = (torch.rand(2, 3, 1, 16, 16, generator=g) for _ in range(2))
    b_pred, b_tgt = (torch.rand(3, 3, 1, 16, 16, generator=g) for _ in range(2))
    streamed = VideoMetrics()
    streamed.update(a_pred, a_tgt)
    streamed.update(b_pred, b_tgt)
    whole = VideoMetrics()
    whole.update(torch.cat([a_pred, b_pred]), torch.cat([a_tgt, b_tgt]))
    rs, rw = streamed.compute(), whole.compute()
    assert rs["num_sequences"] == 5 and rs["num_frames"] == 15
    for name in ("mse_frame", "mae_frame", "mse_pixel", "mae_pixel", "ssim", "psnr"):
        assert rs[name] == pytest.approx(rw[name], rel=1e-6), name
        assert len(rs["per_lead"][name]) == 3
        assert rs["per_lead"][name] == pytest.approx(rw["per_lead"][name], rel=1e-6), name
        assert np.mean(rs["per_lead"][name]) == pytest.approx(rs[name], rel=1e-9), name
        assert isinstance(rs[name], float)
    # the SSIM average is the mean of the per-frame function
    expected = ssim_per_frame(torch.cat([a_pred, b_pred]), torch.cat([a_tgt, b_tgt])).mean()
    assert rs["ssim"] == pytest.approx(expected.item(), rel=1e-5)


def test_pred_is_clamped():
    target = torch.ones(1, 1, 1, 12, 12)
    over = VideoMetrics()
    over.update(torch.full_like(target, 1.7), target)  # clamped to 1: a perfect forecast
    r = over.compute()
    assert r["mse_pixel"] == 0.0 and r["ssim"] == pytest.approx(1.0)
    under = VideoMetrics()
    under.update(torch.full_like(target, -0.5), target)  # clamped to 0
    assert under.compute()["mae_pixel"] == pytest.approx(1.0)


def test_reset_and_compute_without_updates():
    m = VideoMetrics()
    with pytest.raises(ConfigError, match="before any update"):
        m.compute()
    m.update(torch.zeros(1, 2, 1, 4, 4), torch.zeros(1, 2, 1, 4, 4))
    m.reset()
    with pytest.raises(ConfigError):
        m.compute()
    m.update(torch.zeros(1, 5, 1, 4, 4), torch.zeros(1, 5, 1, 4, 4))  # new T is fine after reset
    assert m.compute()["num_frames"] == 5


def test_shape_errors():
    m = VideoMetrics()
    with pytest.raises(ShapeError, match="B, T, C, H, W"):
        m.update(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4))
    with pytest.raises(ShapeError, match="does not match"):
        m.update(torch.zeros(1, 2, 1, 4, 4), torch.zeros(1, 3, 1, 4, 4))
    m.update(torch.zeros(1, 2, 1, 4, 4), torch.zeros(1, 2, 1, 4, 4))
    with pytest.raises(ShapeError, match="earlier"):
        m.update(torch.zeros(1, 3, 1, 4, 4), torch.zeros(1, 3, 1, 4, 4))
    assert m.compute()["num_sequences"] == 1  # the rejected batch was not counted


def test_all_reduce_single_process(tmp_path):
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        m = VideoMetrics()
        pred = torch.full((2, 2, 1, 12, 12), 0.5)
        m.update(pred, torch.zeros_like(pred))
        before = m.compute()
        m.all_reduce()
        assert m.compute() == before
    finally:
        dist.destroy_process_group()
