"""MNIST digits as uint8 arrays (N, 28, 28), from a local folder, a download, or the repo.

Resolution order of :func:`load_mnist`:

1. the ``root`` argument;
2. the ``CONVLSTM_MNIST_DIR`` environment variable;
3. a copy downloaded earlier into ``$XDG_CACHE_HOME/convlstm/mnist`` (``~/.cache/...``);
4. a torchvision download into that cache (bounded time; skipped when ``allow_download``
   is false or ``CONVLSTM_OFFLINE=1``);
5. the small subset embedded in the repo (``datasets/data/mnist_subset.npz``).

A folder the user named (1 or 2) must be readable: any problem there is a
:class:`~convlstm.errors.DataError`, never a silent fallback to other digits.
"""

from __future__ import annotations

import gzip
import os
import shutil
import socket
import sys
import tempfile
import threading
import zlib
from pathlib import Path

import numpy as np

from convlstm.errors import DataError

__all__ = ["load_mnist", "read_idx_images", "find_idx_file", "cache_dir", "EMBEDDED_SUBSET"]

ENV_DIR = "CONVLSTM_MNIST_DIR"
ENV_OFFLINE = "CONVLSTM_OFFLINE"
EMBEDDED_SUBSET = Path(__file__).resolve().parent / "data" / "mnist_subset.npz"

# The first mirror torchvision's MNIST tries; probing it first keeps an offline machine
# from importing torchvision and waiting on four failed downloads.
MIRROR_HOST = ("ossci-datasets.s3.amazonaws.com", 443)

_PREFIX = {"train": "train", "test": "t10k"}
_IDX_UBYTE_3D = 0x00000803  # 2051: unsigned byte, 3 dimensions
_DIGIT_SHAPE = (28, 28)

# Remember a failed download for the rest of the process, so loading the test split after
# the train split does not wait for the same timeout twice.
_download_failure: str | None = None


def cache_dir() -> Path:
    """Where downloaded MNIST files live: ``$XDG_CACHE_HOME/convlstm/mnist``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(base).expanduser().resolve() / "convlstm" / "mnist"


def read_idx_images(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX3 uint8 image file (gzip or plain) into an array (N, 28, 28).

    Raises DataError when the file is unreadable, truncated, or not 28x28 uint8 images.
    """
    path = Path(path)
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        # gzip reports truncation as EOFError and corruption as BadGzipFile (an OSError).
        raise DataError(f"cannot read MNIST file {path}: {e}") from e
    if len(raw) < 16:
        raise DataError(f"MNIST file {path} is truncated: {len(raw)} bytes, no IDX header")
    magic, n, rows, cols = np.frombuffer(raw, dtype=">u4", count=4)
    if magic != _IDX_UBYTE_3D:
        raise DataError(
            f"MNIST file {path} is not an IDX image file: magic {int(magic)}, expected 2051"
        )
    if (rows, cols) != _DIGIT_SHAPE:
        raise DataError(f"MNIST file {path} holds {rows}x{cols} images, expected 28x28")
    expected = 16 + int(n) * int(rows) * int(cols)
    if len(raw) != expected:
        raise DataError(
            f"MNIST file {path} has {len(raw)} bytes, expected {expected} for {n} images"
            " (truncated or corrupt)"
        )
    # Copy out of the bytes buffer so the result is writable and owns its memory.
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(int(n), rows, cols).copy()


