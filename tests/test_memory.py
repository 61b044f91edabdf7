"""LiveTensors counts the bytes of tensor storage live at once: allocations, frees, views,
tensors made before, and the backward's own."""

import pytest
import torch

from convlstm.config import ModelConfig, TrainConfig, build
from convlstm.memory import LiveTensors
from convlstm.models import build_model
from convlstm.speed import SpeedOptions, apply_speed
from experiments import benchmark

MB = 1_000_000


def test_peak_is_the_most_bytes_live_at_once():
    with LiveTensors() as live:
        a = torch.empty(MB // 4)  # 1 MB of float32
        b = torch.empty(MB // 2, dtype=torch.float64)  # 4 MB
        del a
        c = torch.empty(MB, dtype=torch.uint8)  # 1 MB, in a's place
        d = b[:10].t()  # views share b's storage: nothing new
        del b  # d keeps the storage alive
        e = torch.empty(MB // 8, dtype=torch.float64)  # 1 MB
    assert live.peak_bytes == 6 * MB  # b + c + e (a had gone before c came)
    assert live.live_bytes == 6 * MB
    del d
    assert live.live_bytes == 6 * MB  # no longer watched after the block
    assert c.numel() + e.numel() > 0


def test_frees_inside_are_taken_off():
    with LiveTensors() as live:
        a = torch.empty(MB, dtype=torch.uint8)
        del a
        b = torch.empty(2 * MB, dtype=torch.uint8)
        del b
    assert live.peak_bytes == 2 * MB
    assert live.live_bytes == 0


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN")
def test_onednn_tensors_count_by_their_elements_until_freed():
    dense = torch.empty(MB // 4)  # made before, not kept: not counted
    with LiveTensors() as live:
        opaque = dense.to_mkldnn()  # 1 MB with no storage
        assert live.live_bytes == MB
        del opaque
        assert live.live_bytes == 0
        kept = dense.to_mkldnn()
    assert live.peak_bytes == MB and live.live_bytes == MB and kept.is_mkldnn


def test_a_storage_that_grows_is_counted_at_its_new_size():
    with LiveTensors() as live:
        a = torch.empty(0)
        a.resize_(MB // 4)  # 1 MB now, in the storage first seen empty
        b = torch.empty(0)
        torch.add(torch.zeros(MB // 4), 1, out=b)  # 1 MB for zeros, 1 MB written into b
    assert live.peak_bytes == 3 * MB
    assert live.live_bytes == 2 * MB and a.numel() == b.numel()


def test_tensors_made_before_count_once_kept_and_go_when_freed():
    weights = [torch.empty(MB // 4), torch.empty(MB // 4)]
    state = {"exp_avg": torch.empty(MB // 2, dtype=torch.uint8), "step": 3}
    extra = torch.empty(MB, dtype=torch.uint8)
    with LiveTensors() as live:
        live.keep(weights, [None], state, weights[0][:5])  # a view of a kept tensor: no more
        live.keep(iter(weights))  # kept twice: still once
        assert live.live_bytes == 2.5 * MB
        live.keep(iter([extra]))  # any iterable, such as model.parameters()
        assert live.live_bytes == 3.5 * MB
        del extra
        assert live.live_bytes == 2.5 * MB
        weights.pop()
        grown = torch.empty(MB, dtype=torch.uint8)
    assert live.peak_bytes == 3.5 * MB  # the freed weight made room for `grown`
    assert live.live_bytes == 2.5 * MB and grown.numel() == MB


def test_the_backward_pass_is_counted():
    x = torch.randn(256, 256, dtype=torch.float64, requires_grad=True)
    with LiveTensors() as forward_only:
        forward_only.keep(x)
        y = (x @ x).tanh().sum()
    with LiveTensors() as both:
        both.keep(x)
        y = (x @ x).tanh().sum()
        y.backward()
    matrix = 256 * 256 * 8
    assert forward_only.peak_bytes >= 3 * matrix  # x, x @ x and its tanh (saved for backward)
    assert both.peak_bytes >= forward_only.peak_bytes + matrix  # and x.grad at least
    assert x.grad is not None


def _step_peak(batch: int, checkpointing: bool) -> float:
    torch.manual_seed(0)
    model_cfg = build(
        ModelConfig,
        dict(hidden_channels=(8, 8), kernel_size=3, patch_size=4, in_channels=1),
    )
    options = SpeedOptions(checkpointing=checkpointing)
    model = apply_speed(build_model(model_cfg), options)
    cfg = build(TrainConfig, dict(batch_size=batch, loss_on_context=True, precision="fp32"))
    step = benchmark._train_step(model, model_cfg, cfg, options, torch.device("cpu"))
    frames = torch.rand(batch, 20, 1, 32, 32)
    step(frames, None)  # gradients and optimizer state exist from here on
    return benchmark.tensor_peak_gib(step, frames)


def test_a_training_steps_peak_grows_with_the_batch_and_checkpointing_lowers_it():
    plain, bigger, recomputed = _step_peak(2, False), _step_peak(4, False), _step_peak(2, True)
    assert bigger > 1.5 * plain
    assert recomputed < 0.8 * plain
