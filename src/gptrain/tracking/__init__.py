"""Trackers: mirrors of the run folder (metrics.jsonl always; W&B and TensorBoard on request)."""

from gptrain.tracking.base import MultiTracker, NullTracker, Tracker
from gptrain.tracking.jsonl import JsonlTracker

__all__ = ["JsonlTracker", "MultiTracker", "NullTracker", "Tracker"]
