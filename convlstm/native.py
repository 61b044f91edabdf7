"""Native helpers for the CPU fast path: C kernels shipped as source, compiled on first use
with the system's C compiler; and glibc's malloc told to keep freed memory.

    lib = native.load("tiles")      # convlstm/tiles.c -> a cached shared library, or None

The library is built once per source, compiler and CPU into the cache folder
($CONVLSTM_CACHE_DIR, else $XDG_CACHE_HOME/convlstm, else ~/.cache/convlstm) and loaded with
ctypes: there is nothing to build at install time and no tie to PyTorch's C++ ABI. Kernels
with OpenMP loops are linked against the OpenMP runtime PyTorch loaded, so that they share
its threads (and torch.set_num_threads); without one, they run on the calling thread.
Where no compiler works (none installed, a broken $CC) load returns None after one
warning, and with CONVLSTM_NATIVE=0 without one; the callers then run their PyTorch code,
which computes the same thing.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

# tried in order: the first that compiles is used; OpenMP only with a runtime to share.
# -fno-trapping-math lets GCC run both sides of the kernels' selects (the clamps in gates.c's
# exp) as vector code without AVX-512's masks: with -march=haswell (AVX2) the gate update's
# forward was scalar without it, 3.5x slower. It changes no number (every operation still
# rounds as IEEE 754 says), only which floating-point exception flags are raised, which
# PyTorch never reads, and, for a NaN input on AVX2, the sign bit of the NaN that comes out.
FLAG_SETS = (
    ("-O3", "-march=native", "-fno-trapping-math"),
    ("-O3", "-fno-trapping-math"),
    ("-O3",),
)
OPENMP_FLAGS = ("-O3", "-march=native", "-fno-trapping-math", "-fopenmp", "-Wl,--as-needed")
COMPILE_TIMEOUT_S = 120
# OpenMP runtimes whose GOMP_* entry points GCC's -fopenmp code calls: GNU's, Intel's, LLVM's
_OPENMP_RUNTIMES = ("libgomp", "libiomp5", "libomp")


def cache_dir() -> Path:
    if os.environ.get("CONVLSTM_CACHE_DIR"):
        return Path(os.environ["CONVLSTM_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "convlstm"


def compiler() -> str | None:
    """$CC (a command line: "ccache gcc" works), else the first of cc, gcc, clang on the
    PATH."""
    if os.environ.get("CC"):
        return os.environ["CC"]
    return next((found for name in ("cc", "gcc", "clang") if (found := shutil.which(name))), None)


def _cpu() -> str:
    """What -march=native depends on, so that a cache folder shared between machines does
    not hand one CPU another's instructions."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        return next((line for line in text.splitlines() if line.startswith("flags")), text[:200])
    except OSError:
        return platform.processor()


def openmp_runtime() -> str | None:
    """The file of the OpenMP runtime PyTorch loaded (the one whose threads run its CPU
    operators: the first mapped in this process under PyTorch's folder, else the first
    mapped at all), or None (none loaded, or no /proc to tell)."""
    import torch  # loads PyTorch's runtime, if it has one, before we look

    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    found = []
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        name = os.path.basename(fields[5]) if len(fields) == 6 else ""
        if name.startswith(_OPENMP_RUNTIMES) and ".so" in name and fields[5] not in found:
            found.append(fields[5])
    ours = [path for path in found if path.startswith(os.path.dirname(torch.__file__))]
    return (ours or found or [None])[0]


@functools.cache
def _is_clang(cc: str) -> bool:
    """Clang's -fopenmp calls LLVM's runtime entry points (__kmpc_*), which GNU's libgomp
    lacks: it would bring a runtime of its own."""
    try:
        run = subprocess.run(
            [*shlex.split(cc), "-dM", "-E", "-x", "c", os.devnull],
            capture_output=True,
            text=True,
            timeout=COMPILE_TIMEOUT_S,
        )
    except (OSError, subprocess.TimeoutExpired):
        return True  # cannot tell: no OpenMP
    return "__clang__" in run.stdout


def flag_sets(cc: str) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """(flags, libraries) to try, in order. First, with a GCC-compatible compiler (not
    clang), OpenMP linked against PyTorch's own runtime, so that the kernels' parallel loops
    run on PyTorch's threads (a second runtime's threads would spin against them for the
    same cores; --as-needed drops the compiler's own -lgomp), where PyTorch has one loaded."""
    runtime = openmp_runtime()
    parallel = [(OPENMP_FLAGS, (runtime,))] if runtime and not _is_clang(cc) else []
    return [*parallel, *((f, ()) for f in FLAG_SETS)]


def _build(source: Path, cc: str) -> Path:
    """Compile `source` (cached); raises RuntimeError with the compiler's complaint."""
    text = source.read_bytes()
    errors = []
    for flags, libraries in flag_sets(cc):
        what = [cc, " ".join(flags + libraries), platform.machine(), _cpu()]
        key = hashlib.sha256(b"\0".join([text, *(part.encode() for part in what)]))
        target = cache_dir() / f"{source.stem}-{key.hexdigest()[:16]}.so"
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            run = subprocess.run(
                [*shlex.split(cc), *flags, "-shared", "-fPIC", str(source), *libraries, "-o", tmp],
                capture_output=True,
                text=True,
                timeout=COMPILE_TIMEOUT_S,
            )
            if run.returncode == 0:
                os.chmod(tmp, 0o755)
                os.replace(tmp, target)  # atomic: another process may build the same file
                return target
            lines = run.stderr.strip().splitlines()
            errors.append(lines[-1] if lines else f"exit status {run.returncode}")
        except (OSError, subprocess.TimeoutExpired) as error:
            errors.append(str(error))
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError(f"{cc} could not build {source.name}: {errors[-1]}")


@functools.cache
def load(name: str) -> ctypes.CDLL | None:
    """convlstm/<name>.c compiled and loaded, or None (with one warning) where it can't be."""
    if os.environ.get("CONVLSTM_NATIVE", "1") == "0":
        return None
    cc = compiler()
    try:
        if cc is None:
            raise RuntimeError("no C compiler (cc, gcc or clang) on the PATH")
        source = Path(__file__).with_name(f"{name}.c")
        try:
            return ctypes.CDLL(str(_build(source, cc)))
        except OSError:  # a cached library that can't be loaded (truncated): build it again
            _build(source, cc).unlink()
            return ctypes.CDLL(str(_build(source, cc)))
    except (RuntimeError, OSError) as error:
        warnings.warn(
            f"convlstm: the C kernels of {name}.c are not available ({error}); "
            "using the slower PyTorch code instead",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


@functools.cache
def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse (process-wide; once): blocks of any
    size come from the heap instead of fresh mmaps, and the heap's top is returned to the
    system only beyond 2 GiB. PyTorch's CPU tensors are plain mallocs, and a training step
    that frees and reallocates large temporaries otherwise gets fresh pages each time: the
    CPU fast path took 400-12,000 page faults per step on mmnist-cpu-small at batch 16
    (509-552 against 582-591 ms per step without them, three alternating pairs of runs on a
    2-core CPU). Raising glibc's mmap threshold to its 32 MiB maximum fixed that, but not
    ConvLSTM-S, whose 5x5 Winograd filters and products exceed it: 54,000-86,000 faults per
    step, against 1,100-4,300 with no mmap at all (batch 2, five alternating pairs: median
    2.48 against 2.23 s per step). The peak memory is unchanged; it is just not handed
    back. Returns whether it applied (False off glibc, where the allocator is left
    alone)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
