"""A sequence's convolution gradients made otherwise (convlstm.wgrad): weight gradients batched
over time, one call per weight per sequence, and input gradients as forward convolutions of
the flipped filter; the same gradients as autograd's step-by-step ones."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from convlstm.cells.base import sequence_scope
from convlstm.config import ModelConfig
from convlstm.errors import ConfigError
from convlstm.models import build_model
from convlstm.speed import SpeedOptions, apply_speed
from convlstm.wgrad import SequenceConv, flipped
from tests.test_speed import CONVLSTM_CASES, assert_fast_equals_eager, convlstm_config


class ConvBackwardCount(TorchDispatchMode):
    """Counts convolution backward calls: all, those that make an input gradient, and those
    that make a weight gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = self.weight_calls = self.input_calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution_backward.default:
            self.calls += 1
            self.input_calls += bool(args[-1][0])  # output_mask: (input, weight, bias)
            self.weight_calls += bool(args[-1][1])
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
    batch = SequenceConv(weight, bias, padding=1)
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
            SequenceConv(weight, None, padding=1).conv
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
    batch = SequenceConv(weight, None, padding=1)
    loss = _recurrence(batch.conv, weight, 4, x0, extra)
    torch.autograd.grad(loss, x0, retain_graph=True)
    assert batch.tape.firsts == [] and batch.tape.seconds == []
    torch.testing.assert_close(torch.autograd.grad(loss, weight), expected, rtol=1e-10, atol=0)


def test_batched_weight_gradient_refuses_a_second_order_graph():
    weight = torch.randn(2, 2, 3, 3, requires_grad=True)
    x = torch.randn(1, 2, 4, 4, requires_grad=True)
    loss = SequenceConv(weight, None, padding=1).conv(x).square().sum()
    with pytest.raises(RuntimeError, match="create_graph"):
        torch.autograd.grad(loss, weight, create_graph=True)


