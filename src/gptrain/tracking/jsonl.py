"""metrics.jsonl: one JSON object per log, eval or sample event; always on."""

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

    def __init__(self, run_dir: Path):
        self.path = run_dir / "metrics.jsonl"
        self._file = self.path.open("a", buffering=1)  # line-buffered: every event reaches the disk

    def log_config(self, config: dict[str, Any]) -> None:
        pass  # config.json in the run folder is the record

    def _write(self, row: dict[str, Any]) -> None:
        self._file.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self._write({"event": "metrics", "step": step, "time": time.time(), **metrics})

    def log_samples(self, samples: list[dict[str, Any]], step: int) -> None:
        for s in samples:
            self._write({"event": "sample", "step": step, "time": time.time(), **s})

    def finish(self, status: str) -> None:
        self._write({"event": "end", "status": status, "time": time.time()})
        self._file.close()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
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
