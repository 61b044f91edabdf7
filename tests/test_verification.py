"""Nowcasting verification against pysteps.verification (the field's reference library)."""

import math
import warnings

import numpy as np
import pytest
import torch

from convlstm.errors import ConfigError, ShapeError
from convlstm.units import balance_weights
from convlstm.verification import BalancedErrors, ContingencyScores, box_sum
from tests.conftest import cuda_or_skip


def reference(module: str):
    """A reference library's module, imported by the tests that compare with it (the rest,
    the GPU test among them, run where pysteps or scipy is missing, as on the GPU machine)."""
    return pytest.importorskip(module)


THRESHOLDS = (0.5, 2.0, 5.0)
SCALES = (1, 2, 3, 4, 7)
SCORES = ("POD", "FAR", "CSI", "HSS")


def rain(rng, shape, nan_frac=0.03):
    """Lognormal rain with about half zeros, rounded to 0.5 mm/h (values equal to the
    thresholds occur, so > vs >= matters) and a few NaNs."""
    x = rng.lognormal(mean=0.3, sigma=1.2, size=shape)
    x[rng.random(shape) < 0.5] = 0.0
    x = np.round(x * 2.0) / 2.0
    x[rng.random(shape) < nan_frac] = np.nan
    return x


def batches(seed=0, n=2, shape=(3, 4, 20, 22)):
    rng = np.random.default_rng(seed)
    return [(rain(rng, shape), rain(rng, shape)) for _ in range(n)]


def close(a, b, tol=1e-6):
    a, b = float(a), float(b)
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol


def assert_same(a, b, tol=1e-12, where="result"):
    """Nested dicts/lists equal, floats to `tol` (NaN equal to NaN), everything else exactly."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], tol, f"{where}[{key!r}]")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, tol, f"{where}[{i}]")
    elif isinstance(a, float):
        assert close(a, b, tol), (where, a, b)
    else:
        assert a == b and type(a) is type(b), (where, a, b)


def quiet_pysteps(fn, *args):
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        return fn(*args)


def pysteps_table(pairs, thr):
    """pysteps contingency table over the finite pairs of (pred, obs) arrays (pysteps itself
    would count NaN pairs as non-events; our convention leaves them out)."""
    detcat = reference("pysteps.verification.detcatscores")
    table = detcat.det_cat_fct_init(thr)
    for p, o in pairs:
        keep = np.isfinite(p) & np.isfinite(o)
        detcat.det_cat_fct_accum(table, p[keep], o[keep])
    return table, quiet_pysteps(detcat.det_cat_fct_compute, table, list(SCORES))


def pysteps_fss(fields, thr, scale):
    spatial = reference("pysteps.verification.spatialscores")
    state = spatial.fss_init(thr, scale)
    for p, o in fields:
        spatial.fss_accum(state, p, o)
    return quiet_pysteps(spatial.fss_compute, state)


def run_scores(data, thresholds=THRESHOLDS, scales=(), dtype=torch.float64, masks=None):
    scores = ContingencyScores(thresholds, scales)
    for i, (p, o) in enumerate(data):
        mask = None if masks is None else torch.from_numpy(masks[i])
        scores.update(torch.from_numpy(p).to(dtype), torch.from_numpy(o).to(dtype), mask)
    return scores.compute()


def assert_counts_match(entry, table, lead=None):
    for ours, theirs in [
        ("hits", "hits"),
        ("misses", "misses"),
        ("false_alarms", "false_alarms"),
        ("correct_negatives", "correct_negatives"),
    ]:
        value = entry[ours] if lead is None else entry["per_lead"][ours][lead]
        assert value == int(table[theirs]), (ours, lead)


def assert_scores_match(entry, result, lead=None):
    for name in SCORES:
        value = entry[name.lower()] if lead is None else entry["per_lead"][name.lower()][lead]
        assert close(value, result[name]), (name, lead, value, result[name])


# ------------------------------------------------------------------------- contingency table


def test_contingency_scores_match_pysteps_per_lead_and_pooled():
    data = batches()
    out = run_scores(data)
    t = data[0][0].shape[1]
    assert out["num_leads"] == t and out["num_sequences"] == 6
    assert out["thresholds"] == list(THRESHOLDS)
    for k, thr in enumerate(THRESHOLDS):
        entry = out["per_threshold"][k]
        assert entry["threshold"] == thr
        for j in range(t):
            pairs = [(p[b, j], o[b, j]) for p, o in data for b in range(p.shape[0])]
            table, result = pysteps_table(pairs, thr)
            assert_counts_match(entry, table, lead=j)
            assert_scores_match(entry, result, lead=j)
        # Pooled = one pysteps table over every lead's fields.
        table, result = pysteps_table(data, thr)
        assert_counts_match(entry, table)
        assert_scores_match(entry, result)
        assert entry["hits"] > 0 and entry["misses"] > 0 and entry["false_alarms"] > 0


def test_events_are_strictly_above_the_threshold_as_in_pysteps():
    obs = torch.tensor([2.0, 2.0, 2.5, 1.0]).view(1, 1, 2, 2)
    pred = torch.tensor([2.0, 2.5, 2.0, 3.0]).view(1, 1, 2, 2)
    scores = ContingencyScores([2.0])
    scores.update(pred, obs)
    entry = scores.compute()["per_threshold"][0]
    table, _ = pysteps_table([(pred.numpy(), obs.numpy())], 2.0)
    assert_counts_match(entry, table)
    assert (entry["hits"], entry["misses"], entry["false_alarms"]) == (0, 1, 2)


def test_float32_input_compares_thresholds_in_float32_like_numpy():
    # float32(0.1) > 0.1 in float64 but not in float32; NumPy (NEP 50) compares in float32.
    value = np.full((1, 1, 2, 2), 0.1, dtype=np.float32)
    table, _ = pysteps_table([(value, value)], 0.1)
    scores = ContingencyScores([0.1])
    scores.update(torch.from_numpy(value), torch.from_numpy(value))
    entry = scores.compute()["per_threshold"][0]
    assert_counts_match(entry, table)
    assert entry["hits"] == 0 and entry["correct_negatives"] == 4


def test_no_events_give_nan_scores_like_pysteps():
    zeros = np.zeros((2, 3, 8, 8))
    out = run_scores([(zeros, zeros)], thresholds=(0.5,), scales=(3,))
    entry = out["per_threshold"][0]
    _, result = pysteps_table([(zeros, zeros)], 0.5)
    for name in SCORES:  # pysteps gives NaN as well (0/0)
        assert math.isnan(entry[name.lower()]) and math.isnan(result[name])
        assert all(math.isnan(v) for v in entry["per_lead"][name.lower()])
    assert entry["correct_negatives"] == zeros.size
    assert math.isnan(entry["fss"][0])
    assert math.isnan(pysteps_fss([(zeros[0, 0], zeros[0, 0])], 0.5, 3))


def test_observed_events_without_forecast_events():
    obs = np.zeros((1, 2, 6, 6))
    obs[:, :, :2] = 4.0
    pred = np.zeros_like(obs)
    out = run_scores([(pred, obs)], thresholds=(1.0,), scales=(1, 3))
    entry = out["per_threshold"][0]
    assert entry["pod"] == 0.0 and entry["csi"] == 0.0 and math.isnan(entry["far"])
    _, result = pysteps_table([(pred, obs)], 1.0)
    assert_scores_match(entry, result)  # pysteps agrees, HSS 0 included
    assert entry["hss"] == 0.0
    assert entry["fss"] == [0.0, 0.0]


def test_all_events_everywhere_make_hss_nan():
    ones = np.full((1, 1, 4, 4), 3.0)
    entry = run_scores([(ones, ones)], thresholds=(1.0,))["per_threshold"][0]
    _, result = pysteps_table([(ones, ones)], 1.0)
    assert entry["pod"] == 1.0 and entry["far"] == 0.0 and entry["csi"] == 1.0
    assert math.isnan(entry["hss"]) and math.isnan(result["HSS"])


def test_mask_equals_computing_on_the_subset():
    data = batches(seed=1)
    rng = np.random.default_rng(5)
    masks = [rng.random(p.shape) < 0.7 for p, _ in data]
    out = run_scores(data, masks=masks)
    for k, thr in enumerate(THRESHOLDS):
        subset = [(p[m], o[m]) for (p, o), m in zip(data, masks, strict=True)]
        table, result = pysteps_table(subset, thr)
        assert_counts_match(out["per_threshold"][k], table)
        assert_scores_match(out["per_threshold"][k], result)


def test_domain_mask_broadcasts_and_equals_nan_outside():
    data = batches(seed=2, n=1)
    p, o = data[0]
    domain = np.zeros(p.shape[-2:], dtype=bool)
    domain[3:15, 2:18] = True
    masked = run_scores(data, scales=SCALES, masks=[domain])
    p_nan, o_nan = p.copy(), o.copy()
    p_nan[..., ~domain] = np.nan
    o_nan[..., ~domain] = np.nan
    as_nan = run_scores([(p_nan, o_nan)], scales=SCALES)
    assert_same(masked, as_nan)


def test_five_dim_input_and_float32_give_the_same_counts():
    data = batches(seed=3)
    four = run_scores(data, scales=(3,))
    five = run_scores([(p[:, :, None], o[:, :, None]) for p, o in data], scales=(3,))
    single = run_scores(data, scales=(3,), dtype=torch.float32)
    assert_same(five, four)
    for a, b in zip(single["per_threshold"], four["per_threshold"], strict=True):
        for name in ("hits", "misses", "false_alarms", "correct_negatives"):
            assert a[name] == b[name] and isinstance(a[name], int)
            assert a["per_lead"][name] == b["per_lead"][name]
        assert a["fss"] == pytest.approx(b["fss"], abs=1e-12)


def test_counts_are_int64_on_the_inputs_device():
    scores = ContingencyScores([1.0], [3])
    pred = torch.rand(2, 3, 8, 8) * 3
    scores.update(pred, pred.flip(-1))
    assert scores._counts.dtype == torch.int64
    assert scores._counts.device == pred.device
    assert scores._fss_sums.dtype == torch.float64


def test_reset_forgets_updates_and_lead_count():
    scores = ContingencyScores([1.0])
    scores.update(torch.ones(1, 3, 4, 4) * 2, torch.ones(1, 3, 4, 4) * 2)
    scores.reset()
    with pytest.raises(ConfigError, match="before any update"):
        scores.compute()
    scores.update(torch.zeros(2, 5, 4, 4), torch.ones(2, 5, 4, 4) * 2)
    out = scores.compute()
    assert out["num_leads"] == 5 and out["per_threshold"][0]["misses"] == 2 * 5 * 16


# ---------------------------------------------------------------------------------------- FSS


@pytest.mark.parametrize("size", range(1, 10))
def test_box_sum_is_scipy_uniform_filter(size):
    rng = np.random.default_rng(size)
    x = (rng.random((2, 7, 11)) < 0.4).astype(np.int32)
    uniform_filter = reference("scipy.ndimage").uniform_filter
    ref = uniform_filter(x[0].astype(float), size=size, mode="constant", cval=0.0)
    got = box_sum(torch.from_numpy(x), size)[0].double().numpy() / size**2
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12)


def test_fss_matches_pysteps_per_lead_and_pooled():
    data = batches(seed=4)
    out = run_scores(data, scales=SCALES)
    assert out["fss_scales"] == list(SCALES)
    t = data[0][0].shape[1]
    for k, thr in enumerate(THRESHOLDS):
        entry = out["per_threshold"][k]
        for s, scale in enumerate(SCALES):
            fields = [
                (p[b, j], o[b, j]) for p, o in data for b in range(p.shape[0]) for j in range(t)
            ]
            assert close(entry["fss"][s], pysteps_fss(fields, thr, scale)), (thr, scale)
            for j in range(t):
                fields = [(p[b, j], o[b, j]) for p, o in data for b in range(p.shape[0])]
                expected = pysteps_fss(fields, thr, scale)
                assert close(entry["per_lead"]["fss"][s][j], expected), (thr, scale, j)


def test_fss_uses_greater_or_equal_like_pysteps():
    # Unlike det_cat_fct, fss_accum counts a value equal to the threshold as an event.
    pred = np.zeros((1, 1, 5, 5))
    obs = np.zeros((1, 1, 5, 5))
    pred[0, 0, 2, 2] = 2.0
    obs[0, 0, 2, 3] = 2.0
    out = run_scores([(pred, obs)], thresholds=(2.0,), scales=(1, 3))
    fss = out["per_threshold"][0]["fss"]
    assert fss[0] == 0.0 and 0.0 < fss[1] < 1.0
    assert close(fss[1], pysteps_fss([(pred[0, 0], obs[0, 0])], 2.0, 3))


def test_fss_scale_larger_than_the_field():
    data = batches(seed=6, n=1, shape=(2, 2, 6, 5))
    out = run_scores(data, thresholds=(0.5,), scales=(9, 12))
    p, o = data[0]
    fields = [(p[b, j], o[b, j]) for b in range(2) for j in range(2)]
    for s, scale in enumerate((9, 12)):
        assert close(out["per_threshold"][0]["fss"][s], pysteps_fss(fields, 0.5, scale))


# ----------------------------------------------------------------------------- balanced errors


def numpy_balanced(batches_, masks):
    """Independent float64 B-MSE/B-MAE: weighted error summed per frame, averaged over frames."""
    sq, ab, n = 0.0, 0.0, 0
    for (pred, obs, rate), mask in zip(batches_, masks, strict=True):
        pred, obs, rate = (np.asarray(a, dtype=np.float64).squeeze(2) for a in (pred, obs, rate))
        w = np.select(
            [rate >= 30, rate >= 10, rate >= 5, rate >= 2], [30.0, 10.0, 5.0, 2.0], default=1.0
        )
        keep = np.isfinite(pred) & np.isfinite(obs) & np.isfinite(rate) & mask.squeeze(2)
        err = np.where(keep, pred - obs, 0.0)
        w = np.where(keep, w, 0.0)
        sq = sq + (w * err**2).sum(axis=(2, 3)).sum(axis=0)
        ab = ab + (w * np.abs(err)).sum(axis=(2, 3)).sum(axis=0)
        n += pred.shape[0]
    return sq / n, ab / n


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_balanced_errors_match_numpy(dtype):
    rng = np.random.default_rng(7)
    shape = (3, 4, 1, 16, 18)
    data, masks = [], []
    for _ in range(2):
        rate = rain(rng, shape) * 3.0
        obs = rng.random(shape)
        pred = obs + rng.normal(0, 0.1, shape)
        pred[rng.random(shape) < 0.02] = np.nan
        data.append((pred, obs, rate))
        masks.append(rng.random(shape) < 0.8)
    metric = BalancedErrors()
    for (pred, obs, rate), mask in zip(data, masks, strict=True):
        metric.update(
            *(torch.from_numpy(a).to(dtype) for a in (pred, obs, rate)), torch.from_numpy(mask)
        )
    out = metric.compute()
    cast = [tuple(torch.from_numpy(a).to(dtype).double().numpy() for a in d) for d in data]
    sq, ab = numpy_balanced(cast, masks)
    np.testing.assert_allclose(out["per_lead"]["b_mse"], sq, rtol=1e-10)
    np.testing.assert_allclose(out["per_lead"]["b_mae"], ab, rtol=1e-10)
    assert out["b_mse"] == pytest.approx(sq.mean(), rel=1e-10)
    assert out["b_mae"] == pytest.approx(ab.mean(), rel=1e-10)
    assert out["num_sequences"] == 6
    assert metric._sums.dtype == torch.float64


def test_balanced_weights_follow_hko7():
    rate = torch.tensor([0.0, 1.99, 2.0, 5.0, 9.9, 10.0, 30.0, 100.0]).view(1, 1, 1, 8)
    expected = [1, 1, 2, 5, 5, 10, 30, 30]
    assert balance_weights(rate).flatten().tolist() == expected
    metric = BalancedErrors()
    metric.update(torch.ones_like(rate), torch.zeros_like(rate), rate)
    out = metric.compute()
    assert out["b_mse"] == out["b_mae"] == sum(expected)


# ------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "thresholds, scales, match",
    [
        ((), (), "at least one threshold"),
        ((1.0, float("nan")), (), "finite"),
        ((float("inf"),), (), "finite"),
        (("a",), (), "sequence of numbers"),
        ((1.0,), (0,), "integers >= 1"),
        ((1.0,), (-3,), "integers >= 1"),
        ((1.0,), (2.5,), "integers >= 1"),
        ((1.0,), (True,), "integers >= 1"),
    ],
)
def test_bad_configuration(thresholds, scales, match):
    with pytest.raises(ConfigError, match=match):
        ContingencyScores(thresholds, scales)


def test_compute_before_update():
    with pytest.raises(ConfigError, match="ContingencyScores.compute.. was called before any"):
        ContingencyScores([1.0]).compute()
    with pytest.raises(ConfigError, match="BalancedErrors.compute.. was called before any"):
        BalancedErrors().compute()


def test_shape_errors():
    scores = ContingencyScores([1.0])
    x = torch.zeros(2, 3, 8, 8)
    with pytest.raises(ShapeError, match=r"obs shape \(2, 3, 8, 7\) does not match pred shape"):
        scores.update(x, torch.zeros(2, 3, 8, 7))
    with pytest.raises(ShapeError, match=r"expected pred shaped \(B, T, H, W\)"):
        scores.update(torch.zeros(3, 8, 8), torch.zeros(3, 8, 8))
    with pytest.raises(ShapeError, match="has 3 channels"):
        scores.update(torch.zeros(2, 3, 3, 8, 8), torch.zeros(2, 3, 3, 8, 8))
    with pytest.raises(ShapeError, match="must be a torch tensor"):
        scores.update(np.zeros((2, 3, 8, 8)), x)
    with pytest.raises(ShapeError, match="does not broadcast"):
        scores.update(x, x, torch.ones(5, 8, 8, dtype=torch.bool))
    with pytest.raises(ConfigError, match="mask must be a bool tensor"):
        scores.update(x, x, torch.ones(8, 8))
    scores.update(x, x)
    with pytest.raises(ShapeError, match="has 4 lead times but earlier updates had 3"):
        scores.update(torch.zeros(2, 4, 8, 8), torch.zeros(2, 4, 8, 8))
    balanced = BalancedErrors()
    with pytest.raises(ShapeError, match="obs_rate shape .* does not match pred shape"):
        balanced.update(x, x, torch.zeros(2, 3, 1, 8, 8))
    balanced.update(x, x, x)
    with pytest.raises(ShapeError, match="has 2 lead times but earlier updates had 3"):
        balanced.update(x[:, :2], x[:, :2], x[:, :2])


@pytest.mark.gpu
def test_cuda_update_does_not_sync_the_host():
    device = cuda_or_skip()
    scores = ContingencyScores(THRESHOLDS, SCALES)
    balanced = BalancedErrors()
    data = batches(seed=8)
    masks = [np.random.default_rng(9).random(p.shape) < 0.9 for p, _ in data]
    on_device = [
        tuple(torch.from_numpy(a).to(device) for a in (p, o, m))
        for (p, o), m in zip(data, masks, strict=True)
    ]
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for pred, obs, mask in on_device:
            scores.update(pred, obs, mask)
            balanced.update(pred, obs, obs, mask)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert scores._counts.device.type == "cuda"
    cpu = run_scores(data, scales=SCALES, masks=masks)
    assert_same(scores.compute(), cpu, tol=1e-9)
    assert math.isfinite(balanced.compute()["b_mse"])
