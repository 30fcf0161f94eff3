"""Does the training loop ever wait for the GPU outside log, evaluation and checkpoint steps?

    python benchmarks/gpu_sync_check.py                       # gpt2 shape, 2 layers, bf16, eager and compiled
    python benchmarks/gpu_sync_check.py --n-layers 12 --steps 40

The trainer promises no host-device synchronisation in the hot loop: losses are accumulated on the
device and read (`.item()`) only when logging. This runs `Trainer.fit` itself on synthetic tokens with
`torch.cuda.set_sync_debug_mode("warn")` switched on after the warm-up steps (compilation may
synchronise), and off inside the places that are allowed to wait (the log step's clock and metrics,
evaluation, checkpoints, text samples). Every synchronising CUDA call made anywhere else is recorded
with the gptrain frames of its call stack; the script prints them and exits 1 if there was any.

Needs a CUDA GPU; on a machine without one it says so and exits 0 (nothing to check). Its CPU-side
half runs in the test suite: tests/test_trainer.py counts the loop's Python-level reads of tensor
values (.item(), bool(), ...) outside the same places.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

import torch

from gptrain.bench import bench_config, write_synthetic_dataset
from gptrain.console import RunConsole
from gptrain.trainer import Trainer


@contextlib.contextmanager
def waiting_allowed():
    """Inside: synchronising calls are expected (log steps, evaluation, checkpoints)."""
    mode = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(mode)


# The places of the loop that may wait: the log step's clock and metrics, evaluation, checkpoints, samples.
MAY_WAIT = ("_sync_time", "_train_metrics", "_evaluate", "_save", "_log_samples", "_final_sample")


def _waiting_allowed_in(name: str):
    def method(self, *args, **kwargs):
        with waiting_allowed():
            return getattr(Trainer, name)(self, *args, **kwargs)
    return method


# The trainer, with the calls that may wait marked as such.
SyncCheckedTrainer = type("SyncCheckedTrainer", (Trainer,), {name: _waiting_allowed_in(name) for name in MAY_WAIT})


def check(compile: bool, args) -> list[str]:
    """Train `args.steps` steps; return one line per distinct synchronising call site in the hot loop."""
    overrides = {"model.n_layers": args.n_layers, "train.batch_size": args.batch_size, "train.compile": compile,
                 "train.device": args.device, "train.num_steps": args.steps, "train.log_every": args.log_every,
                 "train.eval_every": 0, "train.eval_tokens": 8192, "train.progress": "plain", "train.run_name": "sync",
                 "train.sample_tokens": 0, "tracking.sample_every": 0}  # random ids: no text to show
    cfg, explicit = bench_config(overrides, named="gpt2")
    sites: dict[str, int] = {}

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchronizing" not in str(message):
            return previous(message, category, filename, lineno, file, line)
        stack = traceback.extract_stack()[:-1]
        if any(f.name == "counted_step" and f.filename == __file__ for f in stack):
            # Raised while this check switched the mode on, not by the loop: on an H200 the eager run recorded
            # one such call, once in 27 steps, at trainer.py's prof.step() (the hook this check replaces).
            return
        frames = [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in stack
                  if "/gptrain/" in f.filename.replace("\\", "/")]
        site = " <- ".join(reversed(frames[-4:])) or f"{filename}:{lineno}"
        sites[site] = sites.get(site, 0) + 1

    with tempfile.TemporaryDirectory(prefix="gptrain-sync-") as tmp:
        cfg.data.dataset = str(write_synthetic_dataset(Path(tmp) / "data", cfg.model.vocab_size,
                                                       cfg.model.max_position_embeddings, sequences=64))
        cfg.data.seq_len = cfg.model.max_position_embeddings
        cfg.train.runs_dir = str(Path(tmp) / "runs")
        trainer = SyncCheckedTrainer(cfg, explicit, RunConsole("plain", enabled=False))
        step_once = trainer.profiler.step
        done = 0

        def counted_step() -> None:  # called once per optimizer step: checking starts after the warm-up
            nonlocal done
            step_once()
            done += 1
            if done == args.warmup_steps:
                torch.cuda.set_sync_debug_mode("warn")

        trainer.profiler.step = counted_step
        previous = warnings.showwarning
        try:
            with warnings.catch_warnings():  # restores the warning filters and display on the way out
                warnings.simplefilter("always")
                warnings.showwarning = record
                trainer.fit()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    checked = args.steps - args.warmup_steps
    return [f"{n}× in {checked} checked steps: {site}" for site, n in sorted(sites.items(), key=lambda kv: -kv[1])]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-layers", type=int, default=2, help="blocks of the gpt2 shape (syncs do not depend on it)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--warmup-steps", type=int, default=3)
    ap.add_argument("--variants", nargs="+", default=["eager", "compile"], choices=["eager", "compile"])
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: a dry run of the mechanics only
    args = ap.parse_args()
    if not torch.cuda.is_available() and args.device == "cuda":
        print("no CUDA GPU: nothing to check (the sync debug mode exists only for CUDA)")
        return 0
    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU (dry run)"
    print(f"{where}, torch {torch.__version__}; gpt2 shape with {args.n_layers} layers, "
          f"batch {args.batch_size}, {args.steps} steps (log every {args.log_every}), checked after step "
          f"{args.warmup_steps}")
    failed = False
    for variant in args.variants:
        sites = check(variant == "compile", args)
        print(f"{variant}: " + ("no synchronising call outside log, evaluation and checkpoint steps" if not sites
                                else f"{len(sites)} synchronising call site(s) in the hot loop:"))
        for line in sites:
            print("  " + line)
        failed |= bool(sites)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
