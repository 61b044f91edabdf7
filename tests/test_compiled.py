"""The streamed step compiled by Inductor with the weights frozen (convlstm.compiled,
StreamingPredictor(compile=True)): the model's step, number for number in float64, for every
cell whatever its speed options; recompiled when the weights change and only then; and
StreamingPredictor.fast's choice of it. Each compilation takes a few seconds."""

import dataclasses
import gc
import threading
import time
import warnings
import weakref

import pytest
import torch
from torch._dynamo.utils import counters

from convlstm import compiled, speed, training
from convlstm.config import ModelConfig
from convlstm.errors import ConfigError, ShapeError
from convlstm.models import build_model
from convlstm.speed import SpeedOptions, StreamingPredictor, apply_speed

# the tests that compile (the refusals and the fallback run everywhere)
compiles = pytest.mark.skipif(
    not compiled.available(), reason="no C++ compiler or Python headers for Inductor"
)

CPU = torch.device("cpu")
SMALL = ModelConfig(hidden_channels=(4, 3), kernel_size=3, patch_size=2)


def _eager_steps(model, frames, amp_dtype=None):
    """model.step's predictions over `frames`, from the zero state."""
    state, out = None, []
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=amp_dtype is not None):
        for frame in frames:
            state = model.step(frame, state)
            out.append(state.prediction)
    return out


@compiles
def test_a_compiled_stream_is_the_models_step_in_float64():
    torch.manual_seed(0)
    model = build_model(SMALL).double()
    frames = torch.rand(5, 2, 1, 8, 8, dtype=torch.float64)
    stream = StreamingPredictor(model, (2, 1, 8, 8), compile=True)
    assert stream.compiled is not None
    expected = _eager_steps(model, frames)
    for frame, want in zip(frames, expected, strict=True):
        got = stream(frame)
        assert got.dtype == torch.float64 and got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    config = torch._inductor.config  # set around each call only
    assert not config.freezing and not config.cpp_wrapper


@compiles
@pytest.mark.parametrize(
    "cell", ["convlstm", "peephole_convlstm", "convgru", "trajgru", "sa_convlstm", "convrnn"]
)
def test_every_cell_compiles_whole_with_the_cpu_fast_paths_kernels_on(monkeypatch, cell):
    """Winograd, the C gate update and packed weights are set on the model, but what is
    traced is the plain step (their C code would break the graph: fullgraph makes that an
    error); the predictions stay the uncompiled float32 step's. 16x16 frames, patch 2, batch
    2: 8 tiles, where the uncompiled step runs by Winograd from C tile transforms."""
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(SMALL, cell=cell))
    fast = dataclasses.replace(SpeedOptions.for_path("fast", CPU), packed=True)
    apply_speed(model, fast)
    step = speed.winograd.step_conv
    frames = torch.rand(3, 2, 1, 16, 16)
    # the uncompiled step runs by Winograd where _steps_by_winograd says (compile_pays reads
    # it), so the bypass is what is tested; not TrajGRU (no Winograd path), nor SA-ConvLSTM,
    # which calls its inner ConvLSTM's step(), though the flag is set on that cell
    made = []
    monkeypatch.setattr(speed.winograd, "step_conv", lambda conv: made.append(conv) or step(conv))
    _eager_steps(model, frames[:1])
    by_winograd = cell not in ("trajgru", "sa_convlstm")
    assert bool(made) == by_winograd == speed._steps_by_winograd(model, (2, 1, 16, 16))
    monkeypatch.undo()
    stream = StreamingPredictor(model, (2, 1, 16, 16), compile=True)
    for frame, want in zip(frames, _eager_steps(model, frames), strict=True):
        torch.testing.assert_close(stream(frame), want, rtol=1e-5, atol=1e-6)


@compiles
def test_a_whole_forecast_on_the_fast_path_compiles_without_a_graph_break():
    """model(context, horizon) opens a shared_transforms scope (a ContextVar, which Dynamo
    cannot trace) for Winograd, which steps aside while tracing: the scope does too. The
    forecast, hoisting and Winograd on (8 tiles), compiles whole and equals the uncompiled."""
    torch.manual_seed(0)
    model = build_model(SMALL)
    apply_speed(model, SpeedOptions.for_path("fast", CPU))
    context = torch.rand(2, 3, 1, 16, 16)
    step = compiled.FrozenStep(lambda x: (model(x, 2),), model)
    got = step.warm(context)[0]
    with torch.no_grad():
        want = model(context, 2)
    assert got.shape == (2, 2, 1, 16, 16)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@compiles
