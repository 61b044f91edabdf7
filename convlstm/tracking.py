"""Experiment tracking: Weights & Biases when it is wanted, and always a local JSONL log.

Modes: "online" (needs an API key), "offline" (files under `<run_dir>/wandb/`, syncable later
with `wandb sync`), "disabled", and "auto" = online when WANDB_API_KEY is set, else offline.
The JSONL file `<run_dir>/log.jsonl` is written in every mode; it is what tests and scripts read,
because an offline W&B run keeps its history in a binary log.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from convlstm.errors import ConfigError

MODES = ("auto", "online", "offline", "disabled")


def resolve_mode(mode: str) -> str:
    if mode not in MODES:
        raise ConfigError(f"unknown W&B mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return mode


class Tracker:
    """Logs scalars, media and a summary. Construct on rank 0 only."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        mode: str = "auto",
        project: str = "convlstm",
        name: str | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.mode = resolve_mode(mode)
        self._jsonl = open(self.run_dir / "log.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        self._run = None
        if self.mode != "disabled":
            import wandb  # imported here: only runs that track need it

            self._wandb = wandb
            self._run = wandb.init(
                project=project,
                name=name,
                dir=str(self.run_dir),
                mode=self.mode,
                config=config or {},
                settings=wandb.Settings(console="off", quiet=True, x_disable_stats=True),
            )

    @property
    def wandb_dir(self) -> Path | None:
        """The W&B run folder (offline: `<run_dir>/wandb/offline-run-*`), or None."""
        return Path(self._run.dir).parent if self._run is not None else None

    def log(self, metrics: dict[str, float], step: int) -> None:
        clean = {k: (float(v) if math.isfinite(float(v)) else None) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self._jsonl.flush()
        if self._run is not None:
            self._run.log(dict(metrics), step=step)

    def log_media(self, key: str, path: str | os.PathLike, step: int, caption: str = "") -> None:
        """Log an image or GIF file (W&B keeps GIFs animated)."""
        self._jsonl.write(json.dumps({"step": step, key: str(path)}) + "\n")
        self._jsonl.flush()
        if self._run is not None:
            self._run.log({key: self._wandb.Image(str(path), caption=caption)}, step=step)

    def log_lines(
        self,
        key: str,
        xs: list[float],
        series: dict[str, list[float]],
        step: int,
        *,
        title: str = "",
        xname: str = "x",
    ) -> None:
        """Log a chart of several named lines over the same x values (e.g. CSI by lead time)."""
        self._jsonl.write(
            json.dumps({"step": step, key: {"x": list(xs), **_finite_lists(series)}}) + "\n"
        )
        self._jsonl.flush()
        if self._run is not None:
            chart = self._wandb.plot.line_series(
                xs=list(xs),
                ys=[list(v) for v in series.values()],
                keys=list(series),
                title=title or key,
                xname=xname,
            )
            self._run.log({key: chart}, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        if self._run is not None:
            for key, value in values.items():
                self._run.summary[key] = value

    def finish(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None
        if not self._jsonl.closed:
            self._jsonl.close()


def _finite_lists(series: dict[str, list[float]]) -> dict[str, list[float | None]]:
    return {
        k: [float(v) if math.isfinite(float(v)) else None for v in vs] for k, vs in series.items()
    }
