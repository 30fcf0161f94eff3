"""Interleaved A/B of training-step variants on the CPU configuration, for a shared, noisy machine.

    OMP_NUM_THREADS=1 python benchmarks/cpu_compile_ab.py eager,whole,block [ROUNDS]

Builds each variant from the same initialisation (6 layers, d_model 384, 6 heads, context 256,
batch 16, vocab 8192, fp32, the trainer's AdamW (fused on CPU), clipping, the trainer's host-memory
settings), warms it up, then runs one training step of each in turn (alternating the order) for
ROUNDS rounds, with a 4096² fp32 matrix product every third round. Prints each variant's fastest
step, its MFU against the fastest matrix product, and the median per-round step-time ratio to the
first variant. Variants: eager, whole (torch.compile of the
whole model, what --compile does in one process), block (each block compiled, what it does under
DDP/FSDP). Suffixes: "+lossN" computes the loss N tokens at a time (--loss-chunk-size N), e.g.
eager,eager+loss1024; "+atengelu" makes the MLP call PyTorch's tanh GELU even when compiled (the code
before gptrain.model.gelu_tanh's sigmoid form), e.g. whole,whole+atengelu.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import types

import torch
import torch.nn.functional as F

from gptrain.config import OptimConfig
from gptrain.host_memory import reuse_freed_memory
from gptrain.metrics import measure_matmul_flops
from gptrain.model import GPT, ModelConfig, flops_per_token
from gptrain.optim import build_optimizer

CFG = ModelConfig(vocab_size=8192, max_position_embeddings=256, n_layers=6, n_heads=6, d_model=384)


def aten_gelu_forward(mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return mlp.dropout(mlp.fc_out(F.gelu(mlp.fc_in(x), approximate="tanh")))


def make_step(variant: str, x: torch.Tensor, y: torch.Tensor):
    kind, *options = variant.split("+")
    torch.manual_seed(0)
    model = GPT(CFG)
    for option in options:
        if option.startswith("loss"):
            model.loss_chunk_size = int(option.removeprefix("loss"))
        elif option == "atengelu":
            for block in model.blocks.values():
                block.mlp.forward = types.MethodType(aten_gelu_forward, block.mlp)
        else:
            raise SystemExit(f"unknown option +{option}: +lossN, +atengelu")
    opt = build_optimizer(model, OptimConfig(lr=1e-3), torch.device("cpu"))
    fwd = model
    if kind == "block":
        for block in model.blocks.values():
            block.compile()
    elif kind == "whole":
        fwd = torch.compile(model)
    elif kind != "eager":
        raise SystemExit(f"unknown variant {kind}: eager, whole, block (each optionally +lossN, +atengelu)")

    def step() -> None:
        fwd(x, y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    print(reuse_freed_memory())  # as `gptrain train` does on CPU
    kinds = sys.argv[1].split(",") if len(sys.argv) > 1 else ["eager", "whole", "block"]
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    batch = torch.randint(0, CFG.vocab_size, (16, 257), generator=torch.Generator().manual_seed(0))
    x, y = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
    fpt = flops_per_token(CFG, 256, GPT(CFG).num_parameters() - 256 * 384)
    steps = {}
    for k in kinds:
        t0 = time.perf_counter()
        steps[k] = make_step(k, x, y)
        for _ in range(2):
            steps[k]()
        print(f"{k}: warm-up {time.perf_counter() - t0:.1f} s", flush=True)
    times: dict[str, list[float]] = {k: [] for k in kinds}
    peaks = []
    for r in range(rounds):
        for k in kinds if r % 2 == 0 else kinds[::-1]:
            t0 = time.perf_counter()
            steps[k]()
            times[k].append(time.perf_counter() - t0)
        if r % 3 == 0:
            peaks.append(measure_matmul_flops(torch.device("cpu"), "fp32", 4096, min_seconds=0))
        print(r, {k: round(v[-1], 2) for k, v in times.items()}, f"load {os.getloadavg()[0]:.1f}", flush=True)
    best_peak = max(peaks)
    print(f"threads {torch.get_num_threads()}, fastest 4096² matmul {best_peak / 1e9:.1f} GFLOP/s "
          f"(all: {', '.join(f'{p / 1e9:.1f}' for p in peaks)})")
    for k in kinds:
        fastest = min(times[k])
        ratio = statistics.median(a / b for a, b in zip(times[k], times[kinds[0]], strict=True))
        print(f"{k:>6}: fastest step {fastest:.2f} s, {16 * 256 / fastest:,.0f} tokens/s, MFU "
              f"{fpt * 16 * 256 / fastest / best_peak:.0%}, median step ratio to {kinds[0]} {ratio:.2f}")


if __name__ == "__main__":
    main()
