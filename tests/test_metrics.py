"""Throughput timing and memory metrics (gptrain.metrics)."""

import re
from pathlib import Path

import pytest
import torch


def test_step_timer_splits_the_step_into_consecutive_parts(monkeypatch):
    from gptrain import metrics

    clock = iter([10.0, 11.0, 13.0, 16.0, 20.0, 20.5, 21.5, 23.0])
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    timer = metrics.StepTimer()
    for _ in range(2):
        timer.start()
        timer.lap("data")
        timer.lap("fwd_bwd")
        timer.lap("optim")
    assert timer.pop() == {"data": 1.5, "fwd_bwd": 3.0, "optim": 4.5}
    assert timer.pop() == {}


def test_cpu_memory_metric_is_the_peak_rss_in_gigabytes():
    from gptrain.metrics import memory_metrics

    status = Path("/proc/self/status")
    if not status.is_file():
        pytest.skip("needs Linux /proc")
    hwm_kb = int(re.search(r"VmHWM:\s+(\d+) kB", status.read_text()).group(1))
    got = memory_metrics(torch.device("cpu"))["mem/rss_peak_gb"]
    assert got == pytest.approx(hwm_kb * 1024 / 1e9, rel=0.2)

