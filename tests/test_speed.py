"""The fast path computes what the eager reference computes (outputs and gradients), the
streaming predictor equals model.step, and a time budget sizes the run."""

import dataclasses
import json

import pytest
import torch

from convlstm import compiled, speed, training
from convlstm.cells.base import with_input
from convlstm.cells.lstm import ConvLSTMCell, lstm_update
from convlstm.config import ModelConfig, TrainConfig, build
from convlstm.errors import ConfigError, ShapeError
from convlstm.gates import fused_lstm_update
from convlstm.layers import stack_time
from convlstm.models import build_model
from convlstm.speed import (
    GraphedStep,
    SpeedOptions,
    StreamingPredictor,
    apply_speed,
)
from convlstm.training import fit_to_budget
from experiments import benchmark
from tests.test_training import _train, moving_squares

ALL_CPU = SpeedOptions(hoist=True, channels_last=True, checkpointing=True)


def _pair(config: ModelConfig, options: SpeedOptions, dtype=torch.float64):
    torch.manual_seed(0)
    eager = build_model(config).to(dtype)
    with torch.no_grad():  # non-zero peepholes, so they take part in the comparison
        for name, p in eager.named_parameters():
            if name.split(".")[-1] in ("w_ci", "w_cf", "w_co"):
                p.normal_(0, 0.3)
    fast = build_model(config).to(dtype)
    fast.load_state_dict(eager.state_dict())
    return eager, apply_speed(fast, options)


def _run(model, frames, mask):
    """OpenSTL's training forward: predictions while reading the context (in two calls, the
    second continuing from the first's state), then a forecast fed its own predictions
    except where mask says so; loss and gradients."""
    state, seen_a = model.encode_with_predictions(frames[:, :3])
    state, seen_b = model.encode_with_predictions(frames[:, 3:5], state)
    seen = torch.cat([seen_a, seen_b], dim=1)
    preds = model.forecast(state, 5, targets=frames[:, 5:], teacher_mask=mask)
    out = torch.cat([seen, preds], dim=1)
    (out - frames[:, 1:].mean()).square().mean().backward()
    return out, {n: p.grad for n, p in model.named_parameters()}


# The ConvLSTM layouts an option for the gate convolution must keep equal to eager.
CONVLSTM_CASES = pytest.mark.parametrize(
    "overrides, hoist",
    [
        (dict(), True),
        (dict(), False),
        (dict(cell="peephole_convlstm"), True),
        (dict(norm="layer"), True),
        (dict(architecture="encoder_forecaster", hidden_channels=(4, 6)), True),
    ],
    ids=["hoisted", "per-step", "peephole", "layer-norm", "encoder-forecaster"],
)


def convlstm_config(overrides: dict) -> ModelConfig:
    return ModelConfig(**{"hidden_channels": (6, 5), "kernel_size": 3, "patch_size": 2} | overrides)


def assert_fast_equals_eager(config, options, rtol=1e-12, grad_rtol=1e-10):
    """The model under `options` against the eager one in float64, outputs and every gradient:
    OpenSTL's training forward (_run, with a teacher mask) for a stacked model, a forecast
    from 5 context frames for the others."""
    eager, fast = _pair(config, options)
    frames = torch.rand(3, 11, 1, 8, 8, dtype=torch.float64)
    if config.architecture == "stacked":
        mask = torch.tensor([[True, False, True, False], [False] * 4, [True] * 4])
        (out_e, grads_e), (out_f, grads_f) = (_run(m, frames, mask) for m in (eager, fast))
    else:
        results = []
        for model in (eager, fast):
            out = model(frames[:, :5], 4)
            out.square().mean().backward()
            results.append((out, {n: p.grad for n, p in model.named_parameters()}))
        (out_e, grads_e), (out_f, grads_f) = results
    torch.testing.assert_close(out_f, out_e, rtol=rtol, atol=1e-12)
    assert grads_e.keys() == grads_f.keys()
    for name in grads_e:
        torch.testing.assert_close(grads_f[name], grads_e[name], rtol=grad_rtol, atol=1e-12)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(cell="peephole_convlstm"),
        dict(norm="layer"),
        dict(cell="convgru"),
        dict(norm="group"),
        dict(cell="trajgru", trajgru_links=2),  # no hoisting: the per-step path under options
        dict(cell="sa_convlstm", attention_channels=2),
        dict(cell="convrnn"),
    ],
    ids=["convlstm", "peephole", "layer-norm", "convgru", "group-norm", "trajgru", "sa", "rnn"],
)
def test_fast_path_equals_eager_outputs_and_gradients_in_float64(overrides):
    config = ModelConfig(hidden_channels=(6, 5), kernel_size=3, patch_size=2, **overrides)
    assert_fast_equals_eager(config, ALL_CPU)


def test_fast_path_equals_eager_in_float32_for_the_encoder_forecaster():
    config = ModelConfig(architecture="encoder_forecaster", hidden_channels=(6, 8), patch_size=2)
    eager, fast = _pair(config, ALL_CPU, dtype=torch.float32)
    context = torch.rand(2, 4, 1, 16, 16)
    outs, grads = [], []
    for model in (eager, fast):
        out = model(context, 3)
        out.square().mean().backward()
        outs.append(out)
        grads.append([p.grad for p in model.parameters()])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    for g_fast, g_eager in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(g_fast, g_eager, rtol=1e-4, atol=1e-6)


# the forecaster runs layer by layer with hoist, except with checkpointing (ALL_CPU's)
BY_LAYER = [
    SpeedOptions(hoist=True),
    SpeedOptions(hoist=True, channels_last=True, winograd=True, native_gates=True),
]


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(encoder_attention=True, attention_channels=3),
        dict(bidirectional=True),
        dict(cell="convgru"),
        dict(cell="trajgru", trajgru_links=2),  # no project_input: per step, layer by layer
        dict(cell="sa_convlstm", attention_channels=2),  # the same, with a third state
        dict(cell="peephole_convlstm"),
        dict(norm="group"),
        dict(cell="convrnn"),
        dict(stage_strides=(1, 2, 2), hidden_channels=(4, 5, 6), patch_size=1),
    ],
    ids=[
        "convlstm",
        "attention",
        "bidirectional",
        "convgru",
        "trajgru",
        "sa",
        "peephole",
        "group-norm",
        "rnn",
        "three-layers",
    ],
)
@pytest.mark.parametrize("options", BY_LAYER, ids=["hoist", "winograd-c-gates-channels-last"])
def test_the_forecaster_run_layer_by_layer_equals_the_per_step_rollout(overrides, options):
    """An encoder-forecaster's forecaster, hoisted, runs each layer over every step (top
    first): the same outputs and gradients as the per-step rollout, in float64."""
    config = ModelConfig(
        **{
            "architecture": "encoder_forecaster",
            "hidden_channels": (4, 5),
            "kernel_size": 3,
            "patch_size": 2,
            "stage_strides": (1, 2),
        }
        | overrides
    )
    assert_fast_equals_eager(config, options)


