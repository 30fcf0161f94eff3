"""Resolve, then run: the plan records what the run used, and the defects the review found stay fixed."""

import json

import pytest
import torch
from conftest import fast_overrides

from gptrain.config import build_config
from gptrain.errors import UserError
from gptrain.trainer import Trainer, TrainerHooks, train


def run(dataset, runs, hooks=(), **extra):
    cfg, explicit = build_config(fast_overrides(dataset, runs, **{"tracking.sample_every": 0, **extra}))
    return train(cfg, explicit, hooks=hooks)


class SpoilWeightsAt(TrainerHooks):
    """Adds noise to every weight after step `step`: the evaluation that follows is worse than the earlier ones."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer, step):
        if step == self.step:
            with torch.no_grad():
                for p in trainer.raw_model.parameters():
                    p.add_(torch.randn_like(p))


def test_best_val_loss_is_the_best_evaluation_not_the_last(byte_dataset, tmp_path):
    """Was: run.json's best_val_loss held the last evaluation's loss."""
    res = run(byte_dataset, tmp_path, hooks=[SpoilWeightsAt(12)], **{"train.run_name": "best", "train.eval_every": 6})
    vals = [json.loads(line)["val/loss"] for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()
            if "val/loss" in line]
    assert len(vals) == 2 and vals[1] > vals[0]  # the spoiled final weights evaluate worse
    info = json.loads((res.run_dir / "run.json").read_text())
    assert info["best_val_loss"] == pytest.approx(min(vals)) and res.final_val_loss == pytest.approx(vals[1])


def test_config_json_records_the_tokenizer_the_data_was_prepared_with(byte_dataset, tmp_path):
    """Was: the default spec (bpe:4096) for a run trained on a byte-level --data folder."""
    res = run(byte_dataset, tmp_path, **{"train.run_name": "tok", "train.num_steps": 2})
    cfg = json.loads((res.run_dir / "config.json").read_text())
    assert cfg["data"]["tokenizer"] == "byte"
    assert cfg["model"]["vocab_size"] == 257 and cfg["data"]["seq_len"] == 32 and cfg["train"]["grad_accum_steps"] == 1


def test_resume_refuses_a_preset_it_cannot_apply(byte_dataset, tmp_path):
    """Was: --resume --preset X was recorded in config.json and the header but did not change the model."""
    run(byte_dataset, tmp_path, **{"train.run_name": "p", "train.num_steps": 2})
    with pytest.raises(UserError, match="is a tiny model; --preset small-cpu cannot change it"):
        run(byte_dataset, tmp_path, **{"train.run_name": "p", "train.resume": "latest", "train.num_steps": 4,
                                      "train.preset": "small-cpu"})


def test_the_plan_is_frozen_and_the_trainer_executes_it(byte_dataset, tmp_path):
    cfg, explicit = build_config(fast_overrides(byte_dataset, tmp_path, **{"train.run_name": "f",
                                                                          "train.num_steps": 2}))
    trainer = Trainer.from_config(cfg, explicit)
    plan = trainer.plan
    with pytest.raises(AttributeError):
        plan.run_id = "x"
    assert plan.cfg.model.vocab_size == 257 and plan.seq_len == 32 and plan.tokens_per_step == 4 * 32
    assert cfg.model.vocab_size != 257  # the settings given are not rewritten: the plan holds a resolved copy
    assert trainer.fit().status == "finished"
