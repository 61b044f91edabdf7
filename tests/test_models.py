import math

import numpy as np
import pytest
import torch

from convlstm.config import PRESETS, ModelConfig, from_name
from convlstm.errors import ShapeError
from convlstm.models import EncoderForecaster, StackedForecaster, build_model
from tests import reference as ref


def tiny(name: str) -> ModelConfig:
    """The preset's structure at test size: same architecture and layer count, few channels."""
    base = from_name(name)
    overrides = {"hidden_channels": tuple(4 + i for i in range(len(base.hidden_channels)))}
    if base.architecture != "fc_lstm":
        overrides["kernel_size"] = 3
    if base.frame_size:
        overrides["frame_size"] = (16, 16)  # the tests' frames
    if base.stage_strides and 16 % (base.patch_size * math.prod(base.stage_strides)):
        overrides["patch_size"] = 16 // math.prod(base.stage_strides)  # fits the tests' frames
    return from_name(name, **overrides)


def _np(t):
    return t.detach().double().numpy()


def test_stacked_forecaster_matches_float64_reference():
    torch.manual_seed(0)
    cfg = ModelConfig(
        hidden_channels=(3, 2), kernel_size=3, patch_size=2, output_activation="sigmoid"
    )
    model = StackedForecaster(cfg).double()
    for p in model.parameters():  # move away from the default init so every weight matters
        p.data.normal_(0, 0.5)
    frames = torch.rand(2, 5, 1, 4, 6, dtype=torch.float64)
    context, horizon = frames[:, :3], 3
    preds = model(context, horizon)

    cells = [layer.cell.conv for layer in model.layers]
    weights = [(_np(c.weight), _np(c.bias)) for c in cells]
    head_w, head_b = _np(model.head.weight)[:, :, 0, 0], _np(model.head.bias)
    states = [(np.zeros((2, 3, 2, 3)), np.zeros((2, 3, 2, 3))), (np.zeros((2, 2, 2, 3)),) * 2]

    def step(frame):
        x = ref.patchify(frame, 2)
        for i, (w, b) in enumerate(weights):
            h, c = ref.convlstm_step(x, *states[i], w, b)
            states[i] = (h, c)
            x = h
        grid = np.einsum("bchw,oc->bohw", x, head_w) + head_b[None, :, None, None]
        return ref.unpatchify(ref.sigmoid(grid), 2)

    for t in range(3):
        pred = step(_np(context[:, t]))
    expected = [pred]
    for _ in range(horizon - 1):  # forecasting feeds each prediction back in
        pred = step(pred)
        expected.append(pred)
    np.testing.assert_allclose(_np(preds), np.stack(expected, axis=1), rtol=1e-10, atol=1e-12)


def test_teacher_mask_feeds_true_frames_where_set():
    torch.manual_seed(0)
    model = StackedForecaster(ModelConfig(hidden_channels=(4,), kernel_size=3, patch_size=2))
    context, targets = torch.rand(2, 3, 1, 4, 4), torch.rand(2, 4, 1, 4, 4)
    all_truth = torch.ones(2, 3, dtype=torch.bool)
    forced = model(context, 4, targets=targets, teacher_mask=all_truth)
    # teacher forcing everywhere == encoding context + true targets, one prediction per step
    state = model.encode(torch.cat([context, targets[:, :3]], dim=1))
    torch.testing.assert_close(forced[:, -1], state.prediction)
    free = model(context, 4)
    assert not torch.allclose(forced[:, 1:], free[:, 1:])
    torch.testing.assert_close(forced[:, 0], free[:, 0])  # the first step never sees a target


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_streaming_one_frame_at_a_time_equals_one_call(name):
    torch.manual_seed(0)
    model = build_model(tiny(name)).eval()
    context = torch.rand(2, 6, 1, 16, 16)
    if model.config.bidirectional:  # reads the whole context at once: continuing is an error
        with pytest.raises(ShapeError, match="bidirectional"):
            model.step(context[:, 1], model.encode(context[:, :1]))
        return
    with torch.no_grad():
        whole = model.forecast(model.encode(context), 5)
        state = None
        for t in range(6):
            state = model.step(context[:, t], state)
        streamed = model.forecast(state, 5)
        split = model.forecast(model.encode(context[:, 3:], model.encode(context[:, :3])), 5)
    torch.testing.assert_close(streamed, whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    model = build_model(tiny(name))
    context, target = torch.rand(2, 4, 1, 16, 16), torch.rand(2, 3, 1, 16, 16)
    preds = model(context, 3)
    assert preds.shape == target.shape and torch.isfinite(preds).all()
    ((preds - target) ** 2).mean().backward()
    missing = [
        n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0
    ]
    assert not missing, f"no gradient reaches {missing}"


def test_encoder_forecaster_rolls_out_any_horizon_and_starts_from_encoder_state():
    torch.manual_seed(0)
    model = EncoderForecaster(tiny("mmnist-encoder-forecaster")).eval()
    context = torch.rand(2, 5, 1, 16, 16)
    with torch.no_grad():
        state = model.encode(context)
        long = model.forecast(state, 7)
        short = model.forecast(state, 3)
        other = model.forecast(model.encode(torch.rand(2, 5, 1, 16, 16)), 3)
    assert long.shape == (2, 7, 1, 16, 16)
    torch.testing.assert_close(long[:, :3], short)  # rolling out does not change the state given
    assert not torch.allclose(other, short)  # the forecast depends on the context


def test_encoder_forecaster_layers_shrink_the_grid_by_their_strides():
    model = EncoderForecaster(tiny("mmnist-encoder-forecaster"))  # patch 4, strides (1, 2, 2)
    state = model.encode(torch.rand(1, 2, 1, 64, 64))
    assert [tuple(h.shape[-2:]) for h, _ in state.layers] == [(16, 16), (8, 8), (4, 4)]


def test_bad_inputs_are_shape_errors():
    model = build_model(tiny("mmnist-cpu-small"))
    with pytest.raises(ShapeError, match=r"\(B, T, C, H, W\)"):
        model(torch.rand(2, 1, 16, 16), 3)  # a frame batch without a time axis
    with pytest.raises(ShapeError, match="channels"):
        model(torch.rand(2, 3, 3, 16, 16), 3)
    with pytest.raises(ShapeError, match="divisible"):
        model(torch.rand(2, 3, 1, 18, 18), 3)
    with pytest.raises(ShapeError, match="horizon"):
        model(torch.rand(2, 3, 1, 16, 16), 0)
