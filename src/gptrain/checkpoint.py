"""Checkpoints: atomic, complete-or-absent, loaded without executing pickled code.

Layout of one checkpoint, a directory under the run's checkpoints/ folder:

    step_0000300/
      model.pt      model weights (plain tensors)
      train.pt      optimizer state (keyed by parameter name), GradScaler, CPU and CUDA RNG states
      info.json     step, tokens seen, val loss, finite, run id and name, config, dataset, tokenizer identity
                    — readable without torch
      COMPLETE      written last: a directory without it is ignored

A multi-process run (torchrun) writes the same folder with a sharded `dcp/` sub-folder
(torch.distributed.checkpoint: every rank writes its own shards) in place of model.pt and train.pt;
its final checkpoint also gets a consolidated model.pt, so `gptrain generate/eval` need no process
group (they can also read `dcp/` directly). Either kind resumes in any layout.

A save writes into `step_0000300.tmp-<pid>/` (the pid of global rank 0; all ranks write there),
fsyncs, writes COMPLETE, then renames the directory into place. A crash at any point leaves either the
previous checkpoints untouched or a `.tmp-` directory that resume ignores and the next save removes
before it writes anything (so a disk that is still nearly full gets that space back first). A save that
fails (a full disk, a quota, an I/O error) removes its own temporary directory and raises
`CheckpointSaveError`: the previous checkpoint stays the newest. Loading uses
`torch.load(weights_only=True)`, so opening a checkpoint never runs pickled code.

Nothing a run has is lost: weights that are not finite are never written (`save_checkpoint` checks them,
a sharded save is told the collective answer of `all_finite`), each info.json records `finite` and the
`val_loss` of the evaluation at that step, and pruning never removes the newest checkpoint with finite
weights nor the one with the best val loss (among those that have one).
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gptrain.errors import UserError
from gptrain.jsonio import fsync_path

MARKER = "COMPLETE"
PREFIX = "step_"
# 2: optimizer state keyed by parameter name (loadable in any layout); 1 (index-keyed) still loads
FORMAT_VERSION = 2


class CheckpointSaveError(UserError):
    """A checkpoint could not be written (full disk, quota, I/O error); the previous one is the newest."""


class NonFiniteWeightsError(UserError):
    """The weights to save hold NaN or inf: no checkpoint is written, so none can replace a good one."""


# info.json fields and the type each must have when present (bool is not an int here).
INFO_TYPES: dict[str, tuple[type, ...]] = {
    "step": (int,), "tokens_seen": (int,), "val_loss": (int, float, type(None)), "finite": (bool, type(None)),
    "run_id": (str,), "run_name": (str,), "run_dir": (str,), "config": (dict,), "dataset_dir": (str, type(None)),
    "tokenizer": (dict, type(None)),  # None: trained on token files that carried no tokenizer
}


class CheckpointRecord(dict):
    """info.json's record (nested records included), or train.pt's top level. A missing key raises a
    UserError naming the file and the key, not a KeyError: `ckpt.info["config"]` or
    `ckpt.info["tokenizer"]["spec"]` on a damaged info.json ends with a message, exit 2."""

    def __init__(self, data: Mapping[str, Any], where: Path, prefix: str = "", nested: bool = False):
        super().__init__({k: CheckpointRecord(v, where, f"{prefix}{k}.", nested) if nested and isinstance(v, dict)
                          else v for k, v in data.items()})
        self.where, self.prefix = where, prefix

    def __missing__(self, key: str) -> Any:
        raise UserError(f"checkpoint {self.where.parent} is damaged: its {self.where.name} has no "
                        f"'{self.prefix}{key}'. Use another checkpoint (they are listed in the run's checkpoints/ "
                        "folder).")


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
        state = _load(self.path / "model.pt", map_location)
        if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                   for k, v in state.items()):
            raise UserError(f"checkpoint file {self.path / 'model.pt'} does not hold model weights (a mapping of "
                            "names to tensors). Use another checkpoint.")
        return state

    def load_train_state(self, map_location: str | torch.device = "cpu") -> dict[str, Any]:
        state = _load(self.path / "train.pt", map_location)
        if not isinstance(state, dict):
            raise UserError(f"checkpoint file {self.path / 'train.pt'} is damaged (not a mapping). Resume from "
                            "another checkpoint, or start a new run.")
        return CheckpointRecord(state, self.path / "train.pt")

    def load_model_into(self, model: torch.nn.Module) -> None:
        """Load the weights into `model` (on any device), or a UserError naming the keys that do not match."""
        state = self.load_model_state("cpu")
        check_model_state(state, expected_shapes(model), self.path / "model.pt")
        model.load_state_dict(state)


def expected_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """What `check_model_state` compares against: every state key and its full (unsharded) shape."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_model_state(state: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], where: Path) -> None:
    """A UserError naming the missing, unexpected and mis-shaped keys when `state` does not fit a model
    with `expected` shapes (as `load_state_dict` would fail, but as a message)."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} ≠ {tuple(expected[k])}" for k in expected
              if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(expected[k])]
    if not (missing or unexpected or shapes):
        return

    def few(items: list[str]) -> str:
        return ", ".join(items[:4]) + (f" and {len(items) - 4} more" if len(items) > 4 else "")

    parts = [f"missing {few(missing)}" if missing else "", f"unexpected {few(unexpected)}" if unexpected else "",
             f"wrong shapes {few(shapes)}" if shapes else ""]
    raise UserError(f"{where} does not match the model ({'; '.join(p for p in parts if p)}). It was not written "
                    "for this model's settings, or it is damaged: use the checkpoint's own run settings, or "
                    "another checkpoint.")


def check_train_state(state: Any, where: Path) -> None:
    """train.pt holds the optimizer state and the RNG state a resume needs (call before using them)."""
    problem = None
    if not isinstance(state, dict):
        problem = "it is not a mapping"
    elif not isinstance(state.get("optimizer"), dict) or not isinstance(state["optimizer"].get("param_groups"),
                                                                        list):
        problem = "no optimizer state"
    elif not isinstance(state.get("rng_cpu"), torch.Tensor):
        problem = "no random-number-generator state (rng_cpu)"
    if problem:
        raise UserError(f"checkpoint file {where} is damaged ({problem}). Resume from another checkpoint, or "
                        "start a new run.")


def _load(path: Path, map_location) -> Any:
    if not path.is_file():
        raise UserError(f"checkpoint file {path} is missing: the checkpoint is incomplete. "
                        "Resume from another checkpoint (they are listed in the run's checkpoints/ folder).")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, tensors from disallowed classes …
        raise UserError(f"checkpoint file {path} is corrupt or truncated ({type(e).__name__}: {str(e)[:200]}). "
                        "Resume from an earlier checkpoint or start a new run.") from None



def _write_file(path: Path, write) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _tensors(state: Any):
    if isinstance(state, torch.Tensor):
        yield state
    elif isinstance(state, Mapping):
        for v in state.values():
            yield from _tensors(v)
    elif isinstance(state, (list, tuple)):
        for v in state:
            yield from _tensors(v)


def finite_flag(state: Any) -> torch.Tensor | None:
    """A 0-dim tensor on the tensors' device, 1 when every floating tensor in `state` (nested mappings and
    lists; DTensors by their local shard) is finite, else 0; None when there is no floating tensor.
    No host synchronisation: reduce it across ranks, then read it once."""
    flags = []
    for t in _tensors(state):
        if hasattr(t, "to_local"):  # a DTensor: this rank's shard (the caller reduces over ranks)
            t = t.to_local()
        if t.is_floating_point() and t.numel():
            flags.append(torch.isfinite(t).all())
    if not flags:
        return None
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for f in flags:
        by_device.setdefault(f.device, []).append(f)
    per_device = [torch.stack(fs).all() for fs in by_device.values()]
    first = per_device[0].device
    return torch.stack([f.to(first) for f in per_device]).all().to(torch.int32)


def all_finite(state: Any, group=None) -> bool:
    """Whether every floating tensor in `state` is finite: one host read (`.item()`) per call.

    With DTensors (FSDP / tensor-parallel shards), pass the process group spanning their shards (or
    leave None for the default group when torch.distributed is initialised): the answer is reduced over
    it, so every rank gets the same one. Call on every rank of that group.
    """
    flag = finite_flag(state)
    import torch.distributed as dist

    sharded = any(hasattr(t, "to_local") for t in _tensors(state))
    if sharded and dist.is_available() and dist.is_initialized():
        if flag is None:
            flag = torch.ones((), dtype=torch.int32)
        if dist.get_backend(group) == "nccl" and flag.device.type != "cuda":
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return True if flag is None else bool(flag.item())


def remove_stale_temporaries(checkpoint_dir: Path) -> list[Path]:
    """Remove the `.tmp-` folders of saves that never completed (a crash, a full disk). One process writes
    a run at a time (the run folder's lock), so every one of them is stale when a save starts."""
    removed = []
    if checkpoint_dir.is_dir():
        for p in checkpoint_dir.glob(f"{PREFIX}*.tmp-*"):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _disk_error(error: BaseException) -> OSError | None:
    """The OSError behind a failed write, looked for through chained exceptions (torch.save raises a
    RuntimeError around it; torch.distributed.checkpoint gathers each rank's failure)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            return e
        todo += [e.__cause__, e.__context__]
        for failure in (getattr(e, "failures", None) or {}).values():  # CheckpointException: rank -> (exc, tb)
            todo.append(failure[0] if isinstance(failure, tuple) else failure)
    return None


def _mount_of(path: Path) -> str:
    """The mount point (and its device, from /proc/self/mounts) of the file system holding `path`."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    try:
        for line in Path("/proc/self/mounts").read_text().splitlines():
            fields = line.split()
            if len(fields) > 1 and fields[1] == str(p):
                return f"{p} ({fields[0]})"
    except OSError:
        pass
    return str(p)


def _newest_note(checkpoint_dir: Path) -> str:
    done = list_checkpoints(checkpoint_dir)
    return f"the newest complete checkpoint is {done[-1]}" if done else "no complete checkpoint exists yet"


def save_error(error: OSError, checkpoint_dir: Path, step: int) -> CheckpointSaveError:
    """The one message for a save that failed on the disk."""
    newest = _newest_note(checkpoint_dir)
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        what = "no space left" if error.errno == errno.ENOSPC else "disk quota exceeded"
        return CheckpointSaveError(f"{what} on {_mount_of(checkpoint_dir)} while saving step {step}; {newest}. "
                                   "Free space (or save elsewhere with --checkpoint-dir), then continue with "
                                   "--resume.")
    where = error.filename or checkpoint_dir
    return CheckpointSaveError(f"cannot write {where} ({error.strerror or error}) while saving step {step}; "
                               f"{newest}. Fix the disk or choose another --checkpoint-dir, then continue with "
                               "--resume.")


def save_checkpoint(
    checkpoint_dir: Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    train_state: dict[str, Any],
    info: dict[str, Any],
    extra_files: dict[str, str] | None = None,
    check_finite: bool = True,
) -> Path:
    """Write one checkpoint atomically and return its final path.

    `extra_files` (name → text) travel with it, e.g. tokenizer.json so generation needs nothing else.
    `check_finite`: refuse weights that hold NaN or inf (`NonFiniteWeightsError`, nothing written).
    A write that fails raises `CheckpointSaveError` with its temporary folder removed.
    """
    if check_finite and not all_finite(model_state):
        raise NonFiniteWeightsError(f"the weights at step {step} are not finite (NaN or inf), so they were not "
                                    f"saved; {_newest_note(checkpoint_dir)}. The run diverged: resume from that "
                                    "checkpoint with a lower --lr (or more --warmup-steps, or --grad-clip).")
    final = checkpoint_dir / f"{PREFIX}{step:07d}"
    tmp = checkpoint_dir / f"{final.name}.tmp-{os.getpid()}"
    try:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(checkpoint_dir)
        tmp.mkdir()
        info = {"format_version": FORMAT_VERSION, "step": step, "saved_at": time.time(),
                **({"finite": True} if check_finite else {}), **info}
        _write_file(tmp / "model.pt", lambda f: torch.save(model_state, f))
        _write_file(tmp / "train.pt", lambda f: torch.save(train_state, f))
        _write_file(tmp / "info.json", lambda f: f.write(json.dumps(info, indent=2).encode()))
        for name, text in (extra_files or {}).items():
            _write_file(tmp / name, lambda f, text=text: f.write(text.encode()))
        _write_file(tmp / MARKER, lambda f: f.write(b"ok\n"))
        fsync_path(tmp)
        if final.exists():  # re-saving the same step (e.g. a resumed run ending where it started)
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_path(checkpoint_dir)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        disk = _disk_error(e)
        if disk is None:
            raise
        raise save_error(disk, checkpoint_dir, step) from e
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
    weights_finite: bool | None = None,
) -> Path:
    """Collective version of `save_checkpoint` for multi-process runs.

    Rank 0 makes the temporary folder and tells the others its name; every rank writes its shards
    (`write_shards(tmp / "dcp")`, a collective); after a barrier rank 0 adds info.json, the extra files,
    the optional consolidated model.pt, then COMPLETE, and renames. A final barrier means no rank goes on
    (or exits) before the checkpoint is in place: it is rank 0's word on how that went, broadcast.

    `weights_finite`: the answer of `all_finite(model state, group)` — the same on every rank, so every
    rank refuses together (`NonFiniteWeightsError`) before anything is written. None: not checked.
    A disk error raises `CheckpointSaveError` on every rank (DCP reports a shard write that failed on any
    rank to all of them; rank 0 broadcasts its own); rank 0 removes the temporary folder.
    """
    if weights_finite is False:
        raise NonFiniteWeightsError(f"the weights at step {step} are not finite (NaN or inf), so they were not "
                                    f"saved; {_newest_note(checkpoint_dir)}. The run diverged: resume from that "
                                    "checkpoint with a lower --lr (or more --warmup-steps, or --grad-clip).")
    final = checkpoint_dir / f"{PREFIX}{step:07d}"
    # Rank 0 makes the folder and tells the others its name, or the error that stopped it (then every
    # rank stops here together, nothing written).
    made: tuple[str, Any] = ("", None)
    if rank == 0:
        tmp = checkpoint_dir / f"{final.name}.tmp-{os.getpid()}"
        try:
            checkpoint_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(checkpoint_dir)
            tmp.mkdir()
            made = ("ok", str(tmp))
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            made = ("error", (e.errno, e.strerror, e.filename and str(e.filename)))
    kind, value = broadcast_object(made)
    if kind == "error":
        raise save_error(OSError(*value), checkpoint_dir, step)
    tmp = Path(value)
    try:
        write_shards(tmp / "dcp")  # a collective: DCP raises a shard that failed on any rank on every rank
        barrier()
    except Exception as e:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        disk = _disk_error(e)
        if disk is None:
            raise
        raise save_error(disk, checkpoint_dir, step) from e
    # Rank 0 finishes alone, then tells every rank how it went (in place of a final barrier), so a disk
    # that fills up now stops all ranks with the same message instead of leaving them waiting.
    outcome: tuple[str, Any] = ("ok", None)
    error: Exception | None = None
    if rank == 0:
        try:
            info = {"format_version": FORMAT_VERSION, "step": step, "saved_at": time.time(),
                    **({"finite": weights_finite} if weights_finite is not None else {}), **info}
            if full_model_state is not None:
                _write_file(tmp / "model.pt", lambda f: torch.save(full_model_state, f))
            _write_file(tmp / "info.json", lambda f: f.write(json.dumps(info, indent=2).encode()))
            for name, text in (extra_files or {}).items():
                _write_file(tmp / name, lambda f, text=text: f.write(text.encode()))
            fsync_path(tmp / "dcp")
            _write_file(tmp / MARKER, lambda f: f.write(b"ok\n"))
            fsync_path(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_path(checkpoint_dir)
        except Exception as e:
            shutil.rmtree(tmp, ignore_errors=True)
            error, disk = e, _disk_error(e)
            outcome = ("disk", (disk.errno, disk.strerror, disk.filename and str(disk.filename))) if disk else \
                ("error", f"{type(e).__name__}: {str(e)[:300]}")
    kind, value = broadcast_object(outcome)
    if kind == "disk":
        raise save_error(OSError(*value), checkpoint_dir, step) from error
    if kind == "error":
        if error is not None:
            raise error
        raise RuntimeError(f"rank 0 failed to finish the checkpoint of step {step}: {value}")
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
        info = json.loads((path / "info.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: not UTF-8, not JSON
        raise UserError(f"checkpoint {path} has an unreadable info.json ({e}). Use another checkpoint.") from None
    if not isinstance(info, dict):
        raise UserError(f"checkpoint {path} has a damaged info.json (not a JSON object). Use another checkpoint.")
    wrong = [k for k, kinds in INFO_TYPES.items()
             if k in info and (not isinstance(info[k], kinds) or (bool not in kinds and isinstance(info[k], bool)))]
    if wrong:
        raise UserError(f"checkpoint {path} has a damaged info.json ({', '.join(wrong)} of the wrong type). "
                        "Use another checkpoint.")
    info = CheckpointRecord(info, path / "info.json", nested=True)
    info["step"]  # noqa: B018 - a checkpoint without its step is damaged: say so now, not later
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


def _pruning_facts(path: Path) -> tuple[bool | None, float | None]:
    """(finite, val loss) recorded in a checkpoint's info.json; (None, None) for what is not recorded.
    Checkpoints written before `finite` was recorded are unknown (None), not assumed bad."""
    try:
        info = json.loads((path / "info.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, None
    if not isinstance(info, dict):
        return None, None
    finite = info.get("finite") if isinstance(info.get("finite"), bool) else None
    loss = info.get("val_loss")
    ok = isinstance(loss, (int, float)) and not isinstance(loss, bool) and math.isfinite(loss)
    return finite, (float(loss) if ok else None)


def protected_checkpoints(ckpts: list[Path], keep_last: int) -> set[Path]:
    """What pruning keeps: the newest `keep_last`, the newest with finite weights (else the newest not known
    to be non-finite), and the best by val loss among those that have one and are not known non-finite."""
    keep = set(ckpts[-keep_last:]) if keep_last > 0 else set()
    facts = {p: _pruning_facts(p) for p in ckpts}
    finite = [p for p in ckpts if facts[p][0] is True] or [p for p in ckpts if facts[p][0] is None]
    if finite:
        keep.add(finite[-1])
    scored = [(facts[p][1], p) for p in ckpts if facts[p][1] is not None and facts[p][0] is not False]
    if scored:
        keep.add(min(scored, key=lambda lp: lp[0])[1])
    return keep


def prune_checkpoints(checkpoint_dir: Path, keep_last: int) -> list[Path]:
    """Delete the complete checkpoints `protected_checkpoints` does not keep: all but the newest `keep_last`,
    the newest with finite weights and the best by val loss (a checkpoint saved between evaluations has no
    val loss and is never "best").

    Also removes leftovers of interrupted saves. Returns what was deleted.
    """
    ckpts = list_checkpoints(checkpoint_dir)
    keep = protected_checkpoints(ckpts, keep_last)
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
