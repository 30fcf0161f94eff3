"""torch.profiler on a schedule, NVTX ranges and CUDA memory snapshots, for the training loop.

- `--use-profiler`: steps are traced on a wait / warmup / active / repeat schedule; each rank writes
  its Chrome-trace files (`rank<R>.<time>.pt.trace.json`) into runs/<name>/profile/ — open them in
  https://ui.perfetto.dev or TensorBoard's profiler plugin. At the end the console shows where the
  time of a profiled step went (data, forward, backward, optimizer, checkpoint), the top kernels or
  operators, and the share of each kind of work (matrix products, attention, compiled kernels, ...).
- `--nvtx`: the same named ranges as NVTX ranges, for `nsys profile` (Nsight Systems); CUDA only.
- `--memory-snapshot` (CUDA): allocations are recorded from the start; after the first profiling
  cycle (or at the end) each rank writes memory_snapshot_rank<R>.pickle for https://pytorch.org/memory_viz.

With everything off, `range()` is a null context and `step()` does nothing.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch.autograd import DeviceType

RANGES = ("data", "forward", "backward", "optimizer", "checkpoint")


# What each kind of work is called in a trace: CUDA kernel names (cuBLAS / CUTLASS / nvjet GEMMs, flash
# attention, Triton kernels from Inductor, multi-tensor optimizer kernels, NCCL) and CPU operator names.
# First match wins: flash-attention kernels carry "cutlass" in their template arguments, so attention
# is tested before matrix products.
OP_KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # cuDNN runs nothing but attention in a GPT: its SDPA kernels and their cudnn::fusion helpers.
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn")),
    ("matrix products", ("gemm", "gemv", "cutlass", "xmma", "nvjet", "cublas", "aten::mm", "aten::addmm",
                         "aten::bmm", "aten::baddbmm", "aten::_addmm_activation", "aten::matmul")),
    ("optimizer and clipping", ("adam", "multi_tensor_apply", "aten::_foreach")),
    ("communication", ("nccl", "gloo", "c10d::", "record_param_comms", "all_reduce", "allreduce",
                       "reduce_scatter", "all_gather")),
    ("copies", ("memcpy", "memset", "aten::copy_", "aten::_to_copy", "aten::fill_", "aten::zero_")),
    ("compiled kernels", ("triton_", "cpp_fused", "compiled graph", "torch-compiled region", "compiledfunction")),
)


def readable_name(key: str) -> str:
    """"## Call CompiledFxGraph fx6tuhl5g7fa… ##" → "compiled graph fx6tuhl5"; other names unchanged."""
    words = key.split()
    if key.startswith("## Call CompiledFxGraph") and len(words) > 3:
        return "compiled graph " + words[3][:8]
    return key


def op_kind(name: str) -> str:
    lowered = name.lower()
    for kind, needles in OP_KINDS:
        if any(n in lowered for n in needles):
            return kind
    return "other"


def time_by_kind(timed: list[tuple[str, float]]) -> dict[str, float]:
    """Sum (name, self time) pairs by `op_kind`; every kind present, zero when absent."""
    kinds = dict.fromkeys([k for k, _ in OP_KINDS] + ["other"], 0.0)
    for name, t in timed:
        kinds[op_kind(name)] += t
    return kinds


class Profiler:
    def __init__(self, cfg, out_dir: Path, rank: int, device: torch.device, warn=print):
        self.cfg = cfg
        self.out_dir = out_dir
        self.rank = rank
        self.device = device
        self.nvtx = cfg.nvtx and device.type == "cuda"
        self.prof: torch.profiler.profile | None = None
        self.snapshot = cfg.memory_snapshot and device.type == "cuda"
        self.snapshot_path: Path | None = None
        self.steps = 0
        self.recorded_steps = 0
        if cfg.nvtx and device.type != "cuda":
            warn("--nvtx needs a CUDA device (NVTX ranges are for Nsight Systems); ignored on " + device.type + ".")
        if cfg.memory_snapshot and device.type != "cuda":
            warn("--memory-snapshot needs a CUDA device (it records the CUDA caching allocator); ignored.")

    @property
    def cycle_steps(self) -> int:
        return self.cfg.wait + self.cfg.warmup + self.cfg.active

    def __enter__(self) -> Profiler:
        if self.cfg.enabled or self.snapshot:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.snapshot:
            torch.cuda.memory._record_memory_history(max_entries=200_000)
        if self.cfg.enabled:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(
                activities=activities,
                schedule=torch.profiler.schedule(wait=self.cfg.wait, warmup=self.cfg.warmup, active=self.cfg.active,
                                                 repeat=self.cfg.repeat),
                on_trace_ready=self._on_trace,
                record_shapes=True,
                with_stack=False,
            )
            self.prof.__enter__()
        return self

    def _on_trace(self, prof) -> None:
        handler = torch.profiler.tensorboard_trace_handler(str(self.out_dir), worker_name=f"rank{self.rank}")
        handler(prof)
        self.recorded_steps += self.cfg.active

    def range(self, name: str):
        """A named range: in the profiler's trace (as gptrain/<name>) and, with --nvtx, in Nsight Systems."""
        if self.prof is None and not self.nvtx:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        if self.prof is not None:
            stack.enter_context(torch.profiler.record_function(f"gptrain/{name}"))
        if self.nvtx:
            stack.enter_context(torch.cuda.nvtx.range(name))
        return stack

    def step(self) -> None:
        """Call once per optimizer step."""
        self.steps += 1
        if self.prof is not None:
            self.prof.step()
        if self.snapshot and self.snapshot_path is None and self.steps >= self.cycle_steps:
            self._dump_snapshot()

    def _dump_snapshot(self) -> None:
        self.snapshot_path = self.out_dir / f"memory_snapshot_rank{self.rank}.pickle"
        torch.cuda.memory._dump_snapshot(str(self.snapshot_path))
        torch.cuda.memory._record_memory_history(enabled=None)

    def __exit__(self, *exc) -> None:
        if self.prof is not None:
            self.prof.__exit__(*exc)
        if self.snapshot and self.snapshot_path is None:
            self._dump_snapshot()

    def summary(self) -> str | None:
        """Where the time of a profiled step went, from the recorded steps (None if none was recorded)."""
        if self.prof is None or self.recorded_steps == 0:
            return None
        try:
            events = self.prof.key_averages()
        except (AssertionError, RuntimeError):  # no finished cycle
            return None
        cuda = self.device.type == "cuda"
        steps = max(1, self.recorded_steps)

        def total_ms(e) -> float:
            t = getattr(e, "device_time_total", 0.0) if cuda else 0.0
            return (t or e.cpu_time_total) / 1000.0

        # A range is counted from its CPU-side event, whose device time is that of the kernels it launched. On
        # CUDA each range (and each "## Call CompiledFxGraph" of a compiled model) also has a twin on the GPU
        # timeline, a user annotation spanning its kernels: counted as well, the step's kernel time came out
        # twice as long and the compiled graphs' spans took the place of their kernels (an H200 profile read
        # "compiled kernels 60%, matrix products 28%" where its kernels were 53% matrix products).
        parts = {e.key.split("/", 1)[1]: total_ms(e) / steps for e in events
                 if e.key.startswith("gptrain/") and e.device_type == DeviceType.CPU}
        if not parts:
            return None
        # What ran: on CUDA the kernels (and memcpy/memset) themselves, since a CPU operator also carries the
        # device time of the kernels it launched; on CPU the operators, by their own (self) time.
        key = (lambda e: getattr(e, "self_device_time_total", 0.0)) if cuda else (lambda e: e.self_cpu_time_total)
        # (On CPU, Inductor's C++ kernels run inside "## Call CompiledFxGraph <hash> ##" with no event of their own.)
        timed = [(readable_name(e.key), key(e)) for e in events if not e.key.startswith(("gptrain/", "ProfilerStep"))
                 and (not cuda or (e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)))]
        if cuda and "backward" in parts:
            # Backward kernels are launched by autograd's own device thread, outside the main thread's
            # "backward" range, so that range holds almost no CUDA time. Backward is what remains of the
            # step's kernel time once the ranges launched from the main thread are taken out.
            kernels = sum(t for _, t in timed) / 1000.0 / steps
            launched_here = sum(v for k, v in parts.items() if k not in ("backward", "checkpoint"))
            parts["backward"] = max(0.0, kernels - launched_here)
        step_ms = sum(v for k, v in parts.items() if k != "checkpoint")
        lines = [f"profile (rank {self.rank}, {self.recorded_steps} recorded steps, per step, "
                 f"{'CUDA' if cuda else 'CPU'} time): traces in {self.out_dir}"]
        for name in RANGES:
            if name in parts:
                share = f" ({100 * parts[name] / step_ms:.0f}%)" if step_ms and name != "checkpoint" else ""
                lines.append(f"  {name:<10} {parts[name]:9.2f} ms{share}")
        top = sorted(timed, key=lambda kt: kt[1], reverse=True)[:5]
        if top:
            lines.append(f"  top {'kernels' if cuda else 'operators'} by self time: " + ", ".join(
                f"{name} {t / 1000.0 / steps:.2f} ms" for name, t in top))
        kinds = time_by_kind(timed)
        total = sum(kinds.values())
        if total > 0:
            lines.append("  by kind: " + ", ".join(
                f"{kind} {100 * t / total:.0f}%" for kind, t in sorted(kinds.items(), key=lambda kv: -kv[1])
                if t > 0) + f" (of {total / 1000.0 / steps:.2f} ms of {'kernel' if cuda else 'operator'} time)")
        return "\n".join(lines)
