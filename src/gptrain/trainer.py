"""The training loop: one loop for one CPU, one GPU or many processes.

Read `Trainer.fit` top to bottom: it is the recipe. Everything else in this file sets up
the pieces the recipe uses (data, model, optimizer, run folder, checkpoints, metrics).
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from gptrain import checkpoint as ckpt_lib
from gptrain.chunked_loss import resolve_loss_chunk_size
from gptrain.config import RAW_DATA_PATHS, SHAPE_KEYS, Config, check_profiler_fits, flag_of, validate
from gptrain.console import RunConsole
from gptrain.data.dataset import resolve_dataset
from gptrain.data.loader import BatchLayout, DevicePrefetcher, TrainBatches, open_tokens
from gptrain.data.prepare import read_meta
from gptrain.data.tokenizer import load_dataset_tokenizer
from gptrain.distributed import (
    StopAgreement,
    all_reduce_mean,
    host_all_reduce,
    init_distributed,
    is_main_process,
    is_peer_failure,
    peer_failure,
    shutdown_distributed,
    validate_layout,
)
from gptrain.distributed import checkpointing as dist_ckpt
from gptrain.distributed.parallelize import full_value, gradient_sync, parallelize
from gptrain.errors import PeerFailure, UserError
from gptrain.evaluate import evaluate_loss
from gptrain.generate import NonFiniteLogits, generate
from gptrain.host_memory import host_allocator, reuse_freed_memory
from gptrain.metrics import MFU_FORMULA, LossAccumulator, StepTimer, memory_metrics, peak_flops_for
from gptrain.model import GPT, ModelConfig, attention_kernels, flops_per_token
from gptrain.optim import build_optimizer, lr_at, set_lr
from gptrain.profiling import Profiler
from gptrain.run_folder import (
    environment_record,
    make_run_dir,
    new_run_id,
    new_run_name,
    read_json,
    update_run_status,
    write_json_atomic,
)
from gptrain.runs import process_identity
from gptrain.tracking import NullTracker, build_trackers
from gptrain.tracking.samples import is_sharded, sample_completions

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# torch.compile unrolls the chunked loss's loop: compile time grows with the chunks per micro-batch (measured
# on CPU for 512 tokens: 1 chunk 5 s, 8 chunks 9 s, 64 chunks 53 s). Above this many, a warning at start.
MANY_LOSS_CHUNKS = 64


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
    def __init__(self, cfg: Config, explicit: set[str] | None = None, console: RunConsole | None = None):
        self.explicit = set(explicit or ())
        self.cfg = cfg
        self.resume_from: ckpt_lib.Checkpoint | None = None
        if cfg.train.resume:
            self.resume_from = self._find_resume_checkpoint(cfg.train.resume)
            self.cfg = cfg = self._merge_resumed_config(cfg, self.resume_from)
            if self.resume_from.step >= cfg.train.num_steps:  # before the run folder's records are rewritten
                raise UserError(f"--resume: the checkpoint {self.resume_from.path} is at step {self.resume_from.step}, "
                                f"which already reaches --num-steps {cfg.train.num_steps}: nothing to train. Pass a "
                                f"larger --num-steps (e.g. {self.resume_from.step + cfg.train.num_steps}).")
            left = cfg.train.num_steps - self.resume_from.step
            check_profiler_fits(cfg.profile, left, f"the resumed run has {left} steps left (--num-steps "
                                f"{cfg.train.num_steps} − checkpoint step {self.resume_from.step})",
                                "Raise --num-steps, or lower --profile-wait and --profile-warmup.")
        validate(cfg)
        # Layout errors (degrees vs world size, heads vs --tp, ...) are raised here, before any work.
        self.dist, self.device = init_distributed(cfg.train.device, cfg.parallel, cfg.model, cfg.train.precision)
        self.console = console or RunConsole(cfg.train.progress, enabled=self.dist.is_main)
        self.precision = resolve_precision(cfg.train.precision, self.device, self.console)
        # Before any model or batch exists: CPU steps then reuse freed memory instead of faulting in new pages.
        if self.device.type == "cpu" and cfg.train.reuse_host_memory:
            reuse_freed_memory()
        self.host_allocator = host_allocator()
        self._setup_data()
        self._plan_run_folder()
        self._setup_model()
        # Load the checkpoint before the run folder is touched: a corrupt checkpoint or a shape
        # mismatch ends here, with the run's files exactly as they were.
        self.start_step, self.start_tokens = self._restore() if self.resume_from else (0, 0)
        self._create_run_folder()

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
        # The layout and profiling belong to this launch, not to the run: a run resumes in any layout.
        saved.parallel, saved.profile = cfg.parallel, cfg.profile
        return saved

    def _setup_data(self) -> None:
        cfg = self.cfg
        if self.resume_from is not None and "data.dataset" not in self.explicit:
            raw_given = sorted(self.explicit & set(RAW_DATA_PATHS))
            if raw_given and (cfg.data.train_files or cfg.data.use_toy_data):
                cfg.data.dataset = None  # raw text to prepare with the settings given now: the run goes on with it
            elif raw_given:
                raise UserError(f"--resume: the run trained on the prepared dataset {cfg.data.dataset or '?'}, so "
                                f"{', '.join(flag_of(p) for p in raw_given)} would have no text to prepare. Add "
                                "--train-data FILE... to continue on new text, or drop them.")
            elif not cfg.data.dataset:  # the data it was trained on (a raw-text run's prepared cache)
                cfg.data.dataset = self.resume_from.info.get("dataset_dir")
        if self.dist.enabled:  # rank 0 prepares raw data; the others wait for it (or for its error)
            self.dataset_dir = self._resolve_dataset_on_rank0(cfg)
        else:
            self.dataset_dir = resolve_dataset(cfg.data, self.console, is_main=True)
        self.meta = read_meta(self.dataset_dir)
        self.tokenizer = load_dataset_tokenizer(self.dataset_dir)
        if self.resume_from is not None:
            self._check_resumed_tokenizer(self.resume_from)
        self._check_sample_prompts()
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
        # --grad-accum-steps counts micro-batches per step over all data-parallel ranks, so the global
        # batch (batch_size × grad_accum_steps windows) is the same in every layout.
        dp = self.dist.dp_world
        if t.grad_accum_steps is None:
            t.grad_accum_steps = dp
        if t.grad_accum_steps % dp:
            raise UserError(f"--grad-accum-steps {t.grad_accum_steps} cannot be split evenly over {dp} data-parallel "
                            f"ranks (it counts micro-batches per step over all of them). Use a multiple of {dp}, "
                            f"e.g. --grad-accum-steps {dp * max(1, round(t.grad_accum_steps / dp))} (that changes the "
                            "global batch), or another layout.")
        self.layout = BatchLayout(t.batch_size, t.grad_accum_steps // dp, dp, self.dist.dp_rank)
        self.batches = TrainBatches(self.train_tokens, self.seq_len, self.layout, t.seed)
        self.tokens_per_step = self.layout.global_batch * self.seq_len

    def _check_sample_prompts(self) -> None:
        """Prompts the tokenizer cannot encode (a character-level vocabulary) end the run here, not mid-run."""
        prompts = list(self.cfg.tracking.sample_prompts) if self.cfg.tracking.sample_every != 0 else []
        if self.cfg.train.sample_tokens > 0:
            prompts.append(self.cfg.train.sample_prompt)
        for prompt in prompts:
            self.tokenizer.encode(prompt)

    def _check_resumed_tokenizer(self, ckpt: ckpt_lib.Checkpoint) -> None:
        """A resumed model must go on reading the token ids it was trained on."""
        saved = ckpt.info.get("tokenizer") or {}
        if saved.get("fingerprint") not in (None, self.tokenizer.fingerprint()):
            raise UserError(f"--resume: the checkpoint {ckpt.path} was trained with the tokenizer {saved.get('spec')}, "
                            f"but the dataset {self.dataset_dir} is tokenized with {self.tokenizer.spec}. Resume "
                            f"on data prepared with the run's tokenizer (its dataset was {ckpt.info.get('dataset_dir')}), "
                            "or start a new run.")

    def _resolve_dataset_on_rank0(self, cfg: Config) -> Path:
        import torch.distributed as dist

        result: list[Any] = [None]
        if self.dist.is_main:
            try:
                result = [("ok", str(resolve_dataset(cfg.data, self.console, is_main=True)))]
            except UserError as e:
                result = [("error", str(e))]
        dist.broadcast_object_list(result, src=0, group=self.dist.control_group)
        kind, value = result[0]
        if kind == "error":
            raise UserError(value)
        return Path(value)

    def _plan_run_folder(self) -> None:
        """Name the run and its folders (nothing is written yet)."""
        t = self.cfg.train
        if self.resume_from is not None:
            info = self.resume_from.info
            around = self.resume_from.path.parent.parent
            run_dir = Path(info.get("run_dir") or around)
            # A checkpoint inside a run folder (also a copied or moved one) continues that folder.
            if not run_dir.is_dir() or (around / "run.json").is_file():
                run_dir = around
            if "train.run_name" in self.explicit and t.run_name not in (info["run_name"], run_dir.name):
                raise UserError(f"--resume continues the run {info['run_name']} ({run_dir}), not --run-name "
                                f"{t.run_name}. Drop --run-name, or start {t.run_name} as a new run without --resume.")
            t.run_name = info["run_name"]
            self.run_id = info["run_id"]
        else:
            t.run_name = t.run_name or new_run_name()
            self.run_id = new_run_id()
            run_dir = Path(t.runs_dir) / t.run_name
        self.run_dir = run_dir
        self.checkpoint_dir = Path(t.checkpoint_dir) if t.checkpoint_dir else run_dir / "checkpoints"

    def _create_run_folder(self) -> None:
        t, run_dir = self.cfg.train, self.run_dir
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
            update_run_status(run_dir, "running", **process_identity())
        if self.dist.is_main and is_main_process():  # global rank 0 owns the trackers
            self.tracker = build_trackers(self.cfg, run_dir, self.run_id,
                                          self.resume_from.step if self.resume_from else None, self.console)
        else:
            self.tracker = NullTracker()

    def _setup_model(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.train.seed)
        if self.device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 for whatever stays in fp32
        model = GPT(cfg.model).to(self.device)
        check_attention_backend(cfg.train.attention_backend, self.device, self.precision, cfg.model)
        model.set_attention_backend(cfg.train.attention_backend)
        self.loss_chunk_size = resolve_loss_chunk_size(cfg.train.loss_chunk_size, self.device,
                                                       self.dist.layout.tp > 1)
        model.loss_chunk_size = self.loss_chunk_size
        chunks = math.ceil(cfg.train.batch_size * self.seq_len / self.loss_chunk_size) if self.loss_chunk_size else 0
        if cfg.train.compile and chunks > MANY_LOSS_CHUNKS:
            self.console.warn(f"--loss-chunk-size {self.loss_chunk_size} makes {chunks} chunks per micro-batch "
                              f"({cfg.train.batch_size} × {self.seq_len} tokens), and --compile unrolls them all: "
                              "compilation will take long. A chunk of 1024 tokens or more is as fast.")
        self.raw_model = model
        self.n_params = model.num_parameters()
        self.n_params_non_embedding = model.num_parameters(non_embedding=True)
        n_flops_params = self.n_params - model.pos_emb.weight.numel()
        self.flops_per_token = flops_per_token(cfg.model, self.seq_len, n_flops_params)
        validate_layout(self.dist.layout, cfg.model, self.device.type, "nccl" if self.device.type == "cuda"
                        else "gloo", self.precision)  # again, now that the vocabulary is known
        # TP → activation checkpointing → compile → FSDP2/DDP, in place on `model` (names unchanged);
        # self.model is what the loop calls (a DDP wrapper, a whole-model torch.compile wrapper, or the model).
        self.model = parallelize(model, self.dist, self.device, ac=cfg.parallel.ac, compile=cfg.train.compile,
                                 precision=self.precision)
        self.profiler = Profiler(cfg.profile, Path(cfg.profile.dir) if cfg.profile.dir else self.run_dir / "profile",
                                 self.dist.rank, self.device, warn=self.console.warn)
        self.optimizer = build_optimizer(model, cfg.optim, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        amp = self.precision in ("bf16", "fp16")
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=DTYPES[self.precision])) if amp \
            else contextlib.nullcontext
        # MFU's denominator: a GPU's spec peak by exact name, or on CPU a ~0.3 s matmul measurement now.
        self.peak_flops, self.peak_flops_source = peak_flops_for(self.device, self.precision)

    # ------------------------------------------------------------------ loop
    def fit(self) -> RunResult:
        cfg, t, console = self.cfg, self.cfg.train, self.console
        start_step, tokens_seen = self.start_step, self.start_tokens
        self._print_header(start_step)
        if self.dist.is_main:
            write_json_atomic(self.run_dir / "environment.json", self._environment())
            self.tracker.log_config({**cfg.to_dict(), "environment": self._environment()})

        loss_acc = LossAccumulator(self.device)
        timer = StepTimer()
        accum = self.layout.grad_accum  # this rank's micro-batches per step
        prefetch = DevicePrefetcher(self.batches, self.device, accum)
        stop_agreement = StopAgreement(self.dist)
        prof = self.profiler
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
            with StopRequest() as stop, prof:
                while step < t.num_steps:
                    # --- one optimizer step: grad_accum micro-batches, then clip and update
                    lr = lr_at(step, cfg.optim, t.num_steps)
                    set_lr(self.optimizer, lr)
                    timer.start()
                    for micro in range(accum):
                        with prof.range("data"):
                            x, y = prefetch.get(step, micro)
                        timer.lap("data")
                        with gradient_sync(self.model, sync=micro == accum - 1):  # replicas reduce once per step
                            with prof.range("forward"), self.autocast():
                                loss = self.model(x, y)
                            loss_acc.add(loss)
                            with prof.range("backward"):
                                self.scaler.scale(loss / accum).backward()
                        timer.lap("fwd_bwd")
                    with prof.range("optimizer"):
                        self.scaler.unscale_(self.optimizer)
                        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
                        self.scaler.step(self.optimizer)
                        self.scaler.update()
                        self.optimizer.zero_grad(set_to_none=True)
                    timer.lap("optim")
                    prof.step()
                    step += 1
                    interval_steps += 1
                    tokens_seen += self.tokens_per_step
                    last = step == t.num_steps
                    stop_now = stop_agreement.update(stop.requested)  # every rank stops at the same step

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
                    if self._samples_due(step, evaluated=val_now is not None):
                        self._log_samples(step)
                    if stop_now or last or (t.save_every > 0 and step % t.save_every == 0):
                        with prof.range("checkpoint"):
                            last_ckpt = self._save(step, tokens_seen, val_now, final=stop_now or last)
                    if stop_now:
                        why = stop.signal_name or "a stop request on another rank"
                        console.print(f"{why} received: stopped after step {step} and saved "
                                      f"{last_ckpt}. Continue with: gptrain train --resume {self.run_dir}")
                        if self.dist.enabled:
                            print(f"rank {self.dist.rank}: stopped after step {step} ({why})", file=sys.stderr,
                                  flush=True)
                        status = "interrupted"
                        break
                    paused += time.perf_counter() - pause_start
                stop_agreement.finish()
            if status != "interrupted":
                status = "finished"
        except KeyboardInterrupt:
            status = "interrupted"
            raise
        except Exception as e:
            if isinstance(e, PeerFailure) or (self.dist.enabled and is_peer_failure(e)):
                # Another rank died: say so at once (the launcher may kill this process any moment now).
                failure = e if isinstance(e, PeerFailure) else peer_failure(e, self.dist)
                print(f"error: {failure}", file=sys.stderr, flush=True)
                failure.reported = True
                raise failure from e
            raise
        finally:
            console.stop_bar()
            if self.dist.is_main:
                self.tracker.finish(status)
                update_run_status(self.run_dir, status, step=step, tokens_seen=tokens_seen, best_val_loss=None
                                  if last_val is None else last_val)
        summary = prof.summary() if status == "finished" else None
        if summary:
            console.print(summary)
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
        # Mean over every rank = mean over data-parallel ranks (tensor-parallel peers hold the same loss).
        mean_loss = all_reduce_mean(loss_acc.total / max(1, loss_acc.count))
        # The slowest rank sets the pace: throughput is global tokens over its wall time.
        fastest, slowest = elapsed, elapsed
        if self.dist.enabled:
            (slowest,), (fastest,) = host_all_reduce([elapsed], "max", self.dist), \
                host_all_reduce([elapsed], "min", self.dist)
        step_time = slowest / max(1, steps)
        global_tps = steps * self.tokens_per_step / slowest
        row: dict[str, Any] = {
            "train/loss": mean_loss.item(),
            "train/grad_norm": full_value(grad_norm).item(),
            "lr": lr,
            "train/tokens_seen": tokens_seen,
            "train/epoch": self.batches.epoch_of(step),
            "tokens_per_sec_per_rank": global_tps / self.dist.world_size,
            "global_tokens_per_sec": global_tps,
            "perf/step_time": step_time,
            "perf/step_time_fastest_rank": fastest / max(1, steps),
            "amp": int(self.precision in ("bf16", "fp16")),
        }
        for name, seconds in parts.items():
            row[f"perf/{name}_time"] = seconds / max(1, steps)
        if self.peak_flops:
            row["perf/mfu"] = self.flops_per_token * global_tps / (self.peak_flops * self.dist.world_size)
        row.update(memory_metrics(self.device))
        return row

    def _evaluate(self, step: int, tokens_seen: int) -> float:
        t = self.cfg.train
        loss, ppl, n = evaluate_loss(self.model, self.val_tokens, self.seq_len, t.eval_tokens, t.batch_size,
                                     self.device, self.autocast(), self.dist.dp_rank, self.dist.dp_world,
                                     self.dist.dp_group)
        self.tracker.log({"val/loss": loss, "val/ppl": ppl, "val/tokens": n, "train/tokens_seen": tokens_seen},
                         step)
        self.console.print(f"step {step:>6}/{t.num_steps} | val loss {loss:.4f} | val ppl {ppl:.2f} "
                           f"({n:,} tokens)")
        return loss

    def _save(self, step: int, tokens_seen: int, val_loss: float | None, final: bool = False) -> Path | None:
        """Single process: torch.save of full state. Several processes: a collective, sharded DCP save
        (plus, for the final checkpoint, the consolidated weights as model.pt for generate/eval)."""
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
        extra_files = {"tokenizer.json": tok_json} if tok_json else None
        if self.dist.enabled:
            path = self._save_sharded(step, info, extra_files, final)
            if not self.dist.is_main:
                return path
        else:
            model_state, optim_state = dist_ckpt.full_state(self.raw_model, self.optimizer)
            train_state = {
                "optimizer": optim_state,
                "scaler": self.scaler.state_dict(),
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else torch.empty(0),
            }
            path = ckpt_lib.save_checkpoint(self.checkpoint_dir, step, model_state, train_state, info,
                                            extra_files=extra_files)
        ckpt_lib.prune_checkpoints(self.checkpoint_dir, self.cfg.train.keep_last)
        self.tracker.log_checkpoint(path, step, {"tokens_seen": tokens_seen, "val_loss": val_loss})
        self.console.print(f"saved checkpoint {path}")
        return path

    def _save_sharded(self, step: int, info: dict[str, Any], extra_files: dict[str, str] | None,
                      final: bool) -> Path:
        import torch.distributed as dist

        group = self.dist.control_group
        full = dist_ckpt.gather_full_model_state(self.raw_model) if final else None  # collective
        if final and self.dist.is_main:
            self._exported_state = full
        extra = {"rng_cpu": torch.get_rng_state(), "scaler": self.scaler.state_dict()}

        def broadcast(obj):
            box = [obj]
            dist.broadcast_object_list(box, src=0, group=group)
            return box[0]

        return ckpt_lib.save_sharded_checkpoint(
            self.checkpoint_dir, step, lambda d: dist_ckpt.save_sharded(d, self.raw_model, self.optimizer, extra),
            info, extra_files, self.dist.rank, broadcast, lambda: dist.barrier(group=group),
            full_model_state=full if self.dist.is_main else None)

    def _restore(self) -> tuple[int, int]:
        """Load a checkpoint of either kind, written in any layout, into this layout."""
        ckpt = self.resume_from
        if ckpt.is_sharded:
            template = {"rng_cpu": torch.get_rng_state(), "scaler": self.scaler.state_dict()}
            train_state = dist_ckpt.load_sharded(ckpt.path / "dcp", self.raw_model, self.optimizer, template)
        else:
            model_state = ckpt.load_model_state("cpu")
            train_state = ckpt.load_train_state("cpu")
            optim_state = train_state["optimizer"]
            if optim_state["param_groups"] and isinstance(optim_state["param_groups"][0]["params"][0], int):
                # format 1: optimizer state keyed by position, loadable by this same single-process model only
                if self.dist.enabled:
                    raise UserError(f"checkpoint {ckpt.path} predates layout-independent checkpoints: resume it "
                                    "in one process first (its next checkpoint loads in any layout).")
                dist_ckpt.load_full_state(self.raw_model, None, model_state, None)
                self.optimizer.load_state_dict(optim_state)
            else:
                dist_ckpt.load_full_state(self.raw_model, self.optimizer, model_state, optim_state)
        if train_state.get("scaler"):
            self.scaler.load_state_dict(train_state["scaler"])
        torch.set_rng_state(train_state["rng_cpu"].cpu())
        rng_cuda = train_state.get("rng_cuda")
        if self.device.type == "cuda" and rng_cuda is not None and rng_cuda.numel():
            torch.cuda.set_rng_state(rng_cuda.cpu(), self.device)
        self.console.print(f"resumed from {ckpt.path} (step {ckpt.step})")
        return ckpt.step, int(ckpt.info.get("tokens_seen", ckpt.step * self.tokens_per_step))

    def _samples_due(self, step: int, evaluated: bool) -> bool:
        every, prompts = self.cfg.tracking.sample_every, self.cfg.tracking.sample_prompts
        if not self.dist.is_main or not prompts or self.cfg.tracking.sample_tokens <= 0:
            return False
        return evaluated if every is None else (every > 0 and step % every == 0)

    def _log_samples(self, step: int) -> None:
        """A few short generations from fixed prompts, on rank 0 with the unwrapped model."""
        if is_sharded(self.raw_model):
            if not getattr(self, "_noted_sharded", False):
                self.console.print("text samples skipped: the model is sharded across processes.")
                self._noted_sharded = True
            return
        tr = self.cfg.tracking
        try:
            samples = sample_completions(self.raw_model, self.tokenizer, tr.sample_prompts, tr.sample_tokens,
                                         self.cfg.train.seed, self.device)
        except RuntimeError as e:  # e.g. NaN weights after a diverged step: a sample must not end the run
            self.console.warn(f"text samples at step {step} failed: {e}")
            return
        self.tracker.log_samples(samples, step)

    def _final_sample(self) -> str | None:
        t = self.cfg.train
        if not self.dist.is_main or t.sample_tokens <= 0:
            return None
        model = self.raw_model
        if self.dist.enabled:  # sharded weights: sample from the consolidated copy of the final save
            state = getattr(self, "_exported_state", None)
            if not state:
                return None
            model = GPT(self.cfg.model)
            model.load_state_dict(state)
            model.to(self.device)
        gen = torch.Generator(device=self.device).manual_seed(t.seed)
        prompt = self.tokenizer.encode(t.sample_prompt)
        try:
            new = generate(model, prompt, t.sample_tokens, generator=gen, stop_id=self.tokenizer.eot_id,
                           device=self.device)
        except NonFiniteLogits as e:
            self.console.warn(f"no sample: {e}.")
            return None
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
            mfu={"formula": MFU_FORMULA, "flops_per_token": self.flops_per_token, "peak_flops": self.peak_flops,
                 "peak_flops_source": self.peak_flops_source},
            precision=self.precision,
            loss_chunk_size=self.loss_chunk_size,
            host_allocator=self.host_allocator,
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
                f"({t.batch_size} per micro-batch × {self.layout.grad_accum} accumulation × {self.dist.dp_world} "
                f"data-parallel) | steps {start_step}→{t.num_steps}")
        if self.dist.enabled:
            p = self.cfg.parallel
            c.print(f"layout {self.dist.world_size} processes: {self.dist.layout.describe()} | activation "
                    f"checkpointing {p.ac} | compile {'on' if t.compile else 'off'}")

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
    try:
        return Trainer(cfg, explicit, console).fit()
    finally:
        shutdown_distributed()

