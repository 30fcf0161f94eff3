"""Sampling from a trained model, with a KV cache so each new token costs one position."""

from __future__ import annotations

import torch

from gptrain.model import GPT


class NonFiniteLogits(ValueError):
    """Sampling is impossible: the model produced NaN/inf logits (e.g. after a diverged training)."""


@torch.no_grad()
def generate(
    model: GPT,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.8,
    top_k: int | None = 50,
    use_cache: bool = True,
    stop_id: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
) -> list[int]:
    """Continue `prompt_ids`; returns only the new tokens. temperature 0 means greedy.

    Generation stops at `stop_id` (not included), after `max_new_tokens`, or when the context is full.
    """
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
            raise NonFiniteLogits("the model's logits are not finite (the weights hold NaN or inf)")
        if temperature <= 0:
            nxt = int(torch.argmax(logits))
        else:
            logits = logits / temperature
            if top_k is not None and top_k < vocab:
                kth = torch.topk(logits, top_k).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
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


def load_trained_model(path: str, device: str = "auto"):
    """(model in eval mode, tokenizer, checkpoint) from a run folder or a checkpoint folder."""
    from gptrain.checkpoint import resolve_checkpoint
    from gptrain.config import Config
    from gptrain.data.tokenizer import tokenizer_from_json
    from gptrain.distributed import resolve_device

    ckpt = resolve_checkpoint(path)
    cfg = Config.from_dict(ckpt.info["config"])
    dev = resolve_device(device)
    model = GPT(cfg.model)
    model.load_state_dict(ckpt.load_model_state("cpu"))
    model.to(dev).eval()
    tok_file = ckpt.path / "tokenizer.json"
    tok_json = tok_file.read_text() if tok_file.is_file() else None
    tokenizer = tokenizer_from_json(ckpt.info["tokenizer"]["spec"], tok_json)
    return model, tokenizer, ckpt
