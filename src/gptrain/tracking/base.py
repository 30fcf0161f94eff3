"""The Tracker protocol: what the trainer tells a tracker, and the fan-out to several of them.

Trackers receive host-side Python numbers only (the trainer moves metrics to the host on log
steps), so no tracker can add a device synchronisation. A tracker that raises is reported once
and then skipped: recording must never stop a training.
"""

from __future__ import annotations

import sys
from typing import Any, Protocol


class Tracker(Protocol):
    name: str

    def log_config(self, config: dict[str, Any]) -> None: ...

    def log(self, metrics: dict[str, Any], step: int) -> None: ...

    def log_samples(self, samples: list[dict[str, Any]], step: int) -> None: ...

    def finish(self, status: str) -> None: ...


class NullTracker:
    """What ranks other than 0 get: accepts everything, records nothing."""

    name = "null"

    def log_config(self, config: dict[str, Any]) -> None:
        pass

    def log(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def log_samples(self, samples: list[dict[str, Any]], step: int) -> None:
        pass

    def finish(self, status: str) -> None:
        pass


class MultiTracker:
    """Fans calls out to several trackers; a failing tracker is warned about once and dropped."""

    name = "multi"

    def __init__(self, trackers: list[Tracker], warn=None):
        self.trackers = list(trackers)
        self._warn = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr))

    def _each(self, method: str, *args) -> None:
        for tracker in list(self.trackers):
            try:
                getattr(tracker, method)(*args)
            except Exception as e:  # noqa: BLE001 - a tracker must never stop training
                self._warn(f"tracker '{tracker.name}' failed in {method}() and is switched off: "
                           f"{type(e).__name__}: {e}")
                self.trackers.remove(tracker)

    def log_config(self, config: dict[str, Any]) -> None:
        self._each("log_config", config)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self._each("log", metrics, step)

    def log_samples(self, samples: list[dict[str, Any]], step: int) -> None:
        self._each("log_samples", samples, step)

    def finish(self, status: str) -> None:
        self._each("finish", status)
