"""Sampling from a trained model, with a KV cache so each new token costs one position.

Decoding, per new token: greedy (the most likely token) when ``do_sample`` is False or the
temperature is 0; otherwise a draw from the softmax of logits / temperature, narrowed first to
the ``top_k`` most likely tokens and then to the smallest set whose probability reaches
``top_p`` (nucleus sampling). `gptrain generate` decodes greedily unless --do-sample, as the
original generate.py did; the samples logged during training draw (do_sample=True).
"""

from __future__ import annotations

import math

import torch

from gptrain.errors import UserError
from gptrain.model import GPT


class NonFiniteLogits(UserError):
    """Sampling is impossible: the model produced NaN/inf logits (e.g. after a diverged training). A UserError:
    `gptrain generate` ends with its message and exit code 2."""


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """The sampling settings' own checks (the CLI also checks them, with its flag names)."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise UserError(f"--temperature must be a finite number ≥ 0 (0: greedy decoding), got {temperature}.")
    if top_k is not None and top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {top_k} (leave it out for no top-k filter).")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise UserError(f"--top-p must be in (0, 1], got {top_p} (1: no nucleus filter).")


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Logits with everything outside the top-k and then outside the top-p nucleus set to -inf.

    The nucleus is the smallest set of most likely tokens whose probabilities sum to at least
    ``top_p``; the most likely token is always kept, so a tiny ``top_p`` is greedy decoding.
    """
    if top_k is not None and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # probability mass of the tokens ranked above
        drop_sorted = before >= top_p
        drop_sorted[0] = False
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@torch.no_grad()
def generate(
    model: GPT,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float | None = None,
    do_sample: bool = True,
    use_cache: bool = True,
    stop_id: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
) -> list[int]:
    """Continue `prompt_ids`; returns only the new tokens.

    Greedy when ``do_sample`` is False or ``temperature`` is 0 (top-k and top-p then change
    nothing); else sampled with ``generator``, so a seeded generator gives the same tokens again.
    Generation stops at `stop_id` (not included), after `max_new_tokens`, or when the context is full.
    """
    check_sampling(temperature, top_k, top_p)
    greedy = not do_sample or temperature == 0
    device = device or next(model.parameters()).device
    context = model.cfg.max_position_embeddings
    vocab = model.cfg.vocab_size
    ids = list(prompt_ids)[-context:] or [stop_id if stop_id is not None else 0]
    max_new_tokens = min(max_new_tokens, tokens_that_fit(context, len(prompt_ids)))
    was_training = model.training
    model.eval()
    cache = model.new_kv_cache(1, device=device, dtype=next(model.parameters()).dtype) if use_cache else None
    new: list[int] = []
    x = torch.tensor([ids], device=device)
    for _ in range(max(0, max_new_tokens)):
        logits = model(x, kv_cache=cache)[0, -1, :vocab].float()
        if not bool(torch.isfinite(logits).all()):
            raise NonFiniteLogits("the model's logits are not finite (the weights hold NaN or inf). Generate from an "
                                  "earlier checkpoint (checkpoints/step_NNNNNNN) whose weights are finite")
        if greedy:
            nxt = int(torch.argmax(logits))
        else:
            logits = filter_logits(logits / temperature, top_k, top_p)
            probs = torch.softmax(logits, dim=-1)
            nxt = int(torch.multinomial(probs, 1, generator=generator))
        if stop_id is not None and nxt == stop_id:
            break
        new.append(nxt)
        ids.append(nxt)
        x = torch.tensor([[nxt]], device=device) if use_cache else torch.tensor([ids], device=device)
    model.train(was_training)
    return new


def tokens_that_fit(context: int, prompt_len: int) -> int:
    """New tokens `generate` can add: the context minus the prompt (its last `context` tokens; an empty
    prompt starts from one end-of-text token)."""
    return context - min(max(prompt_len, 1), context)


def load_trained_model(path: str, device: str | torch.device = "auto", tokenizer: str | None = None):
    """(model in eval mode, tokenizer or None, checkpoint) from a run folder or a checkpoint folder.

    A checkpoint whose info.json or weights do not describe a gptrain model is one UserError naming
    what is wrong, never a traceback from `load_state_dict`. The tokenizer is the checkpoint's, or
    ``tokenizer`` (a spec) when given; None when the model was trained on token files without one.
    """
    from gptrain.checkpoint import resolve_checkpoint
    from gptrain.config import Config
    from gptrain.data.tokenizer import build_tokenizer, needs_training, tokenizer_from_json
    from gptrain.distributed import resolve_device

    ckpt = resolve_checkpoint(path)
    where = ckpt.path / "info.json"
    saved = ckpt.info.get("config")
    if not isinstance(saved, dict) or not isinstance(saved.get("model"), dict):
        raise UserError(f"{where} has no model settings (config.model): it is damaged or was not written by gptrain. "
                        "Use another checkpoint.")
    try:
        cfg = Config.from_dict(saved)
        model = GPT(cfg.model)
    except UserError as e:
        raise UserError(f"{where} is damaged: {e} Use another checkpoint.") from None
    except Exception as e:  # a value of the wrong type or out of range in a damaged info.json
        raise UserError(f"{where} holds model settings gptrain cannot build a model from ({type(e).__name__}: "
                        f"{str(e)[:200]}). It is damaged: use another checkpoint.") from None
    ckpt.load_model_into(model)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    model.to(dev).eval()
    if tokenizer is not None:
        if needs_training(tokenizer):
            raise UserError(f"--tokenizer-name {tokenizer}: name the tokenizer the model was trained with (a "
                            "bpe:N spec would train a new one).")
        return model, build_tokenizer(tokenizer), ckpt
    tok_info = ckpt.info.get("tokenizer")
    if tok_info is None:
        return model, None, ckpt  # trained on token files that came without a tokenizer
    if not isinstance(tok_info, dict) or not isinstance(tok_info.get("spec"), str):
        raise UserError(f"{where} has a damaged tokenizer record (no 'spec'). Use another checkpoint, or name the "
                        "tokenizer with --tokenizer-name.")
    tok_file = ckpt.path / "tokenizer.json"
    tok_json = tok_file.read_text(encoding="utf-8") if tok_file.is_file() else None
    return model, tokenizer_from_json(tok_info["spec"], tok_json), ckpt
