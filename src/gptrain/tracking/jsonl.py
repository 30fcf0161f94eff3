"""metrics.jsonl: one JSON object per log, eval, sample, alert or checkpoint event; always on.

Resume: a run resumed from the checkpoint of step K first writes `{"event": "resume", "from_step": K}`.
Rows of an earlier segment with a step above K were logged before a crash and are recomputed by
the new segment, so readers keep the later segment's values: `read_history` gives one row per step.

Damage: a power loss can cut the last line, a disk error or a hand edit can leave bytes that are not
UTF-8 or lines that are not JSON objects. `read_jsonl` is the one parser every reader goes through: it
skips such lines and counts them, so a reader can say how many it skipped instead of failing.
A writer that appends to an existing file (a resume) first ends a cut last line (`end_cut_line`),
so its own first event starts on a line of its own and stays readable.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


def _clean(value: Any) -> Any:
    # JSON has no NaN/inf: write them as strings so the file stays valid and the event stays visible.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def end_cut_line(path: str | Path) -> bool:
    """Append a newline when the file's last line has none (a write cut by a crash or power loss).

    The cut line stays unreadable (readers skip and count it); what is appended next starts on a line
    of its own. Returns whether a newline was added. Call before appending to an existing file.
    """
    try:
        with open(path, "rb+") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return False
            f.seek(-1, os.SEEK_END)
            if f.read(1) == b"\n":
                return False
            f.write(b"\n")
            f.flush()
            return True
    except FileNotFoundError:
        return False


def damaged_lines_note(path: str | Path, skipped: int) -> str:
    """The one sentence every reader uses to report skipped lines."""
    lines = "line" if skipped == 1 else "lines"
    return (f"{path}: skipped {skipped} damaged {lines} (not UTF-8, not JSON, or not an event object); "
            "the other events are read as usual.")


class JsonlTracker:
    name = "jsonl"

    def __init__(self, run_dir: Path, resumed_from_step: int | None = None, warn=None):
        self.path = Path(run_dir) / METRICS_FILE
        warn = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr))
        if self.path.is_file():  # a resume (or a run folder rebuilt around its metrics)
            _, skipped = read_jsonl(self.path)
            if skipped:
                warn(damaged_lines_note(self.path, skipped))
            end_cut_line(self.path)
        self._file = self.path.open("a", buffering=1)  # line-buffered: every event reaches the disk
        if resumed_from_step is not None:
            self._write({"event": "resume", "from_step": resumed_from_step, "time": time.time()})

    def log_config(self, config: dict[str, Any]) -> None:
        pass  # config.json in the run folder is the record

    def _write(self, row: dict[str, Any]) -> None:
        self._file.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self._write({"event": "metrics", "step": step, "time": time.time(), **metrics})

    def log_samples(self, samples: list[dict[str, Any]], step: int) -> None:
        for s in samples:
            self._write({"event": "sample", "step": step, "time": time.time(), **s})

    def alert(self, title: str, text: str, level: str, step: int) -> None:
        self._write({"event": "alert", "step": step, "time": time.time(), "title": title, "text": text,
                     "level": level})

    def log_checkpoint(self, path: Path, step: int, info: dict[str, Any]) -> None:
        self._write({"event": "checkpoint", "step": step, "time": time.time(), "path": str(path), **info})

    def finish(self, status: str) -> None:
        self._write({"event": "end", "status": status, "time": time.time()})
        self._file.close()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _usable_event(row: Any) -> bool:
    """A JSON object whose fields the readers rely on have their types (step and from_step integers,
    time a finite number); anything else is damage, skipped like an unparsable line."""
    if not isinstance(row, dict):
        return False
    if "step" in row and not _is_int(row["step"]):
        return False
    t = row.get("time")
    if t is not None and not (isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t)):
        return False
    return row.get("event") != "resume" or _is_int(row.get("from_step"))


def read_jsonl(path: str | Path) -> tuple[list[dict[str, Any]], int]:
    """(every usable event in file order, how many non-empty lines were skipped as damaged).

    The one parser of metrics.jsonl: lines that are not UTF-8, not JSON, not an object, or whose step /
    time / from_step have the wrong type are skipped and counted. A missing file is (no events, 0).
    """
    try:
        data = Path(path).read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return [], 0
    rows: list[dict[str, Any]] = []
    skipped = 0
    for raw in data.split(b"\n"):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            skipped += 1
            continue
        if _usable_event(row):
            rows.append(row)
        else:
            skipped += 1
    return rows, skipped


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Every usable event as written, in order (damaged lines skipped: `read_jsonl` counts them)."""
    return read_jsonl(Path(run_dir) / METRICS_FILE)[0]


def _number(value: Any) -> Any:
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return float(value)
    return value


def superseded(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drop the events a later segment recomputed: those with a step above a later resume's from_step."""
    kept: list[dict[str, Any]] = []
    for row in rows:
        if row.get("event") == "resume":
            k = int(row["from_step"])
            kept = [r for r in kept if r.get("step") is None or r["step"] <= k or r.get("event") == "resume"]
        kept.append(row)
    return kept


def history_of(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One merged row per optimizer step (train, val and other scalars), the later segment winning."""
    by_step: dict[int, dict[str, Any]] = {}
    for row in superseded(rows):
        if row.get("event") != "metrics" or "step" not in row:
            continue
        merged = by_step.setdefault(int(row["step"]), {"step": int(row["step"])})
        merged.update({k: _number(v) for k, v in row.items() if k not in ("event", "step")})
    return [by_step[s] for s in sorted(by_step)]


def read_history(run_dir: Path) -> list[dict[str, Any]]:
    """One merged row per optimizer step (train, val and other scalars), the later segment winning."""
    return history_of(read_metrics(run_dir))


def read_events(run_dir: Path, event: str) -> list[dict[str, Any]]:
    """Events of one kind (sample, alert, checkpoint, resume, end), superseded ones removed."""
    return [r for r in superseded(read_metrics(run_dir)) if r.get("event") == event]


def last_logged_step(run_dir: Path) -> int | None:
    steps = [r["step"] for r in read_metrics(run_dir) if r.get("event") == "metrics" and "step" in r]
    return max(steps) if steps else None
