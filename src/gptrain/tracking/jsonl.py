"""metrics.jsonl: one JSON object per log, eval, sample, alert or checkpoint event; always on.

Resume: a run resumed from the checkpoint of step K first writes `{"event": "resume", "from_step": K}`.
Rows of an earlier segment with a step above K were logged before a crash and are recomputed by
the new segment, so readers keep the later segment's values: `read_history` gives one row per step.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any


def _clean(value: Any) -> Any:
    # JSON has no NaN/inf: write them as strings so the file stays valid and the event stays visible.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class JsonlTracker:
    name = "jsonl"

    def __init__(self, run_dir: Path, resumed_from_step: int | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
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


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Every event as written, in order (a line cut by a crash is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a crash
    return rows


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


def read_history(run_dir: Path) -> list[dict[str, Any]]:
    """One merged row per optimizer step (train, val and other scalars), the later segment winning."""
    by_step: dict[int, dict[str, Any]] = {}
    for row in superseded(read_metrics(run_dir)):
        if row.get("event") != "metrics":
            continue
        merged = by_step.setdefault(int(row["step"]), {"step": int(row["step"])})
        merged.update({k: _number(v) for k, v in row.items() if k not in ("event", "step")})
    return [by_step[s] for s in sorted(by_step)]


def read_events(run_dir: Path, event: str) -> list[dict[str, Any]]:
    """Events of one kind (sample, alert, checkpoint, resume, end), superseded ones removed."""
    return [r for r in superseded(read_metrics(run_dir)) if r.get("event") == event]


def last_logged_step(run_dir: Path) -> int | None:
    steps = [r["step"] for r in read_metrics(run_dir) if r.get("event") == "metrics"]
    return max(steps) if steps else None
