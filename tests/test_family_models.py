"""Model-level behaviour of the cell family: the bidirectional encoder, attention over encoder
states, FC-LSTM against a float64 recomputation, and the per-position grid checks."""

import numpy as np
import pytest
import torch

from convlstm.cells import CELLS, warp
from convlstm.config import ModelConfig, from_name
from convlstm.errors import ConfigError, ShapeError
from convlstm.layers import TemporalAttention, patchify
from convlstm.models import build_model
from tests import reference as ref


def _np(t):
    return t.detach().double().numpy()


def _ef(**overrides) -> ModelConfig:
    return ModelConfig(
        architecture="encoder_forecaster",
        hidden_channels=(4, 5),
        kernel_size=3,
        patch_size=2,
        stage_strides=(1, 2),
        **overrides,
    )


def test_bidirectional_encoder_merges_a_forward_and_a_backward_pass():
    torch.manual_seed(0)
    model = build_model(_ef(bidirectional=True)).double().eval()
    context = torch.rand(2, 4, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        mean_init = model.encode(context)
        for p in model.merge.parameters():  # a trained merge: no longer the mean
            p.normal_(0, 0.5)
        state = model.encode(context)
        x = model.down[0](patchify(context.flatten(0, 1), 2)).unflatten(0, (2, 4))
        fwd_out, fwd = model.encoder[0](x)
        bwd_out, bwd = model.backward_encoder[0](x.flip(1))  # reads frame 3, 2, 1, 0
        # the merge starts as the mean of the two directions' final states ...
        for merged, f, b in zip(mean_init.layers[0], fwd, bwd, strict=True):
            torch.testing.assert_close(merged, (f + b) / 2)
        # ... and is W [s_fwd; s_bwd] + bias per state tensor
        for k, (merged, f, b) in enumerate(zip(state.layers[0], fwd, bwd, strict=True)):
            conv = model.merge[0].convs[k]
            w, bias = conv.weight[:, :, 0, 0], conv.bias
            expected = torch.einsum("oc,bchw->bohw", w, torch.cat([f, b], dim=1))
            torch.testing.assert_close(merged, expected + bias.view(1, -1, 1, 1))
        # the next layer reads both directions, aligned in time
        both = torch.cat([fwd_out, bwd_out.flip(1)], dim=2)  # (B, T, 2C, h, w)
        x1 = model.down[1](both.flatten(0, 1)).unflatten(0, (2, 4))
        _, fwd1 = model.encoder[1](x1)
        _, bwd1 = model.backward_encoder[1](x1.flip(1))
        torch.testing.assert_close(state.layers[1], model.merge[1](fwd1, bwd1))
        # unlike a forward-only encoder, the state depends on the order of the frames
        assert not torch.allclose(model.encode(context.flip(1)).layers[0][0], state.layers[0][0])


def test_bidirectional_needs_the_encoder_forecaster():
    with pytest.raises(ConfigError, match="bidirectional"):
        ModelConfig(bidirectional=True)
    with pytest.raises(ConfigError, match="encoder_attention"):
        ModelConfig(encoder_attention=True)


def test_temporal_attention_matches_float64_reference():
    torch.manual_seed(0)
    att = TemporalAttention(channels=3, memory_channels=4, key_channels=2).double()
    h = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    memory = torch.randn(2, 6, 4, 4, 5, dtype=torch.float64)
    out = att(h, *att.keys_values(memory))

    def conv1x1(x, layer):  # x (..., C, H, W)
        w, b = _np(layer.weight)[:, :, 0, 0], _np(layer.bias)
        return np.einsum("oc,...chw->...ohw", w, x) + b[:, None, None]

    q = conv1x1(_np(h), att.query)  # (B, d, H, W)
    k, v = conv1x1(_np(memory), att.key), conv1x1(_np(memory), att.value)  # (B, T, ., H, W)
    expected = np.zeros_like(_np(h))
    for b in range(2):
        for y in range(4):
            for x in range(5):
                scores = k[b, :, :, y, x] @ q[b, :, y, x] / np.sqrt(2)  # (T,)
                weights = np.exp(scores - scores.max())
                weights /= weights.sum()
                expected[b, :, y, x] = weights @ v[b, :, :, y, x]
    expected = _np(h) + conv1x1(expected, att.out)
    np.testing.assert_allclose(_np(out), expected, rtol=1e-10, atol=1e-12)


def test_encoder_attention_reads_every_context_step():
    torch.manual_seed(0)
    model = build_model(_ef(encoder_attention=True)).eval()
    context = torch.rand(2, 5, 1, 8, 8)
    with torch.no_grad():
        state = model.encode(context)
        assert [m.shape[1] for m in state.memory] == [5, 5]  # one entry per context frame
        preds = model.forecast(state, 3)
        blanked = state._replace(memory=[torch.zeros_like(m) for m in state.memory])
        assert not torch.allclose(model.forecast(blanked, 3), preds)  # attention is used
        # streaming appends to the memory
        streamed = model.encode(context[:, 2:], model.encode(context[:, :2]))
    for a, b in zip(streamed.memory, state.memory, strict=True):
        torch.testing.assert_close(a, b)


def test_fc_lstm_matches_float64_reference():
    torch.manual_seed(0)
    cfg = ModelConfig(
        architecture="fc_lstm",
        hidden_channels=(5, 3),
        frame_size=(3, 4),
        output_activation="sigmoid",
    )
    model = build_model(cfg).double()
    for p in model.parameters():
        p.data.normal_(0, 0.5)
    context = torch.rand(2, 3, 1, 3, 4, dtype=torch.float64)
    preds = model(context, 3)

    def lstm(cells, x, states):
        for i, cell in enumerate(cells):
            h, c = states[i]
            z = x @ _np(cell.weight_ih).T + _np(cell.bias_ih) + h @ _np(cell.weight_hh).T
            i_, f, g, o = np.split(z + _np(cell.bias_hh), 4, axis=1)
            c = ref.sigmoid(f) * c + ref.sigmoid(i_) * np.tanh(g)
            h = ref.sigmoid(o) * np.tanh(c)
            states[i] = (h, c)
            x = h
        return x

    states = [(np.zeros((2, 5)), np.zeros((2, 5))), (np.zeros((2, 3)), np.zeros((2, 3)))]
    frames = _np(context).reshape(2, 3, 12)
    for t in range(3):
        lstm(model.encoder, frames[:, t], states)
    feed, expected = frames[:, -1], []
    for _ in range(3):  # the decoder continues from the encoder's states, fed its predictions
        top = lstm(model.decoder, feed, states)
        feed = ref.sigmoid(top @ _np(model.head.weight).T + _np(model.head.bias))
        expected.append(feed.reshape(2, 1, 3, 4))
    np.testing.assert_allclose(_np(preds), np.stack(expected, 1), rtol=1e-10, atol=1e-12)


def test_fc_lstm_teacher_mask_feeds_true_frames():
    torch.manual_seed(0)
    model = build_model(from_name("mmnist-fc-lstm", hidden_channels=(8,), frame_size=(4, 4)))
    context, targets = torch.rand(2, 3, 1, 4, 4), torch.rand(2, 4, 1, 4, 4)
    free = model(context, 4)
    forced = model(context, 4, targets=targets, teacher_mask=torch.ones(2, 3, dtype=torch.bool))
    torch.testing.assert_close(forced[:, 0], free[:, 0])
    assert not torch.allclose(forced[:, 1:], free[:, 1:])


def test_frame_size_is_enforced_where_set():
    cfg = from_name(
        "mmnist-shi2015", hidden_channels=(4, 3), peephole="position", frame_size=(16, 16)
    )
    model = build_model(cfg)
    with pytest.raises(ShapeError, match="16x16 frames, got 32x32"):
        model(torch.rand(1, 2, 1, 32, 32), 1)
    with pytest.raises(ConfigError, match="frame_size"):
        from_name("mmnist-shi2015", peephole="position")  # per-position weights need the size
    with pytest.raises(ConfigError, match="frame_size"):
        ModelConfig(architecture="fc_lstm")
    with pytest.raises(ConfigError, match="divisible"):
        ModelConfig(frame_size=(30, 32), patch_size=4)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"peephole": "position", "frame_size": (16, 16)}, "peephole_convlstm only"),
        ({"trajgru_links": 5}, "trajgru only"),
        ({"attention_channels": 8}, "sa_convlstm and encoder_attention"),
        ({"cell": "convgru", "forget_bias": 0.0}, "LSTM cells only"),
        ({"architecture": "fc_lstm", "frame_size": (8, 8), "kernel_size": 3}, "fc_lstm"),
        ({"architecture": "fc_lstm", "frame_size": (8, 8), "norm": "layer"}, "fc_lstm"),
    ],
)
def test_fields_that_would_do_nothing_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**overrides)


