"""`gptrain runs`: one line per run folder, read from the folder alone (run.json, metrics.jsonl, tracking.json).

Status is run.json's (running / finished / interrupted / crashed). A run whose run.json still says
"running" but whose process (pid and host recorded at start) is gone on this machine was killed
without a chance to record its end (SIGKILL, out of memory, power loss): it is shown as crashed.
"""

from __future__ import annotations

import json
import math
import os
import socket
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gptrain.errors import UserError
from gptrain.tracking.jsonl import read_history, read_metrics


def process_identity() -> dict[str, Any]:
    """Recorded in run.json at start, so a later reader can tell a live run from a killed one."""
    return {"pid": os.getpid(), "host": socket.gethostname()}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _alive(info: dict[str, Any]) -> bool | None:
    """True/False when the recorded process can be checked from here, None when it cannot (other host)."""
    pid, host = info.get("pid"), info.get("host")
    if pid is None or host != socket.gethostname():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class RunSummary:
    name: str
    path: str
    status: str
    steps: int | None
    tokens: int | None
    best_val_loss: float | None
    last_train_loss: float | None
    tokens_per_sec: float | None
    wall_time: float | None
    wandb: str
    created_at: float | None


def wandb_location(run_dir: Path) -> str:
    """Where the run lives in W&B: its URL, or the offline folder and the command that uploads it."""
    rec = _read_json(run_dir / "tracking.json").get("wandb")
    if not rec:
        return "-"
    segs = rec.get("segments", [])
    offline = [s for s in segs if s.get("mode") == "offline"]
    unsynced = [s for s in offline if not any((run_dir / s["dir"]).glob("*.wandb.synced"))]
    if unsynced:
        return f"offline: {run_dir / 'wandb'} (gptrain sync {run_dir})"
    if rec.get("url"):
        return rec["url"]
    entity = f"{rec['entity']}/" if rec.get("entity") else ""
    return f"synced: {entity}{rec.get('project')}/runs/{rec.get('id')}" if offline else "-"


def _wall_time(info: dict[str, Any], rows: list[dict[str, Any]]) -> float | None:
    """Sum over segments of (last event − segment start); the gaps between segments do not count."""
    total, start, last = 0.0, info.get("created_at"), None
    for row in rows:
        if row.get("event") == "resume":
            if start is not None and last is not None:
                total += max(0.0, last - start)
            start, last = row.get("time"), None
        elif row.get("time") is not None:
            last = row["time"]
    if start is not None and last is not None:
        total += max(0.0, last - start)
    return total if rows else None


def summarize_run(run_dir: str | Path) -> RunSummary:
    run_dir = Path(run_dir)
    info = _read_json(run_dir / "run.json")
    status = info.get("status", "unknown")
    if status == "running" and _alive(info) is False:
        status = "crashed"
    history = read_history(run_dir)
    train = [r for r in history if isinstance(r.get("train/loss"), float)]
    vals = [r["val/loss"] for r in history if isinstance(r.get("val/loss"), float) and math.isfinite(r["val/loss"])]
    tps = [r["global_tokens_per_sec"] for r in history if isinstance(r.get("global_tokens_per_sec"), (int, float))]
    steps = history[-1]["step"] if history else info.get("step")
    tokens = next((r["train/tokens_seen"] for r in reversed(history) if "train/tokens_seen" in r),
                  info.get("tokens_seen"))
    # A run that ended (finished, stopped by a signal or crashed between two log steps) wrote its last
    # step to run.json; the history only reaches its last log step. (While a run is running, or after it
    # was killed, run.json may still hold an earlier segment's end.)
    if info.get("status") in ("finished", "interrupted", "crashed") and isinstance(info.get("step"), int) \
            and (steps is None or info["step"] > steps):
        steps, tokens = info["step"], info.get("tokens_seen", tokens)
    return RunSummary(
        name=info.get("name", run_dir.name), path=str(run_dir), status=status,
        steps=steps,
        tokens=tokens,
        best_val_loss=min(vals) if vals else None,
        last_train_loss=train[-1]["train/loss"] if train else None,
        tokens_per_sec=statistics.median(tps) if tps else None,
        wall_time=_wall_time(info, read_metrics(run_dir)),
        wandb=wandb_location(run_dir),
        created_at=info.get("created_at"),
    )


def find_runs(path: str | Path) -> list[Path]:
    """A run folder itself, or the run folders inside a folder, oldest first."""
    p = Path(path)
    if (p / "run.json").is_file():
        return [p]
    if not p.is_dir():
        raise UserError(f"{p} is not a folder. Pass a runs folder (default: runs) or a run folder.")
    runs = [d for d in p.iterdir() if (d / "run.json").is_file()]
    return sorted(runs, key=lambda d: (_read_json(d / "run.json").get("created_at") or 0, d.name))


def _fmt_count(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


def _fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


def format_table(summaries: list[RunSummary]) -> str:
    header = ["name", "status", "steps", "tokens", "best val", "last train", "tok/s", "wall", "W&B"]
    rows = [[s.name, s.status, "-" if s.steps is None else str(s.steps), _fmt_count(s.tokens),
             "-" if s.best_val_loss is None else f"{s.best_val_loss:.4f}",
             "-" if s.last_train_loss is None else f"{s.last_train_loss:.4f}",
             _fmt_count(s.tokens_per_sec), _fmt_time(s.wall_time), s.wandb] for s in summaries]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    right = {2, 3, 4, 5, 6, 7}
    lines = []
    for r in [header, *rows]:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def runs_report(path: str | Path = "runs", as_json: bool = False) -> str:
    summaries = [summarize_run(d) for d in find_runs(path)]
    if as_json:
        return json.dumps([asdict(s) for s in summaries], indent=2)
    if not summaries:
        return f"no runs in {path}/"
    return format_table(summaries)
