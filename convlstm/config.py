"""Typed configs with one source of defaults, strict validation, and named model presets.

`ModelConfig` says what network to build; `TrainConfig` says how to train it. Both are plain
dataclasses: the dataclass defaults are the only defaults, presets are named overrides of
them, and command-line flags override presets. Unknown keys and values of the wrong type are
`ConfigError`s, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from convlstm.errors import ConfigError

T = TypeVar("T")


@dataclass
class ModelConfig:
    """What network to build. Every field is used by `convlstm.models.build_model`; a field that
    does not apply to the chosen architecture or cell must stay at its default (else an error)."""

    # "stacked": a stack of cells that emits the next frame at every step (OpenSTL ConvLSTM-S/L);
    # "encoder_forecaster": Shi et al.'s strided encoder and mirrored forecaster;
    # "fc_lstm": Srivastava et al. 2015's fully connected LSTM over flattened frames (baseline).
    architecture: Literal["stacked", "encoder_forecaster", "fc_lstm"] = "stacked"
    # The recurrent cell of every layer (convolutional architectures): see convlstm.cells.
    cell: Literal[
        "convlstm", "peephole_convlstm", "convgru", "trajgru", "sa_convlstm", "convrnn"
    ] = "convlstm"
    in_channels: int = 1  # channels of one input frame (1 for Moving MNIST and radar)
    # One entry per recurrent layer, bottom first (fc_lstm: LSTM units per layer).
    hidden_channels: tuple[int, ...] = (64, 64)
    kernel_size: int = 5  # odd, so that "same" padding keeps the grid size
    patch_size: int = 4  # frames are cut into patch x patch blocks stacked as channels
    # encoder_forecaster only: stride of the convolution in front of each recurrent layer
    # (the forecaster mirrors them with transposed convolutions); empty = (1, 2, 2, ...).
    stage_strides: tuple[int, ...] = ()
    # (H, W) of the frames the model is built for; () = any size. Required by per-position
    # peepholes and by fc_lstm; when set, frames of another size are refused.
    frame_size: tuple[int, ...] = ()
    forget_bias: float = 1.0  # initial forget-gate bias of LSTM cells: remember early on
    norm: Literal["none", "layer", "group"] = "none"  # normalisation of gate pre-activations
    peephole: Literal["channel", "position"] = "channel"  # peephole_convlstm: weight shape
    trajgru_links: int = 13  # trajgru: flow fields per step (L; Shi et al. 2017 used 13, 9)
    # Query/key channels of sa_convlstm's self-attention memory and of encoder_attention.
    attention_channels: int = 16
    # encoder_forecaster only: each encoder layer also reads the context backwards; the two
    # directions' final states are merged (a learned 1x1 convolution) into the forecaster's.
    bidirectional: bool = False
    # encoder_forecaster only: each forecaster layer attends, at every grid position, over the
    # encoder layer's states at every context step.
    encoder_attention: bool = False
    output_activation: Literal["none", "sigmoid"] = "none"  # applied to every predicted frame

    def __post_init__(self) -> None:
        _validate_types(self)
        if not self.hidden_channels or any(c <= 0 for c in self.hidden_channels):
            raise ConfigError(f"hidden_channels must be positive, got {self.hidden_channels}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ConfigError(
                f"kernel_size must be odd and positive (same padding), got {self.kernel_size}"
            )
        if self.in_channels < 1 or self.patch_size < 1:
            raise ConfigError("in_channels and patch_size must be at least 1")
        if self.frame_size and (len(self.frame_size) != 2 or min(self.frame_size) < 1):
            raise ConfigError(f"frame_size must be (H, W), got {self.frame_size}")
        if self.trajgru_links < 1 or self.attention_channels < 1:
            raise ConfigError("trajgru_links and attention_channels must be at least 1")
        self._check_applicable()
        if self.architecture == "encoder_forecaster":
            if not self.stage_strides:
                self.stage_strides = (1,) + (2,) * (len(self.hidden_channels) - 1)
            if len(self.stage_strides) != len(self.hidden_channels):
                raise ConfigError(
                    f"stage_strides {self.stage_strides} needs one stride per layer of "
                    f"hidden_channels {self.hidden_channels}"
                )
            if any(s < 1 for s in self.stage_strides):
                raise ConfigError(f"stage_strides must be >= 1, got {self.stage_strides}")
        if self.frame_size and self.architecture != "fc_lstm":
            for size in self.frame_size:
                if size % (self.patch_size * math.prod(self.stage_strides)):
                    raise ConfigError(
                        f"frame_size {self.frame_size} is not divisible by patch_size x "
                        f"stage strides ({self.patch_size} x {math.prod(self.stage_strides)})"
                    )

    def _check_applicable(self) -> None:
        """Refuse fields set away from their defaults where they would have no effect."""
        reasons: dict[str, str] = {}
        arch, cell = self.architecture, self.cell
        if arch != "encoder_forecaster":
            for name in ("stage_strides", "bidirectional", "encoder_attention"):
                reasons[name] = "applies to architecture=encoder_forecaster only"
        if arch == "fc_lstm":
            for name in ("cell", "kernel_size", "patch_size", "norm"):
                reasons[name] = "has no effect with architecture=fc_lstm"
            if not self.frame_size:
                raise ConfigError("architecture=fc_lstm needs frame_size=(H, W)")
        if cell not in ("convlstm", "peephole_convlstm", "sa_convlstm"):
            reasons["forget_bias"] = "applies to LSTM cells only"
        if cell != "peephole_convlstm":
            reasons["peephole"] = "applies to cell=peephole_convlstm only"
        if cell != "trajgru":
            reasons["trajgru_links"] = "applies to cell=trajgru only"
        if cell != "sa_convlstm" and not self.encoder_attention:
            reasons["attention_channels"] = "applies to sa_convlstm and encoder_attention only"
        defaults = ModelConfig.__dataclass_fields__
        for name, why in reasons.items():
            default = defaults[name].default
            if getattr(self, name) != default:
                raise ConfigError(f"{name}={getattr(self, name)!r} {why}")
        if cell == "peephole_convlstm" and self.peephole == "position" and not self.frame_size:
            raise ConfigError("peephole=position needs frame_size=(H, W) (weights per position)")


@dataclass
class TrainConfig:
    """How to train. Every field is read by `convlstm.training.train`."""

    steps: int = 1000  # optimizer steps
    batch_size: int = 16
    context_frames: int = 10  # frames the model sees
    horizon: int = 10  # frames it predicts
    optimizer: Literal["adam", "adamw"] = "adam"
    lr: float = 5e-4  # peak learning rate
    weight_decay: float = 0.0
    schedule: Literal["onecycle", "cosine", "constant"] = "onecycle"
    warmup_steps: int = 0  # linear warmup before "cosine" (onecycle uses pct_start)
    pct_start: float = 0.3  # share of steps that onecycle spends rising to lr
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    # balanced_mse_mae: Shi et al. 2017's rain-rate-weighted loss, for HKO-7 pixel frames.
    loss: Literal["mse", "mae", "bce", "mse+mae", "balanced_mse_mae"] = "mse"
    # Also score the predictions made while reading the context (frames 2..Tc), as OpenSTL
    # does (19 frames for 10 -> 10): more signal per sequence. Stacked models only.
    loss_on_context: bool = False
    # "auto": bf16 autocast on CUDA, and for the fast path on a CPU with AMX-BF16 units
    # (convlstm.speed.cpu_bf16_units); fp32 elsewhere. "fp16" adds a gradient scaler.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # "eager": the readable reference. "fast": the same arithmetic run faster (convlstm.speed:
    # hoisted input convolutions and a fused optimizer; on CUDA also channels-last, compiled
    # gates and the forward + backward replayed as one CUDA graph; on the CPU the C gate
    # update and Winograd convolutions, or with AMX-BF16 units bf16 from packed weights).
    path: Literal["eager", "fast"] = "eager"
    # Recompute each recurrent step's activations in backward instead of storing them.
    activation_checkpointing: bool = False
    # Seconds of training (compilation and warm-up included, evaluation not): when > 0, the
    # run is timed over its first steps and then sized to the budget; steps, the schedule
    # and the scheduled-sampling decay (which keeps its share ss_decay_steps / steps) follow.
    time_budget: float = 0.0
    # Scheduled sampling (OpenSTL): each forecast step is fed the true previous frame with
    # probability p, else the model's own prediction; p falls linearly from ss_start to 0
    # over ss_decay_steps (OpenSTL: 1.0 -> 0 at 2e-5 per iteration, i.e. 50k steps).
    scheduled_sampling: Literal["none", "linear"] = "linear"
    ss_start: float = 1.0
    ss_decay_steps: int = 50_000
    eval_every: int = 0  # evaluate every N steps; 0 = only at the end
    eval_batch_size: int = 64
    checkpoint_every: int = 0  # save every N steps; 0 = only at the end
    log_every: int = 25  # read the loss back from the device every N steps
    seed: int = 0
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    wandb: Literal["auto", "online", "offline", "disabled"] = "auto"
    wandb_project: str = "convlstm"

    def __post_init__(self) -> None:
        _validate_types(self)
        for name in ("steps", "batch_size", "context_frames", "horizon", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if not 0.0 < self.pct_start < 1.0:
            raise ConfigError(f"pct_start must be in (0, 1), got {self.pct_start}")
        if not 0.0 <= self.ss_start <= 1.0:
            raise ConfigError(f"ss_start must be in [0, 1], got {self.ss_start}")
        for name in ("warmup_steps", "eval_every", "checkpoint_every", "ss_decay_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.log_every < 1:
            raise ConfigError(f"log_every must be at least 1, got {self.log_every}")
        if self.grad_clip < 0:
            raise ConfigError(f"grad_clip must be >= 0, got {self.grad_clip}")
        if self.time_budget < 0 or not math.isfinite(self.time_budget):
            raise ConfigError(
                f"time_budget must be a number of seconds >= 0, got {self.time_budget}"
            )


# Shi et al. 2017's encoder-forecaster layout scaled to 64x64 frames, shared by its presets.
_EF_LAYOUT: dict[str, Any] = dict(
    architecture="encoder_forecaster",
    hidden_channels=(64, 96, 96),
    kernel_size=3,
    patch_size=4,
    stage_strides=(1, 2, 2),
)
# Shi et al. 2017's radar encoder-forecaster scaled to 128x128 frames (see "radar-ef").
_RADAR_LAYOUT: dict[str, Any] = dict(_EF_LAYOUT, hidden_channels=(64, 192, 192))
# OpenSTL's ConvLSTM-S layout (4 x 128, 5x5 kernels, 4x4 patches), shared by its presets.
_S_LAYOUT: dict[str, Any] = dict(hidden_channels=(128,) * 4, kernel_size=5, patch_size=4)

# Named model presets: overrides of ModelConfig's defaults.
PRESETS: dict[str, dict[str, Any]] = {
    # OpenSTL's ConvLSTM-S for Moving MNIST: 4 layers x 128, 5x5 kernels, 4x4 patches.
    "mmnist-convlstm-s": dict(_S_LAYOUT),
    # OpenSTL's ConvLSTM-L: 4 layers x 192.
    "mmnist-convlstm-l": dict(hidden_channels=(192, 192, 192, 192), kernel_size=5, patch_size=4),
    # The layer sizes of Shi et al. 2015's Moving MNIST network (128-64-64, 5x5 kernels, 4x4
    # patches) and its peephole cell, in the stacked layout (the paper used an encoder and a
    # forecaster). Peepholes per channel; --peephole position --frame-size 64 64 gives the
    # per-position weights that eq. 3's Hadamard products describe.
    "mmnist-shi2015": dict(
        cell="peephole_convlstm",
        hidden_channels=(128, 64, 64),
        kernel_size=5,
        patch_size=4,
    ),
    # Small enough to learn motion in a few CPU minutes (the README's quick start): 8x8 patches
    # make an 8x8 grid, 4x cheaper per channel than OpenSTL's 16x16; on 2 CPU cores this beat
    # 2x32 channels on 4x4 patches at equal time (MSE/frame 116 vs 134 after ~6 minutes).
    "mmnist-cpu-small": dict(hidden_channels=(64, 64), kernel_size=3, patch_size=8),
    # Shi et al. 2017's encoder-forecaster layout, scaled to 64x64 frames.
    "mmnist-encoder-forecaster": dict(
        **_EF_LAYOUT,
    ),
    # The rest of the cell family in the ConvLSTM-S layout (4 layers x 128, 5x5, 4x4 patches).
    "mmnist-peephole-convlstm": dict(**_S_LAYOUT, cell="peephole_convlstm"),
    "mmnist-convgru": dict(**_S_LAYOUT, cell="convgru"),
    "mmnist-convrnn": dict(**_S_LAYOUT, cell="convrnn"),
    # Lin et al. 2020's Moving MNIST SA-ConvLSTM: 4 layers x 64, 3x3 kernels, 4x4 patches.
    "mmnist-sa-convlstm": dict(
        cell="sa_convlstm", hidden_channels=(64,) * 4, kernel_size=3, patch_size=4
    ),
    # TrajGRU in Shi et al. 2017's encoder-forecaster layout, scaled to 64x64 frames.
    "mmnist-trajgru": dict(
        **_EF_LAYOUT,
        cell="trajgru",
    ),
    # The encoder-forecaster with a bidirectional encoder, and with attention over its states.
    "mmnist-bidirectional-ef": dict(
        **_EF_LAYOUT,
        bidirectional=True,
    ),
    "mmnist-attention-ef": dict(
        **_EF_LAYOUT,
        encoder_attention=True,
    ),
    # Radar nowcasting: Shi et al. 2017's HKO-7 encoder-forecaster (480x480 frames; a 7x7
    # stride-5 convolution, then recurrent layers of 64, 192 and 192 channels behind strides
    # 1, 3 and 2; 3x3 state kernels) scaled to 128x128 grids: 4x4 patches make a 32x32 grid,
    # halved before the second and third layers (32, 16, 8). Frames in HKO-7 pixel units.
    "radar-ef": dict(**_RADAR_LAYOUT),
    # The same with Shi et al. 2017's TrajGRU cell (L = 13 links in every layer).
    "radar-trajgru": dict(**_RADAR_LAYOUT, cell="trajgru"),
    # The same shape, small enough to train in CPU minutes (the radar experiment's default).
    "radar-cpu-small": dict(**_RADAR_LAYOUT | dict(hidden_channels=(32, 64, 64), patch_size=8)),
    # FC-LSTM after Srivastava et al. 2015 (2 x 2048 units, conditional future predictor,
    # sigmoid output), the size of Shi et al. 2015's fully connected baseline: 176M parameters
    # here (no peepholes, conditional decoder; Shi et al. report 143M for theirs).
    "mmnist-fc-lstm": dict(
        architecture="fc_lstm",
        hidden_channels=(2048, 2048),
        frame_size=(64, 64),
        output_activation="sigmoid",
    ),
}


def from_name(name: str, **overrides: Any) -> ModelConfig:
    """The preset `name` with `overrides` applied; unknown names and keys are ConfigErrors."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}")
    return build(ModelConfig, {**PRESETS[name], **overrides})


