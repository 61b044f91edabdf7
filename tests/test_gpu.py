"""CUDA training in reduced precision (skipped without a GPU)."""

import dataclasses

import pytest
import torch

from convlstm.speed import SpeedOptions
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


def _fast_path_with(monkeypatch, **changes: bool) -> None:
    """TrainConfig.path="fast" with `changes` to its SpeedOptions (e.g. batched_wgrad, off by
    default)."""
    for_path = SpeedOptions.for_path
    monkeypatch.setattr(
        SpeedOptions,
        "for_path",
        classmethod(
            lambda cls, path, dev, checkpointing=False, amp_dtype=None: dataclasses.replace(
                for_path(path, dev, checkpointing, amp_dtype),
                **(changes if path == "fast" else {}),
            )
        ),
    )


@pytest.mark.parametrize(
    "changes",
    [{}, {"batched_wgrad": True}, {"batched_wgrad": True, "forward_dgrad": True}],
    ids=["", "batched-wgrad", "batched-wgrad-forward-dgrad"],
)
def test_fast_path_with_a_cuda_graph_follows_eager_training(tmp_path, monkeypatch, changes):
    """fp32, scheduled sampling active for the first steps (the graph reads a mask), then
    off (an all-False mask): the graphed run follows the eager one; also with the gate
    weights' gradients batched over time and the input gradients made as forward
    convolutions (convlstm.wgrad) inside the graph."""
    device = cuda_or_skip()
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # full fp32 convolutions
    _fast_path_with(monkeypatch, **changes)
    runs = {
        path: _train(
            tmp_path,
            path,
            steps=8,
            checkpoint_every=0,
            precision="fp32",
            device=str(device),
            path=path,
        )
        for path in ("eager", "fast")
    }
    assert "cuda_graph" in runs["fast"]["speed"] and runs["eager"]["speed"] == "eager"
    for name in ("batched_wgrad", "forward_dgrad"):
        assert (name in runs["fast"]["speed"]) == (name in changes)
    eager = torch.tensor([loss for _, loss in runs["eager"]["losses"]])
    fast = torch.tensor([loss for _, loss in runs["fast"]["losses"]])
    torch.testing.assert_close(fast, eager, rtol=1e-4, atol=1e-6)


def _bf16_fast_run(tmp_path, name: str, **overrides) -> dict:
    """40 steps of bf16 training on the fast path; the loss must be finite and fall."""
    result = _train(
        tmp_path,
        name,
        steps=40,
        log_every=10,
        checkpoint_every=0,
        precision="bf16",
        device=str(cuda_or_skip()),
        path="fast",
        **overrides,
    )
    losses = [loss for _, loss in result["losses"]]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    return result


def test_bf16_fast_training_lowers_the_loss(tmp_path):
    _bf16_fast_run(tmp_path, "bf16", activation_checkpointing=True)


@pytest.mark.parametrize("option", ["batched_wgrad", "forward_dgrad"])
def test_bf16_graphed_training_with_a_gradient_option_lowers_the_loss(
    tmp_path, monkeypatch, option
):
    """bf16, channels-last, inside the graph: batched weight gradients, or input gradients as
    forward convolutions (with the weights' gradients made step by step)."""
    cuda_or_skip()
    _fast_path_with(monkeypatch, **{option: True})
    result = _bf16_fast_run(tmp_path, option)
    assert "cuda_graph" in result["speed"] and option in result["speed"]


def test_bf16_graphed_training_of_an_encoder_forecaster_lowers_the_loss(tmp_path):
    """Its forecaster runs layer by layer inside the CUDA graph (hoisted, compiled gates)."""
    from convlstm.config import ModelConfig

    config = ModelConfig(
        architecture="encoder_forecaster",
        hidden_channels=(6, 8),
        patch_size=2,
        stage_strides=(1, 2),
    )
    result = _bf16_fast_run(tmp_path, "bf16-ef", model_cfg=config, scheduled_sampling="none")
    assert "cuda_graph" in result["speed"] and "hoist" in result["speed"]


