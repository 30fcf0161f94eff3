"""Apply a layout to a GPT: tensor parallel → activation checkpointing → compile → FSDP2 / DDP.

The order is torchtitan's. Each step is a function over the plain `GPT` built by model.py and
changes it in place (blocks are replaced by name in `model.blocks`), so parameter names, and with
them every checkpoint, stay those of the plain model whatever the layout.

Tensor parallel plan (Megatron-style, with DTensor):
- per block: `attn.qkv` and `mlp.fc_in` column-wise (each rank holds whole heads / a slice of the MLP),
  `attn.out_proj` and `mlp.fc_out` row-wise (their partial outputs are all-reduced);
- the token embedding row-wise over the (padded) vocabulary and the LM head column-wise: both shard
  the same weight along dim 0, so the tied weight stays one parameter; logits are all-gathered;
- value embeddings column-wise (their d_model columns are heads × head_dim, head-major like the values):
  each rank looks up the columns of the heads it holds;
- everything else (position embedding, norms with a learnable gain) is replicated as DTensors, so every
  parameter is a DTensor and gradient clipping / the optimizer see one kind of tensor. Norms without
  parameters (the modern family's) are left alone: they act on each rank's full activations.
Rotary positions and QK-norm act inside each head, so they need no plan: a rank computes them for the
heads it holds.
"""

from __future__ import annotations

import contextlib
import inspect
from functools import partial

import torch
import torch.nn as nn

from gptrain.distributed import DistInfo

AC_SAVE_OPS = None  # filled lazily: ops whose outputs selective AC keeps


def parallelize(model: nn.Module, info: DistInfo, device: torch.device, *, ac: str = "none",
                compile: bool = False, precision: str = "fp32") -> nn.Module:
    """Return the module the loop calls (DDP wrapper, or `model` itself changed in place)."""
    layout = info.layout
    if layout.tp > 1:
        apply_tensor_parallel(model, info.mesh["tp"])
    if ac != "none":
        apply_activation_checkpointing(model, ac)
    kind = layout.kind
    if compile and kind == "single":
        # One process: compile the whole model as one graph, so the embeddings, final norm, LM head and
        # cross-entropy fuse too (measured on CPU: clearly faster than per-block, see benchmarks/RESULTS.md).
        # A wrapper for the loop only: `model` itself (generation, checkpoints, names) stays uncompiled.
        return torch.compile(model)
    if compile:
        for block in model.blocks.values():
            block.compile()  # in place: parameter names (and checkpoints) stay those of the plain model
    if kind.startswith(("fsdp", "hsdp")):
        dims = ("dp_replicate", "dp_shard") if kind.startswith("hsdp") else ("dp_shard",)
        apply_fsdp(model, info.mesh[dims] if len(dims) > 1 else info.mesh[dims[0]], precision)
        return model
    if kind.startswith("ddp"):
        from torch.nn.parallel import DistributedDataParallel as DDP

        # No buffer broadcast before every forward: the model's only buffers are the rotary tables, a function
        # of its config (the same on every rank). The setting's name changed in PyTorch 2.13.
        no_buffer_sync = ({"forward_sync_buffers": False}
                          if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
                          else {"broadcast_buffers": False})
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                   process_group=info.dp_group, gradient_as_bucket_view=True, **no_buffer_sync)
    return model


