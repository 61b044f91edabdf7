"""Speed of ConvLSTM training and inference, the eager reference against the fast path.

    python -m experiments.benchmark                          # ConvLSTM-S at batch 16 and 64
    python -m experiments.benchmark --device cpu --preset mmnist-cpu-small --batch-sizes 16

Measures, in order: the matrix-product ceiling of the device (bf16 on CUDA and on a CPU
with AMX-BF16 units, else fp32); the FLOPs of one training sequence (torch's FLOP counter,
forward and backward); the training rate of each path at each batch size, with TFLOP/s,
share of the ceiling, peak memory (CUDA's allocator peak; on the CPU, one step's peak of live
tensors, convlstm.memory) and warm-up time (compilation and graph capture); after the first
batch size's, the latency of one streaming step at batch 1 and the forecast rate (the
inference variants timed in turn; before the other batch sizes, so that a run cut short keeps
them); and the Moving MNIST generator's rate.
Training follows OpenSTL's semantics once scheduled sampling has ended: the loss covers all
19 predicted frames and every forecast step is fed the model's own previous prediction. One
table last; --out also writes the numbers as JSON.

TFLOP/s are model FLOPs: the eager path's count times the rate, for every path (the fast
path skips one zero-state convolution per layer; checkpointing recomputes the forward).
Warm-up is that variant's first 5 steps; compiled kernels and cuDNN's algorithm choices are
shared within the process, so a variant run after another pays less of it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from convlstm import native
from convlstm.cli import ArgumentParser, run_main
from convlstm.compiled import CompiledForecast
from convlstm.config import PRESETS, ModelConfig, TrainConfig, build, from_name
from convlstm.errors import ConfigError
from convlstm.evaluation import autocast
from convlstm.forecasting import GraphedForecast
from convlstm.models import MODELS, build_model
from convlstm.speed import (
    SpeedOptions,
    StreamingPredictor,
    apply_speed,
    compile_pays,
    cpu_bf16_units,
)
from convlstm.training import (
    TrainStep,
    make_optimizer,
    precision_name,
    resolve_device,
    resolve_precision,
)
from datasets.mnist import load_mnist
from datasets.moving_mnist import DeviceMovingMNIST, MovingMNISTSpec, generate_batch

Options = Callable[[torch.device, "torch.dtype | None"], SpeedOptions]


def _fast(**changes: bool) -> Options:
    """The fast path's options on a device under an autocast dtype, with `changes`."""

    def options(device: torch.device, amp_dtype: torch.dtype | None) -> SpeedOptions:
        fast = SpeedOptions.for_path("fast", device, amp_dtype=amp_dtype)
        return dataclasses.replace(fast, **changes)

    return options


