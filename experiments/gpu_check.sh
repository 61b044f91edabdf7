#!/usr/bin/env bash
# Issue 3's GPU measurements in one call of at most about 9 minutes, for a lent GPU machine
# (its own python3 and torch; no wandb; the project run from the tree, not installed):
#
#   OUT=/some/dir MNIST_DIR=.gpu/mnist PYTHONPATH=. bash experiments/gpu_check.sh
#
# In order: the GPU tests; the benchmark (eager against the fast path and its variants at
# batch 16 and 64, streaming, forecasts, the data generator); the fast path's memory traffic
# at batch 64; ConvLSTM-S trained for 2 minutes (--time-budget 120) and scored on the fixed
# test set. Each part runs under its own time limit and the next part runs whatever the last
# one did, so a part that hangs or fails costs only its own time. Logs and JSON go to $OUT
# (default gpu-check/), with a summary.txt of each part's exit status and seconds.
# Settings (environment): DEVICE, PRESET, BUDGET (s), SECONDS_PER_ENTRY (the benchmark's
# --seconds), TRAIN_FLAGS (more flags for the budget run, e.g. "--lr 1e-3"), PARTS (which
# parts run, e.g. PARTS=budget-run for a second budget run in another call) and PYTHON.
# DEVICE=cpu with a small preset tries the script out. The budget run's folder is made
# outside $OUT (its checkpoint is large); its metrics, log and GIF are copied in.
set -u
out=${OUT:-gpu-check}
mnist=${MNIST_DIR:-../shared/data/mnist}
device=${DEVICE:-cuda}
preset=${PRESET:-mmnist-convlstm-s}
budget=${BUDGET:-120}
seconds=${SECONDS_PER_ENTRY:-2}
python=${PYTHON:-python3}
mkdir -p "$out"
run=$(mktemp -d)/budget-run
export CONVLSTM_OFFLINE=1 PYTHONUNBUFFERED=1

parts=" ${PARTS:-pytest-gpu benchmark memory-traffic budget-run} "  # which parts run

part() {  # part NAME LIMIT_S COMMAND...: run it, log it, note its status and time
    local name=$1 limit=$2
    shift 2
    [[ "$parts" == *" $name "* ]] || return 0
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc seconds=$((SECONDS - start))" | tee -a "$out/summary.txt"
}

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
    "$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
    for module in numpy cv2 pytest; do  # what the parts below import
        "$python" -c "import $module; print('$module', getattr($module, '__version__', '?'))" \
            2>/dev/null || echo "$module: missing"
    done
} >"$out/machine.txt" 2>&1
cat "$out/machine.txt"

if [ "$device" = cuda ]; then
    part pytest-gpu 100 "$python" -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py
fi
# inference also without compiled gates and without graphs: on the H100 (session 5) the fast
# path forecast slower than eager (870 against 1,161 sequences/s at batch 16)
inference=(eager-fp32 eager-bf16 fast fast-no-fused-gates fast-no-graph)
[ "$device" = cuda ] || inference=(eager-fp32 fast)
part benchmark 240 "$python" -m experiments.benchmark --device "$device" --preset "$preset" \
    --seconds "$seconds" --mnist-dir "$mnist" --out "$out/benchmark.json" \
    --inference-variants "${inference[@]}"
part memory-traffic 60 "$python" -m experiments.memory_traffic --device "$device" \
    --preset "$preset" --variant fast --batch 64
part budget-run $((budget + 100)) "$python" -m experiments.moving_mnist --preset "$preset" \
    --device "$device" --path fast --time-budget "$budget" --wandb disabled \
    --mnist-dir "$mnist" --out "$run" ${TRAIN_FLAGS:-}
cp "$run"/metrics.json "$run"/log.jsonl "$run"/forecast.gif "$out"/ 2>/dev/null
rm -rf "$(dirname "$run")"
[ -f "$out/benchmark.log" ] && tail -n 40 "$out/benchmark.log"
cat "$out/summary.txt"
