"""What a run reports, and when: the header, train metrics at log steps, evaluations.

These are the only places of the loop that wait for the device (`.item()`, a synchronisation):
each decides its own timing (`due(step, last)`) so that `Trainer.fit` reads as the recipe.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from typing import Any

import torch

from gptrain.console import format_duration
from gptrain.distributed import all_reduce_mean, host_all_reduce
from gptrain.distributed.parallelize import full_value
from gptrain.evaluate import eval_bytes_per_token, evaluate_loss
from gptrain.metrics import MFU_FORMULA, LossAccumulator, StepTimer, memory_metrics
from gptrain.run_folder import environment_record


class MetricsLogger:
    """Train loss, gradient norm, throughput, MFU and memory every `log_every` steps.

    Throughput intervals run from one log step to the next, minus the time spent inside `paused()`
    (evaluations, samples, checkpoints).
    """

    def __init__(self, plan, dist, device: torch.device, tracker, console, flops_per_token: float,
                 peak_flops: float | None, batches) -> None:
        self.plan, self.dist, self.device = plan, dist, device
        self.tracker, self.console = tracker, console
        self.every = plan.cfg.train.log_every
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.batches = batches
        self.loss = LossAccumulator(device)
        self.timer = StepTimer()
        self.restart_interval()

    def restart_interval(self) -> None:
        self.interval_start, self.interval_steps, self.paused_for = time.perf_counter(), 0, 0.0

    def step_done(self) -> None:
        self.interval_steps += 1

    def due(self, step: int, last: bool) -> bool:
        return step % self.every == 0 or last

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside (logging, evaluation, samples, checkpoints) is not training time."""
        start = time.perf_counter()
        try:
            yield
        finally:  # a log inside restarts the interval: only what follows it is taken off the new one
            self.paused_for += time.perf_counter() - max(start, self.interval_start)

    def log(self, step: int, lr: float, grad_norm: torch.Tensor, tokens_seen: int, skipped: int) -> dict[str, Any]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - self.interval_start - self.paused_for
        steps = max(1, self.interval_steps)
        # Mean over every rank = mean over data-parallel ranks (tensor-parallel peers hold the same loss).
        mean_loss = all_reduce_mean(self.loss.total / max(1, self.loss.count))
        # The slowest rank sets the pace: throughput is global tokens over its wall time.
        fastest = slowest = elapsed
        if self.dist.enabled:
            (slowest,), (fastest,) = host_all_reduce([elapsed], "max", self.dist), \
                host_all_reduce([elapsed], "min", self.dist)
        global_tps = steps * self.plan.tokens_per_step / slowest
        row: dict[str, Any] = {
            "train/loss": mean_loss.item(),
            "train/grad_norm": full_value(grad_norm).item(),
            "train/skipped_steps": skipped,
            "lr": lr,
            "train/tokens_seen": tokens_seen,
            "train/epoch": self.batches.epoch_of(step),
            "tokens_per_sec_per_rank": global_tps / self.dist.world_size,
            "global_tokens_per_sec": global_tps,
            "perf/step_time": slowest / steps,
            "perf/step_time_fastest_rank": fastest / steps,
            "amp": int(self.plan.precision in ("bf16", "fp16")),
        }
        for name, seconds in self.timer.pop().items():
            row[f"perf/{name}_time"] = seconds / steps
        if self.peak_flops:
            row["perf/mfu"] = self.flops_per_token * global_tps / (self.peak_flops * self.dist.world_size)
        row.update(memory_metrics(self.device))
        self.tracker.log(row, step)
        self.console.print(self.line(step, row))
        self.console.update_bar(step, f"loss {row['train/loss']:.3f}")
        self.loss.reset()
        self.restart_interval()
        return row

    def line(self, step: int, row: dict[str, Any]) -> str:
        num_steps = self.plan.cfg.train.num_steps
        eta = (num_steps - step) * row["perf/step_time"]
        skipped = f" | {row['train/skipped_steps']} skipped" if row["train/skipped_steps"] else ""
        return (f"step {step:>6}/{num_steps} | loss {row['train/loss']:.4f} | lr {row['lr']:.2e} | "
                f"grad norm {row['train/grad_norm']:.3f} | {row['global_tokens_per_sec']:,.0f} tok/s | "
                f"{row['perf/step_time'] * 1000:.0f} ms/step | ETA {format_duration(eta)}{skipped}")


