import numpy as np
import pytest
import torch
from PIL import Image

import convlstm.visualize as vis
from convlstm.errors import ConfigError, ShapeError
from convlstm.visualize import comparison_frames, save_gif, save_strip_png

LIGHT = vis.SEPARATOR_VALUE


def _videos(c=1, b=3):
    """Context of 3 frames and truth/forecast of 4, each frame a distinct flat value."""

    def flat(values):
        v = torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1, 1)
        return v.expand(b, -1, c, 3, 4).clone()

    ctx = flat([0.0, 0.1, 0.2])
    truth = flat([0.4, 0.5, 0.6, 0.7])
    fc = flat([0.8, 0.9, 1.0, 1.0])
    fc[1:2] = 0.3  # a different second sequence (when there is one)
    return ctx, truth, fc


def u8(x):
    return int(round(x * 255))


def test_comparison_frames_layout():
    ctx, truth, fc = _videos()
    frames = comparison_frames(ctx, truth, fc, max_sequences=2, scale=2)
    # K = 4 frames; rows: 2 sequences of 3*2 px + 2 px; columns: 3 panels of 4*2 px + 2 * 2 px
    assert frames.shape == (4, 2 * 6 + 2, 3 * 8 + 4) and frames.dtype == np.uint8
    # frame 3: the context holds its last frame (0.2)
    f = frames[3]
    assert np.all(f[0:6, 0:8] == u8(0.2))
    assert np.all(f[0:6, 10:18] == u8(0.7))
    assert np.all(f[0:6, 20:28] == u8(1.0))
    assert np.all(f[8:14, 20:28] == u8(0.3))  # second sequence's forecast
    assert np.all(f[:, 8:10] == LIGHT) and np.all(f[:, 18:20] == LIGHT)
    assert np.all(f[6:8, :] == LIGHT)
    assert np.all(frames[0][0:6, 0:8] == 0)


def test_comparison_frames_rgb_clamp_and_one_row():
    ctx, truth, fc = _videos(c=3, b=1)
    fc[:, :, 0] = 2.0  # red out of range -> clamped to 255
    fc[:, :, 1] = -1.0
    frames = comparison_frames(ctx, truth, fc, scale=1)
    assert frames.shape == (4, 3, 3 * 4 + 4, 3)
    assert np.all(frames[0, :, 12:16] == [255, 0, u8(0.8)])
    assert np.all(frames[0, :, 4:6] == LIGHT)


def test_comparison_frames_errors():
    ctx, truth, fc = _videos()
    with pytest.raises(ShapeError, match="share"):
        comparison_frames(ctx, truth, fc[:, :, :, :2])
    with pytest.raises(ShapeError, match="channels"):
        comparison_frames(ctx.expand(-1, -1, 2, -1, -1), truth, fc)
    with pytest.raises(ShapeError, match="B, T, C, H, W"):
        comparison_frames(ctx[0], truth, fc)
    with pytest.raises(ConfigError, match="scale"):
        comparison_frames(ctx, truth, fc, scale=0)


def test_gif_round_trip(tmp_path):
    ctx, truth, fc = _videos()
    path = save_gif(tmp_path / "sub" / "cmp.gif", ctx, truth, fc, fps=5, max_sequences=2)
    assert path == tmp_path / "sub" / "cmp.gif"
    expected = comparison_frames(ctx, truth, fc, max_sequences=2)
    with Image.open(path) as im:
        assert im.format == "GIF" and im.n_frames == 4
        assert im.size == (expected.shape[2], expected.shape[1])
        assert im.info.get("loop") == 0
        for k in range(im.n_frames):
            im.seek(k)
            assert im.info["duration"] == 200
            frame = np.asarray(im.convert("L"))
            np.testing.assert_array_equal(frame, expected[k])
        im.seek(2)
        assert np.all(np.asarray(im.convert("L"))[0:6, 10:18] == u8(0.6))  # truth panel
    assert [p.name for p in path.parent.iterdir()] == ["cmp.gif"]  # no temporary left


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    ctx, truth, fc = _videos()

    def broken_save(self, fp, *args, **kwargs):
        fp.write(b"GIF89a partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_gif(tmp_path / "a.gif", ctx, truth, fc)
    with pytest.raises(OSError, match="disk full"):
        save_strip_png(tmp_path / "a.png", ctx, truth, fc)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_old_file(tmp_path, monkeypatch):
    ctx, truth, fc = _videos()
    target = tmp_path / "a.gif"
    target.write_bytes(b"old")
    monkeypatch.setattr(Image.Image, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("x")))
    with pytest.raises(OSError):
        save_gif(target, ctx, truth, fc)
    assert target.read_bytes() == b"old" and list(tmp_path.iterdir()) == [target]


def test_strip_png(tmp_path):
    ctx, truth, fc = _videos()
    path = save_strip_png(tmp_path / "strip.png", ctx, truth, fc, sequence=1, scale=2)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "L"
        a = np.asarray(im)
    # 3 rows of 6 px + 2 separators; 4 columns of 8 px + 3 separators
    assert a.shape == (3 * 6 + 4, 4 * 8 + 6)
    assert np.all(a[0:6, 10:18] == u8(0.1))  # context frame 1
    assert np.all(a[0:6, 30:38] == LIGHT)  # context has no 4th frame: padding
    assert np.all(a[8:14, 30:38] == u8(0.7))  # truth frame 3
    assert np.all(a[16:22, 0:8] == u8(0.3))  # sequence 1's forecast
    with pytest.raises(ConfigError, match="sequence"):
        save_strip_png(tmp_path / "bad.png", ctx, truth, fc, sequence=3)


def test_contingency_video_colours():
    truth = torch.tensor([3.0, 3.0, 0.0, 0.0, float("nan")]).view(1, 1, 1, 1, 5)
    fc = torch.tensor([3.0, 0.0, 3.0, 0.0, 3.0]).view(1, 1, 1, 1, 5)
    rgb = vis.contingency_video(fc, truth, threshold=2.0)
    assert rgb.shape == (1, 1, 3, 1, 5)
    colours = rgb[0, 0, :, 0].T.tolist()  # one RGB triple per pixel
    assert colours == [[0, 1, 0], [1, 0, 0], [0, 0, 1], [0, 0, 0], [0.5, 0.5, 0.5]]
    with pytest.raises(ShapeError, match="both be"):
        vis.contingency_video(fc, truth[..., :4], threshold=2.0)


def test_panel_gif_has_one_column_per_panel(tmp_path):
    ctx, truth, fc = _videos(c=3, b=1)
    path = vis.save_panels_gif(tmp_path / "p.gif", {"a": truth, "b": fc, "c": truth, "d": fc})
    with Image.open(path) as im:
        assert im.size == (4 * 4 * 2 + 3 * vis.SEPARATOR_PX, 3 * 2)
        assert im.n_frames == 4
    with pytest.raises(ShapeError, match="a, b must share"):
        vis.panel_frames({"a": truth, "b": fc[..., :2]})
    with pytest.raises(ConfigError, match="at least one panel"):
        vis.panel_frames({})
