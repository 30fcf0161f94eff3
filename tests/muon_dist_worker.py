"""20 fp32 steps of the modern family with Muon in one layout, without the Trainer: test_recipe's worker.

    torchrun --nproc-per-node=N tests/muon_dist_worker.py OUT.json DP_REPLICATE DP_SHARD TP
    python tests/muon_dist_worker.py OUT.json 1 1 1        (one process: the reference)

Every layout trains on the same global batches (a pure function of the step; each data-parallel rank
takes its slice) and rank 0 writes the global mean loss of every step, and a checksum of the weights
after the last one, to OUT.json. MUON_WORKER_MODEL (JSON) changes model options, e.g. {"bias": true}.
"""

from __future__ import annotations

import json
import os
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist

from gptrain.distributed import all_reduce_mean, init_distributed, shutdown_distributed
from gptrain.distributed.parallelize import full_value, gradient_sync, parallelize
from gptrain.model import GPT, ModelConfig, model_settings_for
from gptrain.optim import OptimConfig, apply_schedule, build_optimizer, optim_settings_for

STEPS, GLOBAL_BATCH, SEQ, VOCAB = 20, 8, 32, 96


def model_config() -> ModelConfig:
    # A low soft-cap, so that it bends these small logits; padded vocabulary rows, split by TP; value
    # embeddings (an option of the modern family), split by heads under TP.
    small = dict(n_layers=2, n_heads=4, d_model=32, max_position_embeddings=SEQ, logit_softcap=3.0, value_embeds=True)
    extra = json.loads(os.environ.get("MUON_WORKER_MODEL", "{}"))  # other options, e.g. {"norm_weight": true}
    return ModelConfig(**{**model_settings_for("tiny", "modern"), **small, **extra}, vocab_size=VOCAB,
                       pad_vocab_multiple=16)


def optim_config() -> OptimConfig:
    # Momentum warm-up and the schedule's decay both inside the 20 steps, and weight decay on: every part runs.
    # Newton–Schulz in fp32: layouts then agree to rounding, which is what this checks (bf16, the default on
    # a CPU with native bf16, rounds their last-bit differences up to ~5e-5).
    return OptimConfig(**{**optim_settings_for("modern"), "muon_momentum_warmup_steps": 10,
                          "muon_weight_decay": 0.1, "weight_decay": 0.01, "ns_precision": "fp32"})


def batch(step: int) -> torch.Tensor:
    """Rows of arithmetic sequences mod VOCAB (learnable: the loss falls), a fixed function of the step."""
    g = torch.Generator().manual_seed(1000 + step)
    start, stride = torch.randint(0, VOCAB, (2, GLOBAL_BATCH, 1), generator=g)
    return (start + stride % 7 * torch.arange(SEQ + 1)) % VOCAB


def main(out: str, rep: int, shard: int, tp: int) -> None:
    parallel = SimpleNamespace(dp_replicate=rep, dp_shard=shard, tp=tp, use_tensor_parallel=False, timeout=120)
    cfg = model_config()
    info, device = init_distributed("cpu", parallel)
    torch.manual_seed(0)
    model = GPT(cfg)
    wrapped = parallelize(model, info, device)
    ocfg = optim_config()
    optimizer = build_optimizer(model, ocfg, device)
    per_rank = GLOBAL_BATCH // info.dp_world
    losses = []
    for step in range(STEPS):
        apply_schedule(optimizer, step, ocfg, STEPS)
        rows = batch(step)[info.dp_rank * per_rank:(info.dp_rank + 1) * per_rank]
        with gradient_sync(wrapped, sync=True):
            loss = wrapped(rows[:, :-1], rows[:, 1:])
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(all_reduce_mean(loss.detach().clone(), info.dp_group).item())
    checksum = sum(float(full_value(p.detach()).double().abs().sum()) for p in model.parameters())
    if info.is_main:
        with open(out, "w") as f:
            json.dump({"losses": losses, "checksum": checksum, "layout": info.layout.describe()}, f)
    if info.enabled:
        dist.barrier()
    shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:5]))