@pytest.mark.parametrize("norm", ["layer", "group"])
@pytest.mark.parametrize("cell", ["convlstm", "convgru", "trajgru", "sa_convlstm", "convrnn"])
def test_norm_option_builds_and_trains_in_every_cell(cell, norm):
    torch.manual_seed(0)
    cfg = ModelConfig(cell=cell, norm=norm, hidden_channels=(8,), kernel_size=3, patch_size=2)
    model = build_model(cfg)
    preds = model(torch.rand(2, 3, 1, 8, 8), 2)
    preds.square().mean().backward()
    norms = [n for n, _ in model.named_parameters() if ".norm." in n]
    assert norms and all(model.get_parameter(n).grad is not None for n in norms)


@pytest.mark.parametrize("architecture", ["stacked", "encoder_forecaster"])
@pytest.mark.parametrize("cell", sorted(CELLS))
def test_every_cell_plugs_into_both_model_shapes(cell, architecture):
    torch.manual_seed(0)
    extra = {"stage_strides": (1, 2)} if architecture == "encoder_forecaster" else {}
    if cell == "peephole_convlstm":
        extra |= {"peephole": "position", "frame_size": (8, 8)}
    cfg = ModelConfig(
        architecture=architecture,
        cell=cell,
        hidden_channels=(4, 5),
        kernel_size=3,
        patch_size=2,
        **extra,
    )
    model = build_model(cfg)
    context = torch.rand(2, 4, 1, 8, 8)
    preds = model(context, 3)
    assert preds.shape == (2, 3, 1, 8, 8)
    preds.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing, f"no gradient reaches {missing}"
    with torch.no_grad():
        state = None
        for t in range(4):
            state = model.step(context[:, t], state)
        torch.testing.assert_close(model.forecast(state, 3), preds, rtol=1e-5, atol=1e-6)


