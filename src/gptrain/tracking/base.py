"""The Tracker protocol: what the trainer tells a tracker, and the fan-out to several of them.

Trackers receive host-side Python numbers only (the trainer moves metrics to the host on log
steps), so no tracker can add a device synchronisation. A tracker that raises is reported once
and then skipped: recording must never stop a training.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, Protocol


class Tracker(Protocol):
    name: str

    def log_config(self, config: dict[str, Any]) -> None: ...

    def log(self, metrics: dict[str, Any], step: int) -> None: ...

    def log_samples(self, samples: list[dict[str, Any]], step: int) -> None: ...

    def finish(self, status: str) -> None: ...

    # Optional, called only on trackers that define them:
    #   alert(title, text, level, step)            a non-finite loss or a loss spike
    #   log_checkpoint(path, step, info)           a checkpoint was saved


class NullTracker:
    """What ranks other than 0 get: accepts everything, records nothing."""

    name = "null"

    def log_config(self, config: dict[str, Any]) -> None:
        pass

    def log(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def log_samples(self, samples: list[dict[str, Any]], step: int) -> None:
        pass

    def log_checkpoint(self, path, step: int, info: dict[str, Any]) -> None:
        pass

    def finish(self, status: str) -> None:
        pass


class MultiTracker:
    """Fans calls out to several trackers; a failing tracker is warned about once and dropped.

    It also watches the train loss (`LossWatch`): a non-finite value or a spike becomes a console
    warning and an `alert()` on the trackers that have one, rate-limited per kind.
    """

    name = "multi"

    def __init__(self, trackers: list[Tracker], warn=None, loss_watch: LossWatch | None = None):
        self.trackers = list(trackers)
        self._warn = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr))
        self.loss_watch = loss_watch or LossWatch()

    def _each(self, method: str, *args) -> None:
        for tracker in list(self.trackers):
            fn = getattr(tracker, method, None)
            if fn is None:
                continue
            try:
                fn(*args)
            except Exception as e:  # noqa: BLE001 - a tracker must never stop training
                self._warn(f"tracker '{tracker.name}' failed in {method}() and is switched off: "
                           f"{type(e).__name__}: {e}")
                self.trackers.remove(tracker)

    def log_config(self, config: dict[str, Any]) -> None:
        self._each("log_config", config)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self._each("log", metrics, step)
        if "train/loss" in metrics:
            for title, text, level in self.loss_watch.check(metrics["train/loss"], step):
                self._warn(text)
                self._each("alert", title, text, level, step)

    def log_samples(self, samples: list[dict[str, Any]], step: int) -> None:
        self._each("log_samples", samples, step)

    def log_checkpoint(self, path, step: int, info: dict[str, Any]) -> None:
        self._each("log_checkpoint", path, step, info)

    def finish(self, status: str) -> None:
        self._each("finish", status)


class LossWatch:
    """Turns train-loss values into alerts: non-finite, or `spike_factor` × the running average.

    The running average is an exponential mean over logged values (spikes excluded), trusted after
    `warmup` values. Each kind of alert fires at most once per `interval` seconds.
    """

    def __init__(self, spike_factor: float = 2.0, interval: float = 600.0, warmup: int = 5, clock=time.monotonic):
        self.spike_factor, self.interval, self.warmup, self.clock = spike_factor, interval, warmup, clock
        self.average: float | None = None
        self.seen = 0
        self._last_fired: dict[str, float] = {}

    def check(self, loss: float, step: int) -> list[tuple[str, str, str]]:
        alerts = []
        if not math.isfinite(loss):
            alerts.append(("non-finite loss", f"non-finite train loss ({loss}) at step {step}.", "ERROR"))
        elif (self.spike_factor > 0 and self.average is not None and self.seen >= self.warmup
              and loss > self.spike_factor * self.average):
            alerts.append(("loss spike", f"train loss spiked to {loss:.4f} at step {step} "
                           f"({loss / self.average:.1f}× its running average {self.average:.4f}).", "WARN"))
        else:
            self.average = loss if self.average is None else 0.9 * self.average + 0.1 * loss
            self.seen += 1
        now = self.clock()
        fired = []
        for title, text, level in alerts:
            if now - self._last_fired.get(title, -math.inf) >= self.interval:
                self._last_fired[title] = now
                fired.append((title, text, level))
        return fired
