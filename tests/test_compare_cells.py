"""The cell comparison: matched budgets, one recipe, the tables it writes, and its bad input."""

import json

import pytest

from convlstm.config import PRESETS, TrainConfig, build, from_name
from convlstm.models import build_model, count_parameters
from convlstm.training import check_compatible
from experiments import compare_cells, radar
from experiments.moving_mnist import RECIPES
from tests.test_cli import assert_one_line_error, run


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_has_a_recipe_its_model_can_follow(name):
    recipe = {**RECIPES, **radar.RECIPES}[name]
    check_compatible(from_name(name), build(TrainConfig, recipe))


@pytest.mark.parametrize("variant", sorted(compare_cells.VARIANTS))
def test_matched_widths_land_near_the_budget(variant):
    budget = 200_000
    cfg = compare_cells.matched_config(variant, budget)
    width = cfg.hidden_channels[0]
    assert width > 1
    params = count_parameters(build_model(cfg))
    for other in (width - 1, width + 1):  # no other width is closer to the budget
        other_params = count_parameters(
            build_model(compare_cells.variant_config(variant, 2, other))
        )
        assert abs(params - budget) <= abs(other_params - budget)


def test_a_small_comparison_writes_its_tables(tmp_path, mnist_dir):
    out = tmp_path / "cmp"
    args = ["--out", str(out), "--variants", "convlstm,convrnn,fc_lstm", "--budget", "100000"]
    args += ["--steps", "2", "--batch-size", "2", "--log-every", "1", "--test-sequences", "4"]
    args += ["--eval-batch-size", "4", "--wandb", "disabled"]
    report = compare_cells.main(args + (["--mnist-dir", mnist_dir] if mnist_dir else []))
    saved = json.loads((out / "results.json").read_text())
    assert list(saved["variants"]) == ["convlstm", "convrnn", "fc_lstm"]
    for name, r in saved["variants"].items():
        assert abs(r["parameters"] - 100_000) < 25_000, name
        assert r["macs"] > 0 and r["train_seq_per_s"] > 0
        assert len(r["metrics"]["per_lead"]["mse_frame"]) == 10
        assert (out / name / "checkpoint.pt").exists()
    # one recipe: scheduled sampling and the context loss wherever the model supports them
    assert saved["variants"]["convrnn"]["train_config"]["loss_on_context"] is True
    assert saved["variants"]["fc_lstm"]["train_config"]["loss_on_context"] is False
    assert saved["variants"]["fc_lstm"]["train_config"]["scheduled_sampling"] == "linear"
    assert set(saved["baselines"]) == {"persistence", "blank"}
    table = (out / "results.md").read_text()
    assert "| convrnn |" in table and "| persistence (baseline) MSE |" in table
    assert report["variants"].keys() == saved["variants"].keys()


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--variants", "convlstm,lstm9000"], "unknown variant(s) lstm9000"),
        (["--budget", "10"], "--budget"),
        (["--steps", "0"], "steps must be at least 1"),
        (["--variants", "fc_lstm", "--budget", "20000"], "below the smallest fc_lstm"),
        (["--variants", "ef_convlstm", "--scheduled-sampling", "linear"], "scheduled_sampling"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, fragment):
    out = tmp_path / "cmp"
    proc = run("experiments.compare_cells", "--out", str(out), *args)
    assert_one_line_error(proc, fragment)
    assert not out.exists()
