"""Every setting of a training run: dataclasses, presets, TOML files and command-line overrides.

Precedence, lowest first: dataclass defaults < model preset < TOML file < command line.
Each setting has one dotted name (`optim.lr`) used in TOML (`[optim] lr = 3e-4`) and in
config.json, and one or more command-line flags listed in `OPTIONS` (the original tool's
names next to gptrain's own).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from gptrain.errors import UserError
from gptrain.model import ATTENTION_BACKENDS, PRESETS, ModelConfig


@dataclass
class DataConfig:
    dataset: str | None = None  # a prepared dataset dir; None → raw files or the default corpus
    train_files: list[str] = field(default_factory=list)
    val_files: list[str] = field(default_factory=list)
    tokenizer: str = "bpe:4096"
    val_fraction: float = 0.005
    max_tokens: int | None = None
    text_field: str = "text"
    line_docs: bool = False
    use_toy_data: bool = False
    seq_len: int | None = None  # default: the model's context length


@dataclass
class OptimConfig:
    lr: float = 2e-3
    min_lr: float | None = None  # default lr / 10
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # 0 disables clipping
    lr_scheduler: str = "cosine"
    warmup_steps: int = 30
    decay_fraction: float = 0.2  # wsd: the last fraction of steps decays linearly


@dataclass
class TrainConfig:
    preset: str = "tiny"
    num_steps: int = 300
    batch_size: int = 16
    # Micro-batches per optimizer step summed over data-parallel ranks (each rank runs its share);
    # None: one per data-parallel rank. The global batch is batch_size × grad_accum_steps in every layout.
    grad_accum_steps: int | None = None
    seed: int = 1337
    device: str = "auto"
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    compile: bool = False
    attention_backend: str = "auto"  # auto | flash | cudnn | efficient | math (gptrain.model.ATTENTION_BACKENDS)
    # The loss (LM head + cross-entropy) this many tokens at a time, without keeping the logits
    # (gptrain.chunked_loss); 0: the plain head and F.cross_entropy; None: auto (chunked_loss.resolve_loss_chunk_size).
    loss_chunk_size: int | None = None
    # CPU: make glibc reuse freed tensor memory instead of faulting in fresh pages every step
    # (gptrain.host_memory; 3–18% of a step of the CPU reference configuration, for ~20% more peak RSS).
    reuse_host_memory: bool = True
    eval_every: int = 100
    eval_tokens: int = 65536
    log_every: int = 10
    save_every: int = 0  # 0: only at the end (and on interruption)
    keep_last: int = 3
    runs_dir: str = "runs"
    run_name: str | None = None
    checkpoint_dir: str | None = None  # default runs/<name>/checkpoints
    resume: str | None = None  # "latest" or a checkpoint / run path
    sample_prompt: str = "def "
    sample_tokens: int = 64
    progress: str = "auto"  # auto | bar | plain


TRACKERS = ("jsonl", "wandb", "tensorboard")


@dataclass
class TrackingConfig:
    """Where runs are mirrored (metrics.jsonl is always written) and what is sent there."""

    trackers: list[str] = field(default_factory=lambda: ["jsonl"])  # any of TRACKERS; commas allowed
    use_wandb: bool = False  # same as adding wandb to trackers (the original tool's flag)
    wandb_project: str = "gptrain"
    wandb_entity: str | None = None
    wandb_run_name: str | None = None  # default: the gptrain run name
    wandb_group: str | None = None
    wandb_tags: list[str] = field(default_factory=list)
    wandb_notes: str | None = None
    wandb_mode: str = "auto"  # auto (online with an API key, else offline) | online | offline | disabled
    wandb_init_timeout: float = 30.0  # seconds an online start may take before falling back to offline
    wandb_log_checkpoints: str = "off"  # off | reference | upload
    sample_prompts: list[str] = field(default_factory=lambda: ["def ", "class ", "import "])
    sample_every: int | None = None  # None: at every evaluation; 0: never
    sample_tokens: int = 32
    alert_spike_factor: float = 2.0  # a train loss this many times its running average raises an alert
    alert_interval: float = 600.0  # seconds between two alerts of the same kind

    def enabled(self) -> list[str]:
        """The trackers to run, jsonl first: --trackers (comma lists allowed) plus --use-wandb."""
        names = ["jsonl"] + [n.strip() for item in self.trackers for n in item.split(",") if n.strip()]
        if self.use_wandb:
            names.append("wandb")
        return list(dict.fromkeys(names))

    def tags(self) -> list[str]:
        return [t.strip() for item in self.wandb_tags for t in item.split(",") if t.strip()]


AC_MODES = ("none", "full", "selective")


@dataclass
class ParallelConfig:
    """How processes launched by torchrun share the work (see gptrain.distributed).

    World size = dp_replicate × dp_shard × tp. -1 (the default for dp_replicate) takes whatever
    the other degrees leave, so a plain `torchrun --nproc-per-node=N` is N DDP replicas.
    """

    dp_replicate: int = -1  # DDP replicas (HSDP replicas when combined with dp_shard or tp)
    dp_shard: int = 1  # FSDP2 shards
    tp: int = 1  # tensor-parallel degree
    use_tensor_parallel: bool = False  # the original tool's flag: every process in one tensor-parallel group
    ac: str = "none"  # activation checkpointing per block: none | full | selective
    timeout: float = 600.0  # seconds a collective may wait for a peer before the job stops with an error


@dataclass
class ProfileConfig:
    """torch.profiler schedule, NVTX ranges and CUDA memory snapshots (gptrain.profiling)."""

    enabled: bool = False
    wait: int = 5  # steps skipped before each profiling cycle
    warmup: int = 2  # steps traced but discarded
    active: int = 3  # steps recorded
    repeat: int = 1  # cycles (0: until training ends)
    dir: str | None = None  # default runs/<name>/profile
    nvtx: bool = False  # NVTX ranges around data, forward, backward, optimizer, checkpoint
    memory_snapshot: bool = False  # CUDA only: a snapshot for pytorch.org/memory_viz


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        cfg = cls()
        for section, values in d.items():
            for key, value in values.items():
                set_path(cfg, f"{section}.{key}", value)
        return cfg


SECTIONS = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "train": TrainConfig,
            "tracking": TrackingConfig, "parallel": ParallelConfig, "profile": ProfileConfig}


@dataclass(frozen=True)
class Option:
    """One setting's command-line face."""

    path: str  # dotted name, e.g. "optim.lr"
    flags: tuple[str, ...]
    help: str
    negate: str | None = None  # a "--no-x" flag that sets a bool to False
    choices: tuple[str, ...] | None = None


