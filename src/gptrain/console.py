"""What a run prints: plain lines everywhere, plus a live progress bar on a terminal.

Every line also goes to the run's train.log. When stdout is not a terminal (CI, pipes, files)
there is no bar and no control characters, only the lines.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TextIO


class RunConsole:
    def __init__(self, mode: str = "auto", enabled: bool = True):
        self.enabled = enabled
        self.use_bar = enabled and (mode == "bar" or (mode == "auto" and sys.stdout.isatty()))
        self._log_file: TextIO | None = None
        self._progress = None
        self._task = None
        self._pending: list[str] = []  # lines printed before the log file exists

    def attach_log(self, path: Path) -> None:
        self._log_file = path.open("a", buffering=1)
        for line in self._pending:
            self._log_file.write(line + "\n")
        self._pending.clear()

    def print(self, line: str = "") -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.console.print(line, markup=False, highlight=False)
        else:
            print(line, flush=True)
        stamped = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}"
        if self._log_file is not None:
            self._log_file.write(stamped + "\n")
        else:
            self._pending.append(stamped)

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

    def update_bar(self, completed: int, status: str | None = None) -> None:
        if self._progress is not None:
            fields = {"status": status} if status is not None else {}
            self._progress.update(self._task, completed=completed, **fields)

    def stop_bar(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def close(self) -> None:
        self.stop_bar()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
