"""Self-describing, atomic checkpoints.

A checkpoint holds everything needed to rebuild the model alone (its config and the unwrapped
weights) and to resume training exactly (run config, optimizer, scaler, scheduler, step, RNG
states, metrics). It is written to a temporary file in the same folder and renamed, so a crash
never leaves half a file under the real name.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from convlstm.config import ModelConfig, build, to_dict
from convlstm.errors import CheckpointError
from convlstm.models import build_model

FORMAT = "convlstm-checkpoint/1"


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def rng_states() -> dict[str, Any]:
    state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [state[0], torch.from_numpy(state[1].copy()), *state[2:]],
    }


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    random.setstate(_tuples(states["python"]))
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))


def _tuples(value: Any) -> Any:
    # python's random state is nested tuples; a round trip may hand back lists
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def save_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    model_config: ModelConfig,
    step: int,
    train_config: Any = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    metrics: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically; returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "model_config": to_dict(model_config),
        "model": unwrap(model).state_dict(),
        "train_config": to_dict(train_config) if train_config is not None else None,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "step": step,
        "rng": rng_states(),
        "metrics": metrics or {},
        "extra": extra or {},
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint; a missing, truncated or foreign file is a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for a damaged zip; all mean one thing
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"cannot read checkpoint {path} (truncated or corrupt?): {first}"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a convlstm checkpoint (format {FORMAT})")
    return payload


def model_from_checkpoint(
    path_or_payload: str | os.PathLike | dict[str, Any], map_location: Any = "cpu"
) -> tuple[nn.Module, ModelConfig]:
    """Rebuild the model from the checkpoint alone, weights loaded, in eval mode."""
    payload = (
        path_or_payload
        if isinstance(path_or_payload, dict)
        else load_checkpoint(path_or_payload, map_location)
    )
    config = build(ModelConfig, payload["model_config"])
    model = build_model(config)
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint weights do not match its model config: {err}") from None
    return model.eval(), config