OPTIONS: list[Option] = [
    # model
    Option("train.preset", ("--preset", "--model"), f"model preset: {', '.join(PRESETS)}", choices=tuple(PRESETS)),
    Option("model.vocab_size", ("--vocab-size",), "vocabulary size (default: the dataset's)"),
    Option("model.max_position_embeddings", ("--max-position-embeddings", "--context-length"),
           "context length in tokens"),
    Option("model.n_layers", ("--n-layers",), "transformer blocks"),
    Option("model.n_heads", ("--n-heads",), "attention heads"),
    Option("model.d_model", ("--d-model",), "hidden size"),
    Option("model.d_ff", ("--d-ff",), "MLP inner size (default 4·d_model)"),
    Option("model.dropout", ("--dropout",), "dropout probability"),
    Option("model.bias", ("--bias",), "biases in Linear and LayerNorm", negate="--no-bias"),
    Option("model.tie_embeddings", ("--tie-embeddings",), "LM head shares the token embedding",
           negate="--no-tie-embeddings"),
    Option("model.pad_vocab_multiple", ("--pad-vocab-multiple",),
           "pad the embedding rows to a multiple of this (1: no padding)"),
    # data
    Option("data.dataset", ("--data", "--dataset"), "a dataset directory made by `gptrain prepare`"),
    Option("data.train_files", ("--train-data",), "raw text files/dirs to train on (prepared into a cache)"),
    Option("data.val_files", ("--val-data",), "raw text files/dirs for validation"),
    Option("data.tokenizer", ("--tokenizer-name", "--tokenizer"), "tokenizer spec: byte, bpe:N, hf:NAME_OR_PATH, gpt2"),
    Option("data.val_fraction", ("--val-ratio", "--val-fraction"), "fraction of documents held out for validation"),
    Option("data.max_tokens", ("--max-tokens",), "cap on training tokens when preparing raw files"),
    Option("data.text_field", ("--text-field",), "JSON field / parquet column holding the text"),
    Option("data.line_docs", ("--line-docs",), "each non-empty line of a .txt file is one document"),
    Option("data.use_toy_data", ("--use-toy-data",), "train on a small built-in synthetic corpus"),
    Option("data.seq_len", ("--seq-len",), "tokens per training sequence (default: the context length)"),
    # optimizer
    Option("optim.lr", ("--lr", "--learning-rate"), "peak learning rate"),
    Option("optim.min_lr", ("--min-lr",), "final learning rate of cosine/wsd (default lr/10)"),
    Option("optim.beta1", ("--beta1",), "AdamW beta1"),
    Option("optim.beta2", ("--beta2",), "AdamW beta2"),
    Option("optim.eps", ("--adam-eps",), "AdamW epsilon"),
    Option("optim.weight_decay", ("--weight-decay",), "AdamW weight decay (on ≥2-D weights only)"),
    Option("optim.grad_clip", ("--grad-clip",), "clip the global gradient norm to this (0: off)"),
    Option("optim.lr_scheduler", ("--lr-scheduler",), "learning-rate schedule",
           choices=("cosine", "constant", "wsd", "linear")),
    Option("optim.warmup_steps", ("--warmup-steps",), "linear warmup steps"),
    Option("optim.decay_fraction", ("--decay-fraction",), "wsd: fraction of steps spent decaying"),
    # training
    Option("train.num_steps", ("--num-steps", "--max-steps"), "optimizer steps"),
    Option("train.batch_size", ("--batch-size",), "sequences per micro-batch (per process)"),
    Option("train.grad_accum_steps", ("--grad-accum-steps",), "micro-batches per optimizer step, summed over "
           "data-parallel ranks (default: one per rank); the global batch is --batch-size × this in every layout"),
    Option("train.seed", ("--seed", "--data-seed"), "seed of the initialisation and the data order"),
    Option("train.device", ("--device",), "auto, cpu, cuda, cuda:N"),
    Option("train.precision", ("--precision",), "auto (bf16 on capable GPUs, fp32 on CPU), fp32, bf16, fp16",
           choices=("auto", "fp32", "bf16", "fp16")),
    Option("train.compile", ("--compile",), "torch.compile the model"),
    Option("train.attention_backend", ("--attention-backend",), "scaled_dot_product_attention backend for training "
           "and its evaluations: auto (PyTorch picks per call), flash, cudnn, efficient, math (generation stays auto)",
           choices=ATTENTION_BACKENDS),
    Option("train.loss_chunk_size", ("--loss-chunk-size",), "compute the loss (LM head and cross-entropy) this "
           "many tokens at a time, never holding all the logits: less memory and traffic with a large vocabulary "
           "(0: off; default: 1024 on CPU, off on CUDA and under tensor parallel; not with fp16)"),
    Option("train.reuse_host_memory", ("--reuse-host-memory",),
           "CPU: keep freed tensor memory for reuse instead of faulting in new pages every step "
           "(default on; --no-reuse-host-memory: glibc's defaults)", negate="--no-reuse-host-memory"),
    Option("train.eval_every", ("--eval-every", "--eval-steps"),
           "evaluate every N steps (and at the end; 0: at the end only)"),
    Option("train.eval_tokens", ("--eval-tokens",), "validation tokens per evaluation"),
    Option("train.log_every", ("--log-every",), "log every N steps"),
    Option("train.save_every", ("--save-every",), "checkpoint every N steps (0: at the end only)"),
    Option("train.keep_last", ("--keep-last",), "checkpoints to keep (plus the best by val loss)"),
    Option("train.runs_dir", ("--runs-dir",), "folder that holds run folders"),
    Option("train.run_name", ("--run-name",), "name of this run's folder (default: date-time and a short id)"),
    Option("train.checkpoint_dir", ("--checkpoint-path", "--checkpoint-dir"),
           "where checkpoints go (default runs/<name>/checkpoints)"),
    Option("train.sample_prompt", ("--sample-prompt",), "prompt of the sample printed at the end"),
    Option("train.sample_tokens", ("--sample-tokens",), "tokens to generate for that sample (0: no sample)"),
    Option("train.progress", ("--progress",), "console display", choices=("auto", "bar", "plain")),
    # experiment tracking
    Option("tracking.trackers", ("--trackers",), "trackers to run besides metrics.jsonl: wandb, tensorboard "
           "(e.g. --trackers jsonl,wandb,tensorboard)"),
    Option("tracking.use_wandb", ("--use-wandb",), "stream the run to Weights & Biases (same as --trackers wandb)"),
    Option("tracking.wandb_project", ("--wandb-project",), "W&B project"),
    Option("tracking.wandb_entity", ("--wandb-entity",), "W&B entity (user or team; default: your default)"),
    Option("tracking.wandb_run_name", ("--wandb-run-name",), "W&B display name (default: the run name)"),
    Option("tracking.wandb_group", ("--wandb-group",), "W&B group"),
    Option("tracking.wandb_tags", ("--wandb-tags",), "W&B tags (space or comma separated)"),
    Option("tracking.wandb_notes", ("--wandb-notes",), "W&B notes"),
    Option("tracking.wandb_mode", ("--wandb-mode",), "auto: online when an API key is configured, else offline",
           choices=("auto", "online", "offline", "disabled")),
    Option("tracking.wandb_init_timeout", ("--wandb-init-timeout",), "seconds an online W&B start may take "
           "before falling back to offline"),
    Option("tracking.wandb_log_checkpoints", ("--wandb-log-checkpoints",), "checkpoints as W&B artifacts: "
           "reference records path, size and checksum; upload copies them", choices=("off", "reference", "upload")),
    Option("tracking.sample_prompts", ("--sample-prompts",), "prompts of the text samples logged at evaluations"),
    Option("tracking.sample_every", ("--sample-every",), "log text samples every N steps (default: at every "
           "evaluation; 0: never)"),
    Option("tracking.sample_tokens", ("--sample-new-tokens",), "tokens generated per logged sample"),
    Option("tracking.alert_spike_factor", ("--alert-spike-factor",), "alert when the train loss exceeds this "
           "multiple of its running average (0: off)"),
    # multi-process layouts (torchrun), activation checkpointing
    Option("parallel.dp_replicate", ("--dp-replicate",), "DDP replicas (-1: the processes the other degrees "
           "leave)"),
    Option("parallel.dp_shard", ("--dp-shard",), "FSDP2 shards of parameters, gradients and optimizer state"),
    Option("parallel.tp", ("--tp", "--tensor-parallel"), "tensor-parallel degree (splits heads and MLP)"),
    Option("parallel.use_tensor_parallel", ("--use-tensor-parallel",), "all processes form one tensor-parallel "
           "group (same as --tp WORLD_SIZE)"),
    Option("parallel.ac", ("--ac", "--activation-checkpoint"), "recompute activations in backward per block: "
           "full, or selective (keeps matmul/attention outputs)", choices=AC_MODES),
    Option("parallel.timeout", ("--dist-timeout",), "seconds a collective waits for a peer before the job "
           "stops with an error"),
    # profiling
    Option("profile.enabled", ("--use-profiler", "--profile"), "trace steps with torch.profiler into "
           "runs/<name>/profile/ (Perfetto / TensorBoard)"),
    Option("profile.wait", ("--profile-wait",), "profiler: steps skipped before each cycle"),
    Option("profile.warmup", ("--profile-warmup",), "profiler: warmup steps per cycle"),
    Option("profile.active", ("--profile-active",), "profiler: recorded steps per cycle"),
    Option("profile.repeat", ("--profile-repeat",), "profiler: cycles (0: until the end)"),
    Option("profile.dir", ("--profile-dir",), "where traces go (default runs/<name>/profile)"),
    Option("profile.nvtx", ("--nvtx",), "NVTX ranges for Nsight Systems (data, forward, backward, optimizer, "
           "checkpoint)"),
    Option("profile.memory_snapshot", ("--memory-snapshot",), "CUDA: record allocations and write a snapshot "
           "for pytorch.org/memory_viz into the profile folder"),
]

