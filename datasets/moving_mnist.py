"""Moving MNIST: the seeded generator, a Dataset over it, and the standard test file.

Protocol (Srivastava et al. 2015, as DESIGN.md fixes it): digits of ``digit_size`` px move
on a ``canvas`` px square. Positions are kept in units of the free range
``canvas - digit_size`` (36 px for 64/28), as (row, col) in [0, 1]^2:

- each digit starts at a uniform position in [0, 1)^2 (frame 0 is the start);
- it moves in a uniform random direction θ in [0, 2π) with step ``speed`` per frame,
  velocity (row, col) = speed * (sin θ, cos θ);
- after each step a coordinate outside [0, 1] is clamped to the edge and that velocity
  component negated (the bounce);
- the digit's top-left pixel is round(position * free_range) (round half to even);
- overlapping digits combine by pixel-wise max.

Sequence ``index`` of ``seed`` uses ``np.random.default_rng([seed, index])`` alone, so it
does not depend on call order, batch composition or worker count. The draws, in order:
start positions ``random((D, 2))``, angles ``uniform(0, 2π, D)``, then one uniform
``u`` per digit choosing ``digits[floor(u * len(digits))]``; motion comes first so it does
not depend on the digit pool.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path

import numpy as np
import torch

from convlstm.errors import DataError

__all__ = [
    "MovingMNISTSpec",
    "MovingMNIST",
    "trajectories",
    "generate_sequence",
    "generate_batch",
    "DeviceMovingMNIST",
    "fixed_test_set",
    "load_standard_test_set",
]

FIXED_TEST_SEED = 4242


def _is_int(x: object) -> bool:
    return isinstance(x, Integral) and not isinstance(x, bool)


@dataclass(frozen=True)
class MovingMNISTSpec:
    """Geometry and motion of generated sequences (defaults: the standard 64x64, 2 digits)."""

    num_digits: int = 2
    num_frames: int = 20
    canvas: int = 64
    digit_size: int = 28
    speed: float = 0.1  # fraction of the free range (canvas - digit_size) per frame

    def __post_init__(self) -> None:
        for name in ("num_digits", "num_frames", "canvas", "digit_size"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise DataError(f"MovingMNISTSpec.{name} must be a positive int, got {value!r}")
        if self.canvas < self.digit_size:
            raise DataError(
                f"MovingMNISTSpec.canvas ({self.canvas}) must be at least digit_size"
                f" ({self.digit_size})"
            )
        speed = self.speed
        if (
            not isinstance(speed, Real)
            or isinstance(speed, bool)
            or not math.isfinite(speed)
            or speed < 0
        ):
            raise DataError(f"MovingMNISTSpec.speed must be a finite number >= 0, got {speed!r}")

    @property
    def free_range(self) -> int:
        """Pixels a digit can travel along each axis: canvas - digit_size."""
        return self.canvas - self.digit_size


def _check_digits(digits: np.ndarray, spec: MovingMNISTSpec) -> np.ndarray:
    if not isinstance(digits, np.ndarray) or digits.dtype != np.uint8 or digits.ndim != 3:
        got = (
            f"{digits.dtype} array of shape {digits.shape}"
            if isinstance(digits, np.ndarray)
            else type(digits).__name__
        )
        raise DataError(f"digits must be a uint8 array (N, H, W), got {got}")
    if digits.shape[1:] != (spec.digit_size, spec.digit_size):
        raise DataError(
            f"digits are {digits.shape[1]}x{digits.shape[2]} but the spec's digit_size is"
            f" {spec.digit_size}"
        )
    if len(digits) == 0:
        raise DataError("digits is empty: need at least one digit image")
    return digits


def _check_key(seed: object, index: object) -> None:
    for name, value in (("seed", seed), ("index", index)):
        if not _is_int(value) or value < 0:
            raise DataError(f"Moving MNIST {name} must be an int >= 0, got {value!r}")


def _uniforms(seed: int, index: int, num_digits: int) -> np.ndarray:
    """All random numbers of sequence (seed, index): 4 uniforms in [0, 1) per digit.

    Laid out as start (row, col) for every digit, then an angle per digit, then a digit
    choice per digit: the same stream as ``random((D, 2))``, ``uniform(0, 2π, D)``,
    ``random(D)``. One call, because creating the generator already dominates the cost.
    """
    _check_key(seed, index)
    return np.random.default_rng([int(seed), int(index)]).random(4 * num_digits)


def _motion(u: np.ndarray, spec: MovingMNISTSpec) -> tuple[np.ndarray, np.ndarray]:
    """Start (..., D, 2) and velocity (..., D, 2) from uniforms (..., 4 * D)."""
    d = spec.num_digits
    start = u[..., : 2 * d].reshape(*u.shape[:-1], d, 2)
    theta = 2.0 * np.pi * u[..., 2 * d : 3 * d]  # (..., D)
    # Scalar libm sin/cos: numpy's SIMD kernels may round differently depending on array
    # length, and a sequence must not change with the batch it is generated in.
    sc = [(math.sin(a), math.cos(a)) for a in theta.ravel().tolist()]
    velocity = spec.speed * np.array(sc, dtype=np.float64).reshape(*theta.shape, 2)  # row, col
    return start, velocity


def _bounce(start: np.ndarray, velocity: np.ndarray, num_frames: int) -> np.ndarray:
    """Positions (T, ...) from start and velocity (same shape, any leading dims)."""
    pos = start.astype(np.float64)  # copies: updated in place below
    vel = velocity.astype(np.float64)
    out = np.empty((num_frames, *pos.shape))
    out[0] = pos
    for t in range(1, num_frames):
        pos += vel
        hit = (pos < 0.0) | (pos > 1.0)
        np.negative(vel, out=vel, where=hit)  # bounce: reverse the component that left
        np.minimum(np.maximum(pos, 0.0, out=pos), 1.0, out=pos)  # clamp to the edge
        out[t] = pos
    return out


def trajectories(seed: int, index: int, spec: MovingMNISTSpec = MovingMNISTSpec()) -> np.ndarray:
    """Digit positions of sequence (seed, index): float64 (T, D, 2), (row, col) in [0, 1].

    Multiply by ``spec.free_range`` and round to get each digit's top-left pixel.
    """
    start, velocity = _motion(_uniforms(seed, index, spec.num_digits), spec)
    return _bounce(start, velocity, spec.num_frames)


def _placements(
    num_digit_images: int, seed: int, indices: Sequence[int], spec: MovingMNISTSpec
) -> tuple[np.ndarray, np.ndarray]:
    """Top-left pixels (B, T, D, 2) and digit choices (B, D) of sequences `indices`."""
    d = spec.num_digits
    u = np.stack([_uniforms(seed, index, d) for index in indices])  # (B, 4D)
    starts, velocities = _motion(u, spec)  # (B, D, 2) each
    # floor(u * N) with u in [0, 1) is uniform over the N digits (to within 2**-53).
    choices = np.minimum((u[:, 3 * d :] * num_digit_images).astype(np.intp), num_digit_images - 1)
    # One bounce loop for the whole batch: the arithmetic is elementwise, so each
    # sequence gets exactly the positions it would get alone.
    pix = np.rint(_bounce(starts, velocities, spec.num_frames) * spec.free_range).astype(np.intp)
    return pix.transpose(1, 0, 2, 3), choices  # (B, T, D, 2), (B, D)


def _render_uint8(
    digits: np.ndarray, seed: int, indices: Sequence[int], spec: MovingMNISTSpec
) -> np.ndarray:
    """Sequences as uint8 (B, T, canvas, canvas)."""
    digits = _check_digits(digits, spec)
    b, t, d, s = len(indices), spec.num_frames, spec.num_digits, spec.digit_size
    pix, choices = _placements(len(digits), seed, indices, spec)
    pix = pix.reshape(b * t, d, 2)  # (B*T, D, 2), frame-major per seq
    out = np.zeros((b * t, spec.canvas, spec.canvas), dtype=np.uint8)
    # win[n, r, c] is the s x s window of frame n whose top-left pixel is (r, c); indexing
    # it with one (n, r, c) per frame moves whole windows at once (6x faster than a loop
    # of slices). Within one digit slot every frame n is distinct, so writes never collide.
    win = np.lib.stride_tricks.sliding_window_view(out, (s, s), axis=(1, 2), writeable=True)
    frame = np.arange(b * t)
    for k in range(d):
        images = digits[np.repeat(choices[:, k], t)]  # (B*T, s, s)
        r, c = pix[:, k, 0], pix[:, k, 1]
        if k == 0:
            win[frame, r, c] = images  # the canvas is still blank
        else:
            win[frame, r, c] = np.maximum(win[frame, r, c], images)  # overlap: pixel-wise max
    return out.reshape(b, t, spec.canvas, spec.canvas)


class DeviceMovingMNIST:
    """The same sequences as `generate_batch`, drawn on a torch device (a GPU): the few
    random numbers per sequence come from the same NumPy streams on the host, and the frames
    are rendered on the device in one vectorised gather, so a GPU is fed without copying
    frames over the bus. `batch(seed, indices)` equals `generate_batch(...).to(device)`.
    """

    def __init__(
        self,
        digits: np.ndarray,
        device: torch.device | str,
        spec: MovingMNISTSpec = MovingMNISTSpec(),
    ) -> None:
        self.spec = spec
        self.device = torch.device(device)
        self.count = len(_check_digits(digits, spec))
        # Scaled to [0, 1] here, on the host: a GPU divides by a scalar as a multiplication
        # by its reciprocal, one ulp away from the host's division for some pixel values.
        # The scaling is increasing, so the max over overlapping digits commutes with it.
        # Float32 digits take 4x the memory of uint8: about 190 MB for MNIST's 60,000.
        scaled = torch.from_numpy(np.ascontiguousarray(digits)).to(torch.float32).div_(255.0)
        self.digits = scaled.to(self.device)
        self.offsets = torch.arange(spec.canvas, device=self.device)  # canvas rows / columns

    def batch(self, seed: int, indices: Sequence[int]) -> torch.Tensor:
        """Sequences ``indices`` of ``seed`` as float32 (B, T, 1, H, W) on the device."""
        indices = list(indices)
        if not indices:
            raise DataError("DeviceMovingMNIST.batch needs at least one index")
        spec = self.spec
        pix, choices = _placements(self.count, seed, indices, spec)
        packed = torch.from_numpy(
            np.concatenate([pix.reshape(len(indices), -1), choices], axis=1).astype(np.int32)
        )
        if self.device.type == "cuda":  # pinned: the copy does not wait for the GPU
            packed = packed.pin_memory()
        packed = packed.to(self.device, non_blocking=True).long()
        b, t, d, s = len(indices), spec.num_frames, spec.num_digits, spec.digit_size
        pix_t = packed[:, : t * d * 2].view(b, t, d, 2)
        choice_t = packed[:, t * d * 2 :]  # (B, D)
        # Canvas pixel (y, x) shows row y - top, column x - left of the digit where in range.
        rows = self.offsets.view(1, 1, 1, -1) - pix_t[..., 0:1]  # (B, T, D, canvas)
        cols = self.offsets.view(1, 1, 1, -1) - pix_t[..., 1:2]
        inside = ((rows >= 0) & (rows < s)).unsqueeze(-1) & ((cols >= 0) & (cols < s)).unsqueeze(-2)
        flat = (
            choice_t.view(b, 1, d, 1, 1) * (s * s)
            + rows.clamp(0, s - 1).unsqueeze(-1) * s
            + cols.clamp(0, s - 1).unsqueeze(-2)
        )  # (B, T, D, canvas, canvas) indices into the flattened digit images
        frames = torch.where(inside, self.digits.view(-1)[flat], 0.0).amax(dim=2)  # overlap: max
        return frames.unsqueeze(2)  # (B, T, 1, H, W)


def generate_sequence(
    digits: np.ndarray, seed: int, index: int, spec: MovingMNISTSpec = MovingMNISTSpec()
) -> np.ndarray:
    """Sequence ``index`` of ``seed``: uint8 (T, canvas, canvas), digits drawn from ``digits``.

    Deterministic given (seed, index, spec, digits); independent of call order.
    """
    return _render_uint8(digits, seed, [index], spec)[0]


def _to_float(frames: np.ndarray) -> torch.Tensor:
    # (..., T, H, W) uint8 -> (..., T, 1, H, W) float32 in [0, 1]
    return torch.from_numpy(frames).to(torch.float32).div_(255.0).unsqueeze(-3)


def generate_batch(
    digits: np.ndarray, seed: int, indices: Sequence[int], spec: MovingMNISTSpec = MovingMNISTSpec()
) -> torch.Tensor:
    """Sequences ``indices`` of ``seed`` as float32 (B, T, 1, H, W) in [0, 1] (uint8 / 255).

    Row ``i`` equals ``generate_sequence(digits, seed, indices[i], spec) / 255``.
    """
    indices = list(indices)
    if not indices:
        raise DataError("generate_batch needs at least one index")
    return _to_float(_render_uint8(digits, seed, indices, spec))


class MovingMNIST(torch.utils.data.Dataset):
    """``length`` generated sequences of ``seed``; item i is float32 (T, 1, H, W) in [0, 1].

    Item i is sequence (seed, i), so every epoch, worker layout and shuffle order sees the
    same data; pass a different seed per epoch for fresh sequences.
    """

    def __init__(
        self, digits: np.ndarray, length: int, seed: int, spec: MovingMNISTSpec = MovingMNISTSpec()
    ) -> None:
        if not _is_int(length) or length <= 0:
            raise DataError(f"MovingMNIST length must be a positive int, got {length!r}")
        _check_key(seed, 0)
        self.digits = _check_digits(digits, spec)
        self.length = int(length)
        self.seed = int(seed)
        self.spec = spec

    def __len__(self) -> int:
        return self.length

    def _index(self, i: int) -> int:
        if not _is_int(i):
            raise TypeError(f"MovingMNIST indices must be ints, got {type(i).__name__}")
        j = int(i) + self.length if i < 0 else int(i)
        if not 0 <= j < self.length:
            raise IndexError(f"index {i} out of range for MovingMNIST of length {self.length}")
        return j

    def __getitem__(self, i: int) -> torch.Tensor:
        return _to_float(generate_sequence(self.digits, self.seed, self._index(i), self.spec))

    def __getitems__(self, indices: Sequence[int]) -> list[torch.Tensor]:
        # DataLoader calls this with a whole batch of indices: render them in one go.
        batch = generate_batch(self.digits, self.seed, [self._index(i) for i in indices], self.spec)
        return list(batch.unbind(0))


def fixed_test_set(
    digits: np.ndarray,
    num_sequences: int,
    seed: int = FIXED_TEST_SEED,
    spec: MovingMNISTSpec = MovingMNISTSpec(),
) -> torch.Tensor:
    """The seeded test set used when ``mnist_test_seq.npy`` is absent: (N, T, 1, H, W).

    Pass test-split digits, so no test digit was seen in training. Sequence i is
    (seed, i), so a smaller N gives a prefix of a larger one.
    """
    if not _is_int(num_sequences) or num_sequences <= 0:
        raise DataError(f"num_sequences must be a positive int, got {num_sequences!r}")
    out = torch.empty(num_sequences, spec.num_frames, 1, spec.canvas, spec.canvas)
    chunk = 256  # bounds the uint8 scratch memory for large N
    for lo in range(0, num_sequences, chunk):
        hi = min(lo + chunk, num_sequences)
        out[lo:hi] = generate_batch(digits, seed, range(lo, hi), spec)
    return out


def load_standard_test_set(path: str | os.PathLike, limit: int | None = None) -> torch.Tensor:
    """Load ``mnist_test_seq.npy`` (T, N, H, W) uint8 as float32 (N, T, 1, H, W) in [0, 1].

    The standard file is (20, 10000, 64, 64): sequence index second. ``limit`` keeps the
    first ``limit`` sequences; the file is memory-mapped, so only those are read. The full
    file is 0.8 GB as uint8 and 3.3 GB as the float32 tensor this returns.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"Moving MNIST test file {path} does not exist")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise DataError(f"Moving MNIST test file {path} is not a readable .npy file: {e}") from e
    if not isinstance(arr, np.ndarray):  # an .npz archive also loads without error
        arr.close()
        raise DataError(f"Moving MNIST test file {path} is not a .npy array file")
    if arr.ndim != 4 or arr.dtype != np.uint8:
        raise DataError(
            f"Moving MNIST test file {path} holds a {arr.dtype} array of shape {arr.shape};"
            " expected uint8 (frames, sequences, H, W) like (20, 10000, 64, 64)"
        )
    t, n, h, w = arr.shape
    if limit is not None:
        if not _is_int(limit) or limit <= 0:
            raise DataError(f"limit must be a positive int, got {limit!r}")
        n = min(n, int(limit))
    if t == 0 or n == 0 or h == 0 or w == 0:
        raise DataError(f"Moving MNIST test file {path} is empty: shape {arr.shape}")
    out = torch.empty(n, t, 1, h, w)
    # One frame index at a time: contiguous reads from the map and no full uint8 copy.
    for f in range(t):
        out[:, f, 0] = torch.from_numpy(np.array(arr[f, :n])).to(torch.float32).div_(255.0)
    return out
