"""experiments/gpu_check.sh, the one-call GPU check, tried on the CPU: its settings, summary and
exit status (the GPU parts themselves run on a lent GPU machine)."""

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "gpu_check.sh"


def _run(tmp_path, **settings):
    env = dict(os.environ)
    env.update(RESULTS=str(tmp_path / "out"), DEVICE="cpu", PRESET="mmnist-cpu-small")
    env.update(PYTHON=sys.executable, MNIST_DIR=str(tmp_path / "no-mnist"), **settings)
    return subprocess.run(
        ["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=300
    )


def test_an_unknown_part_is_refused_before_anything_runs(tmp_path):
    run = _run(tmp_path, PARTS="benchmark bench")
    assert run.returncode == 2
    assert "PARTS: unknown part bench" in run.stdout
    assert not (tmp_path / "out").exists()


def test_a_part_runs_and_is_summed_up(tmp_path):
    archive = tmp_path / "back" / "check.tgz"
    kept = tmp_path / "out" / "budget-run" / "checkpoint.pt"  # as a budget run leaves it
    kept.parent.mkdir(parents=True)
    kept.write_bytes(b"weights")
    run = _run(tmp_path, PARTS="memory-traffic conv-rates", ARCHIVE=str(archive))
    out = tmp_path / "out"
    assert run.returncode == 0, run.stdout + run.stderr
    machine = (out / "machine.txt").read_text()
    assert "imports: ok" in machine and "embedded digits" in machine
    summary = (out / "summary.txt").read_text().splitlines()
    assert len(summary) == 2 and summary[0].startswith("conv-rates rc=0 ")
    assert summary[1].startswith("memory-traffic rc=0 ")  # (in the script's order)
    assert "total" in (out / "memory-traffic.log").read_text()
    assert "dgrad_by_forward" in (out / "conv-rates.log").read_text()
    assert (out / "conv-rates.json").exists()
    assert not (out / "benchmark.log").exists()  # only the parts asked for
    # everything packed into the one archive, as it stood after the last part
    with tarfile.open(archive) as packed:
        names = {Path(n).name for n in packed.getnames()}
        assert {"machine.txt", "summary.txt", "conv-rates.json", "memory-traffic.log"} <= names
        summary = packed.extractfile("./summary.txt").read().decode()
        assert "checkpoint.pt" not in names  # over the device tool's size for a file
    assert summary == (out / "summary.txt").read_text()
    assert not (archive.parent / "check.tgz.part").exists()


@pytest.mark.parametrize(
    "archive, match",
    [("out/inside.tgz", "must lie outside RESULTS"), ("check.zip", "a .tgz path")],
)
def test_a_bad_archive_is_refused_before_anything_runs(tmp_path, archive, match):
    run = _run(tmp_path, PARTS="conv-rates", ARCHIVE=str(tmp_path / archive))
    assert run.returncode == 2
    assert match in run.stdout
    assert not (tmp_path / "out").exists()


def test_a_failing_part_fails_the_check(tmp_path):
    run = _run(tmp_path, PARTS="memory-traffic", PRESET="no-such-preset")
    assert run.returncode == 1
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "memory-traffic rc=2" in summary


def test_the_variants_the_gpu_run_names_exist_and_resolve_on_cuda(monkeypatch):
    """A misspelt or invalid variant would cost the GPU call its benchmark: each of the CUDA
    lists in the script is a benchmark variant whose options pass the CUDA check."""
    import re

    import torch

    from experiments import benchmark

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    text = SCRIPT.read_text()
    cuda = torch.device("cuda")
    for kind in ("training", "inference"):
        names = re.search(rf"^{kind}=\(([^)]*)\)", text, re.MULTILINE).group(1).split()
        assert names and len(set(names)) == len(names)
        for name in names:
            assert name in benchmark.VARIANTS, name
            benchmark.resolve_variant(name, cuda)[1].check(cuda)
