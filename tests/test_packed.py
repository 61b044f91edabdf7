"""Convolutions from weights packed once for oneDNN (convlstm.packed): the same convolution,
kept while the weight is unchanged, and what the fast path streams and forecasts with it."""

import dataclasses
import gc
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F

from convlstm import packed
from convlstm.config import ModelConfig
from convlstm.errors import ConfigError
from convlstm.models import build_model
from convlstm.speed import SpeedOptions, StreamingPredictor, apply_speed

pytestmark = pytest.mark.skipif(not packed.available(), reason="this PyTorch has no oneDNN")

CPU = torch.device("cpu")
BF16_FAST = SpeedOptions.for_path("fast", CPU, amp_dtype=torch.bfloat16)


F32 = {"rtol": 1e-5, "atol": 1e-5}  # float32 against the float64 reference


def _reference(x, weight, bias, padding):
    """The convolution in float64, of the operands as given (already rounded to their dtype)."""
    b = None if bias is None else bias.double()
    return F.conv2d(x.double(), weight.double(), b, padding=padding)


@pytest.mark.parametrize("kernel", [1, 3, 5])
@pytest.mark.parametrize("batch", [1, 3])
def test_a_packed_float32_convolution_equals_the_float64_reference(kernel, batch):
    x = torch.randn(batch, 6, 9, 7)
    weight, bias = torch.randn(10, 6, kernel, kernel), torch.randn(10)
    got = packed.packed_conv(x, packed.pack(weight, kernel // 2, x.shape), bias, kernel // 2)
    assert got.dtype == torch.float32 and got.shape == (batch, 10, 9, 7)
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got.double(), _reference(x, weight, bias, kernel // 2), **F32)


def test_a_packed_bf16_convolution_equals_the_float64_reference_to_bf16_rounding():
    x = torch.randn(2, 16, 8, 8).to(torch.bfloat16)
    weight, bias = (torch.randn(32, 16, 3, 3) / 12).to(torch.bfloat16), torch.randn(32)
    got = packed.packed_conv(x, packed.pack(weight, 1, x.shape), bias.to(torch.bfloat16), 1)
    assert got.dtype == torch.bfloat16
    expected = _reference(x, weight, bias.to(torch.bfloat16), 1)
    # the output is rounded to bf16 once (8 bits): at most half a unit in its last place
    torch.testing.assert_close(got.double(), expected, rtol=2**-8, atol=1e-3)


def test_one_pack_serves_other_batch_sizes_and_float32_inputs():
    weight = torch.randn(8, 4, 3, 3)
    pack = packed.pack(weight, 1, (1, 4, 6, 6))
    for batch in (1, 5):
        x = torch.randn(batch, 4, 6, 6)
        got = packed.packed_conv(x, pack, None, 1)
        torch.testing.assert_close(got.double(), _reference(x, weight, None, 1), **F32)


def _changes(layer: torch.nn.Conv2d):
    """Ways a model's weights change in place; each must be seen by the kept pack."""

    def optimizer_step():
        layer.weight.grad = torch.ones_like(layer.weight)
        layer.bias.grad = torch.ones_like(layer.bias)
        torch.optim.SGD(layer.parameters(), lr=0.1).step()

    def load_state_dict():
        layer.load_state_dict(
            {"weight": torch.randn_like(layer.weight), "bias": torch.randn_like(layer.bias)}
        )

    def bias_alone():
        with torch.no_grad():
            layer.bias.add_(1.0)

    return [
        optimizer_step,
        load_state_dict,
        bias_alone,
        lambda: torch.nn.init.normal_(layer.weight),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kept_pack_is_made_once_and_again_after_each_change(dtype, monkeypatch):
    made = []
    pack = packed.pack
    monkeypatch.setattr(packed, "pack", lambda *a: made.append(1) or pack(*a))
    layer = torch.nn.Conv2d(6, 8, 3, padding=1)
    x = torch.randn(2, 6, 5, 5)

    def expected():
        w, b = layer.weight.detach().to(dtype), layer.bias.detach().to(dtype)
        return F.conv2d(x.to(dtype), w, b, padding=1)

    tol = {} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    with torch.no_grad():
        torch.testing.assert_close(packed.kept_conv(layer, dtype)(x), expected(), **tol)
        packed.kept_conv(layer, dtype)(x)
        assert len(made) == 1
        for change in _changes(layer):
            change()
            torch.testing.assert_close(packed.kept_conv(layer, dtype)(x), expected(), **tol)
        assert len(made) == 1 + len(_changes(layer))


def test_each_input_shape_has_its_own_kept_pack_and_few_are_kept(monkeypatch):
    """oneDNN lays a pack out for an input shape (one made for another can be 80x slower)."""
    made = []
    pack = packed.pack
    monkeypatch.setattr(packed, "pack", lambda *a: made.append(a[2]) or pack(*a))
    layer = torch.nn.Conv2d(4, 6, 3, padding=1)
    with torch.no_grad():
        conv = packed.kept_conv(layer, torch.float32)
        for batch in (1, 2, 1, 2):
            x = torch.randn(batch, 4, 5, 5)
            torch.testing.assert_close(conv(x), layer(x), rtol=1e-5, atol=1e-5)
        assert made == [(1, 4, 5, 5), (2, 4, 5, 5)]
        for batch in range(3, 1 + packed.KEPT_PER_WEIGHT):  # fills the cache, batch 1 oldest
            conv(torch.randn(batch, 4, 5, 5))
        conv(torch.randn(1, 4, 5, 5))  # used again: now the most recent
        made.clear()
        conv(torch.randn(9, 4, 5, 5))  # one over: the least recently used (batch 2) goes
        conv(torch.randn(1, 4, 5, 5))
        assert made == [(9, 4, 5, 5)]
        conv(torch.randn(2, 4, 5, 5))
        assert made == [(9, 4, 5, 5), (2, 4, 5, 5)]
    assert len(packed._KEPT[layer.weight]) == packed.KEPT_PER_WEIGHT


def test_channel_ranges_and_no_bias_pack_their_part_of_the_weight():
    layer = torch.nn.Conv2d(7, 8, 5, padding=2)
    x, h = torch.randn(2, 3, 6, 6), torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        from_x = packed.kept_conv(layer, torch.float32, (0, 3))(x)
        from_h = packed.kept_conv(layer, torch.float32, (3, 7), bias=False)(h)
        whole = packed.kept_conv(layer, torch.float32)(torch.cat([x, h], 1))
    torch.testing.assert_close(from_x + from_h, whole, rtol=1e-5, atol=1e-5)
    w, b = layer.weight.detach(), layer.bias.detach()
    torch.testing.assert_close(from_h.double(), _reference(h, w[:, 3:], None, 2), **F32)
    torch.testing.assert_close(from_x.double(), _reference(x, w[:, :3], b, 2), **F32)


def test_the_kept_pack_does_not_keep_its_weight_alive():
    layer = torch.nn.Conv2d(4, 8, 3, padding=1)
    with torch.no_grad():
        packed.kept_conv(layer, torch.float32)(torch.randn(1, 4, 5, 5))
    gone = weakref.ref(layer.weight)
    del layer
    gc.collect()
    assert gone() is None


def test_what_packs_serve():
    weight = torch.nn.Parameter(torch.randn(8, 4, 3, 3))
    x = torch.randn(1, 4, 5, 5)
    assert packed.serves(x, weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert packed.serves(x, weight)
    with torch.autocast("cpu", dtype=torch.float16):
        assert not packed.serves(x, weight)  # only float32 and bf16 are packed
    assert not packed.serves(x.double(), weight.double())
    with torch.inference_mode():
        frozen = torch.randn(8, 4, 3, 3)  # no version counter to tell a change by
    assert not packed.serves(x, frozen)
    assert packed.compute_dtype(weight) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast leaves float64 alone
        assert packed.compute_dtype(weight.double()) == torch.float64
        assert not packed.serves(x.double(), weight.double())
    with warnings.catch_warnings():  # (its TF32 flag warns on builds without Intel GPUs)
        warnings.simplefilter("ignore")
        with torch.backends.mkldnn.flags(enabled=False):
            assert not packed.serves(x, weight)


def test_a_kept_convolution_held_across_a_change_sees_the_new_weights():
    layer = torch.nn.Conv2d(4, 6, 3, padding=1)
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        conv = packed.kept_conv(layer, torch.float32)
        conv(x)
        layer.weight.mul_(-2.0)
        torch.testing.assert_close(conv(x), layer(x), rtol=1e-5, atol=1e-5)


def test_a_training_sequence_lets_go_of_its_packs_once_backward_has_run():
    from convlstm.wgrad import SequenceConv

    weight = torch.nn.Parameter(torch.randn(4, 4, 3, 3))
    batch = SequenceConv(weight, None, 1, packed=True)
    packs = weakref.ref(batch.packs)
    h = torch.randn(2, 4, 5, 5)
    for _ in range(3):
        h = torch.tanh(batch.conv(h))
    loss = h.sum()
    del batch
    gc.collect()
    assert packs() is not None  # the graph holds them until its backward
    loss.backward()
    gc.collect()
    assert packs() is None and loss.grad_fn is not None and weight.grad is not None


# --- the fast path: streaming and forecasting without autograd ---------------------------


def _models(config: ModelConfig, options: SpeedOptions):
    torch.manual_seed(0)
    fast = apply_speed(build_model(config), options).eval()
    with torch.no_grad():  # biases of their own size, so that one counted twice shows
        for name, p in fast.named_parameters():
            if name.endswith("bias"):
                p.uniform_(-1.0, 1.0)
    plain = apply_speed(build_model(config), dataclasses.replace(options, packed=False)).eval()
    plain.load_state_dict(fast.state_dict())
    return fast, plain


def _count_packed_calls(monkeypatch) -> list:
    calls = []
    run = packed.packed_conv
    monkeypatch.setattr(packed, "packed_conv", lambda *a: calls.append(1) or run(*a))
    return calls


@pytest.mark.parametrize("cell", ["convlstm", "peephole_convlstm", "convgru", "convrnn"])
def test_streaming_from_packs_equals_streaming_without_them(cell, monkeypatch):
    calls = _count_packed_calls(monkeypatch)
    config = ModelConfig(cell=cell, hidden_channels=(8, 6), kernel_size=3, patch_size=2)
    fast, plain = _models(config, BF16_FAST)
    shape = (1, 1, 8, 8)
    stream = StreamingPredictor(fast, shape, autocast_dtype=torch.bfloat16)
    reference = StreamingPredictor(plain, shape, autocast_dtype=torch.bfloat16)
    calls.clear()
    for frame in torch.rand(5, *shape):
        got = stream(frame).clone()
        torch.testing.assert_close(got, reference(frame), rtol=2e-2, atol=2e-2)
    per_frame = {"convgru": 5, "convrnn": 3}.get(cell, 3)  # the cells' convolutions + head
    assert len(calls) == 5 * per_frame


@pytest.mark.parametrize("cell", ["convlstm", "convgru", "convrnn"])
def test_a_forecast_without_grad_runs_every_convolution_from_packs(cell, monkeypatch):
    calls = _count_packed_calls(monkeypatch)
    direct = []
    conv2d = F.conv2d
    monkeypatch.setattr(F, "conv2d", lambda *a, **k: direct.append(1) or conv2d(*a, **k))
    config = ModelConfig(cell=cell, hidden_channels=(8, 6), kernel_size=5, patch_size=2)
    fast, plain = _models(config, BF16_FAST)
    context = torch.rand(2, 4, 1, 8, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = fast(context, 3)
        assert calls and not direct  # the hoisted context, the forecast's steps, the head
        expected = plain(context, 3)
        assert direct
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)


def test_new_weights_loaded_in_place_reach_the_stream():
    config = ModelConfig(hidden_channels=(8,), kernel_size=3, patch_size=2)
    fast, _ = _models(config, BF16_FAST)
    stream = StreamingPredictor(fast, (1, 1, 8, 8), autocast_dtype=torch.bfloat16)
    frame = torch.rand(1, 1, 8, 8)
    before = stream(frame).clone()
    torch.manual_seed(1)
    other = build_model(config)
    fast.load_state_dict(other.state_dict())
    stream.reset()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = other.eval().step(frame, None).prediction
    got = stream(frame)
    assert not torch.allclose(got, before)
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)


def _relative(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("cell", ["convlstm", "convgru", "convrnn"])
def test_training_from_per_sequence_packs_gives_the_unpacked_gradients(cell, monkeypatch):
    """With batched weight gradients, each step's convolution and input gradient run from
    packs made once per sequence; the loss and every gradient stay those of F.conv2d."""
    calls = _count_packed_calls(monkeypatch)
    config = ModelConfig(cell=cell, hidden_channels=(8, 6), kernel_size=5, patch_size=2)
    fast, plain = _models(config, BF16_FAST)
    frames = torch.rand(2, 6, 1, 8, 8)
    losses = []
    for model in (fast, plain):
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = (model(frames[:, :4], 2).float() - frames[:, 4:]).square().mean()
        loss.backward()
        losses.append(loss)
        if model is fast:
            assert calls  # forward and backward ran from packs
            calls.clear()
    assert calls == []
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-2, atol=0)
    for (name, a), b in zip(fast.named_parameters(), plain.parameters(), strict=True):
        assert _relative(a.grad, b.grad) < 2e-2, name


@pytest.mark.parametrize("kernel, with_bias", [(3, True), (5, False), (1, True)])
def test_a_packed_sequence_gives_the_float64_gradients_in_float32(kernel, with_bias):
    from convlstm.wgrad import SequenceConv

    torch.manual_seed(0)
    weight64 = torch.randn(4, 4, kernel, kernel, dtype=torch.float64) / kernel
    bias64 = torch.randn(4, dtype=torch.float64) if with_bias else None
    x64 = torch.randn(2, 4, 6, 5, dtype=torch.float64)
    extra = torch.randn(3, 2, 4, 6, 5, dtype=torch.float64)

    def grads(dtype, packs):
        weight = weight64.to(dtype).requires_grad_()
        bias = None if bias64 is None else bias64.to(dtype).requires_grad_()
        x0 = x64.to(dtype).requires_grad_()
        batch = SequenceConv(weight, bias, kernel // 2, packed=packs)
        assert (batch.packs is not None) == packs
        h, loss = x0, 0.0
        for t in range(3):
            h = torch.tanh(batch.conv(h) + extra[t].to(dtype))
            loss = loss + (h * extra[t].to(dtype)).sum()
        params = [weight, x0] + ([bias] if with_bias else [])
        return torch.autograd.grad(loss, params)

    for got, expected in zip(grads(torch.float32, True), grads(torch.float64, False), strict=True):
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)


def test_the_packed_head_keeps_the_state_dict_of_a_plain_convolution():
    head = packed.Conv2d(4, 2, kernel_size=1)
    plain = torch.nn.Conv2d(4, 2, kernel_size=1)
    plain.load_state_dict(head.state_dict())
    head.packed = True
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(head(x), plain(x))


def test_the_option_is_for_the_cpu_and_for_its_bf16_fast_path():
    assert BF16_FAST.packed
    assert not SpeedOptions.for_path("fast", CPU).packed  # float32: Winograd, no gain measured
    assert not SpeedOptions.for_path("fast", torch.device("cuda")).packed
    with pytest.raises(ConfigError, match="packed is for the CPU"):
        SpeedOptions(packed=True).check(torch.device("cuda"))
