"""Checkpoints: atomic, complete-or-absent, loaded without executing pickled code.

Layout of one checkpoint, a directory under the run's checkpoints/ folder:

    step_000300/
      model.pt      model weights (plain tensors)
      train.pt      optimizer, GradScaler, RNG states, step, run id
      info.json     step, tokens seen, val loss, config, tokenizer identity — readable without torch
      COMPLETE      written last: a directory without it is ignored

A multi-process run (torchrun) writes the same folder with a sharded `dcp/` sub-folder
(torch.distributed.checkpoint: every rank writes its own shards) in place of model.pt and train.pt;
its final checkpoint also gets a consolidated model.pt, so `gptrain generate/eval` need no process
group (they can also read `dcp/` directly). Either kind resumes in any layout.

A save writes into `step_000300.tmp-<pid>/` (the pid of global rank 0; all ranks write there),
fsyncs, writes COMPLETE, then renames the directory into place. A crash at any point leaves either the previous checkpoints untouched or a
`.tmp-` directory that resume ignores and the next save removes. Loading uses
`torch.load(weights_only=True)`, so opening a checkpoint never runs pickled code.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gptrain.errors import UserError

MARKER = "COMPLETE"
PREFIX = "step_"
# 2: optimizer state keyed by parameter name (loadable in any layout); 1 (index-keyed) still loads
FORMAT_VERSION = 2


@dataclass
class Checkpoint:
    path: Path
    info: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.info["step"])

    @property
    def is_sharded(self) -> bool:
        """Written by several processes through torch.distributed.checkpoint."""
        return (self.path / "dcp").is_dir()

    def load_model_state(self, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        if self.is_sharded and not (self.path / "model.pt").is_file():
            from gptrain.config import Config
            from gptrain.distributed.checkpointing import read_sharded_model_state

            state = read_sharded_model_state(self.path / "dcp", Config.from_dict(self.info["config"]).model)
            return {k: v.to(map_location) for k, v in state.items()}
        return _load(self.path / "model.pt", map_location)

    def load_train_state(self, map_location: str | torch.device = "cpu") -> dict[str, Any]:
        return _load(self.path / "train.pt", map_location)


def _load(path: Path, map_location) -> Any:
    if not path.is_file():
        raise UserError(f"checkpoint file {path} is missing: the checkpoint is incomplete. "
                        "Resume from another checkpoint (they are listed in the run's checkpoints/ folder).")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, tensors from disallowed classes …
        raise UserError(f"checkpoint file {path} is corrupt or truncated ({type(e).__name__}: {str(e)[:200]}). "
                        "Resume from an earlier checkpoint or start a new run.") from None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_file(path: Path, write) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(
    checkpoint_dir: Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    train_state: dict[str, Any],
    info: dict[str, Any],
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write one checkpoint atomically and return its final path.

    `extra_files` (name → text) travel with it, e.g. tokenizer.json so generation needs nothing else.
    """
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir / f"{PREFIX}{step:07d}"
    tmp = checkpoint_dir / f"{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    info = {"format_version": FORMAT_VERSION, "step": step, "saved_at": time.time(), **info}
    _write_file(tmp / "model.pt", lambda f: torch.save(model_state, f))
    _write_file(tmp / "train.pt", lambda f: torch.save(train_state, f))
    _write_file(tmp / "info.json", lambda f: f.write(json.dumps(info, indent=2).encode()))
    for name, text in (extra_files or {}).items():
        _write_file(tmp / name, lambda f, text=text: f.write(text.encode()))
    _write_file(tmp / MARKER, lambda f: f.write(b"ok\n"))
    _fsync_dir(tmp)
    if final.exists():  # re-saving the same step (e.g. a resumed run ending where it started)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(checkpoint_dir)
    return final


