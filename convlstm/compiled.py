"""A step compiled by torch.compile (Inductor) with a module's weights frozen into it: the
CPU's counterpart of a CUDA graph for streaming (convlstm.speed.StreamingPredictor).

    step = FrozenStep(fn, model)       # fn(*tensors) -> tuple of tensors, reading model
    step.warm(*example)                 # compile for these shapes, strides and dtypes
    outputs = step(*tensors)

    forecast = CompiledForecast(model, (4, 5, 1, 64, 64), horizon=20)  # model(context, 20)

With freezing, Inductor folds the parameters and buffers into the compiled code as constants:
the convolution weights are packed once for oneDNN, the gate arithmetic becomes a few fused
C++ loops, and the C++ wrapper (cpp_wrapper) calls them with no Python in between. A small
ConvLSTM's streamed frame (2 x 64 channels, 3x3, an 8x8 grid, batch 1) took 0.39 ms against
0.98 ms for the eager step in float32 and 0.71 ms for the C kernels from packed weights, both
in bf16 (a 2-core Xeon with AMX-BF16, ad hoc); see the README for the benchmark's figures.

Frozen constants do not follow the weights: each call checks every parameter and buffer of
the module as it is now (its storage and version counter: a few microseconds) and compiles
again, with the same warm-up arguments, when one changed in place (optimizer steps,
load_state_dict, copy_) or was replaced (.to, a new Parameter), or a submodule was replaced,
or a parameter, buffer, submodule or forward hook was added to a module or removed.
A change made through `.data` moves no version: its effect is undefined, since Inductor packs
or folds some weights into copies and reads others in place (change weights in place, or
build a new step). The model's other settings (a cell's flags, say) are taken as fixed once
compiled, as a CUDA graph takes them: Dynamo's guards on them are dropped, whose evaluation
took 16-23% of a small model's streamed frame in bf16 (see _guards_kept); build a new step
after changing them, or module-level globals, torch function modes or the default device.
Compiling takes seconds (Inductor keeps what it built in its on-disk cache, so the next
process takes fewer): recompiling after every small change of the weights is not what this is
for. A compilation's frozen copy of the weights is let go when the step compiles again and
when the step itself is collected (a StreamingPredictor is in a reference cycle: then when
Python's cycle collector next runs): Dynamo's entries for its code are reset, and Inductor's
code cache and sys.modules drop the modules that hold the constants (otherwise both keep them for
the life of the process: each compilation of a ConvLSTM-S step, 45 MiB of weights, left
46 MiB more RSS behind, with glibc's mmap threshold held at 128 KiB; now under 1 MiB).

Freezing is an Inductor setting, set around each call (see FrozenStep._run). Since torch
2.13 Inductor holds its settings per thread, so steps called from several threads run
together, and torch.compile in other threads is untouched. Where the settings are one for
the process (torch 2.11), calls from several threads take turns, so that each sees its own
setting and the setting before the first is restored after the last; a torch.compile of
other code run by another thread during a call would be frozen there. Calls of one step
take turns.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import shutil
import sys
import sysconfig
import threading
import types
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from convlstm.errors import ConfigError, ShapeError
from convlstm.evaluation import autocast

# held around every FrozenStep call where Inductor's settings are one for the process
_CONFIG_LOCK = threading.RLock()


@functools.cache
def _settings_per_thread() -> bool:
    """Whether Inductor holds its settings per thread (each a context variable, since torch
    2.13), so that a setting made around a call reaches no other thread, rather than one for
    the process (torch 2.11). Read from how the setting is stored, not by changing it; where
    that is not found, the answer is False (calls then take turns: safe either way)."""
    from torch._inductor import config

    entry = getattr(config, "_config", {}).get("freezing")
    return isinstance(getattr(entry, "user_override", None), contextvars.ContextVar)


@functools.cache
def available() -> bool:
    """Whether Inductor can build CPU code here: a C++ compiler and Python's headers (its
    kernels and the C++ wrapper are Python extension modules)."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        compiler = shutil.which(get_cpp_compiler())
    except Exception:  # no compiler found (it raises), or no Inductor in this build
        return False
    headers = sysconfig.get_paths().get("include")
    return compiler is not None and headers is not None and (Path(headers) / "Python.h").exists()


