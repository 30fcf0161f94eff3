"""Which trackers a run gets: `build_trackers` is the trainer's one call into tracking."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gptrain.tracking.base import LossWatch, MultiTracker
from gptrain.tracking.jsonl import JsonlTracker, last_logged_step

EXTRAS = {"wandb": "wandb", "tensorboard": "tensorboard"}


def build_trackers(cfg, run_dir: Path, run_id: str, resumed_from_step: int | None, console) -> MultiTracker:
    """metrics.jsonl always, then W&B and TensorBoard when asked for. Call on global rank 0 only.

    A backend that cannot start (package missing, no network, bad credentials) is reported with one
    warning and left out: the training and metrics.jsonl go on regardless.
    """
    tr = cfg.tracking
    # Read before the resume marker is written: did the previous segment log steps past the checkpoint?
    last = last_logged_step(run_dir) if resumed_from_step is not None else None
    trackers: list[Any] = [JsonlTracker(run_dir, resumed_from_step)]
    for name in tr.enabled()[1:]:
        if name == "wandb" and tr.wandb_mode == "disabled":
            continue
        try:
            if name == "tensorboard":
                from gptrain.tracking.tensorboard_tracker import TensorBoardTracker

                trackers.append(TensorBoardTracker(run_dir, resumed_from_step))
            elif name == "wandb":
                from gptrain.tracking.wandb_tracker import WandbTracker

                trackers.append(WandbTracker(run_dir, run_id, cfg.train.run_name, tr, cfg.to_dict(),
                                             resumed_from_step, last, say=console.print, warn=console.warn))
        except ImportError as e:
            console.warn(f"{name} is not installed ({e}); it is off for this run. Install it with: "
                         f"pip install 'gptrain[{EXTRAS[name]}]'")
        except Exception as e:  # noqa: BLE001 - a tracker must never stop training
            console.warn(f"{name} could not start and is off for this run ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:400]}). metrics.jsonl records everything.")
    return MultiTracker(trackers, warn=console.warn, loss_watch=LossWatch(tr.alert_spike_factor, tr.alert_interval))
