"""experiments.memory_traffic: which operators of a training step only move memory, and which
line of the model they come from (forward) or which forward line made their autograd node."""

import re

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


def test_what_the_compiled_gate_functions_dispatch_is_counted_apart(capsys):
    from convlstm import gates

    z = torch.randn(2, 8, 3, 3, dtype=torch.bfloat16, requires_grad=True)
    c = torch.randn(2, 2, 3, 3, requires_grad=True)
    trace = TrafficTrace()
    with torch.autograd.set_detect_anomaly(True, check_nan=False), trace:
        h, c_new = gates.fused_lstm_update(compiled=False)(z, c)  # eager: its casts show
        # dense gradients, in z's layout (a sum's expanded ones would be made dense: a clone)
        torch.autograd.backward((h, c_new), (torch.ones_like(h), torch.ones_like(c_new)))
        c.detach().clone()  # outside: a row
    # forward: z cast to float32 (2*8*9 floats) and h, c' to their dtype (no-op casts
    # included); backward: the recomputation's and the gradients' casts
    assert trace.fused_calls >= 4 and trace.fused_bytes >= 2 * 8 * 9 * 4 * 2
    assert [name for _, _, name, _ in trace.rows] == ["cat", "clone"]  # dz's, then the clone
    assert [site.split(":")[0] for _, site, _, _ in trace.rows] == [
        "_FusedUpdateBackward of convlstm/gates.py",
        "(outside the model)",
    ]
    out = memory_traffic.report(trace, 5).splitlines()
    assert out[-1] == (
        f"not counted: {trace.fused_bytes / 1e6:.1f} MB in {trace.fused_calls} calls inside "
        "the compiled gate functions, which run as one kernel per call"
    )
    assert out[-2].startswith("total ")


def test_a_training_step_is_traced_to_the_lines_of_the_model(capsys):
    argv = ["--device", "cpu", "--preset", "mmnist-cpu-small", "--batch", "2", "--top", "6"]
    trace = memory_traffic.main([*argv, "--variant", "fast-fp32"])
    sites = {(phase, name, site.split(":")[0]) for phase, site, name, _ in trace.rows}
    assert ("forward", "cat", "convlstm/cells/base.py") in sites  # with_input's [x, h]
    assert ("backward", "stack", "UnbindBackward0 of convlstm/layers.py") in sites
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 + 1 + 6 + 2  # title, header, the top 6 rows, by kind, the total
    assert out[-1].startswith("total ") and "strided" in out[-1]
    kinds = re.findall(r"(\w+) ([\d.]+) MB in (\d+)", out[-2])
    assert out[-2].startswith("by kind: ") and {k for k, _, _ in kinds} <= {
        "casts",
        "copies",
        "cats",
        "fills",
        "sums",
    }
    assert sum(int(n) for _, _, n in kinds) == sum(trace.rows.values())
    casts = sum(n for (_, _, name, _), n in trace.rows.items() if name == "_to_copy")
    assert {k: int(n) for k, _, n in kinds}.get("casts", 0) == casts
    assert set(memory_traffic.KINDS) == set(memory_traffic.MOVERS) | set(memory_traffic.SUMS)
    total_mb = float(re.search(r"total ([\d.]+) MB", out[-1]).group(1))
    assert sum(float(mb) for _, mb, _ in kinds) == pytest.approx(total_mb, abs=0.3)


def _bf16_step(cache: bool):
    from convlstm.config import from_name
    from convlstm.models import build_model
    from convlstm.speed import SpeedOptions
    from experiments.benchmark import _train_step, train_config

    torch.manual_seed(0)
    config = from_name("mmnist-cpu-small")
    cfg = train_config(2, "bf16", torch.device("cpu"), config)
    step = _train_step(build_model(config), config, cfg, SpeedOptions(), torch.device("cpu"))
    step.autocast_cache = cache
    return step


def test_a_graphs_uncached_autocast_casts_each_weight_at_each_use():
    batch = torch.rand(2, 20, 1, 64, 64)
    casts = {}
    for cache in (True, False):
        trace = memory_traffic.trace_step(_bf16_step(cache), batch)
        casts[cache] = sum(
            n
            for (phase, _, name, _), n in trace.rows.items()
            if phase == "forward" and name == "_to_copy"
        )
    # 2 layers x 19 steps use each gate weight and bias; cached, each is cast once a step
    assert casts[False] - casts[True] >= 2 * 2 * (19 - 1)


def _forecast_bias_casts(trace) -> int:
    """Casts of a ConvLSTM gate bias by autocast in the forecast steps' [x, h] convolution."""
    return sum(
        n
        for (phase, site, name, inputs), n in trace.rows.items()
        if (phase, name, inputs) == ("forward", "_to_copy", "float32:C")
        and site.startswith("convlstm/cells/lstm.py:")
        and site.endswith(" step")
    )


@pytest.mark.parametrize("variant, casts", [("fast", 2 * 9), ("fast-no-graph", 0)])
def test_the_gpus_options_are_traced_on_the_cpu(monkeypatch, capsys, variant, casts):
    from convlstm import gates

    # (the trace runs the compiled gate update's operators one by one anyway: skip compiling)
    monkeypatch.setattr(
        gates, "_compiled_kernels", lambda: (gates.gates_forward, gates.gates_backward)
    )
    argv = ["--device", "cpu", "--preset", "mmnist-cpu-small", "--batch", "2", "--top", "40"]
    trace = memory_traffic.main([*argv, "--options-of", "cuda", "--variant", variant])
    title = capsys.readouterr().out.splitlines()[0]
    assert f"{variant} with its options on cuda" in title and ", bf16, batch 2, cpu:" in title
    assert ("without the graph (autocast uncached, as in it)" in title) == (variant == "fast")
    # the compiled gate update's operators (not gates.c's), counted apart: one kernel a call
    assert trace.fused_calls > 0 and trace.fused_bytes > 0
    assert not any(site.startswith("convlstm/gates.py") for _, site, _, _ in trace.rows)
    layouts = {inputs for _, _, _, inputs in trace.rows}
    assert any("bfloat16:CL" in inputs for inputs in layouts)  # bf16, channels-last
    # with the graph, autocast uncached as in it: each forecast step casts its gate bias
    # again (2 layers x 9 steps after the hoisted context); without, the hoisted context's
    # cast (elsewhere) serves them all
    assert _forecast_bias_casts(trace) == casts


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
