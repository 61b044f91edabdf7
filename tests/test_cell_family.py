"""Every cell in `convlstm.cells` against an independent float64 NumPy re-computation of its
published equations (tests/reference_cells.py), gradchecks, the peephole parameters, the warp,
and the argument checks."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from convlstm.cells import (
    CELLS,
    ConvGRUCell,
    ConvLSTMCell,
    ConvRNNCell,
    PeepholeConvLSTMCell,
    SAConvLSTMCell,
    TrajGRUCell,
    make_cell,
    warp,
)
from convlstm.errors import ConfigError, ShapeError
from tests import reference as ref
from tests import reference_cells as rc

B, H, W = 2, 5, 6
TOL = {"rtol": 1e-10, "atol": 1e-10}


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().double().numpy()


def _groups(kind: str, gates: int, channels: int) -> int:
    """How many GroupNorm groups the gate normalisation uses (from the cell's docs)."""
    return gates * (1 if kind == "layer" else math.gcd(channels, 8))


def _norm(module: torch.nn.Module, kind: str, gates: int, channels: int) -> rc.Norm:
    """The (groups, weight, bias) of a GateNorm for the reference; None without a norm."""
    if kind == "none":
        return None
    gn = module.norm
    return (_groups(kind, gates, channels), _np(gn.weight), _np(gn.bias))


def _randomise(cell: torch.nn.Module, std: float = 0.5) -> None:
    with torch.no_grad():
        for p in cell.parameters():
            p.normal_(0.0, std)


# --------------------------------------------------------------------------------------------
# the cases: a builder and the reference step for each cell


@dataclass
class Case:
    name: str
    kind: str  # convlstm, convgru, trajgru, convrnn, sa_convlstm
    in_channels: int
    hidden: int = 6
    norm: str = "none"
    kwargs: dict = field(default_factory=dict)
    cls: type | None = None

    def build(self, *, in_channels: int | None = None, hidden: int | None = None, **extra):
        cls = self.cls or CELLS[self.kind]
        kwargs = {"norm": self.norm, **self.kwargs, **extra}
        return cls(
            in_channels=self.in_channels if in_channels is None else in_channels,
            hidden_channels=self.hidden if hidden is None else hidden,
            kernel_size=3,
            **kwargs,
        )

    def __str__(self) -> str:
        return self.name


CASES = [
    Case("convlstm", "convlstm", 3),
    Case("convlstm-noinput", "convlstm", 0),
    Case("convlstm-layer", "convlstm", 3, norm="layer"),
    Case("convlstm-group", "convlstm", 3, norm="group"),
    Case("convlstm-group-noinput", "convlstm", 0, norm="group"),
    Case("peephole-channel", "convlstm", 3, kwargs={"peephole": "channel"}),
    Case("peephole-channel-noinput", "convlstm", 0, kwargs={"peephole": "channel"}),
    Case(
        "peephole-position",
        "convlstm",
        3,
        kwargs={"peephole": "position", "grid_size": (H, W)},
    ),
    Case(
        "peephole-position-noinput",
        "convlstm",
        0,
        kwargs={"peephole": "position", "grid_size": (H, W)},
    ),
    Case("peephole-channel-layer", "convlstm", 3, norm="layer", kwargs={"peephole": "channel"}),
    Case("peephole-cell-default", "peephole_convlstm", 2, cls=PeepholeConvLSTMCell),
    Case("convgru", "convgru", 3),
    Case("convgru-noinput", "convgru", 0),
    Case("convgru-layer", "convgru", 3, norm="layer"),
    Case("convgru-group", "convgru", 3, norm="group"),
    Case("convgru-group-noinput", "convgru", 0, norm="group"),
    Case("trajgru", "trajgru", 3, kwargs={"links": 3, "flow_channels": 8}),
    Case("trajgru-noinput", "trajgru", 0, kwargs={"links": 3, "flow_channels": 8}),
    Case("trajgru-defaults", "trajgru", 2, hidden=4),
    Case("trajgru-group", "trajgru", 3, norm="group", kwargs={"links": 2, "flow_channels": 8}),
    Case("convrnn", "convrnn", 3),
    Case("convrnn-noinput", "convrnn", 0),
    Case("convrnn-layer", "convrnn", 3, norm="layer"),
    Case("convrnn-group", "convrnn", 3, norm="group"),
    Case("sa_convlstm", "sa_convlstm", 3, kwargs={"key_channels": 4}),
    Case("sa_convlstm-noinput", "sa_convlstm", 0, kwargs={"key_channels": 4}),
    Case("sa_convlstm-layer", "sa_convlstm", 3, norm="layer", kwargs={"key_channels": 4}),
]


def _conv(module: torch.nn.Conv2d | None) -> tuple[np.ndarray | None, np.ndarray | None]:
    if module is None:
        return None, None
    return _np(module.weight), _np(module.bias)


def _lstm_reference(cell: ConvLSTMCell, case: Case, x, state):
    h, c = state
    weight, bias = _conv(cell.conv)
    peep = {}
    if cell.peephole != "none":
        peep = {name: _np(getattr(cell, name)) for name in ("w_ci", "w_cf", "w_co")}
    return rc.convlstm_cell_step(
        x,
        h,
        c,
        weight,
        bias,
        norm=_norm(cell.norm, case.norm, 4, case.hidden),
        cell_norm=_norm(cell.cell_norm, case.norm, 1, case.hidden),
        **peep,
    )


def _gru_norms(cell, case: Case) -> dict:
    return {
        "norm": _norm(cell.update.norm, case.norm, 2, case.hidden),
        "candidate_norm": _norm(cell.update.candidate_norm, case.norm, 1, case.hidden),
    }


def _trajgru_weights(cell: TrajGRUCell) -> dict:
    w_x, b_x = _conv(cell.conv_x)
    w_h, b_h = _conv(cell.conv_h)
    fx_w, fx_b = _conv(cell.flow_x)
    fh_w, fh_b = _conv(cell.flow_h)
    fo_w, fo_b = _conv(cell.flow_out)
    return {
        "w_x": w_x,
        "b_x": b_x,
        "w_h": w_h,
        "b_h": b_h,
        "flow_x_w": fx_w,
        "flow_x_b": fx_b,
        "flow_h_w": fh_w,
        "flow_h_b": fh_b,
        "flow_out_w": fo_w,
        "flow_out_b": fo_b,
    }


def _sam_weights(cell: SAConvLSTMCell) -> dict:
    mem = cell.memory
    names = ("query", "key_h", "value_h", "key_m", "value_m", "merge", "gates")
    return {name: _conv(getattr(mem, name)) for name in names}


def reference_step(cell, case: Case, x: np.ndarray | None, state: tuple[np.ndarray, ...]):
    """The reference's new state tuple for one step of `cell`."""
    if isinstance(cell, ConvLSTMCell):
        return _lstm_reference(cell, case, x, state)
    if isinstance(cell, TrajGRUCell):
        (h,) = state
        return (rc.trajgru_step(x, h, **_trajgru_weights(cell), **_gru_norms(cell, case)),)
    if isinstance(cell, ConvGRUCell):
        (h,) = state
        w_x, b_x = _conv(cell.conv_x)
        w_h, b_h = _conv(cell.conv_h)
        return (rc.convgru_step(x, h, w_x, b_x, w_h, b_h, **_gru_norms(cell, case)),)
    if isinstance(cell, ConvRNNCell):
        (h,) = state
        weight, bias = _conv(cell.conv)
        return (
            rc.convrnn_step(x, h, weight, bias, norm=_norm(cell.norm, case.norm, 1, case.hidden)),
        )
    if isinstance(cell, SAConvLSTMCell):
        h, c, m = state
        weight, bias = _conv(cell.lstm.conv)
        return rc.sa_convlstm_step(
            x,
            h,
            c,
            m,
            lstm_weight=weight,
            lstm_bias=bias,
            memory=_sam_weights(cell),
            norm=_norm(cell.lstm.norm, case.norm, 4, case.hidden),
            cell_norm=_norm(cell.lstm.cell_norm, case.norm, 1, case.hidden),
        )
    raise AssertionError(f"no reference for {type(cell).__name__}")


def _moderate_flows(cell: TrajGRUCell, x: torch.Tensor | None, h: torch.Tensor, scale: float):
    """Rescale the flow network's output layer so that the displacements are of order `scale`
    grid cells (random 5x5 weights over many channels give huge flows otherwise)."""
    with torch.no_grad():
        size = cell.flows(x, h).abs().mean()
        cell.flow_out.weight.mul_(scale / size)
        cell.flow_out.bias.mul_(scale / size)


def _inputs(case: Case, steps: int, batch: int, height: int, width: int, generator):
    xs = [
        torch.randn(
            batch, case.in_channels, height, width, dtype=torch.float64, generator=generator
        )
        if case.in_channels
        else None
        for _ in range(steps)
    ]
    cell_state_size = CELLS[case.kind].state_size
    state = tuple(
        torch.randn(batch, case.hidden, height, width, dtype=torch.float64, generator=generator)
        for _ in range(cell_state_size)
    )
    return xs, state


# --------------------------------------------------------------------------------------------
# every cell against the reference


@pytest.mark.parametrize("case", CASES, ids=str)
def test_cell_matches_float64_reference_over_three_steps(case):
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(2)
    cell = case.build().double()
    _randomise(cell)
    xs, state = _inputs(case, 3, B, H, W, gen)
    if isinstance(cell, TrajGRUCell):
        _moderate_flows(cell, xs[0], state[0], scale=1.0)
        flows = cell.flows(xs[0], state[0]).detach()
        xs_src = torch.arange(W, dtype=torch.float64) + flows[:, :, 0]
        ys_src = torch.arange(H, dtype=torch.float64).view(H, 1) + flows[:, :, 1]
        outside = (xs_src < 0) | (xs_src > W - 1) | (ys_src < 0) | (ys_src > H - 1)
        assert outside.any() and not outside.all()  # some samples read the zero padding
        assert 0.3 < flows.abs().mean() < 3.0
    ref_state = tuple(_np(s) for s in state)
    for x in xs:
        h, state = cell(x, state)
        ref_state = reference_step(cell, case, _np(x), ref_state)
        assert len(state) == len(ref_state) == cell.state_size
        assert h is state[0]
        for got, want in zip(state, ref_state, strict=True):
            assert got.shape == (B, case.hidden, H, W)
            np.testing.assert_allclose(_np(got), want, **TOL)
    # the randomised state must have moved away from anything trivial
    assert np.abs(ref_state[0]).max() > 1e-3


def test_general_lstm_reference_reduces_to_the_plain_one():
    rng = np.random.default_rng(0)
    x, h, c = (
        rng.normal(size=(2, 3, 5, 6)),
        rng.normal(size=(2, 4, 5, 6)),
        rng.normal(size=(2, 4, 5, 6)),
    )
    weight, bias = rng.normal(size=(16, 7, 3, 3)), rng.normal(size=16)
    want = ref.convlstm_step(x, h, c, weight, bias)
    got = rc.convlstm_cell_step(x, h, c, weight, bias)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-14, atol=1e-14)


