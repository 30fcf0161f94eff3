"""Every setting of a training run: its sections, presets, TOML files and command-line overrides.

Each setting is declared once, as a dataclass field with `gptrain.settings.setting(...)`, in the
module that owns its section: the model's in model.py, the optimizer's in optim.py, the data's in
data/dataset.py, the rest below. The command line (cli.py), TOML loading, the checks, config.json
and the README's flag table are all generated from those declarations.

Precedence, lowest first: dataclass defaults < model family (its model options and optimizer settings)
< model preset (a shape) < TOML file < command line.
Each setting has one dotted name (`optim.lr`) used in TOML (`[optim] lr = 3e-4`) and in config.json.
"""

from __future__ import annotations

import dataclasses
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptrain.data.dataset import DataConfig
from gptrain.distributed import largest_divisor
from gptrain.errors import UserError
from gptrain.model import ATTENTION_BACKENDS, PRESETS, ModelConfig, model_settings_for
from gptrain.optim import OptimConfig, optim_settings_for
from gptrain.run_folder import check_run_name
from gptrain.settings import (
    check_all,
    coerce,
    declaration,
    declared_fields,
    flags_of,
    markdown_rows,
    setting,
    suggest,
)

__all__ = ["Config", "DataConfig", "ModelConfig", "OptimConfig", "TrainConfig", "TrackingConfig", "ParallelConfig",
           "ProfileConfig", "build_config", "validate", "flag_of", "SECTIONS"]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    preset: str = setting("tiny", "model preset (shape and family)", flags=("--preset", "--model"),
                          choices=tuple(PRESETS))
    num_steps: int = setting(300, "optimizer steps", flags=("--num-steps", "--max-steps"), ge=1)
    batch_size: int = setting(16, "sequences per micro-batch (per process)", ge=1)
    # The original tool's meaning: per process. A batch that stays the same in every layout is
    # --global-batch-size, from which the accumulation is derived.
    grad_accum_steps: int | None = setting(
        None, "micro-batches per optimizer step on each process: tokens per step = --batch-size × --seq-len × "
        "this × data-parallel processes", ge=1, default_text="1, or what --global-batch-size needs")
    global_batch_size: int | None = setting(
        None, "sequences per optimizer step over all processes, the same in every layout (the accumulation per "
        "process is derived: this / (--batch-size × data-parallel processes), which must divide)", ge=1,
        default_text="--batch-size × --grad-accum-steps × data-parallel processes")
    seed: int = setting(1337, "seed of the initialisation and the data order", flags=("--seed", "--data-seed"))
    device: str = setting("auto", "auto, cpu, cuda, cuda:N")
    precision: str = setting("auto", "auto = bf16 on capable GPUs, fp32 on CPU", choices=PRECISIONS)
    compile: bool = setting(False, "torch.compile the model")
    attention_backend: str = setting(
        "auto", "scaled_dot_product_attention backend for training and its evaluations; auto: PyTorch picks per "
        "call (generation stays auto)", choices=ATTENTION_BACKENDS)
    # gptrain.chunked_loss: the LM head and cross-entropy a chunk of tokens at a time, never all the logits.
    loss_chunk_size: int | None = setting(
        None, "compute the loss (LM head and cross-entropy) this many tokens at a time, never holding all the "
        "logits; not with tensor parallel or fp16", ge=0, hint="(0: off)",
        default_text="1024 on CPU, off on CUDA and under tensor parallel")
    # gptrain.host_memory; the measurement is in benchmarks/RESULTS.md ("host memory").
    reuse_host_memory: bool = setting(True, "CPU: keep freed tensor memory for reuse instead of faulting in new "
                                      "pages every step", negate="--no-reuse-host-memory")
    eval_every: int = setting(100, "evaluate every N steps (and at the end)", flags=("--eval-every", "--eval-steps"),
                              ge=0, hint="(0: at the end only)")
    eval_tokens: int = setting(65536, "validation tokens per evaluation", ge=1,
                               flags=("--eval-tokens", "--val-max-tokens"))
    log_every: int = setting(10, "log every N steps", ge=1)
    save_every: int = setting(0, "checkpoint every N steps (and at the end, and on interruption)", ge=0,
                              hint="(0: at the end only)")
    keep_last: int = setting(3, "checkpoints to keep (plus the best by val loss)", ge=1)
    max_skipped_steps: int = setting(20, "stop the run as diverged after this many steps in a row whose loss or "
                                     "gradient norm was not finite (each one skipped, never applied)", ge=1)
    runs_dir: str = setting("runs", "folder that holds run folders")
    run_name: str | None = setting(None, "name of this run's folder", default_text="date-time and a short id")
    checkpoint_dir: str | None = setting(None, "where checkpoints go", flags=("--checkpoint-path", "--checkpoint-dir"),
                                         default_text="runs/<name>/checkpoints")
    init_from: str | None = setting(None, "start from the weights, shape and tokenizer of a transformers folder "
                                    "(GPT-2 or NanoChat, e.g. a downloaded gpt2, or any gptrain export)", metavar="HF_DIR")
    export_hf: str | None = setting(None, "at the end of training, also export the final model as a transformers "
                                    "folder here (gptrain export)", metavar="DIR")
    # Set by --resume [PATH] (cli.py: its value is optional, which no declared flag has).
    resume: str | None = setting(None, "continue a run: 'latest' or a run folder / checkpoint", cli=False)
    sample_prompt: str = setting("def ", "prompt of the sample printed at the end")
    sample_tokens: int = setting(64, "tokens generated per text sample (the final one and those logged at "
                                 "evaluations)", flags=("--sample-tokens", "--sample-new-tokens"), ge=0,
                                 hint="(0: no samples)")
    progress: str = setting("auto", "console display", choices=("auto", "bar", "plain"))

    def check(self) -> None:
        if self.run_name is not None:
            check_run_name(self.run_name, "--run-name")  # one folder inside --runs-dir, from every source


