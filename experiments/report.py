"""Baselines beside a model, the metrics JSON, and the printed table (shared by entry points)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from convlstm import baselines
from convlstm.evaluation import evaluate


def evaluate_baselines(
    test_set: torch.Tensor, *, context_frames: int, horizon: int, mean_value: float, batch_size: int
) -> dict[str, dict[str, Any]]:
    """Persistence, blank and constant-mean-frame baselines on the model's test set."""
    predictors = {
        "persistence": baselines.persistence,
        "blank": baselines.blank,
        "mean frame": lambda ctx, h: baselines.constant(ctx, h, mean_value),
    }
    return {
        name: evaluate(
            fn, test_set, context_frames=context_frames, horizon=horizon, batch_size=batch_size
        )
        for name, fn in predictors.items()
    }


def train_summary(result: dict[str, Any]) -> dict[str, Any]:
    """The training part of a metrics report, from `convlstm.training.train`'s result (steps
    as run: a time budget sizes them)."""
    return {
        "steps": result["config"]["train"]["steps"],
        "seconds": round(result["train_seconds"], 1),
        "seq_per_s": round(result["train_seq_per_s"], 2),
        # the first 5 steps (compilation, graph capture), inside `seconds`
        "warmup_seconds": None
        if result["warmup_seconds"] is None
        else round(result["warmup_seconds"], 1),
        # CUDA: the allocator's peak over the loop; CPU: the second step's live tensors
        "peak_memory_gib": round(result["peak_memory_gib"], 4),
        "device": result["device"],
        "precision": result["precision"],
        "speed": result["speed"],
        "time_budget": result["config"]["train"]["time_budget"],
        "parameters": result["parameters"],
        "losses": result["losses"],
    }


def write_json(path: Path, data: dict) -> Path:
    """Write atomically; NaN (e.g. SSIM of frames under 11 px) becomes null for strict JSON."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_finite(data), indent=2))
    os.replace(tmp, path)
    return path


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def print_table(rows: dict[str, dict[str, Any]]) -> None:
    print(f"{'':<14}{'MSE/frame':>10}{'MAE/frame':>11}{'SSIM':>8}{'PSNR':>8}")
    for name, m in rows.items():
        print(
            f"{name:<14}{m['mse_frame']:>10.2f}{m['mae_frame']:>11.2f}{m['ssim']:>8.4f}{m['psnr']:>8.2f}"
        )
    lead = rows["model"]["per_lead"]["mse_frame"]
    print("model MSE/frame by lead time: " + " ".join(f"{v:.1f}" for v in lead))
