"""Evaluate a checkpoint on Moving MNIST beside the baselines; the model is rebuilt from the
checkpoint alone (its config travels inside it).

    python -m experiments.evaluate --checkpoint runs/x/checkpoint.pt --out runs/x/eval.json
    python -m experiments.evaluate --checkpoint ... --test-file mnist_test_seq.npy \
        --test-sequences 10000
    python -m experiments.evaluate --checkpoint ... --path eager    # the float32 reference

The forecast runs on the path the run trained on (its own evaluations' arithmetic: a
fast-path run scores here what it scored in training, and faster), or on --path.
"""

from __future__ import annotations

from pathlib import Path

import torch

from convlstm.checkpoint import load_checkpoint, model_from_checkpoint
from convlstm.cli import ArgumentParser, add_config_flags, given, run_main
from convlstm.config import build
from convlstm.evaluation import evaluate
from convlstm.speed import SpeedOptions, apply_speed
from convlstm.training import precision_name, resolve_device, resolve_precision
from experiments.mmnist_data import DataConfig, test_sequences, training_batches
from experiments.report import evaluate_baselines, print_table, write_json


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=None, help="metrics JSON (default: print only)")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--path",
        choices=["auto", "eager", "fast"],
        default="auto",
        help="how the model runs: auto: as the run trained; eager: the readable reference; "
        "fast: the fast path's options for this device (convlstm.speed)",
    )
    parser.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16", "fp16"],
        default="auto",
        help="auto: as the path resolves it (bf16 on CUDA, and for the fast path on a CPU "
        "with AMX-BF16 units; else fp32)",
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--context-frames", type=int, default=None, help="default: as trained")
    parser.add_argument("--horizon", type=int, default=None, help="default: as trained")
    add_config_flags(parser, DataConfig, "data (default: as stored in the checkpoint)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    payload = load_checkpoint(args.checkpoint)
    model, model_cfg = model_from_checkpoint(payload)
    trained = payload["train_config"] or {"context_frames": 10, "horizon": 10}
    context_frames = (
        args.context_frames if args.context_frames is not None else trained["context_frames"]
    )
    horizon = args.horizon if args.horizon is not None else trained["horizon"]
    data_cfg = build(DataConfig, {**payload["extra"].get("data", {}), **given(args, DataConfig)})
    device = resolve_device(args.device)
    path = trained.get("path", "eager") if args.path == "auto" else args.path
    # "auto" as the path resolves it (bf16 for the fast path on a CPU with AMX-BF16 units)
    amp_dtype, _ = resolve_precision(args.precision, device, path)

    test_set, test_desc = test_sequences(data_cfg, context_frames + horizon)
    apply_speed(model.to(device), SpeedOptions.for_path(path, device, amp_dtype=amp_dtype))
    metrics = evaluate(
        model,
        test_set,
        context_frames=context_frames,
        horizon=horizon,
        batch_size=args.batch_size,
        device=device,
        autocast_dtype=amp_dtype,
    )
    batches, _, _ = training_batches(data_cfg, context_frames + horizon, 16, seed=0)
    base = evaluate_baselines(
        test_set,
        context_frames=context_frames,
        horizon=horizon,
        mean_value=float(batches(10**6).mean()),
        batch_size=args.batch_size,
    )
    report = {
        "checkpoint": str(args.checkpoint),
        "step": payload["step"],
        "model_config": payload["model_config"],
        "test_set": test_desc,
        "context_frames": context_frames,
        "horizon": horizon,
        "device": str(device),
        "path": path,
        "precision": precision_name(amp_dtype),
        "model": metrics,
        "baselines": base,
    }
    print(
        f"checkpoint {args.checkpoint} (step {payload['step']}; {path} path, "
        f"{precision_name(amp_dtype)}); test set: {test_desc}"
    )
    print_table({"model": metrics, **base})
    if args.out is not None:
        print(f"metrics: {write_json(args.out, report)}")
    return report


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    run_main(main)