TRACKERS = ("jsonl", "wandb", "tensorboard")
WANDB_MODES = ("auto", "online", "offline", "disabled")


@dataclass
class TrackingConfig:
    """Where runs are mirrored (metrics.jsonl is always written) and what is sent there."""

    trackers: list[str] = setting(help="trackers to run besides metrics.jsonl (comma lists allowed, e.g. "
                                  "--trackers jsonl,wandb,tensorboard)", default_factory=lambda: ["jsonl"])
    use_wandb: bool = setting(False, "stream the run to Weights & Biases (same as --trackers wandb)")
    wandb_project: str = setting("gptrain", "W&B project")
    wandb_entity: str | None = setting(None, "W&B entity (user or team)", default_text="your default")
    wandb_run_name: str | None = setting(None, "W&B display name", default_text="the run name")
    wandb_group: str | None = setting(None, "W&B group")
    wandb_tags: list[str] = setting(help="W&B tags (space or comma separated)", default_factory=list)
    wandb_notes: str | None = setting(None, "W&B notes")
    wandb_mode: str = setting("auto", "auto: online when an API key is configured, else offline", choices=WANDB_MODES)
    wandb_init_timeout: float = setting(30.0, "seconds an online W&B start may take before falling back to offline",
                                        gt=0)
    wandb_log_checkpoints: str = setting("off", "checkpoints as W&B artifacts: reference records path, size and "
                                         "checksum; upload copies them", choices=("off", "reference", "upload"))
    sample_prompts: list[str] = setting(help="prompts of the text samples logged at evaluations",
                                        default_factory=lambda: ["def ", "class ", "import "])
    sample_every: int | None = setting(None, "log text samples every N steps", ge=0, hint="(0: never)",
                                       default_text="at every evaluation")
    alert_spike_factor: float = setting(2.0, "alert when the train loss exceeds this multiple of its running "
                                        "average", ge=0, hint="(0: off)")
    alert_interval: float = setting(600.0, "seconds between two alerts of the same kind", ge=0, cli=False)

    def enabled(self) -> list[str]:
        """The trackers to run, jsonl first: --trackers (comma lists allowed) plus --use-wandb."""
        names = ["jsonl"] + [n.strip() for item in self.trackers for n in item.split(",") if n.strip()]
        if self.use_wandb:
            names.append("wandb")
        return list(dict.fromkeys(names))

    def tags(self) -> list[str]:
        return [t.strip() for item in self.wandb_tags for t in item.split(",") if t.strip()]

    def check(self) -> None:
        unknown = [n for n in self.enabled() if n not in TRACKERS]
        if unknown:
            raise UserError(f"unknown tracker '{unknown[0]}'.{suggest(unknown[0], TRACKERS)} "
                            f"--trackers takes a comma list of {', '.join(TRACKERS)}.")