def test_a_compiled_forecast_is_the_models_forecast():
    """CompiledForecast: an encoder-forecaster on the float32 fast path (its forecaster layer
    by layer, in windows) to float32 rounding, and in bf16 (the measured case) to bf16
    rounding; then, in the same process (once a float32 compilation has registered
    Inductor's oneDNN packing, which takes no float64), a float64 stacked model, compiled
    unfrozen, to 1e-12. A second call leaves the first call's forecast alone."""
    torch.manual_seed(0)
    config = ModelConfig(
        architecture="encoder_forecaster", hidden_channels=(4, 6), stage_strides=(1, 2)
    )
    ef = build_model(config)
    apply_speed(ef, SpeedOptions.for_path("fast", CPU))
    context = torch.rand(1, 3, 1, 16, 16)
    forecast = compiled.CompiledForecast(ef, (1, 3, 1, 16, 16), horizon=12)
    with torch.no_grad():
        want = ef(context, 12)
    first = forecast(context.double().requires_grad_())  # any dtype; no graph kept
    torch.testing.assert_close(first, want, rtol=1e-5, atol=1e-6)
    kept = first.clone()
    forecast(torch.rand(1, 3, 1, 16, 16))
    torch.testing.assert_close(first, kept)

    bf16 = build_model(config)
    apply_speed(bf16, SpeedOptions.for_path("fast", CPU, amp_dtype=torch.bfloat16))
    forecast = compiled.CompiledForecast(
        bf16, (1, 3, 1, 16, 16), horizon=4, autocast_dtype=torch.bfloat16
    )
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        want = bf16(context, 4)
    got = forecast(context)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=0.02, atol=0.02)

    model = build_model(SMALL).double()
    context = torch.rand(2, 3, 1, 8, 8, dtype=torch.float64)
    forecast = compiled.CompiledForecast(model, (2, 3, 1, 8, 8), horizon=4)
    assert not forecast.step.frozen
    with torch.no_grad():
        want = model(context, 4)
    got = forecast(context)
    assert got.dtype == torch.float64 and got.shape == (2, 4, 1, 8, 8)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_a_compiled_forecast_refuses_what_it_was_not_compiled_for(monkeypatch):
    monkeypatch.setattr(compiled, "available", lambda: True)  # (refused before compiling)
    model = build_model(SMALL)
    with pytest.raises(ShapeError, match="must be \\(B, T, C, H, W\\)"):
        compiled.CompiledForecast(model, (2, 1, 8, 8), horizon=2)
    with pytest.raises(ShapeError, match="horizon must be at least 1"):
        compiled.CompiledForecast(model, (2, 3, 1, 8, 8), horizon=0)
    with pytest.raises(ConfigError, match="for the CPU, not for meta"):
        compiled.CompiledForecast(build_model(SMALL).to("meta"), (2, 3, 1, 8, 8), horizon=2)
    with pytest.raises(ShapeError, match="channels"):  # the model's own check, as itself
        compiled.CompiledForecast(model, (2, 3, 2, 8, 8), horizon=2)
    monkeypatch.setattr(compiled, "available", lambda: False)
    model.train()
    with pytest.raises(ConfigError, match="C\\+\\+ compiler"):
        compiled.CompiledForecast(model, (2, 3, 1, 8, 8), horizon=2)
    assert model.training  # refused before the model was touched


@compiles
def test_a_compiled_forecast_takes_only_its_context_shape():
    model = build_model(SMALL)
    forecast = compiled.CompiledForecast(model, (2, 3, 1, 8, 8), horizon=2)
    with pytest.raises(ShapeError, match="compiled for contexts \\(2, 3, 1, 8, 8\\)"):
        forecast(torch.rand(1, 3, 1, 8, 8))


