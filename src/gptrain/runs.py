"""`gptrain runs`: one line per run folder, read from the folder alone (run.json, metrics.jsonl, tracking.json).

Status is run.json's (running / finished / interrupted / crashed / failed / diverged). A run whose
run.json still says "running" but whose process (pid and host recorded at start) is gone on this
machine was killed without a chance to record its end (SIGKILL, out of memory, power loss): it is
shown as crashed.

Damage never hides a run nor the others: a run folder whose run.json is missing or damaged is still
listed (its record rebuilt from the folder), damaged lines of metrics.jsonl are skipped, and what was
wrong is said in a note under the table, once per run.
"""

from __future__ import annotations

import json
import math
import os
import socket
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gptrain.console import format_duration
from gptrain.errors import UserError
from gptrain.processes import process_alive
from gptrain.run_folder import RUN_RECORDS, read_run_record
from gptrain.tracking.jsonl import METRICS_FILE, damaged_lines_note, history_of, read_jsonl


def process_identity() -> dict[str, Any]:
    """Recorded in run.json at start, so a later reader can tell a live run from a killed one."""
    return {"pid": os.getpid(), "host": socket.gethostname()}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # ValueError: not UTF-8, not JSON
        return {}
    return data if isinstance(data, dict) else {}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# The run.json fields the table reads, and the type each must have to be used.
RECORD_FIELDS = {"name": str, "status": str, "step": int, "tokens_seen": int, "created_at": float,
                 "resumes": list}


def _checked_record(info: dict[str, Any], path: Path) -> tuple[dict[str, Any], list[str]]:
    """run.json's fields with the wrong type dropped (and named), so one bad value spoils one cell."""
    kept, wrong = dict(info), []
    for key, kind in RECORD_FIELDS.items():
        if key not in kept or kept[key] is None:
            continue
        value = kept[key]
        ok = _is_number(value) if kind is float else isinstance(value, kind) and not isinstance(value, bool)
        if not ok:
            wrong.append(key)
            del kept[key]
    return kept, ([f"{path}: ignored {', '.join(wrong)} (wrong type)"] if wrong else [])


def _alive(info: dict[str, Any]) -> bool | None:
    """True/False when the recorded process can be checked from here, None when it cannot (other host)."""
    pid, host = info.get("pid"), info.get("host")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 or host != socket.gethostname():
        return None
    return process_alive(pid)


@dataclass
class RunSummary:
    name: str
    path: str
    status: str
    steps: int | None
    tokens: int | None
    best_val_loss: float | None
    best_val_bpb: float | None
    last_train_loss: float | None
    tokens_per_sec: float | None
    wall_time: float | None
    wandb: str
    created_at: float | None
    problems: list[str] = field(default_factory=list)  # damage found while reading, for the notes


def wandb_location(run_dir: Path) -> str:
    """Where the run lives in W&B: its URL, or the offline folder and the command that uploads it."""
    rec = _read_json(run_dir / "tracking.json").get("wandb")
    if not rec or not isinstance(rec, dict):
        return "-"
    segs = rec.get("segments") if isinstance(rec.get("segments"), list) else []
    offline = [s for s in segs if isinstance(s, dict) and s.get("mode") == "offline" and isinstance(s.get("dir"), str)]
    unsynced = [s for s in offline if not any((run_dir / s["dir"]).glob("*.wandb.synced"))]
    if unsynced:
        return f"offline: {run_dir / 'wandb'} (gptrain sync {run_dir})"
    if rec.get("url"):
        return rec["url"]
    entity = f"{rec['entity']}/" if rec.get("entity") else ""
    return f"synced: {entity}{rec.get('project')}/runs/{rec.get('id')}" if offline else "-"


def _wall_time(info: dict[str, Any], rows: list[dict[str, Any]]) -> float | None:
    """Sum over segments of (last event − segment start); the gaps between segments do not count.

    A segment starts at run.json's created_at, at each resume (the `resume` event, and run.json's
    `resumes` list, which survives a resume event lost to a cut line), or at the first event after
    an `end`; it ends at its last event.
    """
    marks: list[tuple[float, str]] = []
    for row in rows:
        if _is_number(row.get("time")):
            marks.append((float(row["time"]), row.get("event") if row.get("event") in ("resume", "end") else "event"))
    for r in info.get("resumes") or []:
        if isinstance(r, dict) and _is_number(r.get("at")):
            marks.append((float(r["at"]), "resume"))
    marks.sort(key=lambda m: m[0])  # stable: file order among equal times
    created = info.get("created_at")
    total, start, last = 0.0, (float(created) if _is_number(created) else None), None
    for t, kind in marks:
        if kind == "resume":
            if start is not None and last is not None:
                total += max(0.0, last - start)
            if start is None or last is not None:  # the second record of one resume keeps the first's time
                start = t
            last = None
            continue
        if start is None:
            start = t
        last = t
        if kind == "end":
            total += max(0.0, last - start)
            start = last = None
    if start is not None and last is not None:
        total += max(0.0, last - start)
    return total if rows else None


