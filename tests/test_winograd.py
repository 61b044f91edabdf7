"""Winograd F(4x4, 3x3) and F(2x2, 5x5) convolutions (convlstm.winograd): equal to F.conv2d in
float64, close in float32, and what the CPU fast path runs for 3x3 and 5x5 ConvLSTM gates. The
tile transforms run as C kernels (convlstm/tiles.c) where a compiler is found, else in
PyTorch: both are tested."""

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from convlstm import native, winograd
from convlstm.cells.base import sequence_scope
from convlstm.config import ModelConfig, TrainConfig
from convlstm.errors import ConfigError
from convlstm.models import build_model
from convlstm.speed import SpeedOptions, apply_speed
from convlstm.winograd import WinogradSequence, _matrices, transform_weight, winograd_conv
from tests.test_speed import CONVLSTM_CASES, _pair, assert_fast_equals_eager, convlstm_config


def _c_kernels_or_skip() -> None:
    if native.load("tiles") is None:
        pytest.skip("no C compiler here: the C tile transforms can't be built")


@pytest.fixture(params=["c", "pytorch"])
def transforms(request, monkeypatch):
    """Run the test with the C tile transforms, then with the PyTorch ones."""
    if request.param == "c":
        _c_kernels_or_skip()
    else:
        monkeypatch.setattr(winograd, "_kernel", lambda name, t: None)
    return request.param


# the last two touch over 2^16 tile elements: the C kernels split them between threads
TRANSFORM_SHAPES = [
    (2, 3, 8, 8),
    (3, 5, 7, 10),
    (1, 4, 1, 2),
    (2, 17, 5, 5),
    (0, 3, 4, 4),
    (3, 40, 13, 18),
    (1, 64, 16, 16),
]


@pytest.mark.parametrize("shape", TRANSFORM_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("tile", [6, 8], ids=["3x3", "5x5"])
def test_c_tile_transforms_equal_the_pytorch_ones(shape, dtype, tile, monkeypatch):
    _c_kernels_or_skip()
    n, c, h, w = shape
    torch.manual_seed(0)
    x = torch.randn(n, c, h, w, dtype=dtype).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(n, c, h, w, dtype=dtype)  # contiguous NCHW: the kernel needs a copy
    th, tw = winograd._tiles(shape)
    m = torch.randn(n * th * tw, tile * tile, c, dtype=dtype).transpose(0, 1)  # not contiguous
    bias = torch.randn(c, dtype=dtype)
    calls = [
        ("_input_tiles", (x, tile)),
        ("_output_from", (m, n, h, w, tile)),
        ("_output_from", (m, n, h, w, tile, bias)),
        ("_grad_tiles", (grad, tile)),
        ("_input_grad", (m, shape, tile)),
    ]
    got = [getattr(winograd, name)(*args) for name, args in calls]
    monkeypatch.setattr(winograd, "_kernel", lambda name, t: None)
    # float32: the two round differently (8x8 tiles sum 8 terms of up to 5.25x each), so
    # within float32's rounding of the largest value, not of each
    rtol = 1e-12 if dtype == torch.float64 else 1e-6
    for (name, args), result in zip(calls, got, strict=True):
        expected = getattr(winograd, name)(*args)
        assert result.shape == expected.shape, name
        atol = rtol * max(1.0, expected.abs().max().item()) if expected.numel() else rtol
        torch.testing.assert_close(result, expected, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("tile", [6, 8], ids=["3x3", "5x5"])
def test_c_tile_transforms_give_the_same_bits_on_one_thread_and_on_two(tile):
    """Every output is made by one thread in one order, however the tiles are split."""
    _c_kernels_or_skip()
    if native.load("tiles").tiles_threads() == 0:
        pytest.skip("the C kernels were built without OpenMP here")
    torch.manual_seed(0)
    shape = (3, 40, 13, 18)
    n, c, h, w = shape
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    m = torch.randn(tile * tile, n * 4 * 5, c)
    calls = [
        (winograd._input_tiles, (x, tile)),
        (winograd._output_from, (m, n, h, w, tile)),
        (winograd._grad_tiles, (x, tile)),
        (winograd._input_grad, (m, shape, tile)),
    ]
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2):
            torch.set_num_threads(count)
            results.append([fn(*args) for fn, args in calls])
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results, strict=True):
        assert torch.equal(one, two)


