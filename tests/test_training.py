import json

import pytest
import torch

from convlstm.checkpoint import load_checkpoint
from convlstm.config import ModelConfig, TrainConfig, build, from_name
from convlstm.errors import ConfigError
from convlstm.training import check_compatible, teacher_mask, teacher_probability, train
from experiments import moving_mnist

TINY = ["--hidden-channels", "8", "8", "--kernel-size", "3", "--batch-size", "4"]


def moving_squares(step: int, batch: int = 4, frames: int = 8, size: int = 16) -> torch.Tensor:
    """A tiny deterministic data stream: one bright square per sequence moving right."""
    gen = torch.Generator().manual_seed(step)
    out = torch.zeros(batch, frames, 1, size, size)
    rows = torch.randint(0, size - 4, (batch,), generator=gen)
    for b in range(batch):
        for t in range(frames):
            col = t % (size - 4)
            out[b, t, 0, rows[b] : rows[b] + 4, col : col + 4] = 1.0
    return out


def test_main_job_lowers_the_loss_and_writes_every_output(tmp_path, mnist_dir):
    out = tmp_path / "run"
    argv = [
        *TINY,
        "--steps",
        "30",
        "--log-every",
        "10",
        "--lr",
        "3e-3",
        "--ss-decay-steps",
        "20",
        "--loss-on-context",
        "--test-sequences",
        "8",
        "--wandb",
        "offline",
        "--out",
        str(out),
    ]
    if mnist_dir:
        argv += ["--mnist-dir", mnist_dir]
    report = moving_mnist.main(argv)

    losses = [loss for _, loss in report["train"]["losses"]]
    assert len(losses) == 3 and losses[-1] < losses[0]
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["model"]["mse_frame"] == pytest.approx(report["model"]["mse_frame"])
    assert set(saved["baselines"]) == {"persistence", "blank", "mean frame"}
    assert len(saved["model"]["per_lead"]["mse_frame"]) == 10
    assert "generated: 8 sequences" in saved["test_set"]
    assert 0 < saved["train"]["peak_memory_gib"] < 1
    assert 0 < saved["train"]["warmup_seconds"] <= saved["train"]["seconds"]
    assert (out / "forecast.gif").stat().st_size > 0
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 30

    # the JSONL log and the offline W&B run both hold the logged metrics
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "train/loss" in r] == [10, 20, 30]
    assert any("val/mse_frame" in r for r in lines)
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    blob = runs[0].read_bytes()
    for name in (b"train/loss", b"val/mse_frame", b"val_lead/mse_frame_t10", b"val/forecast"):
        assert name in blob, name


@pytest.mark.parametrize("path", ["eager", "fast"])
def test_evaluate_rebuilds_the_model_from_the_checkpoint_alone(tmp_path, mnist_dir, path):
    """On the path the run trained on (the fast path: bf16 with packed weights on an AMX CPU,
    float32 with Winograd elsewhere), evaluation scores what the run's own evaluation did."""
    from experiments import evaluate

    out = tmp_path / "run"
    data = ["--mnist-dir", mnist_dir] if mnist_dir else []
    trained = moving_mnist.main(
        [
            *TINY,
            "--path",
            path,
            "--steps",
            "2",
            "--test-sequences",
            "8",
            "--wandb",
            "disabled",
            "--out",
            str(out),
            *data,
        ]
    )
    report = evaluate.main(
        ["--checkpoint", str(out / "checkpoint.pt"), "--out", str(tmp_path / "e.json")]
    )
    assert report["path"] == path
    # the same arithmetic: eager bf16 instead of the fast path differed by 2e-6 here
    assert report["model"]["mse_frame"] == pytest.approx(trained["model"]["mse_frame"], rel=1e-7)
    assert json.loads((tmp_path / "e.json").read_text())["step"] == 2
    if path == "fast":  # the reference, on request: close, not the same arithmetic
        eager = evaluate.main(["--checkpoint", str(out / "checkpoint.pt"), "--path", "eager"])
        assert (eager["path"], eager["precision"]) == ("eager", "fp32")
        assert eager["model"]["mse_frame"] == pytest.approx(report["model"]["mse_frame"], rel=2e-2)


