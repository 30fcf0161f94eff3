"""The training loop: one loop for one CPU, one GPU or many processes.

Read `Trainer.fit` top to bottom: it is the recipe. Everything else in this file sets up
the pieces the recipe uses (data, model, optimizer, run folder, checkpoints, metrics).
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gptrain import checkpoint as ckpt_lib
from gptrain.config import SHAPE_KEYS, Config, validate
from gptrain.console import RunConsole
from gptrain.data.dataset import resolve_dataset
from gptrain.data.loader import BatchLayout, DevicePrefetcher, TrainBatches, open_tokens
from gptrain.data.prepare import read_meta
from gptrain.data.tokenizer import load_dataset_tokenizer
from gptrain.distributed import all_reduce_mean, init_distributed
from gptrain.errors import UserError
from gptrain.evaluate import evaluate_loss
from gptrain.generate import generate
from gptrain.metrics import LossAccumulator, StepTimer, gpu_peak_flops, memory_metrics
from gptrain.model import GPT, flops_per_token
from gptrain.optim import build_optimizer, lr_at, set_lr
from gptrain.run_folder import (
    environment_record,
    make_run_dir,
    new_run_id,
    new_run_name,
    read_json,
    update_run_status,
    write_json_atomic,
)
from gptrain.tracking import JsonlTracker, MultiTracker, NullTracker

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class RunResult:
    run_dir: Path
    final_step: int
    final_val_loss: float | None
    checkpoint: Path | None
    status: str
    sample: str | None = None


def resolve_precision(requested: str, device: torch.device, console: RunConsole) -> str:
    if requested == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp32"
    if requested == "bf16" and device.type == "cpu":
        console.warn("bf16 on CPU: matrix products without native bf16 run hundreds of times slower than fp32.")
    if requested == "fp16" and device.type == "cpu":
        raise UserError("--precision fp16 needs a CUDA GPU. Use fp32 (or bf16) on CPU.")
    return requested


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
    def __init__(self, cfg: Config, explicit: set[str] | None = None, console: RunConsole | None = None):
        self.explicit = set(explicit or ())
        self.dist, self.device = init_distributed(cfg.train.device)
        self.console = console or RunConsole(cfg.train.progress, enabled=self.dist.is_main)
        self.cfg = cfg
        self.resume_from: ckpt_lib.Checkpoint | None = None
        if cfg.train.resume:
            self.resume_from = self._find_resume_checkpoint(cfg.train.resume)
            self.cfg = cfg = self._merge_resumed_config(cfg, self.resume_from)
        validate(cfg)
        self.precision = resolve_precision(cfg.train.precision, self.device, self.console)
        self._setup_data()
        self._setup_run_folder()
        self._setup_model()

    # ------------------------------------------------------------------ setup
    def _find_resume_checkpoint(self, resume: str) -> ckpt_lib.Checkpoint:
        t = self.cfg.train
        if resume != "latest":
            return ckpt_lib.resolve_checkpoint(resume)
        if t.checkpoint_dir:
            found = ckpt_lib.latest_checkpoint(Path(t.checkpoint_dir))
            if found:
                return found
        runs = Path(t.runs_dir)
        if t.run_name:
            return ckpt_lib.resolve_checkpoint(runs / t.run_name)
        candidates = sorted((p for p in runs.glob("*/checkpoints") if ckpt_lib.list_checkpoints(p)),
                            key=lambda p: ckpt_lib.list_checkpoints(p)[-1].stat().st_mtime)
        if not candidates:
            raise UserError(f"--resume: no run with a complete checkpoint in {runs}/. Pass --run-name NAME or "
                            "--resume PATH.")
        return ckpt_lib.latest_checkpoint(candidates[-1])

    def _merge_resumed_config(self, cfg: Config, ckpt: ckpt_lib.Checkpoint) -> Config:
        """The checkpoint's settings, with the ones given explicitly now on top (e.g. more --num-steps)."""
        saved = Config.from_dict(ckpt.info["config"])
        for path in self.explicit:
            section, key = path.split(".", 1)
            new_value = getattr(getattr(cfg, section), key)
            if section == "model" and key in SHAPE_KEYS and new_value != getattr(saved.model, key):
                raise UserError(
                    f"--resume: the checkpoint {ckpt.path} has model.{key} = {getattr(saved.model, key)}, "
                    f"but {new_value} was asked for. A resumed run keeps its model shape: drop that setting, "
                    "or start a new run."
                )
            setattr(getattr(saved, section), key, new_value)
        saved.train.resume = cfg.train.resume
        return saved

    def _setup_data(self) -> None:
        cfg = self.cfg
        if self.resume_from is not None and not cfg.data.dataset:
            cfg.data.dataset = self.resume_from.info.get("dataset_dir")
        self.dataset_dir = resolve_dataset(cfg.data, self.console, is_main=self.dist.is_main)
        self.meta = read_meta(self.dataset_dir)
        self.tokenizer = load_dataset_tokenizer(self.dataset_dir)
        data_vocab = int(self.meta["vocab_size"])
        if "model.vocab_size" in self.explicit or self.resume_from is not None:
            if cfg.model.vocab_size < data_vocab:
                raise UserError(
                    f"the dataset {self.dataset_dir} uses {data_vocab} token ids but the model has "
                    f"--vocab-size {cfg.model.vocab_size}. Raise --vocab-size to at least {data_vocab} "
                    "(or leave it out to take the dataset's)."
                )
        else:
            cfg.model.vocab_size = data_vocab
        if cfg.data.seq_len is None:
            cfg.data.seq_len = cfg.model.max_position_embeddings
        validate(cfg)
        self.seq_len = cfg.data.seq_len
        dtype = self.meta["dtype"]
        self.train_tokens = open_tokens(self.dataset_dir / "train.bin", dtype)
        self.val_tokens = open_tokens(self.dataset_dir / "val.bin", dtype)
        t = cfg.train
        self.layout = BatchLayout(t.batch_size, t.grad_accum_steps, self.dist.dp_world, self.dist.dp_rank)
        self.batches = TrainBatches(self.train_tokens, self.seq_len, self.layout, t.seed)
        self.tokens_per_step = self.layout.global_batch * self.seq_len

    def _setup_run_folder(self) -> None:
        t = self.cfg.train
        if self.resume_from is not None:
            info = self.resume_from.info
            t.run_name = info["run_name"]
            self.run_id = info["run_id"]
            run_dir = Path(info.get("run_dir") or self.resume_from.path.parent.parent)
            if not run_dir.is_dir():  # the checkpoint was moved: the run folder is the one around it
                run_dir = self.resume_from.path.parent.parent
        else:
            t.run_name = t.run_name or new_run_name()
            self.run_id = new_run_id()
            run_dir = Path(t.runs_dir) / t.run_name
        self.run_dir = run_dir
        self.checkpoint_dir = Path(t.checkpoint_dir) if t.checkpoint_dir else run_dir / "checkpoints"
        if self.dist.is_main:
            make_run_dir(run_dir.parent, run_dir.name, must_be_new=self.resume_from is None)
            self.console.attach_log(run_dir / "train.log")
            write_json_atomic(run_dir / "config.json", self.cfg.to_dict())
            run_info = read_json(run_dir / "run.json") or {"run_id": self.run_id, "name": t.run_name,
                                                           "created_at": time.time()}
            run_info.setdefault("resumes", [])
            if self.resume_from is not None:
                run_info["resumes"].append({"from_step": self.resume_from.step, "at": time.time()})
            write_json_atomic(run_dir / "run.json", run_info)
            update_run_status(run_dir, "running")
            self.tracker = MultiTracker([JsonlTracker(run_dir)], warn=self.console.warn)
        else:
            self.tracker = NullTracker()

    def _setup_model(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.train.seed)
        if self.device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 for whatever stays in fp32
        model = GPT(cfg.model).to(self.device)
        self.raw_model = model
        self.n_params = model.num_parameters()
        self.n_params_non_embedding = model.num_parameters(non_embedding=True)
        n_flops_params = self.n_params - model.pos_emb.weight.numel()
        self.flops_per_token = flops_per_token(cfg.model, self.seq_len, n_flops_params)
        self.model = model  # wrapped for parallelism / compile in later layers
        if cfg.train.compile:
            for block in model.blocks.values():
                block.compile()  # in place: parameter names (and checkpoints) stay those of the plain model
        self.optimizer = build_optimizer(model, cfg.optim, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        amp = self.precision in ("bf16", "fp16")
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=DTYPES[self.precision])) if amp \
            else contextlib.nullcontext
        self.peak_flops = gpu_peak_flops(self.device, self.precision)

    # ------------------------------------------------------------------ loop
    def fit(self) -> RunResult:
        cfg, t, console = self.cfg, self.cfg.train, self.console
        start_step, tokens_seen = self._restore() if self.resume_from else (0, 0)
        self._print_header(start_step)
        if self.dist.is_main:
            write_json_atomic(self.run_dir / "environment.json", self._environment())
            self.tracker.log_config({**cfg.to_dict(), "environment": self._environment()})

        loss_acc = LossAccumulator(self.device)
        timer = StepTimer()
        prefetch = DevicePrefetcher(self.batches, self.device, t.grad_accum_steps)
        params = [p for p in self.model.parameters() if p.requires_grad]
        clip = t_clip if (t_clip := cfg.optim.grad_clip) > 0 else float("inf")
        grad_norm = torch.zeros((), device=self.device)
        last_val: float | None = None
        last_ckpt: Path | None = None
        status = "crashed"
        # Throughput intervals run from one log step to the next, minus time spent on eval and saves.
        interval_start, interval_steps, paused = time.perf_counter(), 0, 0.0
        step = start_step
        console.start_bar(t.num_steps, start_step)
        try:
            with StopRequest() as stop:
                while step < t.num_steps:
                    # --- one optimizer step: grad_accum micro-batches, then clip and update
                    lr = lr_at(step, cfg.optim, t.num_steps)
                    set_lr(self.optimizer, lr)
                    timer.start()
                    for micro in range(t.grad_accum_steps):
                        x, y = prefetch.get(step, micro)
                        timer.lap("data")
                        with self.autocast():
                            loss = self.model(x, y)
                        loss_acc.add(loss)
                        self.scaler.scale(loss / t.grad_accum_steps).backward()
                        timer.lap("fwd_bwd")
                    self.scaler.unscale_(self.optimizer)
                    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                    self.optimizer.zero_grad(set_to_none=True)
                    timer.lap("optim")
                    step += 1
                    interval_steps += 1
                    tokens_seen += self.tokens_per_step
                    last = step == t.num_steps

                    # --- log, evaluate, checkpoint: the only places that wait for the device
                    if step % t.log_every == 0 or last:
                        elapsed = self._sync_time() - interval_start - paused
                        row = self._train_metrics(loss_acc, grad_norm, lr, timer.pop(), elapsed, interval_steps,
                                                  tokens_seen, step)
                        self.tracker.log(row, step)
                        console.print(self._format_line(step, row))
                        console.update_bar(step, f"loss {row['train/loss']:.3f}")
                        loss_acc.reset()
                        interval_start, interval_steps, paused = time.perf_counter(), 0, 0.0
                    pause_start = time.perf_counter()
                    val_now = None
                    if (t.eval_every > 0 and step % t.eval_every == 0) or last:
                        val_now = last_val = self._evaluate(step, tokens_seen)
                    if stop.requested or last or (t.save_every > 0 and step % t.save_every == 0):
                        last_ckpt = self._save(step, tokens_seen, val_now)
                    if stop.requested:
                        console.print(f"{stop.signal_name} received: stopped after step {step} and saved "
                                      f"{last_ckpt}. Continue with: gptrain train --resume {self.run_dir}")
                        status = "interrupted"
                        break
                    paused += time.perf_counter() - pause_start
            if status != "interrupted":
                status = "finished"
        except KeyboardInterrupt:
            status = "interrupted"
            raise
        finally:
            console.stop_bar()
            if self.dist.is_main:
                self.tracker.finish(status)
                update_run_status(self.run_dir, status, step=step, tokens_seen=tokens_seen, best_val_loss=None
                                  if last_val is None else last_val)
        sample = self._final_sample() if status == "finished" else None
        console.close()
        return RunResult(self.run_dir, step, last_val, last_ckpt, status, sample)

    # ------------------------------------------------------------------ pieces of the loop
    def _sync_time(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _train_metrics(self, loss_acc: LossAccumulator, grad_norm: torch.Tensor, lr: float,
                       parts: dict[str, float], elapsed: float, steps: int, tokens_seen: int,
                       step: int) -> dict[str, Any]:
        mean_loss = all_reduce_mean(loss_acc.total / max(1, loss_acc.count))
        step_time = elapsed / max(1, steps)
        global_tps = steps * self.tokens_per_step / elapsed
        row: dict[str, Any] = {
            "train/loss": mean_loss.item(),
            "train/grad_norm": grad_norm.item(),
            "lr": lr,
            "train/tokens_seen": tokens_seen,
            "train/epoch": self.batches.epoch_of(step),
            "tokens_per_sec_per_rank": global_tps / self.dist.world_size,
            "global_tokens_per_sec": global_tps,
            "perf/step_time": step_time,
            "amp": int(self.precision in ("bf16", "fp16")),
        }
        for name, seconds in parts.items():
            row[f"perf/{name}_time"] = seconds / max(1, steps)
        if self.peak_flops:
            row["perf/mfu"] = self.flops_per_token * global_tps / (self.peak_flops * self.dist.world_size)
        row.update(memory_metrics(self.device))
        if not math.isfinite(row["train/loss"]):
            self.console.warn(f"non-finite train loss ({row['train/loss']}) at step {step}.")
        return row

    def _evaluate(self, step: int, tokens_seen: int) -> float:
        t = self.cfg.train
        loss, ppl, n = evaluate_loss(self.model, self.val_tokens, self.seq_len, t.eval_tokens, t.batch_size,
                                     self.device, self.autocast(), self.dist.dp_rank, self.dist.dp_world)
        self.tracker.log({"val/loss": loss, "val/ppl": ppl, "val/tokens": n, "train/tokens_seen": tokens_seen},
                         step)
        self.console.print(f"step {step:>6}/{t.num_steps} | val loss {loss:.4f} | val ppl {ppl:.2f} "
                           f"({n:,} tokens)")
        return loss

    def _save(self, step: int, tokens_seen: int, val_loss: float | None) -> Path | None:
        if not self.dist.is_main:
            return None
        model_state = self.raw_model.state_dict()
        train_state = {
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else torch.empty(0),
        }
        info = {
            "tokens_seen": tokens_seen,
            "val_loss": val_loss,
            "run_id": self.run_id,
            "run_name": self.cfg.train.run_name,
            "run_dir": str(self.run_dir),
            "config": self.cfg.to_dict(),
            "dataset_dir": str(self.dataset_dir),
            "dataset_fingerprint": (self.meta.get("inputs") or {}).get("fingerprint"),
            "tokenizer": {"spec": self.tokenizer.spec, "fingerprint": self.tokenizer.fingerprint(),
                          "vocab_size": self.tokenizer.vocab_size, "eot_id": self.tokenizer.eot_id},
        }
        tok_json = self.tokenizer.to_json()
        path = ckpt_lib.save_checkpoint(self.checkpoint_dir, step, model_state, train_state, info,
                                        extra_files={"tokenizer.json": tok_json} if tok_json else None)
        ckpt_lib.prune_checkpoints(self.checkpoint_dir, self.cfg.train.keep_last)
        self.console.print(f"saved checkpoint {path}")
        return path

    def _restore(self) -> tuple[int, int]:
        ckpt = self.resume_from
        state = ckpt.load_model_state(self.device)
        try:
            self.raw_model.load_state_dict(state)
        except RuntimeError as e:
            raise UserError(f"checkpoint {ckpt.path} does not fit this model ({str(e).splitlines()[0]}). "
                            "Resume with the checkpoint's own model settings.") from None
        train_state = ckpt.load_train_state(self.device)
        self.optimizer.load_state_dict(train_state["optimizer"])
        self.scaler.load_state_dict(train_state["scaler"])
        torch.set_rng_state(train_state["rng_cpu"].cpu())
        if self.device.type == "cuda" and train_state["rng_cuda"].numel():
            torch.cuda.set_rng_state(train_state["rng_cuda"].cpu(), self.device)
        self.console.print(f"resumed from {ckpt.path} (step {ckpt.step})")
        if ckpt.step >= self.cfg.train.num_steps:
            self.console.warn(f"the checkpoint is at step {ckpt.step}, which already reaches --num-steps "
                              f"{self.cfg.train.num_steps}: nothing to train. Pass a larger --num-steps.")
        return ckpt.step, int(ckpt.info.get("tokens_seen", ckpt.step * self.tokens_per_step))

    def _final_sample(self) -> str | None:
        t = self.cfg.train
        if not self.dist.is_main or t.sample_tokens <= 0:
            return None
        gen = torch.Generator(device=self.device).manual_seed(t.seed)
        prompt = self.tokenizer.encode(t.sample_prompt)
        new = generate(self.raw_model, prompt, t.sample_tokens, generator=gen, stop_id=self.tokenizer.eot_id,
                       device=self.device)
        text = t.sample_prompt + self.tokenizer.decode(new)
        self.console.print("sample:\n" + text)
        return text

    # ------------------------------------------------------------------ reporting
    def _environment(self) -> dict[str, Any]:
        env = environment_record(self.device, self.dist.world_size)
        env.update(
            n_params=self.n_params,
            n_params_non_embedding=self.n_params_non_embedding,
            tokens_per_step=self.tokens_per_step,
            flops_per_token=self.flops_per_token,
            precision=self.precision,
            dataset_dir=str(self.dataset_dir),
            dataset_fingerprint=(self.meta.get("inputs") or {}).get("fingerprint"),
            tokenizer=self.tokenizer.spec,
            tokenizer_fingerprint=self.tokenizer.fingerprint(),
            run_id=self.run_id,
        )
        return env

    def _print_header(self, start_step: int) -> None:
        c, m, t = self.console, self.cfg.model, self.cfg.train
        c.print(f"run {t.run_name} → {self.run_dir}")
        c.print(f"data {self.dataset_dir}: {len(self.train_tokens):,} train / {len(self.val_tokens):,} val tokens, "
                f"tokenizer {self.tokenizer.spec} (vocab {m.vocab_size})")
        c.print(f"model {t.preset}: {m.n_layers} layers, {m.n_heads} heads, d_model {m.d_model}, context "
                f"{m.max_position_embeddings} | {self.n_params:,} parameters "
                f"({self.n_params_non_embedding:,} non-embedding)")
        c.print(f"device {self.device} ({self.precision}) | {self.layout.global_batch} sequences × {self.seq_len} "
                f"tokens = {self.tokens_per_step:,} tokens per optimizer step "
                f"({t.batch_size} per micro-batch × {t.grad_accum_steps} accumulation × {self.dist.dp_world} "
                f"data-parallel) | steps {start_step}→{t.num_steps}")

    def _format_line(self, step: int, row: dict[str, Any]) -> str:
        t = self.cfg.train
        eta = (t.num_steps - step) * row["perf/step_time"]
        return (f"step {step:>6}/{t.num_steps} | loss {row['train/loss']:.4f} | lr {row['lr']:.2e} | "
                f"grad norm {row['train/grad_norm']:.3f} | {row['global_tokens_per_sec']:,.0f} tok/s | "
                f"{row['perf/step_time'] * 1000:.0f} ms/step | ETA {format_duration(eta)}")


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def train(cfg: Config, explicit: set[str] | None = None, console: RunConsole | None = None) -> RunResult:
    return Trainer(cfg, explicit, console).fit()

