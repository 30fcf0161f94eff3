"""What a run prints: plain lines everywhere, plus a live progress bar on a terminal.

Every line also goes to the run's train.log. When stdout is not a terminal (CI, pipes, files)
there is no bar and no control characters, only the lines.
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
from pathlib import Path


def format_duration(seconds: float, hours: bool = False) -> str:
    """0:07, 12:34, 1:02:03 (`hours`: always h:mm:ss, for columns): wall times and ETAs as people read them."""
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h or hours else f"{m}:{s:02d}"


class RunConsole:
    """A run's console through `logging`: one logger per run, a plain stdout handler (or rich's handler
    above the progress bar on a terminal), and train.log as a file handler once the run folder exists
    (the lines before it are buffered and written first)."""

    def __init__(self, mode: str = "auto", enabled: bool = True):
        self.enabled = enabled
        self.use_bar = enabled and (mode == "bar" or (mode == "auto" and sys.stdout.isatty()))
        self._progress = None
        self._task = None
        self.logger = logging.getLogger(f"gptrain.run.{id(self):x}")
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False  # the run's lines are its own, not the application's root logger's
        self._stdout = logging.StreamHandler(sys.stdout)
        self._stdout.setFormatter(logging.Formatter("%(message)s"))
        self._file: logging.Handler | None = None
        # Lines printed before the run folder exists, for train.log (flushed by attach_log only).
        self._early = logging.handlers.MemoryHandler(capacity=1_000_000, flushLevel=logging.CRITICAL + 1,
                                                     flushOnClose=False)
        for handler in (self._stdout, self._early):
            self.logger.addHandler(handler)

    def attach_log(self, path: Path) -> None:
        self._file = logging.FileHandler(path, mode="a", encoding="utf-8")
        self._file.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S"))
        self._early.setTarget(self._file)
        self._early.flush()
        self.logger.removeHandler(self._early)
        self._early.close()
        self.logger.addHandler(self._file)

    def print(self, line: str = "") -> None:
        if self.enabled:
            self.logger.info(line)

    def warn(self, message: str) -> None:
        self.print(f"warning: {message}")

    def start_bar(self, total: int, completed: int = 0, description: str = "training") -> None:
        if not self.use_bar:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn(),
            transient=True,
        )
        self._progress.start()
        self._task = self._progress.add_task(description, total=total, completed=completed, status="")
        # Lines go above the bar through rich's own logging handler while it is shown.
        from rich.logging import RichHandler

        self._rich = RichHandler(console=self._progress.console, show_time=False, show_level=False,
                                 show_path=False, markup=False, highlighter=None)
        self.logger.removeHandler(self._stdout)
        self.logger.addHandler(self._rich)

    def update_bar(self, completed: int, status: str | None = None) -> None:
        if self._progress is not None:
            fields = {"status": status} if status is not None else {}
            self._progress.update(self._task, completed=completed, **fields)

    def stop_bar(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
            self.logger.removeHandler(self._rich)
            self.logger.addHandler(self._stdout)

    def close(self) -> None:
        self.stop_bar()
        for handler in list(self.logger.handlers):
            self.logger.removeHandler(handler)
            if handler is not self._stdout:
                handler.close()
