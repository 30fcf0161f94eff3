"""The original tool's command lines run as written (steps cut to what a test affords, the hub tokenizer
replaced by a local one), with the original meaning of their flags."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import make_corpus
from test_distributed import TESTS, torchrun

from gptrain import checkpoint as C
from gptrain.cli import main


def cli(*args):
    return main([str(a) for a in args])


def test_original_wandb_example_under_torchrun(tmp_path):
    """Was: `--seq-len 512 is longer than the model's context (256 positions)`. The context follows the data,
    --grad-accum-steps counts per process (tokens per step = batch × seq-len × accum × processes), and
    --use-wandb streams offline here (no account)."""
    corpus = make_corpus(tmp_path / "data", n_docs=40, words_per_doc=400)
    train_txt = tmp_path / "data" / "train.txt"
    train_txt.write_text("".join(p.read_text() for p in sorted(corpus.glob("doc*.txt"))))
    args = ["--train-data", train_txt, "--tokenizer-name", "byte", "--seq-len", "512", "--batch-size", "2",
            "--num-steps", "2", "--use-wandb", "--wandb-project", "mini-llm", "--wandb-run-name", "ddp_test",
            "--grad-accum-steps", "2", "--runs-dir", tmp_path / "runs", "--run-name", "w", "--eval-tokens", "1024",
            "--progress", "plain", "--sample-tokens", "0"]
    proc = torchrun(2, [str(a) for a in args], timeout=300, env={"WANDB_MODE": "offline",
                                                                 "GPTRAIN_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "context 512 (raised to --seq-len)" in proc.stdout
    env = json.loads((tmp_path / "runs" / "w" / "environment.json").read_text())
    assert env["tokens_per_step"] == 2 * 512 * 2 * 2
    cfg = json.loads((tmp_path / "runs" / "w" / "config.json").read_text())
    assert cfg["model"]["max_position_embeddings"] == 512 and cfg["train"]["grad_accum_steps"] == 2
    assert cfg["tracking"]["wandb_project"] == "mini-llm" and (tmp_path / "runs" / "w" / "wandb").is_dir()


def test_explicit_context_shorter_than_seq_len_stays_an_error(byte_dataset, tmp_path, capsys):
    assert cli("train", "--data", byte_dataset, "--runs-dir", tmp_path, "--seq-len", "64",
               "--max-position-embeddings", "32") == 2
    assert "--seq-len 64 is longer than the model's context (32 positions)" in capsys.readouterr().err


def test_original_resume_line_starts_then_continues(byte_dataset, tmp_path, capsys, monkeypatch):
    """Was: `--resume: no run with a complete checkpoint`. The same command line starts the run, then continues."""
    monkeypatch.chdir(tmp_path)
    line = ["train", "--n-layers", "4", "--d-model", "256", "--n-heads", "4", "--d-ff", "1024", "--batch-size", "16",
            "--seq-len", "64", "--num-steps", "2", "--use-tensor-parallel", "--resume", "--checkpoint-path",
            "checkpoints/exp1.pt", "--data", byte_dataset, "--progress", "plain", "--sample-tokens", "0",
            "--eval-tokens", "256"]
    assert cli(*line) == 0
    out = capsys.readouterr().out
    assert "--resume: no complete checkpoint in checkpoints/exp1.pt yet: starting from step 0" in out
    assert C.latest_checkpoint(tmp_path / "checkpoints" / "exp1.pt").step == 2
    line[line.index("--num-steps") + 1] = "4"
    assert cli(*line) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "steps 2→4" in out
    assert C.latest_checkpoint(tmp_path / "checkpoints" / "exp1.pt").step == 4
    # Launched once more (a restart after the last save): the run is complete, nothing to do, exit 0.
    assert cli(*line) == 0
    assert "--resume: the run already reached step 4 (--num-steps 4); nothing to train" in capsys.readouterr().out
    # An explicit path that does not exist stays an error.
    assert cli("train", "--resume", tmp_path / "nope", "--data", byte_dataset) == 2
    assert "does not exist" in capsys.readouterr().err


def test_nanogpt_folder_without_meta_pkl_trains_and_evaluates(tmp_path, capsys):
    """Was: it asked for the GPT-2 tokenizer. Byte-level ids, no meta.pkl: --vocab-size sets the vocabulary."""
    rng = np.random.default_rng(0)
    data = tmp_path / "nano"
    data.mkdir()
    text = ("hello world, this is nanoGPT data. " * 300).encode()
    ids = np.frombuffer(text, dtype=np.uint8).astype(np.uint16)
    ids[: len(ids) * 9 // 10].tofile(data / "train.bin")
    ids[len(ids) * 9 // 10:].tofile(data / "val.bin")
    assert rng is not None
    args = ["--data", data, "--vocab-size", "256", "--runs-dir", tmp_path / "runs", "--run-name", "n", "--n-layers", "2",
            "--n-heads", "2", "--d-model", "32", "--max-position-embeddings", "32", "--batch-size", "4",
            "--num-steps", "6", "--eval-tokens", "256", "--progress", "plain"]
    assert cli("train", *args) == 0
    out = capsys.readouterr().out
    assert "done: 6 steps" in out
    cfg = json.loads((tmp_path / "runs" / "n" / "config.json").read_text())
    assert cfg["model"]["vocab_size"] == 256 and cfg["data"]["tokenizer"] is None
    assert cli("eval", "--checkpoint-path", tmp_path / "runs" / "n", "--max-tokens", "128", "--batch-size", "2") == 0
    assert "val loss" in capsys.readouterr().out


def test_original_eval_and_generate_flags(byte_dataset, tmp_path, capsys):
    assert cli("train", "--data", byte_dataset, "--runs-dir", tmp_path, "--run-name", "g", "--n-layers", "2",
               "--n-heads", "2", "--d-model", "32", "--max-position-embeddings", "32", "--batch-size", "4",
               "--num-steps", "4", "--eval-tokens", "256", "--progress", "plain", "--sample-tokens", "0") == 0
    capsys.readouterr()
    val = tmp_path / "val.txt"
    val.write_text("the quick brown fox jumps over a lazy dog " * 20)
    assert cli("eval", "--checkpoint-path", tmp_path / "g", "--data-mode", "text", "--val-data", val,
               "--tokenizer-name", "byte", "--seq-len", "32", "--batch-size", "2", "--max-tokens", "256", "--no-amp",
               "--seed", "1") == 0
    out = capsys.readouterr().out
    assert "256 val tokens (8 windows of 32" in out and "bits per byte" in out
    # greedy unless --do-sample (the original's default); top-p with sampling
    assert cli("generate", "--checkpoint-path", tmp_path / "g", "--prompt", "the", "--max-new-tokens", "8") == 0
    greedy = capsys.readouterr().out
    assert cli("generate", tmp_path / "g", "--prompt", "the", "--max-new-tokens", "8", "--temperature", "0") == 0
    assert capsys.readouterr().out == greedy
    assert cli("generate", tmp_path / "g", "--prompt", "the", "--max-new-tokens", "8", "--do-sample", "--top-p",
               "0.9", "--seed", "3") == 0
    sampled = capsys.readouterr().out
    assert cli("generate", tmp_path / "g", "--prompt", "the", "--max-new-tokens", "8", "--do-sample", "--top-p",
               "0.9", "--seed", "3") == 0
    assert capsys.readouterr().out == sampled  # seeded: reproducible


@pytest.mark.parametrize("extra, message", [
    (["--global-batch-size", "6"], "--global-batch-size 6 is not a multiple of --batch-size 4"),
    (["--global-batch-size", "8", "--grad-accum-steps", "3"], "--global-batch-size 8 needs 2 micro-batches per "
                                                              "process"),
])
def test_batch_flags_that_disagree_are_refused(byte_dataset, tmp_path, capsys, extra, message):
    assert cli("train", "--data", byte_dataset, "--runs-dir", tmp_path, "--batch-size", "4", *extra) == 2
    assert message in capsys.readouterr().err


def test_torchrun_max_restarts_continues_to_the_same_weights(byte_dataset, tmp_path):
    """A worker killed mid-run under `torchrun --max-restarts`: the restarted attempt resumes the newest
    checkpoint (--resume: relaunch-safe) and ends on the weights of an uninterrupted run."""
    import subprocess
    import sys

    import torch

    common = ["--data", str(byte_dataset), "--runs-dir", str(tmp_path), "--n-layers", "2", "--n-heads", "2",
              "--d-model", "32", "--max-position-embeddings", "32", "--batch-size", "4", "--num-steps", "8",
              "--save-every", "2", "--eval-every", "0", "--eval-tokens", "256", "--sample-tokens", "0",
              "--progress", "plain", "--resume"]
    ref = torchrun(2, common + ["--run-name", "ref"], timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=2",
           str(TESTS / "dist_worker.py"), "train", *common, "--run-name", "restarted"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400,
                          env={**__import__("os").environ, "DIE_RANK": "1", "DIE_AT_STEP": "5", "DIE_ATTEMPT": "0"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "rank 1: dying at step 5" in proc.stderr
    assert "resumed from" in proc.stdout and "step_0000004" in proc.stdout
    a = C.latest_checkpoint(tmp_path / "ref" / "checkpoints")
    b = C.latest_checkpoint(tmp_path / "restarted" / "checkpoints")
    assert a.step == b.step == 8
    wa, wb = a.load_model_state(), b.load_model_state()
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_fineweb_npy_and_llmc_shards_train_as_the_original_spelled_them(tmp_path, capsys):
    """`--data-mode fineweb_npy --train-npy … --val-npy …` (build-nanoGPT's .npy shards) and llm.c's .bin
    shards by glob: memory-mapped in place, trained on, evaluated."""
    rng = np.random.default_rng(0)
    text = np.frombuffer(("the quick brown fox jumps over the lazy dog. " * 400).encode(), dtype=np.uint8)
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(3):
        np.save(shards / f"edufineweb_train_{i:06d}.npy", text.astype(np.uint16))
    np.save(shards / "edufineweb_val_000000.npy", rng.permutation(text).astype(np.uint16))
    tiny = ["--n-layers", "2", "--n-heads", "2", "--d-model", "32", "--max-position-embeddings", "32",
            "--batch-size", "4", "--num-steps", "3", "--eval-tokens", "256", "--progress", "plain",
            "--runs-dir", tmp_path / "runs", "--vocab-size", "256"]
    assert cli("train", "--data-mode", "fineweb_npy", "--train-npy", *sorted(shards.glob("*train*.npy")),
               "--val-npy", shards / "edufineweb_val_000000.npy", "--run-name", "npy", *tiny) == 0
    assert "done: 3 steps" in capsys.readouterr().out
    # llm.c: 256 int32 header (magic 20240520, version 1, token count), then uint16 tokens
    bins = tmp_path / "llmc"
    bins.mkdir()
    for name in ("fineweb_train_000001.bin", "fineweb_train_000002.bin", "fineweb_val_000000.bin"):
        header = np.zeros(256, dtype=np.int32)
        header[:3] = (20240520, 1, len(text))
        with open(bins / name, "wb") as f:
            f.write(header.tobytes())
            f.write(text.astype(np.uint16).tobytes())
    assert cli("train", "--data", f"{bins}/fineweb_*.bin", "--run-name", "llmc", *tiny) == 0
    out = capsys.readouterr().out
    assert "done: 3 steps" in out
    cfg = json.loads((tmp_path / "runs" / "llmc" / "config.json").read_text())
    assert cfg["model"]["vocab_size"] == 256
    bad = bins / "bad"
    bad.mkdir()
    (bad / "x_train.bin").write_bytes(np.zeros(256, dtype=np.int32).tobytes() + b"\0\0")
    assert cli("train", "--data", f"{bad}/*.bin", "--run-name", "bad", *tiny) == 2
    assert "magic" in capsys.readouterr().err
