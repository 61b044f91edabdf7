import math

import numpy as np
import pytest
import torch

from convlstm.units import (
    FMI_ZR,
    HKO7_ZR,
    MARSHALL_PALMER,
    balance_weights,
    dbz_to_pixel,
    dbz_to_rainrate,
    pixel_to_dbz,
    pixel_to_rainrate,
    rainrate_to_dbz,
    rainrate_to_pixel,
)


def test_known_values():
    # Marshall-Palmer: 1 mm/h is 10 log10(200) = 23.01 dBZ; 10 mm/h adds 16 dB (b = 1.6).
    assert rainrate_to_dbz(1.0, MARSHALL_PALMER) == pytest.approx(10 * math.log10(200))
    assert rainrate_to_dbz(10.0, MARSHALL_PALMER) == pytest.approx(10 * math.log10(200) + 16)
    # HKO-7 pixel: -10 dBZ -> 0, 60 dBZ -> 1, clipped outside.
    assert dbz_to_pixel(np.array([-20.0, -10.0, 25.0, 60.0, 80.0])).tolist() == pytest.approx(
        [0.0, 0.0, 0.5, 1.0, 1.0]
    )
    assert pixel_to_dbz(0.5) == pytest.approx(25.0)


@pytest.mark.parametrize("zr", [MARSHALL_PALMER, HKO7_ZR, FMI_ZR])
def test_round_trips_numpy_and_torch(zr):
    rate = np.array([0.05, 0.5, 2.0, 5.0, 10.0, 30.0, 100.0])
    np.testing.assert_allclose(dbz_to_rainrate(rainrate_to_dbz(rate, zr), zr), rate, rtol=1e-12)
    t = torch.tensor(rate)
    back = pixel_to_rainrate(rainrate_to_pixel(t, zr), zr)
    assert isinstance(back, torch.Tensor)
    torch.testing.assert_close(back, t, rtol=1e-12, atol=0)


def test_zero_rain_is_pixel_zero_and_pixel_zero_is_below_any_threshold():
    assert rainrate_to_dbz(np.array([0.0]))[0] == -np.inf
    assert rainrate_to_pixel(torch.zeros(3)).tolist() == [0.0, 0.0, 0.0]
    assert pixel_to_rainrate(0.0) < 0.02


def test_balance_weights_at_the_edges():
    rate = torch.tensor([0.0, 1.999, 2.0, 4.99, 5.0, 10.0, 29.9, 30.0, 200.0])
    assert balance_weights(rate).tolist() == [1, 1, 2, 2, 5, 10, 10, 30, 30]
    with pytest.raises(ValueError, match="one more weight"):
        balance_weights(rate, thresholds=(1.0,), weights=(1.0,))
