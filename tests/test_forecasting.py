"""FastForecast (convlstm.forecasting) on the CPU: the model's own forecast, whichever way
the machine runs it (float32 with Winograd uncompiled; bf16 compiled where that pays; float64
unchanged), its refusals, and its fallback when compiling fails. GraphedForecast, the CUDA
graph, is tested in tests/test_gpu.py; here only its refusal of a CPU model."""

import warnings

import pytest
import torch

from convlstm import compiled, forecasting, training, winograd
from convlstm.config import ModelConfig
from convlstm.errors import ConfigError, ShapeError
from convlstm.forecasting import FastForecast, GraphedForecast
from convlstm.models import build_model

SMALL = ModelConfig(hidden_channels=(4, 3), kernel_size=3, patch_size=2)
EF = ModelConfig(architecture="encoder_forecaster", hidden_channels=(4, 6), stage_strides=(1, 2))


def _twins(config, dtype=torch.float32):
    """Two copies of one model: the reference and the one FastForecast switches."""
    torch.manual_seed(0)
    reference = build_model(config).to(dtype).eval()
    fast = build_model(config).to(dtype)
    fast.load_state_dict(reference.state_dict())
    return reference, fast


@pytest.mark.parametrize("config", [SMALL, EF], ids=["stacked", "encoder-forecaster"])
def test_a_float32_cpu_forecast_is_the_models_forecast(monkeypatch, config):
    """Without AMX-BF16 units: float32, hoisted, the convolutions by Winograd (32x32 frames:
    grids of 16x16, resp. 8x8 and 4x4, at batch 2), not compiled; equal to the eager model to
    Winograd's float32 rounding. Any dtype of context is taken."""
    monkeypatch.setattr(training, "cpu_bf16_units", lambda: False)
    reference, fast = _twins(config)
    forecast = FastForecast(fast, (2, 3, 1, 32, 32), horizon=5)
    assert forecast.how == "plain" and forecast.dtype is None
    assert any(getattr(m, "hoist", False) for m in fast.modules())  # the fast path's options
    context = torch.rand(2, 3, 1, 32, 32)
    with torch.no_grad():
        want = reference(context, 5)
    by_winograd, call = [], winograd.WinogradSequence.__call__
    monkeypatch.setattr(
        winograd.WinogradSequence, "__call__", lambda *a: by_winograd.append(1) or call(*a)
    )
    got = forecast(context.double())
    assert by_winograd
    assert got.dtype == torch.float32 and got.shape == (2, 5, 1, 32, 32)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_a_float64_model_forecasts_in_float64():
    reference, fast = _twins(SMALL, torch.float64)
    forecast = FastForecast(fast, (2, 3, 1, 8, 8), horizon=4)
    assert forecast.dtype is None and forecast.how == "plain"  # (compile_pays: float32 only)
    context = torch.rand(2, 3, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        want = reference(context, 4)
    got = forecast(context)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-12)


@pytest.mark.skipif(not compiled.available(), reason="no C++ compiler for Inductor")
def test_with_amx_units_a_forecast_runs_compiled_in_bf16(monkeypatch):
    """Where the CPU has AMX-BF16 units (here pretended where it has none: the numbers are
    the same, only slower), the forecast is bf16 and compiled whole; within bf16 rounding of
    the float32 model."""
    monkeypatch.setattr(training, "cpu_bf16_units", lambda: True)
    reference, fast = _twins(SMALL)
    forecast = FastForecast(fast, (2, 3, 1, 8, 8), horizon=3)
    assert forecast.how == "compiled" and forecast.dtype == torch.bfloat16
    context = torch.rand(2, 3, 1, 8, 8)
    with torch.no_grad():
        want = reference(context, 3)
    got = forecast(context)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.03)


def test_compile_false_keeps_the_forecast_uncompiled(monkeypatch):
    monkeypatch.setattr(training, "cpu_bf16_units", lambda: True)
    monkeypatch.setattr(compiled, "available", lambda: True)
    built = []
    monkeypatch.setattr(forecasting, "CompiledForecast", lambda *a, **k: built.append(a))
    forecast = FastForecast(build_model(SMALL), (2, 3, 1, 8, 8), horizon=2, compile=False)
    assert forecast.how == "plain" and forecast.dtype == torch.bfloat16 and not built


def test_a_failed_compilation_falls_back_with_a_warning_unless_compiling_was_asked(monkeypatch):
    def failing(*args, **kwargs):
        raise RuntimeError("\nfatal error: Python.h: No such file\n")

    monkeypatch.setattr(training, "cpu_bf16_units", lambda: True)
    monkeypatch.setattr(compiled, "available", lambda: True)
    monkeypatch.setattr(forecasting, "CompiledForecast", failing)
    reference, fast = _twins(SMALL)
    with pytest.warns(UserWarning, match="failed \\(RuntimeError: fatal error: Python.h"):
        forecast = FastForecast(fast, (2, 3, 1, 8, 8), horizon=2)
    assert forecast.how == "plain"
    context = torch.rand(2, 3, 1, 8, 8)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        want = reference(context, 2)
    torch.testing.assert_close(forecast(context).float(), want.float(), rtol=0.05, atol=0.03)
    with pytest.raises(RuntimeError, match="Python.h"):
        FastForecast(build_model(SMALL), (2, 3, 1, 8, 8), horizon=2, compile=True)


@pytest.mark.skipif(not compiled.available(), reason="no C++ compiler for Inductor")
def test_a_mistake_in_the_shape_is_itself_where_the_forecast_would_compile(monkeypatch):
    """Not a failed compilation's warning and an uncompiled fallback: the model's own error."""
    monkeypatch.setattr(training, "cpu_bf16_units", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ShapeError, match="channels"):
            FastForecast(build_model(SMALL), (2, 3, 2, 8, 8), horizon=2)


def test_bad_shapes_and_devices_are_refused():
    model = build_model(SMALL)
    with pytest.raises(ShapeError, match="must be \\(B, T, C, H, W\\)"):
        FastForecast(model, (2, 1, 8, 8), horizon=2)
    with pytest.raises(ShapeError, match="horizon must be at least 1"):
        FastForecast(model, (2, 3, 1, 8, 8), horizon=0)
    with pytest.raises(ShapeError, match="channels"):  # the model's own check, as itself
        FastForecast(model, (2, 3, 2, 8, 8), horizon=2, compile=False)
    forecast = FastForecast(model, (2, 3, 1, 8, 8), horizon=2, compile=False)
    with pytest.raises(ShapeError, match="made for contexts \\(2, 3, 1, 8, 8\\), got \\(1, 3"):
        forecast(torch.rand(1, 3, 1, 8, 8))
    with pytest.raises(ConfigError, match="CUDA device, not cpu"):
        GraphedForecast(build_model(SMALL), (2, 3, 1, 8, 8), horizon=2)
    with pytest.raises(ConfigError, match="compile is for the CPU, not for meta"):
        FastForecast(build_model(SMALL).to("meta"), (2, 3, 1, 8, 8), horizon=2, compile=True)