# name -> (precision, options on a device under an autocast dtype); "fast" is what
# TrainConfig.path="fast" runs there, and "auto" precision is what it resolves to for the
# fast path (bf16 on CUDA and on a CPU with AMX-BF16 units, else fp32).
VARIANTS: dict[str, tuple[str, Options]] = {
    "eager-fp32": ("fp32", lambda device, amp: SpeedOptions()),
    "eager-bf16": ("bf16", lambda device, amp: SpeedOptions()),
    "fast": ("auto", _fast()),
    "fast-fp32": ("fp32", _fast()),
    "fast-no-graph": ("bf16", _fast(cuda_graph=False)),
    "fast-no-fused-gates": ("bf16", _fast(fused_gates=False, low_precision_h=False)),
    "fast-no-low-precision-h": ("auto", _fast(low_precision_h=False)),
    "fast-no-channels-last": ("auto", _fast(channels_last=False)),
    "fast-no-batched-wgrad": ("auto", _fast(batched_wgrad=False)),
    "fast-no-hoist": ("auto", _fast(hoist=False)),
    "fast-checkpointing": ("auto", _fast(checkpointing=True, batched_wgrad=False)),
    "fast-with-channels-last": ("auto", _fast(channels_last=True)),
    "fast-with-fused-gates": ("auto", _fast(fused_gates=True, native_gates=False)),
    "fast-with-batched-wgrad": ("auto", _fast(batched_wgrad=True, winograd=False)),
    "fast-no-hoist-batched-wgrad": (
        "auto",
        _fast(hoist=False, batched_wgrad=True, winograd=False),
    ),
    # each recurrent convolution's input gradient as a forward convolution (for CUDA; on the
    # CPU without Winograd and packs, which it replaces)
    "fast-with-forward-dgrad": ("auto", _fast(forward_dgrad=True, winograd=False, packed=False)),
    "fast-with-batched-wgrad-forward-dgrad": (
        "auto",
        _fast(batched_wgrad=True, forward_dgrad=True, winograd=False, packed=False),
    ),
    "fast-no-native-gates": ("auto", _fast(native_gates=False, low_precision_h=False)),
    "fast-no-packed": ("auto", _fast(packed=False)),  # inference: F.conv2d at every step
    "fast-no-fused-optimizer": ("auto", _fast(fused_optimizer=False)),
    # inference uncompiled where "fast" / "fast-fp32" compile the streamed step and the
    # forecast (StreamingPredictor.fast's rule, compile_pays: the CPU); their training is
    # "fast" / "fast-fp32"'s
    "fast-no-compile": ("auto", _fast()),
    "fast-fp32-no-compile": ("fp32", _fast()),
    # the float32 CPU path's parts (Winograd and the C gate update run in float32)
    "fast-fp32-no-winograd": ("fp32", _fast(winograd=False)),
    "fast-fp32-no-native-gates": ("fp32", _fast(native_gates=False, low_precision_h=False)),
}
DEFAULT_VARIANTS = {
    "cuda": [
        "eager-fp32",
        "eager-bf16",
        "fast",
        "fast-no-low-precision-h",
        "fast-no-graph",
        "fast-no-fused-gates",
        "fast-no-hoist",
        "fast-with-batched-wgrad",
        "fast-no-hoist-batched-wgrad",
        "fast-with-forward-dgrad",
        "fast-with-batched-wgrad-forward-dgrad",
        "fast-checkpointing",
    ],
    "cpu": [
        "eager-fp32",
        "fast",
        "fast-fp32-no-native-gates",
        "fast-fp32-no-winograd",
        "fast-no-fused-optimizer",
        "fast-checkpointing",
    ],
    # a CPU with AMX-BF16 units, where "fast" runs in bf16
    "cpu-bf16": [
        "eager-fp32",
        "eager-bf16",
        "fast",
        "fast-no-batched-wgrad",
        "fast-no-packed",
        "fast-no-fused-optimizer",
        "fast-fp32",
        "fast-checkpointing",
    ],
}
# the variants whose inference is timed by default, where they are among those trained (on
# the CPU the uncompiled ones beside "fast" and "fast-fp32", on CUDA "fast-no-graph" beside
# "fast")
INFERENCE_VARIANTS = ("eager-fp32", "eager-bf16", "fast", "fast-no-packed", "fast-fp32")
UNCOMPILED = {"fast": "fast-no-compile", "fast-fp32": "fast-fp32-no-compile"}
# the variants whose streamed step and forecast are compiled where compile_pays (convlstm
# .compiled: StreamingPredictor(compile=True), CompiledForecast)
COMPILED = set(UNCOMPILED)


def default_variants(device: torch.device) -> list[str]:
    if device.type == "cuda":
        return DEFAULT_VARIANTS["cuda"]
    return DEFAULT_VARIANTS["cpu-bf16" if cpu_bf16_units() else "cpu"]


