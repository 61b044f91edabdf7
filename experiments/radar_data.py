"""Data for the radar experiment: synthetic and real training streams, fixed test sets.

Every frame is in HKO-7 pixel units ((dBZ + 10) / 70 of the rain rate through HKO-7's Z-R).
Real events are the national composites under the radar folder: each frame centre-cropped
to `crop` x `crop` pixels and block-averaged to `grid` x `grid` (a block more than half
without data is no data). Events named in `train_events` give training windows (every
start frame, with the 8 flips and rotations of the square); every other event gives held-out
test windows (`stride` apart) with a mask of the pixels that have data. No-data pixels enter
training as dry (the default training event, BoM 2020-10-31, has none). The events differ in
step (5, 6, 10 minutes) and pixel size after averaging (4 km FMI/RMI, 2 km BoM): a lead
time is a frame, not a fixed number of minutes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from convlstm.baselines import DIS_MIN_SIZE
from convlstm.errors import ConfigError, DataError
from datasets.radar_io import find_events, radar_root, read_event
from datasets.radar_synthetic import (
    TRAIN_SEED_LIMIT,
    SyntheticRadarSpec,
    fixed_test_set,
    generate,
)
from datasets.radar_windows import block_average, crop_center, to_model_units, windows


@dataclass
class RadarDataConfig:
    # Training sequences: the synthetic generator, windows of the real train_events, or both
    # (real_share of every batch real, the rest synthetic).
    train_data: Literal["synthetic", "real", "both"] = "both"
    radar_dir: str = ""  # "" = $CONVLSTM_RADAR_DIR, else ../shared/data/radar
    # Real events to train on, as "<source>-<YYYYMMDD>" (see `event_name`); the rest are tested.
    train_events: tuple[str, ...] = ("bom-20201031",)
    real_share: float = 0.5
    grid: int = 128  # frames are grid x grid pixels
    crop: int = 512  # real frames: centre crop (pixels) before block-averaging to `grid`
    stride: int = 3  # real test windows start every `stride` frames
    synthetic_test: int = 64  # sequences in the fixed synthetic test set

    def __post_init__(self) -> None:
        if not 0.0 < self.real_share < 1.0:
            raise ConfigError(f"real_share must be in (0, 1), got {self.real_share}")
        if self.train_data != "both" and self.real_share != 0.5:
            raise ConfigError("real_share applies to train_data=both only")
        if self.grid < DIS_MIN_SIZE or self.crop % self.grid:
            raise ConfigError(
                f"crop {self.crop} must be a multiple of grid {self.grid} (>= {DIS_MIN_SIZE}, "
                "the optical-flow baseline's smallest grid)"
            )
        if self.stride < 1 or self.synthetic_test < 1:
            raise ConfigError("stride and synthetic_test must be at least 1")


@dataclass
class TestSet:
    sequences: torch.Tensor  # (N, T, 1, H, W) float32 HKO-7 pixels
    masks: torch.Tensor | None  # (N, T, 1, H, W) bool, True = data; None = all valid
    desc: str


@dataclass
class RadarData:
    batches: Callable[[int], torch.Tensor]  # step -> (B, T, 1, H, W)
    train_desc: str
    test_sets: dict[str, TestSet]  # "synthetic" first, then "real" when the events are found


def event_name(seq) -> str:
    """ "<format>-<YYYYMMDD>" of the event's first frame, e.g. "fmi-20160928"."""
    return f"{seq.source.split(':')[0]}-{seq.times[0]:%Y%m%d}"


def _describe(seqs) -> str:
    return ", ".join(f"{event_name(s)} ({s.step_minutes} min)" for s in seqs)


def synthetic_spec(data: RadarDataConfig, frames: int) -> SyntheticRadarSpec:
    return SyntheticRadarSpec(height=data.grid, width=data.grid, num_frames=frames, units="pixel")


def _real_events(data: RadarDataConfig, frames: int):
    """(name, sequence) per real event long enough for a window, or None when none is found."""
    if data.radar_dir:  # asked for by name: it must be there
        root = Path(data.radar_dir)
        if not find_events(root):
            raise DataError(f"no radar events found under {root}")
    else:
        root = radar_root()
        if not root.is_dir():
            return None
    events = read_events(str(root.resolve()), data.crop, data.grid)
    short = [name for name, seq in events if len(seq) < frames]
    if short:
        print(f"left out (fewer than {frames} frames): {', '.join(short)}")
    return [(name, seq) for name, seq in events if len(seq) >= frames] or None


