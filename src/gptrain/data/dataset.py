"""Where the training tokens come from, and `open_dataset`: the one call that opens them.

Sources, by what the settings name (``--data-mode auto`` tells them apart; an explicit mode
only checks that the data is what it says):

    text         raw text (--train-data FILE..., --use-toy-data, or nothing: the default corpus),
                 tokenized into a cache folder on first use and reused afterwards; or a folder
                 made by `gptrain prepare` (--data DIR)
    nanogpt      a nanoGPT folder (--data DIR with train.bin, val.bin, maybe meta.pkl)
    llmc         llm.c .bin shards (--data 'DIR/*.bin', a folder of them, or --train-shards FILE...)
    npy          .npy token shards (--train-npy FILE... --val-npy FILE..., or a folder / glob);
                 `fineweb_npy` is the original tool's name for it

Token data from other tools is read in place, memory-mapped. Its validation tokens are the
val shards given (--val-npy), else the shards whose names say val (llm.c's and build-nanoGPT's
*_val_* files), else the last tokens of the training shards, held out (--val-fraction).
Its vocabulary is --vocab-size, else the named tokenizer's, else meta.pkl's, else the data's
largest id + 1; ids beyond it are an error, found before training starts.
"""

from __future__ import annotations

import glob
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptrain.data.format import (
    SHARD_SUFFIXES,
    TokenShards,
    cache_root,
    expand_shard_paths,
    id_range_of,
    is_nanogpt_dir,
    is_val_shard_name,
    nanogpt_meta,
    open_bin,
    open_shard,
    read_meta,
    shard_kind,
    shards_fingerprint,
)
from gptrain.data.prepare import PrepareConfig, TextSettings, dataset_cache_dir, prepare_dataset
from gptrain.data.sources import default_corpus_files, write_toy_corpus
from gptrain.data.tokenizer import (
    Tokenizer,
    build_tokenizer,
    dataset_tokenizer,
    needs_training,
    normalize_spec,
    tokenizer_meta,
)
from gptrain.errors import UserError
from gptrain.settings import setting

DATA_MODES = ("auto", "text", "nanogpt", "llmc", "npy", "fineweb_npy")
HELD_OUT_MIN_TOKENS = 100_000  # a held-out validation tail is at least this (at most 10% of the tokens)


@dataclass
class DataConfig(TextSettings):
    """Where the training tokens come from (and, for raw text, how they are made: TextSettings)."""

    dataset: str | None = setting(None, "the training tokens: a folder made by `gptrain prepare`, a nanoGPT folder "
                                  "(train.bin, val.bin), or llm.c / .npy token shards (a folder or a glob)",
                                  flags=("--data", "--dataset"), default_text="raw files or the default corpus")
    data_mode: str = setting("auto", "what the data is: auto (detect it), text (raw text or a prepared folder), "
                             "nanogpt, llmc (llm.c .bin shards), npy (= fineweb_npy: .npy shards)",
                             choices=DATA_MODES)
    train_shards: list[str] = setting(help="token shards to train on, read in place: .npy or llm.c .bin files, "
                                      "folders or globs", default_factory=list,
                                      flags=("--train-npy", "--train-shards", "--train-bin"))
    val_shards: list[str] = setting(help="token shards for validation (default: the *val* shards beside the "
                                    "training ones, else the training tokens' tail)", default_factory=list,
                                    flags=("--val-npy", "--val-shards", "--val-bin"))
    train_files: list[str] = setting(help="raw text files/dirs to train on (prepared into a cache)",
                                     default_factory=list, flags=("--train-data",))
    val_files: list[str] = setting(help="raw text files/dirs for validation", default_factory=list,
                                   flags=("--val-data",))
    use_toy_data: bool = setting(False, "train on a small built-in synthetic corpus")
    seq_len: int | None = setting(None, "tokens per training sequence", ge=1, default_text="the context length")


# ---------------------------------------------------------------------------------------- raw text
def prepare_config_for(cfg: DataConfig) -> PrepareConfig | None:
    """How to build the dataset for these settings; None when the tokens exist already."""
    if cfg.dataset or cfg.train_shards:
        return None
    if cfg.use_toy_data:
        toy = cache_root() / "toy_corpus.jsonl"  # one document per line
        if not toy.is_file():
            toy.parent.mkdir(parents=True, exist_ok=True)
            write_toy_corpus(toy)
        inputs = [str(toy)]
    elif cfg.train_files:
        inputs = list(cfg.train_files)
    else:
        inputs = []  # prepare's default: the standard library's .py files
    prep = PrepareConfig(
        inputs=inputs,
        out_dir="",
        tokenizer=cfg.tokenizer,
        val_inputs=list(cfg.val_files),
        val_fraction=cfg.val_fraction,
        max_tokens=cfg.max_tokens,
        text_field=cfg.text_field,
        line_docs=cfg.line_docs,
    )
    prep.out_dir = str(dataset_cache_dir(prep))
    return prep


