"""AdamW with decoupled weight decay on ≥2-D weights only, and learning-rate schedules.

Schedules are pure functions of the step, so resuming needs no scheduler state beyond the
step itself, and changing --num-steps on resume simply reshapes the rest of the curve.
"""

from __future__ import annotations

import math

import torch

from gptrain.config import OptimConfig

FUSED_DEVICES = ("cuda", "cpu")


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() yields a tied weight once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # The fused kernel updates every parameter in one pass (one launch on CUDA): on CPU it took 6 ms
    # per step of the 14M-parameter reference model against 40 ms for foreach. Other devices: foreach.
    fused = device.type in FUSED_DEVICES
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused, foreach=None if fused else True
    )


def lr_at(step: int, cfg: OptimConfig, num_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based)."""
    peak = cfg.lr
    floor = cfg.min_lr if cfg.min_lr is not None else peak / 10
    warmup = min(cfg.warmup_steps, num_steps)
    if step < warmup:
        return peak * (step + 1) / warmup
    if cfg.lr_scheduler == "constant":
        return peak
    if step >= num_steps:
        return floor
    if cfg.lr_scheduler == "cosine":
        progress = (step - warmup) / max(1, num_steps - warmup)
        return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))
    if cfg.lr_scheduler == "linear":
        progress = (step - warmup) / max(1, num_steps - warmup)
        return peak + (floor - peak) * progress
    if cfg.lr_scheduler == "wsd":  # warmup, stable, then linear decay over the last fraction
        decay_steps = max(1, round(cfg.decay_fraction * num_steps))
        decay_start = max(warmup, num_steps - decay_steps)
        if step < decay_start:
            return peak
        progress = (step - decay_start) / max(1, num_steps - decay_start)
        return peak + (floor - peak) * progress
    raise ValueError(f"unknown lr schedule {cfg.lr_scheduler}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