# The original tool's flags that belong to features built later: rejected with a message, never ignored.
NOT_YET_SUPPORTED: dict[str, str] = {
}


def field_type(path: str) -> Any:
    section, key = path.split(".", 1)
    return typing.get_type_hints(SECTIONS[section])[key]


def all_paths() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def suggest(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else ""


def coerce(path: str, value: Any) -> Any:
    """Convert a TOML/JSON/CLI value to the setting's type, or raise UserError."""
    t = field_type(path)
    args = typing.get_args(t)
    optional = type(None) in args
    if optional:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        t = next(a for a in args if a is not type(None))
    try:
        if t is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if t in (int, float) and isinstance(value, bool):
            raise ValueError(value)  # int(True) would be 1: `n_layers = true` is a typo, not a 1-layer model
        if t is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if t is float:
            return float(value)
        if t is str:
            return str(value)
        if typing.get_origin(t) is list:
            return [str(v) for v in (value if isinstance(value, list) else [value])]
    except (TypeError, ValueError):
        shown = json.dumps(value) if isinstance(value, bool) else repr(value)  # TOML's spelling: true, not True
        raise UserError(f"setting '{path}' expects {getattr(t, '__name__', t)}, got {shown}.") from None
    return value


def set_path(cfg: Config, path: str, value: Any) -> None:
    section, key = path.split(".", 1)
    setattr(getattr(cfg, section), key, coerce(path, value))


def flatten_toml(d: dict[str, Any], source: str) -> dict[str, Any]:
    """{'optim': {'lr': 1e-3}} → {'optim.lr': 1e-3}, rejecting unknown names with a suggestion."""
    valid = all_paths()
    out: dict[str, Any] = {}
    for section, values in d.items():
        if section not in SECTIONS or not isinstance(values, dict):
            # Allow a bare key when it names exactly one setting (lr = 1e-3 at the top level).
            matches = [p for p in valid if p.split(".", 1)[1] == section]
            if len(matches) == 1 and not isinstance(values, dict):
                out[matches[0]] = values
                continue
            raise UserError(f"{source}: unknown setting '{section}'.{suggest(section, valid + list(SECTIONS))} "
                            f"Sections are [{'], ['.join(SECTIONS)}].")
        for key, value in values.items():
            path = f"{section}.{key}"
            if path not in valid:
                raise UserError(f"{source}: unknown setting '{path}'.{suggest(path, valid)}")
            out[path] = value
    return out


def load_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {p} does not exist. Pass an existing .toml file to --config.")
    try:
        with p.open("rb") as f:
            return flatten_toml(tomllib.load(f), str(p))
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{p} is not valid TOML: {e}. Fix the file and run again.") from None


def build_config(overrides: dict[str, Any], toml_path: str | None = None) -> tuple[Config, set[str]]:
    """Defaults < preset < TOML < overrides. Returns the config and the set of explicitly set paths."""
    explicit: dict[str, Any] = {}
    if toml_path:
        explicit.update(load_toml(toml_path))
    explicit.update(overrides)
    cfg = Config()
    preset = coerce("train.preset", explicit.get("train.preset", cfg.train.preset))
    if preset not in PRESETS:
        raise UserError(f"unknown preset '{preset}'.{suggest(preset, list(PRESETS))} Presets: {', '.join(PRESETS)}.")
    for key, value in PRESETS[preset].items():
        setattr(cfg.model, key, value)
    cfg.model.d_ff = None  # recomputed from d_model unless set explicitly
    for path, value in explicit.items():
        set_path(cfg, path, value)
    if cfg.model.d_ff is None:
        cfg.model.d_ff = 4 * cfg.model.d_model
    check_data_source(cfg, set(explicit))
    return cfg, set(explicit)


def flag_of(path: str) -> str:
    """The command-line flag of a setting (its first name), for messages."""
    return next((o.flags[0] for o in OPTIONS if o.path == path), path)


# How raw text becomes tokens: fixed once and for all in a prepared dataset (its meta.json).
RAW_DATA_PATHS = ("data.train_files", "data.val_files", "data.use_toy_data", "data.tokenizer", "data.val_fraction",
                  "data.max_tokens", "data.text_field", "data.line_docs")


def check_data_source(cfg: Config, explicit: set[str]) -> None:
    """--data names a prepared dataset: settings that would prepare raw text must not be given with it.

    Checked on the explicit settings, not the values: a resumed raw-text run gets its dataset folder
    from the checkpoint and keeps its raw settings in the config, which is not a contradiction.
    """
    if not cfg.data.dataset or "data.dataset" not in explicit:
        return
    given = [flag_of(p) for p in RAW_DATA_PATHS if p in explicit]
    if given:
        raise UserError(f"--data {cfg.data.dataset} is a prepared dataset (its tokenizer and validation split were "
                        f"fixed by `gptrain prepare`), so {', '.join(given)} would be ignored. Drop "
                        f"{'them' if len(given) > 1 else 'it'}, or drop --data to prepare raw files with "
                        "--train-data instead.")


def validate(cfg: Config) -> None:
    """Checks that need no data: each failure names the setting and the fix."""
    m, t, o = cfg.model, cfg.train, cfg.optim
    if m.d_model % m.n_heads != 0:
        raise UserError(f"d_model ({m.d_model}) must be divisible by n_heads ({m.n_heads}). "
                        f"Change --d-model or --n-heads (e.g. --n-heads {largest_divisor(m.d_model, m.n_heads)}).")
    for name, value in [("n_layers", m.n_layers), ("n_heads", m.n_heads), ("d_model", m.d_model),
                        ("max_position_embeddings", m.max_position_embeddings), ("d_ff", m.d_ff)]:
        if value is None or value < 1:
            raise UserError(f"model.{name} must be a positive integer, got {value}.")
    if not 0.0 <= m.dropout < 1.0:
        raise UserError(f"--dropout must be in [0, 1), got {m.dropout}.")
    if m.pad_vocab_multiple < 1:
        raise UserError(f"--pad-vocab-multiple must be at least 1 (1: no padding), got {m.pad_vocab_multiple}.")
    if cfg.data.use_toy_data and cfg.data.train_files:
        raise UserError("--use-toy-data and --train-data both choose the training text. Pass one of them.")
    seq_len = cfg.data.seq_len
    if seq_len is not None and seq_len > m.max_position_embeddings:
        raise UserError(f"--seq-len {seq_len} is longer than the model's context ({m.max_position_embeddings} "
                        f"positions). Lower --seq-len or raise --max-position-embeddings.")
    if seq_len is not None and seq_len < 1:
        raise UserError(f"--seq-len must be at least 1, got {seq_len}.")
    for name, value in [("num_steps", t.num_steps), ("batch_size", t.batch_size),
                        ("grad_accum_steps", 1 if t.grad_accum_steps is None else t.grad_accum_steps),
                        ("log_every", t.log_every),
                        ("keep_last", t.keep_last)]:
        if value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {value}.")
    if t.eval_tokens < 1:
        raise UserError(f"--eval-tokens must be at least 1, got {t.eval_tokens}.")
    for name, value, zero in [("eval_every", t.eval_every, "at the end only"),
                              ("save_every", t.save_every, "at the end only"),
                              ("sample_tokens", t.sample_tokens, "no sample")]:
        if value < 0:
            raise UserError(f"--{name.replace('_', '-')} must be ≥ 0 (0: {zero}), got {value}.")
    validate_optim(o)
    if o.warmup_steps < 0:
        raise UserError(f"--warmup-steps must be ≥ 0, got {o.warmup_steps}.")
    if not 0.0 <= o.decay_fraction <= 1.0:
        raise UserError(f"--decay-fraction must be in [0, 1], got {o.decay_fraction}.")
    if o.lr_scheduler not in ("cosine", "constant", "wsd", "linear"):
        raise UserError(f"unknown --lr-scheduler '{o.lr_scheduler}'. Choose cosine, constant, wsd or linear.")
    validate_tracking(cfg.tracking)
    validate_parallel(cfg)
    if t.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise UserError(f"unknown --precision '{t.precision}'. Choose auto, fp32, bf16 or fp16.")
    if t.attention_backend not in ATTENTION_BACKENDS:
        raise UserError(f"unknown --attention-backend '{t.attention_backend}'. Choose "
                        f"{', '.join(ATTENTION_BACKENDS[:-1])} or {ATTENTION_BACKENDS[-1]}.")
    validate_loss_chunks(cfg)


def validate_loss_chunks(cfg: Config) -> None:
    chunk, p = cfg.train.loss_chunk_size, cfg.parallel
    if chunk is not None and chunk < 0:
        raise UserError(f"--loss-chunk-size must be ≥ 0 (0: off), got {chunk}.")
    if chunk and (p.tp != 1 or p.use_tensor_parallel):
        raise UserError("--loss-chunk-size does not work with tensor parallel: the LM head's weight is split over "
                        "the ranks there. Drop one of the two.")
    if chunk and cfg.train.precision == "fp16":
        raise UserError("--loss-chunk-size does not work with --precision fp16: its gradient products are made in "
                        "fp16 before the gradient scaler's factor and can overflow where the scaler cannot help. "
                        "Use --precision bf16, or --loss-chunk-size 0.")


def validate_optim(o: OptimConfig) -> None:
    if o.lr <= 0:
        raise UserError(f"--lr must be positive, got {o.lr}.")
    if o.min_lr is not None and not 0.0 <= o.min_lr <= o.lr:
        problem = "is negative" if o.min_lr < 0 else f"is above --lr ({o.lr:g})"
        raise UserError(f"--min-lr {o.min_lr:g} {problem}; use a value between 0 and --lr ({o.lr:g}).")
    for name, value in [("beta1", o.beta1), ("beta2", o.beta2)]:
        if not 0.0 <= value < 1.0:
            raise UserError(f"--{name} must be in [0, 1), got {value:g} (AdamW's defaults: --beta1 0.9 "
                            "--beta2 0.95).")
    if o.eps <= 0:
        raise UserError(f"--adam-eps must be positive, got {o.eps:g} (default 1e-8).")
    if o.weight_decay < 0:
        raise UserError(f"--weight-decay must be ≥ 0 (0: no decay), got {o.weight_decay:g}.")
    if o.grad_clip < 0:
        raise UserError(f"--grad-clip must be ≥ 0 (0: no clipping), got {o.grad_clip:g}.")


def largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, at_most + 1) if n % d == 0)


