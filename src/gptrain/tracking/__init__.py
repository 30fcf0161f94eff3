"""Trackers: mirrors of the run folder (metrics.jsonl always; W&B and TensorBoard on request)."""

from gptrain.tracking.base import LossWatch, MultiTracker, NullTracker, Tracker
from gptrain.tracking.factory import build_trackers
from gptrain.tracking.jsonl import JsonlTracker, read_history, read_metrics

__all__ = ["JsonlTracker", "LossWatch", "MultiTracker", "NullTracker", "Tracker", "build_trackers",
           "read_history", "read_metrics"]
