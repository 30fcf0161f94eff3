"""Resolve, then run: the settings given, the checkpoint to resume, the dataset and the layout
become one frozen `Plan` before any model exists. The Trainer only executes a plan.

    settings = settings_to_run(cfg, explicit, resume)      # the checkpoint's settings + those given now
    data = open_training_data(settings, explicit, resume, ...)   # prepares raw text on rank 0
    plan = resolve_plan(settings, explicit, resume, data, dist)  # pure

Everything a run decides (vocabulary, sequence length, batch layout, run name and folder, precision,
how the loss is computed) is decided in `resolve_plan`, recorded in the plan's config and written
to config.json as used — never rewritten later by the loop.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gptrain import checkpoint as ckpt_lib
from gptrain.chunked_loss import resolve_loss_chunk_size
from gptrain.config import RAW_DATA_PATHS, SHAPE_KEYS, Config, check_profiler_fits, flag_of, validate
from gptrain.data.dataset import TokenDataset, open_dataset
from gptrain.data.loader import BatchLayout
from gptrain.data.tokenizer import Tokenizer
from gptrain.distributed import DistInfo, backend_for, validate_layout
from gptrain.errors import UserError
from gptrain.memory_estimate import available_memory, check_fits, count_parameters, estimate_training_memory
from gptrain.run_folder import LOCK_FILE, RunLock, new_run_id, new_run_name, open_run_dir, run_dir_for_resume


@dataclass(frozen=True)
class Plan:
    """Everything the Trainer executes, resolved. `cfg` is the run's config as used (config.json)."""

    cfg: Config
    explicit: frozenset[str]
    resume: ckpt_lib.Checkpoint | None
    data: TokenDataset  # memory-mapped tokens, vocabulary, tokenizer (None for token files without one)
    run_id: str
    run_dir: Path
    checkpoint_dir: Path
    batch: BatchLayout  # this rank's share of the global batch
    precision: str
    loss_chunk_size: int
    init_state: dict[str, torch.Tensor] | None = None  # --init-from: the weights to start from

    @property
    def seq_len(self) -> int:
        return self.cfg.data.seq_len

    @property
    def tokens_per_step(self) -> int:
        return self.batch.global_batch * self.seq_len

    @property
    def start_step(self) -> int:
        return self.resume.step if self.resume else 0

    def replace(self, **changes: Any) -> Plan:
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------------------- resume
def find_resume_checkpoint(cfg: Config) -> ckpt_lib.Checkpoint | None:
    """The checkpoint --resume names.

    `--resume PATH`: that run folder or checkpoint, which must exist. A bare `--resume` ("latest") is
    relaunch-safe, as in the original tool: the newest complete checkpoint of --checkpoint-path, of
    --run-name, or of the newest run in --runs-dir; when there is none, the run starts from scratch
    (`fresh_start_note` says so), so one command line starts a run and continues it after any interruption.
    """
    t = cfg.train
    if not t.resume:
        return None
    if t.resume != "latest":
        return ckpt_lib.resolve_checkpoint(t.resume)
    if t.checkpoint_dir:
        return ckpt_lib.latest_checkpoint(Path(t.checkpoint_dir))
    runs = Path(t.runs_dir)
    if t.run_name:
        return ckpt_lib.latest_checkpoint(runs / t.run_name / "checkpoints")
    candidates = sorted((p for p in runs.glob("*/checkpoints") if ckpt_lib.list_checkpoints(p)),
                        key=lambda p: ckpt_lib.list_checkpoints(p)[-1].stat().st_mtime)
    return ckpt_lib.latest_checkpoint(candidates[-1]) if candidates else None


def fresh_start_note(cfg: Config, resume: ckpt_lib.Checkpoint | None) -> str | None:
    """The one line a bare --resume prints when it finds nothing to continue."""
    t = cfg.train
    if t.resume != "latest" or resume is not None:
        return None
    where = t.checkpoint_dir or (Path(t.runs_dir) / t.run_name / "checkpoints" if t.run_name else f"{t.runs_dir}/")
    return f"--resume: no complete checkpoint in {where} yet: starting from step 0"


