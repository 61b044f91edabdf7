#!/usr/bin/env bash
# Issue 3's GPU measurements in one call of about 9.5 minutes at most, for a lent GPU machine
# (its own python3 and torch; no wandb; the project run from the tree, not installed):
#
#   RESULTS=/tmp/gpu-check ARCHIVE=$OUT/gpu-check.tgz MNIST_DIR=.gpu/mnist PYTHONPATH=. \
#       bash experiments/gpu_check.sh
#
# In order: the GPU tests; the benchmark (eager bf16 against the fast path and the variants
# still to be decided between, at batch 16 and 64; streaming and forecasts, also without
# compiled gates and without graphs; the data generator); ConvLSTM-S trained for 2 minutes
# (--time-budget 120) and scored on the fixed test set; the step convolutions' forward and
# backward rates (experiments.conv_rates: the data gradient also as a forward convolution).
# Each part runs under its own time limit (together under the device's 10 minutes per call)
# and the next part runs whatever the last one did. Logs and JSON go to $RESULTS (default
# gpu-check/) with a summary.txt of each part's exit status and seconds; the exit status is
# 1 if any part failed. ARCHIVE (a .tgz path outside RESULTS): RESULTS packed into it after
# each part, so that one file holds everything (the device tool brings back at most 8 files)
# and a call stopped at its limit keeps the parts done.
#
# Settings (environment): DEVICE, PRESET, BUDGET (s), SECONDS_PER_ENTRY (the benchmark's
# --seconds), TRAIN_FLAGS (more flags for the budget run, e.g. "--lr 1e-3"), PARTS (which
# parts run, of pytest-gpu benchmark budget-run conv-rates memory-traffic; the last is not run
# unless named, since `memory_traffic --options-of cuda` traces the GPU path on a CPU; e.g.
# PARTS=budget-run to run one part again, into a new RESULTS) and PYTHON. DEVICE=cpu with a
# small preset tries the script out. RESULTS must be new or empty (an earlier run's files
# would be packed as this run's). MNIST_DIR: a folder of the four MNIST files (on the GPU
# machine a copy carried along, e.g. in .gpu/, which .gitignore keeps out of git), checked
# before anything runs; unset, ../shared/data/mnist where it exists; empty, the digits
# embedded in the repo. The budget run writes into $RESULTS/budget-run, its checkpoint (large)
# deleted at the end; it follows the benchmark, whose compiled kernels it finds in Inductor's
# cache on disk (run alone on a fresh machine, it compiles them within its budget). The
# archive leaves out checkpoints (*.pt, and *.tmp, a save cut short) and any file over 8 MiB
# (named in left-out.txt), to stay within the device tool's 16 MiB a file; where RESULTS
# packs to over 16 MiB, the archive keeps the last parts that fit. Limits: 550 s for the
# default parts plus 5 s of grace each, and 60 s at most for the checks and the machine's
# description (seconds, normally); every part ends within WITHIN seconds (590) of the start,
# its limit cut, or it is skipped, where earlier ones ran long: call it with timeout_s=600.
set -u
cd "$(dirname "$0")/.." || exit 2
out=${RESULTS:-gpu-check}
archive=${ARCHIVE:-}
if [ "${MNIST_DIR+set}" = set ]; then mnist=$MNIST_DIR named=1; else
    mnist=../shared/data/mnist named=0
fi
device=${DEVICE:-cuda}
preset=${PRESET:-mmnist-convlstm-s}
budget=${BUDGET:-120}
seconds=${SECONDS_PER_ENTRY:-2}
python=${PYTHON:-python3}
within=${WITHIN:-590}
parts=" $(echo ${PARTS:-pytest-gpu benchmark budget-run conv-rates}) "
for setting in "BUDGET=$budget" "WITHIN=$within"; do
    case ${setting#*=} in
    '' | *[!0-9]*)
        echo "${setting%%=*}: whole seconds, got ${setting#*=}"
        exit 2
        ;;
    esac
done
for name in $parts; do
    case $name in
    pytest-gpu | benchmark | budget-run | conv-rates | memory-traffic) ;;
    *)
        echo "PARTS: unknown part $name (pytest-gpu, benchmark, budget-run, conv-rates," \
            "memory-traffic)"
        exit 2
        ;;
    esac