def resolve_dataset(cfg: DataConfig, console, is_main: bool = True) -> Path:
    """The dataset folder to train on (a prepared or nanoGPT one), preparing raw text first when needed.

    Token shards have no folder: use `open_dataset` for every kind of data.
    """
    if cfg.train_shards or source_kind(cfg) == "shards":
        raise UserError("token shards are read in place and have no dataset folder (open them with open_dataset).")
    prep = prepare_config_for(cfg)
    if prep is None:
        path = Path(cfg.dataset).expanduser()
        if not path.is_dir():
            raise UserError(f"dataset directory {path} does not exist. Create it with "
                            f"`gptrain prepare INPUT... --out {path}`, or pass raw files with --train-data.")
        read_meta(path)
        return path
    if not cfg.train_files and not cfg.use_toy_data:
        console.print(f"no data given: training on the Python standard library's source files "
                      f"({len(default_corpus_files())} files) — pass --data DIR or --train-data FILE... for "
                      "your own text")
    if is_main:
        prepare_dataset(prep)
    return Path(prep.out_dir)


# ---------------------------------------------------------------------------------------- what the data is
def source_kind(cfg: DataConfig) -> str:
    """"raw" (text to prepare), "prepared" (a `gptrain prepare` folder), "nanogpt" or "shards"; checked
    against --data-mode. Reads no tokens."""
    mode = "npy" if cfg.data_mode == "fineweb_npy" else cfg.data_mode
    if cfg.train_shards and cfg.dataset:
        raise UserError(f"--data {cfg.dataset} and --train-npy both name the training tokens. Give one of them.")
    if cfg.train_shards and (cfg.train_files or cfg.use_toy_data):
        raise UserError("--train-npy (token shards) and --train-data / --use-toy-data (text) both name the training "
                        "data. Give one of them.")
    if cfg.val_shards and not (cfg.train_shards or cfg.dataset):
        raise UserError("--val-npy names validation shards but no training shards are given. Add --train-npy "
                        "FILE... (or --data with a folder or glob of shards).")
    if cfg.train_shards:
        kind = "shards"
    elif cfg.dataset:
        path = Path(cfg.dataset).expanduser()
        if path.is_dir():
            if (path / "meta.json").exists():
                kind = "prepared"
            elif is_nanogpt_dir(path):
                kind = "nanogpt"
            elif any(p.suffix in SHARD_SUFFIXES for p in path.iterdir()):
                kind = "shards"
            else:
                raise UserError(f"{path} holds no dataset: no meta.json (a `gptrain prepare` folder), no train.bin "
                                "and val.bin (nanoGPT), no .npy or llm.c .bin shards. Create it with `gptrain "
                                f"prepare INPUT... --out {path}`, or pass raw text with --train-data.")
        elif path.is_file() or glob.has_magic(str(cfg.dataset)):
            kind = "shards"
        else:
            raise UserError(f"dataset directory {path} does not exist. Create it with "
                            f"`gptrain prepare INPUT... --out {path}`, or pass raw files with --train-data.")
    else:
        kind = "raw"
    if cfg.val_shards and kind != "shards":
        raise UserError(f"--val-npy names validation shards, but the training data is {_KIND_WORDS[kind]}. "
                        "Validation shards go with training shards (--train-npy).")
    allowed = {"auto": _KIND_WORDS.keys(), "text": ("raw", "prepared"), "nanogpt": ("nanogpt",),
               "llmc": ("shards",), "npy": ("shards",)}[mode]
    if kind not in allowed:
        how = {"text": "--train-data FILE... (raw text) or --data DIR (a `gptrain prepare` folder)",
               "nanogpt": "--data DIR (a folder with train.bin and val.bin)",
               "llmc": "--train-shards FILE... or --data 'DIR/*.bin' (llm.c shards)",
               "npy": "--train-npy FILE... (.npy shards)"}[mode]
        raise UserError(f"--data-mode {cfg.data_mode} expects {how}, but the data given is {_KIND_WORDS[kind]}. "
                        "Fix: pass that data, or use --data-mode auto.")
    return kind


