"""The run folder: runs/<name>/ holds everything that explains a run.

    config.json       every setting, resolved
    environment.json  versions, git commit, device, world size, parameter counts, dataset
    run.json          id, name, status (running / finished / interrupted / crashed), times
    metrics.jsonl     one JSON object per log / eval / sample event
    train.log         the console output
    checkpoints/      see checkpoint.py
"""

from __future__ import annotations

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

import torch

import gptrain
from gptrain.errors import UserError


def new_run_name() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def new_run_id() -> str:
    return secrets.token_hex(4)


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def make_run_dir(runs_dir: str | Path, name: str, *, must_be_new: bool) -> Path:
    run_dir = Path(runs_dir) / name
    if must_be_new and (run_dir / "run.json").exists():
        raise UserError(f"run folder {run_dir} already exists. Continue it with --resume, or choose another "
                        "--run-name.")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write the run folder {run_dir} ({e.strerror}). Choose a writable --runs-dir.") \
            from None
    return run_dir


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


def environment_record(device: torch.device, world_size: int) -> dict[str, Any]:
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


def update_run_status(run_dir: Path, status: str, **extra: Any) -> None:
    info = read_json(run_dir / "run.json")
    info.update(status=status, updated_at=time.time(), **extra)
    if status != "running":
        info["ended_at"] = time.time()
    write_json_atomic(run_dir / "run.json", info)