def find_idx_file(folder: Path, split: str) -> Path | None:
    """The image file of ``split`` in ``folder`` or torchvision's ``folder/MNIST/raw``."""
    name = f"{_PREFIX[split]}-images-idx3-ubyte"
    for base in (folder, folder / "MNIST" / "raw"):
        # Plain first: torchvision keeps both and the plain one needs no decompression.
        for candidate in (base / name, base / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _read_user_folder(folder: str | os.PathLike, split: str, origin: str) -> tuple[np.ndarray, str]:
    path = Path(folder).expanduser().resolve()
    if not path.is_dir():
        raise DataError(f"MNIST folder {path} ({origin}) does not exist or is not a folder")
    found = find_idx_file(path, split)
    if found is None:
        name = f"{_PREFIX[split]}-images-idx3-ubyte[.gz]"
        raise DataError(f"MNIST folder {path} ({origin}) has no {name} (nor MNIST/raw/{name})")
    return read_idx_images(found), f"idx:{found}"


def _probe(address: tuple[str, int], timeout: float) -> str | None:
    """None if a TCP connection to ``address`` opens within ``timeout`` s, else the reason."""
    result: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection(address, timeout=timeout).close()
            result.append(None)
        except OSError as e:
            result.append(str(e) or type(e).__name__)

    # create_connection's timeout does not cover the DNS lookup, which can hang far longer
    # on a machine without network; a daemon thread bounds the whole probe.
    thread = threading.Thread(target=connect, name="mnist-probe", daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return result[0] if result else f"no answer within {timeout:g} s"


def _torchvision_download(root: Path) -> None:
    """Download the four MNIST files into ``root/MNIST/raw`` (a seam for tests)."""
    from torchvision.datasets import MNIST  # lazy: only this branch needs torchvision

    MNIST(root=str(root), train=True, download=True)


def _download(split: str, timeout: float) -> tuple[np.ndarray, str]:
    """Download into the cache; raises on any failure (the caller falls back)."""
    cache = cache_dir()
    cache.parent.mkdir(parents=True, exist_ok=True)
    # Download into a scratch folder and move it into place only when complete, so an
    # interrupted download never leaves a half-written cache that step 3 would trust.
    scratch = Path(tempfile.mkdtemp(prefix=".mnist-download-", dir=cache.parent))
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)  # urllib inside torchvision has no timeout of its own
    try:
        _torchvision_download(scratch)
        raw = scratch / "MNIST" / "raw"
        for s in _PREFIX:
            found = find_idx_file(raw, s)
            if found is None:
                raise DataError(f"the download left no {s} images in {raw}")
            read_idx_images(found)  # verify before trusting it as the cache
        if cache.exists():
            shutil.rmtree(cache)  # a broken earlier cache (step 3 rejected it)
        (cache / "MNIST").mkdir(parents=True)
        os.replace(raw, cache / "MNIST" / "raw")
    finally:
        socket.setdefaulttimeout(previous)
        shutil.rmtree(scratch, ignore_errors=True)
    found = find_idx_file(cache, split)
    assert found is not None
    return read_idx_images(found), f"download:{cache}"


def _load_embedded(split: str) -> np.ndarray:
    try:
        with np.load(EMBEDDED_SUBSET) as data:
            return data[split]
    except (OSError, KeyError, ValueError) as e:
        raise DataError(
            f"the embedded MNIST subset {EMBEDDED_SUBSET} is missing or unreadable ({e});"
            " regenerate it with python -m datasets.make_embedded_subset"
        ) from e


def _fallback(split: str, reason: str) -> tuple[np.ndarray, str]:
    digits = _load_embedded(split)
    what = f"{len(digits)} {split} digits"
    print(
        f"MNIST download unavailable ({reason}); using the embedded subset of {what}",
        file=sys.stderr,
    )
    return digits, f"embedded subset ({what})"


def load_mnist(
    split: str,
    root: str | os.PathLike | None = None,
    *,
    allow_download: bool = True,
    download_timeout: float = 10.0,
) -> tuple[np.ndarray, str]:
    """Load MNIST digits of ``split`` ("train" or "test").

    Returns ``(digits, source)``: a uint8 array (N, 28, 28) and a description of where the
    digits came from ("idx:/path", "download:/cache", "embedded subset (N train digits)"),
    to be printed next to every result. See the module docstring for the search order.
    """
    global _download_failure
    if split not in _PREFIX:
        raise DataError(f"MNIST split must be 'train' or 'test', got {split!r}")
    if root is not None:
        return _read_user_folder(root, split, "given as root")
    env_dir = os.environ.get(ENV_DIR)
    if env_dir:
        return _read_user_folder(env_dir, split, f"from ${ENV_DIR}")

    cache = cache_dir()
    found = find_idx_file(cache, split)
    if found is not None:
        try:
            return read_idx_images(found), f"download:{cache}"
        except DataError as e:
            # Not a folder the user named: report it and fetch a fresh copy instead.
            print(f"ignoring the broken MNIST cache: {e}", file=sys.stderr)

    if not allow_download:
        return _fallback(split, "downloads disabled")
    if os.environ.get(ENV_OFFLINE) == "1":
        return _fallback(split, f"{ENV_OFFLINE}=1")
    if _download_failure is not None:
        return _fallback(split, _download_failure)
    problem = _probe(MIRROR_HOST, download_timeout)
    if problem is not None:
        _download_failure = f"cannot reach {MIRROR_HOST[0]}: {problem}"
        return _fallback(split, _download_failure)
    try:
        return _download(split, download_timeout)
    except Exception as e:  # noqa: BLE001 - any download failure means: use the subset
        _download_failure = f"download failed: {type(e).__name__}: {e}".splitlines()[0]
        return _fallback(split, _download_failure)
