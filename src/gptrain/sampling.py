"""Text samples during and after training: logged at evaluations, and one printed at the end."""

from __future__ import annotations

import torch

from gptrain.generate import NonFiniteLogits, generate
from gptrain.model import GPT
from gptrain.tracking.samples import is_sharded, sample_completions


class Sampler:
    def __init__(self, plan, dist, device: torch.device, model: torch.nn.Module, tracker, console) -> None:
        self.plan, self.dist, self.device, self.model = plan, dist, device, model
        self.tracker, self.console = tracker, console
        self.noted_sharded = False

    def due(self, step: int, evaluated: bool) -> bool:
        cfg = self.plan.cfg
        every, prompts = cfg.tracking.sample_every, cfg.tracking.sample_prompts
        if not self.dist.is_main or not prompts or cfg.train.sample_tokens <= 0 or self.plan.data.tokenizer is None:
            return False
        return evaluated if every is None else (every > 0 and step % every == 0)

    def log(self, step: int) -> None:
        """A few short generations from fixed prompts, on rank 0 with the unwrapped model."""
        if is_sharded(self.model):
            if not self.noted_sharded:
                self.console.print("text samples skipped: the model is sharded across processes.")
                self.noted_sharded = True
            return
        cfg = self.plan.cfg
        try:
            samples = sample_completions(self.model, self.plan.data.tokenizer, cfg.tracking.sample_prompts,
                                         cfg.train.sample_tokens, cfg.train.seed, self.device)
        except (RuntimeError, NonFiniteLogits) as e:  # a sample must not end the run
            self.console.warn(f"text samples at step {step} failed: {e}")
            return
        self.tracker.log_samples(samples, step)

    def final(self, consolidated_state: dict[str, torch.Tensor] | None) -> str | None:
        """The sample printed at the end; a sharded model samples from the final save's consolidated copy."""
        t, tokenizer = self.plan.cfg.train, self.plan.data.tokenizer
        if not self.dist.is_main or t.sample_tokens <= 0 or tokenizer is None:
            return None
        model = self.model
        if self.dist.enabled:
            if not consolidated_state:
                return None
            model = GPT(self.plan.cfg.model)
            model.load_state_dict(consolidated_state)
            model.to(self.device)
        gen = torch.Generator(device=self.device).manual_seed(t.seed)
        try:
            new = generate(model, tokenizer.encode(t.sample_prompt), t.sample_tokens, generator=gen,
                           stop_id=tokenizer.eot_id, device=self.device)
        except NonFiniteLogits as e:
            self.console.warn(f"no sample: {e}.")
            return None
        text = t.sample_prompt + tokenizer.decode(new)
        self.console.print("sample:\n" + text)
        return text