def test_compiled_gates_equal_eager_on_cuda():
    device = cuda_or_skip()
    from convlstm.cells.lstm import lstm_update
    from convlstm.gates import fused_lstm_update

    z = torch.randn(4, 32, 8, 8, device=device)
    c = torch.randn(4, 8, 8, 8, device=device)
    more = torch.randn(4, 32, 8, 8, device=device)
    fused = fused_lstm_update(compiled=True)
    for extra in (None, more):
        inputs = [t.clone().requires_grad_() for t in (z, c)]
        if extra is not None:
            inputs.append(extra.clone().requires_grad_())
        grads = []
        for fn in (lstm_update, fused):
            outputs = fn(*inputs)
            (outputs[0].sum() + (outputs[1] ** 2).sum()).backward()
            grads.append([t.grad for t in inputs])
            for t in inputs:
                t.grad = None
        torch.testing.assert_close(fused(*inputs), lstm_update(*inputs))
        for a, b in zip(*grads, strict=True):
            torch.testing.assert_close(b, a)


@pytest.mark.gpu
@pytest.mark.parametrize("with_more", [False, True], ids=["z", "z+z_more"])
def test_compiled_gates_with_low_precision_h_on_cuda(with_more):
    """The compiled kernels with low_precision_h (the CUDA fast path's default): h is the
    float32 h rounded to bf16, c and every gradient within float rounding of the compiled
    update without it, given the same dh."""
    device = cuda_or_skip()
    from convlstm.gates import fused_lstm_update

    torch.manual_seed(0)
    cl = torch.channels_last
    make = dict(device=device)
    z = torch.randn(4, 32, 8, 8, **make).bfloat16().contiguous(memory_format=cl)
    c = torch.randn(4, 8, 8, 8, **make).contiguous(memory_format=cl)
    more = torch.randn(4, 32, 8, 8, **make).bfloat16().contiguous(memory_format=cl)
    inputs = (z, c, more) if with_more else (z, c)
    dh, dc = torch.randn(4, 8, 8, 8, **make).bfloat16(), torch.randn(4, 8, 8, 8, **make)
    results = {}
    for low in (False, True):
        leaves = [t.clone().requires_grad_() for t in inputs]
        h, c_new = fused_lstm_update(compiled=True, low_precision_h=low)(*leaves)
        torch.autograd.backward((h, c_new), (dh.to(h.dtype), dc))
        results[low] = (h, c_new, [t.grad for t in leaves])
    (h32, c32, grads32), (h16, c16, grads16) = results[False], results[True]
    assert h32.dtype == torch.float32 and h16.dtype == torch.bfloat16
    # (two compilations may round differently in the last float32 place: bf16 of it within
    # one bf16 step)
    torch.testing.assert_close(h16.float(), h32.bfloat16().float(), rtol=8e-3, atol=1e-5)
    torch.testing.assert_close(c16, c32)
    for g16, g32 in zip(grads16, grads32, strict=True):
        assert g16.dtype == g32.dtype
        torch.testing.assert_close(g16.float(), g32.float(), rtol=8e-3, atol=1e-5)


def test_streaming_graph_equals_eager_steps():
    device = cuda_or_skip()
    from convlstm.config import ModelConfig
    from convlstm.models import build_model
    from convlstm.speed import StreamingPredictor

    model = build_model(ModelConfig(hidden_channels=(8, 8), patch_size=4)).to(device).eval()
    stream = StreamingPredictor(model, (2, 1, 16, 16))
    assert stream.graph_mode
    state = None
    with torch.no_grad():
        for frame in torch.rand(6, 2, 1, 16, 16, device=device):
            state = model.step(frame, state)
            torch.testing.assert_close(stream(frame), state.prediction, rtol=2e-3, atol=1e-4)


def test_the_fast_streaming_predictor_on_cuda_follows_eager_steps():
    """StreamingPredictor.fast on CUDA: bf16, compiled gates, channels-last, one graph per
    frame; its predictions stay within bf16 rounding of the float32 eager steps."""
    device = cuda_or_skip()
    from convlstm.config import ModelConfig
    from convlstm.models import build_model
    from convlstm.speed import StreamingPredictor

    torch.manual_seed(0)
    eager = build_model(ModelConfig(hidden_channels=(8, 8), patch_size=4)).to(device).eval()
    fast = build_model(ModelConfig(hidden_channels=(8, 8), patch_size=4)).to(device)
    fast.load_state_dict(eager.state_dict())
    stream = StreamingPredictor.fast(fast, (2, 1, 16, 16))
    assert stream.graph_mode and stream.dtype == torch.bfloat16 and fast.layers[0].hoist
    state = None
    with torch.no_grad():
        for frame in torch.rand(6, 2, 1, 16, 16, device=device):
            state = eager.step(frame, state)
            torch.testing.assert_close(
                stream(frame).float(), state.prediction, rtol=0.05, atol=0.02
            )


