"""Optimizers and their schedules: AdamW for every parameter, or Muon for the hidden matrices and AdamW
for the rest (embeddings, LM head, norm gains, biases).

Schedules are pure functions of the step, so resuming needs no scheduler state beyond the step
itself, and changing --num-steps on resume simply reshapes the rest of the curve. Every group's
hyper-parameters that a schedule or a setting decides (learning rate, Muon momentum, weight decay)
are set from the settings at every step by `apply_schedule`, never read back from a checkpoint.

Muon (Keller Jordan, 2024; "Muon is scalable for LLM training", Moonshot 2025) keeps SGD momentum per
matrix and replaces each update by the nearest semi-orthogonal matrix (all singular values near 1),
computed with a few Newton–Schulz iterations. Here:

- Under FSDP2 and tensor parallel a parameter is a DTensor of which each rank holds a shard. The
  orthogonalisation must see the whole matrix, so the momentum-updated gradient is gathered
  (`full_tensor`), orthogonalised on every rank alike, and each rank keeps its own shard of the
  result (the parameter's own placements), so every layout computes what one process computes.
  Momentum, weight decay and the update itself stay element-wise on the local shards.
- The fused QKV weight (rows head-major: head, q|k|v, head_dim) is orthogonalised as three matrices,
  q, k and v, each d_model × d_model, as if they were separate projections (modded-nanogpt and
  nanochat keep them apart): one orthogonalisation of the 3d × d stack would spread a single set of
  unit singular values over the three.
- Newton–Schulz runs in bf16 where the device multiplies bf16 natively (CUDA; CPUs with AVX512-BF16 or
  AMX): its iteration tolerates it and the products run at bf16 speed; in fp32 elsewhere (see
  `newton_schulz_dtype`), unless --ns-precision says otherwise. All matrices of one shape are
  orthogonalised in one batch (`orthogonalize_all`).
- torch.optim.Muon is not used: its step works per local tensor (no whole-matrix orthogonalisation of
  a sharded parameter), orthogonalises in bf16 on every device, and has no skipped step.

A skipped step (the divergence guard): when `optimizer.found_inf` (a 0-dim float tensor on the device, as
GradScaler sets it) is 1, the step leaves every parameter and every optimizer state as it was, without a
host sync: fused AdamW skips inside its kernel and takes its step count back; Muon selects the old
momentum and weights with `torch.where`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch.optim.adamw import adamw as adamw_update  # the functional form of torch.optim.AdamW's step

from gptrain.errors import UserError
from gptrain.settings import setting

LR_SCHEDULES = ("cosine", "constant", "wsd", "linear")
OPTIMIZERS = ("adamw", "muon")
NS_PRECISIONS = ("auto", "fp32", "bf16")

# The optimizer settings a model family trains with by default (config resolution applies them at the
# family's level: a preset, TOML or the command line overrides them). The gpt2 family's are the dataclass
# defaults.
FAMILY_OPTIM: dict[str, dict] = {
    "gpt2": {},
    "modern": dict(optimizer="muon", beta1=0.8, beta2=0.95, eps=1e-10, weight_decay=0.0, grad_clip=0.0,
                   lr_scheduler="wsd", warmup_steps=0, decay_fraction=0.4, min_lr=0.0),
}


def optim_settings_for(family: str) -> dict:
    """The optimizer settings of a model family (see FAMILY_OPTIM)."""
    return dict(FAMILY_OPTIM.get(family, {}))


@dataclass
class OptimConfig:
    optimizer: str = setting("adamw", "adamw: AdamW for every parameter; muon: Muon for the blocks' matrices, "
                             "AdamW for embeddings, head, norm gains and biases", choices=OPTIMIZERS,
                             default_text="the family's")
    lr: float = setting(2e-3, "peak learning rate (AdamW's; with --optimizer muon the groups' own, below)",
                        flags=("--lr", "--learning-rate"), gt=0)
    min_lr: float | None = setting(None, "final learning rate of cosine/wsd/linear (with --optimizer muon every "
                                   "group ends at its peak × min_lr/lr)", ge=0, default_text="lr/10")
    beta1: float = setting(0.9, "AdamW beta1", ge=0, lt=1)
    beta2: float = setting(0.95, "AdamW beta2", ge=0, lt=1)
    eps: float = setting(1e-8, "AdamW epsilon", flags=("--adam-eps",), gt=0)
    weight_decay: float = setting(0.1, "AdamW weight decay (on ≥2-D weights only)", ge=0, hint="(0: no decay)")
    grad_clip: float = setting(1.0, "clip the global gradient norm to this", ge=0, hint="(0: no clipping)")
    lr_scheduler: str = setting("cosine", "learning-rate schedule", choices=LR_SCHEDULES)
    warmup_steps: int = setting(30, "linear warmup steps", ge=0)
    decay_fraction: float = setting(0.2, "wsd: fraction of steps spent decaying", ge=0, le=1)
    # --optimizer muon only
    muon_lr: float = setting(0.02, "muon: peak learning rate of the blocks' matrices (× √(rows/cols) for tall "
                             "ones)", gt=0)
    muon_momentum: float = setting(0.95, "muon: momentum (Nesterov) after its warm-up", ge=0, lt=1)
    muon_momentum_start: float = setting(0.85, "muon: momentum at step 0, rising linearly to --muon-momentum",
                                         ge=0, lt=1)
    muon_momentum_warmup_steps: int = setting(300, "muon: steps of the momentum warm-up", ge=0,
                                              hint="(0: no warm-up)")
    muon_weight_decay: float = setting(0.0, "muon: decoupled weight decay of the matrices", ge=0)
    ns_steps: int = setting(5, "muon: Newton–Schulz iterations per orthogonalisation", ge=1, le=20)
    ns_precision: str = setting("auto", "muon: precision of the Newton–Schulz products (auto: bf16 where the "
                                "device multiplies bf16 natively: CUDA, CPUs with AVX512-BF16 or AMX; else fp32)",
                                choices=NS_PRECISIONS)
    embed_lr: float = setting(0.3, "muon: AdamW peak learning rate of the token, position and value embeddings, "
                              "at d_model 768 (× √(768/d_model))", gt=0)
    head_lr: float = setting(0.004, "muon: AdamW peak learning rate of the LM head (a tied embedding is the "
                             "head), at d_model 768 (× √(768/d_model))", gt=0)
    scalar_lr: float = setting(0.02, "muon: AdamW peak learning rate of norm gains and biases", gt=0)

    def check(self) -> None:
        """Checks across fields (each field's own bounds are declared with it)."""
        if self.min_lr is not None and self.min_lr > self.lr:
            raise UserError(f"--min-lr {self.min_lr:g} is above --lr ({self.lr:g}); use a value between 0 and "
                            f"--lr ({self.lr:g}).")


FUSED_DEVICES = ("cuda", "cpu")
ADAMW_REFERENCE_WIDTH = 768  # embed_lr and head_lr are given for this d_model (nanochat's rule)


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """One optimizer over every trainable parameter of `model` (the plain GPT, wrapped in place or not)."""
    if cfg.optimizer == "muon":
        return MuonAdamW(muon_param_groups(model, cfg), betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                         fused=device.type in FUSED_DEVICES)
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


def muon_param_groups(model: torch.nn.Module, cfg: OptimConfig) -> list[dict]:
    """Muon for the 2-D weights inside the blocks (the QKV weight in its own group, split in q, k, v);
    AdamW for the embeddings, the head and every 1-D parameter. Empty groups are left out.

    Each group carries "kind" (muon | adamw), "name" (the setting its learning rate comes from) and
    "lr_scale" (a constant of the model's shape); apply_schedule sets the rest at every step.
    """
    width = model.cfg.d_model
    adamw_scale = math.sqrt(ADAMW_REFERENCE_WIDTH / width)
    head_weight = model.lm_head.weight
    by_name: dict[str, list] = {"qkv": [], "matrices": [], "embed": [], "head": [], "scalars": []}
    seen: set[int] = set()
    for name, p in model.named_parameters():  # a tied weight once, under its first name (tok_emb)
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p is head_weight:
            by_name["head"].append(p)
        elif p.dim() < 2:
            by_name["scalars"].append(p)
        elif name.startswith("blocks.") and name.endswith("attn.qkv.weight"):
            by_name["qkv"].append(p)
        elif name.startswith("blocks."):
            by_name["matrices"].append(p)
        else:  # tok_emb, pos_emb, value_embeds
            by_name["embed"].append(p)
    head_dim = model.cfg.head_dim
    specs = {
        "qkv": dict(kind="muon", lr_scale=1.0, split=(3, head_dim), nesterov=True),
        "matrices": dict(kind="muon", lr_scale=1.0, split=None, nesterov=True),
        "embed": dict(kind="adamw", lr_scale=adamw_scale),
        "head": dict(kind="adamw", lr_scale=adamw_scale),
        "scalars": dict(kind="adamw", lr_scale=1.0),
    }
    groups = []
    for name, params in by_name.items():
        if params:
            groups.append({"params": params, "name": name, **specs[name]})
    for g in groups:
        _set_group(g, cfg, 1.0, 0)
    return groups


class MuonAdamW(torch.optim.Optimizer):
    """Muon groups and AdamW groups in one torch.optim.Optimizer (one state dict, one step call).

    Groups with kind "adamw" are updated by PyTorch's AdamW (fused on CPU and CUDA); groups with kind
    "muon" by `_muon_step` below (see the module docstring). Honours `found_inf` and `grad_scale` as set
    by GradScaler (`_step_supports_amp_scaling`), with no host sync on fused devices.
    """

    def __init__(self, groups: list[dict], *, betas: tuple[float, float], eps: float, fused: bool):
        defaults = dict(lr=0.0, betas=betas, eps=eps, weight_decay=0.0, momentum=0.95, nesterov=True,
                        ns_steps=5, ns_dtype="auto", split=None, kind="adamw", name="", lr_scale=1.0)
        super().__init__(groups, defaults)
        for g in self.param_groups:
            if g["kind"] == "muon" and any(p.dim() != 2 for p in g["params"]):
                raise ValueError("Muon groups hold 2-D matrices only")
        self.fused = fused
        self._step_supports_amp_scaling = fused

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf = getattr(self, "found_inf", None)
        grad_scale = getattr(self, "grad_scale", None)
        for group in self.param_groups:
            if group["kind"] != "muon":
                self._adamw_step(group, found_inf, grad_scale)
        self._muon_step([g for g in self.param_groups if g["kind"] == "muon"], found_inf, grad_scale)
        return loss

    def _adamw_step(self, group: dict, found_inf, grad_scale) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:  # as torch.optim.AdamW lays it out (so its checkpoints read the same)
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if self.fused else "cpu")
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if not params:
            return
        if not self.fused and found_inf is not None:  # foreach AdamW cannot skip by itself: a host sync
            if bool(found_inf.item()):
                return
            found_inf = None
        beta1, beta2 = group["betas"]
        adamw_update(
            params, grads, exp_avgs, exp_avg_sqs, [], steps, foreach=None if self.fused else True,
            fused=self.fused or None, grad_scale=grad_scale if self.fused else None,
            found_inf=found_inf if self.fused else None, has_complex=False, amsgrad=False, beta1=beta1,
            beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)

    def _muon_step(self, groups: list[dict], found_inf, grad_scale) -> None:
        """Every Muon matrix of every group in one pass: the momentum updates first, then one batched
        orthogonalisation of all of them (`orthogonalize_all`), then the weights."""
        skip = found_inf.to(torch.bool) if found_inf is not None else None
        todo = []  # (group, param, new momentum buffer, the whole update matrix)
        for group in groups:
            momentum = group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                grad, buf = _local(p.grad), _local(state["momentum_buffer"])
                if grad_scale is not None:
                    grad = grad / grad_scale.to(grad.dtype)
                new_buf = buf.lerp(grad, 1 - momentum)
                update = grad.lerp(new_buf, momentum) if group["nesterov"] else new_buf
                todo.append((group, p, new_buf, _gather_full(update, p)))
        orthos = orthogonalize_all([(full, g["split"], g["ns_steps"], g["ns_dtype"]) for g, _, _, full in todo])
        for (group, p, new_buf, _), ortho in zip(todo, orthos, strict=True):
            lr, wd = group["lr"], group["weight_decay"]
            weight, buf = _local(p), _local(self.state[p]["momentum_buffer"])
            ortho = _local_shard_like(ortho.to(weight.dtype), p)
            rows, cols = _block_shape(p.shape, group["split"])
            step_lr = lr * math.sqrt(max(1.0, rows / cols))  # a tall matrix's unit update has a smaller RMS
            new_weight = weight * (1 - lr * wd) - step_lr * ortho
            if skip is None:
                buf.copy_(new_buf)
                weight.copy_(new_weight)
            else:
                buf.copy_(torch.where(skip, buf, new_buf))
                weight.copy_(torch.where(skip, weight, new_weight))


