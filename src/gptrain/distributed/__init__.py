"""Process groups, the device mesh and the layout of a multi-process run.

A single process is the degenerate case of every function here: world size 1, rank 0, no
process group, the model returned unchanged. The trainer calls the same functions in every
layout; `parallelize.py` wraps the model, `checkpointing.py` saves and loads it.

Layout: world size = dp_replicate × dp_shard × tp, arranged as a DeviceMesh with dimensions
("dp_replicate", "dp_shard", "tp"), tp innermost so a tensor-parallel group is the processes
of one node when tp ≤ GPUs per node. Ranks with the same position in "tp" but different data
positions form the data-parallel group: they see disjoint slices of the global batch.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from gptrain.errors import PeerFailure, UserError


@dataclass(frozen=True)
class Layout:
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.tp

    @property
    def dp_world(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def kind(self) -> str:
        """How the model is wrapped: 'single', 'ddp', 'fsdp' (incl. HSDP), with '+tp' when tensor parallel."""
        if self.dp_shard > 1 or (self.tp > 1 and self.dp_replicate > 1):
            data = "fsdp" if self.dp_replicate == 1 else "hsdp"
        elif self.dp_replicate > 1:
            data = "ddp"
        else:
            data = ""
        parts = [p for p in (data, "tp" if self.tp > 1 else "") if p]
        return "+".join(parts) or "single"

    def describe(self) -> str:
        return f"dp_replicate {self.dp_replicate} × dp_shard {self.dp_shard} × tp {self.tp} ({self.kind})"


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    dp_rank: int = 0  # rank among data-parallel replicas/shards
    dp_world: int = 1
    tp_rank: int = 0
    layout: Layout = field(default_factory=Layout)
    mesh: Any = None  # DeviceMesh ("dp_replicate", "dp_shard", "tp") when world_size > 1
    dp_group: Any = None  # process group of this rank's data-parallel peers
    control_group: Any = None  # a gloo group for host-side flags and timings (also under NCCL)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_layout(parallel, world_size: int) -> Layout:
    """The degrees of a run from its settings and the number of processes; UserError if impossible."""
    rep, shard, tp = parallel.dp_replicate, parallel.dp_shard, parallel.tp
    if parallel.use_tensor_parallel:
        if tp not in (1, -1, world_size):
            raise UserError(f"--use-tensor-parallel puts all {world_size} processes in one tensor-parallel group, "
                            f"but --tp {tp} was also given. Drop one of the two.")
        tp = world_size
        if rep == -1:
            rep = 1
    if rep == -1 and -1 in (shard, tp):  # another degree takes what is left: no replicas beside it
        rep = 1
    fills = [name for name, v in (("--dp-replicate", rep), ("--dp-shard", shard), ("--tp", tp)) if v == -1]
    if len(fills) > 1:
        raise UserError(f"{' and '.join(fills)} are both -1 (take the processes left): give all but one degree.")
    fixed = max(1, rep) * max(1, shard) * max(1, tp)
    if fills:
        if world_size % fixed:
            raise UserError(f"the layout needs a multiple of {fixed} processes ({_degrees(rep, shard, tp)}), "
                            f"but {world_size} {'is' if world_size == 1 else 'are'} running. Launch a multiple of "
                            f"{fixed} processes (torchrun --nproc-per-node={fixed} -m gptrain train ...), or change "
                            "the degrees.")
        left = world_size // fixed
        rep, shard, tp = (left if v == -1 else v for v in (rep, shard, tp))
    layout = Layout(rep, shard, tp)
    if layout.world_size != world_size:
        launch = ("torchrun --nproc-per-node=" + str(layout.world_size) + " -m gptrain train ..."
                  if world_size == 1 else f"--dp-replicate {world_size // (shard * tp) or 1}")
        raise UserError(f"the layout {_degrees(rep, shard, tp)} needs {layout.world_size} processes, but "
                        f"{world_size} {'is' if world_size == 1 else 'are'} running. The degrees must multiply to "
                        f"the world size: launch with {launch}, or change the degrees.")
    return layout


def _degrees(rep: int, shard: int, tp: int) -> str:
    return f"dp_replicate {rep} × dp_shard {shard} × tp {tp}"


def validate_layout(layout: Layout, model_cfg, device_type: str, backend_name: str, precision: str) -> None:
    """Model- and backend-dependent checks, raised identically on every rank before any model exists."""
    tp = layout.tp
    if tp > 1:
        if model_cfg.n_heads % tp:
            raise UserError(f"--tp {tp} must divide the number of attention heads ({model_cfg.n_heads}): each "
                            f"tensor-parallel rank holds whole heads. Use --tp {largest_divisor(model_cfg.n_heads, tp)} "
                            "or change --n-heads.")
        if model_cfg.d_ff % tp:
            raise UserError(f"--tp {tp} must divide the MLP size d_ff ({model_cfg.d_ff}). Use --tp "
                            f"{largest_divisor(model_cfg.d_ff, tp)} or change --d-ff.")
        if model_cfg.padded_vocab_size % tp:
            raise UserError(f"--tp {tp} must divide the padded vocabulary ({model_cfg.padded_vocab_size} rows). "
                            f"Set --pad-vocab-multiple to a multiple of {tp}.")
    if (layout.dp_shard > 1 or layout.kind.startswith("hsdp")) and backend_name not in ("gloo", "nccl"):
        raise UserError(f"FSDP (--dp-shard) needs the nccl (CUDA) or gloo (CPU) backend; this run uses "
                        f"{backend_name}. Use --dp-replicate instead.")
    if precision == "fp16" and (layout.dp_shard > 1 or tp > 1 or layout.kind.startswith("hsdp")):
        raise UserError("--precision fp16 (with its loss scaler) is not supported with FSDP or tensor parallel: "
                        "their gradients are DTensors. Use --precision bf16.")


def largest_divisor(n: int, at_most: int) -> int:
    """The largest d ≤ at_most that divides n: the nearest valid degree or head count to suggest."""
    return max(d for d in range(1, at_most + 1) if n % d == 0)


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed(device_spec: str, parallel=None) -> tuple[DistInfo, torch.device]:
    """Pick the device; with several processes (torchrun), check the layout's degrees against the world
    size (before the process group exists, identically on every rank), then join the process group.
    The model-dependent checks (`validate_layout`) come with the run's plan, once the vocabulary is known.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_spec, local_rank)
    if parallel is None:
        from gptrain.config import ParallelConfig

        parallel = ParallelConfig()
    layout = resolve_layout(parallel, world)
    backend = backend_for(device)
    if world == 1:
        return DistInfo(), device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=float(parallel.timeout))
    if not dist.is_initialized():
        store = restart_attempt_store(world, timeout)
        dist.init_process_group(backend=backend, timeout=timeout, store=store,
                                rank=int(os.environ["RANK"]) if store is not None else -1,
                                world_size=world if store is not None else -1,
                                device_id=device if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (layout.dp_replicate, layout.dp_shard, layout.tp),
                            mesh_dim_names=("dp_replicate", "dp_shard", "tp"))
    rank = dist.get_rank()
    tp_rank = rank % layout.tp
    dp_rank = rank // layout.tp  # position in the flattened (dp_replicate, dp_shard) grid
    # One data-parallel group per tensor-parallel position; every rank must create every group.
    dp_group, _ = dist.new_subgroups_by_enumeration(
        [list(range(t, world, layout.tp)) for t in range(layout.tp)], timeout=timeout)
    control = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else dist.group.WORLD
    info = DistInfo(rank=rank, world_size=world, local_rank=local_rank, dp_rank=dp_rank, dp_world=layout.dp_world,
                    tp_rank=tp_rank, layout=layout, mesh=mesh, dp_group=dp_group, control_group=control)
    return info, device