def save_sharded_checkpoint(
    checkpoint_dir: Path,
    step: int,
    write_shards,
    info: dict[str, Any],
    extra_files: dict[str, str] | None,
    rank: int,
    broadcast_object,
    barrier,
    full_model_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Collective version of `save_checkpoint` for multi-process runs.

    Rank 0 makes the temporary folder and tells the others its name; every rank writes its shards
    (`write_shards(tmp / "dcp")`, a collective); after a barrier rank 0 adds info.json, the extra files,
    the optional consolidated model.pt, then COMPLETE, and renames. A final barrier means no rank goes on
    (or exits) before the checkpoint is in place.
    """
    final = checkpoint_dir / f"{PREFIX}{step:07d}"
    tmp = None
    if rank == 0:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        tmp = checkpoint_dir / f"{final.name}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    tmp = Path(broadcast_object(str(tmp) if tmp else None))
    write_shards(tmp / "dcp")
    barrier()
    if rank == 0:
        info = {"format_version": FORMAT_VERSION, "step": step, "saved_at": time.time(), **info}
        if full_model_state is not None:
            _write_file(tmp / "model.pt", lambda f: torch.save(full_model_state, f))
        _write_file(tmp / "info.json", lambda f: f.write(json.dumps(info, indent=2).encode()))
        for name, text in (extra_files or {}).items():
            _write_file(tmp / name, lambda f, text=text: f.write(text.encode()))
        _fsync_dir(tmp / "dcp")
        _write_file(tmp / MARKER, lambda f: f.write(b"ok\n"))
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(checkpoint_dir)
    barrier()
    return final


def read_checkpoint(path: Path) -> Checkpoint:
    """A complete checkpoint directory, or a UserError saying why it cannot be used."""
    if not path.is_dir():
        raise UserError(f"{path} is not a checkpoint directory. Pass a run folder or one of its "
                        "checkpoints/step_NNNNNNN folders.")
    if not (path / MARKER).is_file():
        raise UserError(f"checkpoint {path} is incomplete (no {MARKER} marker: the save was interrupted). "
                        "Use an earlier checkpoint.")
    try:
        info = json.loads((path / "info.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"checkpoint {path} has an unreadable info.json ({e}). Use another checkpoint.") from None
    return Checkpoint(path, info)


def list_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not checkpoint_dir.is_dir():
        return []
    found = [p for p in checkpoint_dir.iterdir()
             if p.is_dir() and p.name.startswith(PREFIX) and ".tmp-" not in p.name and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(checkpoint_dir: Path) -> Checkpoint | None:
    ckpts = list_checkpoints(checkpoint_dir)
    return read_checkpoint(ckpts[-1]) if ckpts else None


def resolve_checkpoint(path: str | Path) -> Checkpoint:
    """Accept a checkpoint directory, a run folder or a checkpoints/ folder; pick the newest complete one."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p} does not exist. Pass a run folder (runs/<name>) or a checkpoint folder.")
    if (p / MARKER).is_file() or p.name.startswith(PREFIX):
        return read_checkpoint(p)
    for candidate in (p / "checkpoints", p):
        ckpt = latest_checkpoint(candidate)
        if ckpt is not None:
            return ckpt
    run_cfg = p / "config.json"
    if run_cfg.is_file():
        try:
            custom = json.loads(run_cfg.read_text())["train"].get("checkpoint_dir")
        except (json.JSONDecodeError, KeyError):
            custom = None
        if custom:
            ckpt = latest_checkpoint(Path(custom))
            if ckpt is not None:
                return ckpt
    raise UserError(f"no complete checkpoint found in {p}. Train first, or pass a checkpoints/step_NNNNNNN folder.")


def prune_checkpoints(checkpoint_dir: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints and the best one by val loss.

    Also removes leftovers of interrupted saves. Returns what was deleted.
    """
    ckpts = list_checkpoints(checkpoint_dir)
    keep = set(ckpts[-keep_last:]) if keep_last > 0 else set()
    best, best_loss = None, float("inf")
    for p in ckpts:
        try:
            loss = json.loads((p / "info.json").read_text()).get("val_loss")
        except (OSError, json.JSONDecodeError):
            loss = None
        if loss is not None and loss < best_loss:
            best, best_loss = p, loss
    if best is not None:
        keep.add(best)
    removed = []
    for p in ckpts:
        if p not in keep:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    for p in checkpoint_dir.glob(f"{PREFIX}*.tmp-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid != str(os.getpid()):
            shutil.rmtree(p, ignore_errors=True)
    return removed
