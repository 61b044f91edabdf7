"""Where one training step moves memory without arithmetic: copies, casts, concatenations.

    python -m experiments.memory_traffic --variant fast --batch 64          # on a GPU
    python -m experiments.memory_traffic --device cpu --preset mmnist-cpu-small --batch 4
    python -m experiments.memory_traffic --device cpu --options-of cuda     # the GPU's path

A kernel profile (experiments.benchmark --profile) says how much time copies take; this says
which line of the model makes them. One training step of a benchmark variant runs under a
dispatch trace, and every copy, cast, clone, concatenation, stack, zero fill and backward
sum is grouped by where it comes from: for the forward, the deepest frame in this project;
for the backward, the forward line that made the autograd node (anomaly mode records it).
Each row gives the phase, the operator, the input layouts (C contiguous, CL channels-last,
S strided: neither, which the GPU copies element by element), the calls and the bytes
written, and the last lines sum them up by kind. Under the trace compiled kernels run
eagerly: the operators of the fast path's fused gate arithmetic (convlstm/gates.py), which
torch.compile runs as one kernel per call, are counted apart, on a line of their own, and
left out of the rows and totals.

A variant with a CUDA graph is traced without it, but with autocast as the graph runs it:
no cache, so each use of a weight casts it again. `--options-of cuda` traces, on a CPU, the
options the variant has on CUDA (bf16 where its precision is "auto"): the GPU path's
operators and bytes without a GPU, as far as they do not depend on the device (autocast
casts by the CPU's lists of operators, for one).
"""

from __future__ import annotations

import collections
import dataclasses
import re
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from convlstm.cli import ArgumentParser, run_main
from convlstm.config import PRESETS, from_name
from convlstm.errors import ConfigError
from convlstm.models import build_model
from convlstm.speed import apply_speed
from convlstm.training import resolve_device, resolve_precision
from experiments.benchmark import VARIANTS, _train_step, resolve_variant, train_config

# operators that only move or cast memory; the sums are counted in backward only (where
# they are autograd adding the gradients of a tensor used more than once)
MOVERS = ("copy_", "_to_copy", "clone", "cat", "stack", "fill_", "zero_", "zeros_like")
SUMS = ("add", "add_")
# each of those operators' kind, for the summary line
KINDS = {
    "_to_copy": "casts",
    "copy_": "copies",
    "clone": "copies",
    "cat": "cats",
    "stack": "cats",
    "fill_": "fills",
    "zero_": "fills",
    "zeros_like": "fills",
    "add": "sums",
    "add_": "sums",
}
# the functions that fused_lstm_update compiles: what they dispatch runs inside their kernels
COMPILED = (("convlstm/gates.py", ("gates_forward", "gates_backward", "_gates")),)
ROOT = Path(__file__).resolve().parent.parent
_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')


def layout(t: torch.Tensor) -> str:
    if t.is_contiguous():
        return "C"
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return "CL"
    return "S"


def _site(frames: list[tuple[str, int, str]]) -> str:
    """The deepest frame inside this project's packages, as path:line function."""
    for filename, line, function in reversed(frames):
        path = Path(filename).resolve()
        if path.is_relative_to(ROOT) and path.parts[len(ROOT.parts)] in ("convlstm", "datasets"):
            return f"{path.relative_to(ROOT)}:{line} {function}"
    return "(outside the model)"


def _frames() -> list[tuple[str, int, str]]:
    import traceback

    return [(f.filename, f.lineno, f.name) for f in traceback.extract_stack()]


def _compiled(frames: list[tuple[str, int, str]]) -> bool:
    """Whether these frames run inside one of the COMPILED functions."""
    for filename, _, function in frames:
        for path, names in COMPILED:
            if function in names and Path(filename).resolve() == ROOT / path:
                return True
    return False


def _backward_site(node) -> str:
    lines = node.metadata.get("traceback_") or []
    frames = [(m[1], int(m[2]), m[3]) for m in _FRAME.finditer("".join(lines))]
    return f"{node.name()} of {_site(frames)}"


