import os
from pathlib import Path

import pytest
import torch

SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """No network, no W&B server, fixed seeds and dtype for every test."""
    monkeypatch.setenv("CONVLSTM_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float32)


@pytest.fixture
def mnist_dir() -> str | None:
    """The shared MNIST folder when it is there; None falls back to the embedded subset."""
    return str(SHARED_MNIST) if SHARED_MNIST.is_dir() else None


def cuda_or_skip() -> torch.device:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return torch.device(os.environ.get("CONVLSTM_TEST_CUDA", "cuda"))
