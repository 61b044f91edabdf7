"""experiments.conv_rates: the step convolutions it times, the data gradient it times as a
forward convolution (equal to autograd's, float64), and a CPU run's output."""

import json

import pytest
import torch
import torch.nn.functional as F

from convlstm.errors import ConfigError
from experiments import conv_rates


@pytest.mark.parametrize("kernel", [3, 5])
def test_the_flipped_filters_forward_is_the_input_gradient(kernel):
    torch.manual_seed(0)
    x = torch.randn(2, 6, 9, 7, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(10, 6, kernel, kernel, dtype=torch.float64)
    grad = torch.randn(2, 10, 9, 7, dtype=torch.float64)
    F.conv2d(x, weight, padding=kernel // 2).backward(grad)
    got = F.conv2d(grad, conv_rates.flipped(weight), padding=kernel // 2)
    torch.testing.assert_close(got, x.grad, rtol=1e-12, atol=1e-12)


def test_the_convolutions_of_convlstm_s():
    convs = conv_rates.convolutions("mmnist-convlstm-s", 19)
    shapes = [(c["conv"], c["c_in"], c["c_out"], c["grid"], c["kernel"]) for c in convs]
    assert shapes == [  # layer 0 (16 patch channels), the state half, layers 1-3
        ("[x, h]", 144, 512, (16, 16), 5),
        ("h", 128, 512, (16, 16), 5),
        ("[x, h]", 256, 512, (16, 16), 5),
    ]
    for other in ("mmnist-encoder-forecaster", "mmnist-convgru", "mmnist-sa-convlstm"):
        with pytest.raises(ConfigError, match="not a stacked ConvLSTM preset"):
            conv_rates.convolutions(other, 19)


def test_the_rates_count_one_steps_products(monkeypatch):
    """Every op timed at 1 s: each rate is one step's multiply-adds x 2 per second, and the
    batched weight gradient, which does `steps` steps' work in that second, `steps` times it."""
    monkeypatch.setattr(conv_rates, "_time", lambda fn, device, seconds: 1.0)
    conv = conv_rates.convolutions("mmnist-cpu-small", 3)[0]
    entry = conv_rates.measure(conv, 2, torch.device("cpu"), torch.float32, 0.01)
    (h, w), k = conv["grid"], conv["kernel"]
    step = 2 * 2 * h * w * conv["c_in"] * conv["c_out"] * k * k / 1e12
    rates = entry["tflops"]
    for name in ("forward", "dgrad", "dgrad_by_forward", "wgrad"):
        assert rates[name] == pytest.approx(step)
    assert rates["wgrad_batched"] == pytest.approx(3 * step)


def test_rounds_make_a_fixed_count_of_calls_that_may_finish_only_at_sync():
    """Like a CUDA graph's replay, each call here only queues 10 ms of work, which sync()
    waits for: the rounds must count their calls beforehand, not launch until the clock has
    moved (that clock would not move; the call cap turns such a loop into a failure)."""
    clock = {"now": 0.0, "queued": 0, "calls": 0}

    def launch():
        clock["calls"] += 1
        assert clock["calls"] < 1000, "kept launching"
        clock["queued"] += 1

    def sync():
        clock["now"] += 0.01 * clock["queued"]
        clock["queued"] = 0

    fake_clock = lambda: clock["now"]  # noqa: E731  (no real time is read)
    assert conv_rates._rounds(launch, sync, 0.25, fake_clock) == pytest.approx(0.01)
    # a warm-up call, one timed call, then 5 rounds of 0.05 s / 0.01 s = 5 calls
    assert clock["calls"] == 2 + 5 * 5


def test_a_cpu_run_writes_its_rates(tmp_path, capsys):
    out = tmp_path / "rates.json"
    argv = ["--device", "cpu", "--preset", "mmnist-cpu-small", "--batch-sizes", "2"]
    results = conv_rates.main([*argv, "--steps", "3", "--seconds", "0.01", "--out", str(out)])
    assert len(results) == 2
    assert json.loads(out.read_text())["rates"] == json.loads(json.dumps(results))
    for entry in results:
        assert entry["dgrad_difference"] < 1e-5  # float32: the same gradient both ways
        assert set(entry["tflops"]) == {
            "forward",
            "dgrad",
            "dgrad_by_forward",
            "wgrad",
            "wgrad_batched",
        }
        assert all(rate > 0 for rate in entry["tflops"].values())
    assert "differ by at most" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="must be positive"):
        conv_rates.main(["--device", "cpu", "--steps", "0"])
    with pytest.raises(ConfigError, match=".json"):
        conv_rates.main(["--device", "cpu", "--out", "rates.txt"])
