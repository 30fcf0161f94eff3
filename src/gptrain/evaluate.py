"""Validation loss, perplexity and bits per byte on a fixed budget of val tokens.

The budget is the first `eval_tokens // seq_len` non-overlapping windows of the val tokens: the
same tokens at every evaluation and in every layout. Under data parallelism the windows are split
into contiguous, disjoint ranges per rank (`rank_windows`: no padding, no window scored twice,
unlike a padded DistributedSampler) and the loss sums and token counts are summed across ranks.

Bits per byte: the summed loss of the scored tokens, in bits, over the UTF-8 bytes of the text
those tokens stand for (`token_byte_lengths`: exact for byte-level tokenizers; end-of-text counts
0 bytes). Unlike the loss it compares models with different tokenizers.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from gptrain.data.loader import Tokens, eval_rows, eval_windows, inputs_and_targets
from gptrain.errors import UserError


def rank_windows(n: int, rank: int, world: int) -> range:
    """The eval windows of one data-parallel rank: contiguous, disjoint, together exactly range(n)."""
    return range(n * rank // world, n * (rank + 1) // world)


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module,
    val_tokens: Tokens,
    seq_len: int,
    eval_tokens: int,
    batch_size: int,
    device: torch.device,
    autocast: contextlib.AbstractContextManager | None = None,
    dp_rank: int = 0,
    dp_world: int = 1,
    dp_group=None,
) -> tuple[float, float, int]:
    """Mean next-token loss over the budget, its perplexity, and the number of tokens scored."""
    n = eval_windows(val_tokens, seq_len, eval_tokens)
    mine = rank_windows(n, dp_rank, dp_world)
    lo, hi = mine.start, mine.stop
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    count = torch.zeros((), device=device, dtype=torch.float64)
    # Every rank runs the same number of forward passes: under FSDP each forward is a collective
    # (parameter all-gathers). A rank whose share ran out repeats its first window and discards it.
    most = -(-n // dp_world)  # the largest share, in windows
    for start in range(lo, lo + max(1, most), batch_size):
        end = min(start + batch_size, hi)
        scored = end > start
        windows = range(start, end) if scored else range(min(lo, n - 1), min(lo, n - 1) + 1)
        x, y = inputs_and_targets(eval_rows(val_tokens, seq_len, windows).to(device))
        with autocast or contextlib.nullcontext():
            # The model's own mean loss: chunked like training's when that is (no B·T·V logits kept).
            loss = model(x, y)
        if scored:
            loss_sum += loss.double() * y.numel()
            count += y.numel()
    if dp_world > 1 and dist.is_initialized():
        dist.all_reduce(loss_sum, group=dp_group)
        dist.all_reduce(count, group=dp_group)
    model.train(was_training)
    loss = (loss_sum / count).item()
    return loss, math.exp(min(loss, 50.0)), int(count.item())


# ---------------------------------------------------------------------------------------- bits per byte
def bits_per_byte(loss_nats: float, tokens: int, nbytes: int) -> float:
    """Bits per byte of `tokens` tokens scored at a mean loss of `loss_nats` that stand for `nbytes` bytes."""
    if nbytes <= 0:
        raise ValueError("bits per byte needs the scored tokens to stand for at least one byte")
    return loss_nats * tokens / (math.log(2) * nbytes)


def eval_bytes_per_token(val_tokens: Tokens, tokenizer, seq_len: int, eval_tokens: int) -> float | None:
    """UTF-8 bytes per scored token of the eval windows `evaluate_loss` scores (computed once: the
    windows never change); None without a tokenizer, or when the tokens stand for no text.

    The scored tokens of windows 0..n-1 are the targets, tokens 1 .. n·seq_len: one slice, looked up
    in the tokenizer's table of bytes per id. val/bpb = loss / (ln 2 · bytes per token).
    """
    if tokenizer is None:
        return None
    from gptrain.data.tokenizer import token_byte_lengths

    n = eval_windows(val_tokens, seq_len, eval_tokens)
    targets = np.asarray(val_tokens[1 : n * seq_len + 1]).astype(np.int64)
    table = token_byte_lengths(tokenizer)
    nbytes = int(table[targets[targets < len(table)]].sum())
    return nbytes / len(targets) if nbytes > 0 else None


# ---------------------------------------------------------------------------------------- gptrain eval
def evaluate_checkpoint(
    path: str,
    data: str | None = None,
    eval_tokens: int | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    *,
    data_mode: str = "auto",
    val_data: list[str] | tuple[str, ...] = (),
    val_npy: list[str] | tuple[str, ...] = (),
    tokenizer_name: str | None = None,
    seq_len: int | None = None,
    max_tokens: int | None = None,
    amp: bool = True,
    seed: int = 42,
) -> dict:
    """`gptrain eval`: score a trained model on validation tokens; under torchrun each rank scores its share.

    The tokens: ``val_data`` (text files, tokenized with the model's tokenizer or ``tokenizer_name``),
    ``val_npy`` (token shards: .npy or llm.c .bin), ``data`` (any dataset `open_dataset` reads: its val
    split), else the data the run trained on. ``max_tokens`` (alias ``eval_tokens``): the budget,
    default the run's --eval-tokens; ``seq_len`` and ``batch_size`` default to the run's. ``amp``:
    autocast on CUDA (bf16 where supported, else fp16); fp32 on CPU. ``seed`` seeds torch (the windows
    themselves are always the first ones, the same in every run). Returns the same dict on every rank.
    """
    from gptrain.chunked_loss import resolve_loss_chunk_size
    from gptrain.config import Config
    from gptrain.distributed import backend_for, resolve_device
    from gptrain.generate import load_trained_model

    if eval_tokens is not None and max_tokens is not None and eval_tokens != max_tokens:
        raise UserError("--max-tokens and --eval-tokens are the same setting; give one of them.")
    budget_given = max_tokens if max_tokens is not None else eval_tokens
    for name, value in [("max-tokens", budget_given), ("batch-size", batch_size), ("seq-len", seq_len)]:
        if value is not None and value < 1:
            raise UserError(f"--{name} must be at least 1, got {value} (leave it out to use the run's own).")
    if data_mode not in ("auto", "text", "nanogpt", "llmc", "npy", "fineweb_npy"):
        raise UserError(f"--data-mode {data_mode}: use auto, text, nanogpt, llmc, npy or fineweb_npy.")
    given = [name for name, v in (("--data", data), ("--val-data", val_data), ("--val-npy", val_npy)) if v]
    if len(given) > 1:
        raise UserError(f"{' and '.join(given)} both name the validation tokens; give one of them.")
    if data_mode == "text" and val_npy or data_mode in ("npy", "fineweb_npy", "llmc") and val_data:
        raise UserError(f"--data-mode {data_mode} does not go with {given[0]}: --val-data is text (--data-mode text), "
                        "--val-npy is token shards (--data-mode fineweb_npy).")
    if data_mode in ("npy", "fineweb_npy", "llmc") and not (val_npy or data):
        raise UserError(f"--data-mode {data_mode} needs --val-npy FILE... (the validation token shards).")
    if data_mode == "text" and not (val_data or data):
        raise UserError("--data-mode text needs --val-data FILE... (the validation text).")

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    dev = resolve_device(device, int(os.environ.get("LOCAL_RANK", "0")))
    own_group = False
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=backend_for(dev))
        own_group = True
    try:
        if world > 1:
            rank, world = dist.get_rank(), dist.get_world_size()
        torch.manual_seed(seed)
        model, model_tok, ckpt = load_trained_model(path, dev)
        _check_finite_weights(model, ckpt.path)
        cfg = Config.from_dict(ckpt.info["config"])
        context = model.cfg.max_position_embeddings
        seq_len = seq_len or cfg.data.seq_len or context
        if seq_len > context:
            raise UserError(f"--seq-len {seq_len} is longer than the model's context ({context} positions). Use "
                            f"--seq-len {context} or less.")
        budget = budget_given if budget_given is not None else cfg.train.eval_tokens
        batch_size = batch_size or cfg.train.batch_size
        val, description, data_tok = _validation_tokens(ckpt, cfg, model, model_tok, data, data_mode, val_data,
                                                        val_npy, tokenizer_name, seq_len, budget)
        model.loss_chunk_size = resolve_loss_chunk_size(cfg.train.loss_chunk_size, dev, tensor_parallel=False)
        autocast = None
        if amp and dev.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            autocast = torch.autocast("cuda", dtype=dtype)
        loss, ppl, n = evaluate_loss(model, val, seq_len, budget, batch_size, dev, autocast, dp_rank=rank,
                                     dp_world=world)
        if not math.isfinite(loss):
            raise UserError(f"the validation loss of {ckpt.path} is not finite ({loss}): the model's outputs "
                            "overflow or hold NaN (a diverged run, or fp16 overflow: try --no-amp). Evaluate an "
                            "earlier checkpoint.")
        per_token = eval_bytes_per_token(val, data_tok or model_tok, seq_len, budget)
        bpb = loss / (math.log(2) * per_token) if per_token else None
        return {"checkpoint": str(ckpt.path), "step": ckpt.step, "dataset": description, "tokens": n,
                "windows": n // seq_len, "seq_len": seq_len, "loss": loss, "ppl": ppl, "bpb": bpb,
                "bytes_per_token": per_token, "world_size": world, "rank": rank}
    finally:
        if own_group:
            dist.destroy_process_group()


class _Quiet:
    """Notes of opening a dataset, printed by the first rank only (every rank opens it)."""

    def print(self, line: str = "") -> None:
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(line, file=sys.stderr, flush=True)


def _check_finite_weights(model: torch.nn.Module, where: Path) -> None:
    bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise UserError(f"the weights of {where} hold NaN or inf ({', '.join(bad[:3])}"
                        f"{f' and {len(bad) - 3} more' if len(bad) > 3 else ''}): the run diverged before this "
                        "save. Evaluate an earlier checkpoint.")


def _validation_tokens(ckpt, cfg, model, model_tok, data, data_mode, val_data, val_npy, tokenizer_name,
                       seq_len: int, budget: int):
    """(val tokens, what they are, their tokenizer or None) for `evaluate_checkpoint`."""
    from gptrain.data.dataset import DataConfig, check_token_ids, open_dataset, open_token_shards, source_kind
    from gptrain.data.format import expand_shard_paths
    from gptrain.data.prepare import tokenize_files
    from gptrain.data.tokenizer import build_tokenizer, needs_training

    vocab = model.cfg.vocab_size
    if val_data:
        tok = model_tok
        if tokenizer_name is not None:
            if needs_training(tokenizer_name):
                raise UserError(f"--tokenizer-name {tokenizer_name}: name the tokenizer the model was trained with.")
            tok = build_tokenizer(tokenizer_name)
            if model_tok is not None and tok.fingerprint() != model_tok.fingerprint():
                raise UserError(f"--tokenizer-name {tokenizer_name} is not the tokenizer the model was trained with "
                                f"({model_tok.spec}): its loss would be meaningless. Drop --tokenizer-name.")
        if tok is None:
            raise UserError("the model was trained on token files without a tokenizer, so text cannot be tokenized "
                            "for it. Name the tokenizer that made its training tokens with --tokenizer-name.")
        if tok.vocab_size > vocab:
            raise UserError(f"the tokenizer {tok.spec} has {tok.vocab_size} ids, the model knows {vocab}.")
        tokens = tokenize_files(val_data, tok, max_tokens=(budget // seq_len) * seq_len + 1)
        return tokens, f"{len(val_data)} text file(s), {len(tokens):,} tokens ({tok.spec})", tok
    if val_npy:
        paths = expand_shard_paths(val_npy, "--val-npy")
        tokens, kinds = open_token_shards(paths, data_mode)
        check_token_ids(tokens, vocab, f"the model's {vocab} ids", "evaluate on tokens made with the model's "
                        "tokenizer")
        labels = " + ".join(sorted({"npy": ".npy", "llmc": "llm.c"}[k] for k in set(kinds)))
        return tokens, f"{len(paths)} {labels} shard(s), {len(tokens):,} tokens", model_tok
    quiet = _Quiet()
    if data:
        ds = open_dataset(DataConfig(dataset=data, data_mode=data_mode), console=quiet, samples=False)
    else:
        dataset_dir = ckpt.info.get("dataset_dir")
        if dataset_dir and Path(dataset_dir).is_dir():
            ds = open_dataset(DataConfig(dataset=dataset_dir), console=quiet, samples=False)
        elif cfg.data.train_shards or (cfg.data.dataset and source_kind(cfg.data) != "raw"):
            ds = open_dataset(cfg.data, console=quiet, samples=False)
        else:
            raise UserError(f"the dataset the run trained on ({dataset_dir or 'unknown'}) is gone. Pass the "
                            "validation tokens: --data DIR, --val-data FILE... or --val-npy FILE....")
    if ds.vocab_size > vocab:
        raise UserError(f"the validation data ({ds.description}) uses {ds.vocab_size} token ids but the model knows "
                        f"{vocab}. Evaluate on data made with the model's tokenizer"
                        f"{f' ({model_tok.spec})' if model_tok else ''}.")
    if ds.tokenizer is not None and model_tok is not None and ds.tokenizer.fingerprint() != model_tok.fingerprint():
        raise UserError(f"the validation data ({ds.description}) was tokenized with {ds.tokenizer.spec}, a different "
                        f"tokenizer than the model's {model_tok.spec}. Prepare the data with the model's tokenizer.")
    return ds.val, ds.description, ds.tokenizer
