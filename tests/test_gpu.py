"""CUDA training in reduced precision (skipped without a GPU)."""

import pytest
import torch

from tests.conftest import cuda_or_skip
from tests.test_training import _train

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("precision, dtype", [("bf16", "bfloat16"), ("fp16", "float16")])
def test_cuda_training_in_reduced_precision_lowers_the_loss(tmp_path, precision, dtype):
    device = cuda_or_skip()
    result = _train(
        tmp_path,
        precision,
        steps=40,
        log_every=10,
        checkpoint_every=0,
        precision=precision,
        device=str(device),
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
