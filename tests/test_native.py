"""convlstm.native: C sources compiled once into a cache folder, loaded with ctypes, and a
clear fallback (one warning, None) where no compiler works."""

import ctypes
import platform
import resource
import shutil
import subprocess
import sys

import pytest
import torch

from convlstm import native
from convlstm.config import ModelConfig
from convlstm.models import build_model
from convlstm.speed import SpeedOptions, apply_speed


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache folder, and load() forgetting what it loaded before."""
    monkeypatch.setenv("CONVLSTM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("CONVLSTM_NATIVE", raising=False)
    native.load.cache_clear()
    yield tmp_path / "cache"
    native.load.cache_clear()


def _compiler_or_skip() -> None:
    if native.compiler() is None:
        pytest.skip("no C compiler here")


def test_builds_once_and_reuses_the_cached_library(cache, monkeypatch):
    _compiler_or_skip()
    lib = native.load("tiles")
    assert isinstance(lib, ctypes.CDLL) and hasattr(lib, "input_tiles_f32")
    built = sorted(cache.iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"  # no temporary file left beside it
    native.load.cache_clear()

    def no_compiler(*args, **kwargs):
        raise AssertionError("the cached library should have been reused")

    monkeypatch.setattr(subprocess, "run", no_compiler)
    assert native.load("tiles") is not None
    assert sorted(cache.iterdir()) == built


@pytest.mark.parametrize("cc", ["/nonexistent/cc", "false"])
def test_a_compiler_that_fails_warns_once_and_leaves_nothing(cache, monkeypatch, cc):
    monkeypatch.setenv("CC", shutil.which(cc) or cc)
    with pytest.warns(RuntimeWarning, match="tiles.c are not available.*slower PyTorch code"):
        assert native.load("tiles") is None
    assert native.load("tiles") is None  # remembered: no second warning, no second try
    assert not cache.exists() or not any(cache.iterdir())


def test_no_compiler_on_the_path(cache, monkeypatch):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    with pytest.warns(RuntimeWarning, match="no C compiler"):
        assert native.load("tiles") is None


def test_can_be_switched_off_without_a_warning(cache, monkeypatch, recwarn):
    monkeypatch.setenv("CONVLSTM_NATIVE", "0")
    assert native.load("tiles") is None
    assert not recwarn.list


def test_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("CONVLSTM_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert native.cache_dir() == tmp_path / "convlstm"
    monkeypatch.setenv("CONVLSTM_CACHE_DIR", str(tmp_path / "mine"))
    assert native.cache_dir() == tmp_path / "mine"


def test_the_cpu_fast_path_keeps_freed_memory(monkeypatch):
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert native.keep_freed_memory() is True
    calls = []
    monkeypatch.setattr(native, "keep_freed_memory", lambda: calls.append(1))
    model = build_model(ModelConfig(hidden_channels=(4,), kernel_size=3, patch_size=2))
    apply_speed(model, SpeedOptions(hoist=True))
    assert calls == []
    apply_speed(model, SpeedOptions.for_path("fast", "cpu"))
    assert calls == [1]


def test_kept_memory_serves_a_large_temporary_again_without_fresh_pages():
    """A 64 MiB block freed and asked for again comes back from the heap, its pages there
    already: an mmap (glibc's default for large blocks) would fault in all 16,384 of them
    every time. It may take a few rounds: PyTorch asks for 64-byte-aligned blocks, which need
    a little more than the hole an equal block left (and a small block kept after a hole can
    fence it off from the top) until the holes merge."""
    if not native.keep_freed_memory():
        pytest.skip("not glibc: the allocator is left alone")
    size = 2**24  # float32: 64 MiB, above glibc's largest mmap threshold (32 MiB)
    rounds = []
    while len(rounds) < 16 and (not rounds or rounds[-1] >= 2000):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(size)  # allocated, touched and freed
        rounds.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    assert rounds[-1] < 2000, f"page faults per round: {rounds}"


def test_a_broken_cached_library_is_built_again(cache):
    _compiler_or_skip()
    assert native.load("tiles") is not None
    (built,) = cache.iterdir()
    built.unlink()  # a new file: writing over the one this process has mapped would crash it
    built.write_bytes(b"not a shared library")
    # a new process: this one has the library loaded already, and dlopen would reuse it
    code = "from convlstm import native; assert native.load('tiles') is not None"
    subprocess.run([sys.executable, "-W", "error", "-c", code], check=True, timeout=120)
    assert built.read_bytes()[:4] == b"\x7fELF"


def test_cc_may_be_a_command_line(cache, monkeypatch):
    _compiler_or_skip()
    monkeypatch.setenv("CC", f"{native.compiler()} -Wall")
    assert native.load("tiles") is not None


def _mapped_openmp_runtimes() -> set[str]:
    with open("/proc/self/maps") as maps:
        fields = [line.split(maxsplit=5) for line in maps]
    paths = {f[5].strip() for f in fields if len(f) == 6}
    return {p for p in paths if p.rsplit("/", 1)[-1].startswith(("libgomp", "libiomp5", "libomp"))}


def test_the_tile_kernels_run_on_pytorchs_openmp_threads(cache):
    """Linked against the OpenMP runtime PyTorch loaded, not a second one whose threads would
    spin against PyTorch's for the same cores, and as many threads as PyTorch's."""
    _compiler_or_skip()
    runtime = native.openmp_runtime()
    if runtime is None or native._is_clang(native.compiler()):
        pytest.skip("no OpenMP build here: PyTorch has no runtime loaded, or the C is clang's")
    before = _mapped_openmp_runtimes()
    assert runtime in before
    flags, libraries = native.flag_sets(native.compiler())[0]
    assert "-fopenmp" in flags and libraries == (runtime,)
    lib = native.load("tiles")
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            assert lib.tiles_threads() == count  # built with OpenMP, told by PyTorch
    finally:
        torch.set_num_threads(threads)
    from convlstm import winograd

    winograd._input_tiles(torch.randn(4, 64, 16, 16), 6)  # large enough to fork
    assert _mapped_openmp_runtimes() == before


def test_without_an_openmp_runtime_or_where_openmp_fails_the_kernels_build_without(
    cache, monkeypatch
):
    _compiler_or_skip()
    cc = native.compiler()
    monkeypatch.setattr(native, "openmp_runtime", lambda: None)
    assert native.flag_sets(cc) == [(flags, ()) for flags in native.FLAG_SETS]
    monkeypatch.setattr(native, "openmp_runtime", lambda: "/nonexistent/libgomp.so.1")
    monkeypatch.setattr(native, "_is_clang", lambda cc: True)
    assert native.flag_sets(cc) == [(flags, ()) for flags in native.FLAG_SETS]  # clang's
    monkeypatch.setattr(native, "_is_clang", lambda cc: False)
    lib = native.load("tiles")  # the OpenMP build failed: the next flags built
    assert lib is not None and lib.tiles_threads() == 0
    assert len(list(cache.iterdir())) == 1