done
if [ -n "$archive" ]; then
    case $archive in
    *.tgz) ;;
    *)
        echo "ARCHIVE: a .tgz path, got $archive"
        exit 2
        ;;
    esac
    archive=$(realpath -m "$archive")
    if [[ "$archive" == "$(realpath -m "$out")"/* ]]; then
        echo "ARCHIVE: must lie outside RESULTS ($out)"
        exit 2
    fi
    mkdir -p "$(dirname "$archive")" || exit 2
fi
if [ -n "$(ls -A "$out" 2>/dev/null)" ]; then
    echo "RESULTS: $out holds an earlier run's files; name a new folder"
    exit 2
fi
export CONVLSTM_OFFLINE=1 PYTHONUNBUFFERED=1
data=()
if [ -n "$mnist" ] && { [ "$named" = 1 ] || [ -d "$mnist" ]; }; then data=(--mnist-dir "$mnist"); fi
# what every part imports, and the MNIST folder's two splits: a failure here would fail them all
check="import sys, torch, convlstm.training, experiments.benchmark, experiments.moving_mnist
print('torch', torch.__version__, 'cuda', torch.version.cuda)
print('imports: ok')
if len(sys.argv) > 1:
    from datasets.mnist import load_mnist
    for split in ('train', 'test'): load_mnist(split, sys.argv[1])
    print('MNIST:', sys.argv[1])
else:
    print('MNIST: none named, embedded digits')"
checked=$(timeout 45 "$python" -c "$check" ${data[@]+"$mnist"} 2>&1)
case $? in
0) ;;
124)
    echo "before the parts: the check of imports and MNIST took over 45 s"
    exit 2
    ;;
*)
    echo "before the parts: ${checked##*$'\n'}"
    exit 2
    ;;
esac
mkdir -p "$out" || exit 2
: >"$out/summary.txt"
failed=0

pack() { # RESULTS into ARCHIVE, if asked for (a new file, then renamed: never half-written),
    # without checkpoints (ConvLSTM-S's is about 140 MB: over the device tool's 16 MiB a file)
    # or files over 8 MiB, which left-out.txt names
    # (an archive over 16 MiB would not come back: the last one is kept instead)
    [ -n "$archive" ] || return 0
    (cd "$out" && find . -type f ! -name '*.pt' ! -name '*.tmp' -size +8M) >"$out/left-out.txt"
    if ! (cd "$out" && find . -type f ! -name '*.pt' ! -name '*.tmp' ! -size +8M -print0 |
        tar -czf "$archive.part" --null -T -); then
        echo "ARCHIVE: packing $out into $archive failed"
        rm -f "$archive.part"
        failed=1
    elif [ "$(stat -c %s "$archive.part")" -gt $((16 * 1024 * 1024)) ]; then
        echo "ARCHIVE: $out packs to over 16 MiB; $archive keeps the last parts that fit"
        rm -f "$archive.part"
        failed=1
    elif ! mv -f "$archive.part" "$archive"; then
        echo "ARCHIVE: packing $out into $archive failed"
        failed=1
    fi
}

part() { # part NAME LIMIT_S COMMAND...: run it, log it, note its status and time; within
    # the call's time left (WITHIN seconds from the start), or skipped with under 10 s of it
    local name=$1 limit=$2
    shift 2
    [[ "$parts" == *" $name "* ]] || return 0
    local left=$((within - SECONDS - 5))
    if [ "$left" -lt 10 ]; then
        echo "$name skipped: ${left} s left of WITHIN=$within" | tee -a "$out/summary.txt"
        failed=1
        return 0
    fi
    [ "$limit" -le "$left" ] || limit=$left
    local start=$SECONDS
    timeout --kill-after=5 "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    [ "$rc" = 0 ] || failed=1
    echo "$name rc=$rc seconds=$((SECONDS - start))" | tee -a "$out/summary.txt"
    pack
}

{
    date -u
    timeout 15 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
    echo "$checked"
} >"$out/machine.txt" 2>&1
cat "$out/machine.txt"
pack

if [[ "$device" == cuda* ]]; then
    # each test's outcome as it ends (-v), and a limit per test where pytest-timeout is there,
    # so that one hung test neither takes the part's time nor hides the others' results; the
    # two quick files first (test_gpu.py trains, and compiles the gate kernels from cold)
    per_test=()
    "$python" -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout 80)
    part pytest-gpu 125 "$python" -m pytest -m gpu -v --tb=short -p no:cacheprovider \
        ${per_test[@]+"${per_test[@]}"} tests/test_radar_synthetic.py \
        tests/test_verification.py tests/test_gpu.py
fi
training=(eager-bf16 fast fast-no-low-precision-h fast-no-hoist fast-with-batched-wgrad
    fast-with-forward-dgrad fast-with-batched-wgrad-forward-dgrad)
inference=(eager-bf16 fast fast-no-fused-gates fast-no-graph)
if [[ "$device" != cuda* ]]; then training=(eager-fp32 fast) inference=(eager-fp32 fast); fi
# (session 5's H100 measured the other variants: eager fp32, without the graph, without
# compiled gates, checkpointing; its fast path forecast slower than eager, 870 against 1,021
# sequences/s in bf16 at batch 16, hence the inference variants)
part benchmark 220 "$python" -m experiments.benchmark --device "$device" --preset "$preset" \
    --seconds "$seconds" ${data[@]+"${data[@]}"} --out "$out/benchmark.json" \
    --variants "${training[@]}" --inference-variants "${inference[@]}"
# shellcheck disable=SC2086  # TRAIN_FLAGS: several flags
part budget-run $((budget + 60)) "$python" -m experiments.moving_mnist --preset "$preset" \
    --device "$device" --path fast --time-budget "$budget" --wandb disabled \
    ${data[@]+"${data[@]}"} --checkpoint-every 0 --out "$out/budget-run" ${TRAIN_FLAGS:-}
rm -f "$out/budget-run/checkpoint.pt"
rates=(--batch-sizes 16 64)
if [[ "$device" != cuda* ]]; then rates=(--batch-sizes 2 --steps 3); fi
part conv-rates 25 "$python" -m experiments.conv_rates --device "$device" --preset "$preset" \
    "${rates[@]}" --seconds 0.1 --out "$out/conv-rates.json"
part memory-traffic 30 "$python" -m experiments.memory_traffic --device "$device" \
    --preset "$preset" --variant fast --batch 64
[ -f "$out/benchmark.log" ] && tail -n 30 "$out/benchmark.log"
cat "$out/summary.txt"
exit "$failed"