def test_device_generator_equals_the_cpu_stream(mnist_dir):
    device = cuda_or_skip()
    from datasets.mnist import load_mnist
    from datasets.moving_mnist import DeviceMovingMNIST, generate_batch

    digits, _ = load_mnist("train", mnist_dir)
    batch = DeviceMovingMNIST(digits, device).batch(7, range(100, 164))
    assert batch.device.type == "cuda"
    assert torch.equal(batch.cpu(), generate_batch(digits, 7, range(100, 164)))


def test_encoder_forecaster_fast_path_equals_eager_on_cuda(monkeypatch):
    """The CUDA fast path's options on an encoder-forecaster (its forecaster layer by layer,
    compiled gates, channels-last) against eager, fp32 without TF32: outputs and gradients."""
    from convlstm.config import ModelConfig
    from convlstm.models import build_model
    from convlstm.speed import apply_speed

    device = cuda_or_skip()
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    config = ModelConfig(
        architecture="encoder_forecaster", hidden_channels=(8, 12), stage_strides=(1, 2)
    )
    torch.manual_seed(0)
    eager = build_model(config).to(device)
    fast = build_model(config).to(device)
    fast.load_state_dict(eager.state_dict())
    apply_speed(fast, SpeedOptions.for_path("fast", device))
    assert fast.hoist
    context = torch.rand(2, 4, 1, 32, 32, device=device)
    results = []
    for model in (eager, fast):
        out = model(context, 5)
        out.square().mean().backward()
        results.append((out, [p.grad for p in model.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-5)
    for g_fast, g_eager in zip(results[1][1], results[0][1], strict=True):
        torch.testing.assert_close(g_fast, g_eager, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("architecture", ["stacked", "encoder_forecaster"])
def test_a_graphed_forecast_is_the_models_forecast(monkeypatch, architecture):
    """GraphedForecast on the CUDA fast path's options (hoisting, compiled gates,
    channels-last), fp32 without TF32: each replay is the model's forecast of its context,
    and weights changed in place are read by the next replay."""
    from convlstm.config import ModelConfig
    from convlstm.forecasting import GraphedForecast
    from convlstm.models import build_model
    from convlstm.speed import apply_speed

    device = cuda_or_skip()
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    config = ModelConfig(architecture=architecture, hidden_channels=(8, 12))  # (strides 1, 2)
    torch.manual_seed(0)
    model = apply_speed(build_model(config).to(device), SpeedOptions.for_path("fast", device))
    forecast = GraphedForecast(model, (2, 4, 1, 32, 32), horizon=5)
    for scale in (1.0, 1.0, 0.5):
        if scale != 1.0:
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.mul_(scale)
        context = torch.rand(2, 4, 1, 32, 32, device=device)
        with torch.no_grad():
            want = model(context, 5)
        got = forecast(context)
        assert got.shape == (2, 5, 1, 32, 32)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_the_fast_forecast_on_cuda_is_one_bf16_graph_near_the_float32_model():
    from convlstm.config import ModelConfig
    from convlstm.forecasting import FastForecast
    from convlstm.models import build_model

    device = cuda_or_skip()
    torch.manual_seed(0)
    eager = build_model(ModelConfig(hidden_channels=(8, 8), patch_size=4)).to(device).eval()
    fast = build_model(ModelConfig(hidden_channels=(8, 8), patch_size=4)).to(device)
    fast.load_state_dict(eager.state_dict())
    forecast = FastForecast(fast, (3, 5, 1, 16, 16), horizon=6)
    assert forecast.how == "graph" and forecast.dtype == torch.bfloat16
    context = torch.rand(3, 5, 1, 16, 16, device=device)
    with torch.no_grad():
        want = eager(context, 6)
    torch.testing.assert_close(forecast(context).float(), want, rtol=0.05, atol=0.02)