# -------------------------------------------------------------------------------------- Newton–Schulz
# The quintic iteration X ← aX + b(XXᵀ)X + c(XXᵀ)²X with Keller Jordan's coefficients, chosen for the
# steepest slope at zero: five steps take singular values from (0, 1] to roughly 0.7–1.2, which trains as
# well as the exact polar factor (Muon write-up, 2024).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(matrix: torch.Tensor, steps: int = 5, split: tuple[int, int] | None = None,
                  dtype: str = "auto") -> torch.Tensor:
    """The semi-orthogonal matrix nearest `matrix` (approximately: singular values near 1), by Newton–Schulz.

    split (parts, head_dim): the rows are (heads, parts, head_dim) head-major (the fused QKV weight); each
    of the `parts` row blocks is orthogonalised as a matrix of its own. dtype: an NS_PRECISIONS value.
    """
    return orthogonalize_all([(matrix, split, steps, dtype)])[0]


def orthogonalize_all(jobs: list[tuple[torch.Tensor, tuple[int, int] | None, int, str]]) -> list[torch.Tensor]:
    """`orthogonalize(matrix, steps, split, dtype)` for each job, computed in batches: every block of the
    same shape (a tall one transposed: Newton–Schulz iterates on the smaller Gram matrix) goes through one
    batched product per iteration. A model's matrices come in a few shapes, so a step runs a few large
    products instead of one small product per matrix: small products leave CPU threads idle."""
    prepared = []  # per job: its blocks, shape (n, rows, cols) with rows ≤ cols, and whether transposed
    batches: dict[tuple, list[int]] = {}
    for i, (matrix, split, steps, dtype) in enumerate(jobs):
        if split is not None:
            parts, head_dim = split
            blocks = matrix.view(-1, parts, head_dim, matrix.size(1)).transpose(0, 1).reshape(parts, -1, matrix.size(1))
        else:
            blocks = matrix.unsqueeze(0)
        tall = blocks.size(-2) > blocks.size(-1)
        blocks = blocks.mT if tall else blocks
        prepared.append((blocks, tall))
        dt = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(dtype) or newton_schulz_dtype(matrix.device)
        batches.setdefault((tuple(blocks.shape[1:]), steps, dt, matrix.device), []).append(i)
    out: list[torch.Tensor] = [None] * len(jobs)  # type: ignore[list-item]
    for (_, steps, dt, _), members in batches.items():
        stacked = torch.cat([prepared[i][0] for i in members]) if len(members) > 1 else prepared[members[0]][0]
        ortho = _newton_schulz(stacked, steps, dt)
        for i, blocks in zip(members, ortho.split([prepared[i][0].size(0) for i in members]), strict=True):
            matrix, split = jobs[i][0], jobs[i][1]
            blocks = blocks.mT if prepared[i][1] else blocks
            if split is not None:
                blocks = blocks.reshape(split[0], -1, split[1], matrix.size(1)).transpose(0, 1)
            out[i] = blocks.reshape(matrix.shape)
    return out


