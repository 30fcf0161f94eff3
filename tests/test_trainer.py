import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import AtStep, fast_overrides, make_corpus, raise_

from gptrain import checkpoint as C
from gptrain.config import build_config
from gptrain.errors import UserError
from gptrain.trainer import train


def run(dataset, runs, **extra):
    cfg, explicit = build_config(fast_overrides(dataset, runs, **extra))
    return train(cfg, explicit)


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_training_writes_a_self_explaining_run_folder(byte_dataset, tmp_path):
    # The GPT-2 family: one AdamW learning rate (the Muon recipe's groups each scale it: tests/test_recipe.py)
    res = run(byte_dataset, tmp_path, **{"train.run_name": "r1", "model.family": "gpt2"})
    d = tmp_path / "r1"
    assert res.status == "finished" and res.final_step == 12 and res.run_dir == d
    for name in ("config.json", "environment.json", "run.json", "metrics.jsonl", "train.log"):
        assert (d / name).is_file(), name
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model"]["vocab_size"] == 257 and cfg["data"]["seq_len"] == 32
    assert json.loads((d / "run.json").read_text())["status"] == "finished"
    rows = [r for r in metrics(d) if r.get("event") == "metrics"]
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4, 6, 8, 10, 12]
    assert train_rows[-1]["train/tokens_seen"] == 12 * 4 * 32
    assert train_rows[-1]["train/loss"] < train_rows[0]["train/loss"]
    val_rows = [r for r in rows if "val/loss" in r]
    assert [r["step"] for r in val_rows] == [6, 12]
    assert val_rows[-1]["val/ppl"] == pytest.approx(math.exp(val_rows[-1]["val/loss"]), rel=1e-6)
    ckpt = C.latest_checkpoint(d / "checkpoints")
    assert ckpt.step == 12
    # the schedule reaches the optimizer: it ran the last step at the logged learning rate
    assert {g["lr"] for g in ckpt.load_train_state()["optimizer"]["param_groups"]} == {train_rows[-1]["lr"]}
    assert res.sample is not None


def test_logged_loss_is_mean_over_micro_batches(byte_dataset, tmp_path):
    # With lr 0 the weights never change, so the logged loss must equal the mean of the
    # per-micro-batch losses recomputed independently.
    res = run(byte_dataset, tmp_path, **{"train.num_steps": 2, "train.log_every": 2, "train.grad_accum_steps": 3,
                                          "optim.lr": 1e-12, "optim.min_lr": 0.0, "train.run_name": "m",
                                          "optim.optimizer": "adamw"})  # one learning rate for every weight
    from gptrain.data.loader import BatchLayout, TrainBatches, open_tokens
    from gptrain.data.prepare import read_meta
    from gptrain.model import GPT, ModelConfig

    ckpt = C.latest_checkpoint(res.run_dir / "checkpoints")
    model = GPT(ModelConfig(**ckpt.info["config"]["model"]))
    model.load_state_dict(ckpt.load_model_state())
    meta = read_meta(byte_dataset)
    b = TrainBatches(open_tokens(byte_dataset / "train.bin", meta["dtype"]), 32, BatchLayout(4, 3), 1337)
    with torch.no_grad():
        losses = [model(*b.get(s, m)).item() for s in range(2) for m in range(3)]
    logged = [r for r in metrics(res.run_dir) if "train/loss" in r][0]["train/loss"]
    assert logged == pytest.approx(sum(losses) / len(losses), rel=1e-5)


def test_accumulated_micro_batches_equal_one_larger_batch(byte_dataset, tmp_path):
    # Batch 8 in one micro-batch and batch 4 × 2 micro-batches read the same windows: the gradient (and so
    # its logged norm, which AdamW's scale invariance would otherwise hide) must be the same.
    rows = {}
    for batch, accum in ((8, 1), (4, 2)):
        res = run(byte_dataset, tmp_path, **{"train.run_name": f"b{batch}", "train.batch_size": batch,
                                              "train.grad_accum_steps": accum, "train.num_steps": 4,
                                              "train.log_every": 1, "train.eval_every": 0})
        rows[batch] = {r["step"]: r for r in metrics(res.run_dir) if "train/loss" in r}
    assert sorted(rows[8]) == sorted(rows[4]) == [1, 2, 3, 4]
    for step, one in rows[8].items():
        two = rows[4][step]
        assert two["train/grad_norm"] == pytest.approx(one["train/grad_norm"], rel=1e-4), step
        assert two["train/loss"] == pytest.approx(one["train/loss"], rel=1e-4), step


