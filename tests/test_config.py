import pytest

from convlstm.config import PRESETS, ModelConfig, TrainConfig, build, from_name, to_dict
from convlstm.errors import ConfigError
from convlstm.models import build_model, count_parameters


def test_presets_build_and_overrides_apply():
    cfg = from_name("mmnist-convlstm-s", kernel_size=3)
    assert cfg.hidden_channels == (128, 128, 128, 128) and cfg.kernel_size == 3
    assert set(PRESETS) >= {"mmnist-convlstm-s", "mmnist-shi2015", "mmnist-cpu-small"}


def test_convlstm_s_parameter_count():
    # 4 fused-gate convolutions (5x5) + a 1x1 head; OpenSTL reports 15.0M, most likely with
    # its optional per-position LayerNorm, which this cell does not have.
    assert count_parameters(build_model(from_name("mmnist-convlstm-s"))) == 11_677_712


def test_unknown_preset_and_key_are_named():
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        from_name("nope")
    with pytest.raises(ConfigError, match="hidden_channel\\b"):
        from_name("mmnist-cpu-small", hidden_channel=(8,))
    with pytest.raises(ConfigError, match="unknown TrainConfig key"):
        build(TrainConfig, {"stepz": 3})


@pytest.mark.parametrize(
    "cls, values, match",
    [
        (ModelConfig, {"kernel_size": 4}, "odd"),
        (ModelConfig, {"kernel_size": 3.0}, "kernel_size: expected an integer"),
        (ModelConfig, {"hidden_channels": (8, "x")}, "hidden_channels"),
        (ModelConfig, {"hidden_channels": ()}, "hidden_channels"),
        (ModelConfig, {"architecture": "transformer"}, "architecture"),
        (ModelConfig, {"stage_strides": (1, 2)}, "encoder_forecaster only"),
        (ModelConfig, {"architecture": "encoder_forecaster", "stage_strides": (1,)}, "one stride"),
        (TrainConfig, {"lr": "fast"}, "lr: expected a number"),
        (TrainConfig, {"steps": True}, "steps: expected an integer"),
        (TrainConfig, {"steps": 0}, "steps must be at least 1"),
        (TrainConfig, {"precision": "fp8"}, "precision"),
        (TrainConfig, {"ss_start": 1.5}, "ss_start"),
    ],
)
def test_bad_values_are_config_errors(cls, values, match):
    with pytest.raises(ConfigError, match=match):
        build(cls, values)


def test_explicit_zero_and_lists_are_kept():
    cfg = build(TrainConfig, {"grad_clip": 0, "weight_decay": 0})
    assert cfg.grad_clip == 0.0 and isinstance(cfg.grad_clip, float)
    model = build(ModelConfig, {"hidden_channels": [8, 8]})
    assert model.hidden_channels == (8, 8)


def test_round_trip_through_dict():
    cfg = from_name("mmnist-encoder-forecaster")
    assert cfg.stage_strides == (1, 2, 2)
    assert build(ModelConfig, to_dict(cfg)) == cfg
