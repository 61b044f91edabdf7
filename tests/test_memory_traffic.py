"""experiments.memory_traffic: which operators of a training step only move memory, and which
line of the model they come from (forward) or which forward line made their autograd node."""

import pytest
import torch

from convlstm.cli import run_main
from experiments import memory_traffic
from experiments.memory_traffic import TrafficTrace, layout


def test_layout_names_contiguous_channels_last_and_strided():
    x = torch.randn(2, 3, 4, 5)
    assert layout(x) == "C"
    assert layout(x.contiguous(memory_format=torch.channels_last)) == "CL"
    assert layout(x[:, :2]) == "S"


def test_trace_counts_copies_with_their_bytes_and_sums_only_in_backward():
    x = torch.randn(8, 4, requires_grad=True)
    trace = TrafficTrace()
    with trace:
        y = x.t().contiguous()  # a copy from a strided view: 32 floats written
        z = (y + y).sum()  # a forward add is arithmetic, not traffic
    keys = list(trace.rows)
    assert [(phase, name) for phase, _, name, _ in keys] == [("forward", "clone")]
    assert keys[0][3] == "float32:S" and trace.bytes[keys[0]] == 32 * 4
    assert keys[0][1].startswith("(outside the model)")  # this test file is not convlstm/
    with torch.autograd.set_detect_anomaly(True, check_nan=False), trace:
        (z + y.sum()).backward()  # y is used three times: backward sums its gradients
    assert any(phase == "backward" and name in ("add", "add_") for phase, _, name, _ in trace.rows)


def test_a_training_step_is_traced_to_the_lines_of_the_model(capsys):
    argv = ["--device", "cpu", "--preset", "mmnist-cpu-small", "--batch", "2", "--top", "6"]
    trace = memory_traffic.main([*argv, "--variant", "fast-fp32"])
    sites = {(phase, name, site.split(":")[0]) for phase, site, name, _ in trace.rows}
    assert ("forward", "cat", "convlstm/cells/base.py") in sites  # with_input's [x, h]
    assert ("backward", "stack", "UnbindBackward0 of convlstm/layers.py") in sites
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 + 1 + 6 + 1  # title, header, the top 6 rows, the total
    assert out[-1].startswith("total ") and "strided" in out[-1]


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--batch", "0"], "must be positive"),
        (["--top", "0"], "must be positive"),
        (["--variant", "fastest"], "invalid choice"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, argv, match):
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: memory_traffic.main(["--device", "cpu", *argv]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert match in err and "\n" not in err