def _newton_schulz(g: torch.Tensor, steps: int, dtype: torch.dtype) -> torch.Tensor:
    """Batched (n, rows, cols), rows ≤ cols."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype)
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm ≤ Frobenius norm ≤ 1
    for _ in range(steps):
        gram = x @ x.mT
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b·G + c·G², one kernel
        x = torch.baddbmm(x, poly, x, beta=a)
    return x


def newton_schulz_dtype(device: torch.device) -> torch.dtype:
    """ns_precision "auto": bf16 where the device multiplies bf16 natively, fp32 elsewhere (where bf16 products
    are emulated and far slower). The iteration tolerates bf16 (Muon's reference implementations run it so)
    and the update is a direction whose size the learning rate sets; fp32 gives layouts that match one process
    to rounding, bf16 turns last-bit differences between layouts into ~5e-5 in the loss after 20 steps
    (benchmarks/RESULTS.md has both measurements)."""
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()):
        return torch.bfloat16
    return torch.float32


@functools.cache  # asked for every matrix of every step; the answer never changes
def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (AVX512-BF16 or AMX tiles)."""
    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(check() for check in checks if check is not None)


def _block_shape(shape: torch.Size, split: tuple[int, int] | None) -> tuple[int, int]:
    rows, cols = shape
    return (rows // split[0], cols) if split is not None else (rows, cols)


# ------------------------------------------------------------------------------- DTensor shards
def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (the same storage: writes reach the DTensor); a plain tensor as is."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _gather_full(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The whole matrix whose shard `local` is, laid out as the DTensor `like` (collective); plain: as is."""
    from torch.distributed.tensor import DTensor

    if not isinstance(like, DTensor):
        return local
    return DTensor.from_local(local, like.device_mesh, like.placements, run_check=False, shape=like.shape,
                              stride=like.stride()).full_tensor()


def _local_shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's shard of `full` in the layout of the DTensor `like` (no communication); plain: as is."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor):
        return full
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()


# ---------------------------------------------------------------------------------------------- schedules
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


def muon_momentum_at(step: int, cfg: OptimConfig) -> float:
    """Muon's momentum at optimizer step `step`: linear from muon_momentum_start to muon_momentum."""
    if step >= cfg.muon_momentum_warmup_steps:
        return cfg.muon_momentum
    frac = step / cfg.muon_momentum_warmup_steps
    return cfg.muon_momentum_start + (cfg.muon_momentum - cfg.muon_momentum_start) * frac


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


_PEAK_LR = {"qkv": "muon_lr", "matrices": "muon_lr", "embed": "embed_lr", "head": "head_lr", "scalars": "scalar_lr"}


def _set_group(group: dict, cfg: OptimConfig, factor: float, step: int) -> None:
    group["lr"] = getattr(cfg, _PEAK_LR[group["name"]]) * group["lr_scale"] * factor
    if group["kind"] == "muon":
        group["momentum"] = muon_momentum_at(step, cfg)
        group["weight_decay"] = cfg.muon_weight_decay
        group["ns_steps"] = cfg.ns_steps
        group["ns_dtype"] = cfg.ns_precision
    else:
        group["weight_decay"] = cfg.weight_decay if group["name"] in ("embed", "head") else 0.0


def apply_schedule(optimizer: torch.optim.Optimizer, step: int, cfg: OptimConfig, num_steps: int) -> float:
    """Set every parameter group's hyper-parameters for optimizer step `step`; returns the headline
    learning rate (the one logged as `lr`): AdamW's with --optimizer adamw, the Muon matrices' with muon.

    With muon every group follows the same schedule shape, scaled to its own peak learning rate.
    """
    lr = lr_at(step, cfg, num_steps)
    if not isinstance(optimizer, MuonAdamW):
        set_lr(optimizer, lr)
        return lr
    factor = lr / cfg.lr
    for group in optimizer.param_groups:
        _set_group(group, cfg, factor, step)
    return cfg.muon_lr * factor
