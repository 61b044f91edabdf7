"""Model size and cost: multiply-accumulates of one forecast, counted by torch's FLOP counter."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from convlstm.forecaster import Forecaster


def count_macs(
    model: Forecaster, *, context_frames: int, horizon: int, frame_size: tuple[int, int]
) -> int:
    """Multiply-accumulates of one sequence's forward pass (encode `context_frames`, forecast
    `horizon`). Convolutions, linear layers and matrix products (attention included) count;
    element-wise gate arithmetic and TrajGRU's bilinear sampling do not."""
    param = next(model.parameters())
    shape = (1, context_frames, model.config.in_channels, *frame_size)
    context = torch.zeros(shape, device=param.device, dtype=param.dtype)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(context, horizon)
    return counter.get_total_flops() // 2