def test_group_norm_reference_matches_torch_group_norm():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(2, 12, 5, 6)) * 3 + 1
    weight, bias = rng.normal(size=12), rng.normal(size=12)
    for groups in (1, 3, 12):
        want = torch.nn.functional.group_norm(
            torch.from_numpy(z), groups, torch.from_numpy(weight), torch.from_numpy(bias)
        )
        np.testing.assert_allclose(rc.group_norm(z, groups, weight, bias), want.numpy(), **TOL)


def test_norm_layers_normalise_over_the_documented_groups():
    for kind, gates in (("layer", 4), ("group", 4)):
        cell = ConvLSTMCell(in_channels=1, hidden_channels=6, kernel_size=3, norm=kind)
        assert cell.norm.norm.num_groups == _groups(kind, gates, 6)
        assert cell.cell_norm.norm.num_groups == _groups(kind, 1, 6)
        assert cell.conv.bias is None  # the norm's shift replaces the bias
    gru = ConvGRUCell(in_channels=1, hidden_channels=6, kernel_size=3, norm="group")
    assert gru.update.norm.norm.num_groups == 4 and gru.update.candidate_norm.norm.num_groups == 2
    assert gru.conv_x.bias is None and gru.conv_h.bias is None


# --------------------------------------------------------------------------------------------
# gradients


