"""The radar experiment end to end on tiny settings: scores beside both baselines, W&B, GIFs."""

import json
import re

import pytest
import torch

from convlstm.errors import ConfigError
from datasets.radar_io import radar_root
from experiments import radar
from experiments.radar_data import RadarDataConfig, _dihedral, load_radar_data
from tests.test_cli import assert_one_line_error, run

TINY = [
    "--hidden-channels", "4", "6", "6",
    "--grid", "32",
    "--context-frames", "3",
    "--horizon", "4",
    "--synthetic-test", "4",
    "--batch-size", "4",
    "--log-every", "3",
]  # fmt: skip

needs_radar = pytest.mark.skipif(
    not radar_root().is_dir(), reason=f"real radar composites not found at {radar_root()}"
)


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    """A synthetic-only run: the real events are hidden (the default folder points nowhere)."""
    out = tmp_path_factory.mktemp("radar") / "run"
    argv = [*TINY, "--train-data", "synthetic", "--steps", "6", "--wandb", "offline"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CONVLSTM_RADAR_DIR", str(out.parent / "no-radar-here"))
        return out, radar.main([*argv, "--out", str(out)])


def test_synthetic_run_scores_model_and_both_baselines(synthetic_run):
    out, report = synthetic_run
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["thresholds_mmh"] == list(radar.THRESHOLDS)
    for set_name, test in saved["tests"].items():
        for method in ("model", "persistence", "optical flow"):
            per = test[method]["scores"]["per_threshold"]
            assert len(per) == len(radar.THRESHOLDS)
            assert len(per[0]["per_lead"]["csi"]) == 4  # one per lead time
            assert test[method]["balanced"]["b_mse"] >= 0
        # persistence's first-lead CSI at 0.5 mm/h beats its last (rain moves away), and
        # following the motion beats standing still at the last lead
        lead = test["persistence"]["scores"]["per_threshold"][0]["per_lead"]["csi"]
        flow = test["optical flow"]["scores"]["per_threshold"][0]["per_lead"]["csi"]
        assert lead[0] > lead[-1] and flow[-1] > lead[-1], set_name
        model = test["model"]["scores"]["per_threshold"][0]["per_lead"]["csi"]
        assert model != lead and model != flow
        assert (out / f"nowcast-{set_name}.gif").stat().st_size > 0
    assert list(saved["tests"]) == ["synthetic"]  # no real events in this run
    assert report["train"]["steps"] == 6


def test_synthetic_run_logs_csi_charts_and_gifs(synthetic_run):
    out, _ = synthetic_run
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    chart = next(
        r["csi_by_lead/synthetic/0.5mmh"] for r in lines if "csi_by_lead/synthetic/0.5mmh" in r
    )
    assert chart["x"] == [1, 2, 3, 4] and set(chart) == {
        "x",
        "model",
        "persistence",
        "optical flow",
    }
    assert [r["step"] for r in lines if "train/loss" in r] == [3, 6]
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    blob = runs[0].read_bytes()
    for name in (b"train/loss", b"csi_by_lead/synthetic/2mmh", b"nowcast/synthetic"):
        assert name in blob, name
    tables = list((out / "wandb").glob("offline-run-*/files/media/table/**/*.table.json"))
    assert len(tables) >= len(radar.THRESHOLDS)


@needs_radar
def test_real_events_split_into_training_and_held_out_windows():
    data = load_radar_data(RadarDataConfig(grid=32, synthetic_test=2), 7, 4, 0)
    real = data.test_sets["real"]
    assert "bom-20201031" not in real.desc and "fmi-20160928" in real.desc
    assert real.sequences.shape[1:] == (7, 1, 32, 32)
    assert real.masks.dtype == torch.bool and not real.masks.all()  # FMI has no-data areas
    assert real.sequences[~real.masks].abs().max() == 0  # no data is drawn as dry
    batch = data.batches(0)
    assert batch.shape == (4, 7, 1, 32, 32)
    torch.testing.assert_close(data.batches(0), batch)  # the stream is a function of the step


@needs_radar
def test_unknown_training_event_is_refused():
    with pytest.raises(ConfigError, match="unknown train_events \\['xyz-20200101'\\]"):
        load_radar_data(RadarDataConfig(grid=32, train_events=("xyz-20200101",)), 7, 4, 0)


@needs_radar
def test_training_on_synthetic_and_real_scores_the_held_out_events(tmp_path):
    out = tmp_path / "run"
    argv = [*TINY, "--steps", "2", "--log-every", "1", "--wandb", "disabled", "--out", str(out)]
    report = radar.main(argv)
    assert list(report["tests"]) == ["synthetic", "real"]
    real = report["tests"]["real"]
    assert "fmi-20160928 (5 min)" in real["desc"] and "bom-20201031" not in real["desc"]
    assert "bom-20201031 (10 min): 138 windows" in report["train_data"]  # 144 - 7 + 1
    # no-data pixels are left out: FMI's composites have them, so fewer events are counted
    # than 39 windows x 4 leads x 32 x 32 pixels
    counts = real["model"]["scores"]["per_threshold"][0]
    total = sum(counts[k] for k in ("hits", "misses", "false_alarms", "correct_negatives"))
    assert 0 < total < real["windows"] * 4 * 32 * 32
    assert (out / "nowcast-real.gif").stat().st_size > 0


@pytest.mark.parametrize(
    "args, error, fragment",
    [
        (["--grid", "16"], ConfigError, "not divisible by patch_size x stage strides (32)"),
        (["--seed", str(2**32)], ConfigError, "seed must be in [0, 2**32)"),
        (["--real-share", "0.05"], ConfigError, "at least one of each source"),
        (["--train-data", "real", "--real-share", "0.3"], ConfigError, "train_data=both only"),
    ],
)
def test_inputs_refused_before_anything_is_written(tmp_path, args, error, fragment):
    out = tmp_path / "run"
    with pytest.raises(error, match=re.escape(fragment)):
        radar.main([*args, "--steps", "1", "--out", str(out)])
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_an_unavailable_device_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="CUDA is not available"):
        radar.main(["--device", "cuda", "--steps", "1", "--out", str(out)])
    assert not out.exists()


def test_dihedral_covers_the_eight_symmetries():
    x = torch.arange(9.0).view(1, 1, 3, 3)
    seen = {tuple(_dihedral(x, k).flatten().tolist()) for k in range(8)}
    assert len(seen) == 8


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--thresholds", "0.5", "0.01"], "--thresholds must be distinct rain rates between"),
        (["--fss-scales", "0"], "--fss-scales must be >= 1"),
        (["--radar-dir", "/nonexistent/radar"], "/nonexistent/radar"),
        (["--real-share", "1.5"], "real_share must be in (0, 1)"),
        (["--grid", "100"], "multiple of grid"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, fragment):
    out = tmp_path / "run"
    proc = run("experiments.radar", *args, "--steps", "1", "--out", str(out))
    assert_one_line_error(proc, fragment)
    assert not out.exists()
