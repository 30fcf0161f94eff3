"""Model and optimizer state in any layout, through torch.distributed.checkpoint (DCP).

Two kinds of checkpoint exist (see checkpoint.py for the directory layout and atomicity):
- single-process runs write full state with torch.save (model.pt, train.pt);
- multi-process runs write a sharded DCP folder (`dcp/`), each rank its own shards, in parallel.

Both use the same keys: the plain model's parameter names (FQNs), for the weights and for the
optimizer state (`get_state_dict` strips DDP/FSDP/activation-checkpoint/compile wrappers). That is
what makes a checkpoint loadable in any other layout: DCP reshards on load, and full state dicts are
scattered into FSDP/TP shards by `set_state_dict`.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from gptrain.errors import UserError


def _options(full: bool, cpu_offload: bool = False):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=full, cpu_offload=cpu_offload)


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Single process: the model and optimizer state keyed by parameter name (for torch.save)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return get_state_dict(model, optimizer, options=_options(full=True))


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, model_state: dict,
                    optim_state: dict | None) -> None:
    """Load full (unsharded) state into a model in any layout: each rank keeps its own shards."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    try:
        set_model_state_dict(model, model_state, options=_options(full=True))
    except (RuntimeError, KeyError, ValueError) as e:
        raise _shape_error(e) from None
    if optimizer is not None and optim_state is not None:
        set_optimizer_state_dict(model, optimizer, optim_state, options=_options(full=True))


def save_sharded(dcp_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, Any]) -> None:
    """Collective: every rank writes its shards of model and optimizer state into `dcp_dir`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer, options=_options(full=False))
    dcp.save({"model": model_state, "optim": optim_state, "train": extra}, checkpoint_id=str(dcp_dir))


def load_sharded(dcp_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                 extra: dict[str, Any]) -> dict[str, Any]:
    """Load a DCP checkpoint saved in any layout into this layout (also a single process, no group).

    `extra` is a template of the non-model state (same keys as saved); it is returned filled in.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer, options=_options(full=False))
    state = {"model": model_state, "optim": optim_state, "train": extra}
    try:
        dcp.load(state, checkpoint_id=str(dcp_dir))
    except Exception as e:  # noqa: BLE001 - DCP wraps reader errors in CheckpointException
        raise UserError(f"checkpoint {dcp_dir.parent} cannot be loaded into this model "
                        f"({str(e).strip().splitlines()[0][:300]}). Resume with the checkpoint's own model "
                        "settings, or from another checkpoint.") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_options(full=False))
    return state["train"]


def gather_full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Collective: the whole model's weights on CPU on rank 0 (an empty dict on the others)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(full=True, cpu_offload=True))


def read_sharded_model_state(dcp_dir: Path, model_cfg) -> dict[str, torch.Tensor]:
    """The full weights of a DCP checkpoint in this one process (no process group needed)."""
    import torch.distributed.checkpoint as dcp

    from gptrain.model import GPT

    with torch.device("meta"):
        shapes = GPT(model_cfg).state_dict()
    state = {k: torch.empty(v.shape, dtype=v.dtype) for k, v in shapes.items()}
    try:
        with warnings.catch_warnings():  # "no process group: assuming a single process" is the point here
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({"model": state}, checkpoint_id=str(dcp_dir))
    except Exception as e:  # noqa: BLE001
        raise UserError(f"checkpoint {dcp_dir.parent} is corrupt or incomplete ({str(e).strip().splitlines()[0][:300]}"
                        "). Use another checkpoint.") from None
    return state


def _shape_error(e: Exception) -> UserError:
    return UserError(f"the checkpoint does not fit this model ({str(e).strip().splitlines()[0][:300]}). "
                     "Resume with the checkpoint's own model settings.")
