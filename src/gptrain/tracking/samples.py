"""Text samples logged at evaluations: short continuations of fixed prompts, cheap and reproducible."""

from __future__ import annotations

from typing import Any

import torch

from gptrain.generate import generate


def is_sharded(model: torch.nn.Module) -> bool:
    """True when parameters are DTensor shards (FSDP2 / tensor parallel): one rank cannot generate alone."""
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


def sample_completions(model, tokenizer, prompts: list[str], max_new_tokens: int, seed: int,
                       device: torch.device) -> list[dict[str, Any]]:
    """One completion per prompt, from a generator seeded by `seed`: the same prompt and weights give the
    same text, and the global RNG (hence the training's random stream) is untouched."""
    out = []
    for prompt in prompts:
        gen = torch.Generator(device=device).manual_seed(seed)
        new = generate(model, tokenizer.encode(prompt), max_new_tokens, generator=gen, stop_id=tokenizer.eot_id,
                       device=device)
        out.append({"prompt": prompt, "completion": tokenizer.decode(new)})
    return out
