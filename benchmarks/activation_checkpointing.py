"""Peak memory saved and time spent by activation checkpointing (--ac none|full|selective).

Each mode runs in a fresh process (so one mode's allocations cannot hide another's): build the
model and AdamW, one warm-up step (allocates gradients and optimizer state), then measure
`--steps` training steps (forward + backward + optimizer) on random tokens.

Peak memory is the growth above the memory held before the step (weights, gradients, optimizer
state), i.e. the activations and temporaries of one step:
- CUDA: torch.cuda.max_memory_allocated() - memory_allocated() before the step;
- CPU: peak resident set size (VmHWM, reset through /proc/self/clear_refs) - VmRSS before the step,
  with glibc's mmap threshold pinned so freed activations go back to the OS between steps.

    python benchmarks/activation_checkpointing.py                  # CPU, a config where activations dominate
    python benchmarks/activation_checkpointing.py --device cuda --d-model 1024 --n-layers 12 --seq-len 1024
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def _proc_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def measure(args) -> dict:
    import torch

    from gptrain.config import OptimConfig
    from gptrain.distributed.parallelize import apply_activation_checkpointing
    from gptrain.model import GPT, ModelConfig
    from gptrain.optim import build_optimizer

    torch.manual_seed(0)
    device = torch.device(args.device)
    cfg = ModelConfig(vocab_size=args.vocab, max_position_embeddings=args.seq_len, n_layers=args.n_layers,
                      n_heads=args.n_heads, d_model=args.d_model)
    model = GPT(cfg).to(device)
    if args.ac != "none":
        apply_activation_checkpointing(model, args.ac)
    opt = build_optimizer(model, OptimConfig(), device)
    x = torch.randint(0, args.vocab, (args.batch, args.seq_len), device=device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None

    def step():
        if amp is not None:
            with amp:
                loss = model(x, x)
        else:
            loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # keep gradients allocated: the baseline holds them
        return loss

    step()
    peaks, times = [], []
    for _ in range(args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            base = _proc_kib("VmRSS") * 1024
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _proc_kib("VmHWM") * 1024
        peaks.append(peak - base)
    return {"ac": args.ac, "peak_step_mb": statistics.median(peaks) / 2**20, "step_s": statistics.median(times)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--ac", default=None, help="measure one mode in this process (used internally)")
    args = p.parse_args()
    if args.ac:
        print(json.dumps(measure(args)))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    rows = []
    for ac in ("none", "selective", "full"):
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--ac", ac], capture_output=True, text=True,
                             env=env, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    import torch

    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}: "
          f"{args.n_layers} layers, d_model {args.d_model}, {args.n_heads} heads, batch {args.batch} × "
          f"seq {args.seq_len}, vocab {args.vocab}; median of {args.steps} steps after one warm-up")
    base = rows[0]
    print("| --ac | peak memory of a step (MiB) | vs none | step time (s) | vs none |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['ac']} | {r['peak_step_mb']:.0f} | {r['peak_step_mb'] / base['peak_step_mb']:.2f}× | "
              f"{r['step_s']:.3f} | {r['step_s'] / base['step_s']:.2f}× |")


if __name__ == "__main__":
    main()
