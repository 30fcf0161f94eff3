"""Shared fixtures: a small prepared dataset and fast training settings."""

from __future__ import annotations

import os
import random

import pytest
import torch

# The test models are tiny: one thread each is fastest, and it keeps test processes (and the
# training subprocesses they start, which inherit this) from fighting over the cores.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch.set_num_threads(1)

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex "
         "fourteen jolly boxing frogs and def return import class for in if else").split()


def make_corpus(directory, n_docs=60, words_per_doc=120, seed=0):
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        text = " ".join(rng.choice(WORDS) for _ in range(words_per_doc))
        (directory / f"doc{i:03d}.txt").write_text(f"document {i}: {text}\n")
    return directory


@pytest.fixture(scope="session")
def byte_dataset(tmp_path_factory):
    from gptrain.data.prepare import PrepareConfig, prepare_dataset

    root = tmp_path_factory.mktemp("byte_data")
    corpus = make_corpus(root / "corpus")
    out = root / "dataset"
    prepare_dataset(PrepareConfig(inputs=[str(corpus)], out_dir=str(out), tokenizer="byte", val_fraction=0.1,
                                  min_val_tokens=1000), progress=False)
    return out


class AtStep:
    """A trainer hook that runs `action()` once `step` optimizer steps are done (tests: crashes, stops)."""

    def __init__(self, step, action):
        self.step, self.action = step, action

    def on_step_end(self, trainer, step):
        if step == self.step:
            self.action()

    def on_log(self, trainer, step, row):
        pass


def raise_(exc):
    def action():
        raise exc
    return action


def fast_overrides(dataset, runs_dir, **extra):
    """Settings for a model that trains in a second or two on CPU."""
    o = {
        "data.dataset": str(dataset),
        "train.runs_dir": str(runs_dir),
        "model.n_layers": 2,
        "model.n_heads": 2,
        "model.d_model": 32,
        "model.max_position_embeddings": 32,
        "train.batch_size": 4,
        "train.num_steps": 12,
        "train.log_every": 2,
        "train.eval_every": 6,
        "train.eval_tokens": 512,
        "train.sample_tokens": 8,
        "train.progress": "plain",
        "optim.warmup_steps": 2,
    }
    o.update(extra)
    return o


@pytest.fixture
def private_hf_home(tmp_path_factory):
    """transformers copies the remote code of the folders it loads (GptrainForCausalLM's) under
    HF_HOME/modules, a path it reads once at import: a folder of this test session instead of ~/.cache, the
    same one for every test (transformers imports its package of remote modules once, from the first); the
    environment is restored after each test."""
    import transformers.dynamic_module_utils as dynamic_modules

    home = tmp_path_factory.getbasetemp() / "hf_home"
    with pytest.MonkeyPatch.context() as mp:  # its own: a test's monkeypatch.undo() leaves it in place
        mp.setenv("HF_HOME", str(home))
        mp.setenv("HF_MODULES_CACHE", str(home / "modules"))
        mp.setattr(dynamic_modules, "HF_MODULES_CACHE", str(home / "modules"))
        yield home
