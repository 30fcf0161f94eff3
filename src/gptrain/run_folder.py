"""The run folder: runs/<name>/ holds everything that explains a run.

    config.json       every setting, resolved
    environment.json  versions, git commit, device, world size, parameter counts, dataset
    run.json          id, name, status (running / finished / interrupted / crashed / failed / diverged), times
    metrics.jsonl     one JSON object per log / eval / sample event
    train.log         the console output
    checkpoints/      see checkpoint.py
    .lock             who writes the run now (see RunLock)

One writer per run: a process that writes a run folder holds an OS lock on its `.lock` file for its
whole life (`RunLock`); the kernel drops the lock when the process ends, however it ends, so a lock
left by a killed process never blocks, and a second process is refused at once with the holder's
pid, host and start time. `open_run_dir` takes the lock before it looks at what the folder holds,
so two launches of the same new run cannot both see it empty.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import platform
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import gptrain
from gptrain.errors import UserError
from gptrain.jsonio import read_json, write_json_atomic

__all__ = ["RunLock", "check_run_name", "environment_record", "git_state", "make_run_dir", "new_run_id",
           "new_run_name", "open_run_dir", "read_json", "read_run_record", "rebuild_run_record",
           "record_run_status", "release_run_dir", "run_dir_for_resume", "update_run_status", "write_json_atomic"]

LOCK_FILE = ".lock"
# What makes a folder a run that a new run must not be started into (a folder holding only a
# train.log or a lock file is a launch that failed before it trained).
RUN_RECORDS = ("run.json", "metrics.jsonl", "checkpoints")


def new_run_name() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def new_run_id() -> str:
    return secrets.token_hex(4)


# --------------------------------------------------------------------------- run names


def check_run_name(name: Any, source: str) -> str:
    """`name` when it is one folder name (the run lives in --runs-dir/<name>), else a UserError naming `source`
    (the flag or TOML key it came from, e.g. "--run-name" or "run_name in exp.toml")."""
    problem = None
    if not isinstance(name, str) or not name:
        problem = "it is empty" if name == "" else f"it is not text ({type(name).__name__})"
    elif "/" in name or "\\" in name:
        problem = "it contains a path separator ('/' or '\\')"
    elif name in (".", ".."):
        problem = f"'{name}' names a folder around the run, not a run"
    elif any(ord(c) < 32 or c == "\x7f" for c in name):
        problem = "it contains a control character"
    elif len(name.encode("utf-8", "surrogatepass")) > 255:
        problem = "it is longer than a file name can be (255 bytes)"
    if problem is None:
        return name
    suggestion = "-".join(p for p in str(name).replace("\\", "/").split("/") if p not in ("", ".", ".."))
    suggestion = "".join(c for c in suggestion if ord(c) >= 32 and c != "\x7f")[:64] or new_run_name()
    raise UserError(f"{source} {name!r} is not a run name: {problem}. A run name is one folder name inside "
                    f"--runs-dir (no '/', '\\', '..'); e.g. {suggestion!r}.")


# --------------------------------------------------------------------------- one writer per run


class RunLock:
    """An exclusive OS lock (flock) on `<run_dir>/.lock`, held until `release()` or the process ends.

    The lock file holds the holder's pid, host and start time, for the message a second process gets.
    The file is never deleted (deleting it would let two processes lock two different files of the same
    name); a released or dead holder's content is ignored, only the kernel's lock counts. Within one
    process the lock is re-entrant: acquiring a run this process already holds counts one more holder.
    """

    # This process's locks, by resolved run folder: [descriptor, holders]. The descriptor lives here, not
    # on an instance, so a lock taken by `make_run_dir` stays held after its RunLock object is gone.
    _held: dict[str, list[int]] = {}

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._key = str(self.run_dir.resolve())
        self._acquired = False

    @property
    def held(self) -> bool:
        """Whether this process holds the run's lock (through this object or another)."""
        return self._key in RunLock._held

    def acquire(self) -> RunLock:
        if self._acquired:
            raise RuntimeError(f"RunLock({self.run_dir}) acquired twice through the same object")
        entry = RunLock._held.get(self._key)
        if entry is not None:
            entry[1] += 1
            self._acquired = True
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UserError(f"run folder {self.run_dir} is in use: {self._describe_holder()}. One process "
                                "writes a run at a time: wait for it to end (or stop it), or start another "
                                "--run-name.") from None
            raise UserError(f"cannot lock the run folder {self.run_dir} ({e.strerror}). Use a --runs-dir on a "
                            "file system that supports file locks.") from None
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started_at": time.time(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv)[:500]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        RunLock._held[self._key] = [fd, 1]
        self._acquired = True
        return self

    def holder(self) -> dict[str, Any]:
        """The record of the process holding the lock ({} when none is written)."""
        return read_json(self.path)

    def _describe_holder(self) -> str:
        holder: dict[str, Any] = {}
        for _ in range(20):  # the holder writes its record right after locking: give it a moment
            holder = self.holder()
            if holder.get("pid"):
                break
            time.sleep(0.05)
        if not holder.get("pid"):
            return "another process holds its lock"
        return (f"process {holder['pid']} on {holder.get('host', '?')} (started {holder.get('started', '?')}) "
                "is writing it")

    def release(self) -> None:
        if not self._acquired:
            return
        self._acquired = False
        entry = RunLock._held.get(self._key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del RunLock._held[self._key]
        try:
            os.ftruncate(entry[0], 0)  # the record names no process once the lock is free
        except OSError:
            pass
        os.close(entry[0])  # closing the last descriptor drops the flock

    def __enter__(self) -> RunLock:
        # `with open_run_dir(...) as lock:` enters a lock that is already held: it is released at the end.
        return self if self._acquired else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write the run folder {run_dir} ({e.strerror}). Choose a writable --runs-dir.") \
            from None


def open_run_dir(runs_dir: str | Path, name: str, *, must_be_new: bool, source: str = "--run-name") -> RunLock:
    """Create (or open) --runs-dir/<name> and lock it for this process; returns the held lock.

    The lock is taken before the folder's contents are looked at: of two launches of the same new
    run, the second is refused (in use, or already exists) whatever the timing.
    """
    check_run_name(name, source)
    run_dir = Path(runs_dir) / name
    _writable(run_dir)
    lock = RunLock(run_dir).acquire()
    if must_be_new:
        found = [f for f in RUN_RECORDS if (run_dir / f).exists()]
        if found:
            lock.release()
            raise UserError(f"run folder {run_dir} already exists (it holds {', '.join(found)}). Continue it with "
                            "--resume, or choose another --run-name.")
    return lock


def make_run_dir(runs_dir: str | Path, name: str, *, must_be_new: bool) -> Path:
    """`open_run_dir`, returning the folder; the lock stays held until the process ends (or the
    RunLock that `open_run_dir` returns is released)."""
    return open_run_dir(runs_dir, name, must_be_new=must_be_new).run_dir


def release_run_dir(run_dir: str | Path) -> None:
    """Drop this process's lock on `run_dir` however many holders it counts (the end of a training in a
    process that goes on, e.g. a test or a notebook, so another process may continue the run)."""
    key = str(Path(run_dir).resolve())
    entry = RunLock._held.pop(key, None)
    if entry is not None:
        try:
            os.ftruncate(entry[0], 0)
        except OSError:
            pass
        os.close(entry[0])


def run_dir_for_resume(checkpoint_path: str | Path, info: dict[str, Any], runs_dir: str | Path) -> Path:
    """The run folder a resume from this checkpoint continues.

    A checkpoint inside `<run>/checkpoints/` continues `<run>`, whatever its info.json or run.json say
    (a copied or moved run continues where it now is). A checkpoint elsewhere (a custom --checkpoint-dir)
    continues `--runs-dir/<its run name>`: the folder recorded at save time is never reused, so --runs-dir
    always decides where a run lives.
    """
    path = Path(checkpoint_path)
    if path.parent.name == "checkpoints":
        return path.parent.parent
    name = info.get("run_name")
    return Path(runs_dir) / check_run_name(name, f"the run name in {path / 'info.json'}")


# --------------------------------------------------------------------------- run.json


def rebuild_run_record(run_dir: str | Path) -> dict[str, Any]:
    """A run.json rebuilt from what this folder holds (metrics.jsonl, checkpoints/, tracking.json), for a
    run whose run.json is missing or damaged. Nothing is read from any other folder.

    The name is the folder's. The status is the last `end` event's when nothing was logged after it,
    else "crashed" (the process ended without recording its end). `rebuilt_at` marks the record.
    """
    from gptrain.tracking.jsonl import METRICS_FILE, read_jsonl

    run_dir = Path(run_dir)
    rows, _ = read_jsonl(run_dir / METRICS_FILE)
    ckpt_info = _newest_checkpoint_info(run_dir / "checkpoints")
    times = [r["time"] for r in rows if isinstance(r.get("time"), (int, float))]
    steps = [r["step"] for r in rows if r.get("event") == "metrics" and "step" in r]
    tokens = [r["train/tokens_seen"] for r in rows if isinstance(r.get("train/tokens_seen"), int)]
    created = min(times) if times else _oldest_mtime(run_dir)
    status = "crashed"
    if rows and rows[-1].get("event") == "end" and isinstance(rows[-1].get("status"), str):
        status = rows[-1]["status"]
    record: dict[str, Any] = {
        "run_id": _str_or_none(ckpt_info.get("run_id")) or _str_or_none(
            (read_json(run_dir / "tracking.json").get("wandb") or {}).get("id")),
        "name": run_dir.name,
        "created_at": created,
        "status": status,
        "resumes": [{"from_step": r["from_step"], "at": r.get("time")} for r in rows if r.get("event") == "resume"],
        "rebuilt_at": time.time(),
    }
    ckpt_step = ckpt_info.get("step") if isinstance(ckpt_info.get("step"), int) else None
    step = max([s for s in (max(steps) if steps else None, ckpt_step) if s is not None], default=None)
    if step is not None:
        record["step"] = step
        ckpt_tokens = ckpt_info.get("tokens_seen") if ckpt_step == step else None
        record["tokens_seen"] = ckpt_tokens if isinstance(ckpt_tokens, int) else (max(tokens) if tokens else None)
    return record


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _newest_checkpoint_info(checkpoint_dir: Path) -> dict[str, Any]:
    if not checkpoint_dir.is_dir():
        return {}
    # The layout of checkpoint.py (step_NNNNNNN/ with COMPLETE written last), read without importing torch.
    done = sorted(p for p in checkpoint_dir.iterdir()
                  if p.name.startswith("step_") and ".tmp-" not in p.name and (p / "COMPLETE").is_file())
    for p in reversed(done):
        info = read_json(p / "info.json")
        if info:
            return info
    return {}


def _oldest_mtime(run_dir: Path) -> float | None:
    stamps = []
    for p in run_dir.iterdir() if run_dir.is_dir() else ():
        try:
            stamps.append(p.stat().st_mtime)
        except OSError:
            continue
    return min(stamps) if stamps else None


def read_run_record(run_dir: str | Path) -> tuple[dict[str, Any], str | None]:
    """(run.json's record, None), or (a record rebuilt from the folder, a note saying why) when run.json is
    missing, not JSON, or not an object."""
    path = Path(run_dir) / "run.json"
    info = read_json(path)
    if info:
        return info, None
    why = "is missing" if not path.exists() else "is damaged"
    return rebuild_run_record(run_dir), f"{path} {why}: its record was rebuilt from the run folder"


def update_run_status(run_dir: Path, status: str, **extra: Any) -> None:
    info = read_json(run_dir / "run.json")
    info.update(status=status, updated_at=time.time(), **extra)
    if status != "running":
        info["ended_at"] = time.time()
    write_json_atomic(run_dir / "run.json", info)


def record_run_status(run_dir: Path, status: str, **extra: Any) -> str | None:
    """`update_run_status` for the end of a run that may have failed because the disk is full: never raises
    for a write error, returns a sentence saying why the status could not be recorded (None when it was)."""
    try:
        update_run_status(run_dir, status, **extra)
    except OSError as e:
        return (f"the run's status '{status}' could not be written to {Path(run_dir) / 'run.json'} ({e.strerror}); "
                "`gptrain runs` shows it as crashed")
    return None


# --------------------------------------------------------------------------- environment


def git_state() -> dict[str, Any]:
    """Commit and dirtiness of the gptrain checkout, when gptrain runs from one."""
    src = Path(gptrain.__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True, timeout=5)
        if commit.returncode != 0:
            return {}
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=src,
                               capture_output=True, text=True, timeout=5)
        return {"git_commit": commit.stdout.strip(), "git_dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {}


def environment_record(device, world_size: int) -> dict[str, Any]:
    import torch  # here, not at the top: `gptrain runs` reads run folders without loading torch

    env: dict[str, Any] = {
        "gptrain_version": gptrain.__version__,
        **git_state(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "world_size": world_size,
        "command": sys.argv,
    }
    return env
