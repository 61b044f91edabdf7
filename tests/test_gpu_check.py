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
    env.update(PYTHON=sys.executable, MNIST_DIR="")  # "": the embedded digits
    env.update(settings)
    return subprocess.run(
        ["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=300
    )


def test_an_unknown_part_is_refused_before_anything_runs(tmp_path):
    run = _run(tmp_path, PARTS="benchmark bench")
    assert run.returncode == 2
    assert "PARTS: unknown part bench" in run.stdout
    assert not (tmp_path / "out").exists()


def _python_leaving_files(tmp_path) -> Path:
    """A PYTHON for the script that, once the parts have begun, leaves in RESULTS what a budget
    run can: its checkpoint, the temporary file of a save cut short, and a large file."""
    wrapper = tmp_path / "python"
    wrapper.write_text(
        "#!/usr/bin/env bash\n"
        'if [ -f "$RESULTS/summary.txt" ]; then\n'
        '    mkdir -p "$RESULTS/budget-run" && cd "$RESULTS/budget-run" &&\n'
        "    echo weights >checkpoint.pt && echo half >.checkpoint.pt.x1y2.tmp &&\n"
        "    head -c 9000000 /dev/zero >large.bin && cd - >/dev/null\n"
        "fi\n"
        f'exec {sys.executable} "$@"\n'
    )
    wrapper.chmod(0o755)
    return wrapper


def test_a_part_runs_and_is_summed_up(tmp_path, mnist_dir):
    archive = tmp_path / "back" / "check.tgz"
    python = _python_leaving_files(tmp_path)
    named = {} if mnist_dir is None else {"MNIST_DIR": mnist_dir}
    run = _run(
        tmp_path,
        PARTS="memory-traffic conv-rates",
        ARCHIVE=str(archive),
        PYTHON=str(python),
        **named,
    )
    out = tmp_path / "out"
    assert run.returncode == 0, run.stdout + run.stderr
    machine = (out / "machine.txt").read_text()
    assert "imports: ok" in machine
    assert f"MNIST: {mnist_dir}" in machine if mnist_dir else "embedded digits" in machine
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
        # over the device tool's 16 MiB a file, or (a save cut short) as large
        assert not {"checkpoint.pt", ".checkpoint.pt.x1y2.tmp", "large.bin"} & names
        assert packed.extractfile("./left-out.txt").read().decode() == "./budget-run/large.bin\n"
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


def test_results_of_an_earlier_run_are_refused_before_anything_runs(tmp_path):
    earlier = tmp_path / "out" / "summary.txt"
    earlier.parent.mkdir()
    earlier.write_text("conv-rates rc=0 seconds=9\n")
    run = _run(tmp_path, PARTS="conv-rates")
    assert run.returncode == 2
    assert "holds an earlier run's files; name a new folder" in run.stdout
    assert earlier.read_text() == "conv-rates rc=0 seconds=9\n"
    assert [p.name for p in earlier.parent.iterdir()] == ["summary.txt"]


@pytest.mark.parametrize("folder", ["missing", "empty"])
def test_a_named_mnist_folder_that_does_not_load_is_refused_first(tmp_path, folder):
    """Without its digits the budget run's MSE would not be comparable: no silent fallback."""
    (tmp_path / "empty").mkdir()
    run = _run(tmp_path, PARTS="conv-rates", MNIST_DIR=str(tmp_path / folder))
    assert run.returncode == 2
    assert run.stdout.startswith("before the parts: ")
    assert str((tmp_path / folder).resolve()) in run.stdout
    assert len(run.stdout.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_an_archive_over_16_mib_keeps_the_last_one_that_fit(tmp_path):
    """The device tool brings back no file over 16 MiB: parts whose files pack to more (each
    under 8 MiB) leave the archive as it was, and the check fails."""
    wrapper = tmp_path / "python"
    wrapper.write_text(
        "#!/usr/bin/env bash\n"
        'if [ -f "$RESULTS/summary.txt" ]; then\n'
        '    for i in 1 2 3; do head -c 7000000 /dev/urandom >"$RESULTS/noise$i.bin"; done\n'
        "fi\n"
        f'exec {sys.executable} "$@"\n'
    )
    wrapper.chmod(0o755)
    archive = tmp_path / "back" / "check.tgz"
    run = _run(tmp_path, PARTS="conv-rates", ARCHIVE=str(archive), PYTHON=str(wrapper))
    assert run.returncode == 1
    assert "packs to over 16 MiB; " in run.stdout and "keeps the last parts that fit" in run.stdout
    assert "conv-rates rc=0 " in (tmp_path / "out" / "summary.txt").read_text()
    assert archive.stat().st_size < 16 * 2**20 and not (archive.parent / "check.tgz.part").exists()
    with tarfile.open(archive) as packed:  # as packed before the part: the machine's lines
        assert {Path(n).name for n in packed.getnames()} == {
            "machine.txt",
            "summary.txt",
            "left-out.txt",
        }


def test_parts_end_within_the_calls_time(tmp_path):
    """A part that would end after WITHIN seconds from the start is skipped (or cut short)."""
    run = _run(tmp_path, PARTS="conv-rates memory-traffic", WITHIN="12")
    assert run.returncode == 1
    summary = (tmp_path / "out" / "summary.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in summary] == [
        "conv-rates skipped",
        "memory-traffic skipped",
    ]
    assert not (tmp_path / "out" / "conv-rates.log").exists()


@pytest.mark.parametrize("setting", ["WITHIN=ten", "BUDGET=-5", "BUDGET=1.5"])
def test_a_bad_number_is_refused_before_anything_runs(tmp_path, setting):
    name, value = setting.split("=")
    run = _run(tmp_path, PARTS="conv-rates", **{name: value})
    assert run.returncode == 2
    assert run.stdout == f"{name}: whole seconds, got {value}\n"
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