# The model settings that define the shape of the weights: changing one on resume is an error.
SHAPE_KEYS = ("vocab_size", "max_position_embeddings", "n_layers", "n_heads", "d_model", "d_ff", "bias",
              "tie_embeddings", "pad_vocab_multiple")


def validate_tracking(tr: TrackingConfig) -> None:
    unknown = [n for n in tr.enabled() if n not in TRACKERS]
    if unknown:
        raise UserError(f"unknown tracker '{unknown[0]}'.{suggest(unknown[0], list(TRACKERS))} "
                        f"--trackers takes a comma list of {', '.join(TRACKERS)}.")
    if tr.wandb_mode not in ("auto", "online", "offline", "disabled"):
        raise UserError(f"unknown --wandb-mode '{tr.wandb_mode}'. Choose auto, online, offline or disabled.")
    if tr.wandb_log_checkpoints not in ("off", "reference", "upload"):
        raise UserError(f"unknown --wandb-log-checkpoints '{tr.wandb_log_checkpoints}'. Choose off, reference "
                        "or upload.")
    if tr.sample_every is not None and tr.sample_every < 0:
        raise UserError(f"--sample-every must be ≥ 0 (0: never), got {tr.sample_every}.")
    if tr.sample_tokens < 1:
        raise UserError(f"--sample-new-tokens must be at least 1, got {tr.sample_tokens}. To log no text samples, "
                        "use --sample-every 0.")
    if tr.wandb_init_timeout <= 0:
        raise UserError(f"--wandb-init-timeout must be positive, got {tr.wandb_init_timeout}.")