def _train(tmp_path, name, batches=moving_squares, resume=None, model_cfg=None, **overrides):
    model_cfg = model_cfg or ModelConfig(hidden_channels=(6,), kernel_size=3, patch_size=2)
    values = dict(
        steps=6,
        batch_size=4,
        context_frames=4,
        horizon=4,
        lr=3e-3,
        ss_decay_steps=4,
        log_every=1,
        eval_batch_size=4,
        checkpoint_every=3,
        wandb="disabled",
    )
    cfg = build(TrainConfig, {**values, **overrides})
    return train(
        model_cfg,
        cfg,
        train_batches=batches,
        eval_sequences=moving_squares(999),
        out_dir=tmp_path / name,
        resume=resume,
    )


def test_resume_after_a_crash_continues_exactly(tmp_path):
    straight = _train(tmp_path, "straight")

    def crash_at_step_4(step):
        if step == 4:
            raise RuntimeError("simulated crash")
        return moving_squares(step)

    with pytest.raises(RuntimeError, match="simulated crash"):
        _train(tmp_path, "crashed", batches=crash_at_step_4)
    ckpt = tmp_path / "crashed" / "checkpoint.pt"
    assert load_checkpoint(ckpt)["step"] == 3  # the periodic checkpoint survived the crash
    resumed = _train(tmp_path, "resumed", resume=ckpt)

    assert [s for s, _ in resumed["losses"]] == [4, 5, 6]
    assert resumed["losses"] == straight["losses"][3:]
    for (name, a), (_, b) in zip(
        straight["model"].state_dict().items(), resumed["model"].state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_resume_can_extend_a_finished_run(tmp_path):
    _train(tmp_path, "short", steps=4, checkpoint_every=0)
    ckpt = tmp_path / "short" / "checkpoint.pt"
    longer = _train(tmp_path, "longer", steps=8, checkpoint_every=0, resume=ckpt)
    assert [s for s, _ in longer["losses"]] == [5, 6, 7, 8]
    final = load_checkpoint(tmp_path / "longer" / "checkpoint.pt")
    assert final["step"] == 8
    assert final["scheduler"]["total_steps"] == 8  # OneCycle re-planned over the new length
    with pytest.raises(ConfigError, match="already at step 8"):
        _train(tmp_path, "again", steps=8, resume=tmp_path / "longer" / "checkpoint.pt")


def test_resume_keeps_the_precision_auto_resolved_to(tmp_path, monkeypatch):
    """A fast-path run that "auto" made bf16 (a CPU with AMX-BF16 units), resumed where auto
    means fp32, is refused in one line, not switched silently; naming it goes on."""
    from convlstm import training

    monkeypatch.setattr(training, "cpu_bf16_units", lambda: True)
    _train(tmp_path, "amx", steps=3, path="fast", device="cpu")
    ckpt = tmp_path / "amx" / "checkpoint.pt"
    assert load_checkpoint(ckpt)["extra"]["precision_used"] == "bf16"
    monkeypatch.setattr(training, "cpu_bf16_units", lambda: False)
    with pytest.raises(ConfigError, match="trained in bf16, and precision=auto means fp32"):
        _train(tmp_path, "elsewhere", steps=6, path="fast", device="cpu", resume=ckpt)
    again = _train(
        tmp_path, "named", steps=6, path="fast", device="cpu", precision="bf16", resume=ckpt
    )
    assert again["precision"] == "bfloat16" and len(again["losses"]) == 3


def test_resume_takes_this_runs_optimizer_kernel(tmp_path):
    """A checkpoint keeps its optimizer's settings, fused or not; a resumed run steps with the
    kernel its own path chose (fused Adam on the fast path), whichever path saved it."""
    _train(tmp_path, "eager", steps=3, checkpoint_every=0)
    saved = load_checkpoint(tmp_path / "eager" / "checkpoint.pt")
    assert not saved["optimizer"]["param_groups"][0]["fused"]
    fast = dict(path="fast", precision="fp32", device="cpu", checkpoint_every=0)
    _train(tmp_path, "fast", steps=6, resume=tmp_path / "eager" / "checkpoint.pt", **fast)
    resumed = load_checkpoint(tmp_path / "fast" / "checkpoint.pt")
    assert resumed["optimizer"]["param_groups"][0]["fused"] is True
    _train(
        tmp_path, "back", steps=8, checkpoint_every=0, resume=tmp_path / "fast" / "checkpoint.pt"
    )
    back = load_checkpoint(tmp_path / "back" / "checkpoint.pt")
    assert not back["optimizer"]["param_groups"][0]["fused"]


def test_resume_with_another_model_config_is_refused(tmp_path):
    _train(tmp_path, "run", steps=3)
    with pytest.raises(ConfigError, match="another model config"):
        train(
            ModelConfig(hidden_channels=(7,), kernel_size=3, patch_size=2),
            build(
                TrainConfig,
                dict(steps=6, batch_size=4, context_frames=4, horizon=4, wandb="disabled"),
            ),
            train_batches=moving_squares,
            eval_sequences=moving_squares(999),
            out_dir=tmp_path / "other",
            resume=tmp_path / "run" / "checkpoint.pt",
        )


def test_scheduled_sampling_follows_the_linear_schedule():
    cfg = TrainConfig(ss_start=1.0, ss_decay_steps=100, horizon=10)
    assert [teacher_probability(cfg, s) for s in (0, 50, 100, 150)] == [1.0, 0.5, 0.0, 0.0]
    masks = [teacher_mask(cfg, 50, 4000, torch.device("cpu")) for _ in range(2)]
    assert masks[0].shape == (4000, 9) and torch.equal(masks[0], masks[1])  # seeded per step
    assert abs(masks[0].float().mean().item() - 0.5) < 0.02
    assert teacher_mask(cfg, 100, 4, torch.device("cpu")) is None
    off = TrainConfig(scheduled_sampling="none")
    assert teacher_probability(off, 0) == 0.0


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(scheduled_sampling="linear"), "scheduled_sampling=linear needs"),
        (dict(scheduled_sampling="none", loss_on_context=True), "loss_on_context needs"),
    ],
)
def test_options_the_encoder_forecaster_cannot_honour_are_refused(overrides, match):
    with pytest.raises(ConfigError, match=match):
        check_compatible(from_name("mmnist-encoder-forecaster"), TrainConfig(**overrides))


