"""evaluate_nowcast: pixels to rain rates, masks honoured, batches pooled."""

import functools

import pytest
import torch

from convlstm import baselines
from convlstm.errors import ShapeError
from convlstm.evaluation import evaluate_nowcast
from convlstm.units import pixel_to_rainrate
from convlstm.verification import BalancedErrors, ContingencyScores

THRESHOLDS = (0.5, 2.0, 10.0)


def _flat(tree, prefix=""):
    """{path: number} of a nested dict/list result, for pytest.approx."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}/{key}").items()}
    if isinstance(tree, list):
        return {k: v for i, sub in enumerate(tree) for k, v in _flat(sub, f"{prefix}[{i}]").items()}
    return {prefix: tree}


def _same(a, b):
    # FSS sums are float64 and pooled in another order across batches: last-bit differences
    assert _flat(a) == pytest.approx(_flat(b), rel=1e-12, abs=0, nan_ok=True)


def _data(n=5, t=6, size=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    seqs = torch.rand(n, t, 1, size, size, generator=gen) * 0.8
    masks = torch.rand(n, t, 1, size, size, generator=gen) > 0.2
    return seqs, masks


def test_equals_direct_scores_on_rain_rates_whatever_the_batch_size():
    seqs, masks = _data()
    run = functools.partial(
        evaluate_nowcast,
        baselines.persistence,
        seqs,
        context_frames=2,
        horizon=4,
        thresholds=THRESHOLDS,
        masks=masks,
        fss_scales=(3,),
    )
    got = run(batch_size=2)
    _same(got, run(batch_size=5))
    scores, balanced = ContingencyScores(THRESHOLDS, fss_scales=(3,)), BalancedErrors()
    pred = seqs[:, 1:2].expand(-1, 4, -1, -1, -1)
    truth, mask = seqs[:, 2:6], masks[:, 2:6, 0]
    scores.update(pixel_to_rainrate(pred), pixel_to_rainrate(truth), mask=mask)
    balanced.update(pred, truth, pixel_to_rainrate(truth), mask=mask)
    _same(got, {"scores": scores.compute(), "balanced": balanced.compute()})


def test_masked_pixels_do_not_count():
    seqs, masks = _data()
    kwargs = dict(context_frames=2, horizon=4, thresholds=THRESHOLDS, masks=masks)
    before = evaluate_nowcast(baselines.persistence, seqs, **kwargs)
    changed = seqs.clone()
    changed[:, 2:][~masks[:, 2:]] = 1.0  # heavy rain where there is no data
    _same(evaluate_nowcast(baselines.persistence, changed, **kwargs), before)
    unmasked = evaluate_nowcast(baselines.persistence, changed, **{**kwargs, "masks": None})
    assert (
        _flat(unmasked)["/scores/per_threshold[0]/hits"]
        != _flat(before)["/scores/per_threshold[0]/hits"]
    )


def test_bad_shapes():
    seqs, masks = _data()
    with pytest.raises(ShapeError, match="need context_frames \\+ horizon = 7"):
        evaluate_nowcast(
            baselines.persistence, seqs, context_frames=3, horizon=4, thresholds=(1.0,)
        )
    with pytest.raises(ShapeError, match="masks of shape"):
        evaluate_nowcast(
            baselines.persistence,
            seqs,
            context_frames=2,
            horizon=4,
            thresholds=(1.0,),
            masks=masks[:, :5],
        )