AC_MODES = ("none", "full", "selective")


@dataclass
class ParallelConfig:
    """How processes launched by torchrun share the work (see gptrain.distributed).

    World size = dp_replicate × dp_shard × tp. -1 (the default for dp_replicate) takes whatever
    the other degrees leave, so a plain `torchrun --nproc-per-node=N` is N DDP replicas.
    """

    dp_replicate: int = setting(-1, "DDP replicas (HSDP replicas with --dp-shard or --tp)", ge=-1,
                                hint="(or -1: the processes the other degrees leave)", default_text="-1")
    dp_shard: int = setting(1, "FSDP2 shards of parameters, gradients and optimizer state", ge=1)
    tp: int = setting(1, "tensor-parallel degree (splits heads and MLP)", flags=("--tp", "--tensor-parallel"), ge=1)
    use_tensor_parallel: bool = setting(False, "all processes form one tensor-parallel group (same as --tp "
                                        "WORLD_SIZE)")
    ac: str = setting("none", "recompute activations in backward per block: full, or selective (keeps "
                      "matmul/attention outputs)", flags=("--ac", "--activation-checkpoint"), choices=AC_MODES)
    timeout: float = setting(600.0, "seconds a collective waits for a peer before the job stops with an error",
                             flags=("--dist-timeout",), gt=0)

    def check(self) -> None:
        if self.dp_replicate == 0:
            raise UserError("--dp-replicate must be at least 1 (or -1: the processes the other degrees leave), "
                            "got 0.")


@dataclass
class ProfileConfig:
    """torch.profiler schedule, NVTX ranges and CUDA memory snapshots (gptrain.profiling)."""

    enabled: bool = setting(False, "trace steps with torch.profiler into runs/<name>/profile/ (Perfetto / "
                            "TensorBoard)", flags=("--use-profiler", "--profile"))
    wait: int = setting(5, "profiler: steps skipped before each cycle", flags=("--profile-wait",), ge=0)
    warmup: int = setting(2, "profiler: steps traced but discarded per cycle", flags=("--profile-warmup",), ge=0)
    active: int = setting(3, "profiler: recorded steps per cycle", flags=("--profile-active",), ge=1)
    repeat: int = setting(1, "profiler: cycles", flags=("--profile-repeat",), ge=0, hint="(0: until the end)")
    dir: str | None = setting(None, "where traces go", flags=("--profile-dir",), default_text="runs/<name>/profile")
    nvtx: bool = setting(False, "NVTX ranges for Nsight Systems (data, forward, backward, optimizer, checkpoint)")
    memory_snapshot: bool = setting(False, "CUDA: record allocations and write a snapshot for "
                                    "pytorch.org/memory_viz into the profile folder")


SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "train": TrainConfig,
                             "tracking": TrackingConfig, "parallel": ParallelConfig, "profile": ProfileConfig}
# Settings of older gptrain versions that a resumed checkpoint's config may still hold: new name, or None (gone).
RENAMED: dict[str, str | None] = {"tracking.sample_tokens": None}


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

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        """A config.json / checkpoint config back into settings (names of older versions mapped or dropped)."""
        cfg = cls()
        for section, values in d.items():
            for key, value in (values or {}).items():
                path = RENAMED.get(f"{section}.{key}", f"{section}.{key}")
                if path in PATHS:
                    set_path(cfg, path, value)
        return cfg

    def get(self, path: str) -> Any:
        section, key = path.split(".", 1)
        return getattr(getattr(self, section), key)


