"""Train a ConvLSTM on generated Moving MNIST and evaluate it beside baselines (the main job).

    python -m experiments.moving_mnist --preset mmnist-cpu-small
    python -m experiments.moving_mnist --preset mmnist-convlstm-s --steps 2000 --out runs/s
    python -m experiments.moving_mnist --resume runs/s/checkpoint.pt --steps 4000 --out runs/s

Writes to --out: checkpoint.pt, metrics.json, forecast.gif, log.jsonl and a W&B run (wandb/).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch

from convlstm.checkpoint import load_checkpoint
from convlstm.cli import ArgumentParser, add_config_flags, given, run_main
from convlstm.config import PRESETS, ModelConfig, TrainConfig, build, from_name, to_dict
from convlstm.errors import ConfigError
from convlstm.tracking import Tracker
from convlstm.training import check_compatible, check_resume_precision, resolve_device, train
from experiments.mmnist_data import DataConfig, test_sequences, training_batches
from experiments.report import evaluate_baselines, print_table, train_summary, write_json

# Training recipes per preset: overrides of TrainConfig's defaults (flags override these).
RECIPES: dict[str, dict] = {
    # Sized for about 8 minutes of training on a 2-core CPU: teacher forcing fades out over
    # the first ~half of the steps, OneCycle over all of them.
    # Batch 8 beat batch 16 at equal time (MSE/frame 105 vs 109 on 256 test sequences).
    "mmnist-cpu-small": dict(
        steps=1100, batch_size=8, lr=2e-3, ss_decay_steps=600, loss_on_context=True
    ),
    # OpenSTL's recipe: Adam 5e-4, batch 16, OneCycle, 200 epochs of 10,000 sequences, MSE on
    # all 19 predicted frames, teacher forcing from 1.0 down by 2e-5 per step.
    "mmnist-convlstm-s": dict(
        steps=125_000, batch_size=16, lr=5e-4, ss_decay_steps=50_000, loss_on_context=True
    ),
    "mmnist-convlstm-l": dict(
        steps=125_000, batch_size=16, lr=5e-4, ss_decay_steps=50_000, loss_on_context=True
    ),
    "mmnist-shi2015": dict(
        steps=125_000, batch_size=16, lr=5e-4, ss_decay_steps=50_000, loss_on_context=True
    ),
    "mmnist-encoder-forecaster": dict(
        steps=20_000, batch_size=16, lr=1e-3, scheduled_sampling="none"
    ),
}
# The rest of the family trains like its layout: stacked cells with OpenSTL's recipe,
# encoder-forecasters like the one above; FC-LSTM is fed its own predictions (scheduled
# sampling) but makes none while reading the context.
for _name in ("mmnist-peephole-convlstm", "mmnist-convgru", "mmnist-convrnn", "mmnist-sa-convlstm"):
    RECIPES[_name] = RECIPES["mmnist-convlstm-s"]
for _name in ("mmnist-trajgru", "mmnist-bidirectional-ef", "mmnist-attention-ef"):
    RECIPES[_name] = RECIPES["mmnist-encoder-forecaster"]
# Srivastava et al. and Shi et al. train FC-LSTM's sigmoid output with cross-entropy.
RECIPES["mmnist-fc-lstm"] = dict(
    steps=125_000, batch_size=16, lr=5e-4, ss_decay_steps=50_000, loss="bce"
)


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    mmnist = sorted(name for name in PRESETS if name.startswith("mmnist-"))
    parser.add_argument("--preset", choices=mmnist, default="mmnist-cpu-small")
    parser.add_argument(
        "--out", type=Path, default=None, help="run folder (default runs/<preset>-<time>)"
    )
    parser.add_argument("--resume", type=Path, default=None, help="checkpoint to continue from")
    parser.add_argument("--name", default=None, help="W&B run name")
    add_config_flags(parser, ModelConfig, "model (overrides the preset)")
    add_config_flags(parser, TrainConfig, "training (overrides the preset's recipe)")
    add_config_flags(parser, DataConfig, "data")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.resume is not None:
        # A resumed run continues with the configs stored in its checkpoint; flags override them.
        payload = load_checkpoint(args.resume)
        model_cfg = build(ModelConfig, {**payload["model_config"], **given(args, ModelConfig)})
        train_cfg = build(TrainConfig, {**payload["train_config"], **given(args, TrainConfig)})
        data_cfg = build(
            DataConfig, {**payload["extra"].get("data", {}), **given(args, DataConfig)}
        )
        preset = payload["extra"].get("preset", args.preset)
        if payload["step"] >= train_cfg.steps:
            raise ConfigError(
                f"{args.resume} is already at step {payload['step']}; "
                f"pass --steps larger than that to go on"
            )
        check_resume_precision(payload, train_cfg, resolve_device(train_cfg.device), args.resume)
    else:
        preset = args.preset
        model_cfg = from_name(preset, **given(args, ModelConfig))
        train_cfg = build(TrainConfig, {**RECIPES.get(preset, {}), **given(args, TrainConfig)})
        data_cfg = build(DataConfig, given(args, DataConfig))
    out = args.out or Path("runs") / f"{preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    if args.resume is None and (out / "checkpoint.pt").exists():
        raise ConfigError(
            f"{out} already holds a run; pass --resume {out}/checkpoint.pt or another --out"
        )

    check_compatible(model_cfg, train_cfg)
    frames = train_cfg.context_frames + train_cfg.horizon
    test_set, test_desc = test_sequences(data_cfg, frames)
    device = str(resolve_device(train_cfg.device))  # CUDA: batches are rendered there
    batches, _, train_source = training_batches(
        data_cfg, frames, train_cfg.batch_size, train_cfg.seed, device
    )
    print(f"preset {preset}; training digits: {train_source}; test set: {test_desc}")

    extra = {"preset": preset, "data": asdict(data_cfg), "test_set": test_desc}
    tracker = Tracker(
        out,
        mode=train_cfg.wandb,
        project=train_cfg.wandb_project,
        name=args.name,
        config={"model": to_dict(model_cfg), "train": to_dict(train_cfg), **extra},
    )
    try:
        result = train(
            model_cfg,
            train_cfg,
            train_batches=batches,
            eval_sequences=test_set,
            out_dir=out,
            tracker=tracker,
            resume=args.resume,
            extra_config=extra,
        )
        # The mean pixel value of training sequences, for the constant-frame baseline.
        mean_value = float(batches(10**6).mean())  # a batch far from the ones trained on
        base = evaluate_baselines(
            test_set,
            context_frames=train_cfg.context_frames,
            horizon=train_cfg.horizon,
            mean_value=mean_value,
            batch_size=train_cfg.eval_batch_size,
        )
        report = {
            "preset": preset,
            "test_set": test_desc,
            "training_digits": train_source,
            "model": result["metrics"],
            "baselines": base,
            "train": train_summary(result),
            "config": result["config"],
            "files": {
                "checkpoint": str(result["checkpoint"]),
                "gif": str(result["gif"]),
                "log": str(out / "log.jsonl"),
                "wandb": str(tracker.wandb_dir) if tracker.wandb_dir else None,
            },
        }
        metrics_path = write_json(out / "metrics.json", report)
        tracker.summary(
            {f"test/{k}": result["metrics"][k] for k in ("mse_frame", "mae_frame", "ssim", "psnr")}
            | {f"baseline/{n}/mse_frame": m["mse_frame"] for n, m in base.items()}
        )
    finally:
        tracker.finish()
    print_report(report, metrics_path)
    return report


def _memory(gib: float) -> str:
    return f"{gib * 1024:.0f} MiB" if gib < 1 else f"{gib:.2f} GiB"


def print_report(report: dict, metrics_path: Path) -> None:
    train = report["train"]
    print(
        f"\ntrained {train['steps']} steps in {train['seconds']:.0f} s on {train['device']} "
        f"({train['precision']}, {train['speed']}, {train['seq_per_s']:.1f} seq/s, "
        f"{train['parameters']:,} parameters, peak memory {_memory(train['peak_memory_gib'])})"
    )
    print(f"test set: {report['test_set']}")
    print_table({"model": report["model"], **report["baselines"]})
    print(f"\nmetrics:    {metrics_path}")
    for name, path in report["files"].items():
        print(f"{name + ':':<12}{path}")


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    run_main(main)
