import pytest
import torch

from convlstm.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from convlstm.config import PRESETS, from_name
from convlstm.errors import CheckpointError
from convlstm.models import build_model
from tests.test_models import tiny


def _saved(tmp_path):
    torch.manual_seed(0)
    cfg = from_name("mmnist-cpu-small", hidden_channels=(4, 4), kernel_size=3)
    model = build_model(cfg)
    path = save_checkpoint(tmp_path / "ckpt.pt", model=model, model_config=cfg, step=7)
    return model, cfg, path


def test_round_trip_rebuilds_an_identical_model(tmp_path):
    model, cfg, path = _saved(tmp_path)
    rebuilt, rebuilt_cfg = model_from_checkpoint(path)
    assert rebuilt_cfg == cfg
    for (name, a), (_, b) in zip(
        model.state_dict().items(), rebuilt.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    x = torch.rand(2, 3, 1, 16, 16)
    torch.testing.assert_close(model.eval()(x, 2), rebuilt(x, 2), rtol=0, atol=0)
    assert load_checkpoint(path)["step"] == 7
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left


def test_truncated_missing_and_foreign_files_are_checkpoint_errors(tmp_path):
    _, _, path = _saved(tmp_path)
    data = path.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(truncated)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "absent.pt")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(1)}, foreign)
    with pytest.raises(CheckpointError, match="not a convlstm checkpoint"):
        load_checkpoint(foreign)


def test_failed_write_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    model, cfg, path = _saved(tmp_path)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        save_checkpoint(path, model=model, model_config=cfg, step=8)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_round_trips_through_a_checkpoint(tmp_path, name):
    torch.manual_seed(0)
    cfg = tiny(name)
    model = build_model(cfg).eval()
    path = save_checkpoint(tmp_path / "c.pt", model=model, model_config=cfg, step=1)
    rebuilt, rebuilt_cfg = model_from_checkpoint(path)
    assert rebuilt_cfg == cfg
    x = torch.rand(2, 3, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x, 2), rebuilt(x, 2), rtol=0, atol=0)
