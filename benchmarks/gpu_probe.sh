#!/usr/bin/env bash
# Where the time of a compiled gpt2 step goes on one CUDA GPU, and whether Inductor's tuning options
# buy some of it back: the measurements the issue's ≥ 50% MFU target (gpt2, compiled) needs next.
# About 8-12 minutes on an H100/H200, most of it compilation; installs nothing from the network. The
# steps run in order of what they can change (first the figure and the two settings that could become
# defaults on CUDA, then the checks and diagnostics), each writing its files at once, so a run cut short by
# a device call's 10-minute limit keeps what it measured. Or split it so each call's step limits fit in
# 10 minutes: STEPS="base loss cudnn" (3 × 150 s at most), then STEPS="syncs parts profile" (450 s), then
# STEPS="cdt autotune" (540 s).
#
#   bash benchmarks/gpu_probe.sh [OUT_DIR]        # default: gpu_probe/ (tables, JSON, profiler trace)
#
# Steps (STEPS="base loss cudnn syncs parts profile cdt autotune" by default; each under its own time limit):
#   syncs     benchmarks/gpu_sync_check.py: no host-device synchronisation in the hot loop (eager and compiled,
#             a 2-layer gpt2-shaped model; torch.cuda.set_sync_debug_mode outside log/eval/checkpoint steps)
#   base      `gptrain bench --named gpt2 --variants compile` (batch 32, bf16): the figure to beat
#   parts     benchmarks/step_parts.py: each linear layer, attention (every SDPA backend), the LM head and
#             the cross-entropy (also together: plain and chunked) timed alone at the step's shapes, their FLOP/s, and their sum against the
#             measured step (the rest: norms, GELU, adds, casts, optimizer)
#   profile   one profiled compiled run: the step split into data / forward / backward / optimizer and,
#             by kernel kind, into matrix products / attention / compiled kernels / optimizer / copies,
#             with the five most expensive kernels (gptrain.profiling); the Chrome trace goes to OUT_DIR.
#   cudnn     base again, with --attention-backend cudnn (cuDNN's fused attention instead of PyTorch's choice)
#   loss      base again, with --loss-chunk-size 4096 (the head and cross-entropy 4,096 tokens at a time,
#             no (tokens × vocab) logits kept: compare speed and peak memory with base)
#   cdt       base again, with TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1 (Triton launch configs tuned)
#   autotune  base again, with TORCHINDUCTOR_MAX_AUTOTUNE_GEMM=1 (Triton GEMM templates compete with cuBLAS)
# How to read it: parts gives each matrix product its own FLOP/s; if they are near the measured matmul
# peak, the rest of the step (attention, the fused elementwise kernels, the optimizer) is the lever.
#
# Environment: PYTHON (python), NAMED (gpt2), DEVICE (cuda), BATCH (32), WINDOWS (3), WINDOW_STEPS (10),
# PARTS_ARGS (extra step_parts.py flags: its defaults are the gpt2 shape).
# A CPU dry run of the script itself: NAMED=smoke DEVICE=cpu BATCH=4 WINDOW_STEPS=8 PARTS_ARGS="--seq-len 64
# --n-layers 2 --d-model 64 --n-heads 2 --vocab 512 --precision fp32" bash benchmarks/gpu_probe.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
STEPS=${STEPS:-"base loss cudnn syncs parts profile cdt autotune"}
OUT=$(mkdir -p "${1:-gpu_probe}" && cd "${1:-gpu_probe}" && pwd)

if ! "$PY" -m pip install --no-deps --no-build-isolation -q -e . >/dev/null 2>&1; then
    echo "pip install -e . failed; running from src/ instead" >&2
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda,
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv,noheader 2>/dev/null || true

bench() {  # bench NAME LIMIT_S [ENV=VALUE ...] -- [extra gptrain flags]
    local name=$1 limit=$2; shift 2
    local envs=()
    while [ $# -gt 0 ] && [ "$1" != "--" ]; do envs+=("$1"); shift; done
    [ "${1:-}" = "--" ] && shift
    echo "=== $name ${envs[*]:-} $*"
    local start=$SECONDS
    env "${envs[@]}" timeout "$limit" "$PY" -m gptrain bench --named "${NAMED:-gpt2}" --device "${DEVICE:-cuda}" \
        --batch-size "${BATCH:-32}" --variants compile --windows "${WINDOWS:-3}" \
        --window-steps "${WINDOW_STEPS:-10}" --markdown --json "$OUT/$name.json" "$@" 2>&1 | tee "$OUT/$name.log" \
        | grep -v "^    "  # the child's own (indented) lines stay in the log; the table is printed
    local rc=${PIPESTATUS[0]}
    echo "=== $name: $((SECONDS - start)) s (exit $rc)"
}

for step in $STEPS; do
    case $step in
        syncs)
            echo "=== syncs"
            timeout 180 "$PY" benchmarks/gpu_sync_check.py 2>&1 | tee "$OUT/syncs.log" ;;
        base) bench base 150 ;;
        parts)
            echo "=== parts"
            step_ms=$("$PY" -c "import json; print(json.load(open('$OUT/base.json'))[0]['step_time'] * 1000)" \
                2>/dev/null || echo "")
            timeout 120 "$PY" benchmarks/step_parts.py --device "${DEVICE:-cuda}" --batch "${BATCH:-32}" \
                ${step_ms:+--step-ms "$step_ms"} ${PARTS_ARGS:-} 2>&1 | tee "$OUT/parts.log" ;;
        cudnn) bench cudnn 150 -- --attention-backend cudnn ;;
        loss) bench loss 150 -- --loss-chunk-size 4096 ;;
        cdt) bench cdt 240 TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1 ;;
        autotune) bench autotune 300 TORCHINDUCTOR_MAX_AUTOTUNE_GEMM=1 ;;
        profile)
            # Steps 4-6 are recorded: after compilation (step 1), before the first log step, whose matmul-peak
            # measurement would otherwise be traced too (so WINDOW_STEPS must be at least 7). Its timing is not
            # a benchmark figure. The summary is printed by the child, so its lines are shown here.
            bench profile 150 -- --windows 1 --use-profiler --profile-wait 2 --profile-warmup 1 \
                --profile-active 3 --profile-repeat 1 --profile-dir "$OUT/profile"
            grep -A 12 "profile (rank" "$OUT/profile.log" | sed 's/^    //' || true ;;
        *) echo "unknown step: $step" >&2 ;;
    esac
done