@pytest.mark.parametrize("a", [6, 8])
def test_the_matrices_made_from_the_points_compute_the_correlation_exactly(a):
    """In exact fractions, A^T ((G g) * (B^T d)) = (sum_k g_k d_(i+k) for i < 4): the
    coefficient of g_k d_l in output i is 1 where l = i + k and 0 elsewhere."""
    bt, g, at = winograd._rows(a)
    r = a - winograd.M + 1
    assert (len(bt), len(bt[0]), len(g), len(g[0]), len(at), len(at[0])) == (a, a, a, r, 4, a)
    for i in range(winograd.M):
        for k in range(r):
            for col in range(a):
                coeff = sum(at[i][j] * g[j][k] * bt[j][col] for j in range(a))
                assert coeff == (col == i + k), (i, k, col)


def test_c_kernels_run_only_on_cpu_float32_and_float64():
    _c_kernels_or_skip()
    assert winograd._kernel("input_tiles", torch.zeros(1, dtype=torch.float32)) is not None
    assert winograd._kernel("input_tiles", torch.zeros(1, dtype=torch.bfloat16)) is None
    assert winograd._kernel("input_tiles", torch.zeros(1, device="meta")) is None


def test_a_kernel_that_cannot_allocate_raises():
    x = torch.zeros(1, 1, 4, 4)
    with pytest.raises(MemoryError, match="could not allocate"):
        winograd._run(lambda *args: 1, x, x, 1, 4, 4, 1, 6)


def test_the_c_kernels_refuse_a_tile_size_they_do_not_have():
    _c_kernels_or_skip()
    x = torch.zeros(1, 4, 4, 1)
    for name in ("input_tiles", "output_from", "grad_tiles", "input_grad"):
        more = (None,) if name == "output_from" else ()  # output_from's bias
        for tile in (1, 4, 7):
            with pytest.raises(ValueError, match=f"input tiles of 6 or 8, not {tile}"):
                winograd._run(winograd._kernel(name, x), x, x, 1, 4, 4, 1, tile, *more)