def test_gradient_clipping_bounds_the_update(byte_dataset, tmp_path):
    # With eps 1 (much larger than these gradients' square roots) AdamW's step is ~lr·g, so the norm the
    # gradient is clipped to bounds how far any weight moves: two steps of lr 1 at most 2·lr·clip each.
    from gptrain.model import GPT, ModelConfig

    moved = {}
    for clip in (0.0, 1e-3):  # 0: no clipping
        res = run(byte_dataset, tmp_path, **{"train.run_name": f"clip{clip}", "train.num_steps": 2,
                                              "train.eval_every": 0, "optim.grad_clip": clip, "optim.eps": 1.0,
                                              "optim.lr": 1.0, "optim.warmup_steps": 0, "optim.weight_decay": 0.0,
                                              "optim.lr_scheduler": "constant", "optim.optimizer": "adamw"})
        ckpt = C.latest_checkpoint(res.run_dir / "checkpoints")
        torch.manual_seed(ckpt.info["config"]["train"]["seed"])  # the trainer's initialisation, again
        start = GPT(ModelConfig(**ckpt.info["config"]["model"])).state_dict()
        end = ckpt.load_model_state()
        moved[clip] = max((end[k] - start[k]).abs().max().item() for k in end)
    assert moved[1e-3] < 2 * 1e-3
    assert moved[0.0] > 10 * moved[1e-3]


def test_logged_val_loss_is_the_loss_on_the_val_split(byte_dataset, tmp_path):
    # Recomputed here from val.bin with the final weights, and by `gptrain eval`'s function.
    import numpy as np

    from gptrain.evaluate import evaluate_checkpoint
    from gptrain.model import GPT, ModelConfig

    res = run(byte_dataset, tmp_path, **{"train.run_name": "v", "train.num_steps": 4, "train.eval_every": 4})
    logged = [r for r in metrics(res.run_dir) if "val/loss" in r][-1]
    ckpt = C.latest_checkpoint(res.run_dir / "checkpoints")
    model = GPT(ModelConfig(**ckpt.info["config"]["model"])).eval()
    model.load_state_dict(ckpt.load_model_state())
    val = np.fromfile(byte_dataset / "val.bin", dtype=np.uint16).astype(np.int64)
    windows = 512 // 32  # --eval-tokens 512 at context 32
    rows = torch.from_numpy(np.stack([val[i * 32 : i * 32 + 33] for i in range(windows)]))
    with torch.no_grad():
        loss = model(rows[:, :-1], rows[:, 1:]).item()
    assert logged["step"] == 4 and logged["val/tokens"] == windows * 32
    assert logged["val/loss"] == pytest.approx(loss, rel=1e-5)
    evaluated = evaluate_checkpoint(str(res.run_dir), device="cpu")
    assert evaluated["tokens"] == logged["val/tokens"]
    assert evaluated["loss"] == pytest.approx(logged["val/loss"], rel=1e-6)


def test_training_keeps_the_last_n_checkpoints(byte_dataset, tmp_path):
    res = run(byte_dataset, tmp_path, **{"train.run_name": "p", "train.save_every": 2, "train.keep_last": 2,
                                          "train.eval_every": 0})
    assert [p.name for p in C.list_checkpoints(res.run_dir / "checkpoints")] == ["step_0000010", "step_0000012"]


def test_resume_is_bitwise_exact(byte_dataset, tmp_path):
    # 12 straight steps, saving at 6 and 12; then resume the same 12-step schedule from step 6. Dropout
    # draws from the RNG every step, so the checkpoint's RNG state must be restored too.
    straight = run(byte_dataset, tmp_path, **{"train.run_name": "r", "train.num_steps": 12, "train.save_every": 6,
                                              "model.dropout": 0.1})
    ckpts = straight.run_dir / "checkpoints"
    final_straight = C.latest_checkpoint(ckpts).load_model_state()
    losses_straight = {r["step"]: r["train/loss"] for r in metrics(straight.run_dir) if "train/loss" in r}
    n_rows = len(metrics(straight.run_dir))
    resumed = run(byte_dataset, tmp_path, **{"train.resume": str(ckpts / "step_0000006")})
    assert resumed.final_step == 12 and resumed.run_dir == straight.run_dir
    final_resumed = C.latest_checkpoint(ckpts).load_model_state()
    assert all(torch.equal(final_straight[k], final_resumed[k]) for k in final_straight)
    losses_resumed = {r["step"]: r["train/loss"] for r in metrics(resumed.run_dir)[n_rows:] if "train/loss" in r}
    assert losses_resumed == {s: v for s, v in losses_straight.items() if s > 6}


