"""Tests for datasets.mnist, datasets.make_embedded_subset and datasets.moving_mnist."""

from __future__ import annotations

import gzip
import hashlib
import math
import socket
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from convlstm.errors import DataError
from datasets import mnist
from datasets.make_embedded_subset import make_subset
from datasets.mnist import load_mnist, read_idx_images
from datasets.moving_mnist import (
    MovingMNIST,
    MovingMNISTSpec,
    fixed_test_set,
    generate_batch,
    generate_sequence,
    load_standard_test_set,
    trajectories,
)

SHARED_MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"
needs_shared = pytest.mark.skipif(
    not (SHARED_MNIST / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"no MNIST IDX files in {SHARED_MNIST}",
)


# ----------------------------------------------------------------------------- helpers


def idx_bytes(images: np.ndarray, magic: int = 2051) -> bytes:
    n, rows, cols = images.shape
    return struct.pack(">IIII", magic, n, rows, cols) + images.astype(np.uint8).tobytes()


def write_idx(folder: Path, name: str, images: np.ndarray, gz: bool) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = idx_bytes(images)
    if gz:
        path = folder / f"{name}.gz"
        path.write_bytes(gzip.compress(data))
    else:
        path = folder / name
        path.write_bytes(data)
    return path


def tiny_digits(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 28, 28), dtype=np.uint8)


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No MNIST folder from the environment, an empty cache, no remembered failure."""
    monkeypatch.delenv("CONVLSTM_MNIST_DIR", raising=False)
    monkeypatch.delenv("CONVLSTM_OFFLINE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(mnist, "_download_failure", None)
    return tmp_path / "cache" / "convlstm" / "mnist"


# ----------------------------------------------------------------------------- IDX reading


def test_idx_gz_and_plain_read_the_same(tmp_path):
    images = tiny_digits(5)
    plain = write_idx(tmp_path / "plain", "train-images-idx3-ubyte", images, gz=False)
    gz = write_idx(tmp_path / "gz", "train-images-idx3-ubyte", images, gz=True)
    np.testing.assert_array_equal(read_idx_images(plain), images)
    np.testing.assert_array_equal(read_idx_images(gz), images)

    a, src_a = load_mnist("train", root=tmp_path / "plain")
    b, src_b = load_mnist("train", root=tmp_path / "gz")
    assert a.dtype == np.uint8 and a.shape == (5, 28, 28)
    np.testing.assert_array_equal(a, b)
    assert src_a == f"idx:{plain.resolve()}" and src_b == f"idx:{gz.resolve()}"


def test_torchvision_layout_and_test_split(tmp_path):
    train, test = tiny_digits(4, 1), tiny_digits(3, 2)
    raw = tmp_path / "MNIST" / "raw"
    write_idx(raw, "train-images-idx3-ubyte", train, gz=True)
    write_idx(raw, "t10k-images-idx3-ubyte", test, gz=False)
    np.testing.assert_array_equal(load_mnist("train", root=tmp_path)[0], train)
    np.testing.assert_array_equal(load_mnist("test", root=tmp_path)[0], test)


def test_env_var_folder(monkeypatch, tmp_path, clean_env):
    images = tiny_digits(2)
    write_idx(tmp_path / "m", "t10k-images-idx3-ubyte", images, gz=True)
    monkeypatch.setenv("CONVLSTM_MNIST_DIR", str(tmp_path / "m"))
    np.testing.assert_array_equal(load_mnist("test")[0], images)
    monkeypatch.setenv("CONVLSTM_MNIST_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="CONVLSTM_MNIST_DIR"):
        load_mnist("test")


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_file_is_an_error(tmp_path, gz):
    path = write_idx(tmp_path, "train-images-idx3-ubyte", tiny_digits(3), gz=gz)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        load_mnist("train", root=tmp_path)


def test_bad_magic_shape_and_missing(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train-images-idx3-ubyte").write_bytes(idx_bytes(tiny_digits(2), magic=2049))
    with pytest.raises(DataError, match="magic"):
        load_mnist("train", root=bad)

    (bad / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((2, 27, 28), np.uint8)))
    with pytest.raises(DataError, match="27x28"):
        load_mnist("test", root=bad)

    (tmp_path / "short").mkdir()
    (tmp_path / "short" / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08")
    with pytest.raises(DataError, match="truncated"):
        load_mnist("train", root=tmp_path / "short")

    with pytest.raises(DataError, match="does not exist"):
        load_mnist("train", root=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no train-images"):
        load_mnist("train", root=tmp_path / "empty")
    with pytest.raises(DataError, match="split"):
        load_mnist("validation", root=tmp_path)


# ----------------------------------------------------------------------------- fallbacks


def test_offline_falls_back_to_embedded_subset(monkeypatch, capsys, clean_env):
    monkeypatch.setenv("CONVLSTM_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("offline mode must not open a connection")

    monkeypatch.setattr(socket, "create_connection", no_network)
    train, src_train = load_mnist("train")
    test, src_test = load_mnist("test")
    assert train.shape == (3000, 28, 28) and train.dtype == np.uint8
    assert test.shape == (1000, 28, 28) and test.dtype == np.uint8
    assert src_train == "embedded subset (3000 train digits)"
    assert src_test == "embedded subset (1000 test digits)"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("embedded subset" in line for line in err)


def test_unreachable_mirror_prints_one_line(monkeypatch, capsys, clean_env):
    def refuse(address, timeout=None, *args, **kwargs):
        assert timeout == 0.5
        raise OSError("network is unreachable")

    def must_not_download(root):
        raise AssertionError("downloaded although the probe failed")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(mnist, "_torchvision_download", must_not_download)
    digits, source = load_mnist("test", download_timeout=0.5)
    assert source.startswith("embedded subset") and len(digits) == 1000
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("MNIST download unavailable (")
    assert err[0].endswith("using the embedded subset of 1000 test digits")
    assert not clean_env.exists()


def test_hanging_probe_is_bounded(monkeypatch, capsys, clean_env):
    release = threading.Event()

    def hang(address, timeout=None, *args, **kwargs):
        release.wait(30)  # like a DNS lookup that never answers, until the test lets it go
        raise OSError("too late")

    monkeypatch.setattr(socket, "create_connection", hang)
    try:
        _, source = load_mnist("train", download_timeout=0.1)
    finally:
        release.set()
    # returning while the probe still hangs, with this message, shows the wait was bounded
    assert source.startswith("embedded subset")
    assert "no answer within 0.1 s" in capsys.readouterr().err


class _FakeConnection:
    def close(self) -> None:
        pass


def test_download_goes_to_cache_and_is_reused(monkeypatch, clean_env):
    train, test = tiny_digits(4, 3), tiny_digits(2, 4)
    seen_timeouts = []

    def fake_download(root):
        seen_timeouts.append(socket.getdefaulttimeout())
        raw = Path(root) / "MNIST" / "raw"
        write_idx(raw, "train-images-idx3-ubyte", train, gz=True)
        write_idx(raw, "t10k-images-idx3-ubyte", test, gz=True)

    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: _FakeConnection())
    monkeypatch.setattr(mnist, "_torchvision_download", fake_download)
    before = socket.getdefaulttimeout()
    digits, source = load_mnist("train", download_timeout=3.0)
    np.testing.assert_array_equal(digits, train)
    assert source == f"download:{clean_env}"
    assert seen_timeouts == [3.0] and socket.getdefaulttimeout() == before
    assert [p.name for p in clean_env.parent.iterdir()] == ["mnist"]  # no scratch left

    # The second split comes from the cache, even offline, without another download.
    monkeypatch.setenv("CONVLSTM_OFFLINE", "1")
    digits, source = load_mnist("test")
    np.testing.assert_array_equal(digits, test)
    assert source == f"download:{clean_env}" and seen_timeouts == [3.0]


def test_failed_download_falls_back_and_leaves_no_cache(monkeypatch, capsys, clean_env):
    def broken_download(root):
        write_idx(Path(root) / "MNIST" / "raw", "train-images-idx3-ubyte", tiny_digits(1), True)
        raise RuntimeError("Error downloading t10k-images-idx3-ubyte.gz:\nTried ...")

    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: _FakeConnection())
    monkeypatch.setattr(mnist, "_torchvision_download", broken_download)
    before = socket.getdefaulttimeout()
    digits, source = load_mnist("train")
    assert source == "embedded subset (3000 train digits)"
    assert socket.getdefaulttimeout() == before
    assert not clean_env.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "RuntimeError" in err[0]


# ----------------------------------------------------------------------------- shared data


@pytest.fixture(scope="module")
def shared_mnist():
    return load_mnist("train", root=SHARED_MNIST)[0], load_mnist("test", root=SHARED_MNIST)[0]


@needs_shared
def test_shared_mnist_and_embedded_subset(shared_mnist):
    train, test = shared_mnist
    assert train.shape == (60000, 28, 28) and test.shape == (10000, 28, 28)
    assert train.dtype == np.uint8 and test.dtype == np.uint8
    # The hashes printed in the shared folder's README.
    assert hashlib.sha256(train.tobytes()).hexdigest()[:16] == "741c988805d008ac"
    assert hashlib.sha256(test.tobytes()).hexdigest()[:16] == "6d87418db22cc802"
    with np.load(mnist.EMBEDDED_SUBSET) as sub:
        assert sub["train"].dtype == np.uint8 and sub["test"].dtype == np.uint8
        np.testing.assert_array_equal(sub["train"], train[:3000])
        np.testing.assert_array_equal(sub["test"], test[:1000])
    assert mnist.EMBEDDED_SUBSET.stat().st_size < 1_500_000


def test_make_subset_keeps_splits_apart(tmp_path):
    train, test = tiny_digits(6, 5), tiny_digits(4, 6)
    write_idx(tmp_path / "m", "train-images-idx3-ubyte", train, gz=True)
    write_idx(tmp_path / "m", "t10k-images-idx3-ubyte", test, gz=False)
    out = make_subset(tmp_path / "m", tmp_path / "sub.npz", num_train=3, num_test=2)
    with np.load(out) as sub:
        np.testing.assert_array_equal(sub["train"], train[:3])
        np.testing.assert_array_equal(sub["test"], test[:2])
    with pytest.raises(DataError):
        make_subset(tmp_path / "m", tmp_path / "sub2.npz", num_train=7, num_test=2)


# ----------------------------------------------------------------------------- generator


def pixel_digit() -> np.ndarray:
    """One 28x28 digit whose only bright pixel is its top-left corner."""
    digit = np.zeros((1, 28, 28), np.uint8)
    digit[0, 0, 0] = 255
    return digit


def expected_pixels(seed: int, index: int, speed: float, frames: int, free: int):
    """The protocol re-implemented with Python floats for one digit: [(row, col)] per frame."""
    rng = np.random.default_rng([seed, index])
    pos = [float(x) for x in rng.random((1, 2))[0]]
    theta = float(rng.uniform(0.0, 2.0 * math.pi, 1)[0])
    vel = [speed * math.sin(theta), speed * math.cos(theta)]
    out = [tuple(round(p * free) for p in pos)]
    for _ in range(1, frames):
        for a in range(2):
            pos[a] += vel[a]
            if pos[a] < 0.0:
                pos[a], vel[a] = 0.0, -vel[a]
            elif pos[a] > 1.0:
                pos[a], vel[a] = 1.0, -vel[a]
        out.append(tuple(round(p * free) for p in pos))
    return out


def bright_pixels(frames: np.ndarray):
    out = []
    for frame in frames:
        rows, cols = np.nonzero(frame)
        assert len(rows) == 1
        out.append((int(rows[0]), int(cols[0])))
    return out


def test_spec_validation():
    assert MovingMNISTSpec().free_range == 36
    for bad in (
        dict(num_digits=0),
        dict(num_frames=2.0),
        dict(canvas=20),
        dict(speed=-0.1),
        dict(digit_size=True),
        dict(speed=float("nan")),
    ):
        with pytest.raises(DataError):
            MovingMNISTSpec(**bad)
    with pytest.raises(DataError, match="digit_size"):
        generate_sequence(np.zeros((2, 20, 20), np.uint8), 0, 0)
    with pytest.raises(DataError, match="uint8"):
        generate_sequence(np.zeros((2, 28, 28), np.float32), 0, 0)
    with pytest.raises(DataError, match="index"):
        generate_sequence(tiny_digits(2), 0, -1)


def test_determinism_and_call_order():
    digits = tiny_digits(50)
    a = generate_sequence(digits, 7, 3)
    assert a.dtype == np.uint8 and a.shape == (20, 64, 64)
    b5 = generate_sequence(digits, 7, 5)
    b3 = generate_sequence(digits, 7, 3)
    np.testing.assert_array_equal(a, b3)
    assert not np.array_equal(a, b5)  # different indices differ
    assert not np.array_equal(a, generate_sequence(digits, 8, 3))  # and different seeds

    batch = generate_batch(digits, 7, [5, 3, 9])
    assert batch.shape == (3, 20, 1, 64, 64) and batch.dtype == torch.float32
    assert 0.0 <= batch.min() and batch.max() <= 1.0
    for row, index in enumerate([5, 3, 9]):
        expected = torch.from_numpy(generate_sequence(digits, 7, index)).float() / 255
        assert torch.equal(batch[row, :, 0], expected)
    assert torch.equal(generate_batch(digits, 7, [9, 5])[1], batch[0])


@pytest.mark.parametrize("speed", [0.1, 0.35])
def test_single_pixel_trajectories_and_bounce(speed):
    spec = MovingMNISTSpec(num_digits=1, num_frames=30, speed=speed)
    bounces = 0
    for index in range(12):
        frames = generate_sequence(pixel_digit(), 11, index, spec)
        got = bright_pixels(frames)
        assert got == expected_pixels(11, index, speed, 30, 36)
        traj = trajectories(11, index, spec)[:, 0]  # (T, 2) in units of the free range
        for t in range(1, 29):
            for a in range(2):
                if traj[t, a] in (0.0, 1.0) and traj[t - 1, a] != traj[t, a]:
                    # Clamped to the edge: the digit stands on the border pixel and moves
                    # the other way on the next step (the velocity component was negated).
                    bounces += 1
                    assert got[t][a] == (0 if traj[t, a] == 0.0 else 36)
                    before = traj[t, a] - traj[t - 1, a]
                    after = traj[t + 1, a] - traj[t, a]
                    assert before * after < 0
    assert bounces >= 5


def test_speed_without_bounce():
    spec = MovingMNISTSpec()
    steps = 0
    for index in range(10):
        traj = trajectories(3, index, spec)  # (T, D, 2)
        assert traj.shape == (20, 2, 2) and traj.min() >= 0.0 and traj.max() <= 1.0
        step = np.diff(traj, axis=0)  # (T-1, D, 2)
        inside = ((traj[1:] > 0) & (traj[1:] < 1)).all(axis=-1)  # no clamp on this step
        norms = np.linalg.norm(step, axis=-1)[inside]
        np.testing.assert_allclose(norms, 0.1, rtol=0, atol=1e-12)  # 3.6 px per frame
        steps += len(norms)
    assert steps > 200


def test_digit_split_is_respected():
    train = np.full((5, 28, 28), 100, np.uint8)
    test = np.full((5, 28, 28), 200, np.uint8)
    for index in range(5):
        assert set(np.unique(generate_sequence(test, 1, index))) <= {0, 200}
        assert set(np.unique(generate_sequence(train, 1, index))) <= {0, 100}
    values = torch.unique(fixed_test_set(test, 4)).tolist()
    assert set(values) <= {0.0, torch.tensor(200 / 255, dtype=torch.float32).item()}


def test_overlap_is_pixelwise_max():
    a = np.zeros((28, 28), np.uint8)
    b = np.zeros((28, 28), np.uint8)
    a[:, :14], a[:, 14:] = 50, 200
    b[:, :14], b[:, 14:] = 150, 10
    digits = np.stack([a, b])
    # canvas == digit_size: both digits sit at (0, 0) in every frame.
    spec = MovingMNISTSpec(num_digits=2, num_frames=3, canvas=28)
    outcomes = set()
    for index in range(20):
        frames = generate_sequence(digits, 0, index, spec)
        frame = frames[0]
        assert all(np.array_equal(f, frame) for f in frames)
        for name, image in (("a", a), ("b", b), ("max", np.maximum(a, b))):
            if np.array_equal(frame, image):
                outcomes.add(name)
                break
        else:
            pytest.fail("frame is neither a digit nor the pixel-wise max of two")
    assert "max" in outcomes


def test_moving_mnist_dataset():
    digits = tiny_digits(20)
    ds = MovingMNIST(digits, length=5, seed=3)
    assert len(ds) == 5
    item = ds[2]
    assert item.shape == (20, 1, 64, 64) and item.dtype == torch.float32
    assert torch.equal(item, generate_batch(digits, 3, [2])[0])
    assert torch.equal(ds[-1], ds[4])
    with pytest.raises(IndexError):
        ds[5]
    with pytest.raises(IndexError):
        ds[-6]
    loader = torch.utils.data.DataLoader(ds, batch_size=4)
    first = next(iter(loader))
    assert torch.equal(first, generate_batch(digits, 3, range(4)))
    assert sum(len(b) for b in loader) == 5
    with pytest.raises(DataError):
        MovingMNIST(digits, length=0, seed=3)


def test_fixed_test_set_is_a_seeded_prefix():
    digits = tiny_digits(10)
    small = fixed_test_set(digits, 3)
    assert small.shape == (3, 20, 1, 64, 64) and small.dtype == torch.float32
    assert torch.equal(small, fixed_test_set(digits, 5)[:3])
    assert torch.equal(small, generate_batch(digits, 4242, range(3)))


# ----------------------------------------------------------------------------- standard file


def test_standard_test_set_loader(tmp_path):
    raw = np.zeros((20, 3, 64, 64), np.uint8)
    for t in range(20):
        for n in range(3):
            raw[t, n] = 10 * t + n
    path = tmp_path / "mnist_test_seq.npy"
    np.save(path, raw)
    data = load_standard_test_set(path)
    assert data.shape == (3, 20, 1, 64, 64) and data.dtype == torch.float32
    for n in range(3):
        for t in range(20):
            assert torch.all(data[n, t, 0] == (10 * t + n) / 255)
    assert torch.equal(load_standard_test_set(path, limit=2), data[:2])


def test_standard_test_set_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_standard_test_set(tmp_path / "nothing.npy")
    text = tmp_path / "notes.npy"
    text.write_text("not an array")
    with pytest.raises(DataError, match=".npy"):
        load_standard_test_set(text)
    archive = tmp_path / "archive.npy"
    with open(archive, "wb") as f:
        np.savez(f, a=np.zeros(3))
    with pytest.raises(DataError, match=".npy"):
        load_standard_test_set(archive)
    for name, arr in (
        ("ndim.npy", np.zeros((20, 3, 64), np.uint8)),
        ("dtype.npy", np.zeros((20, 3, 64, 64), np.float32)),
    ):
        np.save(tmp_path / name, arr)
        with pytest.raises(DataError, match="expected uint8"):
            load_standard_test_set(tmp_path / name)


def test_device_generator_renders_the_same_sequences_as_numpy(mnist_dir):
    from datasets.moving_mnist import DeviceMovingMNIST

    digits, _ = load_mnist("train", mnist_dir)
    for spec in (MovingMNISTSpec(), MovingMNISTSpec(num_digits=3, num_frames=7, canvas=40)):
        source = DeviceMovingMNIST(digits, "cpu", spec)
        for indices in (range(6), [0, 7, 1000, 3]):
            assert torch.equal(source.batch(5, indices), generate_batch(digits, 5, indices, spec))
    with pytest.raises(DataError, match="at least one index"):
        source.batch(5, [])
