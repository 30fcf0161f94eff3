#!/usr/bin/env bash
# Where the time of a compiled gpt2 step goes on one CUDA GPU, and which settings buy some of it back: the
# measurements the issue's ≥ 50% MFU target (gpt2, compiled) needs next. Installs nothing from the network.
#
# Made to fit one call of a lent GPU machine (a task gets 15 minutes of device time in all, the machine's
# start included, and one command may run 10): the whole probe keeps within BUDGET seconds (default 540).
# Steps run in the order of STEPS, most decisive first; a step starts only while the budget still holds its
# usual duration, and is cut at what remains. Each step writes its files at once, and with ARCHIVE set the
# folder is packed into that one .tar.gz after every step, so a run cut short keeps what it measured (the
# device machine returns at most 8 files). The last thing printed is the table of every finished benchmark
# step against `base` (benchmarks/probe_summary.py).
#
#   bash benchmarks/gpu_probe.sh [DIR]                                  # default: gpu_probe/
#   ARCHIVE=$OUT/probe.tar.gz bash benchmarks/gpu_probe.sh /tmp/probe    # on the lent machine
#
# Steps (default order; usual duration / limit on an H100/H200, most of it compilation):
#   base      `gptrain bench --named gpt2 --variants compile` (batch 32, bf16): the figure to beat (60 / 150 s)
#   cudnn     base with --attention-backend cudnn: cuDNN's fused attention instead of PyTorch's choice (60 / 150 s)
#   loss      base with --loss-chunk-size 4096: the head and cross-entropy 4,096 tokens at a time, no
#             (tokens × vocab) logits kept; if as fast and smaller, the CUDA default (60 / 150 s)
#   best      base at batch 64 (per-step costs such as the optimizer and clipping halved per token) with what
#             won above: --attention-backend cudnn if `cudnn` beat `base`, --loss-chunk-size 4096 if `loss` was
#             within 1% of `base` or faster (70 / 150 s)
#   profile   one profiled compiled run: kernel time by kind (matrix products / attention / compiled kernels /
#             optimizer / copies), the five most expensive kernels; Chrome trace in DIR/profile (45 / 150 s)
#   syncs     benchmarks/gpu_sync_check.py: no host-device synchronisation outside log, evaluation and
#             checkpoint steps (eager and compiled, a 2-layer gpt2-shaped model) (60 / 180 s)
#   parts     benchmarks/step_parts.py: each matrix product, attention under every SDPA backend, the head and
#             loss (plain and chunked) timed alone at the step's shapes, their sum against base's step (40 / 120 s)
#   rest      the other variants of benchmarks/gpu.sh (eager, ac, compile+ac): with base, its whole table (120 / 240 s)
#   cdt       base with TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1 (Triton launch configs tuned) (150 / 300 s)
#   autotune  base with TORCHINDUCTOR_MAX_AUTOTUNE_GEMM=1 (Triton GEMM templates compete with cuBLAS) (180 / 300 s)
#
# Environment: PYTHON (python, else python3), STEPS, BUDGET (540), ARCHIVE (unset: no archive), NAMED (gpt2), DEVICE (cuda),
# BATCH (32), WINDOWS (3), WINDOW_STEPS (10), PARTS_ARGS (extra step_parts.py flags; defaults: the gpt2 shape).
# A CPU dry run of the script itself: NAMED=smoke DEVICE=cpu BATCH=4 WINDOW_STEPS=8 PARTS_ARGS="--seq-len 64
# --n-layers 2 --d-model 64 --n-heads 2 --vocab 512 --precision fp32 --loss-chunks 64" bash benchmarks/gpu_probe.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python || command -v python3)}
STEPS=${STEPS:-"base cudnn loss best profile syncs parts rest cdt autotune"}
BUDGET=${BUDGET:-540}
DIR=$(mkdir -p "${1:-gpu_probe}" && cd "${1:-gpu_probe}" && pwd)

if ! "$PY" -m pip install --no-deps --no-build-isolation -q -e . >/dev/null 2>&1; then
    echo "pip install -e . failed; running from src/ instead" >&2
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda,
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv,noheader 2>/dev/null || true

LIMIT=0
fits() {  # fits NAME USUAL_S MAX_S: may the step start? Sets LIMIT to its time limit (the budget's remainder at most).
    local left=$((BUDGET - SECONDS))
    if [ "$left" -lt "$2" ]; then
        echo "=== $1 skipped: ${left} s of the ${BUDGET} s budget left, it usually takes $2 s"
        return 1
    fi
    LIMIT=$(( $3 < left ? $3 : left ))
}

