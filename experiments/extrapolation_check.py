"""Check our optical-flow extrapolation against pysteps' on real radar composites.

    python -m experiments.extrapolation_check [--radar-dir ../shared/data/radar]

Reads every event under the radar folder with `datasets.radar_io` (rain rate in mm/h; FMI dBZ
through its Z = 223 R^1.53, BoM accumulations per step to mm/h), crops the central 512x512 of
every frame and block-averages 4x4 to 128x128 (a block with more than half of its pixels
without data is no data). Windows of 5 context + 12 target frames, every 3rd frame of an
event, are forecast by
  (a) persistence;
  (b) ours, the optical-flow baseline `experiments.radar` reports: `lagrangian_persistence`
      on HKO-7 pixel values (OpenCV DIS motion of the last context frames, semi-Lagrangian
      advection of the last frame), turned back into rain rate;
  (c) pysteps: Lucas-Kanade motion of the last 3 context frames in dBR plus its
      semi-Lagrangian extrapolation nowcast of the last rain-rate frame.
No-data pixels of the context count as no rain, and so does rain that would be advected in
from outside the 128x128 grid, in (b) and (c) alike, so that every method forecasts every
pixel, as a model does. Forecasts are scored where the observation has data by
`convlstm.verification.ContingencyScores` (events above the threshold, as pysteps counts
them); hits, misses and false alarms are summed over windows and lead times, and the CSI of
those sums is printed per source and over all events.
"""

from __future__ import annotations

import time
import warnings
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import numpy as np
import torch

from convlstm.baselines import lagrangian_persistence, persistence
from convlstm.cli import ArgumentParser, run_main
from convlstm.errors import DataError
from convlstm.units import pixel_to_rainrate, rainrate_to_pixel
from convlstm.verification import ContingencyScores
from datasets.radar_io import radar_root
from datasets.radar_windows import windows
from experiments.radar_data import RadarDataConfig, read_events

DATA = RadarDataConfig()  # the radar experiment's crop (512 px), grid (128) and stride (3)
CONTEXT, HORIZON = 5, 12
THRESHOLDS = (0.5, 2.0)  # mm/h


def forecast_dis(context: np.ndarray) -> np.ndarray:
    pixels = torch.from_numpy(rainrate_to_pixel(np.nan_to_num(context, nan=0.0)))
    return pixel_to_rainrate(
        lagrangian_persistence(pixels[None, :, None], HORIZON)[0, :, 0].numpy()
    )


def forecast_pysteps(context: np.ndarray) -> np.ndarray:
    from pysteps import motion, nowcasts
    from pysteps.utils.transformation import dB_transform

    dbr, _ = dB_transform(context[-3:].astype(np.float64), threshold=0.1, zerovalue=-15.0)
    velocity = motion.get_method("LK")(np.nan_to_num(dbr, nan=-15.0))
    last = np.nan_to_num(context[-1].astype(np.float64), nan=0.0)
    extrapolate = nowcasts.get_method("extrapolation")
    return extrapolate(last, velocity, HORIZON, extrap_kwargs={"outval": 0.0})


def forecast_persistence(context: np.ndarray) -> np.ndarray:
    return persistence(torch.from_numpy(context)[None, :, None], HORIZON)[0, :, 0].numpy()


METHODS = {
    "persistence": forecast_persistence,
    "DIS (ours)": forecast_dis,
    "pysteps LK": forecast_pysteps,
}


def main(argv=None) -> None:
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--radar-dir", type=Path, default=None, help="default: " + str(radar_root())
    )
    args = parser.parse_args(argv)
    try:
        with redirect_stdout(StringIO()):  # pysteps announces its config file on import
            import pysteps  # noqa: F401
    except ImportError as err:
        raise DataError(f"this check needs pysteps ({err}); pip install -e '.[radar]'") from None
    # LK's outlier check on windows with few rain features; the motion is still returned
    warnings.filterwarnings("ignore", "Singular matrix during outlier detection", UserWarning)

    start = time.perf_counter()
    root = Path(args.radar_dir or radar_root()).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"radar folder {root} not found (give it with --radar-dir)")
    scores: dict[tuple[str, str], ContingencyScores] = {}
    counts: dict[str, int] = {}
    for name, seq in read_events(str(root), DATA.crop, DATA.grid):
        frames = windows(seq, CONTEXT, HORIZON, DATA.stride).frames
        source = name.split("-")[0].upper()
        for column in (source, "all"):
            counts[column] = counts.get(column, 0) + len(frames)
        for window in frames:
            context, observed = window[:CONTEXT], torch.from_numpy(window[None, CONTEXT:])
            for method_name, method in METHODS.items():
                forecast = torch.from_numpy(np.nan_to_num(method(context), nan=0.0)[None])
                for column in (source, "all"):
                    key = (column, method_name)
                    scores.setdefault(key, ContingencyScores(THRESHOLDS))
                    scores[key].update(forecast, observed, mask=torch.isfinite(observed))
    if not counts:
        raise DataError(f"no radar events found under {root}.")

    columns = sorted(set(counts) - {"all"}) + ["all"]
    header = "".join(f"{s} ({counts[s]} windows)".rjust(24) for s in columns)
    print(f"CSI at {' / '.join(f'{t:g}' for t in THRESHOLDS)} mm/h, leads 1-{HORIZON}")
    print("method".ljust(14) + header)
    for name in METHODS:
        cells = []
        for column in columns:
            per = scores[column, name].compute()["per_threshold"]
            cells.append(" / ".join(f"{p['csi']:.3f}" for p in per))
        print(name.ljust(14) + "".join(c.rjust(24) for c in cells))
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    run_main(main)