@pytest.mark.parametrize("case", CASES, ids=str)
def test_gradcheck(case):
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(4)
    small = Case(
        case.name,
        case.kind,
        min(case.in_channels, 2),
        hidden=2,
        norm=case.norm,
        kwargs=dict(case.kwargs),
        cls=case.cls,
    )
    height, width = 3, 4
    if "grid_size" in small.kwargs:
        small.kwargs["grid_size"] = (height, width)
    if small.kind == "sa_convlstm":
        small.kwargs["key_channels"] = 2
    if small.kind == "trajgru":
        small.kwargs.update(links=2, flow_channels=4)
    cell = small.build().double()
    _randomise(cell)
    xs, state = _inputs(small, 1, 1, height, width, gen)
    if isinstance(cell, TrajGRUCell):
        _moderate_flows(cell, xs[0], state[0], scale=0.8)
    inputs = [t.requires_grad_() for t in state]
    if xs[0] is not None:
        inputs = [xs[0].requires_grad_(), *inputs]

    def run(*args):
        if small.in_channels:
            return cell(args[0], tuple(args[1:]))[1]
        return cell(None, tuple(args))[1]

    assert torch.autograd.gradcheck(run, tuple(inputs))


def test_peephole_weights_are_trained_parameters():
    torch.manual_seed(0)
    for cell in (
        PeepholeConvLSTMCell(in_channels=2, hidden_channels=3, kernel_size=3),
        ConvLSTMCell(
            in_channels=2, hidden_channels=3, kernel_size=3, peephole="position", grid_size=(5, 6)
        ),
    ):
        names = dict(cell.named_parameters())
        for name in ("w_ci", "w_cf", "w_co"):
            assert name in names, f"{name} is not a registered parameter"
            assert name in cell.state_dict()
        cell = cell.double()
        assert all(names[n].dtype == torch.float64 for n in ("w_ci", "w_cf", "w_co"))
        before = {n: getattr(cell, n).detach().clone() for n in ("w_ci", "w_cf", "w_co")}
        assert all(not b.any() for b in before.values())  # start at zero: the plain ConvLSTM
        state, loss = None, 0.0
        for _ in range(3):
            h, state = cell(torch.randn(2, 2, 5, 6, dtype=torch.float64), state)
            loss = loss + (h**2).sum() + state[1].sum()
        loss.backward()
        for name in ("w_ci", "w_cf", "w_co"):
            grad = getattr(cell, name).grad
            assert grad is not None and grad.abs().max() > 0, name
        torch.optim.SGD(cell.parameters(), lr=0.1).step()
        for name, old in before.items():
            assert not torch.equal(getattr(cell, name).detach(), old), name


