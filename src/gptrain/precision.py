"""Training precision: the names a run accepts, their dtypes, and what `auto` means on a device."""

from __future__ import annotations

import contextlib

import torch

from gptrain.errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(requested: str, device: torch.device, warn) -> str:
    """auto: bf16 on GPUs that have it, else fp32. fp16 needs CUDA; bf16 on CPU works but is warned about."""
    if requested == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp32"
    if requested == "bf16" and device.type == "cpu":
        warn("bf16 on CPU: matrix products without native bf16 run hundreds of times slower than fp32.")
    if requested == "fp16" and device.type == "cpu":
        raise UserError("--precision fp16 needs a CUDA GPU. Use fp32 (or bf16) on CPU.")
    return requested


def autocast_for(precision: str, device: torch.device):
    """A factory of the forward pass's autocast context (nothing to do in fp32)."""
    if precision in ("bf16", "fp16"):
        return lambda: torch.autocast(device.type, dtype=DTYPES[precision])
    return contextlib.nullcontext