@compiles
def test_the_bf16_fast_options_compile_to_the_uncompiled_bf16_step():
    """Channels-last states, packs and the C gate update under bf16 autocast (the AMX CPU's
    fast path): within bf16 rounding of the uncompiled step."""
    torch.manual_seed(0)
    model = build_model(SMALL)
    apply_speed(model, SpeedOptions.for_path("fast", CPU, amp_dtype=torch.bfloat16))
    frames = torch.rand(4, 2, 1, 8, 8)
    stream = StreamingPredictor(model, (2, 1, 8, 8), autocast_dtype=torch.bfloat16, compile=True)
    for frame, want in zip(frames, _eager_steps(model, frames, torch.bfloat16), strict=True):
        got = stream(frame)
        assert got.dtype == want.dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=0.02, atol=0.02)


@compiles
def test_the_compiled_stream_follows_new_weights_and_compiles_only_for_them(monkeypatch):
    """Frozen weights are constants: weights loaded in place compile the step again (once),
    and nothing else does, not even a forecast run on the same model in between (whose
    sequence scope once left an attribute behind, which Dynamo's guards on the model, now
    dropped, saw as a change: checked directly below)."""
    torch.manual_seed(0)
    model, other = build_model(SMALL), build_model(SMALL)
    apply_speed(model, SpeedOptions.for_path("fast", CPU))  # hoisting: sequence scopes
    compiles = []
    real = compiled.FrozenStep._compile
    monkeypatch.setattr(
        compiled.FrozenStep, "_compile", lambda self: (compiles.append(1), real(self))[1]
    )
    frames = torch.rand(6, 2, 1, 8, 8)
    stream = StreamingPredictor(model, (2, 1, 8, 8), compile=True)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0  # (the counter this test reads is Dynamo's)
    for frame in frames[:2]:
        stream(frame)
    with torch.no_grad():
        model(torch.rand(2, 3, 1, 8, 8), 3)  # a forecast: hoisted, in a sequence scope
    assert not any("sequence_conv" in m.__dict__ for m in model.modules())
    stream.reset()
    for frame, want in zip(frames, _eager_steps(model, frames), strict=True):
        torch.testing.assert_close(stream(frame), want, rtol=1e-5, atol=1e-6)
    assert len(compiles) == 1 and counters["stats"]["unique_graphs"] == graphs

    model.load_state_dict(other.state_dict())  # in place: the versions move
    stream.reset()
    for frame, want in zip(frames, _eager_steps(model, frames), strict=True):
        torch.testing.assert_close(stream(frame), want, rtol=1e-5, atol=1e-6)
    assert len(compiles) == 2

    # frozen: the convolution weights were packed into constants of the compiled code, so a
    # change through .data (no version moves) does not reach them (an unfrozen step, which
    # reads the parameters, would see it; the eager step does)
    stream.reset()
    before = stream(frames[0]).clone()
    model.layers[0].cell.conv.weight.data.mul_(0.5)
    stream.reset()
    torch.testing.assert_close(stream(frames[0]), before)
    assert not torch.allclose(_eager_steps(model, frames[:1])[0], before)
    assert len(compiles) == 2

    def first_frame_as_eager():
        stream.reset()
        torch.testing.assert_close(stream(frames[0]), _eager_steps(model, frames[:1])[0])

    # a parameter replaced by a new one, and then that one changed in place: both seen
    model.head.weight = torch.nn.Parameter(torch.randn_like(model.head.weight))
    first_frame_as_eager()
    with torch.no_grad():
        model.head.weight.mul_(0.5)
    first_frame_as_eager()
    assert len(compiles) == 4

    # a submodule replaced (Dynamo's guards, which would see it, are dropped: the step's own
    # check does), and then the new one's weights changed in place: both seen
    head = model.head
    model.head = torch.nn.Conv2d(head.in_channels, head.out_channels, 1)
    first_frame_as_eager()
    with torch.no_grad():
        model.head.bias.add_(1.0)
    first_frame_as_eager()
    assert len(compiles) == 6

    # a forward hook added: seen too (Dynamo traces it into the new compilation)
    model.head.register_forward_hook(lambda module, args, out: out * 0.5)
    first_frame_as_eager()
    assert len(compiles) == 7


