"""Will the requested model and batch fit? An estimate made before anything is allocated.

A model too large for the device should end at start with the numbers, not in the allocator with a
traceback minutes later. The estimate counts what training surely holds at its peak (bytes):

    weights      n_params · 4                        fp32 master weights (autocast keeps them fp32)
    gradients    n_params · 4
    optimizer    n_params · optimizer_state_bytes_per_param     (AdamW: 8, two fp32 moments)
                 — these three divided by `model_shards` (FSDP shards × tensor-parallel degree)
    activations  per layer, per token of a micro-batch, what backward keeps (Korthikanti et al. 2022,
                 "Reducing Activation Recomputation in Large Transformer Models", without dropout masks
                 and without the attention matrix, which fused attention does not store):
                     (8·d_model + 2·d_ff) values · activation bytes (2 under bf16/fp16 autocast, 4 in fp32)
                 with activation checkpointing ("full"): one d_model fp32 input per layer, plus one
                 layer's activations while it is recomputed
                 plus the embedding output (d_model fp32 values per token)
    loss head    logits, their log-probabilities and their gradient, (activation bytes + 4 + 4) per
                 vocabulary entry, for `loss_chunk_tokens` tokens at a time (the whole micro-batch when
                 the loss is not chunked)

It leaves out the runtime (CUDA context, kernels' workspaces, the allocator's fragmentation) and
temporaries, so it is a lower bound: measured peaks run to about twice it (benchmarks/RESULTS.md, the
cpu-small rows: 3.56 GB estimated for 7.35 GB peak RSS with the plain loss, 1.7 for 3.76 chunked).
`check_fits` therefore refuses only what cannot fit even by this count: no configuration that trains
today is refused.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gptrain.errors import UserError

ACTIVATION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    gradients: int
    optimizer: int
    activations: int
    loss_head: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.loss_head

    def __int__(self) -> int:
        return self.total

    def breakdown(self) -> str:
        parts = [("weights", self.weights), ("gradients", self.gradients), ("optimizer state", self.optimizer),
                 ("activations", self.activations), ("loss head", self.loss_head)]
        return ", ".join(f"{name} {format_bytes(n)}" for name, n in parts)


def format_bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def estimate_training_memory(
    n_params: int,
    n_layers: int,
    d_model: int,
    seq_len: int,
    batch_size: int,
    vocab_size: int,
    precision: str,
    optimizer_state_bytes_per_param: float = 8.0,
    *,
    d_ff: int | None = None,
    loss_chunk_tokens: int | None = None,
    activation_checkpointing: bool = False,
    model_shards: int = 1,
) -> MemoryEstimate:
    """Peak training memory of one process, by the formula in this module's docstring.

    `batch_size`: sequences per micro-batch of this process. `precision`: fp32, bf16 or fp16 (resolve
    "auto" first). `vocab_size`: the head's (padded) rows. `loss_chunk_tokens`: tokens per loss chunk
    (None or 0: not chunked). `model_shards`: how many processes share the weights, gradients and
    optimizer state (FSDP shards × tensor-parallel degree; 1 for DDP or one process).
    """
    if precision not in ACTIVATION_BYTES:
        raise ValueError(f"precision must be one of {sorted(ACTIVATION_BYTES)}, got {precision!r}")
    act = ACTIVATION_BYTES[precision]
    d_ff = 4 * d_model if d_ff is None else d_ff
    shards = max(1, model_shards)
    tokens = batch_size * seq_len
    per_layer = tokens * (8 * d_model + 2 * d_ff) * act
    if activation_checkpointing:
        activations = n_layers * tokens * d_model * 4 + per_layer
    else:
        activations = n_layers * per_layer
    activations += tokens * d_model * 4  # the embedding output
    head_tokens = min(tokens, loss_chunk_tokens) if loss_chunk_tokens else tokens
    return MemoryEstimate(
        weights=n_params * 4 // shards,
        gradients=n_params * 4 // shards,
        optimizer=int(n_params * optimizer_state_bytes_per_param) // shards,
        activations=activations,
        loss_head=head_tokens * vocab_size * (act + 4 + 4),
    )


def count_parameters(build: Callable[[], object]) -> int:
    """Parameters of the model `build()` makes, counted on the meta device: nothing is allocated (a tied
    embedding counts once)."""
    import torch

    with torch.device("meta"):
        model = build()
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- what is available


def _meminfo_available(text: str) -> int | None:
    m = re.search(r"^MemAvailable:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(m.group(1)) * 1024 if m else None


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _cgroup_headroom(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes this container may still use under its cgroup memory limit (v2, then v1); None: no limit."""
    for limit_file, usage_file in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        limit, usage = _read(root / limit_file), _read(root / usage_file)
        if limit is None or usage is None or not limit.isdigit() or not usage.isdigit():
            continue
        if int(limit) >= 1 << 60:  # cgroup v1 writes "no limit" as a huge number
            return None
        return max(0, int(limit) - int(usage))
    return None


def host_available_memory(meminfo: Path = Path("/proc/meminfo"), cgroup_root: Path = Path("/sys/fs/cgroup")) \
        -> int | None:
    """Host RAM a new allocation can get: MemAvailable, or less under a container's memory limit."""
    text = _read(meminfo)
    found = [n for n in (_meminfo_available(text) if text else None, _cgroup_headroom(cgroup_root))
             if n is not None]
    return min(found) if found else None


def available_memory(device) -> int | None:
    """Free bytes on `device` (a torch.device or its name): host RAM on CPU, free memory of the GPU on CUDA
    (`torch.cuda.mem_get_info`); None where it cannot be told."""
    import torch

    device = torch.device(device)
    if device.type == "cpu":
        return host_available_memory()
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return None


def check_fits(estimate: MemoryEstimate | int, available: int | None, what: str, processes: int = 1) -> None:
    """A UserError with the estimate when `processes` × `estimate` cannot fit in `available` bytes.

    `what` names the request and the device, e.g. "the model (--d-model 100000) on cpu". `processes`:
    processes sharing that memory (torchrun on CPU: the local world size; one per GPU: 1). Nothing is
    refused when `available` is unknown.
    """
    if available is None:
        return
    total = int(estimate) * max(1, processes)
    if total <= available:
        return
    detail = f" ({estimate.breakdown()})" if isinstance(estimate, MemoryEstimate) else ""
    per = f"{processes} processes × " if processes > 1 else ""
    raise UserError(f"{what} needs at least {per}{format_bytes(int(estimate))}{detail}, but only "
                    f"{format_bytes(available)} is available. Choose a smaller model (--d-model, --n-layers, "
                    "--preset), a smaller --batch-size or --seq-len, --ac full, or more processes to shard it "
                    "(--dp-shard).")
