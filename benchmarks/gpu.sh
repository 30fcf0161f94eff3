#!/usr/bin/env bash
# GPU benchmark: the gpt2 preset (124M parameters, context 1024, bf16, batch 32) on one CUDA GPU,
# eager and compiled, with and without activation checkpointing; prints the table (Markdown, for
# benchmarks/RESULTS.md). Installs nothing from the network. About 3-5 minutes on an H100/H200.
#
#   bash benchmarks/gpu.sh [RESULTS_JSON]        # default: gpu_bench.json in the current folder
#
# Environment: PYTHON (default python), VARIANTS (default "eager compile ac compile+ac"),
# WINDOWS (5), WINDOW_STEPS (10), BATCH (32).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT_JSON=${1:-gpu_bench.json}
VARIANTS=${VARIANTS:-"eager compile ac compile+ac"}

# gptrain itself only, no dependencies and no build isolation (which would download setuptools):
# the machine has torch, numpy, tokenizers, tqdm and rich. Fall back to the source tree if pip cannot.
if ! "$PY" -m pip install --no-deps --no-build-isolation -q -e . >/dev/null 2>&1; then
    echo "pip install -e . failed; running from src/ instead" >&2
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" - <<'PY' || exit 1
import torch
assert torch.cuda.is_available(), "no CUDA GPU visible"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}, "
      f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
PY
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv,noheader 2>/dev/null || true

# shellcheck disable=SC2086
time "$PY" -m gptrain bench --named gpt2 --device cuda --batch-size "${BATCH:-32}" \
    --variants $VARIANTS --windows "${WINDOWS:-5}" --window-steps "${WINDOW_STEPS:-10}" \
    --markdown --json "$OUT_JSON"
