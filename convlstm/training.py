"""The one training loop, top to bottom: data -> forward (autocast) -> loss -> backward ->
clip -> step -> log -> evaluate -> checkpoint. Every feature is a TrainConfig field on this path.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from convlstm import winograd
from convlstm.checkpoint import load_checkpoint, save_checkpoint, set_rng_states
from convlstm.config import ModelConfig, TrainConfig, build, to_dict
from convlstm.errors import ConfigError
from convlstm.evaluation import autocast, evaluate
from convlstm.losses import get_loss
from convlstm.memory import LiveTensors
from convlstm.models import MODELS, build_model, count_parameters
from convlstm.speed import GraphedStep, SpeedOptions, apply_speed, cpu_bf16_units
from convlstm.tracking import Tracker
from convlstm.visualize import save_gif

BatchSource = Callable[[int], Tensor]  # step -> (B, T, C, H, W) (CPU or device), fixed per step


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but CUDA is not available here")
    return device


def resolve_precision(
    precision: str, device: torch.device, path: str = "eager"
) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None for fp32, whether to use a gradient scaler). "auto" is bf16 on
    a CUDA device that supports it; on the CPU, bf16 for the fast path where the CPU has
    AMX-BF16 matrix units (convlstm.speed.cpu_bf16_units), else fp32 (the eager path stays
    the float32 reference there)."""
    if precision == "auto":
        device = torch.device(device)
        if device.type == "cuda":
            fast_bf16 = torch.cuda.is_bf16_supported()
        else:
            fast_bf16 = path == "fast" and device.type == "cpu" and cpu_bf16_units()
        precision = "bf16" if fast_bf16 else "fp32"
    return {
        "fp32": (None, False),
        "bf16": (torch.bfloat16, False),
        "fp16": (torch.float16, True),
    }[precision]


def precision_name(amp_dtype: torch.dtype | None) -> str:
    """The precision flag's name for an autocast dtype (None: fp32)."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype]


def check_resume_precision(
    payload: dict[str, Any], cfg: TrainConfig, device: torch.device, name: Any
) -> None:
    """Refuse to resume checkpoint `payload` (from `name`) where precision="auto" now resolves
    to another precision than the run trained in (recorded in its extra["precision_used"]
    since the CPU fast path's bf16): e.g. a bf16 run on a CPU with AMX-BF16 units or a GPU,
    resumed on a CPU without them. An explicit precision goes on as asked."""
    used = payload["extra"].get("precision_used")
    now = precision_name(resolve_precision(cfg.precision, device, cfg.path)[0])
    if cfg.precision == "auto" and used is not None and used != now:
        raise ConfigError(
            f"{name} trained in {used}, and precision=auto means {now} here: pass "
            f"--precision {used} to go on as it ran, or --precision {now} to switch"
        )


def make_optimizer(
    model: nn.Module, cfg: TrainConfig, fused: bool = False
) -> torch.optim.Optimizer:
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    extra = {"fused": True} if fused else {}
    return cls(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, **extra)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, start_step: int = 0):
    """The learning-rate schedule over cfg.steps, placed at `start_step` (resuming a run
    whose length changed; the optimizer must then hold the schedule's initial_lr)."""
    last = start_step - 1  # torch's "last_epoch": -1 means a fresh schedule
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=cfg.lr,
            total_steps=cfg.steps,
            pct_start=cfg.pct_start,
            last_epoch=last,
        )
    warmup = cfg.warmup_steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, cfg.steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=last)


# A time-budgeted run times these steps (after compilation and graph capture) to size itself.
CALIBRATION = (5, 25)


def teacher_probability(cfg: TrainConfig, step: int) -> float:
    """Chance that a forecast step is fed the true previous frame (scheduled sampling)."""
    if cfg.scheduled_sampling == "none" or cfg.ss_decay_steps == 0:
        return 0.0
    return max(0.0, cfg.ss_start * (1.0 - step / cfg.ss_decay_steps))


def teacher_mask(cfg: TrainConfig, step: int, batch: int, device: torch.device) -> Tensor | None:
    """(B, horizon - 1) bool, drawn from a generator seeded by (seed, step): exact on resume."""
    p = teacher_probability(cfg, step)
    if p == 0.0 or cfg.horizon < 2:
        return None
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    mask = torch.rand(batch, cfg.horizon - 1, generator=gen) < p
    if device.type == "cuda":  # pinned: the copy does not wait for the GPU
        return mask.pin_memory().to(device, non_blocking=True)
    return mask.to(device)


