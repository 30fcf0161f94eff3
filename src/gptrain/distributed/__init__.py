"""Process groups and the wrapping of the model for data, fully-sharded and tensor parallelism.

A single process is the degenerate case of every function here: world size 1, rank 0, the
model returned unchanged. The trainer calls the same functions in every layout.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    dp_rank: int = 0  # rank among data-parallel replicas/shards
    dp_world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_spec: str) -> tuple[DistInfo, torch.device]:
    """Pick the device; join the process group when launched by torchrun with several processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_spec, local_rank)
    if world == 1:
        return DistInfo(), device
    raise NotImplementedError("multi-process training is not built yet")  # replaced by the parallel layer


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    from gptrain.errors import UserError

    if spec == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UserError(f"unknown --device '{spec}'. Use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for but no CUDA GPU is visible. Use --device cpu.")
        if device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    return device


def is_main_process() -> bool:
    """Global rank 0, from torch.distributed itself (not LOCAL_RANK)."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.AVG if dist.get_backend() == "nccl" else dist.ReduceOp.SUM)
        if dist.get_backend() != "nccl":
            t /= dist.get_world_size()
    return t