class Evaluator:
    """Validation loss every `eval_every` steps and at the end; remembers the best."""

    def __init__(self, plan, dist, device: torch.device, model: torch.nn.Module, autocast, tracker,
                 console, enabled: bool = True) -> None:
        self.plan, self.dist, self.device, self.model = plan, dist, device, model
        self.autocast, self.tracker, self.console = autocast, tracker, console
        self.every = plan.cfg.train.eval_every
        self.last: float | None = None
        self.best: float | None = None
        self.enabled = enabled
        # val/bpb: loss per byte of text, comparable across tokenizers (the eval windows never change).
        self.bytes_per_token = eval_bytes_per_token(plan.data.val, plan.data.tokenizer, plan.seq_len,
                                                    plan.cfg.train.eval_tokens) if enabled else None

    def due(self, step: int, last: bool) -> bool:
        return self.enabled and ((self.every > 0 and step % self.every == 0) or last)

    def run(self, step: int, tokens_seen: int) -> float:
        t = self.plan.cfg.train
        loss, ppl, n = evaluate_loss(self.model, self.plan.data.val, self.plan.seq_len, t.eval_tokens, t.batch_size,
                                     self.device, self.autocast(), self.dist.dp_rank, self.dist.dp_world,
                                     self.dist.dp_group)
        row = {"val/loss": loss, "val/ppl": ppl, "val/tokens": n, "train/tokens_seen": tokens_seen}
        bpb = ""
        if self.bytes_per_token:
            row["val/bpb"] = loss / (math.log(2) * self.bytes_per_token)
            bpb = f" | val bpb {row['val/bpb']:.4f}"
        self.tracker.log(row, step)
        self.console.print(f"step {step:>6}/{t.num_steps} | val loss {loss:.4f} | val ppl {ppl:.2f}{bpb} "
                           f"({n:,} tokens)")
        self.last = loss
        if math.isfinite(loss) and (self.best is None or loss < self.best):
            self.best = loss
        return loss


def print_header(plan, dist, device: torch.device, model_counts: dict[str, int], console) -> None:
    cfg, m, t = plan.cfg, plan.cfg.model, plan.cfg.train
    console.print(f"run {t.run_name} → {plan.run_dir}")
    tokenizer = plan.data.tokenizer.spec if plan.data.tokenizer is not None else "none"
    console.print(f"data {plan.data.description} | tokenizer {tokenizer}, model vocab {m.vocab_size}")
    family = getattr(m, "family", None)
    raised = " (raised to --seq-len)" if m.max_position_embeddings == plan.seq_len and "data.seq_len" in \
        plan.explicit and "model.max_position_embeddings" not in plan.explicit and plan.resume is None else ""
    console.print(f"model {t.preset}{f' ({family} family)' if family else ''}: {m.n_layers} layers, {m.n_heads} "
                  f"heads, d_model {m.d_model}, context {m.max_position_embeddings}{raised} | "
                  f"{model_counts['n_params']:,} parameters ({model_counts['n_params_non_embedding']:,} non-embedding)")
    b = plan.batch
    console.print(f"device {device} ({plan.precision}) | {b.global_batch} sequences × {plan.seq_len} tokens = "
                  f"{plan.tokens_per_step:,} tokens per optimizer step ({t.batch_size} per micro-batch × "
                  f"{b.grad_accum} accumulation × {dist.dp_world} data-parallel) | steps {plan.start_step}→"
                  f"{t.num_steps}")
    if dist.enabled:
        console.print(f"layout {dist.world_size} processes: {dist.layout.describe()} | activation checkpointing "
                      f"{cfg.parallel.ac} | compile {'on' if t.compile else 'off'}")


def environment(plan, dist, device: torch.device, model_counts: dict[str, int], flops_per_token: float,
                peak_flops: float | None, peak_flops_source: str, host_allocator: str | None) -> dict[str, Any]:
    env = environment_record(device, dist.world_size)
    env.update(
        **model_counts,
        tokens_per_step=plan.tokens_per_step,
        flops_per_token=flops_per_token,
        mfu={"formula": MFU_FORMULA, "flops_per_token": flops_per_token, "peak_flops": peak_flops,
             "peak_flops_source": peak_flops_source},
        precision=plan.precision,
        loss_chunk_size=plan.loss_chunk_size,
        host_allocator=host_allocator,
        dataset_dir=str(plan.data.dir) if plan.data.dir is not None else None,
        dataset_kind=plan.data.kind,
        dataset_fingerprint=plan.data.fingerprint,
        tokenizer=plan.data.tokenizer.spec if plan.data.tokenizer is not None else None,
        tokenizer_fingerprint=plan.data.tokenizer.fingerprint() if plan.data.tokenizer is not None else None,
        run_id=plan.run_id,
    )
    return env