def default_inference_variants(trained: list[str], device: torch.device) -> list[str]:
    """Those of INFERENCE_VARIANTS among the `trained` variants, each followed by its twin:
    on the CPU "fast" and "fast-fp32" uncompiled, on CUDA "fast" without its graphs."""
    twins = UNCOMPILED if device.type == "cpu" else {"fast": "fast-no-graph"}
    return [w for v in INFERENCE_VARIANTS if v in trained for w in (v, twins.get(v)) if w]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_ceiling(device: torch.device) -> tuple[float, str]:
    """Measured TFLOP/s of a large matrix product: bf16 8192^3 on CUDA; 2048^3 on the CPU,
    in bf16 where it has AMX-BF16 units, else in fp32."""
    if device.type == "cuda":
        n, dtype = 8192, torch.bfloat16
    else:
        n, dtype = 2048, torch.bfloat16 if cpu_bf16_units() else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)  # random data, never zeros
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps = 10 if device.type == "cuda" else 3
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    seconds = (time.perf_counter() - start) / reps
    return 2 * n**3 / seconds / 1e12, f"{str(dtype).removeprefix('torch.')} {n}^3"


def resolve_variant(name: str, device: torch.device) -> tuple[str, SpeedOptions]:
    precision, options = VARIANTS[name]
    amp_dtype, _ = resolve_precision(precision, device, path="fast")
    return precision_name(amp_dtype), options(device, amp_dtype)


def train_config(
    batch: int, precision: str, device: torch.device, model_cfg: ModelConfig
) -> TrainConfig:
    """The benchmark's training step: all 19 predicted frames in the loss where the model
    predicts while reading the context (OpenSTL's ConvLSTM), else the forecast's 10."""
    on_context = hasattr(MODELS[model_cfg.architecture], "encode_with_predictions")
    return build(
        TrainConfig,
        dict(
            batch_size=batch,
            precision=precision,
            device=str(device),
            loss_on_context=on_context,
            scheduled_sampling="none",
            wandb="disabled",
        ),
    )


def flops_per_sequence(preset: str, device: torch.device) -> float:
    """FLOPs of one training sequence (forward and backward, eager fp32, batch 1)."""
    from torch.utils.flop_counter import FlopCounterMode

    model_cfg = from_name(preset)
    cfg = train_config(1, "fp32", device, model_cfg)
    model = build_model(model_cfg).to(device)
    step = _train_step(model, model_cfg, cfg, SpeedOptions(), device)
    frames = torch.rand(1, cfg.context_frames + cfg.horizon, 1, 64, 64, device=device)
    counter = FlopCounterMode(display=False)
    with counter:
        step.forward_loss(frames, None).backward()
    return float(counter.get_total_flops())


def _train_step(model, model_cfg, cfg, options, device) -> TrainStep:
    amp_dtype, _ = resolve_precision(cfg.precision, device)
    optimizer = make_optimizer(model, cfg, fused=options.fused_optimizer)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    feeds_back = MODELS[model_cfg.architecture].feeds_back
    return TrainStep(model, cfg, optimizer, scaler, options, device, amp_dtype, feeds_back)


def tensor_peak_gib(step: TrainStep, batch: torch.Tensor) -> float:
    """Peak tensor memory of one training step where no allocator counts it (the CPU)."""
    return step.with_peak_memory(batch, None)[1] / 2**30


