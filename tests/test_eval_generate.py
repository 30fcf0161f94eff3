"""`gptrain eval` and `gptrain generate` as functions: the original tool's flags, split evaluation
under torchrun, bits per byte, clear errors for damaged checkpoints, greedy / top-p / seeded sampling."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gptrain.data.tokenizer import ByteTokenizer
from gptrain.errors import UserError
from gptrain.evaluate import (
    bits_per_byte,
    eval_bytes_per_token,
    evaluate_checkpoint,
    evaluate_loss,
    rank_windows,
)
from gptrain.generate import filter_logits, generate, load_trained_model
from gptrain.model import GPT, ModelConfig

SEQ = 16
MODEL = dataclasses.asdict(ModelConfig(vocab_size=257, max_position_embeddings=32, n_layers=1, n_heads=2, d_model=32))


def write_checkpoint(root: Path, model: GPT | None = None, info: dict | None = None, state: dict | None = None,
                     step: int = 5) -> Path:
    """A checkpoint folder in checkpoint.py's layout (model.pt, info.json, COMPLETE), written by hand."""
    if model is None:
        torch.manual_seed(0)
        model = GPT(ModelConfig(**MODEL))
    ckpt = root / "checkpoints" / f"step_{step:07d}"
    ckpt.mkdir(parents=True)
    torch.save(model.state_dict() if state is None else state, ckpt / "model.pt")
    info = info if info is not None else {
        "step": step, "config": {"model": MODEL, "data": {"seq_len": SEQ}, "train": {"batch_size": 3,
                                                                                     "eval_tokens": 5 * SEQ}},
        "tokenizer": {"spec": "byte"}}
    (ckpt / "info.json").write_text(json.dumps(info))
    (ckpt / "COMPLETE").write_text("")
    return ckpt


def reference_loss(model: GPT, tokens: np.ndarray, windows: int) -> float:
    rows = torch.from_numpy(np.stack([tokens[w * SEQ : w * SEQ + SEQ + 1] for w in range(windows)]).astype(np.int64))
    with torch.no_grad():
        return model.eval()(rows[:, :-1], rows[:, 1:]).item()


# ---------------------------------------------------------------------------------------- evaluation
def test_rank_windows_cover_every_window_exactly_once():
    for n in range(1, 30):
        for world in range(1, 9):
            shares = [list(rank_windows(n, r, world)) for r in range(world)]
            assert sorted(w for s in shares for w in s) == list(range(n))


def test_eval_of_a_prepared_dataset_with_bits_per_byte(byte_dataset, tmp_path):
    ckpt = write_checkpoint(tmp_path / "run")
    model, tok, _ = load_trained_model(str(tmp_path / "run"), "cpu")
    val = np.fromfile(byte_dataset / "val.bin", dtype=np.uint16)
    r = evaluate_checkpoint(str(tmp_path / "run"), data=str(byte_dataset), device="cpu")
    assert (r["checkpoint"], r["step"], r["tokens"], r["windows"]) == (str(ckpt), 5, 5 * SEQ, 5)  # the run's budget
    assert r["loss"] == pytest.approx(reference_loss(model, val, 5), rel=1e-6)
    targets = val[1 : 5 * SEQ + 1]
    nbytes = int((targets < 256).sum())  # byte tokens are one byte each, end-of-text none
    assert r["bpb"] == pytest.approx(bits_per_byte(r["loss"], 5 * SEQ, nbytes), rel=1e-9)
    assert r["bytes_per_token"] == pytest.approx(eval_bytes_per_token(val, tok, SEQ, 5 * SEQ))
    # the original's flags: --seq-len, --batch-size, --max-tokens
    r8 = evaluate_checkpoint(str(tmp_path / "run"), data=str(byte_dataset), seq_len=8, batch_size=2,
                             max_tokens=7 * 8, device="cpu")
    rows = torch.from_numpy(np.stack([val[w * 8 : w * 8 + 9] for w in range(7)]).astype(np.int64))
    with torch.no_grad():
        assert r8["loss"] == pytest.approx(model(rows[:, :-1], rows[:, 1:]).item(), rel=1e-6)
    with pytest.raises(UserError, match="longer than the model's context"):
        evaluate_checkpoint(str(tmp_path / "run"), data=str(byte_dataset), seq_len=64, device="cpu")


