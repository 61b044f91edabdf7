"""Train every cell of the family at one parameter budget under one recipe and compare them.

    python -m experiments.compare_cells --out runs/compare            # all variants (CPU: ~1 h)
    python -m experiments.compare_cells --variants convlstm,convrnn --steps 100 --out runs/c

Each variant's width is chosen so that its parameter count is the closest to --budget. All
train with the same optimiser, learning-rate schedule, steps, batch and data; scheduled sampling
and the loss on the context predictions apply where the architecture supports them (models fed
their own predictions; stacked models). Writes to --out: results.json, results.md (the tables)
and one run folder per variant (checkpoint, metrics, GIF, W&B run).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from convlstm.cli import ArgumentParser, add_config_flags, given, run_main
from convlstm.complexity import count_macs
from convlstm.config import ModelConfig, TrainConfig, build, to_dict
from convlstm.errors import ConfigError
from convlstm.models import MODELS, build_model, count_parameters
from convlstm.tracking import Tracker
from convlstm.training import check_compatible, train
from experiments.mmnist_data import DataConfig, test_sequences, training_batches
from experiments.report import evaluate_baselines, write_json

# The variants: overrides of a shared base (2 layers, 3x3 kernels, 8x8 patches: the quick
# start's shape); the width of every layer is then matched to the parameter budget.
BASE = dict(kernel_size=3, patch_size=8)
VARIANTS: dict[str, dict[str, Any]] = {
    "convlstm": dict(cell="convlstm"),
    "peephole_convlstm": dict(cell="peephole_convlstm"),
    "convgru": dict(cell="convgru"),
    "trajgru": dict(cell="trajgru", trajgru_links=5),
    "sa_convlstm": dict(cell="sa_convlstm"),
    "convrnn": dict(cell="convrnn"),
    "ef_convlstm": dict(architecture="encoder_forecaster", stage_strides=(1, 2)),
    "ef_bidirectional": dict(
        architecture="encoder_forecaster", stage_strides=(1, 2), bidirectional=True
    ),
    "ef_attention": dict(
        architecture="encoder_forecaster", stage_strides=(1, 2), encoder_attention=True
    ),
    "fc_lstm": dict(architecture="fc_lstm", frame_size=(64, 64)),
}
# The recipe shared by every variant: the quick start's, shortened.
RECIPE = dict(steps=500, batch_size=8, lr=2e-3, ss_decay_steps=275, eval_batch_size=64)


def variant_config(name: str, layers: int, width: int, canvas: int = 64) -> ModelConfig:
    overrides = dict(VARIANTS[name])
    if overrides.get("architecture") == "fc_lstm":
        overrides["frame_size"] = (canvas, canvas)  # FC-LSTM is built for one frame size
        base = {}
    else:
        base = BASE
    return build(ModelConfig, {**base, **overrides, "hidden_channels": (width,) * layers})


def matched_config(name: str, budget: int, layers: int = 2, canvas: int = 64) -> ModelConfig:
    """The variant with the per-layer width whose parameter count is closest to `budget`."""

    def params(width: int) -> int:
        return count_parameters(build_model(variant_config(name, layers, width, canvas)))

    if params(1) > budget:
        raise ConfigError(
            f"--budget {budget:,} is below the smallest {name} ({params(1):,} parameters "
            "at width 1)"
        )
    low, high = 1, 8
    while params(high) <= budget:  # double until past the budget, then bisect
        low, high = high, 2 * high
    while high - low > 1:  # parameters grow with the width: bisect for the crossing
        mid = (low + high) // 2
        low, high = (mid, high) if params(mid) <= budget else (low, mid)
    best = min((low, high), key=lambda w: abs(params(w) - budget))
    return variant_config(name, layers, best, canvas)


def recipe_for(model_cfg: ModelConfig, overrides: dict[str, Any]) -> TrainConfig:
    cls = MODELS[model_cfg.architecture]
    values = {
        **RECIPE,
        "scheduled_sampling": "linear" if cls.feeds_back else "none",
        "loss_on_context": hasattr(cls, "encode_with_predictions"),
        **overrides,
    }
    if "steps" in overrides and "ss_decay_steps" not in overrides:
        values["ss_decay_steps"] = math.ceil(0.55 * values["steps"])
    return build(TrainConfig, values)


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for tables and runs")
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated subset of: {', '.join(VARIANTS)}",
    )
    parser.add_argument("--budget", type=int, default=600_000, help="parameters per model")
    parser.add_argument("--layers", type=int, default=2, help="recurrent layers per model")
    add_config_flags(parser, TrainConfig, "training (overrides the shared recipe)")
    add_config_flags(parser, DataConfig, "data")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        raise ConfigError(
            f"unknown variant(s) {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(VARIANTS)}"
        )
    if args.budget < 1000 or args.layers < 1:
        raise ConfigError("--budget must be at least 1000 and --layers at least 1")
    if (args.out / "results.json").exists():
        raise ConfigError(f"{args.out} already holds a comparison; choose another --out")
    data_cfg = build(DataConfig, given(args, DataConfig))
    train_overrides = given(args, TrainConfig)
    plans = []  # build every config first, so that a bad flag fails before any training
    for name in names:
        model_cfg = matched_config(name, args.budget, args.layers, data_cfg.canvas)
        train_cfg = recipe_for(model_cfg, train_overrides)
        check_compatible(model_cfg, train_cfg)
        plans.append((name, model_cfg, train_cfg))

    frames = plans[0][2].context_frames + plans[0][2].horizon
    test_set, test_desc = test_sequences(data_cfg, frames)
    frame_size = tuple(test_set.shape[-2:])
    print(f"test set: {test_desc}")
    results: dict[str, Any] = {}
    for name, model_cfg, train_cfg in plans:
        print(f"\n== {name}: hidden {model_cfg.hidden_channels}")
        batches, _, source = training_batches(
            data_cfg, frames, train_cfg.batch_size, train_cfg.seed
        )
        out = args.out / name
        extra = {"variant": name, "data": to_dict(data_cfg), "test_set": test_desc}
        tracker = Tracker(
            out,
            mode=train_cfg.wandb,
            project=train_cfg.wandb_project,
            name=f"compare-{name}",
            config={"model": to_dict(model_cfg), "train": to_dict(train_cfg), **extra},
        )
        try:
            run = train(
                model_cfg,
                train_cfg,
                train_batches=batches,
                eval_sequences=test_set,
                out_dir=out,
                tracker=tracker,
                extra_config=extra,
            )
        finally:
            tracker.finish()
        macs = count_macs(
            run["model"],
            context_frames=train_cfg.context_frames,
            horizon=train_cfg.horizon,
            frame_size=frame_size,
        )
        results[name] = {
            "hidden_channels": list(model_cfg.hidden_channels),
            "parameters": run["parameters"],
            "macs": macs,
            "train_seq_per_s": run["train_seq_per_s"],
            "train_seconds": run["train_seconds"],
            "metrics": run["metrics"],
            "model_config": to_dict(model_cfg),
            "train_config": to_dict(train_cfg),
            "training_digits": source,
        }
    last_cfg = plans[-1][2]
    baselines = evaluate_baselines(
        test_set,
        context_frames=last_cfg.context_frames,
        horizon=last_cfg.horizon,
        mean_value=0.0,
        batch_size=last_cfg.eval_batch_size,
    )
    baselines = {k: v for k, v in baselines.items() if k in ("persistence", "blank")}
    report = {
        "test_set": test_desc,
        "budget": args.budget,
        "device": run["device"],
        "date": time.strftime("%Y-%m-%d"),
        "variants": results,
        "baselines": baselines,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "results.json", report)
    table = markdown_tables(report)
    (args.out / "results.md").write_text(table)
    print("\n" + table)
    return report


def markdown_tables(report: dict) -> str:
    """Two tables: the summary (size, cost, speed, errors) and MSE and SSIM per lead time."""
    rows = [
        "| variant | hidden | parameters | GMACs/seq | train seq/s | MSE/frame | SSIM "
        "| MSE t+1 | MSE t+5 | MSE t+10 | SSIM t+10 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in report["variants"].items():
        m, lead = r["metrics"], r["metrics"]["per_lead"]
        rows.append(
            f"| {name} | {'x'.join(map(str, r['hidden_channels']))} | {r['parameters']:,} "
            f"| {r['macs'] / 1e9:.2f} | {r['train_seq_per_s']:.1f} | {m['mse_frame']:.1f} "
            f"| {m['ssim']:.3f} | {lead['mse_frame'][0]:.1f} | {_at(lead['mse_frame'], 5)} "
            f"| {_at(lead['mse_frame'], 10)} | {_at(lead['ssim'], 10, '.3f')} |"
        )
    for name, m in report["baselines"].items():
        lead = m["per_lead"]
        rows.append(
            f"| {name} (baseline) | | 0 | 0 | | {m['mse_frame']:.1f} | {m['ssim']:.3f} "
            f"| {lead['mse_frame'][0]:.1f} | {_at(lead['mse_frame'], 5)} "
            f"| {_at(lead['mse_frame'], 10)} | {_at(lead['ssim'], 10, '.3f')} |"
        )
    every = {**report["variants"], **{f"{k} (baseline)": v for k, v in report["baselines"].items()}}
    horizon = len(next(iter(report["variants"].values()))["metrics"]["per_lead"]["mse_frame"])
    lead_rows = [
        "| variant | " + " | ".join(f"t+{k}" for k in range(1, horizon + 1)) + " |",
        "|---|" + "---:|" * horizon,
    ]
    for name, r in every.items():
        per_lead = (r["metrics"] if "metrics" in r else r)["per_lead"]
        mse = " | ".join(f"{v:.1f}" for v in per_lead["mse_frame"])
        ssim = " | ".join(f"{v:.3f}" for v in per_lead["ssim"])
        lead_rows.append(f"| {name} MSE | {mse} |")
        lead_rows.append(f"| {name} SSIM | {ssim} |")
    return "\n".join(rows) + "\n\nPer lead time:\n\n" + "\n".join(lead_rows) + "\n"


def _at(values: list[float], lead: int, fmt: str = ".1f") -> str:
    return format(values[lead - 1], fmt) if len(values) >= lead else "-"


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    run_main(main)