def fit_to_budget(cfg: TrainConfig, total_steps: int) -> TrainConfig:
    """cfg resized to `total_steps`; the scheduled-sampling decay and the warm-up keep their
    share of the run (a share that was not zero stays at least one step)."""

    def share(steps: int) -> int:
        return max(1, round(steps * total_steps / cfg.steps)) if steps else 0

    return dataclasses.replace(
        cfg,
        steps=total_steps,
        ss_decay_steps=share(cfg.ss_decay_steps),
        warmup_steps=share(cfg.warmup_steps),
    )


def check_compatible(model_config: ModelConfig, cfg: TrainConfig) -> None:
    """Raise ConfigError for training options the chosen model cannot honour (before any work)."""
    model_cls = MODELS[model_config.architecture]
    if cfg.scheduled_sampling != "none" and not model_cls.feeds_back:
        raise ConfigError(
            f"scheduled_sampling={cfg.scheduled_sampling} needs a model fed its own predictions "
            f"(architecture=stacked); {model_config.architecture} is not: "
            "use scheduled_sampling=none"
        )
    if cfg.loss_on_context and not hasattr(model_cls, "encode_with_predictions"):
        raise ConfigError(
            f"loss_on_context needs a model that predicts while reading the context "
            f"(architecture=stacked); {model_config.architecture} does not"
        )
    if cfg.loss == "bce" and model_config.output_activation != "sigmoid":
        raise ConfigError("loss=bce needs output_activation=sigmoid (predictions in [0, 1])")
    if cfg.path == "fast" and cfg.precision == "fp16" and resolve_device(cfg.device).type == "cuda":
        raise ConfigError(
            "path=fast replays CUDA graphs, which the fp16 gradient scaler "
            "cannot run in: use precision=bf16 or fp32"
        )


class TrainStep:
    """One optimizer step on a batch: forward (autocast) -> loss -> backward -> clip -> step.
    With speed.cuda_graph the forward and backward are one CUDA graph, captured at the first
    call and replayed after (the batch shape must then stay the same)."""

    def __init__(
        self,
        model: nn.Module,
        cfg: TrainConfig,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        speed: SpeedOptions,
        device: torch.device,
        amp_dtype: torch.dtype | None,
        feeds_back: bool,
    ) -> None:
        self.model, self.cfg, self.optimizer, self.scaler = model, cfg, optimizer, scaler
        self.speed, self.device, self.amp_dtype = speed, device, amp_dtype
        self.feeds_back = feeds_back
        self.loss_fn = get_loss(cfg.loss)
        self.graphed: GraphedStep | None = None
        self.no_teacher: Tensor | None = None  # the all-False mask the graph reads, made once
        # autocast keeps its casts of the weights for the step, except in a graph's capture,
        # where each use casts again (experiments.memory_traffic sets it to trace that)
        self.autocast_cache = not speed.cuda_graph

    def forward_loss(self, batch: Tensor, mask: Tensor | None) -> Tensor:
        """The training loss of one batch (B, T, C, H, W) under the teacher mask."""
        cfg, model = self.cfg, self.model
        frames_needed = cfg.context_frames + cfg.horizon
        context = batch[:, : cfg.context_frames]  # (B, Tc, C, H, W)
        target = batch[:, cfg.context_frames : frames_needed]  # (B, horizon, C, H, W)
        # shared_transforms: the CPU fast path transforms each Winograd filter once per step
        with (
            autocast(self.device, self.amp_dtype, cache=self.autocast_cache),
            winograd.shared_transforms(),
        ):
            if cfg.loss_on_context:
                state, seen = model.encode_with_predictions(context)  # seen[:, t] ~ frame t+1
                preds = model.forecast(state, cfg.horizon, targets=target, teacher_mask=mask)
                preds = torch.cat([seen[:, :-1], preds], dim=1)  # frames 1 .. Tc+horizon-1
            else:
                preds = model(context, cfg.horizon, targets=target, teacher_mask=mask)
        truth = batch[:, frames_needed - preds.shape[1] : frames_needed]
        return self.loss_fn(preds.float(), truth)  # outside autocast: losses run in fp32

    def __call__(self, batch: Tensor, mask: Tensor | None) -> Tensor:
        """Train on `batch` (on the device); returns the loss, still on the device."""
        if self.speed.cuda_graph:
            if not self.feeds_back:
                mask = None
            elif mask is None:  # the graph always reads a mask: all False here
                if self.no_teacher is None:
                    shape = (batch.shape[0], self.cfg.horizon - 1)
                    self.no_teacher = torch.zeros(shape, dtype=torch.bool, device=batch.device)
                mask = self.no_teacher
            if self.graphed is None:
                self.graphed = GraphedStep(self.forward_loss, self.model, batch, mask)
            loss = self.graphed(batch, mask)  # writes every .grad: no zero_grad here
        else:
            loss = self.forward_loss(batch, mask)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
        if self.cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss

    def with_peak_memory(self, batch: Tensor, mask: Tensor | None) -> tuple[Tensor, int]:
        """(loss, peak bytes) of one step, where no allocator counts a peak (the CPU): the
        bytes of tensors live at once (convlstm.memory.LiveTensors), counting the parameters,
        their gradients, the optimizer's state and the batch (where they exist yet: a run's
        first step has no gradients and no optimizer state before its end)."""
        params = list(self.model.parameters())
        with LiveTensors() as live:
            live.keep(params, list(self.model.buffers()), [p.grad for p in params], batch, mask)
            live.keep(list(self.optimizer.state.values()))
            loss = self(batch, mask)
        return loss, live.peak_bytes


