"""Validation loss and perplexity on a fixed budget of val tokens.

The budget is the first `eval_tokens // seq_len` non-overlapping windows of val.bin: the same
tokens at every evaluation and in every layout. Under data parallelism the windows are split
into contiguous, disjoint ranges per rank (no padding, no duplicates) and the loss sums and
token counts are summed across ranks.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.distributed as dist

from gptrain.data.loader import eval_rows, eval_windows, inputs_and_targets


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module,
    val_tokens: np.ndarray,
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
    lo, hi = n * dp_rank // dp_world, n * (dp_rank + 1) // dp_world
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


def evaluate_checkpoint(path: str, data: str | None = None, eval_tokens: int | None = None,
                        batch_size: int | None = None, device: str = "auto") -> dict:
    """`gptrain eval`: score a trained model on a dataset's val split (default: its training dataset)."""
    from pathlib import Path

    from gptrain.chunked_loss import resolve_loss_chunk_size
    from gptrain.config import Config
    from gptrain.data.loader import open_tokens
    from gptrain.data.prepare import read_meta
    from gptrain.errors import UserError
    from gptrain.generate import load_trained_model

    for name, value in [("eval-tokens", eval_tokens), ("batch-size", batch_size)]:
        if value is not None and value < 1:
            raise UserError(f"--{name} must be at least 1, got {value} (leave it out to use the run's own).")
    model, tokenizer, ckpt = load_trained_model(path, device)
    cfg = Config.from_dict(ckpt.info["config"])
    dataset = Path(data or ckpt.info["dataset_dir"])
    meta = read_meta(dataset)
    if int(meta["vocab_size"]) > model.cfg.vocab_size:
        raise UserError(f"the dataset {dataset} uses {meta['vocab_size']} token ids but the model knows "
                        f"{model.cfg.vocab_size}. Evaluate on data prepared with the model's tokenizer "
                        f"({tokenizer.spec}).")
    data_tok = meta.get("tokenizer") or {}
    if data_tok.get("fingerprint") not in (None, tokenizer.fingerprint()):
        raise UserError(f"the dataset {dataset} was tokenized with {data_tok.get('spec')} "
                        f"(a different tokenizer than the model's {tokenizer.spec}). Prepare the data with the "
                        "model's tokenizer.json (hf:PATH).")
    val = open_tokens(dataset / "val.bin", meta["dtype"])
    dev = next(model.parameters()).device
    model.loss_chunk_size = resolve_loss_chunk_size(cfg.train.loss_chunk_size, dev, tensor_parallel=False)
    seq_len = cfg.data.seq_len or cfg.model.max_position_embeddings
    loss, ppl, n = evaluate_loss(model, val, seq_len, cfg.train.eval_tokens if eval_tokens is None else eval_tokens,
                                 cfg.train.batch_size if batch_size is None else batch_size, dev)
    return {"checkpoint": str(ckpt.path), "step": ckpt.step, "dataset": str(dataset), "tokens": n,
            "loss": loss, "ppl": ppl}