@compiles
def test_the_models_settings_are_taken_as_fixed_once_compiled():
    """Dynamo's guards on the model's modules and settings are dropped (their evaluation
    took 16-23% of a small model's frame in bf16): a setting changed after compiling neither
    compiles the step again nor changes what it runs, as with a CUDA graph."""
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(SMALL, cell="peephole_convlstm"))
    with torch.no_grad():  # (peepholes start at zero, where turning them off changes nothing)
        for name, weight in model.named_parameters():
            if name.rsplit(".", 1)[-1] in ("w_ci", "w_cf", "w_co"):
                weight.uniform_(-1.0, 1.0)
    frames = torch.rand(3, 2, 1, 8, 8)
    stream = StreamingPredictor(model, (2, 1, 8, 8), compile=True)
    graphs = counters["stats"]["unique_graphs"]
    before = _eager_steps(model, frames)
    for layer in model.layers:
        layer.cell.peephole = "none"  # read by every step: the update without peepholes
    after = _eager_steps(model, frames)
    assert not torch.allclose(after[-1], before[-1])
    for frame, want in zip(frames, before, strict=True):
        torch.testing.assert_close(stream(frame), want, rtol=1e-5, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == graphs


@compiles
def test_a_tensor_of_a_new_kind_compiles_anew_though_the_models_guards_are_dropped():
    """Only the guards on the model are dropped: arguments of other strides or shape than
    the warm-up's still select (or compile) code made for them."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    step = compiled.FrozenStep(lambda x: (conv(x).relu().flatten(1).cumsum(1),), conv)
    x = torch.randn(2, 3, 8, 8)
    step.warm(x)
    for arg in (x, x.contiguous(memory_format=torch.channels_last), x[:1], x.transpose(2, 3)):
        with torch.no_grad():
            want = conv(arg).relu().flatten(1).cumsum(1)
        torch.testing.assert_close(step(arg)[0], want, rtol=1e-5, atol=1e-5)


@compiles
def test_a_compilations_frozen_weights_are_freed_when_it_compiles_again_or_is_dropped():
    """Each compilation freezes its own copy of the weights (packed for oneDNN): the copy
    is freed when the step compiles again for new weights, and the last one when the step
    itself is dropped (Inductor's code cache and Dynamo's entries once kept every copy for
    the life of the process)."""
    from torch._inductor.codecache import PyCodeCache

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    x = torch.randn(2, 3, 8, 8)

    def frozen_copies(known: list) -> list:
        """Weak references to the frozen tensors of the modules Inductor loaded since
        `known` (weak references to the modules loaded before) that are not parameters."""
        new = [m for m in PyCodeCache.modules if not any(k() is m for k in known)]
        return [
            weakref.ref(value)
            for module in new
            for name, value in vars(module).items()
            if name.startswith("_frozen_param") and isinstance(value, torch.Tensor)
            if not any(value is p for p in conv.parameters())
        ]

    def modules_now() -> list:
        return [weakref.ref(m) for m in PyCodeCache.modules]

    known = modules_now()
    step = compiled.FrozenStep(lambda x: (conv(x),), conv)
    step.warm(x)
    first = frozen_copies(known)
    assert first and all(ref() is not None for ref in first)
    with torch.no_grad():
        conv.weight.mul_(0.5)
        want = conv(x)
    known = modules_now()
    torch.testing.assert_close(step(x)[0], want, rtol=1e-5, atol=1e-6)  # compiled again
    gc.collect()
    assert all(ref() is None for ref in first)
    second = frozen_copies(known)
    assert second and all(ref() is not None for ref in second)
    del step
    gc.collect()
    assert all(ref() is None for ref in second)


@compiles
def test_a_step_dropped_in_a_cycle_is_freed_by_a_collection_amid_another_compilation(
    monkeypatch,
):
    """A dropped step in a reference cycle (as a compiled StreamingPredictor is) is let go
    whenever the cycle collector runs, here inside another step's compilation: both
    compilations' frozen weights are still freed (a release that shortened Inductor's list
    of modules mid-call once hid the other compilation's modules from it)."""
    from torch._inductor.codecache import PyCodeCache

    torch.manual_seed(0)
    convs = [torch.nn.Conv2d(3, 8, 3, padding=1) for _ in range(2)]
    x = torch.randn(2, 3, 8, 8)

    def frozen_copies(conv) -> list:
        return [
            weakref.ref(value)
            for module in PyCodeCache.modules
            for name, value in vars(module).items()
            if name.startswith("_frozen_param") and isinstance(value, torch.Tensor)
            if value.shape[0] == 8 and not any(value is p for p in conv.parameters())
        ]

    first = compiled.FrozenStep(lambda x: (convs[0](x),), convs[0])
    first.warm(x)
    first_copies = frozen_copies(convs[0])
    assert first_copies
    first.cycle = first
    del first  # garbage, but only the cycle collector will see it
    load = PyCodeCache.load_by_key_path.__func__
    collected = []

    def load_after_collecting(cls, *args, **kwargs):
        collected.append(gc.collect())
        return load(cls, *args, **kwargs)

    monkeypatch.setattr(PyCodeCache, "load_by_key_path", classmethod(load_after_collecting))
    known = {id(ref()) for ref in first_copies}
    second = compiled.FrozenStep(lambda x: (convs[1](x),), convs[1])
    second.warm(x)
    monkeypatch.undo()
    gc.collect()  # (what the release let go of may itself be in cycles)
    assert collected and all(ref() is None for ref in first_copies)
    second_copies = [r for r in frozen_copies(convs[1]) if id(r()) not in known]
    assert second_copies
    del second
    gc.collect()
    assert all(ref() is None for ref in second_copies)


def test_where_settings_are_one_for_the_process_calls_take_turns_and_restore_it(monkeypatch):
    """Where Inductor's freezing is one setting for the process (torch 2.11; forced here), a
    call in another thread that needs it set otherwise (a float64 step, unfrozen) must
    neither change it under a running call nor leave it set when both are done."""
    from torch._inductor import config

    monkeypatch.setattr(compiled, "available", lambda: True)  # (nothing is compiled here)
    monkeypatch.setattr(compiled, "_settings_per_thread", lambda: False)
    first = compiled.FrozenStep(lambda x: (x,), build_model(SMALL))
    second = compiled.FrozenStep(lambda x: (x,), build_model(SMALL).double())  # unfrozen
    running, release, seen = threading.Event(), threading.Event(), []

    def slow(x):
        running.set()
        release.wait(10)
        seen.append(("first", config.freezing))
        return (x,)

    first.compiled = slow
    second.compiled = lambda x: seen.append(("second", config.freezing)) or (x,)
    threads = [threading.Thread(target=step, args=(torch.zeros(1),)) for step in (first, second)]
    threads[0].start()
    assert running.wait(10)
    threads[1].start()
    time.sleep(0.2)  # time for the second call to run, were it not made to wait
    release.set()
    for thread in threads:
        thread.join(10)
    assert seen == [("first", True), ("second", False)]
    assert not config.freezing and not config.cpp_wrapper


def test_where_settings_are_per_thread_steps_in_several_threads_run_together(monkeypatch):
    """Where Inductor holds its settings per thread (torch 2.13 on), a frozen step (float32)
    and an unfrozen one (float64) run at once in two threads (the first waits for the
    second), each with its own setting, and the calling thread's setting is untouched."""
    from torch._inductor import config

    if not compiled._settings_per_thread():
        pytest.skip("this torch's Inductor settings are one for the process")
    monkeypatch.setattr(compiled, "available", lambda: True)  # (nothing is compiled here)
    first = compiled.FrozenStep(lambda x: (x,), build_model(SMALL))
    second = compiled.FrozenStep(lambda x: (x,), build_model(SMALL).double())
    both_in, seen = threading.Barrier(2, timeout=10), []

    def meeting(name):
        def step(x):
            try:
                both_in.wait()  # (only if the two calls run at once)
                seen.append((name, config.freezing))
            except threading.BrokenBarrierError:
                seen.append((name, "alone"))
            return (x,)

        return step

    first.compiled, second.compiled = meeting("first"), meeting("second")
    threads = [threading.Thread(target=step, args=(torch.zeros(1),)) for step in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(seen) == [("first", True), ("second", False)]
    assert not config.freezing and not config.cpp_wrapper


def test_the_per_thread_answer_is_what_a_setting_in_another_thread_shows():
    """_settings_per_thread reads how Inductor stores its settings; here it is checked against
    what they do: a setting made in another thread is seen here or not."""
    from torch._inductor import config

    seen = []

    def other():
        config.freezing = True
        seen.append(config.freezing)

    before = config.freezing
    thread = threading.Thread(target=other)
    try:
        thread.start()
        thread.join(10)
        shared = config.freezing
    finally:
        config.freezing = before
    assert seen == [True] and compiled._settings_per_thread() == (shared == before)


@compiles
@pytest.mark.parametrize("amx", [True, False])
def test_fast_compiles_where_it_paid(monkeypatch, amx):
    """bf16 (a CPU with AMX-BF16 units) always; float32 where no convolution of the step runs
    by Winograd (fewer than 8 tiles), which beat the compiled step where it runs; never for
    float64 models, nor without a C++ compiler."""
    monkeypatch.setattr(training, "cpu_bf16_units", lambda: amx)
    amp = torch.bfloat16 if amx else None
    small_grid = build_model(SMALL)  # 8x8 frames, patch 2: a 4x4 grid, 2 tiles at batch 2
    stream = StreamingPredictor.fast(small_grid, (2, 1, 8, 8))
    assert stream.compiled is not None and stream.dtype == amp
    large_grid = build_model(SMALL)  # 32x32 frames: a 16x16 grid, 16 tiles
    apply_speed(large_grid, SpeedOptions.for_path("fast", CPU, amp_dtype=amp))
    assert speed.compile_pays(large_grid, (1, 1, 32, 32), amp) == amx
    if not amx:
        stream = StreamingPredictor.fast(large_grid, (1, 1, 32, 32))
        assert stream.compiled is None and large_grid.layers[0].cell.winograd
    assert not speed.compile_pays(build_model(SMALL).double(), (2, 1, 8, 8), None)
    monkeypatch.setattr(compiled, "available", lambda: False)
    assert not speed.compile_pays(small_grid, (2, 1, 8, 8), amp)


def test_fast_streams_uncompiled_with_a_warning_when_the_compilation_fails(monkeypatch):
    def failing(*args, **kwargs):
        raise RuntimeError("backend='inductor' raised:\nfatal error: Python.h: No such file\n")

    monkeypatch.setattr(speed, "FrozenStep", failing)
    monkeypatch.setattr(compiled, "available", lambda: True)  # (so that .fast tries)
    model = build_model(SMALL)
    with pytest.warns(UserWarning, match="failed \\(RuntimeError: fatal error: Python.h"):
        stream = StreamingPredictor.fast(model, (2, 1, 8, 8), graph=None)
    assert stream.compiled is None
    frames = torch.rand(3, 2, 1, 8, 8)
    amp = stream.dtype
    for frame, want in zip(frames, _eager_steps(model, frames, amp), strict=True):
        torch.testing.assert_close(stream(frame), want)


def test_fast_reports_a_mistake_in_the_frames_as_itself_not_as_a_failed_compilation():
    model = build_model(SMALL)  # patch 2: frames of odd size cannot be cut
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ShapeError):
            StreamingPredictor.fast(model, (2, 1, 9, 9))


def test_compile_is_refused_for_weights_made_in_inference_mode(monkeypatch):
    monkeypatch.setattr(compiled, "available", lambda: True)  # (refused before compiling)
    with torch.inference_mode():
        model = build_model(SMALL)
    assert not speed.compile_pays(model, (2, 1, 8, 8), None)  # so .fast leaves it uncompiled
    with pytest.raises(ConfigError, match="inference_mode"):
        StreamingPredictor(model, (2, 1, 8, 8), compile=True)


def test_compile_is_refused_off_the_cpu_and_without_a_compiler(monkeypatch):
    model = build_model(SMALL)
    with pytest.raises(ConfigError, match="compile is for the CPU, not for meta"):
        StreamingPredictor(build_model(SMALL).to("meta"), (1, 1, 8, 8), compile=True)
    monkeypatch.setattr(compiled, "available", lambda: False)
    with pytest.raises(ConfigError, match="C\\+\\+ compiler"):
        StreamingPredictor(model, (1, 1, 8, 8), compile=True)
    with pytest.raises(ConfigError, match="C\\+\\+ compiler"):
        StreamingPredictor.fast(model, (1, 1, 8, 8), compile=True)
    assert not model.layers[0].hoist  # checked before the model was changed
    with pytest.raises(ConfigError, match="C\\+\\+ compiler"):
        compiled.FrozenStep(lambda x: (x,), model)
