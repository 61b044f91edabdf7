import pytest
import torch

from convlstm.baselines import blank, constant, mean_image, persistence
from convlstm.errors import ConfigError, ShapeError


def _context():
    # frame t of every sequence holds the value t + 10 * b
    b, t = torch.meshgrid(torch.arange(2.0), torch.arange(3.0), indexing="ij")
    return (t + 10 * b).view(2, 3, 1, 1, 1).expand(2, 3, 1, 4, 5).contiguous()


def test_persistence_repeats_last_frame():
    ctx = _context()
    out = persistence(ctx, 4)
    assert out.shape == (2, 4, 1, 4, 5)
    assert torch.equal(out[0], torch.full((4, 1, 4, 5), 2.0))
    assert torch.equal(out[1], torch.full((4, 1, 4, 5), 12.0))
    out[0, 0] = -1.0  # a new tensor, not a view of the context
    assert ctx[0, -1].min() == 2.0


def test_blank_constant_mean_image():
    ctx = _context().to(torch.float64)
    z = blank(ctx, 2)
    assert z.shape == (2, 2, 1, 4, 5) and z.dtype == torch.float64 and z.abs().sum() == 0
    c = constant(ctx, 3, 0.25)
    assert c.shape == (2, 3, 1, 4, 5) and torch.all(c == 0.25) and c.dtype == torch.float64
    image = torch.arange(20.0).view(1, 4, 5)
    m = mean_image(ctx, 2, image)
    assert m.shape == (2, 2, 1, 4, 5) and m.dtype == torch.float64
    for b in range(2):
        for t in range(2):
            assert torch.equal(m[b, t], image.double())


def test_keeps_dtype_and_device():
    ctx = torch.rand(1, 2, 3, 4, 4, dtype=torch.bfloat16)
    for out in (
        persistence(ctx, 1),
        blank(ctx, 1),
        constant(ctx, 1, 0.5),
        mean_image(ctx, 1, torch.zeros(3, 4, 4)),
    ):
        assert out.dtype == torch.bfloat16 and out.device == ctx.device
        assert out.shape == (1, 1, 3, 4, 4)


def test_errors():
    with pytest.raises(ShapeError, match="B, T, C, H, W"):
        persistence(torch.zeros(3, 1, 4, 4), 2)
    with pytest.raises(ShapeError, match="T = 0"):
        persistence(torch.zeros(1, 0, 1, 4, 4), 2)
    with pytest.raises(ConfigError, match="horizon"):
        blank(torch.zeros(1, 2, 1, 4, 4), 0)
    with pytest.raises(ShapeError, match="mean image"):
        mean_image(torch.zeros(1, 2, 1, 4, 4), 1, torch.zeros(4, 4))