pack() {  # the folder into $ARCHIVE (one file); without the profiler trace if that would make it too large
    [ -n "${ARCHIVE:-}" ] || return 0
    tar czf "$ARCHIVE.tmp" -C "$DIR" . 2>/dev/null
    if [ "$(stat -c %s "$ARCHIVE.tmp" 2>/dev/null || echo 0)" -gt 15000000 ]; then
        tar czf "$ARCHIVE.tmp" -C "$DIR" --exclude=./profile . 2>/dev/null
    fi
    mv "$ARCHIVE.tmp" "$ARCHIVE"
}

faster() {  # faster STEP FACTOR: did STEP's tokens/s reach FACTOR × base's? (no: either did not finish)
    "$PY" -c "import json, sys; tps = lambda s: json.load(open('$DIR/' + s + '.json'))[0]['tokens_per_sec']
sys.exit(0 if tps('$1') >= $2 * tps('base') else 1)" 2>/dev/null
}

bench() {  # bench NAME USUAL_S MAX_S [ENV=VALUE ...] -- [extra gptrain flags]
    local name=$1 usual=$2 max=$3; shift 3
    local envs=()
    while [ $# -gt 0 ] && [ "$1" != "--" ]; do envs+=("$1"); shift; done
    [ "${1:-}" = "--" ] && shift
    fits "$name" "$usual" "$max" || return 0
    echo "=== $name ${envs[*]:-} $* (limit ${LIMIT} s)"
    local start=$SECONDS
    env "${envs[@]}" timeout "$LIMIT" "$PY" -m gptrain bench --named "${NAMED:-gpt2}" --device "${DEVICE:-cuda}" \
        --batch-size "${BATCH:-32}" --variants compile --windows "${WINDOWS:-3}" \
        --window-steps "${WINDOW_STEPS:-10}" --markdown --json "$DIR/$name.json" "$@" 2>&1 | tee "$DIR/$name.log" \
        | grep -v "^    "  # the child's own (indented) lines stay in the log; the table is printed
    local rc=${PIPESTATUS[0]}
    echo "=== $name: $((SECONDS - start)) s (exit $rc)"
}

for step in $STEPS; do
    case $step in
        base) bench base 60 150 ;;
        loss) bench loss 60 150 -- --loss-chunk-size 4096 ;;
        cudnn) bench cudnn 60 150 -- --attention-backend cudnn ;;
        profile)
            # Steps 4-6 are recorded: after compilation (step 1), before the first log step, whose matmul-peak
            # measurement would otherwise be traced too (so WINDOW_STEPS must be at least 7). Its timing is not
            # a benchmark figure, so its JSON goes under the trace's folder, out of the summary's table.
            mkdir -p "$DIR/profile"
            bench profile 45 150 -- --windows 1 --use-profiler --profile-wait 2 --profile-warmup 1 \
                --profile-active 3 --profile-repeat 1 --profile-dir "$DIR/profile"
            mv -f "$DIR/profile.json" "$DIR/profile/bench.json" 2>/dev/null
            grep -A 12 "profile (rank" "$DIR/profile.log" | sed 's/^    //' || true ;;
        syncs)
            fits syncs 60 180 || continue
            echo "=== syncs (limit ${LIMIT} s)"
            timeout "$LIMIT" "$PY" benchmarks/gpu_sync_check.py 2>&1 | tee "$DIR/syncs.log" ;;
        parts)
            fits parts 40 120 || continue
            echo "=== parts (limit ${LIMIT} s)"
            step_ms=$("$PY" -c "import json; print(json.load(open('$DIR/base.json'))[0]['step_time'] * 1000)" \
                2>/dev/null || echo "")
            # shellcheck disable=SC2086
            timeout "$LIMIT" "$PY" benchmarks/step_parts.py --device "${DEVICE:-cuda}" --batch "${BATCH:-32}" \
                ${step_ms:+--step-ms "$step_ms"} ${PARTS_ARGS:-} 2>&1 | tee "$DIR/parts.log" ;;
        best)
            winners=()
            faster cudnn 1.0 && winners+=(--attention-backend cudnn)
            faster loss 0.99 && winners+=(--loss-chunk-size 4096)
            BATCH=$((2 * ${BATCH:-32})) bench best 70 150 -- "${winners[@]}" ;;
        rest) bench rest 120 240 -- --variants eager ac compile+ac ;;
        cdt) bench cdt 150 300 TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1 ;;
        autotune) bench autotune 180 300 TORCHINDUCTOR_MAX_AUTOTUNE_GEMM=1 ;;
        *) echo "unknown step: $step" >&2 ;;
    esac
    pack
done

echo "=== summary ($SECONDS s of the ${BUDGET} s budget)"
"$PY" benchmarks/probe_summary.py "$DIR"
pack
