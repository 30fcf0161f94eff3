"""Training metrics kept on the device between log steps, and the numbers computed at log time.

The hot loop only adds tensors (`loss.detach()`) into device-side accumulators; nothing here
calls `.item()` until the log step reads them (gptrain.reporting.MetricsLogger.log).
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass, field

import torch

from gptrain.precision import DTYPES

# Dense peak matrix throughput in TFLOP/s by exact device name and precision. MFU against an
# unknown GPU is reported as unknown, never guessed.
GPU_PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "NVIDIA H100 80GB HBM3": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.5},  # SXM; fp32 = TF32
    "NVIDIA H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 378.0},
    "NVIDIA H100 NVL": {"bf16": 835.0, "fp16": 835.0, "fp32": 417.5},
    "NVIDIA H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.5},
    "NVIDIA A100-SXM4-80GB": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0},
    "NVIDIA A100-SXM4-40GB": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0},
    "NVIDIA A100-PCIE-40GB": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0},
    "NVIDIA A100 80GB PCIe": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0},
    "NVIDIA L4": {"bf16": 121.0, "fp16": 121.0, "fp32": 60.0},
    "NVIDIA A10G": {"bf16": 125.0, "fp16": 125.0, "fp32": 62.5},
    "NVIDIA GeForce RTX 4090": {"bf16": 165.2, "fp16": 165.2, "fp32": 82.6},
    "NVIDIA GeForce RTX 3090": {"bf16": 71.0, "fp16": 71.0, "fp32": 35.6},
}


def gpu_peak_flops(device: torch.device, precision: str) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = GPU_PEAK_TFLOPS.get(name, {}).get(precision)
    return peak * 1e12 if peak else None


# MFU, the one way gptrain computes it (README "Performance"): model FLOPs per token
# 6·N + 12·n_layers·d_model·T (N = parameters except the position embedding, a tied embedding
# once; attention over the full context T, as PaLM and nanoGPT count it), times tokens/s, over the
# peak: the GPU's dense spec peak by exact name, or on CPU the measured matrix-product peak.
# N: the parameters that multiply activations (not the lookups: position table, value embeddings, an untied
# token embedding); gptrain.model.flops_per_token.
MFU_FORMULA = "mfu = (6*N_matmul + 12*n_layers*d_model*T) * tokens_per_sec / (peak_flops * world_size)"
_measured: dict[tuple, float] = {}


def measure_matmul_flops(device: torch.device, precision: str = "fp32", size: int = 2048,
                         min_seconds: float = 0.25, max_reps: int = 50) -> float:
    """FLOP/s of a square `size`² matrix product in the training precision on this device, now.

    One untimed product warms up the BLAS (threads, caches); then products are timed until
    `min_seconds` have passed (at least two), and the best is kept: it is the device's limit,
    not an average over the moments another process took the cores.
    """
    dtype = DTYPES[precision]
    gen = torch.Generator(device=device).manual_seed(0)  # its own generator: training's RNG streams stay untouched
    a = torch.randn(size, size, device=device, generator=gen).to(dtype)
    b = torch.randn(size, size, device=device, generator=gen).to(dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    cuda = device.type == "cuda"
    inner = 1
    if cuda:  # one product takes microseconds: time a batch of them between synchronisations
        torch.mm(a, b, out=out)
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        torch.cuda.synchronize(device)
        inner = max(1, min(100, int(0.01 / max(time.perf_counter() - t0, 1e-6))))
    else:
        torch.mm(a, b, out=out)
    best, spent, reps = float("inf"), 0.0, 0
    while reps < 2 or (spent < min_seconds and reps < max_reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b, out=out)
        if cuda:
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        best, spent, reps = min(best, dt / inner), spent + dt, reps + 1
    return 2.0 * size**3 / best


def peak_flops_for(device: torch.device, precision: str) -> tuple[float | None, str]:
    """The peak MFU is measured against, and where it came from.

    GPU: the dense spec peak of the exact device name (unknown name: None, MFU unknown).
    CPU: a short fp32/bf16 matrix-product measurement (~0.3 s, cached per process and thread count).
    """
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_flops(device, precision)
        return (peak, f"spec: {name} {precision} dense") if peak else \
            (None, f"unknown: {name} is not in gptrain.metrics.GPU_PEAK_TFLOPS")
    if device.type != "cpu":
        return None, f"unknown: no peak for device type {device.type}"
    key = (device.type, precision, torch.get_num_threads())
    if key not in _measured:
        _measured[key] = measure_matmul_flops(device, precision)
    return _measured[key], (f"measured: {precision} 2048x2048 matrix product on {torch.get_num_threads()} "
                            "thread(s), best of ~0.25 s, at run start")


def process_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def memory_metrics(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {
            "mem/peak_allocated_gb": torch.cuda.max_memory_allocated(device) / 1e9,
            "mem/peak_reserved_gb": torch.cuda.max_memory_reserved(device) / 1e9,
        }
    return {"mem/rss_peak_gb": process_rss_bytes() / 1e9}


@dataclass
class LossAccumulator:
    """Sum of micro-batch losses since the last log, on the device."""

    device: torch.device
    total: torch.Tensor = field(init=False)
    count: int = 0

    def __post_init__(self) -> None:
        self.total = torch.zeros((), device=self.device, dtype=torch.float32)

    def add(self, loss: torch.Tensor) -> None:
        self.total += loss.detach().float()
        self.count += 1

    def reset(self) -> None:
        self.total.zero_()
        self.count = 0


class StepTimer:
    """Wall-clock time of named parts of a step, summed between log steps.

    Timing on the host without synchronising means a part's time is when the host was busy
    issuing it; the sum over the interval, measured at log steps after a sync, is exact.
    """

    def __init__(self) -> None:
        self.parts: dict[str, float] = {}
        self._start: float | None = None

    def start(self) -> None:
        self._start = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        if self._start is not None:
            self.parts[name] = self.parts.get(name, 0.0) + now - self._start
        self._start = now

    def pop(self) -> dict[str, float]:
        parts, self.parts = self.parts, {}
        return parts
