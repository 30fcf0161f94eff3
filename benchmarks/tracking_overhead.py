"""What does experiment tracking cost a training step? (the goal: ≤ 1 % with every backend on)

    python benchmarks/tracking_overhead.py                 # tiny preset, 60 steps per run, 2 rounds
    python benchmarks/tracking_overhead.py --steps 100 --rounds 3

The default CPU configuration (the `tiny` preset, batch 16 × 256 tokens, fp32, --log-every 10) is
trained with three tracking setups, alternated round by round on the same data (the order rotates):

  none   no tracker at all (a MultiTracker with nothing in it)
  jsonl  metrics.jsonl only (what every run has)
  all    metrics.jsonl + W&B (offline: its writer is a separate service process) + TensorBoard,
         with the loss watch (alerts) on

Two figures per setup:
  * main-thread cost: seconds spent inside tracker calls (log, log_samples, log_checkpoint, alert)
    during the loop, over the loop's time. Precise, and what the issue's ≤ 1 % is about.
  * end-to-end: loop time per step relative to `none` (median over rounds). This also catches
    background costs (W&B's service process and TensorBoard's writer thread compete for the same
    cores), but on a shared 2-core VM it is noisy at the ±2 % level: read it as a sanity check.
One-off costs (W&B start, finish) are reported apart: they happen once per run, not per step.
Evaluation is reduced to its minimum (only the final one, 4096 tokens) so it does not drown the
figures; text samples are measured apart, as a cost per evaluation.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("WANDB_SILENT", "true")

import gptrain.trainer as trainer_mod  # noqa: E402
from gptrain.config import build_config  # noqa: E402
from gptrain.tracking import MultiTracker  # noqa: E402

TIMED = ("log", "log_samples", "log_checkpoint", "log_config")


class Timed:
    """Wraps the trainer's tracker: accumulates the time spent in its calls."""

    def __init__(self, inner):
        self.inner, self.seconds, self.finish_s = inner, 0.0, 0.0

    def __getattr__(self, name):
        fn = getattr(self.inner, name)
        if name not in TIMED and name != "finish":
            return fn

        def timed(*args):
            t = time.perf_counter()
            try:
                return fn(*args)
            finally:
                if name == "finish":
                    self.finish_s += time.perf_counter() - t
                else:
                    self.seconds += time.perf_counter() - t
        return timed


def make_dataset(work: Path) -> Path:
    """~1 MB of random words, byte-tokenized (the model's vocabulary is set to the default 4096 anyway).
    Not tests/conftest.py's corpus maker: importing conftest pins torch to one thread."""
    from gptrain.data.prepare import PrepareConfig, prepare_dataset

    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog def return import class for in if else".split()
    corpus = work / "corpus"
    corpus.mkdir()
    for i in range(400):
        (corpus / f"doc{i:03d}.txt").write_text(" ".join(rng.choice(words) for _ in range(400)) + "\n")
    out = work / "dataset"
    prepare_dataset(PrepareConfig(inputs=[str(corpus)], out_dir=str(out), tokenizer="byte", val_fraction=0.05),
                    progress=False)
    return out


def one_run(setup: str, data: Path, runs: Path, steps: int, i: int) -> dict:
    overrides = {
        "data.dataset": str(data), "model.vocab_size": 4096,  # the default model's vocabulary (bpe:4096)
        "train.runs_dir": str(runs), "train.run_name": f"{setup}-{i}", "train.num_steps": steps,
        "train.eval_every": 0, "train.eval_tokens": 4096, "train.sample_tokens": 0, "train.progress": "plain",
        "tracking.sample_every": 0,
    }
    if setup == "all":
        overrides.update({"tracking.trackers": ["wandb,tensorboard"], "tracking.wandb_mode": "offline"})
    cfg, explicit = build_config(overrides)
    real_build = trainer_mod.build_trackers
    if setup == "none":
        trainer_mod.build_trackers = lambda *a, **k: MultiTracker([])
    t = time.perf_counter()
    try:
        tr = trainer_mod.Trainer(cfg, explicit, console=trainer_mod.RunConsole("plain", enabled=False))
    finally:
        trainer_mod.build_trackers = real_build
    setup_s = time.perf_counter() - t
    tr.tracker = timed = Timed(tr.tracker)
    t = time.perf_counter()
    tr.fit()
    loop_s = time.perf_counter() - t - timed.finish_s
    return {"setup_s": setup_s, "loop_s": loop_s, "per_step": loop_s / steps, "tracker_s": timed.seconds,
            "finish_s": timed.finish_s}


def sample_cost(data: Path, runs: Path) -> tuple[float, float]:
    """Seconds of one round of text samples (3 prompts × 32 tokens) and of one default evaluation."""
    cfg, explicit = build_config({"data.dataset": str(data), "model.vocab_size": 4096, "train.runs_dir": str(runs),
                                  "train.run_name": "samples", "train.progress": "plain"})
    tr = trainer_mod.Trainer(cfg, explicit, console=trainer_mod.RunConsole("plain", enabled=False))
    times, evals = [], []
    for _ in range(3):
        t = time.perf_counter()
        tr._log_samples(0)
        times.append(time.perf_counter() - t)
        t = time.perf_counter()
        tr._evaluate(0, 0)
        evals.append(time.perf_counter() - t)
    tr.tracker.finish("finished")
    return statistics.median(times), statistics.median(evals)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = make_dataset(work)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores; tiny preset, "
              f"{args.steps} steps per run, --log-every 10, {args.rounds} round(s)")
        results: dict[str, list[dict]] = {"none": [], "jsonl": [], "all": []}
        one_run("none", data, work / "runs", 5, -1)  # warm-up: allocator, first W&B service start
        for i in range(args.rounds):
            # The order rotates from round to round, so no setup always runs first or always follows W&B's
            # service process shutting down (a fixed order once made `none` look 20% slower than `jsonl`).
            names = list(results)
            for setup in names[i % len(names):] + names[:i % len(names)]:
                r = one_run(setup, data, work / "runs", args.steps, i)
                results[setup].append(r)
                print(f"  round {i} {setup:5s}: {r['per_step'] * 1000:7.1f} ms/step, tracker calls "
                      f"{r['tracker_s'] * 1000:6.1f} ms in {r['loop_s']:.1f} s, setup {r['setup_s']:.2f} s, "
                      f"finish {r['finish_s']:.2f} s")
        base = statistics.median(r["per_step"] for r in results["none"])
        print(f"\n{'setup':6s} {'ms/step':>8s} {'vs none':>8s} {'main-thread tracking':>21s} {'start':>7s} {'finish':>7s}")
        for setup, rs in results.items():
            per_step = statistics.median(r["per_step"] for r in rs)
            share = statistics.median(r["tracker_s"] / r["loop_s"] for r in rs)
            print(f"{setup:6s} {per_step * 1000:8.1f} {per_step / base - 1:+8.2%} {share:21.3%} "
                  f"{statistics.median(r['setup_s'] for r in rs):6.2f}s {statistics.median(r['finish_s'] for r in rs):6.2f}s")
        s, e = sample_cost(data, work / "runs")
        print(f"\ntext samples (3 prompts × 32 tokens): {s * 1000:.0f} ms per evaluation, "
              f"{s / e:.1%} of one default evaluation ({e * 1000:.0f} ms, 65,536 tokens)")


if __name__ == "__main__":
    main()
