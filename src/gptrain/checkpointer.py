"""The run's checkpointer: when to save, saving in either format, and restoring into any layout.

One process: `torch.save` of the full state (gptrain.checkpoint). Several processes: a collective,
sharded save through torch.distributed.checkpoint, plus, for the final checkpoint, the consolidated
weights as model.pt (for generate, eval and export without a process group).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from gptrain import checkpoint as ckpt_lib
from gptrain.distributed import checkpointing as dist_ckpt
from gptrain.errors import UserError


def tokenizer_record(tok) -> dict[str, Any] | None:
    """What a checkpoint says of its tokenizer (None: trained on token files without one)."""
    if tok is None:
        return None
    return {"spec": tok.spec, "fingerprint": tok.fingerprint(), "vocab_size": tok.vocab_size, "eot_id": tok.eot_id}


class Checkpointer:
    def __init__(self, plan, dist, device: torch.device, model: torch.nn.Module, optimizer, scaler, tracker,
                 console, enabled: bool = True) -> None:
        self.plan, self.dist, self.device = plan, dist, device
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.tracker, self.console = tracker, console
        self.every = plan.cfg.train.save_every
        self.consolidated_state: dict[str, torch.Tensor] | None = None  # rank 0, after a final sharded save
        self.last: Path | None = None
        self.enabled = enabled

    def due(self, step: int, last: bool, stopping: bool) -> bool:
        return self.enabled and (stopping or last or (self.every > 0 and step % self.every == 0))

    def save(self, step: int, tokens_seen: int, val_loss: float | None, final: bool) -> Path | None:
        p = self.plan
        info = {
            "tokens_seen": tokens_seen,
            "val_loss": val_loss,
            "run_id": p.run_id,
            "run_name": p.cfg.train.run_name,
            "run_dir": str(p.run_dir),
            "config": p.cfg.to_dict(),
            # None for token shards named one by one: a resume reopens them from the config's data settings.
            "dataset_dir": str(p.data.dir) if p.data.dir is not None else None,
            "dataset_fingerprint": p.data.fingerprint,
            "tokenizer": tokenizer_record(p.data.tokenizer),
        }
        tok_json = p.data.tokenizer.to_json() if p.data.tokenizer is not None else None
        extra_files = {"tokenizer.json": tok_json} if tok_json else None
        if self.dist.enabled:
            path = self._save_sharded(step, info, extra_files, final)
            if not self.dist.is_main:
                return path
        else:
            model_state, optim_state = dist_ckpt.full_state(self.model, self.optimizer)
            train_state = {
                "optimizer": optim_state,
                "scaler": self.scaler.state_dict(),
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else torch.empty(0),
            }
            path = ckpt_lib.save_checkpoint(p.checkpoint_dir, step, model_state, train_state, info,
                                            extra_files=extra_files)
        ckpt_lib.prune_checkpoints(p.checkpoint_dir, p.cfg.train.keep_last)
        self.tracker.log_checkpoint(path, step, {"tokens_seen": tokens_seen, "val_loss": val_loss})
        self.console.print(f"saved checkpoint {path}")
        self.last = path
        return path

    def _save_sharded(self, step: int, info: dict[str, Any], extra_files: dict[str, str] | None,
                      final: bool) -> Path:
        import torch.distributed as dist

        group = self.dist.control_group
        full = dist_ckpt.gather_full_model_state(self.model) if final else None  # collective
        if final and self.dist.is_main:
            self.consolidated_state = full
        extra = {"rng_cpu": torch.get_rng_state(), "scaler": self.scaler.state_dict()}

        def broadcast(obj):
            box = [obj]
            dist.broadcast_object_list(box, src=0, group=group)
            return box[0]

        return ckpt_lib.save_sharded_checkpoint(
            self.plan.checkpoint_dir, step, lambda d: dist_ckpt.save_sharded(d, self.model, self.optimizer, extra),
            info, extra_files, self.dist.rank, broadcast, lambda: dist.barrier(group=group),
            full_model_state=full if self.dist.is_main else None,
            weights_finite=ckpt_lib.all_finite(self.model.state_dict()))  # a collective: every rank

    def restore(self) -> int:
        """Load the plan's checkpoint (of either kind, written in any layout) into this layout; returns
        the tokens seen so far."""
        ckpt = self.plan.resume
        if ckpt.is_sharded:
            template = {"rng_cpu": torch.get_rng_state(), "scaler": self.scaler.state_dict()}
            train_state = dist_ckpt.load_sharded(ckpt.path / "dcp", self.model, self.optimizer, template)
        else:
            model_state = ckpt.load_model_state("cpu")
            ckpt_lib.check_model_state(model_state, ckpt_lib.expected_shapes(self.model), ckpt.path / "model.pt")
            train_state = ckpt.load_train_state("cpu")
            ckpt_lib.check_train_state(train_state, ckpt.path / "train.pt")
            optim_state = train_state["optimizer"]
            if optim_state["param_groups"] and isinstance(optim_state["param_groups"][0]["params"][0], int):
                # format 1: optimizer state keyed by position, loadable by this same single-process model only
                if self.dist.enabled:
                    raise UserError(f"checkpoint {ckpt.path} predates layout-independent checkpoints: resume it "
                                    "in one process first (its next checkpoint loads in any layout).")
                dist_ckpt.load_full_state(self.model, None, model_state, None)
                self.optimizer.load_state_dict(optim_state)
            else:
                dist_ckpt.load_full_state(self.model, self.optimizer, model_state, optim_state)
        if train_state.get("scaler"):
            self.scaler.load_state_dict(train_state["scaler"])
        torch.set_rng_state(train_state["rng_cpu"].cpu())
        rng_cuda = train_state.get("rng_cuda")
        if self.device.type == "cuda" and rng_cuda is not None and rng_cuda.numel():
            torch.cuda.set_rng_state(rng_cuda.cpu(), self.device)
        self.console.print(f"resumed from {ckpt.path} (step {ckpt.step})")
        return int(ckpt.info.get("tokens_seen", ckpt.step * self.plan.tokens_per_step))