# --------------------------------------------------------------------------------------------
# per-position peepholes


def test_per_position_peepholes_need_a_grid_size():
    with pytest.raises(ConfigError, match="grid_size"):
        ConvLSTMCell(in_channels=1, hidden_channels=2, kernel_size=3, peephole="position")
    with pytest.raises(ConfigError, match="grid_size"):
        PeepholeConvLSTMCell(in_channels=1, hidden_channels=2, peephole="position")
    with pytest.raises(ConfigError):
        ConvLSTMCell(in_channels=1, hidden_channels=2, peephole="position", grid_size=(5,))


@pytest.mark.parametrize("other", [(4, 6), (5, 7)])
@pytest.mark.parametrize("in_channels", [1, 0])
def test_per_position_peepholes_refuse_another_grid(other, in_channels):
    cell = ConvLSTMCell(
        in_channels=in_channels,
        hidden_channels=2,
        kernel_size=3,
        peephole="position",
        grid_size=(5, 6),
    )
    assert cell.w_ci.shape == (2, 5, 6)
    x = torch.randn(1, 1, *other) if in_channels else None
    state = (torch.randn(1, 2, *other), torch.randn(1, 2, *other))
    with pytest.raises(ShapeError) as err:
        cell(x, state)
    message = str(err.value)
    assert "5x6" in message and f"{other[0]}x{other[1]}" in message
    cell(torch.randn(1, 1, 5, 6) if in_channels else None, (torch.randn(1, 2, 5, 6),) * 2)