_CELL_CASES = [{"cell": c} for c in sorted(CELLS) if c != "trajgru"] + [
    {"cell": "trajgru", "trajgru_links": 3}
]
_EF_CASES = [
    {"cell": "convlstm", "bidirectional": True, "encoder_attention": True},
    {"cell": "trajgru", "trajgru_links": 3, "bidirectional": True},
    {"cell": "sa_convlstm", "norm": "group", "bidirectional": True},
]


@pytest.mark.parametrize(
    "architecture, overrides",
    [("stacked", o) for o in _CELL_CASES]
    + [("encoder_forecaster", o) for o in _CELL_CASES + _EF_CASES],
)
def test_states_stay_float32_under_bf16_autocast(architecture, overrides):
    """Under autocast the convolutions run in bf16, but the carried states (LSTM memory
    included) stay float32, in both model shapes; TrajGRU's warp runs in float32."""
    torch.manual_seed(0)
    extra = {"stage_strides": (1, 2)} if architecture == "encoder_forecaster" else {}
    cfg = ModelConfig(
        architecture=architecture,
        hidden_channels=(4, 5),
        kernel_size=3,
        patch_size=2,
        **extra,
        **overrides,
    )
    model = build_model(cfg)
    context = torch.rand(2, 3, 1, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        state = model.encode(context)
        preds = model.forecast(state, 2)
        preds.float().square().mean().backward()
    layers = state.layers
    assert all(t.dtype == torch.float32 for layer in layers for t in layer)
    assert torch.isfinite(preds).all()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_warp_runs_in_float32_under_autocast():
    h, flow = torch.randn(2, 3, 8, 8), torch.rand(2, 2, 8, 8) * 2 - 1
    exact = warp(h, flow)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        warped = warp(h.bfloat16(), flow.bfloat16())
    assert warped.dtype == torch.float32
    # only the bf16 rounding of the inputs differs, not the sampling arithmetic
    torch.testing.assert_close(warped, warp(h.bfloat16().float(), flow.bfloat16().float()))
    assert (warped - exact).abs().max() < 0.1
