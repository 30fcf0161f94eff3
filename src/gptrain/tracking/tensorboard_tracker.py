"""TensorBoard: the same scalars as metrics.jsonl, in runs/<name>/tensorboard/ (`tensorboard --logdir runs/`).

Resume uses TensorBoard's own mechanism: the writer of a run resumed from step K is opened with
`purge_step=K + 1`, so TensorBoard discards the events a crashed segment wrote after the checkpoint
and shows the new segment's values instead (the same "later segment wins" rule as metrics.jsonl).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def _scalars(metrics: dict[str, Any]):
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        yield key, float(value)


class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self, run_dir: Path, resumed_from_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.log_dir = Path(run_dir) / "tensorboard"
        purge = None if resumed_from_step is None else resumed_from_step + 1
        self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge, flush_secs=30)

    def log_config(self, config: dict[str, Any]) -> None:
        text = "```\n" + json.dumps(config, indent=2, default=str) + "\n```"
        self.writer.add_text("config", text, 0)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for key, value in _scalars(metrics):
            if math.isfinite(value):  # TensorBoard draws NaN/inf as gaps at best; alerts report them
                self.writer.add_scalar(key, value, step)

    def log_samples(self, samples: list[dict[str, Any]], step: int) -> None:
        rows = "\n".join(f"| `{s['prompt']!r}` | `{s['completion']!r}` |" for s in samples)
        self.writer.add_text("samples", "| prompt | completion |\n| --- | --- |\n" + rows, step)

    def alert(self, title: str, text: str, level: str, step: int) -> None:
        self.writer.add_text("alerts", f"**{level}** {title}: {text}", step)

    def finish(self, status: str) -> None:
        self.writer.add_text("status", status)
        self.writer.close()