_KIND_WORDS = {"raw": "raw text", "prepared": "a `gptrain prepare` folder", "nanogpt": "a nanoGPT folder",
               "shards": "token shards"}


# ---------------------------------------------------------------------------------------- opening
@dataclass
class TokenDataset:
    """Everything the trainer and evaluation need of a dataset, whatever its format."""

    train: TokenShards
    val: TokenShards
    vocab_size: int  # ids the model must embed: every id in the data, and every id of its tokenizer
    tokenizer: Tokenizer | None  # None: token files that came without one (no samples)
    kind: str  # "prepared", "nanogpt", "shards"
    description: str  # one line for the run header
    fingerprint: str  # changes when the tokens do
    meta: dict[str, Any] = field(default_factory=dict)  # meta.json, or the same keys for other formats
    dir: Path | None = None  # the dataset folder (prepared / nanoGPT); None for shards named one by one

    @property
    def eot_id(self) -> int | None:
        return self.tokenizer.eot_id if self.tokenizer is not None else self.meta.get("eot_id")


def _stderr(line: str = "") -> None:
    print(line, file=sys.stderr, flush=True)


class _Printer:
    def __init__(self, log):
        self.print = log


def open_dataset(cfg: DataConfig, *, vocab_size: int | None = None, tokenizer: str | None = None, console=None,
                 is_main: bool = True, dataset_dir: str | Path | None = None, samples: bool = True) -> TokenDataset:
    """Open the data the settings name: prepare raw text if needed, read token files in place.

    ``vocab_size``: the model's vocabulary when the user set it (--vocab-size); every id must be
    below it. ``tokenizer``: a tokenizer spec the user named (--tokenizer-name), for token files
    that carry none (it must cover their ids), checked against a prepared folder's.
    ``dataset_dir``: a folder already resolved by `resolve_dataset` (e.g. raw text prepared by
    rank 0 of a multi-process run), opened as it is. ``console``: where notes go (``.print``).
    ``samples``: whether text samples are wanted (a note says when they cannot be made).
    """
    log = console.print if console is not None else _stderr
    note = log if samples else None
    if dataset_dir is not None:
        path = Path(dataset_dir)
        kind = "nanogpt" if is_nanogpt_dir(path) else "prepared"
    else:
        kind = source_kind(cfg)
        path = None
        if kind in ("raw", "prepared"):
            path = resolve_dataset(cfg, console or _Printer(log), is_main)
            kind = "prepared"
        elif kind == "nanogpt":
            path = Path(cfg.dataset).expanduser()
    if kind == "prepared":
        return _open_prepared(path, vocab_size, tokenizer)
    if kind == "nanogpt":
        return _open_nanogpt(path, vocab_size, tokenizer, note)
    return _open_shards(cfg, vocab_size, tokenizer, log, note)


def _open_prepared(path: Path, vocab_size: int | None, named: str | None) -> TokenDataset:
    meta = read_meta(path)
    tok = dataset_tokenizer(path, meta)
    spec = meta["tokenizer"]["spec"]
    if named is not None and normalize_spec(named) != spec:
        raise UserError(f"--tokenizer-name {named}: the dataset {path} was prepared with {spec}. Drop "
                        "--tokenizer-name to train on it, or prepare the text again with the tokenizer you want.")
    data_vocab = int(meta["vocab_size"])
    _check_vocab_flag(vocab_size, data_vocab, f"the dataset {path} uses {data_vocab} token ids")
    train, val = (TokenShards([open_bin(path / f"{s}.bin", meta["dtype"])], [path / f"{s}.bin"])
                  for s in ("train", "val"))
    # the raw inputs' fingerprint (what runs recorded before other formats existed), else the files'
    fingerprint = (meta.get("inputs") or {}).get("fingerprint") or shards_fingerprint([path / "train.bin",
                                                                                       path / "val.bin"])
    return TokenDataset(train, val, data_vocab, tok, "prepared",
                        f"{path} ({spec}, train {len(train):,} tokens, val {len(val):,})", fingerprint, meta, path)


