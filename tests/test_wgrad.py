"""Weight gradients batched over time (convlstm.wgrad): the same gradients as autograd's
step-by-step ones, made in one call per weight per sequence."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from convlstm.cells.base import sequence_scope
from convlstm.config import ModelConfig
from convlstm.errors import ConfigError
from convlstm.models import build_model
from convlstm.speed import SpeedOptions, apply_speed
from convlstm.wgrad import WeightGradBatch
from tests.test_speed import CONVLSTM_CASES, assert_fast_equals_eager, convlstm_config


class ConvBackwardCount(TorchDispatchMode):
    """Counts convolution backward calls: all, and those that make a weight gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = self.weight_calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution_backward.default:
            self.calls += 1
            self.weight_calls += bool(args[-1][1])  # output_mask: (input, weight, bias)
        return func(*args, **(kwargs or {}))


def _recurrence(conv, weight, steps, x0, extra):
    """A toy recurrence through one shared convolution; loss also reads the weight directly."""
    h, outs = x0, []
    for t in range(steps):
        h = torch.tanh(conv(h) + extra[t])
        outs.append(h)
    return torch.stack(outs).square().sum() + weight.sum() * 0.5


@pytest.mark.parametrize("with_bias", [True, False])
def test_batched_weight_gradient_equals_the_per_step_one_in_float64(with_bias):
    torch.manual_seed(0)
    weight = torch.randn(3, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True) if with_bias else None
    x0 = torch.randn(2, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    extra = torch.randn(4, 2, 3, 5, 6, dtype=torch.float64)
    params = [weight, x0] + ([bias] if with_bias else [])

    def plain(h):
        return F.conv2d(h, weight, bias, padding=1)

    loss = _recurrence(plain, weight, 4, x0, extra)
    expected = torch.autograd.grad(loss, params)
    batch = WeightGradBatch(weight, bias, padding=1)
    loss_b = _recurrence(batch.conv, weight, 4, x0, extra)
    torch.testing.assert_close(loss_b, loss, rtol=1e-12, atol=0)
    got = torch.autograd.grad(loss_b, params)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_batched_weight_gradient_is_one_call_per_sequence():
    torch.manual_seed(0)
    weight = torch.randn(4, 4, 3, 3, requires_grad=True)
    x0 = torch.randn(2, 4, 6, 6, requires_grad=True)
    extra = torch.zeros(5, 2, 4, 6, 6)
    counts = {}
    for name in ("plain", "batched"):
        conv = (
            WeightGradBatch(weight, None, padding=1).conv
            if name == "batched"
            else lambda h: F.conv2d(h, weight, padding=1)
        )
        loss = _recurrence(conv, weight, 5, x0, extra)
        with ConvBackwardCount() as counts[name]:
            loss.backward()
    assert (counts["plain"].calls, counts["plain"].weight_calls) == (5, 5)
    assert (counts["batched"].calls, counts["batched"].weight_calls) == (6, 1)


def test_a_backward_that_stops_short_of_the_weight_keeps_nothing():
    """autograd.grad of the first state alone must not leave its steps in the batch (a later
    full backward would count them twice, and they would stay alive)."""
    torch.manual_seed(0)
    weight = torch.randn(3, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    x0 = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    extra = torch.randn(4, 2, 3, 5, 5, dtype=torch.float64)
    expected = torch.autograd.grad(
        _recurrence(lambda h: F.conv2d(h, weight, padding=1), weight, 4, x0, extra), weight
    )
    batch = WeightGradBatch(weight, None, padding=1)
    loss = _recurrence(batch.conv, weight, 4, x0, extra)
    torch.autograd.grad(loss, x0, retain_graph=True)
    assert batch.tape.firsts == [] and batch.tape.seconds == []
    torch.testing.assert_close(torch.autograd.grad(loss, weight), expected, rtol=1e-10, atol=0)


def test_batched_weight_gradient_refuses_a_second_order_graph():
    weight = torch.randn(2, 2, 3, 3, requires_grad=True)
    x = torch.randn(1, 2, 4, 4, requires_grad=True)
    loss = WeightGradBatch(weight, None, padding=1).conv(x).square().sum()
    with pytest.raises(RuntimeError, match="create_graph"):
        torch.autograd.grad(loss, weight, create_graph=True)


def test_batched_convolution_casts_like_autocast():
    torch.manual_seed(0)
    weight, bias = torch.randn(8, 4, 3, 3), torch.randn(8)
    x = torch.randn(2, 4, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = F.conv2d(x, weight, bias, padding=1)
        got = WeightGradBatch(weight, bias, padding=1).conv(x)
    assert got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@CONVLSTM_CASES
def test_model_with_batched_weight_gradients_equals_eager_in_float64(overrides, hoist):
    options = SpeedOptions(hoist=hoist, channels_last=True, batched_wgrad=True)
    assert_fast_equals_eager(convlstm_config(overrides), options)


def _weight_calls(config: ModelConfig, hoist: bool, batched: bool) -> int:
    torch.manual_seed(0)
    options = SpeedOptions(hoist=hoist, batched_wgrad=batched)
    model = apply_speed(build_model(config), options)
    loss = model(torch.rand(2, 4, 1, 8, 8), 4).square().mean()
    with ConvBackwardCount() as count:
        loss.backward()
    return count.weight_calls


@pytest.mark.parametrize(
    "hoist, plain, batched",
    # per layer: hoisted, W_x once + W_h at context steps 2..4 (plain) or once (batched); per
    # step, the [x, h] convolution at the 4 context steps; then 3 forecast steps. The 1x1
    # output convolution runs once per forecast step (4), not batched.
    [(True, 2 * (1 + 3 + 3) + 4, 2 * (1 + 1 + 1) + 4), (False, 2 * (4 + 3) + 4, 2 * 2 + 4)],
    ids=["hoisted", "per-step"],
)
def test_stacked_model_makes_each_gate_weight_gradient_once_per_phase(hoist, plain, batched):
    config = ModelConfig(hidden_channels=(6, 5), kernel_size=3, patch_size=2)
    assert _weight_calls(config, hoist, batched=False) == plain
    assert _weight_calls(config, hoist, batched=True) == batched


@pytest.mark.parametrize(
    "cell, hoist", [("convgru", True), ("convgru", False), ("convrnn", False)]
)  # ConvRNN is never hoisted
def test_gru_and_rnn_cells_batch_their_weight_gradients(cell, hoist):
    """Equal to eager in float64; per layer, each convolution's weight gradient is made once
    per phase (context, forecast) instead of once per step."""
    config = ModelConfig(hidden_channels=(6, 5), kernel_size=3, patch_size=2, cell=cell)
    options = SpeedOptions(hoist=hoist, channels_last=True, batched_wgrad=True)
    assert_fast_equals_eager(config, options)
    ef = ModelConfig(
        architecture="encoder_forecaster", hidden_channels=(4, 6), kernel_size=3, cell=cell
    )
    assert_fast_equals_eager(ef, options)  # forecaster cells without input, too
    # 2 layers, 4 context and 3 forecast steps, plus the 1x1 head at the 4 forecast frames.
    # ConvGRU: W_x and W_h per step (W_x once over the context when hoisted); ConvRNN: its
    # one [x, h] convolution per step (it is never hoisted)
    plain = {"convgru": 2 * ((1 + 4) if hoist else 2 * 4) + 2 * 2 * 3, "convrnn": 2 * 7}[cell]
    batched = {"convgru": 2 * 2 * 2, "convrnn": 2 * 2}[cell]
    assert _weight_calls(config, hoist, batched=False) == plain + 4
    assert _weight_calls(config, hoist, batched=True) == batched + 4


def test_encoder_forecaster_batches_its_encoder_and_forecaster_cells():
    config = ModelConfig(
        architecture="encoder_forecaster", hidden_channels=(4, 6), kernel_size=3, patch_size=2
    )
    saved = _weight_calls(config, True, False) - _weight_calls(config, True, True)
    # encoder, 2 layers: W_h at steps 2..4 -> once; forecaster, 2 cells x 4 steps -> once each
    assert saved == 2 * (3 - 1) + 2 * (4 - 1)


def test_no_batch_without_grad_and_the_scope_always_closes():
    config = ModelConfig(hidden_channels=(4,), kernel_size=3, patch_size=2)
    model = apply_speed(build_model(config), SpeedOptions(batched_wgrad=True))
    cell = model.layers[0].cell
    with torch.no_grad(), sequence_scope([cell]):
        assert cell.sequence_conv is None
    with pytest.raises(RuntimeError, match="inside"):
        with sequence_scope([cell]):
            assert cell.sequence_conv.__self__.__class__ is WeightGradBatch
            raise RuntimeError("inside")
    assert cell.sequence_conv is None
    with torch.no_grad():  # inference: plain convolutions, nothing kept
        model(torch.rand(1, 3, 1, 8, 8), 2)
    assert cell.sequence_conv is None


def test_batched_weight_gradients_refuse_checkpointing():
    with pytest.raises(ConfigError, match="batched_wgrad .* checkpointing"):
        SpeedOptions(batched_wgrad=True, checkpointing=True)
