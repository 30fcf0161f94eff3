"""The divergence guard: a non-finite step never reaches the weights; N in a row end the run as `diverged`."""

from __future__ import annotations

import json

import torch
from conftest import fast_overrides

from gptrain import checkpoint as C
from gptrain.cli import main
from gptrain.config import build_config
from gptrain.trainer import TrainerHooks, train

# The GPT-2 family has no logit soft-capping: a huge learning rate without clipping makes the loss itself NaN.
DIVERGING = {"model.family": "gpt2", "optim.optimizer": "adamw", "optim.lr": 1e3, "optim.grad_clip": 0.0,
             "optim.warmup_steps": 0, "train.log_every": 1, "train.eval_every": 0, "train.num_steps": 40,
             "train.max_skipped_steps": 3, "tracking.sample_every": 0}


class WeightsSeen(TrainerHooks):
    def __init__(self):
        self.finite, self.skipped = [], []

    def on_log(self, trainer, step, row):
        self.finite.append(all(bool(torch.isfinite(p).all()) for p in trainer.raw_model.parameters()))
        self.skipped.append(row["train/skipped_steps"])


def test_non_finite_steps_are_skipped_and_the_run_ends_diverged(byte_dataset, tmp_path):
    seen = WeightsSeen()
    cfg, explicit = build_config(fast_overrides(byte_dataset, tmp_path, **{**DIVERGING, "train.run_name": "d"}))
    result = train(cfg, explicit, hooks=[seen])
    assert result.status == "diverged" and result.final_step < 40
    assert sum(seen.skipped) >= 3 and all(seen.finite), (seen.skipped, seen.finite)
    assert f"the last 3 steps (up to step {result.final_step}) had a non-finite loss or gradient norm" in result.message
    assert "Try a lower --lr (now 1000)" in result.message
    info = json.loads((result.run_dir / "run.json").read_text())
    assert info["status"] == "diverged"
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("train/skipped_steps") for r in rows)


def test_cli_exits_non_zero_and_a_diverging_resume_keeps_finite_checkpoints(byte_dataset, tmp_path, capsys):
    """Was: a resumed run with a diverging setting and --save-every pruned every finite checkpoint, exit 0."""
    base = ["train", "--data", byte_dataset, "--runs-dir", tmp_path, "--run-name", "r", "--n-layers", "2", "--n-heads", "2",
            "--d-model", "32", "--max-position-embeddings", "32", "--batch-size", "4", "--eval-tokens", "256",
            "--progress", "plain", "--sample-tokens", "0", "--family", "gpt2", "--optimizer", "adamw"]
    assert main([str(a) for a in base + ["--num-steps", "4"]]) == 0
    capsys.readouterr()
    rc = main([str(a) for a in base + ["--resume", "--num-steps", "40", "--lr", "1000", "--grad-clip", "0",
                                         "--warmup-steps", "0", "--save-every", "1", "--keep-last", "1",
                                         "--log-every", "1", "--max-skipped-steps", "3"]])
    err = capsys.readouterr().err
    assert rc == 1 and "error: training diverged" in err
    newest = C.latest_checkpoint(tmp_path / "r" / "checkpoints")
    state = newest.load_model_state()
    assert all(bool(torch.isfinite(v).all()) for v in state.values())
    # the model still generates and evaluates
    assert main(["generate", str(tmp_path / "r"), "--prompt", "the", "--max-new-tokens", "4"]) == 0
    assert main(["eval", str(tmp_path / "r"), "--max-tokens", "128"]) == 0
