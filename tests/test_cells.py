import numpy as np
import pytest
import torch

from convlstm.cells import CELLS, ConvLSTMCell, make_cell
from convlstm.errors import ConfigError, ShapeError
from tests import reference as ref


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


@pytest.mark.parametrize("kernel", [1, 3, 5])
def test_convlstm_cell_matches_float64_reference(kernel):
    torch.manual_seed(0)
    cell = ConvLSTMCell(in_channels=3, hidden_channels=4, kernel_size=kernel).double()
    with torch.no_grad():  # random bias so that every gate's slice matters
        cell.conv.bias.normal_()
    x1, x2 = torch.randn(2, 2, 3, 6, 5, dtype=torch.float64)
    h, (h, c) = cell(x1)
    h2, (_, c2) = cell(x2, (h, c))

    w, b = _np(cell.conv.weight), _np(cell.conv.bias)
    zeros = np.zeros((2, 4, 6, 5))
    rh, rc = ref.convlstm_step(_np(x1), zeros, zeros, w, b)
    rh2, rc2 = ref.convlstm_step(_np(x2), rh, rc, w, b)
    np.testing.assert_allclose(_np(h), rh, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(_np(h2), rh2, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(_np(c2), rc2, rtol=1e-12, atol=1e-12)


def test_forget_bias_is_initialised_and_only_on_the_forget_gate():
    cell = ConvLSTMCell(in_channels=2, hidden_channels=3, kernel_size=3, forget_bias=1.0)
    bias = cell.conv.bias.detach()
    assert torch.all(bias[3:6] == 1.0)
    assert not torch.any(torch.cat([bias[:3], bias[6:]]) == 1.0)


def test_init_state_shapes_and_zero_state_default():
    cell = ConvLSTMCell(in_channels=2, hidden_channels=3, kernel_size=3)
    h0, c0 = cell.init_state(4, 5, 6)
    assert h0.shape == c0.shape == (4, 3, 5, 6) and not h0.any() and not c0.any()
    x = torch.randn(4, 2, 5, 6)
    a, _ = cell(x)
    b, _ = cell(x, (h0, c0))
    torch.testing.assert_close(a, b)


def test_gradcheck_cell():
    torch.manual_seed(0)
    cell = ConvLSTMCell(in_channels=1, hidden_channels=2, kernel_size=3).double()
    x = torch.randn(1, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    h = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    c = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, h, c: cell(x, (h, c))[1], (x, h, c))


@pytest.mark.parametrize("kernel", [0, 2, 4])
def test_even_or_zero_kernel_is_a_config_error(kernel):
    with pytest.raises(ConfigError, match="odd"):
        ConvLSTMCell(in_channels=1, hidden_channels=2, kernel_size=kernel)


def test_wrong_rank_and_channels_are_shape_errors():
    cell = ConvLSTMCell(in_channels=2, hidden_channels=3, kernel_size=3)
    with pytest.raises(ShapeError, match=r"\(B, C, H, W\)"):
        cell(torch.randn(2, 5, 2, 4, 4))
    with pytest.raises(ShapeError, match="2 input channels"):
        cell(torch.randn(2, 3, 4, 4))


def test_cell_without_input_runs_on_its_state_alone():
    cell = ConvLSTMCell(in_channels=0, hidden_channels=3, kernel_size=3)
    state = (torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4))
    h, _ = cell(None, state)
    assert h.shape == (2, 3, 4, 4)
    with pytest.raises(ShapeError):
        cell(torch.randn(2, 1, 4, 4), state)


def test_make_cell_rejects_unknown_names():
    with pytest.raises(ConfigError, match="unknown cell"):
        make_cell("lstm9000", in_channels=1, hidden_channels=1)


@pytest.mark.parametrize("name", sorted(CELLS))
@pytest.mark.parametrize("in_channels", [0, 3])
def test_first_parameter_is_the_first_of_parameters(name, in_channels):
    """The cheap lookup the steps use (device, dtype, autocast) finds what parameters() does."""
    cell = make_cell(name, in_channels=in_channels, hidden_channels=4, kernel_size=3)
    assert cell.first_parameter() is next(cell.parameters())
    if name == "convlstm":
        peephole = make_cell(name, in_channels=3, hidden_channels=4, peephole="channel")
        assert peephole.first_parameter() is next(peephole.parameters()) is peephole.w_ci
