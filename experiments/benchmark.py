"""Training throughput of a preset: sequences/s in steady state, on CPU or CUDA.

    python -m experiments.benchmark --preset mmnist-convlstm-s --batch-size 16 --steps 30

Runs the real training loop on generated Moving MNIST with the model fed its own predictions
(OpenSTL's semantics once scheduled sampling has ended) and the loss on all 19 frames, and
reports the rate of the last log window, after the warm-up steps.
"""

from __future__ import annotations

import tempfile

import torch

from convlstm.cli import ArgumentParser, run_main
from convlstm.config import PRESETS, TrainConfig, build, from_name
from convlstm.training import train
from experiments.mmnist_data import DataConfig, test_sequences, training_batches


def main(argv=None) -> dict:
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="mmnist-convlstm-s")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--steps", type=int, default=30, help="total steps; the last third is timed"
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto")
    parser.add_argument("--mnist-dir", default=None)
    args = parser.parse_args(argv)

    model_cfg = from_name(args.preset)
    loss_on_context = model_cfg.architecture == "stacked"
    cfg = build(
        TrainConfig,
        dict(
            steps=args.steps,
            batch_size=args.batch_size,
            log_every=max(1, args.steps // 3),
            scheduled_sampling="none",
            schedule="constant",
            loss_on_context=loss_on_context,
            device=args.device,
            precision=args.precision,
            eval_batch_size=args.batch_size,
            wandb="disabled",
        ),
    )
    data = DataConfig(mnist_dir=args.mnist_dir, test_sequences=args.batch_size)
    frames = cfg.context_frames + cfg.horizon
    batches, _, _ = training_batches(data, frames, cfg.batch_size, cfg.seed)
    test_set, _ = test_sequences(data, frames)
    with tempfile.TemporaryDirectory() as out:
        result = train(model_cfg, cfg, train_batches=batches, eval_sequences=test_set, out_dir=out)
    rate = result["throughput"][-1][1]
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    report = {
        "preset": args.preset,
        "batch_size": args.batch_size,
        "device": result["device"],
        "device_name": torch.cuda.get_device_name()
        if result["device"].startswith("cuda")
        else "cpu",
        "precision": result["precision"],
        "parameters": result["parameters"],
        "train_seq_per_s": rate,
        "peak_memory_gib": peak,
    }
    print(
        f"{args.preset} batch {args.batch_size} on {report['device_name']} "
        f"({report['precision']}): "
        f"{rate:.3g} training sequences/s"
        + (f", peak memory {peak:.2f} GiB" if peak is not None else "")
    )
    return report


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    run_main(main)