def test_eval_of_text_files_and_of_npy_shards(tmp_path):
    write_checkpoint(tmp_path / "run")
    model, _, _ = load_trained_model(str(tmp_path / "run"), "cpu")
    text = "the validation text, in a file of its own. " * 20
    (tmp_path / "val.txt").write_text(text)
    r = evaluate_checkpoint(str(tmp_path / "run"), data_mode="text", val_data=[str(tmp_path / "val.txt")],
                            tokenizer_name="byte", device="cpu")
    tokens = np.array(list(text.encode()) + [256])
    assert r["loss"] == pytest.approx(reference_loss(model, tokens, 5), rel=1e-6)
    assert r["bpb"] == pytest.approx(r["loss"] / math.log(2), rel=1e-9)  # every scored token is one byte
    np.save(tmp_path / "val_000000.npy", tokens.astype(np.uint16))
    r_npy = evaluate_checkpoint(str(tmp_path / "run"), data_mode="fineweb_npy",
                                val_npy=[str(tmp_path / "val_000000.npy")], device="cpu")
    assert r_npy["loss"] == pytest.approx(r["loss"], rel=1e-9)
    with pytest.raises(UserError, match="is not the tokenizer the model was trained with"):
        evaluate_checkpoint(str(tmp_path / "run"), val_data=[str(tmp_path / "val.txt")],
                            tokenizer_name=str(_bpe_file(tmp_path)), device="cpu")
    with pytest.raises(UserError, match="needs --val-npy"):
        evaluate_checkpoint(str(tmp_path / "run"), data_mode="fineweb_npy", device="cpu")
    np.save(tmp_path / "big.npy", np.array([300] * 100, dtype=np.uint16))
    with pytest.raises(UserError, match="token id 300, beyond the model's 257 ids"):
        evaluate_checkpoint(str(tmp_path / "run"), val_npy=[str(tmp_path / "big.npy")], device="cpu")


def _bpe_file(tmp_path: Path) -> Path:
    from gptrain.data.tokenizer import train_bpe

    path = tmp_path / "bpe.json"
    path.write_text(train_bpe(["some text to learn a few merges from " * 50], 300).to_json())
    return path


def test_eval_of_non_finite_weights_is_a_clear_error(byte_dataset, tmp_path):
    torch.manual_seed(0)
    model = GPT(ModelConfig(**MODEL))
    with torch.no_grad():
        model.blocks["0"].mlp.fc_in.weight[0, 0] = float("nan")
    write_checkpoint(tmp_path / "run", model)
    with pytest.raises(UserError, match="hold NaN or inf .*blocks.0.mlp.fc_in.weight.*diverged"):
        evaluate_checkpoint(str(tmp_path / "run"), data=str(byte_dataset), device="cpu")


def test_eval_with_a_non_finite_loss_is_a_clear_error(byte_dataset, tmp_path, monkeypatch):
    write_checkpoint(tmp_path / "run")
    monkeypatch.setattr(GPT, "forward", lambda self, x, y=None, **kw: torch.tensor(float("inf")))
    with pytest.raises(UserError, match="validation loss of .* is not finite"):
        evaluate_checkpoint(str(tmp_path / "run"), data=str(byte_dataset), device="cpu")


EVAL_SCRIPT = """
import json, os, sys
from gptrain.evaluate import evaluate_checkpoint
r = evaluate_checkpoint(sys.argv[1], data=sys.argv[2], max_tokens=int(sys.argv[3]), batch_size=2, device="cpu")
with open(os.path.join(sys.argv[4], f"rank{r['rank']}.json"), "w") as f:
    json.dump(r, f)
"""


def test_eval_under_torchrun_splits_the_windows_and_matches_one_process(byte_dataset, tmp_path):
    write_checkpoint(tmp_path / "run")
    script = tmp_path / "eval_script.py"
    script.write_text(EVAL_SCRIPT)
    windows = 5  # odd: a padded sampler would score one of them twice
    single = evaluate_checkpoint(str(tmp_path / "run"), data=str(byte_dataset), max_tokens=windows * SEQ,
                                 batch_size=2, device="cpu")
    out = tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script),
           str(tmp_path / "run"), str(byte_dataset), str(windows * SEQ), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        assert r["world_size"] == 2
        assert r["tokens"] == windows * SEQ  # every window once, summed over both ranks
        assert r["loss"] == pytest.approx(single["loss"], rel=1e-6)
        assert r["bpb"] == pytest.approx(single["bpb"], rel=1e-6)


def test_evaluate_loss_scores_the_same_windows_whatever_the_batch(byte_dataset):
    torch.manual_seed(0)
    model = GPT(ModelConfig(**MODEL))
    val = np.fromfile(byte_dataset / "val.bin", dtype=np.uint16)
    losses = {b: evaluate_loss(model, val, SEQ, 7 * SEQ, b, torch.device("cpu"))[0] for b in (1, 3, 7)}
    assert losses[1] == pytest.approx(losses[3], rel=1e-6) and losses[1] == pytest.approx(losses[7], rel=1e-6)


