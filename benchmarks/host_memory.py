"""What glibc's malloc defaults cost a CPU training step, and what `gptrain.host_memory` gets back.

    python benchmarks/host_memory.py                    # eager and compiled, 2 rounds, 6 steps each
    python benchmarks/host_memory.py --variants eager --rounds 3 --steps 8

Each measurement is a fresh child process (the malloc settings are process-wide and cannot be taken
back), training the CPU reference configuration (6 layers, d_model 384, 6 heads, context 256, batch
16, vocab 8192, fp32, the trainer's AdamW and clipping) for 2 warm-up steps and then --steps timed
steps, with a 4096² fp32 matrix product between every other step. The children alternate: glibc's
defaults, then gptrain's settings, for each variant, --rounds times. Per step: wall time (median),
minor page faults (fresh zeroed pages from the kernel) and kernel CPU time; MFU against the median
matrix product of the same child.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = """
import json, resource, statistics, sys, time
mode, variant, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
from gptrain.host_memory import host_allocator, reuse_freed_memory
if mode == "reuse":
    reuse_freed_memory()
import torch
from gptrain.config import OptimConfig
from gptrain.metrics import measure_matmul_flops
from gptrain.model import GPT, ModelConfig, flops_per_token
from gptrain.optim import build_optimizer

cfg = ModelConfig(vocab_size=8192, max_position_embeddings=256, n_layers=6, n_heads=6, d_model=384)
torch.manual_seed(0)
model = GPT(cfg)
opt = build_optimizer(model, OptimConfig(), torch.device("cpu"))
forward = torch.compile(model) if variant == "compile" else model
batch = torch.randint(0, cfg.vocab_size, (16, 257), generator=torch.Generator().manual_seed(0))
x, y = batch[:, :-1], batch[:, 1:]

def step():
    forward(x, y).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
    opt.step()
    opt.zero_grad(set_to_none=True)

for _ in range(2):
    step()
times, faults, kernel, peaks = [], [], [], []
for i in range(steps):
    before, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    step()
    after = resource.getrusage(resource.RUSAGE_SELF)
    times.append(time.perf_counter() - t0)
    faults.append(after.ru_minflt - before.ru_minflt)
    kernel.append(after.ru_stime - before.ru_stime)
    if i % 2 == 0:
        peaks.append(measure_matmul_flops(torch.device("cpu"), "fp32", 4096, min_seconds=0))
fpt = flops_per_token(cfg, 256, model.num_parameters() - model.pos_emb.weight.numel())
step_s = statistics.median(times)
print(json.dumps({"allocator": host_allocator(), "step_s": step_s, "faults": statistics.median(faults),
                  "kernel_s": statistics.median(kernel), "peak": statistics.median(peaks),
                  "mfu": fpt * 16 * 256 / step_s / statistics.median(peaks)}))
"""


def run_child(mode: str, variant: str, steps: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode, variant, str(steps)], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"child failed ({mode}, {variant}):\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=["eager", "compile"], choices=["eager", "compile"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    print(f"{os.cpu_count()} CPUs, python {sys.version.split()[0]}", flush=True)
    print("| variant | round | malloc | median step (s) | page faults / step | kernel time / step (s) | "
          "matmul peak | MFU |")
    print("|---|---|---|---|---|---|---|---|")
    for variant in args.variants:
        for r in range(args.rounds):
            for mode in ("system", "reuse"):
                res = run_child(mode, variant, args.steps)
                label = "glibc defaults" if mode == "system" else "reused (gptrain)"
                print(f"| {variant} | {r + 1} | {label} | {res['step_s']:.3f} | {res['faults']:,.0f} | "
                      f"{res['kernel_s']:.3f} | {res['peak'] / 1e9:.0f}G | {100 * res['mfu']:.1f}% |", flush=True)


if __name__ == "__main__":
    main()