def require(what: str) -> None:
    """Refuse `what` with one clear line where Inductor cannot build CPU code (available)."""
    if not available():
        raise ConfigError(
            f"{what} needs a C++ compiler for Inductor (g++ or clang++ on the PATH, or $CXX) "
            "and Python's headers (Python.h)"
        )


class FrozenStep:
    """`fn` compiled whole (fullgraph: an operation Inductor cannot trace is an error, not a
    silent fallback) for static shapes, with `module`'s parameters and buffers frozen in (a
    float64 module's are not: see below); for inference (no autograd)."""

    def __init__(self, fn: Callable[..., tuple[Tensor, ...]], module: nn.Module) -> None:
        require("compiling the step")
        self.module, self.fn = module, fn
        self.lock = threading.Lock()
        self.examples: list[tuple[Tensor, ...]] = []
        # what the current compilation made: its code object, and the loaded modules that
        # hold its frozen constants (let go by _release)
        self.made: tuple[types.CodeType, list[types.ModuleType]] | None = None
        self._compile()

    def _read_module(self) -> None:
        """Where each parameter, buffer and submodule lives, read again at every check: one
        replaced by a new tensor or module is seen too, and so is one added (or a hook)."""
        modules = list(self.module.modules())
        self.modules = modules
        self.slots = [(m._parameters, n) for m in modules for n in m._parameters]
        self.slots += [(m._buffers, n) for m in modules for n in m._buffers]
        self.children = [(m._modules, n) for m in modules for n in m._modules]
        weights = [w for owner, name in self.slots if (w := owner.get(name)) is not None]
        if any(w.is_inference() for w in weights):
            raise ConfigError(
                "the model's weights were made under torch.inference_mode, which keeps no "
                "version counter to see them change: make or load them outside it"
            )
        # a float64 module compiles unfrozen: Inductor's freezing passes pack convolution
        # weights for oneDNN, which takes no float64 (and once one compilation in a process
        # has registered those passes, config.cpp.weight_prepack no longer keeps them off)
        self.frozen = all(w.dtype != torch.float64 for w in weights)

    def _signature(self) -> list:
        weights = [
            (w.data_ptr(), w._version)
            for owner, name in self.slots
            if (w := owner.get(name)) is not None
        ]
        children = [owner.get(name) for owner, name in self.children]  # (compared by is)
        sizes = [
            (len(m._parameters), len(m._buffers), len(m._modules))
            + (len(m._forward_hooks), len(m._forward_pre_hooks))
            for m in self.modules
        ]
        return weights + children + sizes

    def _compile(self) -> None:
        self._read_module()
        fn = self.fn
        # Dynamo keeps its compiled entries on the code object: a copy of fn's code per
        # compilation keeps them apart from other steps' (and from the recompile limit)
        fresh = types.FunctionType(
            fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__
        )
        if self.made is not None:
            self.released.detach()
            _release(*self.made)
        self.made = (fresh.__code__, [])
        self.released = weakref.finalize(self, _release, *self.made)
        self.released.atexit = False  # (nothing to let go of at the process's exit)
        self.compiled = torch.compile(
            fresh, fullgraph=True, dynamic=False, options={"guard_filter_fn": _guards_kept}
        )
        self.signature = self._signature()
        for example in self.examples:
            self._run(example)

    def _run(self, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        # Inductor's freezing is a global setting that Dynamo reads while it traces (to make
        # the weights graph constants) and Inductor while it compiles; torch.compile's
        # options= does not reach the first. It is set around every call (3 us; a patch()
        # context took 22), so that any compilation, a guard's recompilation included (a
        # tensor of new strides, say), is frozen: an unfrozen one ran 2x slower.
        from torch._inductor import config

        # where the setting is one for the process, another thread's call would set and
        # restore it in between: calls take turns there
        with contextlib.nullcontext() if _settings_per_thread() else _CONFIG_LOCK:
            saved = config.freezing, config.cpp_wrapper
            config.freezing, config.cpp_wrapper = self.frozen, True
            loaded = _loaded_modules()
            before = len(loaded), _RELEASES[0]
            try:
                with torch.no_grad():  # (freezing is for inference only)
                    return self.compiled(*args)
            finally:
                config.freezing, config.cpp_wrapper = saved
                if (len(loaded), _RELEASES[0]) != before:  # compiled, or a release ran
                    self.made[1].extend(_claim(loaded))

    def warm(self, *example: Tensor) -> tuple[Tensor, ...]:
        """Compile for arguments like `example` (shapes, strides, dtypes: other kinds compile
        at their first call) and run it; kept, so that a recompilation after a weight change
        compiles for the same kinds at once."""
        with self.lock:  # (a call in another thread may be compiling from the examples)
            self.examples.append(tuple(t.clone() for t in example))
            return self._run(example)

    def __call__(self, *args: Tensor) -> tuple[Tensor, ...]:
        with self.lock:  # (two threads would both see a change and both compile)
            if self._signature() != self.signature:
                self._compile()
            return self._run(args)


def _loaded_modules() -> list[types.ModuleType]:
    """Inductor's code cache's list of the modules it loaded with attributes (the frozen
    constants among them), which it keeps for the life of the process; [] where not found."""
    try:
        from torch._inductor.codecache import PyCodeCache

        return PyCodeCache.modules if isinstance(PyCodeCache.modules, list) else []
    except (ImportError, AttributeError):
        return []


# the loaded modules with frozen constants that a FrozenStep's compilation has taken as its
# own, and how many releases have run (a release shortens the list of loaded modules, so
# its length alone does not tell what a call loaded)
_CLAIMED: weakref.WeakSet[types.ModuleType] = weakref.WeakSet()
_RELEASES = [0]


def _claim(loaded: list[types.ModuleType]) -> list[types.ModuleType]:
    """The loaded modules with frozen constants that no compilation has claimed yet, claimed.
    Called after a call that loaded modules (or during which a release ran: the finalizer of
    a dropped step may run at any collection, a compilation's included). A module another
    thread's step loaded meanwhile may be claimed here instead of there: whichever
    compilation is released first drops it from the cache, and its own graph still holds
    it."""
    new = [
        m
        for m in list(loaded)
        if m not in _CLAIMED and any(n.startswith("_frozen_param") for n in vars(m))
    ]
    for module in new:
        _CLAIMED.add(module)
    return new


def _release(code: types.CodeType, modules: list[types.ModuleType]) -> None:
    """Let go of one compilation of a FrozenStep: Dynamo's cache entries on its code (each
    holds the compiled graph, and with it the frozen constants), and the loaded modules that
    hold those constants, from Inductor's code cache and sys.modules. The graph itself stays
    callable for whoever still holds it."""
    try:
        from torch._C._dynamo.eval_frame import reset_code
    except ImportError:  # (not in this build: nothing is let go)
        return
    reset_code(code)
    _RELEASES[0] += 1
    loaded = _loaded_modules()
    for module in modules:
        while module in loaded:  # (modules compare by identity)
            loaded.remove(module)
        if sys.modules.get(module.__name__) is module:
            del sys.modules[module.__name__]
    modules.clear()


def _guards_kept(entries: list) -> list[bool]:
    """Which of Dynamo's guards a FrozenStep keeps (torch.compile's guard_filter_fn): those on
    the global state (grad mode, autocast, ...) and on the tensors that are not parameters
    (the arguments' shapes, strides and dtypes, and buffers), so that arguments of a new kind
    compile anew. Those on the model's modules, settings and parameters are dropped: the
    step checks its weights and submodules itself (the signature), and takes the rest of
    the model (a cell's flags, say) as fixed once compiled, as a CUDA graph does. Evaluating
    them took 16-23% of a small model's streamed frame in bf16 (three A/B runs on a Xeon
    with AMX), 9% in float32 held to AVX2."""
    return [
        entry.guard_type in ("GLOBAL_STATE", "SHAPE_ENV")
        or (entry.guard_type == "TENSOR_MATCH" and not isinstance(entry.value, nn.Parameter))
        for entry in entries
    ]


def checked_forecast_shape(context_shape: tuple[int, ...], horizon: int) -> tuple[int, ...]:
    """A whole forecast's context shape (B, T, C, H, W), once it and the horizon are valid."""
    if len(context_shape) != 5:
        raise ShapeError(f"context_shape must be (B, T, C, H, W), got {tuple(context_shape)}")
    if horizon < 1:
        raise ShapeError(f"horizon must be at least 1, got {horizon}")
    return tuple(context_shape)


def same_context_shape(context: Tensor, shape: tuple[int, ...], made: str) -> None:
    """Refuse a context of another shape than the one a forecast was `made` for."""
    if tuple(context.shape) != shape:
        raise ShapeError(
            f"this forecast was {made} for contexts {shape}, got {tuple(context.shape)} "
            "(make one per shape)"
        )


class CompiledForecast:
    """`model(context, horizon)` without autograd, compiled whole (FrozenStep: the weights
    frozen in, compiled again when they change) for contexts of one shape (B, T, C, H, W),
    under autocast to `autocast_dtype` if given; for a model forecasting on new data with
    fixed weights, on the CPU. In bf16 (a 2-core Xeon with AMX-BF16), against the uncompiled
    bf16 fast path: mmnist-cpu-small at batch 8 1.63x and mmnist-encoder-forecaster at batch
    4 1.37x (experiments.benchmark); radar-cpu-small, 5 -> 20 frames at batch 4, 2.0x (29 s
    to compile) and ConvLSTM-S at batch 2 1.08x (ad hoc). In float32 it was slower than
    the uncompiled fast path, whose Winograd convolutions the compiled plain ones do not
    beat: 0.81x and 0.83x on the Xeon, 0.68x and 0.72x held to AVX2 (mmnist-cpu-small at
    batch 8, mmnist-encoder-forecaster at batch 4; ad hoc, interleaved)."""

    def __init__(
        self,
        model: nn.Module,
        context_shape: tuple[int, int, int, int, int],
        horizon: int,
        *,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        checked_forecast_shape(context_shape, horizon)
        weight = next(model.parameters())
        if weight.device.type != "cpu":
            raise ConfigError(f"CompiledForecast is for the CPU, not for {weight.device}")
        require("compiling the forecast")
        self.model, self.horizon = model.eval(), horizon
        self.context = torch.zeros(context_shape, dtype=weight.dtype, device="cpu")

        def forecast(context: Tensor) -> tuple[Tensor]:
            with autocast(weight.device, autocast_dtype):
                return (model(context, horizon),)

        with torch.no_grad():  # the model's own checks, as themselves (traced, they would
            forecast(self.context)  # be a graph break)
        self.step = FrozenStep(forecast, model)
        self.step.warm(self.context)

    def __call__(self, context: Tensor) -> Tensor:
        """The forecast (B, horizon, C, H, W) of `context` (B, T, C, H, W), the compiled shape
        (any dtype: copied into the model's)."""
        same_context_shape(context, tuple(self.context.shape), "compiled")
        with torch.no_grad():  # (a context that requires grad would leave a graph behind)
            self.context.copy_(context)
        return self.step(self.context)[0]