def test_bce_needs_sigmoid_outputs():
    with pytest.raises(ConfigError, match="sigmoid"):
        check_compatible(from_name("mmnist-cpu-small"), TrainConfig(loss="bce"))


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_reduced_precision_on_cpu_trains_finite(tmp_path, precision):
    result = _train(tmp_path, precision, precision=precision, checkpoint_every=0)
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in result["losses"])
    assert result["precision"] == {"fp16": "float16", "bf16": "bfloat16"}[precision]


def test_training_reports_its_peak_memory_and_checkpointing_lowers_it(tmp_path):
    """On the CPU, the first step's live tensors (convlstm.memory); recomputing the forward
    in backward keeps fewer of them."""
    plain = _train(tmp_path, "plain", checkpoint_every=0)
    recomputed = _train(tmp_path, "recomputed", checkpoint_every=0, activation_checkpointing=True)
    assert 0 < recomputed["peak_memory_gib"] < 0.8 * plain["peak_memory_gib"]
    losses = [loss for _, loss in plain["losses"]]
    assert [loss for _, loss in recomputed["losses"]] == pytest.approx(losses, rel=1e-5)


def test_training_peak_is_a_steady_steps_with_gradients_and_optimizer_state(tmp_path):
    """The reported CPU peak is that of a step taken once the gradients and Adam's moments
    exist (live through the forward), as the benchmark measures it, not the first step's."""
    from convlstm.models import build_model
    from convlstm.speed import SpeedOptions
    from experiments.benchmark import _train_step

    result = _train(tmp_path, "run", checkpoint_every=0)
    cfg = build(TrainConfig, result["config"]["train"])
    model_cfg = build(ModelConfig, result["config"]["model"])
    torch.manual_seed(cfg.seed)
    cpu = torch.device("cpu")
    step = _train_step(build_model(model_cfg), model_cfg, cfg, SpeedOptions(), cpu)
    step(moving_squares(0), teacher_mask(cfg, 0, 4, cpu))
    later = [
        step.with_peak_memory(moving_squares(i), teacher_mask(cfg, i, 4, cpu))[1] for i in (1, 2)
    ]
    assert result["peak_memory_gib"] * 2**30 == later[0] == later[1]