def train(
    model_config: ModelConfig,
    cfg: TrainConfig,
    *,
    train_batches: BatchSource,
    eval_sequences: Tensor,
    out_dir: str | Path,
    tracker: Tracker | None = None,
    resume: str | Path | None = None,
    extra_config: dict[str, Any] | None = None,
    speed: SpeedOptions | None = None,
) -> dict[str, Any]:
    """Train a model from `model_config`; returns the model, final metrics and timings.

    `speed` overrides the execution options that cfg.path chooses (the benchmark's ablations).

    Writes `<out_dir>/checkpoint.pt` (every `checkpoint_every` steps and at the end) and
    `<out_dir>/forecast.gif` (context | truth | forecast on the first evaluation sequences).
    """
    out_dir = Path(out_dir)
    device = resolve_device(cfg.device)
    amp_dtype, use_scaler = resolve_precision(cfg.precision, device, cfg.path)
    check_compatible(model_config, cfg)
    if speed is None:
        speed = SpeedOptions.for_path(cfg.path, device, cfg.activation_checkpointing, amp_dtype)
    speed.check(device)
    if speed.cuda_graph and use_scaler:
        raise ConfigError("cuda_graph cannot run the fp16 gradient scaler: use bf16 or fp32")
    if cfg.time_budget and resume is not None:
        raise ConfigError(
            "time_budget sizes a fresh run; to resume, pass time_budget=0 "
            "(--time-budget 0) and the steps to reach"
        )
    if cfg.time_budget and cfg.steps <= CALIBRATION[1]:
        raise ConfigError(
            f"time_budget times the first {CALIBRATION[1]} steps before it sizes the run: "
            f"steps (the nominal length its shares refer to) must be larger, got {cfg.steps}"
        )
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # static shapes: let cuDNN time its algorithms
    torch.manual_seed(cfg.seed)
    model = apply_speed(build_model(model_config).to(device), speed)
    optimizer = make_optimizer(model, cfg, fused=speed.fused_optimizer)
    scheduler = make_scheduler(optimizer, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)

    start_step = 0
    if resume is not None:
        payload = load_checkpoint(resume, map_location=device)
        if build(ModelConfig, payload["model_config"]) != model_config:
            raise ConfigError(f"{resume} was trained with another model config; cannot resume")
        start_step = payload["step"]
        check_resume_precision(payload, cfg, device, resume)
        if start_step >= cfg.steps:
            raise ConfigError(
                f"{resume} is already at step {start_step}; pass steps larger than that to go on"
            )
        model.load_state_dict(payload["model"])
        saved = payload["optimizer"]
        for group in saved["param_groups"]:  # this run's kernel, not the saved run's: set
            group["fused"] = speed.fused_optimizer or None  # before loading, which places
        optimizer.load_state_dict(saved)  # the step counts for the kernel it finds there
        for state in optimizer.state.values():  # the for-each kernel counts on the host: a
            step = state.get("step")  # fused CUDA run's device counts would sync each step
            if not speed.fused_optimizer and isinstance(step, Tensor) and step.device.type != "cpu":
                state["step"] = step.to("cpu", torch.float32)
        before = payload["train_config"] or {}
        if (before.get("steps"), before.get("schedule")) == (cfg.steps, cfg.schedule):
            scheduler.load_state_dict(payload["scheduler"])
        else:  # a longer (or shorter) run: follow the new schedule from the step reached
            scheduler = make_scheduler(optimizer, cfg, start_step)
        scaler.load_state_dict(payload["scaler"])
        set_rng_states(payload["rng"])

    def checkpoint(step: int, metrics: dict[str, Any] | None = None) -> Path:
        return save_checkpoint(
            out_dir / "checkpoint.pt",
            model=model,
            model_config=model_config,
            train_config=cfg,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            step=step,
            metrics=metrics,
            extra={**(extra_config or {}), "precision_used": precision_name(amp_dtype)},
        )

    def run_eval(step: int) -> dict[str, Any]:
        model.eval()
        metrics = evaluate(
            model,
            eval_sequences,
            context_frames=cfg.context_frames,
            horizon=cfg.horizon,
            batch_size=cfg.eval_batch_size,
            device=device,
            autocast_dtype=amp_dtype,
        )
        model.train()
        if tracker is not None:
            scalars = {f"val/{k}": metrics[k] for k in ("mse_frame", "mae_frame", "ssim", "psnr")}
            for name in ("mse_frame", "ssim"):
                for lead, value in enumerate(metrics["per_lead"][name], start=1):
                    scalars[f"val_lead/{name}_t{lead:02d}"] = value
            tracker.log(scalars, step=step)
        return metrics

    frames_needed = cfg.context_frames + cfg.horizon
    feeds_back = MODELS[model_config.architecture].feeds_back
    if device.type == "cuda":  # the peak of the training loop (its evaluations included)
        torch.cuda.reset_peak_memory_stats(device)

    train_step = TrainStep(model, cfg, optimizer, scaler, speed, device, amp_dtype, feeds_back)
    progress = tqdm(
        total=cfg.steps, initial=start_step, desc="train", disable=None, file=sys.stderr
    )
    quiet_bar = progress.disable  # no terminal: print a line per log interval instead
    model.train()
    window_loss = torch.zeros((), device=device)
    window_start, window_steps = time.perf_counter(), 0
    train_start = time.perf_counter()
    paused_total = 0.0  # seconds spent evaluating and saving, not training
    # time_budget: time steps [CALIBRATION[0], CALIBRATION[1]) once warm, then size the run.
    calibrate = CALIBRATION if cfg.time_budget else None
    calibration_start = paused_at_start = 0.0
    # this run's first CALIBRATION[0] steps (compilation, cuDNN's choices, graph capture)
    warmup_seconds: float | None = None
    losses: list[tuple[int, float]] = []  # (step, mean loss over the log window)
    throughput: list[tuple[int, float]] = []  # (step, training sequences/s over the window)
    metrics: dict[str, Any] = {}
    # the CPU's peak memory: one step's live tensors, the second (the first has no gradients
    # and no optimizer state yet), or the only one
    peak_bytes, measured_step = 0, min(start_step + 1, cfg.steps - 1)
    step = start_step
    while step < cfg.steps:
        batch = train_batches(step)  # (B, T, C, H, W)
        if batch.shape[1] < frames_needed:
            raise ConfigError(
                f"training sequences have {batch.shape[1]} frames; need {frames_needed}"
            )
        batch = batch.to(device, non_blocking=True)
        mask = teacher_mask(cfg, step, batch.shape[0], device)
        if step == measured_step and device.type != "cuda":  # CUDA's allocator keeps a peak
            loss, peak_bytes = train_step.with_peak_memory(batch, mask)
        else:
            loss = train_step(batch, mask)
        lr = optimizer.param_groups[0]["lr"]  # the rate this step used (a float: no sync)
        scheduler.step()

        window_loss += loss.detach()  # stays on the device: no host sync per step
        window_steps += 1
        progress.update(1)
        step = done = step + 1
        warmed = warmup_seconds is None and done in (start_step + CALIBRATION[0], cfg.steps)
        timing = calibrate is not None and done in calibrate
        if warmed or timing:  # at steps 5 and 25 only: one clock reading for both
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # the clock must see the GPU
            now = time.perf_counter()
        if warmed:
            warmup_seconds = now - train_start - paused_total
        if timing:
            if done == calibrate[0]:
                calibration_start, paused_at_start = now, paused_total
            else:
                timed = now - calibration_start - (paused_total - paused_at_start)
                per_step = timed / (calibrate[1] - calibrate[0])
                left = cfg.time_budget - (now - train_start - paused_total)
                cfg = fit_to_budget(cfg, done + max(0, int(left / per_step)))
                scheduler = make_scheduler(optimizer, cfg, done)
                progress.total = cfg.steps
        if done % cfg.log_every == 0 or done == cfg.steps:
            mean_loss = (window_loss / window_steps).item()
            elapsed = time.perf_counter() - window_start
            if not math.isfinite(mean_loss):
                raise FloatingPointError(f"training loss became {mean_loss} at step {done}")
            losses.append((done, mean_loss))
            throughput.append((done, window_steps * cfg.batch_size / elapsed))
            stats = {
                "train/loss": mean_loss,
                "train/lr": lr,
                "train/teacher_prob": teacher_probability(cfg, done - 1),
                "train/seq_per_s": throughput[-1][1],
            }
            progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{stats['train/lr']:.2e}")
            if quiet_bar:
                print(
                    f"step {done}/{cfg.steps} loss {mean_loss:.5f} lr {stats['train/lr']:.2e} "
                    f"{stats['train/seq_per_s']:.1f} seq/s",
                    flush=True,
                )
            if tracker is not None:
                tracker.log(stats, step=done)
            window_loss.zero_()
            window_start, window_steps = time.perf_counter(), 0
            spent = time.perf_counter() - train_start - paused_total
            if cfg.time_budget and spent > cfg.time_budget and done < cfg.steps:
                cfg = dataclasses.replace(cfg, steps=done)  # the estimate ran over: stop here
        paused = time.perf_counter()  # evaluation and saving are not counted as training speed
        if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.steps:
            metrics = run_eval(done)
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done != cfg.steps:
            checkpoint(done, metrics)
        paused = time.perf_counter() - paused
        window_start += paused
        paused_total += paused
    progress.close()
    train_seconds = time.perf_counter() - train_start
    steps_run = cfg.steps - start_step
    if device.type == "cuda":
        peak_bytes = torch.cuda.max_memory_allocated(device)

    metrics = run_eval(cfg.steps)
    ckpt_path = checkpoint(cfg.steps, metrics)
    gif_path = _forecast_gif(
        model, eval_sequences, cfg, device, amp_dtype, out_dir / "forecast.gif"
    )
    if tracker is not None:
        tracker.log_media(
            "val/forecast", gif_path, step=cfg.steps, caption="context | truth | forecast"
        )
    return {
        "model": model,
        "metrics": metrics,
        "losses": losses,
        "throughput": throughput,
        "checkpoint": ckpt_path,
        "gif": gif_path,
        "device": str(device),
        "precision": "fp32" if amp_dtype is None else str(amp_dtype).removeprefix("torch."),
        "speed": speed.describe(),
        "parameters": count_parameters(model),
        "train_seconds": train_seconds,
        "train_seq_per_s": steps_run * cfg.batch_size / train_seconds if steps_run else 0.0,
        # the first 5 steps of this run, pauses excluded: what compiling and capturing cost
        "warmup_seconds": warmup_seconds,
        # CUDA: the allocator's peak over the loop; CPU: the second step's live tensors
        "peak_memory_gib": peak_bytes / 2**30,
        "config": {"model": to_dict(model_config), "train": to_dict(cfg)},
    }


@torch.no_grad()
def _forecast_gif(model, sequences, cfg, device, amp_dtype, path: Path, count: int = 4) -> Path:
    model.eval()
    batch = sequences[:count].to(device)
    context = batch[:, : cfg.context_frames]
    truth = batch[:, cfg.context_frames : cfg.context_frames + cfg.horizon]
    with autocast(device, amp_dtype):
        forecast = model(context, cfg.horizon)
    model.train()
    return save_gif(path, context.float().cpu(), truth.float().cpu(), forecast.float().cpu())