def _open_nanogpt(path: Path, vocab_size: int | None, named: str | None, note) -> TokenDataset:
    meta = nanogpt_meta(path, vocab_size)
    files = [path / "train.bin", path / "val.bin"]
    train, val = (TokenShards([open_bin(f, "<u2")], [f]) for f in files)
    tok = dataset_tokenizer(path, meta)
    from_pkl = meta["meta_pkl"]
    if tok is not None and named is not None:
        raise UserError(f"--tokenizer-name {named}: the nanoGPT dataset {path} has its own character table "
                        "(meta.pkl). Drop --tokenizer-name.")
    meta_vocab = int(meta["vocab_size"]) if from_pkl else None
    vocab, tok = _settle_vocab([train, val], vocab_size, named, tok, meta_vocab, note)
    meta.update(vocab_size=vocab, eot_id=tok.eot_id if tok is not None else None,
                tokenizer=tokenizer_meta(tok) if tok is not None and not from_pkl else meta["tokenizer"])
    fingerprint = shards_fingerprint(files + ([path / "meta.pkl"] if from_pkl else []))
    what = "meta.pkl" if from_pkl else "no meta.pkl"
    desc = (f"nanoGPT folder {path} (uint16, {what}, {_vocab_words(vocab, vocab_size, tok, meta_vocab)}, "
            f"train {len(train):,} tokens, val {len(val):,})")
    return TokenDataset(train, val, vocab, tok, "nanogpt", desc, f"nanogpt:{fingerprint}", meta, path)


def open_token_shards(paths: list[Path], data_mode: str = "auto") -> tuple[TokenShards, list[str]]:
    """The shards as one token sequence (memory-mapped), and each shard's kind ("npy" or "llmc"),
    checked against an explicit --data-mode."""
    mode = "npy" if data_mode == "fineweb_npy" else data_mode
    kinds = []
    for p in paths:
        kinds.append(shard_kind(p))
        if mode in ("npy", "llmc") and kinds[-1] != mode:
            words = {"npy": "a .npy file", "llmc": "an llm.c shard"}
            raise UserError(f"--data-mode {data_mode}: {p} is {words[kinds[-1]]}, not {words[mode]}. Fix: pass "
                            "shards of that kind, or use --data-mode auto.")
    return TokenShards([open_shard(p, k) for p, k in zip(paths, kinds, strict=True)], paths), kinds


def check_token_ids(tokens: TokenShards, limit: int, what: str, fix: str) -> int:
    """Every id of every shard is in 0..limit-1 (one chunked scan per file, cached); returns the largest."""
    return _scan_ids(tokens, [(limit, what, fix)])


def _scan_ids(tokens: TokenShards, limits: list[tuple[int, str, str]]) -> int:
    largest = 0
    for part, path in zip(tokens.parts, tokens.paths, strict=True):
        lo, hi = id_range_of(part, path)
        where = path or "the tokens"
        if lo < 0:
            raise UserError(f"{where} holds the negative token id {lo}: it is not a file of token ids. Fix: re-make "
                            "it with the tokenizer's ids (non-negative integers).")
        for limit, what, fix in limits:
            if hi >= limit:
                raise UserError(f"{where} holds the token id {hi}, beyond {what}. Fix: {fix}.")
        largest = max(largest, hi)
    return largest


