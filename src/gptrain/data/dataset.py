"""Where the training tokens come from: a prepared dataset, raw files, the toy corpus or the default corpus.

Everything but a prepared dataset is tokenized into a cache folder on first use and reused
afterwards (`gptrain prepare` recognises identical inputs and settings).
"""

from __future__ import annotations

from pathlib import Path

from gptrain.config import DataConfig
from gptrain.data.prepare import PrepareConfig, cache_root, dataset_cache_dir, prepare_dataset, read_meta
from gptrain.data.sources import default_corpus_files, write_toy_corpus
from gptrain.errors import UserError


def prepare_config_for(cfg: DataConfig) -> PrepareConfig | None:
    """How to build the dataset for these settings; None when a prepared dataset is given."""
    if cfg.dataset:
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
    """The prepared dataset directory to train on, preparing it first when needed."""
    prep = prepare_config_for(cfg)
    if prep is None:
        path = Path(cfg.dataset)
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
