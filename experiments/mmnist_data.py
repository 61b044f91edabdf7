"""Moving MNIST data settings shared by the training and evaluation entry points."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from datasets.mnist import load_mnist
from datasets.moving_mnist import (
    DeviceMovingMNIST,
    MovingMNISTSpec,
    fixed_test_set,
    generate_batch,
    load_standard_test_set,
)


@dataclass
class DataConfig:
    """Where digits and test sequences come from, and how sequences are generated."""

    mnist_dir: str | None = None  # IDX folder; None: $CONVLSTM_MNIST_DIR, download, or embedded
    test_file: str | None = None  # the standard mnist_test_seq.npy; None: a seeded generated set
    test_sequences: int = 1000  # how many test sequences to evaluate (first N)
    test_seed: int = 4242  # seed of the generated test set
    num_digits: int = 2
    canvas: int = 64
    speed: float = 0.1  # step per frame as a fraction of the free range (protocol: 0.1)

    def spec(self, frames: int) -> MovingMNISTSpec:
        return MovingMNISTSpec(
            num_digits=self.num_digits, num_frames=frames, canvas=self.canvas, speed=self.speed
        )


def test_sequences(data: DataConfig, frames: int) -> tuple[torch.Tensor, str]:
    """The fixed test set (N, T, 1, H, W) and a sentence saying what it is."""
    if data.test_file is not None:
        sequences = load_standard_test_set(Path(data.test_file))[: data.test_sequences]
        return sequences, f"standard file {data.test_file} (first {len(sequences)} sequences)"
    digits, source = load_mnist("test", data.mnist_dir)
    sequences = fixed_test_set(
        digits, data.test_sequences, seed=data.test_seed, spec=data.spec(frames)
    )
    return sequences, (
        f"generated: {len(sequences)} sequences, seed {data.test_seed}, {data.num_digits} digits "
        f"from the MNIST test split ({source})"
    )


def training_batches(
    data: DataConfig, frames: int, batch_size: int, seed: int, device: str | None = None
):
    """step -> (B, T, 1, H, W): sequence i of the stream is generated from (seed, i) alone.
    On a CUDA `device` the frames are rendered there (the same sequences; no frame copies)."""
    digits, source = load_mnist("train", data.mnist_dir)
    spec = data.spec(frames)
    if device is not None and torch.device(device).type == "cuda":
        on_device = DeviceMovingMNIST(digits, device, spec)

        def device_batch(step: int) -> torch.Tensor:
            return on_device.batch(seed, range(step * batch_size, (step + 1) * batch_size))

        return device_batch, digits, source

    def batch(step: int) -> torch.Tensor:
        return generate_batch(digits, seed, range(step * batch_size, (step + 1) * batch_size), spec)

    return batch, digits, source