def time_training(
    preset: str,
    batch: int,
    precision: str,
    options: SpeedOptions,
    device: torch.device,
    batches: list[torch.Tensor],
    seconds: float,
) -> dict[str, Any]:
    """Training sequences/s in steady state, after warm-up (compilation, graph capture)."""
    torch.manual_seed(0)
    model_cfg = from_name(preset)
    cfg = train_config(batch, precision, device, model_cfg)
    model = apply_speed(build_model(model_cfg).to(device), options)
    step = _train_step(model, model_cfg, cfg, options, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for i in range(5):
        loss = step(batches[i % len(batches)], None)
    sync(device)
    warmup = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(3):
        step(batches[i % len(batches)], None)
    sync(device)
    estimate = (time.perf_counter() - start) / 3
    count = max(3, int(seconds / estimate))
    start = time.perf_counter()
    for i in range(count):
        loss = step(batches[i % len(batches)], None)
    sync(device)
    elapsed = time.perf_counter() - start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        peak = tensor_peak_gib(step, batches[0])
    return {
        "train_seq_per_s": count * batch / elapsed,
        "steps_timed": count,
        "warmup_s": warmup,
        "peak_memory_gib": peak,
        "final_loss": float(loss.detach()),
    }


def time_training_interleaved(
    preset: str,
    batch: int,
    variants: list[tuple[str, SpeedOptions]],
    device: torch.device,
    batches: list[torch.Tensor],
    seconds: float,
) -> list[dict[str, Any]]:
    """Training rates of several variants (precision, options) timed step by step in turn,
    the order reversed every round, each from the median of its steps: on a machine whose
    speed drifts (a shared VM), the ratios stay fair where back-to-back runs would not."""
    steps, warmups = [], []
    for precision, options in variants:
        torch.manual_seed(0)
        model_cfg = from_name(preset)
        model = apply_speed(build_model(model_cfg).to(device), options)
        steps.append(
            _train_step(
                model, model_cfg, train_config(batch, precision, device, model_cfg), options, device
            )
        )
        start = time.perf_counter()
        for i in range(5):
            steps[-1](batches[i % len(batches)], None)
        sync(device)
        warmups.append(time.perf_counter() - start)
    tasks = [lambda r, step=step: step(batches[r % len(batches)], None) for step in steps]
    times = _interleaved(tasks, seconds, device, min_rounds=5)
    # several models live at once, so CUDA's allocator peak is no one variant's; on the CPU
    # each variant's step is measured from its own tensors
    cpu = device.type != "cuda"
    return [
        {
            "train_seq_per_s": batch / statistics.median(t),
            "steps_timed": len(t),
            "warmup_s": w,
            "peak_memory_gib": tensor_peak_gib(step, batches[0]) if cpu else None,
            "final_loss": None,
        }
        for t, w, step in zip(times, warmups, steps, strict=True)
    ]


def time_inference(
    preset: str,
    variants: list[tuple[str, SpeedOptions]],
    device: torch.device,
    seconds: float,
    batch: int,
    compiles: list[bool] | None = None,
) -> list[dict[str, Any]]:
    """Streaming latency (one frame in, the next out, batch 1) and forecast rate (`batch`
    sequences: 10 context frames in, 10 frames out) of several variants (precision, options),
    timed in turn (the order reversed every round; medians), as interleaved training is:
    first the streams, then the forecasts (until session 14 each round of 16 streamed frames
    was followed by a forecast, which left the frames' working set out of the caches).
    `compiles`: per variant, whether its streamed step and its forecast are compiled where
    compile_pays (at batch 1 and at `batch`; forecasts in bf16 only; reported as
    stream_compiled and forecast_compiled). With cuda_graph, streamed steps and forecasts
    are CUDA graphs (StreamingPredictor, GraphedForecast; forecast_graph). Models that
    predict no next frame while reading (encoder-forecasters) time forecasts only
    (stream_step_ms None). A variant that fails to build gets an entry with its error only."""
    model_cfg = from_name(preset)
    streams = MODELS[model_cfg.architecture].feeds_back
    shape = (1, model_cfg.in_channels, 64, 64)
    frames = torch.rand(64, *shape, device=device)
    context = torch.rand(batch, 10, *shape[1:], device=device)
    runs: dict[int, _InferenceRun] = {}
    results: list[dict[str, Any]] = []
    for k, ((precision, options), compile) in enumerate(
        zip(variants, compiles or [False] * len(variants), strict=True)
    ):
        try:  # a variant that fails to build (a capture, a compilation) loses only its own
            runs[k] = _inference_run(
                model_cfg, precision, options, compile, device, frames, context
            )
            results.append({})
        except Exception as err:
            results.append({"error": _failure(err)})
    # streaming first, then forecasts, each interleaved across the variants (a forecast
    # between streamed frames would evict the frames' working set: not how one streams)
    per_round = 16  # streamed frames per variant and round

    def stream_round(stream: StreamingPredictor, round_: int) -> None:
        for i in range(per_round):
            stream(frames[(round_ * per_round + i) % len(frames)])

    built = list(runs.values())
    stream_s: list[list[float]] = [[] for _ in built]
    if streams and built:
        stream_s = _interleaved(
            [partial(stream_round, r.stream) for r in built], seconds / 2, device
        )
        stream_s = [[t / per_round for t in times] for times in stream_s]
    forecast_s = []
    if built:
        forecast_s = _interleaved(
            [lambda _, f=r.forecast: f() for r in built],
            seconds / 2 if streams else seconds,
            device,
        )
    for k, s, f in zip(runs, stream_s, forecast_s, strict=True):
        results[k] = {
            "stream_step_ms": statistics.median(s) * 1e3 if streams else None,
            "forecast_seq_per_s": batch / statistics.median(f),
            "rounds": len(f),
            "stream_compiled": runs[k].stream_compiled,
            "forecast_compiled": runs[k].forecast_compiled,
            "forecast_graph": runs[k].forecast_graph,
        }
    return results


def _failure(err: Exception) -> str:
    """An error in one line for the table, with the error it arose from where there is one
    (a CUDA graph capture that fails ends in its own generic error: the cause is that)."""
    text = f"{type(err).__name__}: {err}"
    cause = err.__cause__ or err.__context__
    if cause is not None:
        text += f" (from {type(cause).__name__}: {cause})"
    return " ".join(text.split())[:300]


@dataclasses.dataclass
class _InferenceRun:
    stream: StreamingPredictor | None
    forecast: Callable[[], Any]
    stream_compiled: bool
    forecast_compiled: bool
    forecast_graph: bool


def _inference_run(
    model_cfg, precision: str, options: SpeedOptions, compile: bool, device, frames, context
) -> _InferenceRun:
    """One variant's model, streaming predictor and forecast, built and warmed up."""
    torch.manual_seed(0)
    model = apply_speed(build_model(model_cfg).to(device), options).eval()
    amp_dtype, _ = resolve_precision(precision, device)
    shape = tuple(frames.shape[1:])
    streams = MODELS[model_cfg.architecture].feeds_back
    stream_compiled = streams and compile and compile_pays(model, shape, amp_dtype)
    stream = None
    if streams:
        stream = StreamingPredictor(
            model,
            shape,
            autocast_dtype=amp_dtype,
            graph=options.cuda_graph,
            compile=stream_compiled,
        )
    frame_shape = (context.shape[0], *shape[1:])
    # (forecasts compile in bf16 only: float32 ones ran at 0.68-0.83x the uncompiled fast
    # path, whose hoisted context runs by Winograd)
    forecast_compiled = (
        compile and amp_dtype is not None and compile_pays(model, frame_shape, amp_dtype)
    )
    if forecast_compiled:
        forecast = partial(
            CompiledForecast(model, context.shape, 10, autocast_dtype=amp_dtype), context
        )
    elif options.cuda_graph:
        forecast = partial(
            GraphedForecast(model, context.shape, 10, autocast_dtype=amp_dtype), context
        )
    else:

        def forecast() -> None:
            with torch.no_grad(), autocast(device, amp_dtype):
                model(context, 10)

    for frame in frames[: 5 if streams else 0]:  # warm-up: kept transforms and packs,
        stream(frame)  # lazy allocations
    forecast()
    return _InferenceRun(stream, forecast, stream_compiled, forecast_compiled, options.cuda_graph)


def _interleaved(
    tasks: list[Callable[[int], None]], seconds: float, device: torch.device, min_rounds: int = 3
) -> list[list[float]]:
    """Each task's times over rounds (task(round) runs once a round; the order reversed every
    round), at least `min_rounds` rounds and `seconds` per task in all."""
    times: list[list[float]] = [[] for _ in tasks]
    rounds, spent = 0, 0.0
    while rounds < min_rounds or spent < seconds * len(tasks):
        for k in range(len(tasks)) if rounds % 2 == 0 else reversed(range(len(tasks))):
            sync(device)
            start = time.perf_counter()
            tasks[k](rounds)
            sync(device)
            times[k].append(time.perf_counter() - start)
            spent += times[k][-1]
        rounds += 1
    return times


def generator_rate(
    device: torch.device, batch: int, mnist_dir: str | None, seconds: float
) -> float:
    """Moving MNIST training sequences/s (20 frames, 64x64) delivered on the device."""
    digits, _ = load_mnist("train", mnist_dir)
    spec = MovingMNISTSpec(num_frames=20)
    if device.type == "cuda":
        source = DeviceMovingMNIST(digits, device, spec)
        make: Callable[[int], Any] = lambda i: source.batch(0, range(i * batch, (i + 1) * batch))
    else:
        make = lambda i: generate_batch(digits, 0, range(i * batch, (i + 1) * batch), spec)
    make(0)
    sync(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        make(count)
        count += 1
    sync(device)
    return count * batch / (time.perf_counter() - start)


def main(argv=None) -> dict:
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    stacked = sorted(n for n in PRESETS if n.startswith("mmnist-") and "fc-lstm" not in n)
    parser.add_argument("--preset", choices=stacked, default="mmnist-convlstm-s")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=None)
    parser.add_argument(
        "--inference-variants",
        nargs="+",
        choices=sorted(VARIANTS),
        default=None,
        help="variants whose streaming and forecast are timed (interleaved); default: those of "
        f"{', '.join(INFERENCE_VARIANTS)} among the training variants, and beside fast its "
        "uncompiled (CPU) or ungraphed (CUDA) twin",
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per entry")
    parser.add_argument(
        "--profile",
        choices=sorted(VARIANTS),
        default=None,
        help="also print the top kernels of 3 training steps of this variant at the first "
        "batch size (a variant without cuda_graph shows each kernel; a graph shows as one)",
    )
    parser.add_argument(
        "--interleave",
        action="store_true",
        help="time the variants' training steps in turn (alternating order, medians): fair "
        "ratios on a machine whose speed drifts; peak memory is then reported on the CPU only",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--mnist-dir", default=None)
    parser.add_argument("--out", type=Path, default=None, help="also write the numbers as JSON")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    if any(b < 1 for b in args.batch_sizes) or args.seconds <= 0:
        raise ConfigError("batch sizes and --seconds must be positive")
    variants = args.variants or default_variants(device)
    inference = args.inference_variants or default_inference_variants(variants, device)
    for name in [*variants, *inference, *([args.profile] if args.profile else [])]:
        precision, options = resolve_variant(name, device)
        options.check(device)
        if precision == "bf16" and device.type == "cpu" and not cpu_bf16_units():
            raise ConfigError(
                f"variant {name} runs in bf16, which this CPU has no AMX-BF16 units for, or "
                "oneDNN is held below them by ONEDNN_MAX_CPU_ISA (it would time slow "
                "kernels): use the fp32 variants"
            )
    if args.out is not None and args.out.suffix != ".json":
        raise ConfigError(f"--out must name a .json file, got {args.out}")
    torch.backends.cudnn.benchmark = True
    torch.set_float32_matmul_precision("high")  # TF32 on CUDA for the fp32 reference

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report: dict[str, Any] = {
        "device": name,
        "torch": torch.__version__,
        "preset": args.preset,
        "interleaved": args.interleave,
        "training": [],
        "inference": [],
    }

    def save() -> None:
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2))

    ceiling, what = matmul_ceiling(device)
    report["ceiling_tflops"], report["ceiling_what"] = ceiling, what
    print(f"{name}, torch {torch.__version__}: matmul ceiling {ceiling:.1f} TFLOP/s ({what})")
    flops = flops_per_sequence(args.preset, device)
    report["flops_per_train_sequence"] = flops
    print(f"{args.preset}: {flops / 1e9:.1f} GFLOP per training sequence", flush=True)
    if device.type == "cpu":
        tiles = "C (convlstm/tiles.c)" if native.load("tiles") is not None else "PyTorch"
        report["winograd_tile_transforms"] = tiles
        print(f"Winograd tile transforms: {tiles}")

    def infer() -> None:  # streaming and forecasts: their table's rows
        resolved = [resolve_variant(variant, device) for variant in inference]
        compiles = [variant in COMPILED for variant in inference]
        try:
            timed = time_inference(
                args.preset, resolved, device, args.seconds, min(args.batch_sizes), compiles
            )
        except Exception as err:  # reported on every variant's line
            timed = [{"error": f"{type(err).__name__}: {err}"[:300]}] * len(inference)
        for variant, (precision, _), times in zip(inference, resolved, timed, strict=True):
            entry = {"variant": variant, "precision": precision, **times}
            report["inference"].append(entry)
            print(_infer_line(entry), flush=True)
        save()

    report["forecast_batch"] = min(args.batch_sizes)
    digits, _ = load_mnist("train", args.mnist_dir)
    spec = MovingMNISTSpec(num_frames=20)
    for k, batch in enumerate(args.batch_sizes):
        batches = [
            generate_batch(digits, 1, range(i * batch, (i + 1) * batch), spec).to(device)
            for i in range(4)
        ]
        resolved = [resolve_variant(variant, device) for variant in variants]
        timed: list[dict[str, Any]] | Exception | None = None
        if args.interleave:
            try:
                timed = time_training_interleaved(
                    args.preset, batch, resolved, device, batches, args.seconds
                )
            except Exception as err:  # reported on every variant's line below
                timed = err
        for i, (variant, (precision, options)) in enumerate(zip(variants, resolved, strict=True)):
            entry: dict[str, Any] = {
                "variant": variant,
                "batch": batch,
                "precision": precision,
                "options": options.describe(),
            }
            try:
                if isinstance(timed, Exception):
                    raise timed
                if timed is not None:
                    entry |= timed[i]
                else:
                    entry |= time_training(
                        args.preset, batch, precision, options, device, batches, args.seconds
                    )
                tflops = entry["train_seq_per_s"] * flops / 1e12
                entry["tflops"], entry["share_of_ceiling"] = tflops, tflops / ceiling
            except Exception as err:  # one failing variant must not lose the others
                entry["error"] = f"{type(err).__name__}: {err}"[:300]
            report["training"].append(entry)
            print(_train_line(entry), flush=True)
            save()
        del batches
        if k == 0 and inference:
            # after the first batch size's training, not last: a run cut short (the GPU
            # check's time limit) loses the last training entries, not every inference row
            infer()
    report["generator_seq_per_s"] = generator_rate(
        device, max(args.batch_sizes), args.mnist_dir, min(2.0, args.seconds)
    )
    save()
    if args.profile is not None:
        precision, options = resolve_variant(args.profile, device)
        report["profile"] = profile_training(
            args.preset, args.batch_sizes[0], precision, options, device
        )
        print(f"\ntop kernels, 3 steps of {args.profile} at batch {args.batch_sizes[0]}:")
        print(report["profile"])
        save()
    _print_table(report)
    return report


def profile_training(
    preset: str, batch: int, precision: str, options: SpeedOptions, device: torch.device
) -> str:
    """torch.profiler's table of the most expensive kernels over 3 warm training steps."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model_cfg = from_name(preset)
    model = apply_speed(build_model(model_cfg).to(device), options)
    step = _train_step(
        model, model_cfg, train_config(batch, precision, device, model_cfg), options, device
    )
    frames = torch.rand(batch, 20, 1, 64, 64, device=device)
    for _ in range(5):
        step(frames, None)
    sync(device)
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        for _ in range(3):
            step(frames, None)
        sync(device)
    # self time: the kernels themselves on CUDA, not the operators that launched them
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=20, max_name_column_width=70)


def _figures(x: float, width: int) -> str:
    """x right-aligned in `width` with about three significant figures and no exponent:
    1066, 28.7, 0.523 (a CPU preset such as ConvLSTM-S trains at under 1 sequence/s)."""
    decimals = 0 if x <= 0 else min(3, max(0, 2 - math.floor(math.log10(x))))
    return f"{x:{width}.{decimals}f}"


def _train_line(e: dict[str, Any]) -> str:
    head = f"{e['variant']:<38} {e['precision']:<5} {e['batch']:>5}"
    if "error" in e:
        return f"{head}  failed: {e['error']}"
    gib = e["peak_memory_gib"]
    peak = _figures(gib * 1024, 8) if gib is not None else "       -"
    return (
        f"{head} {_figures(e['train_seq_per_s'], 10)} {_figures(e['tflops'], 8)} "
        f"{100 * e['share_of_ceiling']:7.1f}% {peak} {e['warmup_s']:8.1f}"
    )


def _infer_line(e: dict[str, Any]) -> str:
    head = f"{e['variant']:<38} {e['precision']:<5}"
    if "error" in e:
        return f"{head}  failed: {e['error']}"
    stream = "-" if e["stream_step_ms"] is None else f"{e['stream_step_ms']:.3f}"
    parts = [n for n in ("stream", "forecast") if e.get(f"{n}_compiled")]
    if e.get("forecast_graph"):
        parts.append("forecast as one CUDA graph")
    step = f"  {' + '.join(parts)}" if parts else ""
    return f"{head} {stream:>12} {_figures(e['forecast_seq_per_s'], 14)}{step}"


def _print_table(report: dict[str, Any]) -> None:
    print()
    if report.get("interleaved"):
        print("training rates from the median step, the variants' steps interleaved")
    print(
        f"{report['device']}, torch {report['torch']}; ceiling "
        f"{report['ceiling_tflops']:.1f} TFLOP/s ({report['ceiling_what']}); {report['preset']}: "
        f"{report['flops_per_train_sequence'] / 1e9:.1f} GFLOP per training sequence"
    )
    print(
        f"{'training path':<38} {'prec':<5} {'batch':>5} {'seq/s':>10} {'TFLOP/s':>8} "
        f"{'ceiling':>8} {'peak MiB':>8} {'warm s':>8}"
    )
    for entry in report["training"]:
        print(_train_line(entry))
    rates = {(e["variant"], e["batch"]): e.get("train_seq_per_s") for e in report["training"]}
    for (variant, batch), rate in rates.items():
        if variant != "fast" or not rate:
            continue
        for reference in ("eager-fp32", "eager-bf16"):
            if rates.get((reference, batch)):
                print(f"fast / {reference} at batch {batch}: {rate / rates[reference, batch]:.2f}x")
    if report["inference"]:
        print(
            f"{'inference path':<38} {'prec':<5} {'stream ms/step':>12} "
            f"{'forecast seq/s':>14}  compiled (batch 1 / {report['forecast_batch']})"
        )
        for entry in report["inference"]:
            print(_infer_line(entry))
    best = max((r for r in rates.values() if r), default=0.0)
    gen = report["generator_seq_per_s"]
    ratio = f" ({gen / best:.1f}x the fastest training rate)" if best else ""
    print(f"Moving MNIST generator: {gen:.0f} sequences/s on the device{ratio}")


def failed_variants(report: dict) -> list[str]:
    """The variants with an error in any training or inference entry of `report`."""
    entries = report["training"] + report["inference"]
    return sorted({entry["variant"] for entry in entries if "error" in entry})


def cli(argv=None) -> None:
    """The command: main(), then exit status 1 where a variant failed (the table and the JSON
    keep its error and every other variant's figures), so that a script sees it."""
    failed = failed_variants(main(argv))
    if failed:
        print(f"failed: {', '.join(failed)} (errors in the table)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    run_main(cli)