def _open_shards(cfg: DataConfig, vocab_size: int | None, named: str | None, log, note) -> TokenDataset:
    train_paths = expand_shard_paths(cfg.train_shards or [cfg.dataset], "--train-npy" if cfg.train_shards else
                                     "--data")
    if cfg.val_shards:
        val_paths = expand_shard_paths(cfg.val_shards, "--val-npy")
    else:
        val_paths = [p for p in train_paths if is_val_shard_name(p)]
        train_paths = [p for p in train_paths if not is_val_shard_name(p)]
        if not train_paths:
            raise UserError(f"only validation shards were found ({val_paths[0].name}, ...): the training shards are "
                            "missing. Fix: pass the training shards too (e.g. a folder holding both).")
    overlap = {p.resolve() for p in train_paths} & {p.resolve() for p in val_paths}
    if overlap:
        raise UserError(f"{sorted(overlap)[0]} is both a training and a validation shard. Fix: keep the "
                        "validation shards out of the training ones.")
    train, kinds = open_token_shards(train_paths, cfg.data_mode)
    val, val_kinds = open_token_shards(val_paths, cfg.data_mode) if val_paths else (None, [])
    vocab, tok = _settle_vocab([train] + ([val] if val is not None else []), vocab_size, named, None, None, note)
    held_out = 0
    if val is None:
        total = len(train)
        held_out = max(int(cfg.val_fraction * total), min(HELD_OUT_MIN_TOKENS, total // 10))
        if held_out < 2 or total - held_out < 2:
            raise UserError(f"the token shards hold {total:,} tokens, too few to hold out validation tokens. Fix: "
                            "give validation shards with --val-npy, or more training tokens.")
        train, val = train.span(0, total - held_out), train.span(total - held_out, total)
        log(f"no validation shards: the last {held_out:,} tokens of the training shards are held out for "
            "validation (--val-fraction); pass --val-npy FILE... to use your own")
    kind_names = sorted(set(kinds + val_kinds))
    dtypes = sorted({a.dtype.name for a in train.parts + val.parts})
    meta = {"format": "+".join(kind_names), "format_version": 0, "vocab_size": vocab,
            "eot_id": tok.eot_id if tok is not None else None, "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
            "tokenizer": tokenizer_meta(tok) if tok is not None else None,
            "splits": {"train": {"tokens": len(train), "documents": None, "shards": [str(p) for p in train_paths]},
                       "val": {"tokens": len(val), "documents": None, "shards": [str(p) for p in val_paths],
                               "held_out_from_train": held_out}}}
    labels = {"npy": ".npy", "llmc": "llm.c"}
    desc = (f"{' + '.join(labels[k] for k in kind_names)} shards ({', '.join(dtypes)}, "
            f"{_vocab_words(vocab, vocab_size, tok, None)}): train {len(train):,} tokens in {len(train_paths)} "
            f"shard(s), val {len(val):,} tokens" + (f" in {len(val_paths)} shard(s)" if val_paths else " held out"))
    fingerprint = shards_fingerprint(train_paths + val_paths) + (f":held-out-{held_out}" if held_out else "")
    return TokenDataset(train, val, vocab, tok, "shards", desc, f"shards:{fingerprint}", meta, None)


def _check_vocab_flag(vocab_size: int | None, needed: int, what: str) -> None:
    if vocab_size is not None and vocab_size < needed:
        raise UserError(f"{what} but the model has --vocab-size {vocab_size}. Raise --vocab-size to at least "
                        f"{needed} (or leave it out to take the dataset's).")


def _vocab_words(vocab: int, vocab_size: int | None, tok: Tokenizer | None, pkl_vocab: int | None) -> str:
    source = ("meta.pkl" if pkl_vocab == vocab else f"tokenizer {tok.spec}" if tok is not None and
              tok.vocab_size == vocab else "largest id + 1")
    return f"vocab {vocab} ({source})" + (f", model --vocab-size {vocab_size}" if vocab_size else "")


def _settle_vocab(sources: list[TokenShards], vocab_size: int | None, named: str | None,
                  tok: Tokenizer | None, pkl_vocab: int | None, note) -> tuple[int, Tokenizer | None]:
    """The vocabulary of token files and their tokenizer, with every id checked against it.

    The ids are scanned once per file (in chunks; the result is cached), so an id beyond the
    vocabulary is an error now, not an index error (or a CUDA assert) in the middle of training.
    """
    if tok is None and named is not None:
        if needs_training(named):
            raise UserError(f"--tokenizer-name {named}: token files come tokenized, a new BPE cannot describe "
                            "their ids. Name the tokenizer that made them (e.g. gpt2, hf:/path/tokenizer.json), or "
                            "leave it out (training needs none; samples are skipped).")
        tok = build_tokenizer(named)
    limits = []  # (ids allowed, what sets it, the fix)
    if vocab_size is not None:
        limits.append((vocab_size, f"--vocab-size {vocab_size}", "raise --vocab-size above it"))
    if pkl_vocab is not None:
        limits.append((pkl_vocab, f"its meta.pkl's vocab_size {pkl_vocab}", "re-make the dataset with nanoGPT's "
                       "prepare.py"))
    if tok is not None:
        limits.append((tok.vocab_size, f"the {tok.vocab_size} ids of the tokenizer {tok.spec}", "name the tokenizer "
                       "that made these tokens with --tokenizer-name, or leave it out"))
    largest = max(_scan_ids(tokens, limits) for tokens in sources)
    vocab = max(largest + 1, pkl_vocab or 0, tok.vocab_size if tok is not None else 0)
    _check_vocab_flag(vocab_size, vocab, f"the data and its tokenizer use {vocab} token ids")
    if tok is None and note is not None:
        note("no tokenizer comes with these tokens: training and evaluation need none, text samples are skipped "
            "(name the tokenizer that made them with --tokenizer-name to get samples)")
    return vocab, tok

