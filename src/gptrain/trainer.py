"""The training loop: one loop for one CPU, one GPU or many processes.

Read `Trainer.fit` top to bottom: it is the recipe. It executes a `Plan` (gptrain.plan) resolved
before the Trainer exists; the pieces it calls decide their own timing (`due(step, ...)`):
the metrics logger and evaluator (gptrain.reporting), the sampler (gptrain.sampling), the
checkpointer (gptrain.checkpointer) and the divergence guard (gptrain.divergence).
"""

from __future__ import annotations

import copy
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from gptrain import checkpoint as ckpt_lib
from gptrain.checkpointer import Checkpointer
from gptrain.config import Config
from gptrain.console import RunConsole
from gptrain.data.loader import DevicePrefetcher, TrainBatches
from gptrain.distributed import (
    StopAgreement,
    init_distributed,
    is_main_process,
    is_peer_failure,
    peer_failure,
    shutdown_distributed,
)
from gptrain.distributed.parallelize import gradient_sync, parallelize
from gptrain.divergence import DivergenceGuard
from gptrain.errors import PeerFailure, UserError
from gptrain.host_memory import host_allocator, reuse_freed_memory
from gptrain.jsonio import write_json_atomic
from gptrain.metrics import peak_flops_for
from gptrain.model import GPT, ModelConfig, attention_kernels, flops_per_token
from gptrain.optim import apply_schedule, build_optimizer
from gptrain.plan import (
    NothingToTrain,
    Plan,
    check_memory,
    dataset_to_train_on,
    discard_if_unused,
    find_resume_checkpoint,
    fresh_start_note,
    lock_run_folder,
    model_from_hf,
    open_training_data,
    resolve_plan,
    settings_to_run,
)
from gptrain.precision import DTYPES, autocast_for, resolve_precision
from gptrain.profiling import Profiler
from gptrain.reporting import Evaluator, MetricsLogger, environment, print_header
from gptrain.run_folder import read_run_record, record_run_status, update_run_status
from gptrain.runs import process_identity
from gptrain.sampling import Sampler
from gptrain.tracking import NullTracker, build_trackers

# torch.compile unrolls the chunked loss's loop: compile time grows with the chunks per micro-batch
# (benchmarks/RESULTS.md, "chunked loss"). Above this many, a warning at start.
MANY_LOSS_CHUNKS = 64


@dataclass
class RunResult:
    run_dir: Path
    final_step: int
    final_val_loss: float | None
    checkpoint: Path | None
    status: str  # finished | interrupted | diverged
    sample: str | None = None
    message: str | None = None  # why a run that did not finish stopped


class TrainerHooks:
    """Public extension points of the loop (bench, tests): subclass, override, pass `hooks=[...]`."""

    def on_step_end(self, trainer: Trainer, step: int) -> None:
        """After optimizer step `step` (1-based count of steps done), before logging and evaluation."""

    def on_log(self, trainer: Trainer, step: int, row: dict[str, Any]) -> None:
        """After a log step's metrics were computed; time spent here is not counted as training time."""


def check_attention_backend(backend: str, device: torch.device, precision: str, model_cfg: ModelConfig) -> None:
    """A pinned SDPA backend must run this model's attention here: tried at start on one small head,
    forward and backward, so that an unsupported choice is a clear error before any work."""
    if backend == "auto":
        return
    q = torch.ones(1, 1, min(model_cfg.max_position_embeddings, 64), model_cfg.head_dim, device=device,
                   dtype=DTYPES[precision], requires_grad=True)
    cuda_devices = [device.index or 0] if device.type == "cuda" else []
    try:  # fork_rng: the try-out's dropout must not move the training run's random streams
        with torch.random.fork_rng(devices=cuda_devices), attention_kernels(backend):
            F.scaled_dot_product_attention(q, q, q, is_causal=True, dropout_p=model_cfg.dropout).sum().backward()
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        hint = " On CPU, PyTorch has the flash and math backends only." if device.type == "cpu" else ""
        raise UserError(f"--attention-backend {backend} cannot run this model's attention on {device.type} in "
                        f"{precision} (PyTorch: {reason}).{hint} Use --attention-backend auto to let PyTorch "
                        "choose.") from e