# --------------------------------------------------------------------------------------------
# argument checks

BUILDERS: dict[str, Callable[..., torch.nn.Module]] = {
    "convlstm": lambda **kw: ConvLSTMCell(hidden_channels=3, **kw),
    "peephole": lambda **kw: PeepholeConvLSTMCell(hidden_channels=3, **kw),
    "position": lambda **kw: ConvLSTMCell(
        hidden_channels=3, peephole="position", grid_size=(4, 5), **kw
    ),
    "convgru": lambda **kw: ConvGRUCell(hidden_channels=3, **kw),
    "trajgru": lambda **kw: TrajGRUCell(hidden_channels=3, links=2, flow_channels=4, **kw),
    "convrnn": lambda **kw: ConvRNNCell(hidden_channels=3, **kw),
    "sa_convlstm": lambda **kw: SAConvLSTMCell(hidden_channels=3, key_channels=2, **kw),
}


def _state(cell, n: int | None = None):
    return tuple(torch.randn(2, 3, 4, 5) for _ in range(cell.state_size if n is None else n))


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_bad_inputs_are_shape_errors(name):
    cell = BUILDERS[name](in_channels=2)
    cell(torch.randn(2, 2, 4, 5))  # the right shapes run
    with pytest.raises(ShapeError, match="2 input channels"):
        cell(torch.randn(2, 3, 4, 5))
    with pytest.raises(ShapeError, match=r"\(B, C, H, W\)"):
        cell(torch.randn(2, 1, 2, 4, 5))
    with pytest.raises(ShapeError, match=r"\(B, C, H, W\)"):
        cell(torch.randn(2, 4, 5))
    with pytest.raises(ShapeError):
        cell(None, _state(cell))
    with pytest.raises(ShapeError, match="state tensors"):
        cell(torch.randn(2, 2, 4, 5), _state(cell, cell.state_size + 1))
    with pytest.raises(ShapeError, match="state tensors"):
        cell(torch.randn(2, 2, 4, 5), _state(cell, cell.state_size - 1))


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_bad_inputs_to_a_cell_without_input_are_shape_errors(name):
    cell = BUILDERS[name](in_channels=0)
    h, state = cell(None, _state(cell))
    assert h.shape == (2, 3, 4, 5) and len(state) == cell.state_size
    with pytest.raises(ShapeError, match="in_channels=0"):
        cell(torch.randn(2, 1, 4, 5), _state(cell))
    with pytest.raises(ShapeError, match="in_channels=0"):
        cell(torch.randn(2, 0, 4, 5), _state(cell))
    with pytest.raises(ShapeError):
        cell(None)  # nothing to start from
    with pytest.raises(ShapeError, match="state tensors"):
        cell(None, _state(cell, cell.state_size + 1))


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_bad_configs_are_config_errors(name):
    build = BUILDERS[name]
    with pytest.raises(ConfigError, match="norm"):
        build(in_channels=1, norm="batch")
    for kernel in (0, 2, 4):
        with pytest.raises(ConfigError, match="odd"):
            build(in_channels=1, kernel_size=kernel)
    with pytest.raises(ConfigError):
        build(in_channels=-1)


@pytest.mark.parametrize("links", [0, -1])
def test_trajgru_without_links_is_a_config_error(links):
    with pytest.raises(ConfigError, match="link"):
        TrajGRUCell(in_channels=1, hidden_channels=2, links=links)


def test_bad_peephole_options_are_config_errors():
    with pytest.raises(ConfigError, match="peephole"):
        ConvLSTMCell(in_channels=1, hidden_channels=2, peephole="diagonal")
    with pytest.raises(ConfigError, match="peephole"):
        PeepholeConvLSTMCell(in_channels=1, hidden_channels=2, peephole="none")


def test_make_cell_builds_every_registered_cell_and_refuses_unknown_names():
    for name, cls in CELLS.items():
        cell = make_cell(name, in_channels=1, hidden_channels=2, kernel_size=3)
        assert type(cell) is cls
    with pytest.raises(ConfigError, match="unknown cell"):
        make_cell("lstm3d", in_channels=1, hidden_channels=2)