def settings_to_run(cfg: Config, explicit: set[str], resume: ckpt_lib.Checkpoint | None) -> Config:
    """The settings of this launch: a resumed run's own, with the ones given explicitly now on top
    (e.g. more --num-steps). A resumed run keeps its model: a preset or shape given now is refused."""
    if resume is None:
        cfg = copy.deepcopy(cfg)
        context_for_data(cfg, explicit)
        validate(cfg)  # a Config built in code (not by build_config) is checked too
        return cfg
    saved = Config.from_dict(resume.info["config"])
    if "train.preset" in explicit and cfg.train.preset != saved.train.preset:
        raise UserError(f"--resume: the checkpoint {resume.path} is a {saved.train.preset} model; --preset "
                        f"{cfg.train.preset} cannot change it. Drop --preset, or start a new run.")
    for path in sorted(explicit):
        section, key = path.split(".", 1)
        new_value = cfg.get(path)
        if path == "optim.optimizer" and new_value != saved.optim.optimizer:
            raise UserError(f"--resume: the checkpoint {resume.path} was trained with --optimizer "
                            f"{saved.optim.optimizer}; its optimizer state does not fit {new_value}. Drop --optimizer, "
                            "or start a new run.")
        if section == "model" and key in SHAPE_KEYS + ("family",) and new_value != saved.get(path):
            raise UserError(f"--resume: the checkpoint {resume.path} has model.{key} = {saved.get(path)}, but "
                            f"{new_value} was asked for. A resumed run keeps its model shape: drop that setting, "
                            "or start a new run.")
        setattr(getattr(saved, section), key, copy.deepcopy(new_value))
    saved.train.resume = cfg.train.resume
    keep_run_batch(saved, resume.info["config"].get("train", {}), explicit)
    # The layout and profiling belong to this launch, not to the run: a run resumes in any layout.
    saved.parallel, saved.profile = copy.deepcopy(cfg.parallel), copy.deepcopy(cfg.profile)
    validate(saved)
    if resume.step >= saved.train.num_steps:  # before the run folder's records are rewritten
        raise NothingToTrain(resume,f"--resume: the checkpoint {resume.path} is at step {resume.step}, which already reaches "
                        f"--num-steps {saved.train.num_steps}: nothing to train. Pass a larger --num-steps (e.g. "
                        f"{resume.step + saved.train.num_steps}).")
    left = saved.train.num_steps - resume.step
    check_profiler_fits(saved.profile, left, f"the resumed run has {left} steps left (--num-steps "
                        f"{saved.train.num_steps} − checkpoint step {resume.step})",
                        "Raise --num-steps, or lower --profile-wait and --profile-warmup.")
    return saved


# The model settings --init-from may still set: they change how it trains, not what it computes.
INIT_FROM_FREE = ("dropout",)


def model_from_hf(cfg: Config, explicit: set[str]) -> tuple[Config, dict[str, torch.Tensor], Tokenizer]:
    """--init-from HF_DIR: the model settings, weights and tokenizer of a transformers folder
    (gptrain.export.load_hf_model). Model settings given explicitly must agree with the folder's."""
    from gptrain.export import load_hf_model

    pad = cfg.model.pad_vocab_multiple if "model.pad_vocab_multiple" in explicit else None
    model_cfg, state, tokenizer = load_hf_model(cfg.train.init_from, pad_vocab_multiple=pad)
    cfg = copy.deepcopy(cfg)
    for path in sorted(p for p in explicit if p.startswith("model.")):
        key = path.split(".", 1)[1]
        if key in INIT_FROM_FREE:
            setattr(model_cfg, key, cfg.get(path))
        elif getattr(model_cfg, key) != cfg.get(path):
            raise UserError(f"--init-from {cfg.train.init_from}: its model has {key} = {getattr(model_cfg, key)}, "
                            f"but {flag_of(path)} {cfg.get(path)} was given. Drop {flag_of(path)}: the shape and "
                            "options come from the folder.")
    cfg.model = model_cfg
    if "data.tokenizer" not in explicit and not cfg.data.dataset and not cfg.data.train_shards:
        cfg.data.tokenizer = tokenizer.spec  # raw text is tokenized with the model's own tokenizer
    context_for_data(cfg, explicit | {"model.max_position_embeddings"})
    return cfg, state, tokenizer


def context_for_data(cfg: Config, explicit: set[str]) -> None:
    """The context follows the data: a --seq-len longer than the preset's context raises the context,
    unless --max-position-embeddings was given (then a conflict stays an error)."""
    seq_len, m = cfg.data.seq_len, cfg.model
    if seq_len is not None and seq_len > m.max_position_embeddings and "model.max_position_embeddings" not in explicit:
        m.max_position_embeddings = seq_len