def build(cls: type[T], values: dict[str, Any]) -> T:
    """Construct dataclass `cls` from a dict, rejecting unknown keys by name."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"unknown {cls.__name__} key(s) {', '.join(unknown)}; "
            f"valid keys: {', '.join(sorted(names))}"
        )
    return cls(**values)


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config (tuples become lists)."""
    return json_ready(dataclasses.asdict(config))


def json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def _validate_types(config: Any) -> None:
    """Check every field against its annotation; coerce lists to tuples and ints to floats."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        try:
            setattr(config, f.name, _coerce(value, hints[f.name]))
        except TypeError as err:
            raise ConfigError(f"{type(config).__name__}.{f.name}: {err} (got {value!r})") from None


def _coerce(value: Any, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            raise TypeError(f"expected one of {', '.join(map(repr, choices))}")
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            try:
                return _coerce(value, option)
            except TypeError:
                continue
        raise TypeError(f"expected {annotation}")
    if origin is tuple:
        (item_type, _ellipsis) = typing.get_args(annotation)
        if not isinstance(value, (tuple, list)):
            raise TypeError("expected a sequence")
        return tuple(_coerce(v, item_type) for v in value)
    if annotation is type(None):
        if value is not None:
            raise TypeError("expected None")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise TypeError("expected true or false")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError("expected an integer")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError("expected a number")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise TypeError("expected a string")
        return value
    raise TypeError(f"unsupported annotation {annotation}")


__all__ = [
    "ModelConfig",
    "TrainConfig",
    "PRESETS",
    "from_name",
    "build",
    "to_dict",
]