def _field(path: str) -> dataclasses.Field:
    section, key = path.split(".", 1)
    return next(f for f in dataclasses.fields(SECTIONS[section]) if f.name == key)


PATHS: list[str] = [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in declared_fields(cls)]


def all_paths() -> list[str]:
    return list(PATHS)


def flag_of(path: str) -> str:
    """The command-line flag of a setting (its first name), for messages; TOML-only settings by their path."""
    f = _field(path)
    return flags_of(f)[0] if declaration(f).cli else path


def set_path(cfg: Config, path: str, value: Any) -> None:
    section, key = path.split(".", 1)
    setattr(getattr(cfg, section), key, coerce(SECTIONS[section], key, value, f"setting '{path}'"))


# ---------------------------------------------------------------------------------------- TOML
def flatten_toml(d: dict[str, Any], source: str) -> dict[str, Any]:
    """{'optim': {'lr': 1e-3}} → {'optim.lr': 1e-3}, rejecting unknown names with a suggestion."""
    out: dict[str, Any] = {}
    for section, values in d.items():
        if section not in SECTIONS or not isinstance(values, dict):
            # Allow a bare key when it names exactly one setting (lr = 1e-3 at the top level).
            matches = [p for p in PATHS if p.split(".", 1)[1] == section]
            if len(matches) == 1 and not isinstance(values, dict):
                out[matches[0]] = values
                continue
            candidates = list(SECTIONS) if isinstance(values, dict) else PATHS + list(SECTIONS)
            raise UserError(f"{source}: unknown setting '{section}'.{suggest(section, candidates)} "
                            f"Sections are [{'], ['.join(SECTIONS)}].")
        for key, value in values.items():
            path = f"{section}.{key}"
            if path not in PATHS:
                raise UserError(f"{source}: unknown setting '{path}'.{suggest(path, PATHS)}")
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


# ---------------------------------------------------------------------------------------- building
def build_config(overrides: dict[str, Any], toml_path: str | None = None) -> tuple[Config, set[str]]:
    """Defaults < family < preset < TOML < overrides. Returns the config and the set of explicitly set paths.

    Every value is converted to its declared type here; `validate` (choices, bounds, cross-setting
    rules) checks them all, wherever they came from, when the run is planned (gptrain.plan).
    """
    explicit: dict[str, Any] = {}
    if toml_path:
        explicit.update(load_toml(toml_path))
    explicit.update(overrides)
    cfg = Config()
    preset = coerce(TrainConfig, "preset", explicit.get("train.preset", cfg.train.preset), "setting 'train.preset'")
    if preset not in PRESETS:
        raise UserError(f"unknown preset '{preset}'.{suggest(preset, list(PRESETS))} Presets: {', '.join(PRESETS)}.")
    family = explicit.get("model.family")
    family = None if family is None else coerce(ModelConfig, "family", family, "setting 'model.family'")
    for key, value in model_settings_for(preset, family).items():
        set_path(cfg, f"model.{key}", value)
    for key, value in optim_settings_for(cfg.model.family).items():  # the family's optimizer recipe
        set_path(cfg, f"optim.{key}", value)
    for path, value in explicit.items():
        set_path(cfg, path, value)
    # The model's derived defaults (d_ff = 4·d_model) are computed once, by ModelConfig itself.
    cfg.model = ModelConfig(**{**dataclasses.asdict(cfg.model),
                               "d_ff": cfg.model.d_ff if "model.d_ff" in explicit else None})
    check_data_source(cfg, set(explicit))
    return cfg, set(explicit)


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
    # --tokenizer-name goes with token files that carry no tokenizer (a nanoGPT folder without meta.pkl,
    # token shards): it names the one that made them. A prepared folder (meta.json) has its own.
    prepared = (Path(cfg.data.dataset) / "meta.json").is_file()
    given = [flag_of(p) for p in RAW_DATA_PATHS if p in explicit and (p != "data.tokenizer" or prepared)]
    if given:
        raise UserError(f"--data {cfg.data.dataset} is a prepared dataset (its tokenizer and validation split were "
                        f"fixed by `gptrain prepare`), so {', '.join(given)} would be ignored. Drop "
                        f"{'them' if len(given) > 1 else 'it'}, or drop --data to prepare raw files with "
                        "--train-data instead.")


