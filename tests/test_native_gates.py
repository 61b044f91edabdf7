"""The CPU fast path's gate update (convlstm.gates.native_lstm_update): eager forward with the
activations saved, the backward as one C pass; equal to lstm_update, number for number in
float64."""

import pytest
import torch

from convlstm import gates, native
from convlstm.cells.lstm import lstm_update
from convlstm.errors import ConfigError
from convlstm.gates import native_lstm_update
from convlstm.speed import SpeedOptions
from tests.test_speed import CONVLSTM_CASES, assert_fast_equals_eager, convlstm_config


@pytest.fixture
def update():
    if native.load("gates") is None:
        pytest.skip("no C compiler here: the C gate kernel can't be built")
    return native_lstm_update()


def _outputs_and_grads(fn, z, c, more):
    h, c_new = fn(z, c, more)
    weights = torch.linspace(-1, 1, h.numel(), dtype=h.dtype).view_as(h)
    loss = (h * weights).sum() + (c_new**2).sum()
    inputs = [t for t in (z, c, more) if t is not None]
    return (h, c_new), torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-13), (torch.float32, 1e-6)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("with_more", [False, True])
@pytest.mark.parametrize(
    "shape", [(2, 3, 3, 5), (3, 24, 16, 17)], ids=["small", "threaded"]
)  # (B, C, H, W) of c; the second is over 2^16 gate elements: split between threads
def test_equals_the_eager_update(update, dtype, tol, channels_last, with_more, shape):
    torch.manual_seed(0)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    b, ch, h, w = shape
    z = torch.randn(b, 4 * ch, h, w, dtype=dtype).contiguous(memory_format=layout)
    c = torch.randn(shape, dtype=dtype)  # the other layout when z is channels-last
    more = torch.randn(b, 4 * ch, h, w, dtype=dtype) if with_more else None
    leaves = [t.requires_grad_() for t in (z, c, more) if t is not None]
    got = _outputs_and_grads(update, z, c, more)
    expected = _outputs_and_grads(lstm_update, z, c, more)
    assert got[1][0].is_contiguous(memory_format=layout)  # dz in z's layout
    assert len(leaves) == len(got[1])
    for a, b in zip([*got[0], *got[1]], [*expected[0], *expected[1]], strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("with_more", [False, True])
def test_bf16_preactivations_with_a_float32_memory(update, channels_last, with_more):
    """Autocast's case: z (and z_more) bf16 from the convolution, c float32. The C pass
    computes in float32 (as fused_lstm_update does), h' and c' come out float32, dz in bf16
    rounded to nearest from the float32 value, dc float32; checked against float64."""
    torch.manual_seed(1)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    b, ch, h, w = 3, 24, 16, 17  # over 2^16 gate elements: threaded
    z = (2 * torch.randn(b, 4 * ch, h, w)).bfloat16().contiguous(memory_format=layout)
    more = (2 * torch.randn(b, 4 * ch, h, w)).bfloat16() if with_more else None
    c = torch.randn(b, ch, h, w)
    inputs = [t.requires_grad_() for t in (z, c, more) if t is not None]
    got = _outputs_and_grads(update, z, c, more)
    assert "NativeUpdate" in type(got[0][0].grad_fn).__name__
    assert [t.dtype for t in (*got[0], *got[1])] == [torch.float32] * 2 + [t.dtype for t in inputs]
    assert got[1][0].is_contiguous(memory_format=layout)
    wide = [t.detach().double().requires_grad_() for t in inputs]
    expected = _outputs_and_grads(lstm_update, *wide, *([None] if more is None else []))
    for a, e in zip(got[0], expected[0], strict=True):
        torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-6)
    for a, e in zip(got[1], expected[1], strict=True):
        rounded = e.to(a.dtype)  # float64 -> bf16 (or float32): the nearest value
        if a.dtype == torch.bfloat16:  # float32 arithmetic moves a few across a rounding edge
            assert (a == rounded).double().mean() > 0.99
            torch.testing.assert_close(a, rounded, rtol=2**-7, atol=1e-6)
        else:
            torch.testing.assert_close(a, rounded, rtol=1e-5, atol=1e-6)


def test_the_bf16_gradient_keeps_nans_and_rounds_to_nearest_even(update):
    # c' = f c + i g; dc_total = dc' (dh = 0), so dz_f = dc' c f (1 - f): with z_f = 0
    # (f = 1/2) and c = 4, dz_f = dc'
    values = [1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 1 + 2**-8 + 2**-20, 1e-40]
    values += [float("inf"), -float("inf")]
    ch = len(values) + 1
    dc_new = torch.tensor([*values, 0.0])
    # a NaN whose payload is all ones: adding the rounding bias to it would carry into the
    # sign bit (-0.0) if the store did not treat NaNs apart
    dc_new[-1:].view(torch.int32)[0] = 0x7FFFFFFF
    z = torch.zeros(1, 4 * ch, 1, 1).bfloat16().requires_grad_()
    h, c_new = update(z, torch.full((1, ch, 1, 1), 4.0))
    (dz,) = torch.autograd.grad(c_new, z, dc_new.view(1, ch, 1, 1))
    got = dz[0, ch : 2 * ch, 0, 0]
    expected = dc_new.bfloat16()  # PyTorch's rounding: to nearest, ties to even
    assert got[:4].tolist() == [1.0, 1 + 2**-6, -1.0, 1 + 2**-7]
    assert got[:-1].tolist() == expected[:-1].tolist()  # the subnormal and infinities too
    assert got[-1].isnan()


