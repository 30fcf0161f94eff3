"""The recipe race: GPT-2's 2019 recipe against gptrain's current default, for the same wall-clock.

    python benchmarks/recipe_race.py [--data DIR] [--seconds 240] [--ablations] [--compile] [--out DIR]

Every contender trains the same shape (the default preset's: 4 layers × 192, context 256) on the same
batches (batch 16 × 256 tokens, the data order a pure function of the step), in this one process,
**interleaved**: one optimizer step of each contender in turn, so that whatever else the machine does
slows them all alike. Only the steps are timed (evaluations are not).

1. Calibrate: a few steps of each give its time per step; each contender then gets the number of steps
   that fills `--seconds` of training (its learning-rate schedule ends at its own last step, as a run of
   that length would), or exactly `--steps` steps each.
2. Race: val loss and bits per byte on every val token (`--eval-tokens`) at evenly spaced token counts
   and at the end.
3. Report: a table at equal time (each contender's final evaluation: the same training seconds) and at
   equal tokens (the last token count that every contender reached), tokens per second, and a PNG with
   val loss against training seconds and against tokens.

`--ablations` adds the current default with each of its options switched back to GPT-2's value, one at
a time (and with AdamW in place of Muon), and with each option that both families leave off switched on
(none today): what each option is worth at this budget.

Training goes through the library's own parts (gptrain.model, gptrain.optim, gptrain.data.loader,
gptrain.evaluate), not the `gptrain train` command, so that steps can be interleaved; the recipes are the
ones `gptrain train` resolves (FAMILIES, PRESETS, the families' optimizer settings).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from gptrain.data.loader import BatchLayout, TrainBatches
from gptrain.evaluate import eval_bytes_per_token, evaluate_loss
from gptrain.model import FAMILIES, GPT, ModelConfig, model_settings_for
from gptrain.optim import OptimConfig, apply_schedule, build_optimizer, optim_settings_for

PRESET = "tiny"
BATCH = 16
SEED = 1337  # the default of --seed: model initialisation and batch order


@dataclass
class Contender:
    name: str
    family: str
    model_overrides: dict = field(default_factory=dict)
    optim_overrides: dict = field(default_factory=dict)


def contenders(ablations: bool) -> list[Contender]:
    out = [Contender("gpt2 recipe", "gpt2"), Contender("current default", "modern")]
    if ablations:
        for option, value in FAMILIES["gpt2"].items():
            if FAMILIES["modern"][option] != value:
                out.append(Contender(f"default, {option}={value}", "modern", {option: value}))
            elif isinstance(value, bool):  # an option both families leave off (value embeddings): on
                out.append(Contender(f"default, {option}={not value}", "modern", {option: not value}))
        # AdamW in place of Muon, with the gpt2 family's AdamW settings
        out.append(Contender("default, optimizer=adamw", "modern",
                             optim_overrides={**{k: getattr(OptimConfig(), k) for k in optim_settings_for("modern")}}))
    return out


class Run:
    """One contender: its model, optimizer, batches and clock."""

    def __init__(self, c: Contender, vocab: int, train_tokens, device, compile: bool, seed: int):
        self.c = c
        self.seed = seed
        settings = {**model_settings_for(PRESET, c.family), **c.model_overrides}
        self.cfg = ModelConfig(vocab_size=vocab, **settings)
        self.seq_len = self.cfg.max_position_embeddings
        torch.manual_seed(seed)
        self.model = GPT(self.cfg).to(device)
        self.model.loss_chunk_size = 1024 if device.type == "cpu" else 0
        self.step_fn = torch.compile(self.model) if compile else self.model
        self.ocfg = OptimConfig(**{**optim_settings_for(c.family), **c.optim_overrides})
        self.optimizer = build_optimizer(self.model, self.ocfg, device)
        self.batches = TrainBatches(train_tokens, self.seq_len, BatchLayout(BATCH, 1, 1, 0), seed)
        self.params = list(self.model.parameters())
        self.device = device
        self.num_steps = 0
        self.step = 0
        self.seconds = 0.0
        self.step_times: list[float] = []
        self.evals: list[dict] = []

    @property
    def tokens(self) -> int:
        return self.step * BATCH * self.seq_len

    def train_step(self, num_steps: int) -> float:
        t0 = time.perf_counter()
        apply_schedule(self.optimizer, self.step, self.ocfg, num_steps)
        x, y = self.batches.get(self.step, 0)
        x, y = x.to(self.device, dtype=torch.long), y.to(self.device, dtype=torch.long)
        loss = self.step_fn(x, y)
        loss.backward()
        if self.ocfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.ocfg.grad_clip, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.step += 1
        return time.perf_counter() - t0

    def reset(self) -> None:
        """Back to step 0 with fresh weights (after calibration)."""
        torch.manual_seed(self.seed)
        self.model.reset_parameters()
        self.optimizer = build_optimizer(self.model, self.ocfg, self.device)
        self.step, self.seconds = 0, 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help="prepared dataset dir (default: the default corpus, prepared if needed)")
    ap.add_argument("--seconds", type=float, default=240.0, help="training seconds per contender")
    ap.add_argument("--steps", type=int, help="instead of --seconds: this many steps each")
    ap.add_argument("--evals", type=int, default=6, help="evaluations per contender (evenly spaced in tokens)")
    ap.add_argument("--eval-tokens", type=int, default=10**9, help="val tokens per evaluation (default: all)")
    ap.add_argument("--ablations", action="store_true", help="also the default with each option switched back")
    ap.add_argument("--compile", action="store_true", help="torch.compile each model")
    ap.add_argument("--seed", type=int, default=SEED, help="initialisation and batch order (another seed: another run)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's choice)")
    ap.add_argument("--out", default="benchmarks/out/recipe_race", help="results folder (JSON and PNG)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compile:  # one GPT.forward, compiled once per contender: more than dynamo's default 8 variants
        import torch._dynamo.config as dynamo_config

        dynamo_config.recompile_limit = 64
    device = torch.device(args.device)
    data_dir = Path(args.data) if args.data else default_dataset()
    meta = json.loads((data_dir / "meta.json").read_text())
    train_tokens = np.memmap(data_dir / "train.bin", dtype=np.dtype(meta["dtype"]), mode="r")
    val_tokens = np.memmap(data_dir / "val.bin", dtype=np.dtype(meta["dtype"]), mode="r")
    vocab = int(meta["vocab_size"])
    from gptrain.data.tokenizer import load_dataset_tokenizer

    runs = [Run(c, vocab, train_tokens, device, args.compile, args.seed) for c in contenders(args.ablations)]
    seq_len = runs[0].seq_len
    bytes_per_token = eval_bytes_per_token(val_tokens, load_dataset_tokenizer(data_dir), seq_len, args.eval_tokens)

    # 1. calibrate (compilation and first-step costs fall in the warm-up steps, which are not counted)
    warm, timed = (3, 12)
    for i in range(warm + timed):
        for r in runs:
            dt = r.train_step(warm + timed)
            if i >= warm:
                r.step_times.append(dt)
    for r in runs:
        r.num_steps = args.steps or max(1, int(args.seconds / statistics.median(r.step_times)))
        r.reset()
    print("calibrated: " + ", ".join(f"{r.c.name} {statistics.median(r.step_times) * 1e3:.0f} ms/step → "
                                          f"{r.num_steps} steps" for r in runs), flush=True)

    # 2. race: round-robin steps; evaluations at the same token counts for everyone
    tokens_per_step = BATCH * seq_len
    eval_every = max(1, max(r.num_steps for r in runs) // args.evals)

    def evaluate(r: Run) -> None:
        loss, _, n = evaluate_loss(r.model, val_tokens, seq_len, args.eval_tokens, 32, device)
        bpb = loss / (math.log(2) * bytes_per_token) if bytes_per_token else None
        r.evals.append({"step": r.step, "tokens": r.tokens, "seconds": r.seconds, "val_loss": loss, "val_bpb": bpb})
        print(f"  {r.c.name:<34} step {r.step:>5} | {r.seconds:7.1f} s | val loss {loss:.4f}"
              + (f" | bpb {bpb:.4f}" if bpb else ""), flush=True)

    active = list(runs)
    while active:
        for r in list(active):
            r.seconds += r.train_step(r.num_steps)
            if r.step % eval_every == 0 or r.step == r.num_steps:
                evaluate(r)
            if r.step == r.num_steps:
                active.remove(r)

    # 3. report
    report(runs, tokens_per_step, Path(args.out))


def default_dataset() -> Path:
    from gptrain.data.dataset import DataConfig, prepare_config_for
    from gptrain.data.prepare import prepare_dataset

    prep = prepare_config_for(DataConfig())
    prepare_dataset(prep)
    return Path(prep.out_dir)


def report(runs: list[Run], tokens_per_step: int, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    common = min(r.evals[-1]["tokens"] for r in runs)

    def at_tokens(r: Run) -> dict:  # the last evaluation at or before the common token count
        return [e for e in r.evals if e["tokens"] <= common][-1]

    head = f"{'contender':<36}{'steps':>7}{'tok/s':>9}{'time s':>9}{'val loss':>10}{'bpb':>8}" \
           f"{'@tokens':>11}{'val loss':>10}{'bpb':>8}"
    print("\nequal time: each contender's last evaluation; equal tokens: at the last token count all reached")
    print(head)
    rows = []
    for r in runs:
        end, eq = r.evals[-1], at_tokens(r)
        tps = r.tokens / r.seconds if r.seconds else float("nan")
        print(f"{r.c.name:<36}{r.step:>7}{tps:>9.0f}{end['seconds']:>9.1f}{end['val_loss']:>10.4f}"
              f"{_f(end['val_bpb']):>8}{eq['tokens']:>11,}{eq['val_loss']:>10.4f}{_f(eq['val_bpb']):>8}")
        rows.append({"name": r.c.name, "family": r.c.family, "model_overrides": r.c.model_overrides,
                     "optim_overrides": r.c.optim_overrides, "num_steps": r.num_steps, "tokens_per_second": tps,
                     "evals": r.evals, "options": r.cfg.options()})
    base = next(r for r in runs if r.c.name == "current default")
    gpt2 = next(r for r in runs if r.c.name == "gpt2 recipe")
    print(f"\ncurrent default vs gpt2 recipe at equal time: {base.evals[-1]['val_loss'] - gpt2.evals[-1]['val_loss']:+.3f}"
          f" nats; tokens/s ratio {rows[1]['tokens_per_second'] / rows[0]['tokens_per_second']:.3f}")
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    plot(runs, out / "recipe_race.png")
    print(f"results: {out / 'results.json'}, {out / 'recipe_race.png'}")


def _f(x: float | None) -> str:
    return f"{x:.4f}" if x is not None else "-"


def plot(runs: list[Run], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(no plot: install the 'plot' extra for matplotlib)")
        return
    fig, (by_time, by_tokens) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for r in runs:
        style = "-" if r.c.name in ("gpt2 recipe", "current default") else ":"
        by_time.plot([e["seconds"] for e in r.evals], [e["val_loss"] for e in r.evals], style, marker=".",
                     label=r.c.name)
        by_tokens.plot([e["tokens"] for e in r.evals], [e["val_loss"] for e in r.evals], style, marker=".")
    by_time.set_xlabel("training seconds")
    by_tokens.set_xlabel("tokens")
    by_time.set_ylabel("val loss (nats per token)")
    by_time.legend(fontsize=7)
    for ax in (by_time, by_tokens):
        ax.grid(alpha=0.3)
    fig.suptitle("gptrain recipe race: GPT-2 recipe vs current default (interleaved, same machine)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