def test_resume_with_another_model_shape_is_an_error(byte_dataset, tmp_path):
    run(byte_dataset, tmp_path, **{"train.run_name": "s", "train.num_steps": 2})
    with pytest.raises(UserError, match="keeps its model shape"):
        run(byte_dataset, tmp_path, **{"train.run_name": "s", "train.resume": "latest", "model.d_model": 64})


def test_resume_refuses_what_it_cannot_continue_and_touches_nothing(byte_dataset, tmp_path):
    from gptrain.data.prepare import PrepareConfig, prepare_dataset

    res = run(byte_dataset, tmp_path, **{"train.run_name": "r", "train.num_steps": 2})
    ckpt = str(C.latest_checkpoint(res.run_dir / "checkpoints").path)
    before = {name: (res.run_dir / name).read_bytes() for name in ("config.json", "run.json", "metrics.jsonl")}
    with pytest.raises(UserError, match="is at step 2, which already reaches --num-steps 2: nothing to train"):
        run(byte_dataset, tmp_path, **{"train.resume": ckpt, "train.num_steps": 2})
    with pytest.raises(UserError, match=r"one profiling cycle .*, but the resumed run has 2 steps left \(--num-steps "
                       r"4 − checkpoint step 2\)\. Raise --num-steps"):
        run(byte_dataset, tmp_path, **{"train.resume": ckpt, "train.num_steps": 4, "profile.enabled": True,
                                       "profile.wait": 1, "profile.warmup": 1, "profile.active": 1})
    with pytest.raises(UserError, match="--resume continues the run r .*, not --run-name other"):
        run(byte_dataset, tmp_path, **{"train.resume": ckpt, "train.run_name": "other", "train.num_steps": 4})
    bpe = tmp_path / "bpe_data"
    prepare_dataset(PrepareConfig(inputs=[str(byte_dataset.parent / "corpus")], out_dir=str(bpe), tokenizer="bpe:300",
                                  val_fraction=0.1, min_val_tokens=500), progress=False)
    with pytest.raises(UserError, match="trained with the tokenizer byte, but the dataset .* is tokenized with bpe:300"):
        run(bpe, tmp_path, **{"train.resume": ckpt, "train.num_steps": 4})
    assert {name: (res.run_dir / name).read_bytes() for name in before} == before
    assert not (tmp_path / "other").exists()


def test_resume_goes_on_with_raw_text_given_now(byte_dataset, tmp_path, monkeypatch):
    # Continued pre-training on new text: --train-data given on resume is prepared and trained on, not
    # ignored in favour of the checkpoint's dataset.
    monkeypatch.setenv("GPTRAIN_CACHE", str(tmp_path / "cache"))
    run(byte_dataset, tmp_path, **{"train.run_name": "more", "train.num_steps": 2})
    overrides = fast_overrides(byte_dataset, tmp_path, **{
        "train.run_name": "more", "train.resume": "latest", "train.num_steps": 4,
        "data.train_files": [str(make_corpus(tmp_path / "new_text", n_docs=30, seed=1))], "data.tokenizer": "byte"})
    del overrides["data.dataset"]
    res = train(*build_config(overrides))
    assert res.final_step == 4
    used = json.loads((res.run_dir / "environment.json").read_text())["dataset_dir"]
    assert used.startswith(str(tmp_path / "cache")) and used != str(byte_dataset)
    # Raw-text settings with no text to prepare (the run trained on a prepared dataset): refused.
    run(byte_dataset, tmp_path, **{"train.run_name": "prepared", "train.num_steps": 2})
    overrides = fast_overrides(byte_dataset, tmp_path, **{"train.run_name": "prepared", "train.resume": "latest",
                                                          "train.num_steps": 4, "data.tokenizer": "byte"})
    del overrides["data.dataset"]
    with pytest.raises(UserError, match="--tokenizer-name would have no text to prepare. Add --train-data"):
        train(*build_config(overrides))


def test_resume_from_corrupt_checkpoint_is_an_error(byte_dataset, tmp_path):
    res = run(byte_dataset, tmp_path, **{"train.run_name": "c", "train.num_steps": 2})
    model_file = C.latest_checkpoint(res.run_dir / "checkpoints").path / "model.pt"
    model_file.write_bytes(model_file.read_bytes()[:100])
    before = {name: (res.run_dir / name).read_bytes() for name in ("config.json", "run.json", "metrics.jsonl")}
    with pytest.raises(UserError, match="corrupt or truncated"):
        run(byte_dataset, tmp_path, **{"train.run_name": "c", "train.resume": "latest", "train.num_steps": 4})
    # nothing on disk changed: the run still reads as finished at step 2
    assert {name: (res.run_dir / name).read_bytes() for name in before} == before