def test_passes_gradcheck(update):
    gen = torch.Generator().manual_seed(3)
    z, more = (torch.randn(2, 8, 3, 3, dtype=torch.float64, generator=gen) for _ in range(2))
    c = torch.randn(2, 2, 3, 3, dtype=torch.float64, generator=gen)
    args = tuple(t.requires_grad_() for t in (z, c, more))
    assert torch.autograd.gradcheck(update, args)


def test_other_dtypes_and_devices_run_the_eager_update(update):
    z = torch.randn(2, 8, 3, 3).bfloat16().requires_grad_()
    h, _ = update(z, torch.randn(2, 2, 3, 3).bfloat16())
    assert "NativeUpdate" not in type(h.grad_fn).__name__
    z32 = torch.randn(2, 8, 3, 3, requires_grad=True)
    h, _ = update(z32, torch.randn(2, 2, 3, 3))
    assert "NativeUpdate" in type(h.grad_fn).__name__
    h, _ = update(z32, torch.randn(2, 2, 3, 3, dtype=torch.float64))  # mixed: eager
    assert "NativeUpdate" not in type(h.grad_fn).__name__
    h, _ = update(z, torch.randn(2, 2, 3, 3))  # autocast's bf16 z, float32 c: the C pass
    assert "NativeUpdate" in type(h.grad_fn).__name__


@pytest.mark.parametrize("bf16", [False, True])
def test_without_grad_the_c_pass_runs_and_keeps_no_graph(update, monkeypatch, bf16):
    """Streaming and evaluation run the one C pass too (faster than the eager update's
    kernels, measured), without an autograd node; nothing is recorded for a backward."""
    from convlstm import gates

    calls = []
    native_forward = gates._native_forward
    monkeypatch.setattr(
        gates, "_native_forward", lambda *args: calls.append(1) or native_forward(*args)
    )
    monkeypatch.setattr(gates, "lstm_update", None)  # the eager update must not run

    def no_node(*args):
        raise AssertionError("an autograd node made without grad")

    monkeypatch.setattr(gates._NativeUpdate, "apply", no_node)
    z, c = torch.randn(2, 8, 3, 3), torch.randn(2, 2, 3, 3)
    if bf16:  # autocast's pre-activations: float32 arithmetic, as in training
        z = z.to(torch.bfloat16)
    with torch.no_grad():
        got = update(z, c)
    assert calls == [1] and all(t.grad_fn is None and t.dtype == c.dtype for t in got)
    for g, e in zip(got, lstm_update(z.float(), c), strict=True):
        torch.testing.assert_close(g, e)