def test_bits_per_byte_helpers():
    assert bits_per_byte(math.log(2), 10, 10) == pytest.approx(1.0)
    assert bits_per_byte(2 * math.log(2), 10, 5) == pytest.approx(4.0)  # 2 bits per token, 2 tokens per byte
    tok = ByteTokenizer()
    val = np.array([104, 105, 256, 106, 107, 256, 108, 109, 110], dtype=np.uint16)
    assert eval_bytes_per_token(val, tok, 4, 8) == pytest.approx(6 / 8)  # targets: 2 end-of-text among 8
    assert eval_bytes_per_token(val, None, 4, 8) is None


# ---------------------------------------------------------------------------------------- loading a model
def test_damaged_checkpoints_are_one_clear_error(tmp_path):
    torch.manual_seed(0)
    good = GPT(ModelConfig(**MODEL)).state_dict()
    missing = {k: v for k, v in good.items() if not k.startswith("blocks.0.attn")}
    write_checkpoint(tmp_path / "a", state=missing)
    with pytest.raises(UserError, match="does not match the model .*missing blocks.0.attn"):
        load_trained_model(str(tmp_path / "a"), "cpu")
    write_checkpoint(tmp_path / "b", info={"step": 1, "tokenizer": {"spec": "byte"}})
    with pytest.raises(UserError, match="no model settings"):
        load_trained_model(str(tmp_path / "b"), "cpu")
    write_checkpoint(tmp_path / "c", info={"step": 1, "config": {"model": {**MODEL, "n_heads": 3}},
                                           "tokenizer": {"spec": "byte"}})
    with pytest.raises(UserError, match="info.json holds model settings gptrain cannot build a model from"):
        load_trained_model(str(tmp_path / "c"), "cpu")
    write_checkpoint(tmp_path / "e", info={"step": 1, "config": {"model": {**MODEL, "n_layers": "two"}},
                                           "tokenizer": {"spec": "byte"}})
    with pytest.raises(UserError, match="info.json is damaged: .*n_layers"):
        load_trained_model(str(tmp_path / "e"), "cpu")
    write_checkpoint(tmp_path / "d", info={"step": 1, "config": {"model": MODEL}, "tokenizer": {"name": "x"}})
    with pytest.raises(UserError, match="damaged tokenizer record"):
        load_trained_model(str(tmp_path / "d"), "cpu")


# ---------------------------------------------------------------------------------------- sampling
@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=97, max_position_embeddings=64, n_layers=2, n_heads=2, d_model=32)).eval()


def test_greedy_unless_do_sample(model):
    greedy = generate(model, [5, 17, 3], 20, temperature=0)
    assert generate(model, [5, 17, 3], 20, do_sample=False) == greedy  # the CLI's default: --do-sample not given
    assert generate(model, [5, 17, 3], 20, do_sample=False, temperature=1.5, top_k=5, top_p=0.3) == greedy
    assert generate(model, [5, 17, 3], 20, temperature=1.0, top_k=None, top_p=1e-9,
                    generator=torch.Generator().manual_seed(3)) == greedy  # a nucleus of one token


def test_sampling_is_reproducible_with_a_seed_and_varies_without(model):
    def sample(seed, **kw):
        return generate(model, [5, 17, 3], 30, temperature=1.0, top_k=None, generator=torch.Generator().manual_seed(seed),
                        **kw)

    assert sample(1) == sample(1) and sample(1, top_p=0.9) == sample(1, top_p=0.9)
    assert len({tuple(sample(s)) for s in range(5)}) > 1
    assert sample(1) != generate(model, [5, 17, 3], 30, temperature=0)


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([0.15, 0.5, 0.05, 0.3]))
    kept = lambda p: torch.isfinite(filter_logits(logits, None, p)).nonzero().flatten().tolist()  # noqa: E731
    assert kept(0.5) == [1]  # 0.5 alone reaches 0.5
    assert kept(0.7) == [1, 3]  # 0.5 + 0.3
    assert kept(0.9) == [0, 1, 3]  # + 0.15
    assert kept(1.0) == [0, 1, 2, 3]
    assert kept(1e-9) == [1]
    assert torch.isfinite(filter_logits(logits, 2, 0.99)).sum() == 2  # top-k first, then top-p


@pytest.mark.parametrize("knobs, message", [
    (dict(temperature=float("nan")), "--temperature must be a finite number"),
    (dict(temperature=float("inf")), "--temperature must be a finite number"),
    (dict(temperature=-1.0), "--temperature must be a finite number ≥ 0"),
    (dict(top_p=0.0), "--top-p must be in"),
    (dict(top_p=1.5), "--top-p must be in"),
    (dict(top_k=0), "--top-k must be at least 1"),
])
def test_bad_sampling_settings_are_refused(model, knobs, message):
    with pytest.raises(UserError, match=message):
        generate(model, [1, 2], 3, **knobs)