class StopRequest:
    """SIGINT/SIGTERM ask the loop to stop after the current step; a second SIGINT aborts."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a test thread)
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def requested(self) -> bool:
        return self.signal_name is not None


class Trainer:
    @classmethod
    def from_config(cls, cfg: Config, explicit: set[str] | None = None, console: RunConsole | None = None,
                    hooks: list[TrainerHooks] | tuple = (), **options: bool) -> Trainer:
        """Resolve the settings into a plan (reading the checkpoint to resume and preparing the data),
        then build the trainer that executes it (`options`: see __init__)."""
        explicit = set(explicit or ())
        if restarted_by_torchrun() and not cfg.train.resume and cfg.train.run_name:
            cfg = copy.deepcopy(cfg)  # a restarted attempt continues its run (torchrun --max-restarts)
            cfg.train.resume = "latest"
        resume = find_resume_checkpoint(cfg)
        init = None
        if cfg.train.init_from and resume is None:  # a resumed run has its own weights
            cfg, state, hf_tokenizer = model_from_hf(cfg, explicit)
            init = (state, hf_tokenizer)
        settings = settings_to_run(cfg, explicit, resume)
        fresh = fresh_start_note(cfg, resume)
        # The layout's degrees against the world size are checked here, before any work.
        dist, device = init_distributed(settings.train.device, settings.parallel)
        console = console or RunConsole(settings.train.progress, enabled=dist.is_main)
        if fresh:
            console.print(fresh)
        precision = resolve_precision(settings.train.precision, device, console.warn)
        # Before any model or batch exists: CPU steps then reuse freed memory instead of faulting in new pages.
        if device.type == "cpu" and settings.train.reuse_host_memory:
            reuse_freed_memory()
        settings = dataset_to_train_on(settings, explicit, resume)
        data = open_training_data(settings, explicit, resume, dist, console)
        plan = resolve_plan(settings, explicit, resume, data, dist, device, precision, init)
        check_memory(plan, dist, device)
        lock = lock_run_folder(plan, dist)
        try:
            trainer = cls(plan, dist, device, console, hooks, **options)
        except BaseException:
            if lock is not None:
                lock.release()
                discard_if_unused(plan.run_dir)  # a start that failed leaves no empty run folder behind
            raise
        trainer.run_lock = lock
        return trainer

    def __init__(self, plan: Plan, dist, device: torch.device, console: RunConsole,
                 hooks: list[TrainerHooks] | tuple = (), evaluate: bool = True, save: bool = True) -> None:
        """`evaluate=False` / `save=False`: no evaluations / checkpoints at all, not even at the end
        (gptrain bench times the loop alone)."""
        self.plan, self.dist, self.device, self.console = plan, dist, device, console
        self.hooks = list(hooks)
        self.run_lock = None  # held by from_config (gptrain.plan.lock_run_folder)
        self.cfg = plan.cfg
        self.host_allocator = host_allocator()
        self._build_model()
        self.tracker = NullTracker()
        self.checkpointer = Checkpointer(plan, dist, device, self.raw_model, self.optimizer, self.scaler,
                                         self.tracker, console, enabled=save)
        # Load the checkpoint before the run folder is touched: a corrupt checkpoint or a shape
        # mismatch ends here, with the run's files exactly as they were.
        self.start_tokens = self.checkpointer.restore() if plan.resume else 0
        self._open_run_folder()
        self.checkpointer.tracker = self.tracker
        batches = TrainBatches(plan.data.train, plan.seq_len, plan.batch, self.cfg.train.seed)
        self.prefetch = DevicePrefetcher(batches, device, plan.batch.grad_accum)
        self.metrics = MetricsLogger(plan, dist, device, self.tracker, console, self.flops_per_token,
                                     self.peak_flops, batches)
        self.evaluator = Evaluator(plan, dist, device, self.model, self.autocast, self.tracker, console,
                                   enabled=evaluate)
        self.sampler = Sampler(plan, dist, device, self.raw_model, self.tracker, console)
        self.guard = DivergenceGuard(self.optimizer, self.scaler, self.cfg.train.max_skipped_steps, device)
        self.stop_agreement = StopAgreement(dist)

    # ------------------------------------------------------------------ setup
    def _build_model(self) -> None:
        cfg, plan, device = self.cfg, self.plan, self.device
        torch.manual_seed(cfg.train.seed)
        if device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 for whatever stays in fp32
        model = GPT(cfg.model)
        if plan.init_state is not None:  # --init-from: the transformers folder's weights
            model.load_state_dict(plan.init_state)
        model = model.to(device)
        check_attention_backend(cfg.train.attention_backend, device, plan.precision, cfg.model)
        model.set_attention_backend(cfg.train.attention_backend)
        model.loss_chunk_size = plan.loss_chunk_size
        chunks = math.ceil(cfg.train.batch_size * plan.seq_len / plan.loss_chunk_size) if plan.loss_chunk_size else 0
        if cfg.train.compile and chunks > MANY_LOSS_CHUNKS:
            self.console.warn(f"--loss-chunk-size {plan.loss_chunk_size} makes {chunks} chunks per micro-batch "
                              f"({cfg.train.batch_size} × {plan.seq_len} tokens), and --compile unrolls them all: "
                              "compilation will take long. A chunk of 1024 tokens or more is as fast.")
        self.raw_model = model
        self.model_counts = {"n_params": model.num_parameters(),
                             "n_params_non_embedding": model.num_parameters(non_embedding=True)}
        self.flops_per_token = flops_per_token(cfg.model, plan.seq_len, self.model_counts["n_params"])
        # TP → activation checkpointing → compile → FSDP2/DDP, in place on `model` (names unchanged);
        # self.model is what the loop calls (a DDP wrapper, a whole-model torch.compile wrapper, or the model).
        self.model = parallelize(model, self.dist, device, ac=cfg.parallel.ac, compile=cfg.train.compile,
                                 precision=plan.precision)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        self.profiler = Profiler(cfg.profile, Path(cfg.profile.dir) if cfg.profile.dir else plan.run_dir / "profile",
                                 self.dist.rank, device, warn=self.console.warn)
        self.optimizer = build_optimizer(model, cfg.optim, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=plan.precision == "fp16")
        self.autocast = autocast_for(plan.precision, device)
        # MFU's denominator: a GPU's spec peak by exact name, or on CPU a ~0.3 s matmul measurement now.
        self.peak_flops, self.peak_flops_source = peak_flops_for(device, plan.precision)

    def _open_run_folder(self) -> None:
        plan, run_dir = self.plan, self.plan.run_dir
        if self.dist.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)  # locked already when planned through from_config
            self.console.attach_log(run_dir / "train.log")
            write_json_atomic(run_dir / "config.json", self.cfg.to_dict())
            run_info, note = read_run_record(run_dir) if plan.resume else ({}, None)
            if note:  # run.json missing or damaged: rebuilt from this folder, never taken from another
                self.console.warn(note)
            run_info = run_info or {"run_id": plan.run_id, "name": self.cfg.train.run_name, "created_at": time.time()}
            run_info["run_id"] = run_info.get("run_id") or plan.run_id
            run_info.setdefault("resumes", [])
            if plan.resume is not None:
                run_info["resumes"].append({"from_step": plan.resume.step, "at": time.time()})
            write_json_atomic(run_dir / "run.json", run_info)
            update_run_status(run_dir, "running", **process_identity())
        if self.dist.is_main and is_main_process():  # global rank 0 owns the trackers
            self.tracker = build_trackers(self.cfg, run_dir, plan.run_id,
                                          plan.resume.step if plan.resume else None, self.console)

    def _announce(self) -> None:
        print_header(self.plan, self.dist, self.device, self.model_counts, self.console)
        if self.dist.is_main:
            env = environment(self.plan, self.dist, self.device, self.model_counts, self.flops_per_token,
                              self.peak_flops, self.peak_flops_source, self.host_allocator)
            write_json_atomic(self.plan.run_dir / "environment.json", env)
            self.tracker.log_config({**self.cfg.to_dict(), "environment": env})

    # ------------------------------------------------------------------ the recipe
    def fit(self) -> RunResult:
        p, num_steps = self.plan, self.cfg.train.num_steps
        step, tokens_seen = p.start_step, self.start_tokens
        status, message = "crashed", None
        self._announce()
        self.console.start_bar(num_steps, step)
        try:
            with StopRequest() as stop, self.profiler:
                while step < num_steps:
                    lr = apply_schedule(self.optimizer, step, self.cfg.optim, num_steps)
                    grad_norm = self.train_step(step)
                    step, tokens_seen = step + 1, tokens_seen + p.tokens_per_step
                    self.metrics.step_done()
                    last = step == num_steps
                    stopping = self.stop_agreement.update(stop.requested)  # every rank stops at the same step
                    for hook in self.hooks:
                        hook.on_step_end(self, step)
                    # --- log, evaluate, sample, checkpoint: the only places that wait for the device
                    with self.metrics.paused():
                        if self.metrics.due(step, last):
                            row = self.metrics.log(step, lr, grad_norm, tokens_seen, self.guard.pop_skipped())
                            for hook in self.hooks:
                                hook.on_log(self, step, row)
                            if (skipped := self.guard.diverged()):
                                status, message = "diverged", self._diverged_message(step, skipped)
                                break
                        val = self.evaluator.run(step, tokens_seen) if self.evaluator.due(step, last) else None
                        if self.sampler.due(step, evaluated=val is not None):
                            self.sampler.log(step)
                        if self.checkpointer.due(step, last, stopping):
                            with self.profiler.range("checkpoint"):
                                self.checkpointer.save(step, tokens_seen, val, final=stopping or last)
                    if stopping:
                        status = "interrupted"
                        self._announce_stop(step, stop.signal_name)
                        break
                self.stop_agreement.finish()
            status = "finished" if status == "crashed" else status
        except KeyboardInterrupt:
            status = "interrupted"
            raise
        except ckpt_lib.CheckpointSaveError:  # a full disk: the previous checkpoint stays the newest
            status = "failed"
            raise
        except ckpt_lib.NonFiniteWeightsError:
            status = "diverged"
            raise
        except Exception as e:
            raise self._as_peer_failure(e) from e
        finally:
            self._record_end(status, step, tokens_seen)
        return self._wrap_up(status, step, message)

    def train_step(self, step: int) -> torch.Tensor:
        """One optimizer step: grad_accum micro-batches, clip, the divergence guard, update. Returns the
        gradient norm (on the device: nothing here waits for it)."""
        accum, timer, prof = self.plan.batch.grad_accum, self.metrics.timer, self.profiler
        step_loss = torch.zeros((), device=self.device)
        timer.start()
        for micro in range(accum):
            with prof.range("data"):
                x, y = self.prefetch.get(step, micro)
            timer.lap("data")
            with gradient_sync(self.model, sync=micro == accum - 1):  # replicas reduce once per step
                with prof.range("forward"), self.autocast():
                    loss = self.model(x, y)
                self.metrics.loss.add(loss)
                step_loss += loss.detach().float()
                with prof.range("backward"):
                    self.scaler.scale(loss / accum).backward()
            timer.lap("fwd_bwd")
        with prof.range("optimizer"):
            self.scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip, foreach=True)
            if self.guard.before_step(step_loss, grad_norm):
                self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
        timer.lap("optim")
        prof.step()
        return grad_norm

    # ------------------------------------------------------------------ endings
    def _diverged_message(self, step: int, skipped: int) -> str:
        newest = self.checkpointer.last
        return (f"training diverged: the last {skipped} steps (up to step {step}) had a non-finite loss or gradient "
                f"norm; each was skipped, so the weights are still those of step {step - skipped}. The newest "
                f"checkpoint is {newest or 'none (no save yet)'}. Try a lower --lr (now {self.cfg.optim.lr:g}), "
                "more --warmup-steps or a smaller --grad-clip, and resume from that checkpoint.")

    def _announce_stop(self, step: int, signal_name: str | None) -> None:
        why = signal_name or "a stop request on another rank"
        self.console.print(f"{why} received: stopped after step {step} and saved {self.checkpointer.last}. "
                           f"Continue with: gptrain train --resume {self.plan.run_dir}")
        if self.dist.enabled:
            print(f"rank {self.dist.rank}: stopped after step {step} ({why})", file=sys.stderr, flush=True)

    def _as_peer_failure(self, e: Exception) -> Exception:
        """Another rank died: say so at once (the launcher may kill this process any moment now)."""
        if not (isinstance(e, PeerFailure) or (self.dist.enabled and is_peer_failure(e))):
            return e
        failure = e if isinstance(e, PeerFailure) else peer_failure(e, self.dist)
        print(f"error: {failure}", file=sys.stderr, flush=True)
        failure.reported = True
        return failure

    def _record_end(self, status: str, step: int, tokens_seen: int) -> None:
        self.console.stop_bar()
        if self.dist.is_main:
            self.tracker.finish(status)
            note = record_run_status(self.plan.run_dir, status, step=step, tokens_seen=tokens_seen,
                                     best_val_loss=self.evaluator.best)
            if note:
                self.console.warn(note)

    def _wrap_up(self, status: str, step: int, message: str | None) -> RunResult:
        summary = self.profiler.summary() if status == "finished" else None
        if summary:
            self.console.print(summary)
        sample = self.sampler.final(self.checkpointer.consolidated_state) if status == "finished" else None
        if status == "finished" and self.cfg.train.export_hf and self.dist.is_main and self.checkpointer.last:
            from gptrain.export import export_hf

            out = export_hf(self.checkpointer.last, self.cfg.train.export_hf)
            self.console.print(f"exported the final model as a transformers folder: {out}")
        self.console.close()
        return RunResult(self.plan.run_dir, step, self.evaluator.last, self.checkpointer.last, status, sample,
                         message)


def restarted_by_torchrun() -> bool:
    """A worker of torchrun's second or later attempt (after --max-restarts restarted the job)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0


def train(cfg: Config, explicit: set[str] | None = None, console: RunConsole | None = None,
          hooks: list[TrainerHooks] | tuple = ()) -> RunResult:
    trainer = None
    try:
        trainer = Trainer.from_config(cfg, explicit, console, hooks)
        return trainer.fit()
    except NothingToTrain as done:
        if done.checkpoint_named(cfg.train.resume):
            raise  # an explicit checkpoint to continue: --num-steps was probably meant to be larger
        # A relaunch of a run that had already finished (e.g. a restart after its last save): nothing to do.
        ckpt = done.checkpoint
        if is_main_process():
            print(f"--resume: the run already reached step {ckpt.step} (--num-steps {cfg.train.num_steps}); nothing "
                  f"to train. Its newest checkpoint is {ckpt.path}.", flush=True)
        return RunResult(ckpt.path.parent.parent, ckpt.step, ckpt.info.get("val_loss"), ckpt.path, "finished")
    finally:
        if trainer is not None and trainer.run_lock is not None:
            trainer.run_lock.release()  # a process that goes on (a test, a notebook) lets others continue the run
        shutdown_distributed()