def test_without_grad_a_broadcast_memory_keeps_float32_arithmetic_under_bf16(update):
    z = torch.randn(2, 8, 3, 3).to(torch.bfloat16)
    c = torch.randn(1, 2, 3, 3)  # broadcast: the eager update, with z taken to float32
    with torch.no_grad():
        got = update(z, c)
    for g, e in zip(got, lstm_update(z.float(), c), strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("c_shape", [(1, 2, 3, 3), (2, 1, 3, 3), (4, 2, 3, 3)])
def test_a_broadcast_memory_runs_the_eager_update(update, c_shape):
    z = torch.randn(2, 8, 3, 3, dtype=torch.float64, requires_grad=True)
    c = torch.randn(c_shape, dtype=torch.float64, requires_grad=True)
    try:
        expected = _outputs_and_grads(lstm_update, z, c, None)
    except RuntimeError:  # not broadcastable: the same error as the eager update
        with pytest.raises(RuntimeError):
            update(z, c)
        return
    got = _outputs_and_grads(update, z, c, None)
    for a, b in zip([*got[0], *got[1]], [*expected[0], *expected[1]], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)


def test_refuses_double_backward(update):
    z = torch.randn(2, 8, 3, 3, requires_grad=True)
    h, _ = update(z, torch.randn(2, 2, 3, 3))
    (grad,) = torch.autograd.grad(h.sum(), z, create_graph=True)
    with pytest.raises(RuntimeError, match="grad"):
        grad.sum().backward()


@CONVLSTM_CASES
def test_the_cpu_fast_path_equals_eager_in_float64(update, overrides, hoist):
    options = SpeedOptions.for_path("fast", torch.device("cpu"))
    assert options.native_gates and options.winograd
    options = SpeedOptions(hoist=hoist, winograd=True, native_gates=True)
    assert_fast_equals_eager(convlstm_config(overrides), options, rtol=1e-11, grad_rtol=1e-9)


def test_native_gates_are_for_the_cpu_alone():
    with pytest.raises(ConfigError, match="one or the other"):
        SpeedOptions(native_gates=True, fused_gates=True)
    with pytest.raises(ConfigError, match="native_gates is for the CPU"):
        SpeedOptions(native_gates=True).check(torch.device("cuda"))
    assert not SpeedOptions.for_path("fast", torch.device("cuda")).native_gates


def _c_activations(z: torch.Tensor) -> torch.Tensor:
    """gates.c's forward of z (4 gates of ch values each: i, f, g, o) with c = 0: the gate
    activations, (4, ch)."""
    forward, _ = gates._native_kernels(gates._NATIVE_DTYPES[z.dtype, z.dtype])
    ch = z.numel() // 4
    z = z.reshape(1, 4 * ch, 1, 1).contiguous()
    c = torch.zeros(1, ch, 1, 1, dtype=z.dtype)
    act = torch.empty_like(z)
    c_new, t, h = (torch.empty_like(c) for _ in range(3))
    z_ptr, *rest = (x.data_ptr() for x in (z, c, act, c_new, t, h))
    forward(z_ptr, None, *rest, 1, ch, 1, 0)  # None: no z_more
    return act.view(4, ch)


@pytest.mark.parametrize("dtype, limit", [(torch.float32, 80.0), (torch.float64, 700.0)])
def test_the_c_sigmoid_and_tanh_are_within_a_few_units_in_the_last_place(update, dtype, limit):
    """Measured: at most 1.2 (sigmoid) and 1.8 (tanh) eps in float32, 1.9 and 2.0 in float64,
    relative to PyTorch's float64 ones, over +-limit and densely near 0."""
    x = torch.cat([torch.linspace(-limit, limit, 40_000), torch.linspace(-1, 1, 40_000)])
    x = x.double().to(dtype)
    act = _c_activations(x.repeat(4)).double()
    eps = torch.finfo(dtype).eps
    for k, fn in enumerate((torch.sigmoid, torch.sigmoid, torch.tanh, torch.sigmoid)):
        expected = fn(x.double())
        error = ((act[k] - expected).abs() / expected.abs().clamp_min(1e-300)).max() / eps
        assert error < 3, (k, error.item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_c_activations_saturate_and_keep_nans(update, dtype):
    act = _c_activations(torch.tensor([-1e4, 1e4, float("nan")], dtype=dtype).repeat(4))
    tiny = torch.finfo(dtype).tiny * 2  # sigmoid(-1e4): e^x is clamped at the smallest normal
    assert (act[[0, 1, 3], 0] < tiny).all() and act[2, 0].item() == -1.0
    assert act[:, 1].tolist() == [1.0, 1.0, 1.0, 1.0]
    assert act[:, 2].isnan().all()


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("with_more", [False, True], ids=["z", "z+z_more"])
def test_low_precision_h_writes_h_rounded_and_reads_its_gradient_in_bf16(
    update, channels_last, with_more
):
    """gates.c's bf16h pair: h' the float32 h' rounded to nearest even, and given the same
    dh every gradient equal to the float32-h pair's; without grad, h' stays float32."""
    torch.manual_seed(0)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    z = torch.randn(2, 32, 5, 5).bfloat16().contiguous(memory_format=layout)
    c = torch.randn(2, 8, 5, 5).contiguous(memory_format=layout)
    more = torch.randn(2, 32, 5, 5).bfloat16().contiguous(memory_format=layout)
    inputs = (z, c, more) if with_more else (z, c)
    dh, dc = torch.randn(2, 8, 5, 5).bfloat16(), torch.randn(2, 8, 5, 5)
    results = {}
    for low in (False, True):
        leaves = [t.clone().requires_grad_() for t in inputs]
        h, c_new = gates.native_lstm_update(low_precision_h=low)(*leaves)
        torch.autograd.backward((h, c_new), (dh.to(h.dtype), dc))
        results[low] = (h, c_new, [t.grad for t in leaves])
    (h32, c32, grads32), (h16, c16, grads16) = results[False], results[True]
    assert h16.dtype == torch.bfloat16 and h16.is_contiguous(memory_format=layout)
    assert torch.equal(h16, h32.bfloat16()) and torch.equal(c16, c32)
    for g16, g32 in zip(grads16, grads32, strict=True):
        assert g16.dtype == g32.dtype and torch.equal(g16, g32)
    with torch.no_grad():
        assert gates.native_lstm_update(low_precision_h=True)(z, c)[0].dtype == torch.float32
