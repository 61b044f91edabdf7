"""Write the MNIST subset embedded in the repo (``datasets/data/mnist_subset.npz``).

Run from the repo root::

    python -m datasets.make_embedded_subset --mnist-dir ../shared/data/mnist

The file holds ``train``: the first 3000 digits of the train split and ``test``: the first
1000 digits of the test split (uint8, 28x28). The splits are never mixed, so a Moving MNIST
test set built from the embedded digits shares no digit with its training data.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from convlstm.errors import DataError
from datasets.mnist import EMBEDDED_SUBSET, load_mnist

NUM_TRAIN = 3000
NUM_TEST = 1000
MAX_BYTES = 1_500_000  # keep the repo small


def make_subset(
    mnist_dir: str | os.PathLike,
    out: str | os.PathLike = EMBEDDED_SUBSET,
    num_train: int = NUM_TRAIN,
    num_test: int = NUM_TEST,
) -> Path:
    """Write the subset from the IDX files in ``mnist_dir``; returns the written path."""
    train, _ = load_mnist("train", root=mnist_dir)
    test, _ = load_mnist("test", root=mnist_dir)
    if len(train) < num_train or len(test) < num_test:
        raise DataError(
            f"{mnist_dir} holds {len(train)} train and {len(test)} test digits;"
            f" the subset needs {num_train} and {num_test}"
        )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so a crash never leaves half a file.
    tmp = out.with_name(out.name + ".tmp.npz")
    np.savez_compressed(tmp, train=train[:num_train], test=test[:num_test])
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--mnist-dir", required=True, help="folder with the standard MNIST IDX files (gz or plain)"
    )
    parser.add_argument("--out", default=str(EMBEDDED_SUBSET), help="output .npz path")
    args = parser.parse_args(argv)
    try:
        out = make_subset(args.mnist_dir, args.out)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = out.stat().st_size
    print(f"wrote {out} ({size / 1e6:.2f} MB): {NUM_TRAIN} train and {NUM_TEST} test digits")
    if size > MAX_BYTES:
        print(f"error: {out} is larger than {MAX_BYTES} bytes", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