def summarize_run(run_dir: str | Path) -> RunSummary:
    run_dir = Path(run_dir)
    raw, rebuilt = read_run_record(run_dir)
    problems = [rebuilt] if rebuilt else []
    info, wrong = _checked_record(raw, run_dir / "run.json")
    problems += wrong
    status = info.get("status", "unknown")
    if status == "running" and _alive(info) is False:
        status = "crashed"
    rows, skipped = read_jsonl(run_dir / METRICS_FILE)
    if skipped:
        problems.append(damaged_lines_note(run_dir / METRICS_FILE, skipped))
    history = history_of(rows)
    train = [r for r in history if isinstance(r.get("train/loss"), float)]
    vals = [r["val/loss"] for r in history if isinstance(r.get("val/loss"), float) and math.isfinite(r["val/loss"])]
    bpbs = [r["val/bpb"] for r in history if isinstance(r.get("val/bpb"), float) and math.isfinite(r["val/bpb"])]
    tps = [r["global_tokens_per_sec"] for r in history if _is_number(r.get("global_tokens_per_sec"))]
    steps = history[-1]["step"] if history else info.get("step")
    tokens = next((r["train/tokens_seen"] for r in reversed(history) if _is_number(r.get("train/tokens_seen"))),
                  info.get("tokens_seen"))
    # A run that ended (finished, stopped by a signal or crashed between two log steps) wrote its last
    # step to run.json; the history only reaches its last log step. (While a run is running, or after it
    # was killed, run.json may still hold an earlier segment's end.)
    if info.get("status") in ("finished", "interrupted", "crashed", "failed", "diverged") \
            and isinstance(info.get("step"), int) and (steps is None or info["step"] > steps):
        steps, tokens = info["step"], info.get("tokens_seen", tokens)
    return RunSummary(
        name=info.get("name", run_dir.name), path=str(run_dir), status=status,
        steps=steps,
        tokens=tokens,
        best_val_loss=min(vals) if vals else None,
        best_val_bpb=min(bpbs) if bpbs else None,
        last_train_loss=train[-1]["train/loss"] if train else None,
        tokens_per_sec=statistics.median(tps) if tps else None,
        wall_time=_wall_time(info, rows),
        wandb=wandb_location(run_dir),
        created_at=info.get("created_at"),
        problems=problems,
    )


def _unreadable(run_dir: Path, error: Exception) -> RunSummary:
    """A run folder the summary could not read at all: listed, with what went wrong."""
    return RunSummary(name=run_dir.name, path=str(run_dir), status="unreadable", steps=None, tokens=None,
                      best_val_loss=None, best_val_bpb=None, last_train_loss=None, tokens_per_sec=None, wall_time=None, wandb="-",
                      created_at=None, problems=[f"{run_dir}: could not be read ({type(error).__name__}: {error})"])


def is_run_folder(path: Path) -> bool:
    """A folder holding a run's records (run.json, or, when that is lost, metrics.jsonl or checkpoints/)."""
    return path.is_dir() and not path.name.startswith(".") and any((path / f).exists() for f in RUN_RECORDS)


def _created_at(run_dir: Path) -> float:
    value = _read_json(run_dir / "run.json").get("created_at")
    return float(value) if _is_number(value) else 0.0


def find_runs(path: str | Path) -> list[Path]:
    """A run folder itself, or the run folders inside a folder, oldest first."""
    p = Path(path)
    if (p / "run.json").is_file():
        return [p]
    if not p.is_dir():
        raise UserError(f"{p} is not a folder. Pass a runs folder (default: runs) or a run folder.")
    runs = [d for d in p.iterdir() if is_run_folder(d)]
    if not runs and is_run_folder(p):  # a run folder that lost its run.json
        return [p]
    return sorted(runs, key=lambda d: (_created_at(d), d.name))


def _fmt_count(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


def _fmt_time(seconds: float | None) -> str:
    return "-" if seconds is None else format_duration(seconds, hours=True)


def format_table(summaries: list[RunSummary]) -> str:
    """The runs as a plain-text table (rich.table, no borders or colours: it goes to pipes and files too)."""
    import io

    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, show_edge=False, pad_edge=False, padding=(0, 2, 0, 0), header_style=None)
    for name, right in (("name", False), ("status", False), ("steps", True), ("tokens", True), ("best val", True),
                        ("val bpb", True), ("last train", True), ("tok/s", True), ("wall", True), ("W&B", False)):
        table.add_column(name, justify="right" if right else "left", no_wrap=True)
    for s in summaries:
        table.add_row(s.name, s.status, "-" if s.steps is None else str(s.steps), _fmt_count(s.tokens),
                      _fmt_loss(s.best_val_loss), _fmt_loss(s.best_val_bpb), _fmt_loss(s.last_train_loss),
                      _fmt_count(s.tokens_per_sec), _fmt_time(s.wall_time), s.wandb)
    out = io.StringIO()
    Console(file=out, width=10_000, color_system=None, highlight=False).print(table)
    return "\n".join(line.rstrip() for line in out.getvalue().splitlines())


def _fmt_loss(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def summarize_or_report(run_dir: Path) -> RunSummary:
    """`summarize_run`, or, when the folder is damaged beyond what it handles, a row saying so:
    one damaged run never takes the table of the others down."""
    try:
        return summarize_run(run_dir)
    except Exception as e:  # noqa: BLE001 - a reader lists what it can, and says what it could not
        return _unreadable(run_dir, e)


def format_notes(summaries: list[RunSummary]) -> str:
    """One note per problem found, under the table."""
    return "\n".join(f"note: {s.name}: {p}" for s in summaries for p in s.problems)


def runs_report(path: str | Path = "runs", as_json: bool = False) -> str:
    summaries = [summarize_or_report(d) for d in find_runs(path)]
    if as_json:
        return json.dumps([asdict(s) for s in summaries], indent=2)
    if not summaries:
        return f"no runs in {path}/"
    notes = format_notes(summaries)
    return format_table(summaries) + (f"\n\n{notes}" if notes else "")
