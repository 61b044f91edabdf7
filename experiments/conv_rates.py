"""How fast a stacked ConvLSTM preset's recurrent convolutions run, forward and backward, one
step at a time against batched over the steps: the rates that bound the fast path's training
step.

    python -m experiments.conv_rates                          # GPU: ConvLSTM-S, bf16
    python -m experiments.conv_rates --device cpu --preset mmnist-cpu-small --batch-sizes 8

For each gate convolution of one recurrent step (the whole one on [x, h], as a step of a
stack fed its own prediction runs it; the state half W_h * h alone, as a hoisted step runs
it) and each batch size, in bf16 channels-last on CUDA (the fast path's) and float32 on the
CPU (the float32 fast path's; not bf16, which AMX CPUs train in), TFLOP/s of:
- forward: F.conv2d;
- data gradient: the library's convolution backward for the input alone (cuDNN's dgrad on
  CUDA), and the same gradient as a forward convolution of the output gradient with the
  filter transposed and flipped (equal in exact arithmetic; the largest difference is
  printed and saved), which may run other, faster kernels (the fast path's forward_dgrad
  option makes it so);
- weight gradient: per step (as autograd makes it), and once over all the sequence's steps
  stacked along the batch (convlstm.wgrad's batched_wgrad), per step's worth of work.
On CUDA each figure is GPU time: 16 calls captured as one CUDA graph, its replays timed (no
Python or launch overhead, as in the graphed training step). Session 5 measured on an H100
at batch 16, with an ad hoc script of its own: 530 TFLOP/s forward, 270 data gradient, 325
weight gradient; so the data gradient is where a step's convolutions lose most.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from convlstm.cli import ArgumentParser, run_main
from convlstm.config import PRESETS, from_name
from convlstm.errors import ConfigError
from convlstm.speed import capture_graph
from convlstm.training import resolve_device
from convlstm.wgrad import flipped

_backward = torch.ops.aten.convolution_backward


def convolutions(preset: str, steps: int) -> list[dict[str, Any]]:
    """The step convolutions of a stacked preset's layers, one of each distinct shape: the
    whole gate convolution on [x, h] and the state half on h."""
    cfg = from_name(preset)
    if cfg.architecture != "stacked" or cfg.cell not in ("convlstm", "peephole_convlstm"):
        raise ConfigError(
            f"{preset} is not a stacked ConvLSTM preset (its cell is {cfg.cell}, its "
            f"architecture {cfg.architecture}): its convolutions have other shapes"
        )
    patch = cfg.patch_size
    grid = (64 // patch, 64 // patch)
    inputs = [cfg.in_channels * patch * patch, *cfg.hidden_channels[:-1]]
    gates = 4  # ConvLSTM: i, f, g, o
    seen, out = set(), []
    for x_channels, hidden in zip(inputs, cfg.hidden_channels, strict=True):
        for name, c_in in (("[x, h]", x_channels + hidden), ("h", hidden)):
            key = (c_in, gates * hidden)
            if key not in seen:
                seen.add(key)
                out.append(
                    {
                        "conv": name,
                        "c_in": c_in,
                        "c_out": gates * hidden,
                        "grid": grid,
                        "kernel": cfg.kernel_size,
                        "steps": steps,
                    }
                )
    return out


def _time(fn, device: torch.device, seconds: float) -> float:
    """Median seconds of one fn() over 5 rounds of about `seconds` / 5 each, after a warm-up
    (cuDNN's algorithm search). On CUDA, GPU time: 16 calls captured as one graph, whose
    replays are timed."""
    calls = 1
    if device.type == "cuda":
        calls = 16
        with torch.no_grad():
            graph, _ = capture_graph(lambda: [fn() for _ in range(calls)], device, warmup=1)
        fn = graph.replay
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else lambda: None
    return _rounds(fn, sync, seconds) / calls


def _rounds(fn, sync, seconds: float, clock=time.perf_counter) -> float:
    """Median seconds of one fn() (finished by sync()) over 5 rounds of about `seconds` / 5,
    after a warm-up call. Each round makes a count of calls fixed beforehand from one timed
    call: fn may return before its work is done (a CUDA graph's replay), so a loop that
    watched the clock would queue far more work than a round's time, then wait for all of it."""
    fn()
    sync()
    start = clock()
    fn()
    sync()
    once = clock() - start
    count = max(1, round(seconds / 5 / max(once, 1e-9)))
    times = []
    for _ in range(5):
        start = clock()
        for _ in range(count):
            fn()
        sync()  # (the calls queued until then, timed to their end)
        times.append((clock() - start) / count)
    return statistics.median(times)


def measure(
    conv: dict[str, Any], batch: int, device: torch.device, dtype: torch.dtype, seconds: float
) -> dict[str, Any]:
    """One convolution's rates (TFLOP/s) at `batch`, and the largest relative difference
    between the two ways of making its data gradient."""
    k, (h, w), steps = conv["kernel"], conv["grid"], conv["steps"]
    layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    make = dict(device=device, dtype=dtype)
    x = torch.randn(batch, conv["c_in"], h, w, **make).contiguous(memory_format=layout)
    grad = torch.randn(batch, conv["c_out"], h, w, **make).contiguous(memory_format=layout)
    weight = torch.randn(conv["c_out"], conv["c_in"], k, k, **make) / (k * conv["c_in"] ** 0.5)
    weight = weight.contiguous(memory_format=layout)
    turned = flipped(weight).contiguous(memory_format=layout)
    xs = torch.cat([x] * steps).contiguous(memory_format=layout)  # the steps stacked
    grads = torch.cat([grad] * steps).contiguous(memory_format=layout)
    p = k // 2

    def backward(g, inp, mask):
        return _backward(g, inp, weight, None, [1, 1], [p, p], [1, 1], False, [0, 0], 1, mask)

    flops = 2 * batch * h * w * conv["c_in"] * conv["c_out"] * k * k  # one step's product
    with torch.no_grad():
        dgrad = backward(grad, x, [True, False, False])[0].float()
        by_forward = F.conv2d(grad, turned, padding=p).float()
        difference = ((by_forward - dgrad).abs().max() / dgrad.abs().max()).item()
        seconds_by_op = {
            "forward": _time(lambda: F.conv2d(x, weight, padding=p), device, seconds),
            "dgrad": _time(lambda: backward(grad, x, [True, False, False]), device, seconds),
            "dgrad_by_forward": _time(lambda: F.conv2d(grad, turned, padding=p), device, seconds),
            "wgrad": _time(lambda: backward(grad, x, [False, True, False]), device, seconds),
            "wgrad_batched": _time(
                lambda: backward(grads, xs, [False, True, False]), device, seconds
            )
            / steps,
        }
    rates = {name: flops / s / 1e12 for name, s in seconds_by_op.items()}
    return {**conv, "batch": batch, "tflops": rates, "dgrad_difference": difference}


def main(argv=None) -> list[dict[str, Any]]:
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    stacked = sorted(n for n in PRESETS if n.startswith("mmnist-") and "fc-lstm" not in n)
    parser.add_argument("--preset", choices=stacked, default="mmnist-convlstm-s")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64])
    parser.add_argument(
        "--steps",
        type=int,
        default=19,
        help="steps whose weight gradients are batched (19: OpenSTL's 10 -> 10 frames)",
    )
    parser.add_argument("--seconds", type=float, default=0.5, help="timed seconds per entry")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=None, help="also write the rates as JSON")
    args = parser.parse_args(argv)
    if any(b < 1 for b in args.batch_sizes) or args.steps < 1 or args.seconds <= 0:
        raise ConfigError("--batch-sizes, --steps and --seconds must be positive")
    if args.out is not None and args.out.suffix != ".json":
        raise ConfigError(f"--out must name a .json file, got {args.out}")
    device = resolve_device(args.device)
    convs = convolutions(args.preset, args.steps)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}, {args.preset}, {dtype}: TFLOP/s per step")
    head = ["forward", "dgrad", "dgrad_by_forward", "wgrad", "wgrad_batched"]
    print(
        f"{'conv':<7} {'c_in':>5} {'c_out':>5} {'batch':>5} " + " ".join(f"{h:>16}" for h in head)
    )
    results = []
    for batch in args.batch_sizes:
        for conv in convs:
            entry = measure(conv, batch, device, dtype, args.seconds)
            results.append(entry)
            rates = " ".join(f"{entry['tflops'][h]:16.3g}" for h in head)
            print(f"{conv['conv']:<7} {conv['c_in']:>5} {conv['c_out']:>5} {batch:>5} {rates}")
            if args.out is not None:  # after each entry: a run stopped early keeps what it has
                args.out.parent.mkdir(parents=True, exist_ok=True)
                report = {"device": name, "dtype": str(dtype), "rates": results}
                args.out.write_text(json.dumps(report))
    worst = max(e["dgrad_difference"] for e in results)
    print(f"the two data gradients differ by at most {worst:.2g} (relative to the largest)")
    return results


if __name__ == "__main__":
    run_main(main)