@pytest.mark.parametrize("window", [2, 3, 10])
def test_without_grad_the_forecaster_runs_by_layer_in_windows(monkeypatch, window):
    """Without grad (evaluation) the layer-by-layer rollout goes window by window (less
    memory), the states carried across: the same forecast as step by step."""
    from convlstm.models import EncoderForecaster

    monkeypatch.setattr(EncoderForecaster, "NO_GRAD_WINDOW", window)
    config = ModelConfig(
        architecture="encoder_forecaster",
        hidden_channels=(4, 5),
        patch_size=2,
        stage_strides=(1, 2),
        encoder_attention=True,
        attention_channels=3,
    )
    eager, fast = _pair(config, BY_LAYER[1])
    heads = []
    fast.head.register_forward_hook(lambda *_: heads.append(1))
    context = torch.rand(2, 3, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fast(context, 7), eager(context, 7), rtol=1e-12, atol=1e-12)
    assert len(heads) == -(-7 // window)  # one head call per window


def test_the_hoisted_forecaster_projects_each_layers_inputs_once():
    """Guard against a flag that does nothing: the lower forecaster layer's input convolution
    runs once over the horizon, the up-sampling stages once per layer, the head once."""
    config = ModelConfig(
        architecture="encoder_forecaster",
        hidden_channels=(4, 5),
        patch_size=2,
        stage_strides=(1, 2),
    )
    model = apply_speed(build_model(config), SpeedOptions(hoist=True))
    calls = {"project": 0, "up": 0, "head": 0}
    lower = model.forecaster[0]
    project = lower.project_input

    def counting(*args):
        calls["project"] += 1
        return project(*args)

    lower.project_input = counting
    model.up[1].register_forward_hook(lambda *_: calls.__setitem__("up", calls["up"] + 1))
    model.head.register_forward_hook(lambda *_: calls.__setitem__("head", calls["head"] + 1))
    model(torch.rand(2, 3, 1, 8, 8), 6)
    assert calls == {"project": 1, "up": 1, "head": 1}
    apply_speed(model, SpeedOptions())
    model(torch.rand(2, 3, 1, 8, 8), 6)
    assert calls == {"project": 1, "up": 7, "head": 7}
    # checkpointing keeps the per-step rollout in training, whose memory it exists to save;
    # without grad (where it does nothing) the forecaster goes layer by layer, in windows
    apply_speed(model, SpeedOptions(hoist=True, checkpointing=True))
    model(torch.rand(2, 3, 1, 8, 8), 6)
    assert calls == {"project": 1, "up": 13, "head": 13}
    model.NO_GRAD_WINDOW = 4
    with torch.no_grad():
        model(torch.rand(2, 3, 1, 8, 8), 6)
    assert calls == {"project": 3, "up": 15, "head": 15}


def test_hoisting_really_changes_the_computation():
    """Guard against a flag that does nothing: the hoisted layer calls project_input once
    for the whole sequence and the per-step convolution never."""
    config = ModelConfig(hidden_channels=(4,), kernel_size=3, patch_size=2)
    model = apply_speed(build_model(config), SpeedOptions(hoist=True))
    cell = model.layers[0].cell
    calls = {"project": 0, "conv": 0}
    cell.conv.register_forward_hook(lambda *_: calls.__setitem__("conv", calls["conv"] + 1))
    project = cell.project_input

    def counting(*args):
        calls["project"] += 1
        return project(*args)

    cell.project_input = counting
    model.encode(torch.rand(2, 6, 1, 8, 8))
    assert calls == {"project": 1, "conv": 0}
    apply_speed(model, SpeedOptions())
    model.encode(torch.rand(2, 6, 1, 8, 8))
    assert calls == {"project": 1, "conv": 6}


def _autograd_nodes(tensor):
    seen, todo = set(), [tensor.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            todo.extend(next_node for next_node, _ in node.next_functions)
    return [type(node).__name__ for node in seen]


def test_steps_read_frames_by_unbind_so_backward_stacks_once():
    # indexing a (T, B, ...) tensor per step makes T zero-filled full-size gradients in
    # backward, summed one by one: T^2 memory traffic. unbind's backward is one stack.
    config = ModelConfig(hidden_channels=(4, 4), kernel_size=3, patch_size=2)
    for options in (SpeedOptions(hoist=True), SpeedOptions()):
        model = apply_speed(build_model(config), options)
        frames = torch.rand(2, 5, 4, 4, 4, requires_grad=True)  # (B, T, C, h, w) patches
        outputs, state = model.layers[0](frames)
        nodes = _autograd_nodes(outputs.sum() + state[1].sum())
        assert "UnbindBackward0" in nodes
        assert "SelectBackward0" not in nodes, options


def test_stack_time_equals_stack_and_keeps_the_time_major_flattening_a_view():
    cl = torch.channels_last
    frames = [torch.randn(3, 4, 5, 6).contiguous(memory_format=cl) for _ in range(2)]
    stacked = stack_time(frames)
    assert torch.equal(stacked, torch.stack(frames, dim=1))
    flat = stacked.transpose(0, 1).flatten(0, 1)  # what the next hoisted layer convolves
    assert flat.data_ptr() == stacked.data_ptr()  # a view: no copy
    assert flat.is_contiguous(memory_format=cl) and not flat.is_contiguous()
    assert all(frame.is_contiguous(memory_format=cl) for frame in stacked.unbind(1))
    one = stack_time(frames[:1])
    assert one.shape == (3, 1, 4, 5, 6) and one.data_ptr() == frames[0].data_ptr()


def test_with_input_follows_a_channels_last_state():
    x = torch.randn(2, 3, 4, 4)
    h = torch.randn(2, 5, 4, 4)
    joined = with_input(x, h.contiguous(memory_format=torch.channels_last))
    assert torch.equal(joined, torch.cat([x, h], dim=1))
    assert joined.is_contiguous(memory_format=torch.channels_last)
    assert with_input(x, h).is_contiguous()  # the default layout is left alone
    assert with_input(None, h) is h


def test_channels_last_and_checkpointing_are_applied():
    config = ModelConfig(hidden_channels=(4,), kernel_size=3, patch_size=2)
    model = apply_speed(build_model(config), ALL_CPU)
    cell = model.layers[0].cell
    assert cell.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not cell.conv.weight.is_contiguous()
    assert cell.checkpointing and model.layers[0].hoist
    state = cell.init_state(2, 4, 4)
    assert state[0].is_contiguous(memory_format=torch.channels_last)
    # checkpointing: backward recomputes each step, so a forward hook on the gate conv of a
    # per-step (unhoisted) layer fires twice as often when gradients are taken
    apply_speed(model, SpeedOptions(checkpointing=True))
    calls = []
    cell.conv.register_forward_hook(lambda *_: calls.append(1))
    model.encode(torch.rand(2, 3, 1, 8, 8)).prediction.sum().backward()
    assert len(calls) == 6


@pytest.mark.skipif(not compiled.available(), reason="torch.compile on the CPU needs C++")
def test_compiled_gate_update_equals_the_eager_one():
    fused = fused_lstm_update(compiled=True)
    z, c, more = (torch.randn(2, 12, 3, 3, requires_grad=True) for _ in range(3))
    c = torch.randn(2, 3, 3, 3, requires_grad=True)
    for extra in (None, more):
        grads, outputs = [], []
        for fn in (lstm_update, fused):
            h, c_new = fn(z, c, extra)
            (h.sum() + (c_new**2).sum()).backward()
            grads.append([t.grad.clone() for t in (z, c, more) if t.grad is not None])
            outputs.append((h, c_new))
            for t in (z, c, more):
                t.grad = None
        torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-6, atol=1e-6)
        assert len(grads[1]) == len(grads[0]) == (2 if extra is None else 3)
        for a, b in zip(grads[0], grads[1], strict=True):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("with_more", [False, True])
def test_hand_written_gate_backward_passes_gradcheck(with_more):
    # float64 finite differences against the hand-written backward of convlstm.gates
    update = fused_lstm_update(compiled=False)
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(2, 8, 3, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    c = torch.randn(2, 2, 3, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    more = torch.randn(2, 8, 3, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    args = (z, c, more) if with_more else (z, c)
    assert torch.autograd.gradcheck(update, args)
    h, c_new = update(*args)
    reference = lstm_update(*args)
    torch.testing.assert_close((h, c_new), reference, rtol=1e-12, atol=1e-12)


def test_hand_written_gate_update_follows_the_eager_dtypes():
    # a model converted to bf16 throughout keeps bf16 states; a float32 z_more's gradient
    # is not rounded through z's bf16
    update = fused_lstm_update(compiled=False)
    z = torch.randn(2, 8, 3, 3).bfloat16().requires_grad_()
    c = torch.randn(2, 2, 3, 3).bfloat16()
    for fn in (update, lstm_update):
        assert [t.dtype for t in fn(z, c)] == [torch.bfloat16, torch.bfloat16]
    more = torch.randn(2, 8, 3, 3, requires_grad=True)
    h, c_new = update(z, c.float(), more)
    assert h.dtype == c_new.dtype == torch.float32
    (h.sum() + c_new.sum()).backward()
    assert z.grad.dtype == torch.bfloat16 and more.grad.dtype == torch.float32
    z_ref = z.detach().float().requires_grad_()
    more_ref = more.detach().clone().requires_grad_()
    reference = lstm_update(z_ref, c.float(), more_ref)
    (reference[0].sum() + reference[1].sum()).backward()
    torch.testing.assert_close(more.grad, more_ref.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(z.grad, z_ref.grad.bfloat16())


def test_hand_written_gate_backward_refuses_double_backward():
    update = fused_lstm_update(compiled=False)
    z = torch.randn(2, 8, 3, 3, requires_grad=True)
    h, _ = update(z, torch.randn(2, 2, 3, 3))
    (grad,) = torch.autograd.grad(h.sum(), z, create_graph=True)
    # no second-order graph: an error, never silently wrong second derivatives
    with pytest.raises(RuntimeError, match="grad"):
        grad.sum().backward()


def test_hand_written_gate_backward_returns_the_gradient_in_the_layout_of_z():
    # the gate convolution's backward reads dz: a channels-last z gets a channels-last dz
    update = fused_lstm_update(compiled=False)
    cl = torch.channels_last
    leaf = torch.randn(2, 8, 3, 3, requires_grad=True)
    z = (leaf * 1).contiguous(memory_format=cl)
    c = torch.randn(2, 2, 3, 3).contiguous(memory_format=cl)
    seen = []
    z.register_hook(lambda grad: seen.append(grad.is_contiguous(memory_format=cl)))
    h, c_new = update(z, c)
    weights = torch.randn(2, 2, 3, 3)  # contiguous: dh arrives in the other layout
    ((h * weights).sum() + c_new.sum()).backward()
    assert seen == [True]


@pytest.mark.parametrize("unused", ["c", "h"])
@pytest.mark.parametrize("low", [False, True])
def test_gate_kernels_see_one_kind_of_call_whatever_autograd_hands_back(unused, low):
    """A compiled kernel is specialised on its inputs' requires_grad and layouts: the kernels
    get them detached, and the gradients of h' and c' in z's layout, also where autograd
    hands back a contiguous gradient, or none for an unused output (whose zeros were
    contiguous, and then every earlier c gradient of a channels-last layer with them)."""
    from convlstm import gates

    calls = []

    def forward(z, c, z_more, low_precision_h):
        calls.append([t.requires_grad for t in (z, c, z_more)])
        return gates.gates_forward(z, c, z_more, low_precision_h)

    def backward(z, c, z_more, dh, dc_new):
        cl = [t.is_contiguous(memory_format=torch.channels_last) for t in (dh, dc_new)]
        calls.append([t.requires_grad for t in (z, c, z_more, dh, dc_new)] + cl)
        calls.append((dh.dtype, dc_new.dtype, dh.any().item(), dc_new.any().item()))
        return gates.gates_backward(z, c, z_more, dh, dc_new)

    torch.manual_seed(0)
    cl = torch.channels_last
    leaves = [
        torch.randn(shape, requires_grad=True)
        for shape in ((2, 8, 3, 3), (2, 2, 3, 3), (2, 8, 3, 3))
    ]
    z, c, more = (t.bfloat16().contiguous(memory_format=cl) for t in leaves)
    c = leaves[1].contiguous(memory_format=cl)
    weights = torch.randn(2, 2, 3, 3)  # a contiguous use: h's gradient arrives contiguous
    results = []
    for kernels in ((forward, backward), (gates.gates_forward, gates.gates_backward)):
        h, c_new = gates._FusedUpdate.apply(z, c, more, kernels, low)
        loss = (c_new**2).sum() if unused == "h" else (h.float() * weights).sum()
        loss.backward()
        results.append([t.grad.clone() for t in leaves])
        for t in leaves:
            t.grad = None
    h_dtype = torch.bfloat16 if low else torch.float32
    assert calls == [
        [False, False, False],
        [False] * 5 + [True, True],
        (h_dtype, torch.float32, unused != "h", unused != "c"),
    ]
    for got, want in zip(*results, strict=True):  # the same gradients as before
        assert torch.equal(got, want)
    # and right: against the float32 update of the same (bf16-rounded) pre-activations
    reference = [t.detach().clone().requires_grad_() for t in leaves]
    z32, more32 = (t.bfloat16().float() for t in (reference[0], reference[2]))
    h, c_new = lstm_update(z32, reference[1], more32)
    (((c_new**2).sum()) if unused == "h" else (h * weights).sum()).backward()
    tol = 1e-2 if low else 1e-5  # (with low_precision_h, dh arrives rounded to bf16)
    torch.testing.assert_close(results[0][1], reference[1].grad, rtol=tol, atol=tol)
    for got, want in zip(results[0][::2], reference[::2], strict=True):  # dz in bf16
        torch.testing.assert_close(got, want.grad, rtol=1e-2, atol=1e-2)


def test_a_training_step_compiles_the_gate_kernels_once_per_kind(monkeypatch):
    """CUDA's gate update (compiled gates, bf16 h, hoisting, channels-last), run on the CPU:
    one compiled forward and one backward with z_more and one without, however autograd hands
    back the gradients (before session 20: 10 compilations, on ConvLSTM-S 42 s cold on a
    2-core CPU). Counted with Dynamo's eager backend, on fresh copies of the functions."""
    import types

    from torch._dynamo.testing import CompileCounterWithBackend

    from convlstm import gates

    counter = CompileCounterWithBackend("eager")

    def fresh(fn):  # Dynamo keeps its compilations on the code object: a copy has none
        code = fn.__code__.replace()
        return types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__)

    kernels = [
        torch.compile(fresh(fn), backend=counter, dynamic=True)
        for fn in (gates.gates_forward, gates.gates_backward)
    ]
    monkeypatch.setattr(gates, "_COMPILED", [tuple(kernels)])
    torch.manual_seed(0)
    config = ModelConfig(hidden_channels=(8, 8), patch_size=4)
    options = SpeedOptions(hoist=True, fused_gates=True, channels_last=True, low_precision_h=True)
    model = apply_speed(build_model(config), options)
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
            model(torch.rand(2, 6, 1, 16, 16), 4).float().square().mean().backward()
    assert counter.frame_count == 4


def test_hand_written_gate_update_keeps_dtypes_of_mixed_precision():
    # bf16 pre-activations (autocast) and a float32 memory, as on the GPU: h and c in float32,
    # each gradient in its input's dtype, all within bf16 rounding of the float32 update
    update = fused_lstm_update(compiled=False)
    z32, c = torch.randn(2, 8, 3, 3), torch.randn(2, 2, 3, 3, requires_grad=True)
    z = z32.bfloat16().requires_grad_()
    h, c_new = update(z, c)
    assert h.dtype == c_new.dtype == torch.float32
    (h.sum() + c_new.sum()).backward()
    assert z.grad.dtype == torch.bfloat16 and c.grad.dtype == torch.float32
    reference = lstm_update(z.detach().float(), c.detach())
    torch.testing.assert_close((h, c_new), reference)
    z_ref, c_ref = z.detach().float().requires_grad_(), c.detach().clone().requires_grad_()
    sum(t.sum() for t in lstm_update(z_ref, c_ref)).backward()
    torch.testing.assert_close(c.grad, c_ref.grad)  # float32 throughout
    torch.testing.assert_close(z.grad, z_ref.grad.bfloat16())  # one bf16 rounding


def test_speed_options_refuse_cuda_only_parts_on_the_cpu():
    cpu = torch.device("cpu")
    with pytest.raises(ConfigError, match="cuda_graph needs a CUDA device"):
        SpeedOptions(cuda_graph=True).check(cpu)
    SpeedOptions(fused_optimizer=True).check(cpu)  # fused Adam runs on the CPU too
    with pytest.raises(ConfigError, match="path must be"):
        SpeedOptions.for_path("quick", cpu)
    fast_cpu = SpeedOptions.for_path("fast", cpu)
    assert fast_cpu == SpeedOptions(
        hoist=True, winograd=True, native_gates=True, fused_optimizer=True
    )
    assert SpeedOptions.for_path("fast", cpu, amp_dtype=torch.bfloat16).fused_optimizer
    assert SpeedOptions.for_path("fast", torch.device("cuda")).cuda_graph


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_fused_adam_on_the_cpu_takes_the_same_steps(optimizer):
    """The fast path's fused Adam / AdamW kernel on the CPU: the same parameters, step by step,
    as the per-tensor reference (float64, to 1e-12)."""
    from convlstm.training import make_optimizer

    cfg = build(TrainConfig, dict(optimizer=optimizer, lr=1e-2, weight_decay=0.1))
    models = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = build_model(ModelConfig(hidden_channels=(4,), kernel_size=3)).double()
        models.append((model, make_optimizer(model, cfg, fused=fused)))
    assert models[1][1].param_groups[0]["fused"] and not models[0][1].param_groups[0]["fused"]
    frames = torch.rand(3, 6, 1, 8, 8, dtype=torch.float64)
    for _ in range(4):
        for model, opt in models:
            opt.zero_grad()
            model(frames[:, :3], horizon=3).square().mean().backward()
            opt.step()
        for a, b in zip(models[0][0].parameters(), models[1][0].parameters(), strict=True):
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


def test_fast_training_follows_the_eager_run(tmp_path):
    eager = _train(tmp_path, "eager", checkpoint_every=0)
    fast = _train(
        tmp_path,
        "fast",
        checkpoint_every=0,
        path="fast",
        activation_checkpointing=True,
        precision="fp32",  # auto would be bf16 on a CPU with AMX-BF16 units
    )
    assert fast["speed"] == "hoist+fused_optimizer+winograd+native_gates+checkpointing"
    assert eager["speed"] == "eager"
    le = torch.tensor([loss for _, loss in eager["losses"]])
    lf = torch.tensor([loss for _, loss in fast["losses"]])
    torch.testing.assert_close(lf, le, rtol=1e-4, atol=1e-6)
    for a, b in zip(eager["model"].parameters(), fast["model"].parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_streaming_predictor_equals_model_step():
    config = ModelConfig(hidden_channels=(6, 4), kernel_size=3, patch_size=2)
    model = build_model(config).eval()
    frames = torch.rand(7, 2, 1, 8, 8)
    stream = StreamingPredictor(model, (2, 1, 8, 8))
    state = None
    with torch.no_grad():
        for _ in range(2):  # a second sequence after reset() starts from scratch
            for frame in frames:
                state = model.step(frame, state)
                torch.testing.assert_close(stream(frame), state.prediction)
            stream.reset()
            state = None
    with pytest.raises(ShapeError, match="built for frames"):
        stream(torch.rand(1, 1, 8, 8))
    # without a graph each call returns a new tensor: neither the next call nor reset()
    # changes a prediction the caller holds
    first = stream(frames[0])
    kept = first.clone()
    stream(frames[1])
    stream.reset()
    torch.testing.assert_close(first, kept)
    torch.testing.assert_close(stream(frames[0].double()), kept)  # any dtype, as copy_ took
    ef = build_model(ModelConfig(architecture="encoder_forecaster", hidden_channels=(4, 4)))
    with pytest.raises(ConfigError, match="predicts every next frame"):
        StreamingPredictor(ef, (1, 1, 16, 16))
    fc = build_model(ModelConfig(architecture="fc_lstm", hidden_channels=(8,), frame_size=(8, 8)))
    with pytest.raises(ConfigError, match="carries its next-frame prediction"):
        StreamingPredictor(fc, (2, 1, 8, 8))  # its state holds the last frame, not a forecast
    with pytest.raises(ConfigError, match="CUDA graph needs"):
        StreamingPredictor(model, (2, 1, 8, 8), graph=True)


@pytest.mark.parametrize("amx", [True, False])
def test_the_fast_streaming_predictor_takes_the_fast_paths_options_and_precision(monkeypatch, amx):
    """StreamingPredictor.fast: bf16 from packed weights on a CPU with AMX-BF16 units, float32
    with Winograd elsewhere; its predictions are model.step's under the same options and
    autocast."""
    monkeypatch.setattr(training, "cpu_bf16_units", lambda: amx)
    config = ModelConfig(hidden_channels=(6, 5), kernel_size=3, patch_size=2)
    model = build_model(config)
    stream = StreamingPredictor.fast(model, (2, 1, 8, 8), compile=False)  # (tests/test_compiled)
    cell = model.layers[0].cell
    assert stream.dtype == (torch.bfloat16 if amx else None) and not stream.graph_mode
    assert cell.packed == amx and cell.winograd == (not amx) and model.layers[0].hoist
    frames, state = torch.rand(4, 2, 1, 8, 8), None
    with torch.no_grad():
        for frame in frames:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amx):
                state = model.step(frame, state)
            torch.testing.assert_close(stream(frame), state.prediction)


def test_the_fast_streaming_predictor_checks_before_it_changes_the_model():
    ef = build_model(ModelConfig(architecture="encoder_forecaster", hidden_channels=(4, 5)))
    with pytest.raises(ConfigError, match="predicts every next frame"):
        StreamingPredictor.fast(ef, (1, 1, 8, 8))
    assert not ef.hoist  # untouched
    model = build_model(ModelConfig(hidden_channels=(4,), kernel_size=3, patch_size=2))
    with pytest.raises(ConfigError, match="CUDA graph needs"):
        StreamingPredictor.fast(model, (1, 1, 8, 8), graph=True)
    assert not model.layers[0].hoist
    apply_speed(model, SpeedOptions(checkpointing=True))
    StreamingPredictor.fast(model, (1, 1, 8, 8), compile=False)
    assert model.layers[0].cell.checkpointing and model.layers[0].hoist  # kept for training


def test_a_float64_model_streams_in_float64():
    model = build_model(ModelConfig(hidden_channels=(4,), kernel_size=3, patch_size=2)).double()
    frames, state = torch.rand(3, 1, 1, 8, 8, dtype=torch.float64), None
    for make in (StreamingPredictor, StreamingPredictor.fast):
        stream = make(model, (1, 1, 8, 8))
        assert stream.dtype is None
        with torch.no_grad():
            for frame in frames:
                state = model.step(frame, state)
                out = stream(frame)
                assert out.dtype == torch.float64
                torch.testing.assert_close(out, state.prediction, rtol=1e-12, atol=1e-12)
        state = None


def test_fit_to_budget_keeps_the_shares_of_the_schedules():
    cfg = build(TrainConfig, dict(steps=1000, ss_decay_steps=400, warmup_steps=100))
    fitted = fit_to_budget(cfg, 250)
    assert (fitted.steps, fitted.ss_decay_steps, fitted.warmup_steps) == (250, 100, 25)
    assert fitted.lr == cfg.lr
    tiny = fit_to_budget(cfg, 2)  # a share that was not zero stays at least one step
    assert (tiny.ss_decay_steps, tiny.warmup_steps) == (1, 1)
    none = fit_to_budget(build(TrainConfig, dict(steps=1000, ss_decay_steps=0)), 50)
    assert none.ss_decay_steps == 0 and none.warmup_steps == 0


class FakeClock:
    """time.perf_counter for convlstm.training: each training batch costs `cost(step)` s."""

    def __init__(self, cost):
        self.now, self.cost = 0.0, cost

    def perf_counter(self):
        return self.now

    def batches(self, step):
        self.now += self.cost(step)
        return moving_squares(step)


def _budget_run(tmp_path, monkeypatch, clock, **overrides):
    """A 2.5 s budget over 1,000 nominal steps, timed by `clock`."""
    monkeypatch.setattr(training, "time", clock)
    values = dict(steps=1000, time_budget=2.5, log_every=10, checkpoint_every=0) | overrides
    return _train(tmp_path, "budget", batches=clock.batches, **values)


def test_time_budget_sizes_the_run_from_its_timed_steps(tmp_path, monkeypatch):
    clock = FakeClock(lambda step: 0.0625)
    result = _budget_run(tmp_path, monkeypatch, clock, ss_decay_steps=500)
    # steps take 1/16 s (exact in binary); 25 steps spend 1.5625 s, 0.9375 s buy 15 more
    train_cfg = result["config"]["train"]
    assert (train_cfg["steps"], train_cfg["ss_decay_steps"]) == (40, 20)
    assert result["losses"][-1][0] == 40
    # the first 5 steps, as the budget counts them: what compiling costs a budget run
    assert result["warmup_seconds"] == 5 * 0.0625 and result["train_seconds"] == 40 * 0.0625
    payload = torch.load(result["checkpoint"], weights_only=False)
    assert payload["step"] == 40 and payload["train_config"]["steps"] == 40


def test_time_budget_stops_at_a_log_point_when_steps_slow_down(tmp_path, monkeypatch):
    clock = FakeClock(lambda step: 0.0625 if step < 25 else 0.25)
    result = _budget_run(tmp_path, monkeypatch, clock, log_every=5)
    # sized to 40 steps at 1/16 s; at 0.25 s a step the budget is spent by step 30
    # (1.5625 + 5 x 0.25 = 2.8125 s), the next log point, and the run stops there
    assert result["config"]["train"]["steps"] == 30 and result["losses"][-1][0] == 30


def test_time_budget_leaves_evaluation_out_of_the_timing(tmp_path, monkeypatch):
    clock = FakeClock(lambda step: 0.0625)
    real_eval = training.evaluate

    def slow_eval(*args, **kwargs):
        clock.now += 30.0  # an evaluation inside the timed steps
        return real_eval(*args, **kwargs)

    monkeypatch.setattr(training, "evaluate", slow_eval)
    result = _budget_run(tmp_path, monkeypatch, clock, eval_every=10)
    assert result["config"]["train"]["steps"] == 40


@pytest.mark.parametrize("steps, first", [(8, 5), (3, 3)])
def test_warmup_seconds_are_the_first_steps_without_evaluations(
    tmp_path, monkeypatch, steps, first
):
    """Every run reports its first 5 steps' time (compilation, graph capture), evaluations
    and saving left out; a shorter run, all of it."""
    clock = FakeClock(lambda step: 0.5)
    real_eval = training.evaluate

    def slow_eval(*args, **kwargs):
        clock.now += 30.0
        return real_eval(*args, **kwargs)

    monkeypatch.setattr(training, "time", clock)
    monkeypatch.setattr(training, "evaluate", slow_eval)
    result = _train(
        tmp_path,
        "warm",
        batches=clock.batches,
        steps=steps,
        eval_every=2,
        log_every=4,
        checkpoint_every=0,
    )
    assert result["warmup_seconds"] == first * 0.5


def test_time_budget_needs_more_nominal_steps_than_it_times(tmp_path):
    with pytest.raises(ConfigError, match="times the first 25 steps"):
        _train(tmp_path, "short", steps=20, time_budget=5.0)


@pytest.mark.parametrize("bad", [-1.0, float("inf")])
def test_time_budget_must_be_finite_and_non_negative(bad):
    with pytest.raises(ConfigError, match="time_budget"):
        build(TrainConfig, dict(time_budget=bad))


def test_time_budget_is_refused_on_resume(tmp_path):
    first = _train(tmp_path, "first", checkpoint_every=0)
    with pytest.raises(ConfigError, match="time_budget sizes a fresh run"):
        _train(tmp_path, "again", resume=first["checkpoint"], steps=12, time_budget=5.0)


class TickingClock:
    """time.perf_counter for the benchmark: 0.1 s passes at every reading (no real timing)."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        self.now += 0.1
        return self.now


def test_benchmark_runs_on_the_cpu_and_writes_its_table(tmp_path, mnist_dir, capsys, monkeypatch):
    monkeypatch.setattr(benchmark, "time", TickingClock())
    out = tmp_path / "bench.json"
    argv = ["--device", "cpu", "--preset", "mmnist-cpu-small", "--batch-sizes", "2"]
    argv += ["--seconds", "0.2", "--variants", "eager-fp32", "fast", "--out", str(out)]
    argv += ["--profile", "fast"]
    if mnist_dir:
        argv += ["--mnist-dir", mnist_dir]
    report = benchmark.main(argv)
    saved = json.loads(out.read_text())
    assert saved["flops_per_train_sequence"] == report["flops_per_train_sequence"] > 1e9
    assert [e["variant"] for e in saved["training"]] == ["eager-fp32", "fast"]
    for entry in saved["training"]:
        assert "error" not in entry and entry["train_seq_per_s"] > 0
        assert 0 < entry["peak_memory_gib"] < 1  # live tensors of one step: a few MB here
    # "fast" streams and forecasts compiled where compile_pays (the stream's 4-tile grid here;
    # the forecast at batch 2 in bf16, or 8 tiles in float32: Winograd, not compiled), with
    # the uncompiled twin beside it
    inference = [
        (e["variant"], e["stream_compiled"], e["forecast_compiled"]) for e in saved["inference"]
    ]
    assert not any(e["forecast_graph"] for e in saved["inference"])  # (CUDA only)
    compiles = compiled.available()
    forecasts = compiles and training.cpu_bf16_units()
    assert inference == [
        ("eager-fp32", False, False),
        ("fast", compiles, forecasts),
        ("fast-no-compile", False, False),
    ]
    assert saved["generator_seq_per_s"] > 0
    assert "convolution" in saved["profile"]  # the kernel table of the profiled variant
    table = capsys.readouterr().out.split("\n\n")[-1]
    assert "fast / eager-fp32 at batch 2" in table and "Moving MNIST generator" in table


def test_a_failed_variant_fails_the_command_and_keeps_the_others(tmp_path, monkeypatch, capsys):
    """The GPU check reads the benchmark's exit status: a variant that fails to build or run
    makes it 1, with the others' figures written."""
    monkeypatch.setattr(benchmark, "time", TickingClock())
    real = benchmark.time_training

    def failing(preset, batch, precision, options, *rest):
        if options.hoist:  # "fast"
            raise RuntimeError("capture failed")
        return real(preset, batch, precision, options, *rest)

    monkeypatch.setattr(benchmark, "time_training", failing)
    out = tmp_path / "bench.json"
    argv = ["--device", "cpu", "--preset", "mmnist-cpu-small", "--batch-sizes", "2"]
    argv += ["--seconds", "0.2", "--variants", "eager-fp32", "fast", "--out", str(out)]
    argv += ["--inference-variants", "eager-fp32"]
    with pytest.raises(SystemExit) as exit_info:
        benchmark.cli(argv)
    assert exit_info.value.code == 1
    assert "failed: fast (errors in the table)" in capsys.readouterr().err
    saved = json.loads(out.read_text())
    eager, fast = saved["training"]
    assert eager["train_seq_per_s"] > 0 and "error" not in eager
    assert fast["error"] == "RuntimeError: capture failed"
    assert benchmark.failed_variants(saved) == ["fast"]
    saved["training"].pop()
    assert benchmark.failed_variants(saved) == []


def test_inference_is_timed_after_the_first_batch_size_and_saved_then(tmp_path, monkeypatch):
    """A run cut short by the GPU check's time limit keeps the inference rows: they are timed
    and written after the first batch size's training, before the others'."""
    calls = []

    def training(preset, batch, *rest):
        calls.append(("train", batch))
        return {"train_seq_per_s": 1.0, "peak_memory_gib": None, "warmup_s": 0.0}

    def inference(preset, variants, device, seconds, batch, compiles):
        calls.append(("infer", batch, json.loads(out.read_text())["inference"]))
        return [{"stream_step_ms": 1.0, "forecast_seq_per_s": 1.0}] * len(variants)

    monkeypatch.setattr(benchmark, "time_training", training)
    monkeypatch.setattr(benchmark, "time_inference", inference)
    monkeypatch.setattr(benchmark, "generator_rate", lambda *a: calls.append("generate") or 1.0)
    out = tmp_path / "bench.json"
    argv = ["--device", "cpu", "--preset", "mmnist-cpu-small", "--batch-sizes", "3", "2"]
    argv += ["--variants", "eager-fp32", "--inference-variants", "eager-fp32"]
    argv += ["--seconds", "0.1", "--out", str(out)]

    def cut_short(*args):  # the second batch size's training: the run is stopped there
        assert calls[-1][0] == "infer"
        assert [e["variant"] for e in json.loads(out.read_text())["inference"]] == ["eager-fp32"]
        raise KeyboardInterrupt

    benchmark.main(argv)
    assert calls == [("train", 3), ("infer", 2, []), ("train", 2), "generate"]
    calls.clear()
    monkeypatch.setattr(
        benchmark, "time_training", lambda p, b, *r: cut_short() if b == 2 else training(p, b)
    )
    with pytest.raises(KeyboardInterrupt):
        benchmark.main(argv)


def test_benchmark_table_keeps_three_figures_for_slow_and_fast_rates():
    """A CPU run of ConvLSTM-S trains at about 0.5 sequences/s: one decimal would print 0.5
    for anything from 0.45 to 0.55."""
    assert [benchmark._figures(x, 8) for x in (1066.4, 28.74, 0.5234, 0.0123, 0.0)] == [
        "    1066",
        "    28.7",
        "   0.523",
        "   0.012",
        "       0",
    ]


class SteppedClock:
    """time.perf_counter that moves only when a fake training step runs."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


def test_interleaved_timing_alternates_the_order_and_takes_medians(monkeypatch):
    """No real clock is read: the fake steps advance a fake one, so the rates below check
    the bookkeeping (order, medians), not anyone's speed."""
    clock, calls, made = SteppedClock(), [], []
    durations = [[0.1, 0.5, 0.1, 0.1, 0.1, 0.1, 0.1], [0.3] * 7]  # one slow outlier step

    def fake_train_step(model, model_cfg, cfg, options, device):
        k = len(made)
        made.append(k)

        def step(batch, mask):
            calls.append(k)
            clock.now += durations[k][(len([c for c in calls if c == k]) - 1) % 7]

        return step

    monkeypatch.setattr(benchmark, "_train_step", fake_train_step)
    monkeypatch.setattr(benchmark, "time", clock)
    monkeypatch.setattr(benchmark, "tensor_peak_gib", lambda step, batch: 0.25)
    variants = [("fp32", SpeedOptions()), ("fp32", SpeedOptions(hoist=True))]
    batch = torch.zeros(4, 20, 1, 64, 64)
    out = benchmark.time_training_interleaved(
        "mmnist-cpu-small", 4, variants, torch.device("cpu"), [batch], seconds=0.5
    )
    timed = calls[10:]  # after 5 warm-up steps each
    assert timed[:6] == [0, 1, 1, 0, 0, 1]  # the order reverses every round
    assert out[0]["steps_timed"] == out[1]["steps_timed"] >= 5
    assert out[0]["train_seq_per_s"] == pytest.approx(4 / 0.1)  # the outlier is not the median
    assert out[1]["train_seq_per_s"] == pytest.approx(4 / 0.3)
    assert out[0]["peak_memory_gib"] == 0.25  # on the CPU each variant's own step's peak


def test_benchmark_interleaved_run_reports_every_variant(tmp_path, mnist_dir, monkeypatch):
    monkeypatch.setattr(benchmark, "time", TickingClock())
    argv = ["--device", "cpu", "--preset", "mmnist-cpu-small", "--batch-sizes", "2"]
    argv += ["--seconds", "0.2", "--variants", "eager-fp32", "fast", "--interleave"]
    argv += ["--inference-variants", "fast", "fast-no-packed", "eager-fp32"]
    if mnist_dir:
        argv += ["--mnist-dir", mnist_dir]
    report = benchmark.main(argv)
    assert report["interleaved"] is True
    assert [e["variant"] for e in report["training"]] == ["eager-fp32", "fast"]
    assert all("error" not in e and e["train_seq_per_s"] > 0 for e in report["training"])
    assert all(0 < e["peak_memory_gib"] < 1 for e in report["training"])
    inference = report["inference"]
    assert [e["variant"] for e in inference] == ["fast", "fast-no-packed", "eager-fp32"]
    for entry in inference:  # every variant timed in each round
        assert entry["stream_step_ms"] > 0 and entry["forecast_seq_per_s"] > 0
        assert entry["rounds"] == inference[0]["rounds"] >= 3


def test_benchmark_runs_an_encoder_forecaster(tmp_path, mnist_dir, monkeypatch):
    """Its loss leaves out the context (it predicts nothing while reading) and it has no
    streaming step: training and forecasts are timed, streaming is not."""
    monkeypatch.setattr(benchmark, "time", TickingClock())
    argv = ["--device", "cpu", "--preset", "mmnist-encoder-forecaster", "--batch-sizes", "1"]
    argv += ["--seconds", "0.2", "--variants", "eager-fp32", "fast-fp32"]
    if mnist_dir:
        argv += ["--mnist-dir", mnist_dir]
    report = benchmark.main(argv)
    assert [e["variant"] for e in report["training"]] == ["eager-fp32", "fast-fp32"]
    assert all("error" not in e and e["train_seq_per_s"] > 0 for e in report["training"])
    variants = [e["variant"] for e in report["inference"]]
    assert variants == ["eager-fp32", "fast-fp32", "fast-fp32-no-compile"]
    for entry in report["inference"]:
        assert entry["stream_step_ms"] is None and entry["forecast_seq_per_s"] > 0
        assert entry["rounds"] >= 3
    assert " - " in benchmark._infer_line(report["inference"][0])


def test_an_inference_variant_that_fails_to_build_loses_only_its_own_figures(monkeypatch):
    """(on a GPU a failed graph capture or compilation must not cost the other variants'
    streaming and forecast figures)"""
    monkeypatch.setattr(benchmark, "time", TickingClock())
    real, calls = benchmark._inference_run, []

    def second_fails(*args):
        calls.append(args)
        if len(calls) == 2:
            try:  # as a failed capture ends: its own error, raised while handling the cause
                raise RuntimeError("operation not permitted when stream is capturing")
            except RuntimeError:
                raise RuntimeError("CUDA error: operation failed due to a previous error")  # noqa: B904
        return real(*args)

    monkeypatch.setattr(benchmark, "_inference_run", second_fails)
    variants = [("fp32", SpeedOptions()), ("fp32", SpeedOptions(hoist=True))]
    variants.append(("fp32", SpeedOptions(hoist=True, native_gates=True)))
    out = benchmark.time_inference("mmnist-cpu-small", variants, torch.device("cpu"), 0.2, 2)
    assert out[1] == {
        "error": "RuntimeError: CUDA error: operation failed due to a previous error (from "
        "RuntimeError: operation not permitted when stream is capturing)"
    }
    for entry in (out[0], out[2]):
        assert entry["stream_step_ms"] > 0 and entry["forecast_seq_per_s"] > 0
        assert entry["rounds"] >= 3 and entry["forecast_graph"] is False
    line = benchmark._infer_line({"variant": "fast", "precision": "bf16", **out[1]})
    assert "failed: RuntimeError: CUDA error" in line
    calls.clear()
    calls.append(None)  # (the next call is the second)
    out = benchmark.time_inference("mmnist-cpu-small", variants[:1], torch.device("cpu"), 0.2, 2)
    assert "error" in out[0]  # none built: nothing timed, the error kept


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--device", "cpu", "--variants", "eager-bf16"], "runs in bf16"),
        (["--device", "cpu", "--variants", "fast-no-graph"], "runs in bf16"),
        (["--device", "cpu", "--out", "table.txt"], "must name a .json"),
        (["--device", "cpu", "--profile", "eager-bf16"], "runs in bf16"),
        (["--device", "cpu", "--inference-variants", "eager-bf16"], "runs in bf16"),
        (["--device", "cpu", "--batch-sizes", "0"], "must be positive"),
    ],
)
def test_benchmark_bad_input_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, argv, match):
    monkeypatch.chdir(tmp_path)
    for module in (training, benchmark):  # a CPU without AMX-BF16: bf16 refused
        monkeypatch.setattr(module, "cpu_bf16_units", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        _cli(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def _cli(argv):
    from convlstm.cli import run_main

    run_main(lambda: benchmark.main(argv))


def test_a_graphed_step_refuses_a_batch_of_another_shape():
    step = GraphedStep.__new__(GraphedStep)  # the shape check alone (capture needs CUDA)
    step.batch, step.mask = torch.zeros(4, 6, 1, 8, 8), torch.zeros(4, 2, dtype=torch.bool)
    with pytest.raises(ShapeError, match=r"batch was \(4, 6, 1, 8, 8\) when captured"):
        step(torch.zeros(1, 6, 1, 8, 8), torch.zeros(1, 2, dtype=torch.bool))
    with pytest.raises(ShapeError, match="mask was"):
        step(torch.zeros(4, 6, 1, 8, 8), None)


def test_back_to_eager_restores_the_parameter_layout():
    model = build_model(ModelConfig(hidden_channels=(4,), kernel_size=3, patch_size=2))
    apply_speed(model, SpeedOptions(channels_last=True))
    apply_speed(model, SpeedOptions())
    assert all(p.is_contiguous() for p in model.parameters())


def _relative_errors(config, options, dtype):
    """Relative error (norm of the difference over the norm) of the training forward's output
    and of each gradient, under `options` and autocast to `dtype`, against float64 eager."""
    reference, model = _pair(config, options, torch.float64)
    model.float()
    frames = torch.rand(3, 11, 1, 8, 8, dtype=torch.float64)
    mask = torch.tensor([[True, False, True, False], [False] * 4, [True] * 4])
    out_r, grads_r = _run(reference, frames, mask)
    with torch.autocast("cpu", dtype=dtype):
        out, grads = _run(model, frames.float(), mask)
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()  # noqa: E731
    return rel(out, out_r), {n: rel(grads[n], grads_r[n]) for n in grads_r}


@pytest.mark.parametrize("cell", ["convlstm", "convgru", "convrnn"])
def test_the_cpu_bf16_fast_path_is_as_accurate_as_eager_bf16(monkeypatch, cell):
    """The CPU fast path under bf16 autocast (hoisting, channels-last, batched weight
    gradients, the C gate update in float32, h in bf16) against float64: within a few bf16
    roundings, and no further from it than the eager path under the same autocast."""
    from convlstm import gates, native

    config = ModelConfig(hidden_channels=(16, 8), kernel_size=3, patch_size=2, cell=cell)
    options = SpeedOptions.for_path("fast", torch.device("cpu"), amp_dtype=torch.bfloat16)
    assert options == SpeedOptions(
        hoist=True,
        channels_last=True,
        batched_wgrad=True,
        native_gates=True,
        low_precision_h=True,
        packed=True,
        fused_optimizer=True,
    )
    out_e, grads_e = _relative_errors(config, SpeedOptions(), torch.bfloat16)
    calls = []
    native_apply = gates._NativeUpdate.apply
    monkeypatch.setattr(
        gates._NativeUpdate, "apply", lambda *args: calls.append(1) or native_apply(*args)
    )
    out_f, grads_f = _relative_errors(config, options, torch.bfloat16)
    if cell == "convlstm":  # the C bf16 update took part
        assert len(calls) > 0 or native.load("gates") is None
    assert out_f < 5e-3 and out_f < 2 * out_e, (out_f, out_e)
    for name, error in grads_f.items():
        assert error < 2e-2 and error < 2 * grads_e[name] + 1e-3, (name, error, grads_e[name])


def test_auto_precision_is_bf16_for_the_cpu_fast_path_only_with_amx(monkeypatch):
    cpu = torch.device("cpu")
    for units in (True, False):
        monkeypatch.setattr(training, "cpu_bf16_units", lambda units=units: units)
        fast = torch.bfloat16 if units else None
        assert training.resolve_precision("auto", cpu, "fast") == (fast, False)
        assert training.resolve_precision("auto", cpu, "eager") == (None, False)  # reference
        assert training.resolve_precision("fp32", cpu, "fast") == (None, False)
        assert training.resolve_precision("bf16", cpu, "eager") == (torch.bfloat16, False)
    # float32 keeps Winograd; checkpointing drops the batched weight gradient (it keeps every
    # step's tensors, which checkpointing exists to avoid)
    assert SpeedOptions.for_path("fast", cpu, amp_dtype=None).winograd
    bf16 = SpeedOptions.for_path("fast", cpu, True, torch.bfloat16)
    assert bf16.checkpointing and not bf16.batched_wgrad and not bf16.winograd
    cuda = torch.device("cuda")
    assert SpeedOptions.for_path("fast", cuda, amp_dtype=torch.bfloat16).cuda_graph


def test_benchmark_variants_resolve_auto_to_the_fast_paths_precision(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(training, "cpu_bf16_units", lambda: True)
    monkeypatch.setattr(benchmark, "cpu_bf16_units", lambda: True)
    assert benchmark.resolve_variant("fast", cpu) == (
        "bf16",
        SpeedOptions.for_path("fast", cpu, amp_dtype=torch.bfloat16),
    )
    assert benchmark.resolve_variant("fast-fp32", cpu) == (
        "fp32",
        SpeedOptions.for_path("fast", cpu),
    )
    assert "eager-bf16" in benchmark.default_variants(cpu)
    monkeypatch.setattr(training, "cpu_bf16_units", lambda: False)
    monkeypatch.setattr(benchmark, "cpu_bf16_units", lambda: False)
    assert benchmark.resolve_variant("fast", cpu) == ("fp32", SpeedOptions.for_path("fast", cpu))
    assert "eager-bf16" not in benchmark.default_variants(cpu)


def test_streaming_predictor_under_autocast_with_the_fast_options():
    config = ModelConfig(hidden_channels=(6, 4), kernel_size=3, patch_size=2)
    model = apply_speed(build_model(config), SpeedOptions(hoist=True, channels_last=True))
    model.eval()
    stream = StreamingPredictor(model, (2, 1, 8, 8), autocast_dtype=torch.bfloat16)
    state = None
    with torch.no_grad():
        for frame in torch.rand(4, 2, 1, 8, 8):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                state = model.step(frame, state)
            out = stream(frame)
            assert out.dtype == state.prediction.dtype  # the prediction's dtype under autocast
            torch.testing.assert_close(out, state.prediction)


@pytest.mark.parametrize(
    "flags, permission, expected",
    [
        ({"avx512f", "avx512_bf16"}, True, False),  # bf16 instructions without the tiles
        ({"avx512_bf16", "amx_tile", "amx_bf16"}, True, True),
        ({"amx_tile", "amx_bf16"}, False, False),  # the kernel refused the tiles
        (set(), True, False),  # not Linux, or no flags line
    ],
)
def test_cpu_bf16_units_need_amx_tiles_and_the_kernels_permission(
    monkeypatch, flags, permission, expected
):
    monkeypatch.setattr(speed, "_cpu_flags", lambda: flags)
    monkeypatch.setattr(speed, "_amx_permission", lambda: permission)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    speed.cpu_bf16_units.cache_clear()
    try:
        assert speed.cpu_bf16_units() is expected
    finally:
        speed.cpu_bf16_units.cache_clear()  # the real answer again for later tests


@pytest.mark.parametrize(
    "variable, value, expected",
    [
        ("ONEDNN_MAX_CPU_ISA", "AVX2", False),  # oneDNN held below AMX: no tiles used
        ("ONEDNN_MAX_CPU_ISA", "avx512_core_bf16", False),
        ("DNNL_MAX_CPU_ISA", "AVX512_CORE_VNNI", False),  # the older name
        ("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX", True),
        ("ONEDNN_MAX_CPU_ISA", "avx10_1_512_amx_fp16", True),
        ("ONEDNN_MAX_CPU_ISA", "ALL", True),
        ("ONEDNN_MAX_CPU_ISA", "", True),  # set but empty: oneDNN's own choice
    ],
)
def test_cpu_bf16_units_follow_onednns_isa_limit(monkeypatch, variable, value, expected):
    monkeypatch.setattr(speed, "_cpu_flags", lambda: {"amx_tile", "amx_bf16"})
    monkeypatch.setattr(speed, "_amx_permission", lambda: True)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv(variable, value)
    speed.cpu_bf16_units.cache_clear()
    try:
        assert speed.cpu_bf16_units() is expected
    finally:
        speed.cpu_bf16_units.cache_clear()


def test_cpu_flags_are_read_from_the_flags_line(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nmodel name\t: Xeon\nflags\t\t: fpu avx512f amx_bf16\n\n")
    assert speed._cpu_flags(str(x86)) == {"fpu", "avx512f", "amx_bf16"}
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")
    assert speed._cpu_flags(str(arm)) == set()
    assert speed._cpu_flags(str(tmp_path / "missing")) == set()


def test_every_default_cuda_variant_resolves_to_options_valid_on_cuda(monkeypatch):
    """A GPU session runs these with no time to spare: each must resolve and pass
    SpeedOptions.check for CUDA (checked here without a GPU, bf16 taken as supported)."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    cuda = torch.device("cuda")
    names = benchmark.default_variants(cuda)
    assert len(set(names)) == len(names) and set(names) <= set(benchmark.VARIANTS)
    resolved = {}
    for name in names:
        precision, options = benchmark.resolve_variant(name, cuda)
        options.check(cuda)
        resolved[name] = (precision, options)
    assert resolved["fast"] == ("bf16", SpeedOptions.for_path("fast", cuda, False, torch.bfloat16))
    combined = resolved["fast-no-hoist-batched-wgrad"][1]
    assert combined.batched_wgrad and not combined.hoist and combined.cuda_graph
    both = resolved["fast-with-batched-wgrad-forward-dgrad"][1]
    assert both.batched_wgrad and both.forward_dgrad and both.hoist and both.cuda_graph
    assert resolved["fast-with-forward-dgrad"][1] == dataclasses.replace(
        resolved["fast"][1], forward_dgrad=True
    )
    assert resolved["fast"][1].low_precision_h
    assert resolved["fast-no-low-precision-h"][1] == dataclasses.replace(
        resolved["fast"][1], low_precision_h=False
    )
    # streaming and forecasts: eager, and the fast path with and without its graphs
    inference = benchmark.default_inference_variants(names, cuda)
    assert inference == ["eager-fp32", "eager-bf16", "fast", "fast-no-graph"]
    assert not resolved["fast-no-graph"][1].cuda_graph


@pytest.mark.parametrize("more", [False, True], ids=["z", "z+z_more"])
def test_low_precision_h_is_the_float32_h_rounded_with_the_same_gradients(more):
    """low_precision_h: h in z's bf16, the float32 h rounded once (what autocast would cast it
    to at each use); c and every gradient as without it, given the same dh."""
    torch.manual_seed(0)
    cl = torch.channels_last
    z = torch.randn(2, 8, 3, 3).bfloat16().contiguous(memory_format=cl)
    c = torch.randn(2, 2, 3, 3).contiguous(memory_format=cl)
    z_more = torch.randn(2, 8, 3, 3).bfloat16().contiguous(memory_format=cl) if more else None
    dh = torch.randn(2, 2, 3, 3).bfloat16()  # the same values for both, in each's dtype
    dc = torch.randn(2, 2, 3, 3)
    results = {}
    for low in (False, True):
        leaves = [t.clone().requires_grad_() for t in (z, c) + ((z_more,) if more else ())]
        update = fused_lstm_update(compiled=False, low_precision_h=low)
        h, c_new = update(*leaves)
        torch.autograd.backward((h, c_new), (dh.to(h.dtype), dc))
        results[low] = (h, c_new, [t.grad for t in leaves])
    (h32, c32, grads32), (h16, c16, grads16) = results[False], results[True]
    assert h32.dtype == torch.float32 and h16.dtype == torch.bfloat16
    assert torch.equal(h16, h32.bfloat16()) and torch.equal(c16, c32)
    for g16, g32 in zip(grads16, grads32, strict=True):
        assert g16.dtype == g32.dtype and torch.equal(g16, g32)


def test_low_precision_h_leaves_float32_and_mixed_updates_alone():
    update = fused_lstm_update(compiled=False, low_precision_h=True)
    z, c = torch.randn(2, 8, 3, 3), torch.randn(2, 2, 3, 3)
    assert [t.dtype for t in update(z, c)] == [torch.float32] * 2  # no autocast: as before
    # a float32 z_more beside bf16 z: h in the promoted float32, as without the option
    assert update(z.bfloat16(), c, z.clone())[0].dtype == torch.float32


def test_with_input_casts_x_to_an_h_already_in_autocasts_dtype():
    x = torch.randn(2, 3, 4, 4)
    h = torch.randn(2, 5, 4, 4).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        joined = with_input(x, h.bfloat16())  # low_precision_h's h: x follows it
        assert joined.dtype == torch.bfloat16
        assert torch.equal(joined, torch.cat([x, h], dim=1).bfloat16())
        assert joined.is_contiguous(memory_format=torch.channels_last)
        assert with_input(x, h).dtype == torch.float32  # a float32 h: as before
        assert with_input(x.double(), h.bfloat16()).dtype == torch.float64  # autocast's rule
    assert with_input(x, h.bfloat16()).dtype == torch.float32  # no autocast: h follows x


def test_low_precision_h_needs_the_compiled_gate_update():
    with pytest.raises(ConfigError, match="needs fused_gates or native_gates"):
        SpeedOptions(low_precision_h=True)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert SpeedOptions.for_path("fast", cuda, amp_dtype=torch.bfloat16).low_precision_h
    assert SpeedOptions.for_path("fast", cpu, amp_dtype=torch.bfloat16).low_precision_h
    assert not SpeedOptions.for_path("fast", cpu).low_precision_h  # float32: no autocast
    names = ("fast-no-fused-gates", "fast-no-low-precision-h")
    for name in names:  # the CUDA variants that turn it off resolve
        options = benchmark.VARIANTS[name][1](cuda, torch.bfloat16)
        assert not options.low_precision_h


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(architecture="encoder_forecaster"),
        dict(architecture="encoder_forecaster", encoder_attention=True, attention_channels=3),
        dict(architecture="encoder_forecaster", bidirectional=True),
    ],
    ids=["stacked", "encoder-forecaster", "attention", "bidirectional"],
)
def test_low_precision_h_keeps_a_models_bf16_forward_and_its_gradients_close(
    monkeypatch, overrides
):
    """The CUDA fast path's options (the graph aside) under bf16 autocast on the CPU, with and
    without low_precision_h: the same forecast where h only feeds convolutions (which cast it
    to bf16 anyway), within bf16 rounding where it also enters a sum (encoder attention's
    h + W_o(...)); gradients within bf16 rounding."""
    from convlstm import gates

    monkeypatch.setattr(
        gates, "_compiled_kernels", lambda: (gates.gates_forward, gates.gates_backward)
    )
    config = ModelConfig(hidden_channels=(6, 8), kernel_size=3, patch_size=2, **overrides)
    options = SpeedOptions(hoist=True, fused_gates=True, channels_last=True)
    context = torch.rand(2, 4, 1, 16, 16)
    outs, grads = [], []
    for low in (False, True):
        _, model = _pair(config, dataclasses.replace(options, low_precision_h=low), torch.float32)
        seen = set()  # what the ConvLSTM cells' gate convolutions are given, step by step
        for cell in model.modules():
            if isinstance(cell, ConvLSTMCell):
                cell.conv.register_forward_pre_hook(
                    lambda _, args, seen=seen: seen.add(args[0].dtype)
                )
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(context, 3)
        # with it, [x, h] is bf16 already (h made so, x cast to it), else float32 where x is
        assert seen == {torch.bfloat16} if low else torch.float32 in seen
        out.float().square().mean().backward()
        outs.append(out)
        grads.append([p.grad for p in model.parameters()])
    if overrides.get("encoder_attention"):
        torch.testing.assert_close(outs[1], outs[0], rtol=0.02, atol=0.01)
    else:
        assert torch.equal(outs[1], outs[0])
    for g_low, g in zip(grads[1], grads[0], strict=True):
        # (an attention key's bias has no gradient but rounding noise: the absolute floor)
        atol = 0.01 * g.abs().max().item() + 2e-8
        torch.testing.assert_close(g_low, g, rtol=0.02, atol=atol)


@pytest.mark.parametrize("amx", [False, True], ids=["cpu", "cpu-amx"])
def test_every_variant_resolves_on_each_kind_of_machine(monkeypatch, amx):
    """A variant whose options contradict each other on some machine (say, one that turns a
    gate kernel off where that machine's fast path writes h through it) is refused only when
    the benchmark reaches it: every variant resolves and passes the device's check, on a CPU
    with and without AMX-BF16 units and on CUDA (bf16 taken as supported)."""
    monkeypatch.setattr(training, "cpu_bf16_units", lambda: amx)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    for device in (torch.device("cpu"), torch.device("cuda")):
        for name in benchmark.VARIANTS:
            benchmark.resolve_variant(name, device)[1].check(device)


def test_a_state_made_under_autocast_continues_outside_it():
    """low_precision_h leaves h in bf16 in the state a fast run under autocast hands back:
    a step outside autocast takes it in the parameters' dtype, as the float32 h it rounds."""
    from convlstm.cells.lstm import ConvLSTMCell
    from convlstm.layers import run_cell

    torch.manual_seed(0)
    cell = ConvLSTMCell(in_channels=2, hidden_channels=3, kernel_size=3)
    frames = torch.randn(2, 3, 2, 5, 5)
    x = frames[:, 0]
    h, c = torch.randn(2, 3, 5, 5).bfloat16(), torch.randn(2, 3, 5, 5)
    for hoist in (False, True):  # hoisted, W_h * h runs on the state itself
        out, state = run_cell(cell, frames, (h, c), hoist)
        expected, expected_state = run_cell(cell, frames, (h.float(), c), hoist)
        assert torch.equal(out, expected) and out.dtype == torch.float32
        assert all(torch.equal(a, b) for a, b in zip(state, expected_state, strict=True))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # under autocast it stays as it is
        assert cell.prepare_state(x, (h, c))[0].dtype == torch.bfloat16
    bf16_cell = ConvLSTMCell(in_channels=2, hidden_channels=3, kernel_size=3).bfloat16()
    assert bf16_cell.prepare_state(x, (h, c.bfloat16()))[0].dtype == torch.bfloat16