class TrafficTrace(TorchDispatchMode):
    """Counts and bytes of memory-moving operators, keyed by (phase, site, operator, layouts);
    those inside the COMPILED functions are counted apart, in `fused_calls` and `fused_bytes`."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: collections.Counter = collections.Counter()
        self.bytes: collections.Counter = collections.Counter()
        self.fused_calls = 0
        self.fused_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        node = torch._C._current_autograd_node()
        if name in MOVERS or (node is not None and name in SUMS):
            inputs = [a for a in args if isinstance(a, torch.Tensor)]
            inputs += [t for a in args if isinstance(a, list | tuple) for t in a]
            inputs = [t for t in inputs if isinstance(t, torch.Tensor)]
            result = out if isinstance(out, torch.Tensor) else args[0]
            written = result.numel() * result.element_size()
            frames = _frames()
            if _compiled(frames):
                self.fused_calls += 1
                self.fused_bytes += written
                return out
            site = _site(frames) if node is None else _backward_site(node)
            key = (
                "forward" if node is None else "backward",
                site,
                name,
                " ".join(f"{str(t.dtype)[6:]}:{layout(t)}" for t in inputs[:4]),
            )
            self.rows[key] += 1
            self.bytes[key] += written
        return out


def trace_step(step, batch: torch.Tensor) -> TrafficTrace:
    """One training step (forward and backward) of `step` (a TrainStep) under the trace."""
    trace = TrafficTrace()
    with torch.autograd.set_detect_anomaly(True, check_nan=False):
        with trace:
            loss = step.forward_loss(batch, None)
        step.optimizer.zero_grad(set_to_none=True)
        with trace:
            loss.backward()
    return trace


def report(trace: TrafficTrace, top: int) -> str:
    total = sum(trace.bytes.values())
    lines = [f"{'MB':>9} {'calls':>6}  phase     operator  inputs (dtype:layout)  <- site"]
    for key, size in trace.bytes.most_common(top):
        phase, site, name, inputs = key
        lines.append(
            f"{size / 1e6:9.1f} {trace.rows[key]:6d}  {phase:<9} {name:<9} {inputs}  <- {site}"
        )
    strided = sum(size for key, size in trace.bytes.items() if ":S" in key[3])
    kinds: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    for key, size in trace.bytes.items():
        kind = KINDS[key[2]]
        kinds[kind] += size
        calls[kind] += trace.rows[key]
    lines.append(
        "by kind: " + ", ".join(f"{k} {kinds[k] / 1e6:.1f} MB in {calls[k]}" for k in sorted(kinds))
    )
    lines.append(
        f"total {total / 1e6:.1f} MB written in {sum(trace.rows.values())} calls; "
        f"{strided / 1e6:.1f} MB of it read from strided (S) inputs"
    )
    if trace.fused_calls:
        lines.append(
            f"not counted: {trace.fused_bytes / 1e6:.1f} MB in {trace.fused_calls} calls inside "
            "the compiled gate functions, which run as one kernel per call"
        )
    return "\n".join(lines)


def main(argv=None) -> TrafficTrace:
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    stacked = sorted(n for n in PRESETS if n.startswith("mmnist-") and "fc-lstm" not in n)
    parser.add_argument("--preset", choices=stacked, default="mmnist-convlstm-s")
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="fast")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--top", type=int, default=25, help="rows to print, most bytes first")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--options-of",
        choices=["device", "cuda"],
        default="device",
        help="the variant's options on the device that runs the trace, or on CUDA (bf16 "
        "where its precision is auto), traced here",
    )
    args = parser.parse_args(argv)
    if args.batch < 1 or args.top < 1:
        raise ConfigError("--batch and --top must be positive")
    device = resolve_device(args.device)
    if args.options_of == "cuda" and device.type != "cuda":
        precision, make = VARIANTS[args.variant]
        precision = "bf16" if precision == "auto" else precision
        options = make(torch.device("cuda"), resolve_precision(precision, device)[0])
        options.check(torch.device("cuda"))
    else:
        precision, options = resolve_variant(args.variant, device)
        options.check(device)
    graphed = options.cuda_graph
    # the graph would hide every operator behind one replay: trace the same step without it
    options = dataclasses.replace(options, cuda_graph=False)
    torch.manual_seed(0)
    model_cfg = from_name(args.preset)
    model = apply_speed(build_model(model_cfg).to(device), options)
    cfg = train_config(args.batch, precision, device, model_cfg)
    step = _train_step(model, model_cfg, cfg, options, device)
    step.autocast_cache = not graphed  # autocast as the graph runs it
    batch = torch.rand(args.batch, 20, model_cfg.in_channels, 64, 64, device=device)
    step(batch, None)  # warm: lazy state, cuDNN's choices
    trace = trace_step(step, batch)
    made = f" with its options on {args.options_of}" if args.options_of == "cuda" else ""
    graph = " without the graph (autocast uncached, as in it)" if graphed else ""
    print(f"{args.preset}, {args.variant}{made}{graph}, {precision}, batch {args.batch}, {device}:")
    print(report(trace, args.top))
    return trace


if __name__ == "__main__":
    run_main(main)