def test_kill_during_save_leaves_previous_checkpoint_usable(byte_dataset, tmp_path, monkeypatch):
    res = run(byte_dataset, tmp_path, **{"train.run_name": "k", "train.num_steps": 4, "train.save_every": 2})
    ckpts = res.run_dir / "checkpoints"
    assert C.latest_checkpoint(ckpts).step == 4

    real_save = torch.save
    calls = {"n": 0}

    def dying_save(obj, f, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:  # model.pt written, then the process "dies" while writing train.pt
            f.write(b"partial")
            raise SystemExit("killed")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(SystemExit):
        run(byte_dataset, tmp_path, **{"train.run_name": "k", "train.num_steps": 6, "train.resume": "latest",
                                       "train.save_every": 6, "train.eval_every": 0})
    monkeypatch.setattr(torch, "save", real_save)
    assert C.latest_checkpoint(ckpts).step == 4  # the half-written step 6 is not taken for complete
    again = run(byte_dataset, tmp_path, **{"train.run_name": "k", "train.num_steps": 6, "train.resume": "latest"})
    assert again.final_step == 6 and C.latest_checkpoint(ckpts).step == 6

    # Re-saving a step that exists (a resume from an earlier checkpoint) and dying half-way through
    # leaves the complete copy in place.
    calls["n"] = 0
    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(SystemExit):
        run(byte_dataset, tmp_path, **{"train.resume": str(ckpts / "step_0000004"), "train.num_steps": 6,
                                       "train.save_every": 6, "train.eval_every": 0})
    monkeypatch.setattr(torch, "save", real_save)
    latest = C.latest_checkpoint(ckpts)
    assert latest.step == 6
    latest.load_model_state(), latest.load_train_state()  # both load: neither is the half-written one


def test_sigterm_saves_and_exits_cleanly(byte_dataset, tmp_path):
    cmd = [sys.executable, "-m", "gptrain", "train", "--data", str(byte_dataset), "--runs-dir", str(tmp_path),
           "--run-name", "sig", "--n-layers", "2", "--n-heads", "2", "--d-model", "32",
           "--max-position-embeddings", "32", "--batch-size", "4", "--num-steps", "100000", "--log-every", "1",
           "--eval-every", "0", "--progress", "plain"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []

    def reader():
        for line in proc.stdout:
            lines.append(line)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    deadline = time.time() + 120
    while not any("step" in line and "loss" in line for line in lines) and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    t.join(timeout=5)
    out = "".join(lines)
    assert "SIGTERM received" in out and "--resume" in out
    run_dir = tmp_path / "sig"
    assert json.loads((run_dir / "run.json").read_text())["status"] == "interrupted"
    step = C.latest_checkpoint(run_dir / "checkpoints").step
    assert step >= 1


def test_changing_num_steps_on_resume_extends_the_schedule(byte_dataset, tmp_path):
    run(byte_dataset, tmp_path, **{"train.run_name": "ext", "train.num_steps": 4})
    res = run(byte_dataset, tmp_path, **{"train.run_name": "ext", "train.num_steps": 8, "train.resume": "latest"})
    cfg = json.loads((res.run_dir / "config.json").read_text())
    assert res.final_step == 8 and cfg["train"]["num_steps"] == 8
    tokens = {r["step"]: r["train/tokens_seen"] for r in metrics(res.run_dir) if "train/loss" in r}
    assert tokens == {s: s * 4 * 32 for s in (2, 4, 6, 8)}  # the count goes on from the checkpoint's


def test_dataset_vocab_larger_than_model_is_an_error(byte_dataset, tmp_path):
    with pytest.raises(UserError, match="Raise --vocab-size"):
        run(byte_dataset, tmp_path, **{"model.vocab_size": 100})


def test_seq_len_above_context_is_an_error(byte_dataset, tmp_path):
    with pytest.raises(UserError, match="longer than the model's context"):
        run(byte_dataset, tmp_path, **{"data.seq_len": 64})


def test_unwritable_runs_dir_is_an_error(byte_dataset, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="cannot write the run folder"):
        run(byte_dataset, blocker / "runs")


def test_environment_record(byte_dataset, tmp_path):
    res = run(byte_dataset, tmp_path, **{"train.run_name": "env", "train.num_steps": 1})
    env = json.loads((res.run_dir / "environment.json").read_text())
    assert env["torch"] == torch.__version__ and env["world_size"] == 1
    assert env["n_params"] > env["n_params_non_embedding"] > 0
    assert env["tokens_per_step"] == 4 * 32 and env["tokenizer"] == "byte"
    assert os.path.basename(env["dataset_dir"]) == "dataset"


# Reading a tensor's value on the host: on a GPU each of these waits for the device to catch up.
HOST_READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__")
# The places of the loop that may wait (log steps, evaluation, checkpoints, text samples, the divergence
# guard's count): the public methods of the components that own them.
def may_wait():
    from gptrain.checkpointer import Checkpointer
    from gptrain.divergence import DivergenceGuard
    from gptrain.reporting import Evaluator, MetricsLogger
    from gptrain.sampling import Sampler

    return [(MetricsLogger, "log"), (Evaluator, "run"), (Checkpointer, "save"), (Sampler, "log"),
            (Sampler, "final"), (DivergenceGuard, "diverged"), (DivergenceGuard, "pop_skipped")]


def test_hot_loop_reads_no_tensor_value_outside_log_eval_and_checkpoint_steps(byte_dataset, tmp_path, monkeypatch):
    """The CPU-side half of "no host synchronisation outside log steps" (benchmarks/gpu_sync_check.py is
    the GPU half): every Python-level read of a tensor's value (.item(), bool(), .tolist(), ...) is
    counted, except inside the trainer's methods that are allowed to wait."""
    import traceback

    from gptrain.trainer import Trainer

    allowed = [1]  # building the trainer may read values freely
    reads: dict[str, int] = {}

    def counting(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if not allowed[0]:
                where = " <- ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}"
                                    for f in reversed(traceback.extract_stack()[-4:-1]))
                reads[f"{name} at {where}"] = reads.get(f"{name} at {where}", 0) + 1
            return original(self, *args, **kwargs)
        return read

    def waiting(original):
        def method(self, *args, **kwargs):
            allowed[0] += 1
            try:
                return original(self, *args, **kwargs)
            finally:
                allowed[0] -= 1
        return method

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    for cls, name in may_wait():
        monkeypatch.setattr(cls, name, waiting(getattr(cls, name)))
    cfg, explicit = build_config(fast_overrides(byte_dataset, tmp_path, **{
        "train.num_steps": 8, "train.log_every": 4, "train.eval_every": 4, "train.grad_accum_steps": 2,
        "train.save_every": 4, "train.sample_tokens": 4}))
    trainer = Trainer.from_config(cfg, explicit)
    allowed[0] -= 1
    result = trainer.fit()
    assert result.status == "finished" and result.final_step == 8 and result.sample
    assert reads == {}, reads
    # The counting itself works: a read in the loop is seen.
    allowed[0] = 0
    torch.ones(()).item()
    assert len(reads) == 1


# --------------------------------------------------------------------------- run folder


def test_run_status_records_the_end_of_every_non_running_status(tmp_path):
    from gptrain.run_folder import read_json, update_run_status

    for status in ("running", "finished", "crashed", "interrupted"):
        update_run_status(tmp_path, status, step=3)
        info = read_json(tmp_path / "run.json")
        assert info["status"] == status and info["step"] == 3
        assert ("ended_at" in info) == (status != "running"), status
        (tmp_path / "run.json").unlink()


def test_environment_record_names_the_git_commit(tmp_path):
    import gptrain
    from gptrain.run_folder import environment_record

    src = Path(gptrain.__file__).resolve().parent
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("gptrain is not running from a git checkout")
    env = environment_record(torch.device("cpu"), 1)
    assert env["git_commit"] == head.stdout.strip() and isinstance(env["git_dirty"], bool)
    assert env["world_size"] == 1 and env["device"] == "cpu" and env["torch"] == torch.__version__


def test_ctrl_c_marks_the_run_interrupted(byte_dataset, tmp_path):
    import gptrain.trainer as trainer_mod
    from gptrain.config import build_config
    from gptrain.tracking import read_metrics

    cfg, explicit = build_config(fast_overrides(byte_dataset, tmp_path, **{"train.run_name": "ctrl-c",
                                                                          "train.sample_tokens": 0}))
    with pytest.raises(KeyboardInterrupt):
        trainer_mod.train(cfg, explicit, hooks=[AtStep(5, raise_(KeyboardInterrupt()))])
    run = tmp_path / "ctrl-c"
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "interrupted" and info["step"] == 5 and "ended_at" in info
    assert [r["status"] for r in read_metrics(run) if r.get("event") == "end"] == ["interrupted"]