def keep_run_batch(saved: Config, recorded: dict[str, Any], explicit: set[str]) -> None:
    """A run keeps its global batch in any layout: the accumulation per process is derived again, unless
    this launch sets the batch itself."""
    t = saved.train
    if "global_batch_size" not in recorded and recorded.get("grad_accum_steps"):
        # Written before --global-batch-size existed, when --grad-accum-steps counted over all ranks.
        t.global_batch_size = recorded["batch_size"] * recorded["grad_accum_steps"]
    if "train.grad_accum_steps" in explicit and "train.global_batch_size" not in explicit:
        t.global_batch_size = None
    elif "train.grad_accum_steps" not in explicit:
        t.grad_accum_steps = None


class NothingToTrain(UserError):
    """The checkpoint to resume already reaches --num-steps. An error for `--resume CHECKPOINT`; for a bare,
    relaunch-safe `--resume` or `--resume RUN_FOLDER` the run is simply complete (gptrain.trainer.train
    returns it as finished)."""

    def __init__(self, checkpoint: ckpt_lib.Checkpoint, message: str):
        super().__init__(message)
        self.checkpoint = checkpoint

    def checkpoint_named(self, resume: str | None) -> bool:
        """Whether --resume named this checkpoint itself (not 'latest', not a run folder to continue)."""
        return bool(resume) and resume != "latest" and Path(resume).resolve() == self.checkpoint.path.resolve()


# ---------------------------------------------------------------------------------------- data
def dataset_to_train_on(cfg: Config, explicit: set[str], resume: ckpt_lib.Checkpoint | None) -> Config:
    """A resumed run goes on with its own data, unless new data is given now (raw text or --data)."""
    if resume is None or "data.dataset" in explicit:
        return cfg
    cfg = copy.deepcopy(cfg)
    raw_given = sorted(explicit & set(RAW_DATA_PATHS))
    if raw_given and (cfg.data.train_files or cfg.data.use_toy_data):
        cfg.data.dataset = None  # raw text to prepare with the settings given now: the run goes on with it
    elif raw_given:
        raise UserError(f"--resume: the run trained on the prepared dataset {cfg.data.dataset or '?'}, so "
                        f"{', '.join(flag_of(p) for p in raw_given)} would have no text to prepare. Add "
                        "--train-data FILE... to continue on new text, or drop them.")
    elif not cfg.data.dataset:  # the data it was trained on (a raw-text run's prepared cache)
        cfg.data.dataset = resume.info.get("dataset_dir")
    return cfg


def open_training_data(cfg: Config, explicit: set[str], resume: ckpt_lib.Checkpoint | None, dist: DistInfo,
                       console) -> TokenDataset:
    """Open the data (gptrain.data.dataset.open_dataset): rank 0 first, preparing raw text and scanning token
    ids when needed (the others wait for it, or for its error), then the other ranks."""
    # A vocabulary given now bounds the data's ids here; a resumed model's is checked in resolve_plan, after
    # the tokenizer (the likelier mismatch, and the clearer message).
    fixed_vocab = cfg.model.vocab_size if "model.vocab_size" in explicit else None
    # A tokenizer named now (or recorded by the resumed run): checked against the data's, or the one that
    # made token files that carry none.
    own_data = resume is not None and not explicit & {"data.dataset", "data.train_shards", "data.train_files",
                                                      "data.use_toy_data"}
    named = cfg.data.tokenizer if ("data.tokenizer" in explicit or own_data) else None
    wants_samples = cfg.train.sample_tokens > 0

    def open_(is_main: bool) -> TokenDataset:
        return open_dataset(cfg.data, vocab_size=fixed_vocab, tokenizer=named, console=console, is_main=is_main,
                            samples=wants_samples)

    if not dist.enabled:
        return open_(True)
    opened: dict[str, TokenDataset] = {}
    _on_rank0(dist, lambda: bool(opened.setdefault("data", open_(True))))
    return opened["data"] if "data" in opened else open_(False)


def _on_rank0(dist: DistInfo, work) -> Any:
    import torch.distributed as torch_dist

    result: list[Any] = [None]
    if dist.is_main:
        try:
            result = [("ok", work())]
        except UserError as e:
            result = [("error", str(e))]
    torch_dist.broadcast_object_list(result, src=0, group=dist.control_group)
    kind, value = result[0]
    if kind == "error":
        raise UserError(value)
    return value


