"""Which trackers a run gets: `build_trackers` is the trainer's one call into tracking."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from gptrain.tracking.base import LossWatch, MultiTracker
from gptrain.tracking.jsonl import JsonlTracker, last_logged_step

EXTRAS = {"wandb": "wandb", "tensorboard": "tensorboard"}


def unused_wandb_flags(tr) -> list[str]:
    """The W&B settings changed from their defaults in a run that has no W&B: they would do nothing.

    By value, not by what was typed: a resumed run is judged on the settings it runs with.
    `--wandb-mode disabled` says W&B is off, which it is.
    """
    from gptrain.config import TrackingConfig, flag_of

    if "wandb" in tr.enabled():
        return []
    default = TrackingConfig()
    return [flag_of(f"tracking.{f.name}") for f in dataclasses.fields(tr)
            if f.name.startswith("wandb_") and getattr(tr, f.name) != getattr(default, f.name)
            and not (f.name == "wandb_mode" and tr.wandb_mode == "disabled")]


def build_trackers(cfg, run_dir: Path, run_id: str, resumed_from_step: int | None, console) -> MultiTracker:
    """metrics.jsonl always, then W&B and TensorBoard when asked for. Call on global rank 0 only.

    A backend that cannot start (package missing, no network, bad credentials) is reported with one
    warning and left out: the training and metrics.jsonl go on regardless.
    """
    tr = cfg.tracking
    unused = unused_wandb_flags(tr)
    if unused:  # a warning, as for --nvtx on CPU: a shared --config file may hold W&B settings for other runs
        console.warn(f"W&B is off for this run (no --use-wandb or --trackers wandb), so {', '.join(unused)} "
                     f"{'do' if len(unused) > 1 else 'does'} nothing. Add --use-wandb to stream the run to W&B.")
    # Read before the resume marker is written: did the previous segment log steps past the checkpoint?
    last = last_logged_step(run_dir) if resumed_from_step is not None else None
    trackers: list[Any] = [JsonlTracker(run_dir, resumed_from_step, warn=console.warn)]
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