@functools.lru_cache(maxsize=2)
def read_events(root: str, crop: int, grid: int):
    """Every event under `root`, cropped and block-averaged (read once per process)."""
    return tuple(
        (event_name(seq), seq)
        for seq in (
            block_average(crop_center(read_event(folder), crop), crop // grid)
            for folder in find_events(root)
        )
    )


def _stack(seqs, frames: int, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of every sequence -> (pixels, masks), both (N, frames, 1, H, W)."""
    pix, masks = [], []
    for seq in seqs:
        w = windows(seq, frames, 0, stride).frames  # (N, frames, H, W) mm/h, NaN = no data
        if not len(w):
            raise DataError(f"{event_name(seq)} has no window of {frames} frames without a gap")
        p, m = to_model_units(w)
        pix.append(p)
        masks.append(m)
    return (
        torch.from_numpy(np.concatenate(pix)).unsqueeze(2),
        torch.from_numpy(np.concatenate(masks)).unsqueeze(2),
    )


def load_radar_data(
    data: RadarDataConfig,
    frames: int,
    batch_size: int,
    seed: int,
    device: torch.device | str = "cpu",
) -> RadarData:
    """The training stream and the test sets. The real test set is the same whatever
    `train_data` says: every event not named in `train_events`. Training batches are made
    on `device` (the synthetic generator runs there, so a GPU is not fed by the CPU)."""
    if not 0 <= seed < TRAIN_SEED_LIMIT:  # larger seeds hold the synthetic test sets
        raise ConfigError(f"seed must be in [0, 2**32), got {seed}")
    n_real = {"synthetic": 0, "real": batch_size, "both": round(batch_size * data.real_share)}
    n_real = n_real[data.train_data]
    n_synth = batch_size - n_real
    if data.train_data == "both" and not 0 < n_real < batch_size:
        raise ConfigError(
            f"real_share {data.real_share} of batch {batch_size} gives {n_real} real "
            "sequences: train_data=both needs at least one of each source per batch"
        )
    spec = synthetic_spec(data, frames)
    test_sets = {
        "synthetic": TestSet(
            fixed_test_set(spec, data.synthetic_test),
            None,
            f"synthetic, {data.synthetic_test} fixed sequences of {data.grid}x{data.grid}",
        )
    }
    events = _real_events(data, frames)
    if events is None and data.train_data != "synthetic":
        where = data.radar_dir or radar_root()
        raise DataError(
            f"train_data={data.train_data} needs the real radar events, found none under "
            f"{where} (set --radar-dir or use --train-data synthetic)"
        )
    real_train, train = None, []
    if events is not None:
        names = [name for name, _ in events]
        unknown = sorted(set(data.train_events) - set(names))
        if unknown:
            raise ConfigError(f"unknown train_events {unknown}; the events are {names}")
        train = [s for n, s in events if n in data.train_events]
        held_out = [s for n, s in events if n not in data.train_events]
        if held_out:
            seqs, masks = _stack(held_out, frames, data.stride)
            test_sets["real"] = TestSet(
                seqs,
                masks,
                f"real, held-out events {_describe(held_out)}: "
                f"{len(seqs)} windows (stride {data.stride}), {data.crop} px crop averaged "
                f"to {data.grid}x{data.grid}",
            )
        if data.train_data != "synthetic":
            if not train:
                raise ConfigError("train_events is empty: nothing real to train on")
            real_train = _stack(train, frames, 1)[0].to(device)

    def batches(step: int) -> torch.Tensor:
        parts = []
        if n_synth:  # the synthetic stream: sequences step*B .. of the training seed
            indices = range(step * n_synth, (step + 1) * n_synth)
            parts.append(generate(spec, indices, seed, device))
        if n_real:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
            pick = torch.randint(len(real_train), (n_real,), generator=gen)
            turns = torch.randint(8, (n_real,), generator=gen).tolist()
            for i, k in zip(pick.tolist(), turns, strict=True):
                parts.append(_dihedral(real_train[i : i + 1], k))
        return torch.cat(parts)

    desc = f"synthetic sequences ({data.grid}x{data.grid}, seed {seed})"
    if real_train is not None:
        real = f"real events {_describe(train)}: {len(real_train)} windows x 8 flips/rotations"
        desc = real if n_synth == 0 else f"{desc} and {real} ({n_real} of {batch_size} per batch)"
    return RadarData(batches, desc, test_sets)


def _dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """One of the square's 8 symmetries of (..., H, W): k % 4 quarter turns, flipped if k >= 4."""
    x = torch.rot90(x, k % 4, dims=(-2, -1))
    return x.flip(-1) if k >= 4 else x