def test_batched_convolution_casts_like_autocast():
    torch.manual_seed(0)
    weight, bias = torch.randn(8, 4, 3, 3), torch.randn(8)
    x = torch.randn(2, 4, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = F.conv2d(x, weight, bias, padding=1)
        got = SequenceConv(weight, bias, padding=1).conv(x)
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
            assert cell.sequence_conv.__self__.__class__ is SequenceConv
            raise RuntimeError("inside")
    assert cell.sequence_conv is None
    with torch.no_grad():  # inference: plain convolutions, nothing kept
        model(torch.rand(1, 3, 1, 8, 8), 2)
    assert cell.sequence_conv is None


def test_batched_weight_gradients_refuse_checkpointing():
    with pytest.raises(ConfigError, match="batched_wgrad .* checkpointing"):
        SpeedOptions(batched_wgrad=True, checkpointing=True)


@pytest.mark.parametrize("kernel, padding", [(3, 1), (5, 2), (3, 0)])
def test_the_flipped_filters_forward_convolution_is_the_input_gradient(kernel, padding):
    torch.manual_seed(0)
    x = torch.randn(2, 6, 9, 7, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(10, 6, kernel, kernel, dtype=torch.float64)
    out = F.conv2d(x, weight, padding=padding)
    grad = torch.randn_like(out)
    out.backward(grad)
    got = F.conv2d(grad, flipped(weight), padding=kernel - 1 - padding)
    torch.testing.assert_close(got, x.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("batch_wgrad", [False, True], ids=["per-step-wgrad", "batched-wgrad"])
@pytest.mark.parametrize("kernel, with_bias", [(3, True), (5, False)])
def test_forward_dgrad_gradients_equal_autograds_in_float64(kernel, with_bias, batch_wgrad):
    torch.manual_seed(0)
    p = kernel // 2
    weight = torch.randn(3, 3, kernel, kernel, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True) if with_bias else None
    x0 = torch.randn(2, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    extra = torch.randn(4, 2, 3, 5, 6, dtype=torch.float64)
    params = [weight, x0] + ([bias] if with_bias else [])
    loss = _recurrence(lambda h: F.conv2d(h, weight, bias, padding=p), weight, 4, x0, extra)
    expected = torch.autograd.grad(loss, params)
    conv = SequenceConv(weight, bias, p, batch_wgrad=batch_wgrad, forward_dgrad=True).conv
    loss_f = _recurrence(conv, weight, 4, x0, extra)
    torch.testing.assert_close(loss_f, loss, rtol=1e-12, atol=0)
    for g, e in zip(torch.autograd.grad(loss_f, params), expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("batch_wgrad", [False, True], ids=["per-step-wgrad", "batched-wgrad"])
def test_forward_dgrad_makes_no_data_gradient_by_the_library(batch_wgrad):
    """Each step's input gradient is a forward convolution: no convolution backward makes one;
    the weight's gradient is made per step or once, as asked."""
    torch.manual_seed(0)
    weight = torch.randn(4, 4, 3, 3, requires_grad=True)
    x0 = torch.randn(2, 4, 6, 6, requires_grad=True)
    conv = SequenceConv(weight, None, 1, batch_wgrad=batch_wgrad, forward_dgrad=True).conv
    loss = _recurrence(conv, weight, 5, x0, torch.zeros(5, 2, 4, 6, 6))
    with ConvBackwardCount() as count:
        loss.backward()
    assert count.input_calls == 0
    assert count.weight_calls == (1 if batch_wgrad else 5)
    assert x0.grad is not None and x0.grad.abs().sum() > 0


def test_forward_dgrad_keeps_the_channels_last_layout_and_autocasts_dtype():
    torch.manual_seed(0)
    weight = torch.randn(8, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    weight.requires_grad_(True)
    x = torch.randn(2, 4, 5, 5).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        made = SequenceConv(weight, None, 1, batch_wgrad=False, forward_dgrad=True)
        out = made.conv(x)
        expected = F.conv2d(x, weight, padding=1)
    assert made.turned.dtype == torch.bfloat16
    assert made.turned.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    grad = torch.randn_like(out)
    dx, dw = torch.autograd.grad(out, (x, weight), grad)
    dx_e, dw_e = torch.autograd.grad(expected, (x, weight), grad)
    assert dx.dtype == dx_e.dtype == dw.dtype == torch.float32
    torch.testing.assert_close(dx, dx_e, rtol=2e-2, atol=2e-2)  # bf16 sums in another order
    torch.testing.assert_close(dw, dw_e, rtol=0, atol=0)  # the same call makes both


def test_forward_dgrad_refuses_a_second_order_graph_by_its_name():
    weight = torch.randn(2, 2, 3, 3, requires_grad=True)
    x = torch.randn(1, 2, 4, 4, requires_grad=True)
    conv = SequenceConv(weight, None, 1, batch_wgrad=False, forward_dgrad=True).conv
    with pytest.raises(RuntimeError, match="forward_dgrad .* create_graph"):
        torch.autograd.grad(conv(x).square().sum(), x, create_graph=True)


@pytest.mark.parametrize("batched", [False, True], ids=["forward-dgrad", "with-batched-wgrad"])
@CONVLSTM_CASES
def test_model_with_forward_dgrad_equals_eager_in_float64(overrides, hoist, batched):
    options = SpeedOptions(
        hoist=hoist, channels_last=True, batched_wgrad=batched, forward_dgrad=True
    )
    assert_fast_equals_eager(convlstm_config(overrides), options)


@pytest.mark.parametrize("cell, hoist", [("convgru", True), ("convgru", False), ("convrnn", False)])
def test_gru_and_rnn_cells_with_forward_dgrad_equal_eager(cell, hoist):
    config = ModelConfig(hidden_channels=(6, 5), kernel_size=3, patch_size=2, cell=cell)
    options = SpeedOptions(hoist=hoist, forward_dgrad=True)
    assert_fast_equals_eager(config, options)
    ef = ModelConfig(
        architecture="encoder_forecaster", hidden_channels=(4, 6), kernel_size=3, cell=cell
    )
    assert_fast_equals_eager(ef, options)


@pytest.mark.parametrize(
    "cell, hoist",
    [("convlstm", True), ("convlstm", False), ("convgru", True), ("convrnn", False)],
)
def test_forward_dgrad_with_checkpointing_equals_eager(cell, hoist):
    """Each step recomputed in backward runs the sequence's convolutions again."""
    options = SpeedOptions(hoist=hoist, checkpointing=True, forward_dgrad=True)
    assert_fast_equals_eager(convlstm_config({"cell": cell}), options)


@pytest.mark.parametrize("batch_wgrad", [False, True], ids=["per-step-wgrad", "batched-wgrad"])
def test_forward_dgrad_with_a_frozen_weight_makes_the_input_gradient_alone(batch_wgrad):
    torch.manual_seed(0)
    weight = torch.randn(3, 3, 3, 3, dtype=torch.float64)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    x0 = torch.randn(2, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    extra = torch.randn(4, 2, 3, 5, 6, dtype=torch.float64)
    loss = _recurrence(lambda h: F.conv2d(h, weight, bias, padding=1), weight, 4, x0, extra)
    expected = torch.autograd.grad(loss, [x0, bias])
    conv = SequenceConv(weight, bias, 1, batch_wgrad=batch_wgrad, forward_dgrad=True).conv
    got = torch.autograd.grad(_recurrence(conv, weight, 4, x0, extra), [x0, bias])
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cell", ["convlstm", "convgru", "convrnn"])
def test_a_model_with_forward_dgrad_makes_no_data_gradient_by_the_library(cell):
    """Every recurrent convolution's input gradient (hoisted or per step) is made by a forward
    convolution; only the 1x1 output head's is the library's."""
    torch.manual_seed(0)
    config = ModelConfig(hidden_channels=(6, 5), kernel_size=3, patch_size=2, cell=cell)
    counts = {}
    for on in (False, True):
        model = apply_speed(build_model(config), SpeedOptions(hoist=True, forward_dgrad=on))
        loss = model(torch.rand(2, 4, 1, 8, 8), 4).square().mean()
        with ConvBackwardCount() as counts[on]:
            loss.backward()
    assert counts[False].input_calls > 4
    assert counts[True].input_calls == 4  # the head, at the 4 forecast frames
    assert counts[True].weight_calls == counts[False].weight_calls


@pytest.mark.parametrize("other", ["winograd", "packed"])
def test_forward_dgrad_refuses_the_cpus_other_convolutions(other):
    with pytest.raises(ConfigError, match=f"forward_dgrad and {other}"):
        SpeedOptions(forward_dgrad=True, **{other: True})
