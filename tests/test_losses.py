import math

import numpy as np
import pytest
import torch

from convlstm.errors import ConfigError, ShapeError
from convlstm.losses import LOSSES, balanced_mse_mae, bce, get_loss, mae, mse, mse_mae


def _pair():
    pred = torch.tensor([0.0, 0.5, 1.0, 0.25]).view(1, 1, 1, 2, 2)
    target = torch.tensor([1.0, 0.5, 0.0, 0.75]).view(1, 1, 1, 2, 2)
    return pred, target


def test_mse_mae_hand_computed():
    pred, target = _pair()
    # errors 1, 0, 1, 0.5
    assert mse(pred, target).item() == pytest.approx((1 + 0 + 1 + 0.25) / 4)
    assert mae(pred, target).item() == pytest.approx((1 + 0 + 1 + 0.5) / 4)
    assert mse_mae(pred, target).item() == pytest.approx(2.25 / 4 + 2.5 / 4)


def test_bce_hand_computed_and_clamped():
    pred = torch.tensor([0.25, 0.5]).view(1, 1, 1, 1, 2)
    target = torch.tensor([1.0, 0.0]).view(1, 1, 1, 1, 2)
    expected = (-math.log(0.25) - math.log(0.5)) / 2
    assert bce(pred, target).item() == pytest.approx(expected, rel=1e-6)
    # exact 0/1 predictions that are wrong stay finite thanks to the clamp
    wrong = bce(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0]))
    assert torch.isfinite(wrong)
    # float32 rounds 1 - 1e-7 to 1 - 2**-23, so the two terms differ slightly
    hi = torch.tensor(1 - 1e-7, dtype=torch.float32).item()
    expected = (-math.log(torch.tensor(1e-7).item()) - math.log(1 - hi)) / 2
    assert wrong.item() == pytest.approx(expected, rel=1e-5)


def test_losses_compute_in_float32_and_backprop():
    pred, target = _pair()
    pred = pred.to(torch.bfloat16).requires_grad_()
    for name, fn in LOSSES.items():
        loss = fn(pred.clamp(0.01, 0.99), target.to(torch.bfloat16))
        assert loss.dtype == torch.float32, name
        loss.backward()
    assert pred.grad is not None


def test_bce_inside_autocast():
    pred = torch.full((1, 1, 1, 2, 2), 0.5, requires_grad=True)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        loss = bce(pred, torch.ones(1, 1, 1, 2, 2))
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)


def test_float64_stays_float64():
    pred, target = _pair()
    assert mse(pred.double(), target.double()).dtype == torch.float64


def test_get_loss_names_and_unknown_name():
    for name in ("mse", "mae", "bce", "mse+mae"):
        assert callable(get_loss(name))
    assert get_loss("mse+mae") is mse_mae
    with pytest.raises(ConfigError, match="'mse', 'mae', 'bce', 'mse\\+mae'"):
        get_loss("l2")


def test_shape_mismatch():
    with pytest.raises(ShapeError):
        mse(torch.zeros(1, 2, 1, 4, 4), torch.zeros(1, 1, 1, 4, 4))


def test_balanced_mse_mae_against_float64_reference():
    # Independent recomputation: pixel -> dBZ -> rain rate with HKO-7's Z = 58.53 R^1.56,
    # weights 1 / 2 / 5 / 10 / 30 from 2 / 5 / 10 / 30 mm/h (Shi et al. 2017).
    gen = torch.Generator().manual_seed(0)
    target = torch.rand(2, 3, 1, 8, 8, generator=gen, dtype=torch.float64)
    pred = torch.rand(2, 3, 1, 8, 8, generator=gen, dtype=torch.float64)
    t, p = target.numpy(), pred.numpy()
    rate = (10 ** ((t * 70 - 10) / 10) / 58.53) ** (1 / 1.56)
    w = np.select([rate >= 30, rate >= 10, rate >= 5, rate >= 2], [30, 10, 5, 2], default=1)
    assert len(np.unique(w)) == 5  # every weight class is exercised
    expected = (w * (p - t) ** 2).mean() + (w * np.abs(p - t)).mean()
    got = balanced_mse_mae(pred, target)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(expected, rel=1e-12)
    assert get_loss("balanced_mse_mae") is balanced_mse_mae


def test_balanced_loss_weights_heavy_rain_errors_more():
    dry, heavy = torch.full((1, 1, 1, 1, 1), 0.1), torch.full((1, 1, 1, 1, 1), 0.75)  # ~0, 45 mm/h
    assert balanced_mse_mae(heavy - 0.1, heavy) == pytest.approx(
        30 * balanced_mse_mae(dry - 0.1, dry).item(), rel=1e-5
    )
