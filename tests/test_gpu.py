"""CUDA training in reduced precision (skipped without a GPU)."""

import pytest
import torch

from convlstm.config import ModelConfig, TrainConfig, build
from convlstm.training import train
from tests.conftest import cuda_or_skip
from tests.test_training import moving_squares

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("precision, dtype", [("bf16", "bfloat16"), ("fp16", "float16")])
def test_cuda_training_in_reduced_precision_lowers_the_loss(tmp_path, precision, dtype):
    device = cuda_or_skip()
    cfg = build(
        TrainConfig,
        dict(
            steps=40,
            batch_size=8,
            context_frames=4,
            horizon=4,
            lr=3e-3,
            ss_decay_steps=20,
            log_every=10,
            eval_batch_size=8,
            precision=precision,
            device=str(device),
            wandb="disabled",
        ),
    )
    model_cfg = ModelConfig(hidden_channels=(16, 16), kernel_size=3, patch_size=2)
    result = train(
        model_cfg,
        cfg,
        train_batches=lambda s: moving_squares(s, batch=8),
        eval_sequences=moving_squares(999, batch=8),
        out_dir=tmp_path,
    )
    losses = [loss for _, loss in result["losses"]]
    assert result["precision"] == dtype and result["device"].startswith("cuda")
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert next(result["model"].parameters()).dtype == torch.float32  # master weights stay fp32


def test_auto_precision_is_bf16_on_cuda(tmp_path):
    device = cuda_or_skip()
    from convlstm.training import resolve_precision

    assert resolve_precision("auto", device)[0] == torch.bfloat16