def validate(cfg: Config) -> None:
    """Every declared check of every setting, then the rules that tie settings together.

    Each failure names the setting (by its flag) and the fix. Checks that need the data or the
    world size are made when the run is planned (gptrain.plan) and the layout resolved.
    """
    for name in SECTIONS:
        obj = getattr(cfg, name)
        check_all(obj, lambda f, name=name: flag_of(f"{name}.{f.name}"))
        if hasattr(obj, "check"):
            obj.check()
    m, t = cfg.model, cfg.train
    if m.d_model % m.n_heads != 0:
        raise UserError(f"d_model ({m.d_model}) must be divisible by n_heads ({m.n_heads}). "
                        f"Change --d-model or --n-heads (e.g. --n-heads {largest_divisor(m.d_model, m.n_heads)}).")
    if cfg.data.use_toy_data and cfg.data.train_files:
        raise UserError("--use-toy-data and --train-data both choose the training text. Pass one of them.")
    seq_len = cfg.data.seq_len
    if seq_len is not None and seq_len > m.max_position_embeddings:
        raise UserError(f"--seq-len {seq_len} is longer than the model's context ({m.max_position_embeddings} "
                        f"positions). Lower --seq-len or raise --max-position-embeddings.")
    tensor_parallel = cfg.parallel.tp != 1 or cfg.parallel.use_tensor_parallel
    if t.loss_chunk_size and tensor_parallel:
        raise UserError("--loss-chunk-size does not work with tensor parallel: the LM head's weight is split over "
                        "the ranks there. Drop one of the two.")
    if t.loss_chunk_size and t.precision == "fp16":
        raise UserError("--loss-chunk-size does not work with --precision fp16: its gradient products are made in "
                        "fp16 before the gradient scaler's factor and can overflow where the scaler cannot help. "
                        "Use --precision bf16, or --loss-chunk-size 0.")
    if t.compile and cfg.parallel.ac != "none" and tensor_parallel:
        raise UserError("--compile with activation checkpointing (--ac) under tensor parallel fails inside "
                        "torch.compile in this PyTorch (checkpointed DTensor activations). Drop --compile or --ac "
                        "for tensor-parallel runs; each works on its own.")
    check_profiler_fits(cfg.profile, t.num_steps, f"--num-steps is {t.num_steps}",
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


# The model settings that define the shape of the weights: changing one on resume is an error.
SHAPE_KEYS = ("vocab_size", "max_position_embeddings", "n_layers", "n_heads", "d_model", "d_ff", "bias",
              "tie_embeddings", "pad_vocab_multiple", "pos_embedding", "norm_weight", "value_embeds")


# ---------------------------------------------------------------------------------------- README
README_BEGIN = "<!-- settings table: generated by `python -m gptrain.config --readme`; do not edit by hand -->"
README_END = "<!-- end of settings table -->"


def settings_markdown() -> str:
    """The README's flag table, one section per settings dataclass, from the declarations alone."""
    lines = []
    for name, cls in SECTIONS.items():
        rows = markdown_rows(cls, name)
        if rows:
            lines += [f"**{name}**", "", "| flag | meaning | default |", "| --- | --- | --- |", *rows, ""]
    return "\n".join(lines).rstrip() + "\n"


def readme_with_settings(readme: str) -> str:
    if README_BEGIN not in readme or README_END not in readme:
        raise ValueError("README.md has no settings-table markers")
    head, rest = readme.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    return f"{head}{README_BEGIN}\n{settings_markdown()}{README_END}{tail}"


if __name__ == "__main__":  # python -m gptrain.config --readme [README.md]: rewrite the table in place
    if len(sys.argv) < 2 or sys.argv[1] != "--readme":
        raise SystemExit("usage: python -m gptrain.config --readme [README.md]")
    target = Path(sys.argv[2] if len(sys.argv) > 2 else "README.md")
    target.write_text(readme_with_settings(target.read_text()))
    print(f"updated the settings table in {target}")