# ---------------------------------------------------------------------------------------- the plan
def resolve_plan(cfg: Config, explicit: set[str], resume: ckpt_lib.Checkpoint | None, data: TokenDataset,
                 dist: DistInfo, device: torch.device, precision: str,
                 init: tuple[dict[str, torch.Tensor], Tokenizer] | None = None) -> Plan:
    """The pure step: nothing is read or written here; every derived value is decided once.
    `init`: the weights and tokenizer of --init-from (gptrain.plan.model_from_hf)."""
    cfg = copy.deepcopy(cfg)
    m, t = cfg.model, cfg.train
    if resume is not None:
        check_resumed_tokenizer(resume, data)
    if init is not None:
        from gptrain.export import check_vocab_fits

        check_vocab_fits(m.vocab_size, data.vocab_size, model_tokenizer=init[1],
                         data_tokenizer=(data.meta or {}).get("tokenizer"), model_name=f"--init-from {t.init_from}",
                         data_name=f"the dataset {data.dir or data.description}")
    # The vocabulary: the dataset's, unless set (and then large enough for the data's ids).
    if "model.vocab_size" in explicit or resume is not None or init is not None:
        if m.vocab_size < data.vocab_size:
            raise UserError(f"the dataset {data.dir} uses {data.vocab_size} token ids but the model has --vocab-size "
                            f"{m.vocab_size}. Raise --vocab-size to at least {data.vocab_size} (or leave it out to "
                            "take the dataset's).")
    else:
        m.vocab_size = data.vocab_size
    # What the data was tokenized with, not the default spec (None: token files without a tokenizer).
    cfg.data.tokenizer = data.tokenizer.spec if data.tokenizer is not None else None
    if data.tokenizer is not None:
        check_sample_prompts(cfg, data.tokenizer)
    if cfg.data.seq_len is None:
        cfg.data.seq_len = m.max_position_embeddings
    batch = batch_layout(t, dist)
    t.grad_accum_steps, t.global_batch_size = batch.grad_accum, batch.global_batch
    # The run folder: a resumed run continues its own; a new one gets its name now.
    if resume is not None:
        run_dir = resumed_run_dir(resume, cfg, explicit)
        t.run_name, run_id = resume.info["run_name"], resume.info["run_id"]
    else:
        t.run_name = t.run_name or new_run_name()
        run_id = new_run_id()
        run_dir = Path(t.runs_dir) / t.run_name
    checkpoint_dir = Path(t.checkpoint_dir) if t.checkpoint_dir else run_dir / "checkpoints"
    loss_chunk_size = resolve_loss_chunk_size(t.loss_chunk_size, device, dist.layout.tp > 1)
    validate_layout(dist.layout, m, device.type, backend_for(device), precision)  # heads, d_ff, vocab vs --tp
    return Plan(cfg, frozenset(explicit), resume, data, run_id, run_dir, checkpoint_dir, batch, precision,
                loss_chunk_size, init[0] if init is not None else None)