# ---------------------------------------------------------------------------------------------- TP
def apply_tensor_parallel(model: nn.Module, tp_mesh) -> None:
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    for block in model.blocks.values():
        parallelize_module(block, tp_mesh, {
            "attn.qkv": ColwiseParallel(),
            "attn.out_proj": RowwiseParallel(),
            "mlp.fc_in": ColwiseParallel(),
            "mlp.fc_out": RowwiseParallel(),
        })
        _replicate_params(block.ln_1, tp_mesh)
        _replicate_params(block.ln_2, tp_mesh)
    if model.value_embeds is not None:
        for table in model.value_embeds.values():
            parallelize_module(table, tp_mesh, ColwiseParallel())
    tied = model.lm_head.weight is model.tok_emb.weight
    parallelize_module(model, tp_mesh, {
        "tok_emb": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        "lm_head": ColwiseParallel(output_layouts=Replicate()),
    })
    if tied:  # both plans shard dim 0 of the same weight: keep one parameter
        model.lm_head.weight = model.tok_emb.weight
    # The model masks the padded vocabulary columns of the logits in place; the gathered logits come out
    # of DTensor's to_local as a view autograd forbids modifying, so hand over a copy: only when there
    # are padded columns, as the copy costs a pass over all B·T·V logits every micro-step.
    if model.cfg.padded_vocab_size > model.cfg.vocab_size:
        model.lm_head.register_forward_hook(lambda mod, args, out: out.clone())
    for module in (model.pos_emb, model.emb_norm, model.ln_f):
        _replicate_params(module, tp_mesh)


def _replicate_params(module: nn.Module | None, mesh) -> None:
    """`_replicate` for a module with parameters; a module without any (or None) needs nothing."""
    if module is not None and any(True for _ in module.parameters()):
        _replicate(module, mesh)


def _replicate(module: nn.Module, mesh) -> None:
    """Parameters become replicated DTensors; the module still takes and returns plain tensors."""
    from torch.distributed.tensor import DTensor, Replicate, distribute_module

    def inputs_to_dtensor(mod, inputs, mesh):
        return tuple(DTensor.from_local(t, mesh, [Replicate()], run_check=False) if isinstance(t, torch.Tensor)
                     else t for t in inputs)

    def output_to_local(mod, output, mesh):
        return output.to_local() if isinstance(output, DTensor) else output

    distribute_module(module, mesh, input_fn=inputs_to_dtensor, output_fn=output_to_local)


# ---------------------------------------------------------------------------------------------- AC
def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """Wrap every block: `full` recomputes the whole block in backward; `selective` keeps the outputs of
    matrix products and attention and recomputes the cheap ops (LayerNorm, GELU, adds, dropout)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    kwargs = {}
    if mode == "selective":
        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        kwargs["context_fn"] = partial(create_selective_checkpoint_contexts, _selective_policy)
    for name, block in list(model.blocks.named_children()):
        # checkpoint_wrapper's state-dict hooks strip its prefix: checkpoint keys do not change.
        model.blocks[name] = checkpoint_wrapper(block, preserve_rng_state=True, **kwargs)


def _selective_policy(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    global AC_SAVE_OPS
    if AC_SAVE_OPS is None:
        aten = torch.ops.aten
        names = ["mm", "addmm", "bmm", "_scaled_dot_product_flash_attention",
                 "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
                 "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_attention_math"]
        AC_SAVE_OPS = {getattr(aten, n).default for n in names if hasattr(aten, n)}
    return CheckpointPolicy.MUST_SAVE if op in AC_SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


# ---------------------------------------------------------------------------------------------- FSDP2
def apply_fsdp(model: nn.Module, dp_mesh, precision: str) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy()
    if precision == "bf16":  # all-gather bf16 weights, reduce gradients in fp32
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    blocks = list(model.blocks.values())
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again at once by backward: keep them gathered.
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=False)


# ---------------------------------------------------------------------------------------------- loop helpers
def gradient_sync(model: nn.Module, sync: bool):
    """All-reduce gradients across data-parallel replicas on the last micro-batch of a step only.

    DDP: `no_sync` on the others. FSDP2 still reduce-scatters every micro-batch within a shard
    group (skipping it would keep unsharded gradients alive, the memory FSDP exists to save), but
    under HSDP or TP+DP the all-reduce across replicas waits for the last one
    (`set_requires_all_reduce`; a no-op when there is no replicate dimension).
    """
    if hasattr(model, "set_requires_all_reduce"):
        model.set_requires_all_reduce(sync)
    if not sync and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (e.g. the total grad norm under FSDP/TP) as a plain tensor; plain tensors unchanged."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t