# --------------------------------------------------------------------------------------------
# the warp


def test_warp_with_zero_flow_is_the_identity():
    h = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    out = warp(h, torch.zeros(2, 2, 5, 6, dtype=torch.float64))
    torch.testing.assert_close(out, h, rtol=1e-12, atol=1e-12)
    h32 = h.float()
    torch.testing.assert_close(warp(h32, torch.zeros(2, 2, 5, 6)), h32)


def test_warp_by_one_cell_shifts_and_fills_the_edge_with_zeros():
    h = torch.arange(1.0, 31.0, dtype=torch.float64).view(1, 1, 5, 6)
    flow = torch.zeros(1, 2, 5, 6, dtype=torch.float64)
    flow[:, 0] = 1.0  # read one cell to the right: content moves left
    want = torch.zeros_like(h)
    want[..., :-1] = h[..., 1:]
    torch.testing.assert_close(warp(h, flow), want, rtol=0, atol=1e-12)
    assert torch.equal(want[..., -1], torch.zeros(1, 1, 5, dtype=torch.float64))
    assert warp(h, flow)[0, 0, 0].tolist() == pytest.approx([2, 3, 4, 5, 6, 0], abs=1e-12)

    flow = torch.zeros(1, 2, 5, 6, dtype=torch.float64)
    flow[:, 0] = -1.0  # one cell to the left: content moves right, first column empty
    want = torch.zeros_like(h)
    want[..., 1:] = h[..., :-1]
    torch.testing.assert_close(warp(h, flow), want, rtol=0, atol=1e-12)

    flow = torch.zeros(1, 2, 5, 6, dtype=torch.float64)
    flow[:, 1] = 1.0  # one cell down (along the height)
    want = torch.zeros_like(h)
    want[..., :-1, :] = h[..., 1:, :]
    torch.testing.assert_close(warp(h, flow), want, rtol=0, atol=1e-12)


def test_warp_matches_the_reference_bilinear_sampler():
    gen = torch.Generator().manual_seed(5)
    h = torch.randn(2, 3, 5, 6, dtype=torch.float64, generator=gen)
    flow = 2.0 * torch.randn(2, 2, 5, 6, dtype=torch.float64, generator=gen)
    flow[0, :, 0, 0] = torch.tensor([0.5, -0.25])  # a few hand-picked points
    flow[0, :, 4, 5] = torch.tensor([0.5, 0.0])  # half outside: half the edge value
    out = warp(h, flow)
    np.testing.assert_allclose(_np(out), rc.bilinear_warp(_np(h), _np(flow)), **TOL)
    torch.testing.assert_close(out[0, :, 4, 5], 0.5 * h[0, :, 4, 5], rtol=0, atol=1e-12)


def test_warp_on_a_grid_one_cell_wide_or_high_reads_zeros_outside():
    for shape, axis in (((3, 1), 0), ((1, 4), 1)):
        h = torch.arange(1.0, 1.0 + math.prod(shape), dtype=torch.float64).view(1, 1, *shape)
        for step in (1.0, 0.5, -0.25):
            flow = torch.zeros(1, 2, *shape, dtype=torch.float64)
            flow[:, axis] = step  # across the single cell: (partly) outside the grid
            flow[:, 1 - axis] = 0.5  # along the long side
            want = rc.bilinear_warp(_np(h), _np(flow))
            np.testing.assert_allclose(_np(warp(h, flow)), want, **TOL)


@pytest.mark.parametrize("name", sorted(CELLS))
def test_state_of_the_wrong_shape_is_a_shape_error(name):
    cell = make_cell(name, in_channels=2, hidden_channels=3, kernel_size=3)
    x = torch.randn(2, 2, 4, 5)
    good = cell.init_state(2, 4, 5)
    wrong_channels = tuple(torch.zeros(2, 4, 4, 5) for _ in good)
    wrong_grid = tuple(torch.zeros(2, 3, 4, 6) for _ in good)
    for state in (wrong_channels, wrong_grid):
        with pytest.raises(ShapeError, match="state tensors must be"):
            cell(x, state)