def validate_parallel(cfg: Config) -> None:
    """Layout settings that are wrong whatever the world size (the rest: gptrain.distributed.resolve_layout)."""
    p, pr = cfg.parallel, cfg.profile
    for name, value in [("dp_replicate", p.dp_replicate), ("dp_shard", p.dp_shard), ("tp", p.tp)]:
        if value == 0 or value < -1:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer (or -1: the processes left), "
                            f"got {value}.")
    if p.ac not in AC_MODES:
        raise UserError(f"unknown --ac '{p.ac}'. Choose none, full or selective.")
    if p.timeout <= 0:
        raise UserError(f"--dist-timeout must be positive (seconds), got {p.timeout}.")
    if cfg.train.compile and p.ac != "none" and (p.tp != 1 or p.use_tensor_parallel):
        raise UserError("--compile with activation checkpointing (--ac) under tensor parallel fails inside "
                        "torch.compile in this PyTorch (checkpointed DTensor activations). Drop --compile or --ac "
                        "for tensor-parallel runs; each works on its own.")
    for name, value in [("wait", pr.wait), ("warmup", pr.warmup), ("repeat", pr.repeat)]:
        if value < 0:
            raise UserError(f"--profile-{name} must be ≥ 0, got {value}.")
    if pr.active < 1:
        raise UserError(f"--profile-active must be at least 1, got {pr.active}.")
    check_profiler_fits(pr, cfg.train.num_steps, f"--num-steps is {cfg.train.num_steps}",
                        "Raise --num-steps to at least {cycle}, or lower --profile-wait and --profile-warmup.")


def check_profiler_fits(pr: ProfileConfig, steps: int, steps_are: str, fix: str) -> None:
    """One profiling cycle must end within the `steps` that will run: a cut-short cycle records nothing,
    or a partial one averaged as if it were whole. `steps_are` and `fix` (which may name `{cycle}`) word
    the message for the command at hand."""
    cycle = pr.wait + pr.warmup + pr.active
    if pr.enabled and steps < cycle:
        raise UserError(f"--use-profiler needs {cycle} steps for one profiling cycle (--profile-wait {pr.wait} + "
                        f"--profile-warmup {pr.warmup} + --profile-active {pr.active}), but {steps_are}. "
                        + fix.format(cycle=cycle))