@pytest.mark.parametrize(
    "n, c_in, c_out, h, w",
    [(2, 3, 5, 8, 8), (1, 4, 2, 7, 9), (3, 2, 3, 5, 4), (1, 1, 1, 1, 1), (2, 6, 4, 12, 16)],
)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("k", [3, 5])
def test_equals_the_direct_convolution_in_float64(
    n, c_in, c_out, h, w, channels_last, k, transforms
):
    torch.manual_seed(0)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(n, c_in, h, w, dtype=torch.float64).contiguous(memory_format=layout)
    x.requires_grad_()
    weight = torch.randn(c_out, c_in, k, k, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(c_out, dtype=torch.float64, requires_grad=True)
    expected = F.conv2d(x, weight, bias, padding=k // 2)
    got = winograd_conv(x, transform_weight(weight), k, bias)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    upstream = torch.randn_like(expected)
    grads = torch.autograd.grad(got, (x, weight, bias), upstream)
    expected_grads = torch.autograd.grad(expected, (x, weight, bias), upstream)
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k", [3, 5])
def test_hand_written_backward_passes_gradcheck(k, transforms):
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 3, k, k, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w: winograd_conv(x, transform_weight(w), k), (x, weight)
    )


@pytest.mark.parametrize("k, grid", [(3, 8), (5, 16)])
def test_float32_error_stays_near_the_direct_convolutions(k, grid, transforms):
    """At most about 1e-5 of the output's scale (measured 3e-6 to 1.1e-5, depending on the
    CPU): one to two decimal digits more rounding than the direct convolution, whose own error
    depends on the CPU's kernels too (1e-6 on an AVX2 EPYC, 2.05e-6 on a Xeon with oneDNN
    held to AVX2 for 5x5 filters, 3e-7 to 5e-7 with AVX-512)."""
    torch.manual_seed(0)
    x = torch.randn(16, 128, grid, grid, dtype=torch.float64)
    weight = torch.randn(256, 128, k, k, dtype=torch.float64) / (10 * k)
    exact = F.conv2d(x, weight, padding=k // 2)
    got = winograd_conv(x.float(), transform_weight(weight.float()), k).double()
    direct = F.conv2d(x.float(), weight.float(), padding=k // 2).double()
    scale = exact.abs().max()
    error, direct_error = ((y - exact).abs().max() / scale for y in (got, direct))
    assert error < 2e-5 and direct_error < 4e-6


def _steps(conv, x0, extra):
    h, outs = x0, []
    for e in extra:
        h = torch.tanh(conv(h) + e)
        outs.append(h)
    return torch.stack(outs).square().sum()


@pytest.mark.parametrize("batch_grad", [True, False])
@pytest.mark.parametrize("k", [3, 5])
def test_sequence_equals_per_step_convolutions_and_folds_the_filter_gradient(
    batch_grad, k, monkeypatch
):
    folds = []

    def counted(tape, head, u, dm, channels):
        folds.append(channels not in tape.totals)  # True: the first starts the total
        keep(tape, head, u, dm, channels)

    keep = winograd.FilterTape.keep
    monkeypatch.setattr(winograd.FilterTape, "keep", counted)
    torch.manual_seed(0)
    weight = torch.randn(3, 3, k, k, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    x0 = torch.randn(2, 3, 6, 5, dtype=torch.float64, requires_grad=True)
    extra = torch.randn(4, 2, 3, 6, 5, dtype=torch.float64)
    params = (x0, weight, bias)
    loss = _steps(lambda h: F.conv2d(h, weight, bias, padding=k // 2), x0, extra)
    expected = torch.autograd.grad(loss, params)
    sequence = WinogradSequence(weight, bias, batch_grad=batch_grad)
    assert (sequence.tape is not None) == batch_grad
    loss_w = _steps(sequence, x0, extra)
    torch.testing.assert_close(loss_w, loss, rtol=1e-12, atol=0)
    for g, e in zip(torch.autograd.grad(loss_w, params), expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    # with batch_grad each step's filter gradient was added into one total (the first one
    # starting it), and the total handed over; without, autograd summed them
    assert folds == ([True, False, False, False] if batch_grad else [])
    if batch_grad:
        assert not sequence.tape.kept and sequence.tape.totals == {}


def test_sequence_keeps_nothing_for_a_backward_that_stops_short_of_the_filter():
    torch.manual_seed(0)
    weight = torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    x0 = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    extra = torch.randn(3, 1, 2, 4, 4, dtype=torch.float64)
    expected = torch.autograd.grad(
        _steps(lambda h: F.conv2d(h, weight, padding=1), x0, extra), weight
    )
    sequence = WinogradSequence(weight, None)
    loss = _steps(sequence, x0, extra)
    torch.autograd.grad(loss, x0, retain_graph=True)
    assert not sequence.tape.kept
    torch.testing.assert_close(torch.autograd.grad(loss, weight), expected, rtol=1e-10, atol=0)


def test_sequence_without_grad_keeps_no_tape():
    weight = torch.randn(2, 2, 3, 3, requires_grad=True)
    with torch.no_grad():
        sequence = WinogradSequence(weight, None)
        y = sequence(torch.randn(1, 2, 4, 4))
    assert sequence.tape is None and not y.requires_grad


def test_bad_shapes_are_refused():
    for shape in [(4, 3, 7, 7), (4, 3, 3, 5), (4, 3, 3)]:
        with pytest.raises(ValueError, match=r"\(C_out, C_in, r, r\) with r 3 or 5"):
            transform_weight(torch.zeros(shape))
    v = transform_weight(torch.zeros(4, 3, 3, 3))
    with pytest.raises(ValueError, match="x .* and v"):
        winograd_conv(torch.zeros(1, 2, 8, 8), v, 3)
    with pytest.raises(ValueError, match="3x3 or 5x5 filters, not 7x7"):
        winograd_conv(torch.zeros(1, 3, 8, 8), v, 7)
    with pytest.raises(ValueError, match="x .* and v"):
        WinogradSequence(torch.zeros(4, 3, 3, 3), None)(torch.zeros(1, 2, 8, 8))


class ConvolutionCount(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.kernels: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default:
            self.kernels.append(args[1].shape[-1])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("cell", ["convlstm", "peephole_convlstm", "convgru", "convrnn"])
@pytest.mark.parametrize("kernel_size, direct", [(3, {1}), (5, {1}), (7, {1, 7})])
def test_the_cpu_fast_path_runs_3x3_and_5x5_cell_convolutions_by_winograd(
    cell, kernel_size, direct
):
    """Only the 1x1 output convolution stays direct with 3x3 and 5x5 cells; 7x7 ones stay
    direct."""
    options = SpeedOptions.for_path("fast", torch.device("cpu"))
    assert options.winograd and not SpeedOptions.for_path("fast", torch.device("cuda")).winograd
    config = ModelConfig(hidden_channels=(6, 5), kernel_size=kernel_size, patch_size=2, cell=cell)
    model = apply_speed(build_model(config), options)
    with ConvolutionCount() as count:
        model(torch.rand(2, 4, 1, 8, 8), 3).sum().backward()
    assert set(count.kernels) == direct


@CONVLSTM_CASES
def test_model_with_winograd_equals_eager_in_float64(overrides, hoist):
    options = SpeedOptions(hoist=hoist, winograd=True)
    assert_fast_equals_eager(convlstm_config(overrides), options, rtol=1e-11, grad_rtol=1e-9)


@pytest.mark.parametrize(
    "overrides, hoist, checkpointing",
    [
        (dict(cell="convgru"), True, False),
        (dict(cell="convgru"), False, False),
        (dict(cell="convgru", kernel_size=5), True, True),
        (
            dict(cell="convgru", architecture="encoder_forecaster", hidden_channels=(4, 6)),
            True,
            False,
        ),
        (dict(cell="convrnn"), True, False),
        (dict(cell="convrnn", kernel_size=5), False, True),
    ],
    ids=["gru", "gru-per-step", "gru-5x5-checkpointed", "gru-encoder-forecaster", "rnn", "rnn-5x5"],
)
def test_gru_and_rnn_cells_with_winograd_equal_eager_in_float64(overrides, hoist, checkpointing):
    options = SpeedOptions(hoist=hoist, winograd=True, checkpointing=checkpointing)
    assert_fast_equals_eager(convlstm_config(overrides), options, rtol=1e-11, grad_rtol=1e-9)


@pytest.mark.parametrize("hoist", [True, False])
def test_model_with_5x5_winograd_equals_eager_in_float64(hoist):
    config = convlstm_config(dict(kernel_size=5))
    options = SpeedOptions(hoist=hoist, winograd=True)
    assert_fast_equals_eager(config, options, rtol=1e-11, grad_rtol=1e-9)


@pytest.mark.parametrize("k", [3, 5])
def test_model_with_winograd_on_a_grid_not_a_multiple_of_the_tile(k, transforms):
    config = ModelConfig(hidden_channels=(5,), kernel_size=k, patch_size=2)  # 5x7 grid
    eager, fast = _pair(config, SpeedOptions(hoist=True, winograd=True))
    frames = torch.rand(2, 6, 1, 10, 14, dtype=torch.float64)
    outs = []
    for model in (eager, fast):
        out = model(frames[:, :3], 3)
        out.square().mean().backward()
        outs.append(out)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-11, atol=1e-12)
    for p_e, p_f in zip(eager.parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(p_f.grad, p_e.grad, rtol=1e-9, atol=1e-12)


def test_winograd_inference_equals_eager_without_grad():
    config = ModelConfig(hidden_channels=(6,), kernel_size=3, patch_size=2)
    eager, fast = _pair(config, SpeedOptions(hoist=True, winograd=True))
    frames = torch.rand(2, 4, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fast(frames, 3), eager(frames, 3), rtol=1e-11, atol=1e-12)


def test_autocast_keeps_the_direct_convolution():
    """bf16 Winograd transforms lose too much: under autocast the gates stay direct."""
    config = ModelConfig(hidden_channels=(6,), kernel_size=3, patch_size=2)
    model = apply_speed(build_model(config), SpeedOptions(hoist=True, winograd=True))
    with ConvolutionCount() as count, torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.rand(2, 4, 1, 8, 8), 3)
    assert 3 in count.kernels and torch.isfinite(out).all()


def test_the_model_makes_the_filter_gradient_once_per_sequence_unless_checkpointing():
    config = ModelConfig(hidden_channels=(6,), kernel_size=3, patch_size=2)
    for checkpointing in (False, True):
        options = SpeedOptions(winograd=True, checkpointing=checkpointing)
        cell = apply_speed(build_model(config), options).layers[0].cell
        with sequence_scope([cell]):
            assert (cell.sequence_conv.tape is None) == checkpointing


def test_matrices_made_in_inference_mode_still_serve_training():
    _matrices.cache_clear()
    with torch.inference_mode():
        winograd_conv(torch.rand(1, 2, 4, 4), transform_weight(torch.rand(3, 2, 3, 3)), 3)
    weight = torch.rand(3, 2, 3, 3, requires_grad=True)
    winograd_conv(torch.rand(1, 2, 4, 4), transform_weight(weight), 3).sum().backward()
    assert weight.grad is not None


def test_second_order_gradients_are_refused():
    weight = torch.randn(2, 2, 3, 3, requires_grad=True)
    loss = WinogradSequence(weight, None)(torch.randn(1, 2, 4, 4)).square().sum()
    with pytest.raises(RuntimeError, match="create_graph"):
        torch.autograd.grad(loss, weight, create_graph=True)


def test_winograd_is_for_the_cpu():
    with pytest.raises(ConfigError, match="winograd is for the CPU"):
        SpeedOptions(winograd=True).check(torch.device("cuda"))
    SpeedOptions(winograd=True).check(torch.device("cpu"))


def test_a_model_made_in_inference_mode_steps_directly(monkeypatch):
    """Inference tensors have no version counter to tell when they change: no kept
    transform, the direct convolution (which used to crash on reading the counter)."""
    kept = []
    keep = winograd.kept_transform
    monkeypatch.setattr(winograd, "kept_transform", lambda w: kept.append(w) or keep(w))
    config = ModelConfig(hidden_channels=(6,), kernel_size=3, patch_size=1)
    frame = torch.rand(2, 1, 12, 12)  # 9 tiles per frame
    torch.manual_seed(0)
    reference = build_model(config)
    with torch.inference_mode():
        model = apply_speed(build_model(config), SpeedOptions(hoist=True, winograd=True))
        model.load_state_dict(reference.state_dict())
        got = model.step(frame, None).prediction
    assert kept == []
    with torch.no_grad():
        expected = reference.step(frame, None).prediction
        apply_speed(reference, SpeedOptions(hoist=True, winograd=True)).step(frame, None)
    assert len(kept) == 1  # the same step outside inference mode: Winograd, kept
    torch.testing.assert_close(got, expected)


def test_winograd_and_batched_weight_gradients_are_refused_together():
    with pytest.raises(ConfigError, match="batched_wgrad and winograd"):
        SpeedOptions(batched_wgrad=True, winograd=True)


def _changes(layer: torch.nn.Conv2d):
    """Ways a model's weights change in place: each must be seen by kept_transform."""

    def optimizer_step():
        layer.weight.grad = torch.ones_like(layer.weight)
        torch.optim.SGD([layer.weight], lr=0.1).step()

    def load_state_dict():
        new = {"weight": torch.randn_like(layer.weight), "bias": torch.zeros_like(layer.bias)}
        layer.load_state_dict(new)

    def in_place_without_grad():
        with torch.no_grad():
            layer.weight.mul_(2)

    return [
        optimizer_step,
        load_state_dict,
        in_place_without_grad,
        lambda: torch.nn.init.normal_(layer.weight),
        lambda: layer.double(),  # new storage and dtype for the same Parameter
    ]


def test_the_kept_transform_is_made_once_and_again_after_each_change():
    layer = torch.nn.Conv2d(4, 8, 5)
    kept = winograd.kept_transform(layer.weight)
    assert winograd.kept_transform(layer.weight) is kept and not kept.requires_grad
    torch.testing.assert_close(kept, transform_weight(layer.weight).detach())
    for change in _changes(layer):
        change()
        new = winograd.kept_transform(layer.weight)
        assert new is not kept
        torch.testing.assert_close(new, transform_weight(layer.weight).detach())
        kept = new


def test_the_kept_transform_does_not_keep_its_weight_alive():
    weight = torch.nn.Parameter(torch.randn(8, 4, 3, 3))
    winograd.kept_transform(weight)
    gone = weakref.ref(weight)
    del weight
    gc.collect()
    assert gone() is None


@pytest.mark.parametrize("cell, convs", [("convlstm", 1), ("convgru", 2), ("convrnn", 1)])
def test_stepping_without_grad_transforms_once_and_follows_new_weights(cell, convs, monkeypatch):
    """model.step one frame at a time (streaming) runs Winograd from one kept transform per
    convolution, equal to eager, and a state dict loaded in place between steps is used at
    once."""
    made = []
    transform = winograd.transform_weight
    monkeypatch.setattr(winograd, "transform_weight", lambda w: made.append(w) or transform(w))
    config = ModelConfig(hidden_channels=(6, 5), kernel_size=5, patch_size=2, cell=cell)
    eager, fast = _pair(config, SpeedOptions(hoist=True, winograd=True))
    frames = torch.rand(4, 2, 1, 16, 16, dtype=torch.float64)  # 2 x 4 tiles per step
    torch.manual_seed(1)
    new_weights = build_model(config).double().state_dict()
    with torch.no_grad():
        state_e = state_f = None
        for k, frame in enumerate(frames):
            if k == 2:
                eager.load_state_dict(new_weights)
                fast.load_state_dict(new_weights)
            state_e, state_f = eager.step(frame, state_e), fast.step(frame, state_f)
            torch.testing.assert_close(
                state_f.prediction, state_e.prediction, rtol=1e-11, atol=1e-12
            )
    assert len(made) == 2 * 2 * convs  # two cells, before and after the new weights


@pytest.mark.parametrize("batch, grid, direct", [(1, 8, {1, 3}), (2, 8, {1}), (1, 9, {1})])
def test_a_step_of_fewer_than_8_tiles_runs_the_direct_convolution(batch, grid, direct):
    """Without grad, one step at a time: a batch of 1 on an 8x8 grid (4 tiles) is faster
    directly; 2 such frames, or a 9x9 grid (9 tiles), run by Winograd."""
    config = ModelConfig(hidden_channels=(6,), kernel_size=3, patch_size=1)
    model = apply_speed(build_model(config), SpeedOptions(hoist=True, winograd=True))
    with torch.no_grad(), ConvolutionCount() as count:
        model.step(torch.rand(batch, 1, grid, grid), None)
    assert set(count.kernels) == direct


def test_stepping_with_grad_trains_the_weights():
    config = ModelConfig(hidden_channels=(6,), kernel_size=3, patch_size=2)
    eager, fast = _pair(config, SpeedOptions(hoist=True, winograd=True))
    frame = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    for model in (eager, fast):
        with torch.no_grad():
            model.step(frame, None)  # a kept transform exists, and must not be used below
        model.step(frame, model.step(frame, None)).prediction.square().sum().backward()
    for p_e, p_f in zip(eager.parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(p_f.grad, p_e.grad, rtol=1e-9, atol=1e-12)


def _counting_transforms(monkeypatch) -> list:
    made = []
    transform = winograd.transform_weight
    monkeypatch.setattr(
        winograd, "transform_weight", lambda w: made.append(tuple(w.shape)) or transform(w)
    )
    return made


@pytest.mark.parametrize("whole", [True, False], ids=["parts-and-whole", "parts-only"])
@pytest.mark.parametrize("batch_grad", [True, False], ids=["folded", "autograd"])
def test_channel_ranges_of_one_shared_transform_equal_the_direct_convolution(
    whole, batch_grad, monkeypatch
):
    """ConvLSTM's W_x * x + W_h * h (two ranges of W's input channels) and W * [x, h] from one
    transform: outputs and every gradient as F.conv2d's in float64, the range totals put
    together once."""
    made = _counting_transforms(monkeypatch)
    torch.manual_seed(0)
    weight = torch.randn(4, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    xs = torch.randn(3, 2, 2, 6, 7, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 3, 6, 7, dtype=torch.float64, requires_grad=True)
    params = (weight, bias, xs, h0)

    def run(conv_x, conv_h, conv_all):
        h, loss = h0, 0
        for x in xs.unbind(0):
            if conv_all is None:
                z = conv_x(x) + conv_h(h)
            else:  # alternate the split and whole forms, as context and forecast steps do
                z = conv_x(x) + conv_h(h) + conv_all(torch.cat([x, h], 1))
            h = torch.tanh(z[:, :3])
            loss = loss + h.square().sum()
        return loss

    w_x, w_h = weight[:, :2], weight[:, 2:]
    expected_loss = run(
        lambda x: F.conv2d(x, w_x, bias, padding=1),
        lambda h: F.conv2d(h, w_h, padding=1),
        (lambda xh: F.conv2d(xh, weight, bias, padding=1)) if whole else None,
    )
    expected = torch.autograd.grad(expected_loss, params)
    with winograd.shared_transforms():
        convs = [
            WinogradSequence(weight, bias, batch_grad, channels=(0, 2)),
            WinogradSequence(weight, None, batch_grad, channels=(2, 5)),
            WinogradSequence(weight, bias, batch_grad) if whole else None,
        ]
    assert made == [(4, 5, 3, 3)]  # one transform for all
    assert convs[0].v.shape == (36, 2, 4) and convs[1].v.shape == (36, 3, 4)
    assert (convs[0].tape is convs[1].tape) and ((convs[0].tape is None) != batch_grad)
    loss = run(*convs)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-12, atol=0)
    for g, e in zip(torch.autograd.grad(loss, params), expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    if batch_grad:
        assert not convs[0].tape.kept  # the totals were handed over and let go


def test_a_shared_transform_is_not_handed_across_grad_modes_or_weight_changes(monkeypatch):
    made = _counting_transforms(monkeypatch)
    weight = torch.randn(2, 2, 3, 3, requires_grad=True)
    x = torch.randn(1, 2, 4, 4)
    with winograd.shared_transforms():
        with torch.no_grad():
            first = WinogradSequence(weight, None)
        second = WinogradSequence(weight, None)  # with grad: not the no-grad transform
        with winograd.shared_transforms():  # nested: the same scope
            assert WinogradSequence(weight, None).v is second.v
        assert WinogradSequence(weight, None).v is second.v
        with torch.no_grad():
            weight.mul_(2)  # an optimizer step
        third = WinogradSequence(weight, None)
    outside = WinogradSequence(weight, None)
    assert len(made) == 4 and not first.v.requires_grad and second.tape is not None
    torch.testing.assert_close(third(x), F.conv2d(x, weight, padding=1), rtol=1e-5, atol=1e-5)
    assert outside.v is not third.v


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_training_step_transforms_each_filter_once(checkpointing, monkeypatch):
    """Encoding (the hoisted W_x and W_h) and forecasting (W) share one transform per filter in
    a TrainStep and a model call; encode and forecast called apart make one each."""
    from convlstm.training import TrainStep

    made = _counting_transforms(monkeypatch)
    config = ModelConfig(hidden_channels=(6, 5), kernel_size=5, patch_size=2)
    options = SpeedOptions(hoist=True, winograd=True, checkpointing=checkpointing)
    model = apply_speed(build_model(config), options)
    frames = torch.rand(2, 8, 1, 8, 8)
    cfg = TrainConfig(context_frames=4, horizon=4, loss_on_context=True, wandb="disabled")
    optimizer = torch.optim.Adam(model.parameters())
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    step = TrainStep(model, cfg, optimizer, scaler, options, torch.device("cpu"), None, True)
    step(frames, None)
    assert len(made) == 2  # one per layer
    model(frames[:, :4], 4).sum().backward()
    assert len(made) == 4
    model.forecast(model.encode(frames[:, :4]), 4).sum().backward()
    assert len(made) == 8


def test_channel_ranges_must_be_a_range_of_the_input_channels():
    weight = torch.zeros(4, 5, 3, 3)
    for channels in [(3, 3), (-1, 2), (0, 6), (4, 2)]:
        with pytest.raises(ValueError, match=r"are not a range of 0\.\.5"):
            WinogradSequence(weight, None, channels=channels)


def test_a_filter_tape_folds_each_range_in_turn_and_hands_the_sum_over_once(monkeypatch):
    tape = winograd.FilterTape()
    u, dm = torch.ones(2, 3, 1), torch.ones(2, 3, 2)  # u^T dm: (2, 1, 2) of 3s
    tape.keep(None, u, dm, (0, 1))  # nothing needs the filter
    assert not tape.kept
    monkeypatch.setattr(torch._C, "_will_engine_execute_node", lambda node: True)
    head = object()  # stands for the filter's node, which this backward reaches
    tape.keep(head, u.requires_grad_(), dm, (1, 2))
    tape.keep(head, u, 2 * dm, (1, 2))
    tape.keep(head, u, dm, (0, 1))
    assert not tape.totals[(1, 2)].requires_grad  # detached: no path back to the steps
    (total,) = tape.finish(tape, torch.zeros(2, 3, 2))
    assert total[:, 0].eq(3).all() and total[:, 1].eq(9).all() and total[:, 2].eq(0).all()
    assert not tape.kept


@pytest.mark.parametrize("batch_grad", [True, False], ids=["folded", "autograd"])
def test_a_scope_may_span_several_backwards(batch_grad):
    """Gradient accumulation inside one scope: a transform a backward went through (its graph
    freed) is made again, not handed out."""
    torch.manual_seed(0)
    weight = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 2, 5, 6, dtype=torch.float64)
    expected = torch.autograd.grad(F.conv2d(x, weight, padding=1).square().sum(), weight)[0]
    with winograd.shared_transforms():
        first = WinogradSequence(weight, None, batch_grad)
        assert WinogradSequence(weight, None, batch_grad).v is first.v  # shared until then
        first(x).square().sum().backward()
        second = WinogradSequence(weight, None, batch_grad)
        assert second.v is not first.v
        second(x).square().sum().backward()
    torch.testing.assert_close(weight.grad, 2 * expected, rtol=1e-12, atol=1e-12)


def test_a_bias_of_the_wrong_size_is_refused(transforms):
    v = transform_weight(torch.zeros(4, 3, 3, 3))
    with pytest.raises(ValueError, match=r"a bias of 4 values, got \(1,\)"):
        winograd_conv(torch.zeros(1, 3, 8, 8), v, 3, torch.zeros(1))
