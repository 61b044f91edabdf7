"""Bad input ends in one clear line on stderr, exit status 2, and nothing written to disk."""

import subprocess
import sys
from pathlib import Path

import pytest

from convlstm.checkpoint import save_checkpoint
from convlstm.config import TrainConfig, build, from_name
from convlstm.models import build_model

ROOT = Path(__file__).resolve().parents[1]


def run(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, fragment: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert fragment in lines[0], lines[0]


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--no-such-flag", "1"], "unrecognized arguments: --no-such-flag"),
        (["--steps", "many"], "--steps: invalid int value"),
        (["--kernel-size", "4"], "kernel_size must be odd"),
        (["--preset", "mmnist-huge"], "invalid choice: 'mmnist-huge'"),
        (["--mnist-dir", "/nonexistent/mnist"], "/nonexistent/mnist"),
        (["--test-file", "/nonexistent/mnist_test_seq.npy"], "mnist_test_seq.npy"),
        (
            ["--preset", "mmnist-encoder-forecaster", "--scheduled-sampling", "linear"],
            "scheduled_sampling",
        ),
    ],
)
def test_main_job_rejects_bad_input_without_writing(tmp_path, args, fragment):
    out = tmp_path / "run"
    proc = run("experiments.moving_mnist", *args, "--out", str(out), "--steps", "1")
    assert_one_line_error(proc, fragment)
    assert not out.exists()


def test_a_test_file_of_the_wrong_rank_is_refused(tmp_path):
    import numpy as np

    bad = tmp_path / "mnist_test_seq.npy"
    np.save(bad, np.zeros((20, 64, 64), dtype=np.uint8))  # no sequence axis
    out = tmp_path / "run"
    proc = run("experiments.moving_mnist", "--test-file", str(bad), "--out", str(out))
    assert_one_line_error(proc, "mnist_test_seq.npy")
    assert not out.exists()


def _saved_run(run_dir, step: int, train: dict, **extra):
    """A small mmnist-cpu-small run's checkpoint at `step`, in run_dir."""
    cfg = from_name("mmnist-cpu-small", hidden_channels=(4,), kernel_size=3)
    return save_checkpoint(
        run_dir / "checkpoint.pt",
        model=build_model(cfg),
        model_config=cfg,
        step=step,
        train_config=build(TrainConfig, train),
        extra={"preset": "mmnist-cpu-small", **extra},
    )


def test_resuming_a_run_that_is_already_done_is_refused_before_any_work(tmp_path):
    run_dir = tmp_path / "run"
    ckpt = _saved_run(run_dir, 5, {"steps": 5})
    proc = run("experiments.moving_mnist", "--resume", str(ckpt), "--out", str(run_dir))
    assert_one_line_error(proc, "already at step 5")
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint.pt"]


def test_resuming_where_auto_means_another_precision_is_refused_before_any_work(tmp_path):
    run_dir = tmp_path / "run"
    # the eager path on the CPU: auto is fp32; the run recorded bf16, as if trained so
    ckpt = _saved_run(run_dir, 2, {"steps": 5, "device": "cpu"}, precision_used="bf16")
    proc = run("experiments.moving_mnist", "--resume", str(ckpt), "--out", str(run_dir))
    assert_one_line_error(proc, "trained in bf16, and precision=auto means fp32")
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint.pt"]


def test_a_finished_run_is_not_overwritten(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"precious")
    proc = run("experiments.moving_mnist", "--out", str(out))
    assert_one_line_error(proc, "already holds a run")
    assert (out / "checkpoint.pt").read_bytes() == b"precious"


def test_evaluate_rejects_truncated_and_missing_checkpoints(tmp_path):
    cfg = from_name("mmnist-cpu-small", hidden_channels=(4,), kernel_size=3)
    path = save_checkpoint(tmp_path / "c.pt", model=build_model(cfg), model_config=cfg, step=1)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    out = tmp_path / "eval.json"
    assert_one_line_error(
        run("experiments.evaluate", "--checkpoint", str(path), "--out", str(out)),
        "truncated or corrupt",
    )
    assert_one_line_error(
        run("experiments.evaluate", "--checkpoint", str(tmp_path / "none.pt")),
        "checkpoint not found",
    )
    assert not out.exists()