def batch_layout(t, dist: DistInfo) -> BatchLayout:
    """This rank's share of the batch. --grad-accum-steps counts micro-batches per process (the original
    tool's meaning); --global-batch-size fixes the sequences per step in every layout instead."""
    dp, micro = dist.dp_world, t.batch_size
    if t.global_batch_size is None:
        return BatchLayout(micro, t.grad_accum_steps or 1, dp, dist.dp_rank)
    per_step = micro * dp
    if t.global_batch_size % per_step:
        lower, higher = per_step * max(1, t.global_batch_size // per_step), per_step * (t.global_batch_size // per_step + 1)
        raise UserError(f"--global-batch-size {t.global_batch_size} is not a multiple of --batch-size {micro} × {dp} "
                        f"data-parallel process(es) = {per_step} sequences per micro-step. Use --global-batch-size "
                        f"{lower} or {higher}, or another --batch-size.")
    accum = t.global_batch_size // per_step
    if t.grad_accum_steps is not None and t.grad_accum_steps != accum:
        raise UserError(f"--global-batch-size {t.global_batch_size} needs {accum} micro-batches per process "
                        f"(--batch-size {micro} × {dp} data-parallel process(es)), but --grad-accum-steps is "
                        f"{t.grad_accum_steps}. Give one of the two.")
    return BatchLayout(micro, accum, dp, dist.dp_rank)


def resumed_run_dir(resume: ckpt_lib.Checkpoint, cfg: Config, explicit: set[str]) -> Path:
    """The folder a resume continues: the checkpoint's own run folder, or --runs-dir/<its run name> for a
    checkpoint kept elsewhere (never a folder recorded at save time: --runs-dir decides where runs live)."""
    info = resume.info
    run_dir = run_dir_for_resume(resume.path, info, cfg.train.runs_dir)
    name = cfg.train.run_name
    if "train.run_name" in explicit and name not in (info["run_name"], run_dir.name):
        raise UserError(f"--resume continues the run {info['run_name']} ({run_dir}), not --run-name {name}. Drop "
                        f"--run-name, or start {name} as a new run without --resume.")
    return run_dir


def check_resumed_tokenizer(resume: ckpt_lib.Checkpoint, data: TokenDataset) -> None:
    """A resumed model must go on reading the token ids it was trained on."""
    saved = resume.info.get("tokenizer") or {}
    if data.tokenizer is None or saved.get("fingerprint") is None:
        return  # token files without a tokenizer: the ids are the files' own
    if saved.get("fingerprint") != data.tokenizer.fingerprint():
        raise UserError(f"--resume: the checkpoint {resume.path} was trained with the tokenizer {saved.get('spec')}, "
                        f"but the dataset {data.dir} is tokenized with {data.tokenizer.spec}. Resume on data prepared "
                        f"with the run's tokenizer (its dataset was {resume.info.get('dataset_dir')}), or start a new "
                        "run.")


def check_sample_prompts(cfg: Config, tokenizer: Tokenizer) -> None:
    """Prompts the tokenizer cannot encode (a character-level vocabulary) end the run here, not mid-run."""
    if cfg.train.sample_tokens <= 0:
        return
    prompts = [cfg.train.sample_prompt]
    if cfg.tracking.sample_every != 0:
        prompts += list(cfg.tracking.sample_prompts)
    for prompt in prompts:
        tokenizer.encode(prompt)


# ---------------------------------------------------------------------------------------- before any work
def check_memory(plan: Plan, dist: DistInfo, device: torch.device) -> None:
    """A model and batch that cannot fit in this device's memory (host RAM on CPU) are refused with the
    estimate, before anything is allocated (gptrain.memory_estimate: a lower bound)."""
    from gptrain.model import GPT

    m, t, layout = plan.cfg.model, plan.cfg.train, dist.layout
    n_params = count_parameters(lambda: GPT(m))
    optimizer_bytes = 8.0  # AdamW's two moments; Muon's one momentum is less
    estimate = estimate_training_memory(
        n_params, m.n_layers, m.d_model, plan.seq_len, t.batch_size, m.padded_vocab_size, plan.precision,
        optimizer_bytes, d_ff=m.d_ff, loss_chunk_tokens=plan.loss_chunk_size or None,
        activation_checkpointing=plan.cfg.parallel.ac == "full", model_shards=layout.dp_shard * layout.tp)
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if device.type == "cpu" else 1
    check_fits(estimate, available_memory(device),
               f"the model ({n_params / 1e6:,.1f}M parameters, --batch-size {t.batch_size} × {plan.seq_len} tokens) "
               f"on {device}", processes=local_processes)


def discard_if_unused(run_dir: Path) -> None:
    """Remove a run folder that holds nothing but the lock file (made by a start that then failed)."""
    try:
        if {p.name for p in run_dir.iterdir()} <= {LOCK_FILE}:
            for p in run_dir.iterdir():
                p.unlink()
            run_dir.rmdir()
    except OSError:
        pass  # not there, or another process writes it now: leave it


def lock_run_folder(plan: Plan, dist: DistInfo) -> RunLock | None:
    """One writer per run: rank 0 locks the run folder (an OS lock the kernel drops when the process dies)
    before anything is written; a second launch of the same run stops here, naming the live process.
    A bare --resume that found no checkpoint starts the run afresh, in its folder if one was begun."""
    must_be_new = plan.resume is None and not plan.cfg.train.resume
    held: dict[str, RunLock] = {}

    def lock() -> bool:
        held["lock"] = open_run_dir(plan.run_dir.parent, plan.run_dir.name, must_be_new=must_be_new)
        return True

    if not dist.enabled:
        lock()
    else:  # the other ranks stop with rank 0's message instead of waiting for a collective's timeout
        _on_rank0(dist, lock)
    return held.get("lock")