def restart_attempt_store(world: int, timeout: datetime.timedelta):
    """The rendezvous store of this torchrun attempt, under a prefix of its own (None: not restarted by torchrun).

    torchrun's agent keeps one TCP store for every restart attempt of `--max-restarts` and the process
    group's keys carry no attempt number, so restarted workers read the dead attempt's addresses (gloo:
    "connectFullMesh failed … Connection refused") or wait on its stale barrier keys (a hang). A prefix per
    attempt gives each one clean keys (measured in benchmarks/RESULTS.md, "torchrun restarts").
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                         timeout=timeout)
    return dist.PrefixStore(f"gptrain/attempt_{attempt}", base)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
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


def all_reduce_mean(t: torch.Tensor, group=None) -> torch.Tensor:
    """Mean over `group` (default: the data-parallel group when given, else every process), in place."""
    if dist.is_available() and dist.is_initialized():
        n = dist.get_world_size(group)
        if n > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
            t /= n
    return t


def host_all_reduce(values: list[float], op: str, info: DistInfo) -> list[float]:
    """Reduce a few host-side numbers (timings, flags) over every process on the gloo control group."""
    if not info.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op={"max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN, "sum": dist.ReduceOp.SUM}[op],
                    group=info.control_group)
    return t.tolist()


class StopAgreement:
    """Makes every rank stop at the same step when any of them is asked to (SIGTERM, Ctrl-C).

    Each step all-reduces this rank's stop flag (MAX) on the gloo control group without waiting, and
    reads the result of the previous step's reduction: a signal seen by any rank at step s stops every
    rank after step s + 1 at the latest, with no host-device sync in the hot loop.
    """

    def __init__(self, info: DistInfo):
        self.info = info
        self._work = None
        self._flag: torch.Tensor | None = None

    def update(self, local_stop: bool) -> bool:
        if not self.info.enabled:
            return local_stop
        agreed = False
        if self._work is not None:
            wait_or_fail(self._work, self.info)
            agreed = bool(self._flag.item())
        self._flag = torch.tensor([int(local_stop)], dtype=torch.int32)
        self._work = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self.info.control_group, async_op=True)
        return agreed

    def finish(self) -> None:
        if self._work is not None:
            wait_or_fail(self._work, self.info)
            self._work = None


def wait_or_fail(work, info: DistInfo) -> None:
    try:
        work.wait()
    except Exception as e:  # noqa: BLE001 - gloo raises RuntimeError/DistError when a peer is gone
        raise peer_failure(e, info) from e


def peer_failure(e: BaseException, info: DistInfo) -> PeerFailure:
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    return PeerFailure(f"rank {info.rank}: a collective operation failed, so another process of this job has "
                       f"probably died or stopped answering ({first}). Stopping this process. Look for the first "
                       "failing rank in the launcher's output, then continue from the last complete checkpoint "
                       "with --resume.")


def is_peer_failure(e: BaseException) -> bool:
    """Errors raised by a collective whose peer is gone (gloo closes the connection; NCCL aborts or times out)."""
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(s in text for s in (
        "connection closed by peer", "connection reset", "broken pipe", "gloo", "nccl", "timed out",
        "socket", "connection refused", "wait timeout"))
