"""Experiment tracking: W&B offline (read back with wandb's own CLI), TensorBoard, resume, failures.

No test needs a network or a W&B account: W&B runs offline, and the online failures point at an
account-less setup or a closed loopback port.
"""

import importlib.util
import json
import math
import time
from pathlib import Path

import pytest
import torch
from conftest import AtStep, fast_overrides, raise_

from gptrain.config import build_config
from gptrain.errors import UserError
from gptrain.sync import composed_history, inspect_segment, sync_run, wandb_cli, wandb_segments
from gptrain.tracking import LossWatch, read_history, read_metrics
from gptrain.trainer import train

needs_wandb = pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")

KEYS = ["train/loss", "train/grad_norm", "lr", "train/tokens_seen", "train/epoch", "tokens_per_sec_per_rank",
        "global_tokens_per_sec", "perf/step_time", "perf/data_time", "perf/fwd_bwd_time", "perf/optim_time",
        "amp", "val/loss", "val/ppl"]


def run(dataset, runs, hooks=(), **extra):
    cfg, explicit = build_config(fast_overrides(dataset, runs, **extra))
    return train(cfg, explicit, hooks=hooks)


def crash_at(crash_step):
    """A hook that makes step `crash_step` + 1 raise, as a bug or a lost device would, after step `crash_step`
    was logged."""
    return AtStep(crash_step + 1, raise_(RuntimeError("simulated crash")))


def tb_scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@needs_wandb
def test_offline_wandb_and_tensorboard_hold_what_metrics_jsonl_holds(byte_dataset, tmp_path):
    res = run(byte_dataset, tmp_path, **{"train.run_name": "w", "tracking.trackers": ["wandb,tensorboard"],
                                         "tracking.wandb_mode": "offline", "tracking.wandb_tags": ["a,b"]})
    assert res.status == "finished"
    history = read_history(res.run_dir)
    assert [r["step"] for r in history] == [2, 4, 6, 8, 10, 12]
    (segment,) = wandb_segments(res.run_dir)
    assert segment.dir.parent == res.run_dir / "wandb"  # the W&B files live inside the run folder

    # History, read back with the official CLI: every logged key, same values, same steps.
    wb = {r["_step"]: r for r in inspect_segment(segment.dir)["history"]}
    assert sorted(wb) == [2, 4, 6, 8, 10, 12]
    for row in history:
        # every train row holds every train key; rows of evaluation steps hold the val keys too
        expected = [k for k in KEYS if not k.startswith("val/") or row["step"] in (6, 12)]
        assert set(expected) <= set(row), (row["step"], set(expected) - set(row))
        for key in expected:
            assert wb[row["step"]][key] == pytest.approx(row[key], rel=1e-9), (key, row["step"])
    assert any(k.startswith("mem/") for k in wb[12])

    # Summary and config, with the official CLI's --summary mode.
    proc = wandb_cli("leet", "inspect", "--summary", "--json", str(segment.dir), timeout=60)
    summary = json.loads(proc.stdout)
    run_json = json.loads((res.run_dir / "run.json").read_text())
    assert summary["run_id"] == run_json["run_id"] and summary["state"] == "finished"
    assert summary["summary"]["train/loss"] == pytest.approx(history[-1]["train/loss"], rel=1e-9)
    assert summary["summary"]["_step"] == 12
    assert sorted(summary["tags"]) == ["a", "b"]
    config = summary["config"]
    assert config["model"]["d_model"] == 32 and config["train"]["log_every"] == 2
    env = json.loads((res.run_dir / "environment.json").read_text())
    for key in ("gptrain_version", "torch", "python", "world_size", "n_params", "tokens_per_step",
                "dataset_fingerprint", "tokenizer"):
        assert config["environment"][key] == env[key], key

    # Text samples: 3 prompts at each of the 2 evaluations, in metrics.jsonl and as a W&B table.
    samples = [r for r in read_metrics(res.run_dir) if r.get("event") == "sample"]
    assert [(s["step"], s["prompt"]) for s in samples] == [(s, p) for s in (6, 12) for p in ("def ", "class ", "import ")]
    assert wb[6]["samples._type"] == "table-file" and [wb[6]["samples.nrows"], wb[12]["samples.nrows"]] == [3, 6]

    # TensorBoard: the same scalars at the same steps.
    tb = tb_scalars(res.run_dir)
    for key in ("train/loss", "lr", "global_tokens_per_sec", "val/loss"):
        expected = [(r["step"], r[key]) for r in history if key in r]
        assert [s for s, _ in tb[key]] == [s for s, _ in expected]
        assert [v for _, v in tb[key]] == pytest.approx([v for _, v in expected], rel=1e-6)


@needs_wandb
def test_resumed_crash_continues_the_same_wandb_run_with_each_step_once(byte_dataset, tmp_path, monkeypatch):
    common = {"train.run_name": "r", "train.save_every": 6, "tracking.trackers": ["wandb", "tensorboard"],
              "tracking.wandb_mode": "offline", "tracking.sample_every": 0}
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(byte_dataset, tmp_path, hooks=[crash_at(10)], **common)  # steps 2..10 logged, last checkpoint at 6
    run_dir = tmp_path / "r"
    assert json.loads((run_dir / "run.json").read_text())["status"] == "crashed"
    res = run(byte_dataset, tmp_path, **{**common, "train.resume": "latest"})
    assert res.status == "finished" and res.final_step == 12

    # metrics.jsonl: steps 8 and 10 were written twice; readers see one value per step, the later one.
    raw_steps = [r["step"] for r in read_metrics(run_dir) if "train/loss" in r]
    assert raw_steps == [2, 4, 6, 8, 10, 8, 10, 12]
    history = read_history(run_dir)
    assert [r["step"] for r in history] == [2, 4, 6, 8, 10, 12]
    later = [r for r in read_metrics(run_dir) if "train/loss" in r][-3:]
    assert [h["train/loss"] for h in history[3:]] == [r["train/loss"] for r in later]

    # W&B: two segments of one run; the second rewinds to the checkpoint's step and goes on from there.
    segs = wandb_segments(run_dir)
    assert len(segs) == 2
    first, second = (inspect_segment(s.dir) for s in segs)
    run_id = json.loads((run_dir / "run.json").read_text())["run_id"]
    assert first["run_id"] == second["run_id"] == run_id
    assert first["exit_code"] == 1 and second["exit_code"] == 0
    assert [r["_step"] for r in first["history"]] == [2, 4, 6, 8, 10]
    assert second["branch_step"] == 6 and [r["_step"] for r in second["history"]] == [8, 10, 12]
    merged = composed_history(run_dir)
    assert [r["_step"] for r in merged] == [2, 4, 6, 8, 10, 12]  # none lost, none twice
    for wb_row, row in zip(merged, history, strict=True):
        assert wb_row["train/loss"] == pytest.approx(row["train/loss"], rel=1e-9)
        if "val/loss" in row:
            assert wb_row["val/loss"] == pytest.approx(row["val/loss"], rel=1e-9)

    # TensorBoard purges the crashed segment's steps after the checkpoint the same way.
    tb = tb_scalars(run_dir)
    assert [s for s, _ in tb["train/loss"]] == [2, 4, 6, 8, 10, 12]
    assert [v for _, v in tb["train/loss"]] == pytest.approx([r["train/loss"] for r in history], rel=1e-6)

    # `gptrain sync` would upload the two segments in this order.
    lines = []
    todo = sync_run(run_dir, dry_run=True, say=lines.append)
    assert [s.dir for s in todo] == [s.dir for s in segs] and len(lines) == 2


@needs_wandb
def test_clean_resume_reattaches_without_rewind(byte_dataset, tmp_path):
    common = {"train.run_name": "c", "tracking.use_wandb": True, "tracking.wandb_mode": "offline",
              "tracking.sample_every": 0}
    run(byte_dataset, tmp_path, **{**common, "train.num_steps": 6})
    run(byte_dataset, tmp_path, **{**common, "train.num_steps": 12, "train.resume": "latest"})
    first, second = (inspect_segment(s.dir) for s in wandb_segments(tmp_path / "c"))
    assert second["branch_step"] is None and first["run_id"] == second["run_id"]
    assert [r["_step"] for r in composed_history(tmp_path / "c")] == [2, 4, 6, 8, 10, 12]


@needs_wandb
def test_sync_takes_a_relative_run_folder_and_ends_a_stalled_upload_with_a_message(byte_dataset, tmp_path,
                                                                                    monkeypatch):
    import subprocess

    import gptrain.sync as sync_mod

    run(byte_dataset, tmp_path, **{"train.run_name": "s", "train.num_steps": 2, "tracking.use_wandb": True,
                                   "tracking.wandb_mode": "offline", "tracking.sample_every": 0})
    monkeypatch.chdir(tmp_path)
    (segment,) = wandb_segments("s")  # as typed after `cd`: the wandb CLI runs elsewhere, so paths go absolute
    assert segment.dir.is_absolute()
    relative = Path("s") / segment.dir.relative_to(tmp_path / "s")
    assert inspect_segment(relative)["run_id"] == json.loads(Path("s/run.json").read_text())["run_id"]

    given = []

    def stalled(*args, timeout=None):  # `wandb sync` with an API key but no network retries forever
        given.append(args[-1])
        raise subprocess.TimeoutExpired(args, timeout)

    monkeypatch.setattr(sync_mod, "wandb_cli", stalled)
    with pytest.raises(UserError, match=r"got no answer from W&B in 5 s\. .*run `gptrain sync s` again"):
        sync_run("s", timeout=5, say=lambda line: None)
    assert given == [str(segment.dir)]


@needs_wandb
@pytest.mark.parametrize("case", ["no-api-key", "unreachable-server"])
def test_failed_online_start_falls_back_to_offline_with_one_warning(byte_dataset, tmp_path, monkeypatch, case):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc credentials
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    if case == "unreachable-server":
        monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
        monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # closed loopback port
    start = time.monotonic()
    res = run(byte_dataset, tmp_path, **{"train.run_name": "f", "tracking.use_wandb": True,
                                         "tracking.wandb_mode": "online", "tracking.wandb_init_timeout": 3.0,
                                         "tracking.sample_every": 0})
    elapsed = time.monotonic() - start
    assert res.status == "finished" and elapsed < 45
    log = (res.run_dir / "train.log").read_text()
    assert log.count("warning:") == 1 and "W&B could not start online" in log
    assert [r["step"] for r in read_history(res.run_dir)] == [2, 4, 6, 8, 10, 12]
    record = json.loads((res.run_dir / "tracking.json").read_text())["wandb"]
    assert record["mode"] == "offline" and record["segments"][0]["status"] == "finished"
    assert len(inspect_segment(wandb_segments(res.run_dir)[0].dir)["history"]) == 6


@needs_wandb
def test_wandb_that_cannot_start_at_all_is_switched_off(byte_dataset, tmp_path, monkeypatch):
    import wandb

    def broken_init(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(wandb, "init", broken_init)
    res = run(byte_dataset, tmp_path, **{"train.run_name": "d", "tracking.use_wandb": True,
                                         "tracking.wandb_mode": "offline", "tracking.sample_every": 0})
    assert res.status == "finished"
    log = (res.run_dir / "train.log").read_text()
    assert log.count("warning:") == 1 and "wandb could not start and is off" in log and "disk full" in log
    assert len(read_history(res.run_dir)) == 6


def test_tracker_failing_mid_run_is_dropped_and_training_goes_on(byte_dataset, tmp_path, monkeypatch):
    from gptrain.tracking.tensorboard_tracker import TensorBoardTracker

    real = TensorBoardTracker.log

    def flaky(self, metrics, step):
        if step >= 6:
            raise ConnectionError("gone")
        real(self, metrics, step)

    monkeypatch.setattr(TensorBoardTracker, "log", flaky)
    res = run(byte_dataset, tmp_path, **{"train.run_name": "m", "tracking.trackers": ["tensorboard"]})
    assert res.status == "finished"
    log = (res.run_dir / "train.log").read_text()
    assert log.count("tracker 'tensorboard' failed") == 1
    assert [r["step"] for r in read_history(res.run_dir)] == [2, 4, 6, 8, 10, 12]
    assert [s for s, _ in tb_scalars(res.run_dir)["train/loss"]] == [2, 4]


def test_loss_watch_alerts_on_non_finite_and_spikes_rate_limited():
    now = [0.0]
    watch = LossWatch(spike_factor=2.0, interval=600, warmup=3, clock=lambda: now[0])
    assert [watch.check(v, s) for s, v in enumerate([4.0, 3.8, 3.6, 3.5])] == [[], [], [], []]
    spike = watch.check(9.0, 5)
    assert [a[0] for a in spike] == ["loss spike"] and "9.0000 at step 5" in spike[0][1]
    assert watch.check(9.5, 6) == []  # rate-limited
    nan = watch.check(math.nan, 7)
    assert [(a[0], a[2]) for a in nan] == [("non-finite loss", "ERROR")]
    now[0] = 601.0
    assert [a[0] for a in watch.check(10.0, 8)] == ["loss spike"]
    assert 3.5 < watch.average < 3.9  # spikes do not drag the running average up


def test_non_finite_loss_raises_one_alert_in_metrics_jsonl(byte_dataset, tmp_path):
    # The GPT-2 family: no logit soft-capping, so a huge learning rate makes the loss itself non-finite.
    res = run(byte_dataset, tmp_path, **{"train.run_name": "n", "optim.lr": 1e6, "optim.grad_clip": 0.0,
                                         "tracking.sample_every": 0, "train.sample_tokens": 0, "model.family": "gpt2"})
    alerts = [r for r in read_metrics(res.run_dir) if r.get("event") == "alert"]
    losses = [r["train/loss"] for r in read_history(res.run_dir) if "train/loss" in r]
    assert any(not math.isfinite(v) for v in losses)
    assert len([a for a in alerts if a["title"] == "non-finite loss"]) == 1
    assert (res.run_dir / "train.log").read_text().count("non-finite train loss") == 1


@needs_wandb
def test_checkpoint_reference_artifact(byte_dataset, tmp_path):
    res = run(byte_dataset, tmp_path, **{"train.run_name": "k", "tracking.use_wandb": True,
                                         "tracking.wandb_mode": "offline", "tracking.wandb_log_checkpoints": "reference",
                                         "tracking.sample_every": 0})
    ckpts = [r for r in read_metrics(res.run_dir) if r.get("event") == "checkpoint"]
    assert [c["step"] for c in ckpts] == [12]
    (segment,) = wandb_segments(res.run_dir)
    proc = wandb_cli("leet", "inspect", "--json", str(segment.dir), timeout=60)
    artifacts = [json.loads(line)["artifact"] for line in proc.stdout.splitlines() if '"type":"artifact"' in line]
    assert len(artifacts) == 1 and artifacts[0]["type"] == "model"
    meta = json.loads(artifacts[0]["metadata"])
    assert meta["step"] == 12 and meta["path"] == str((res.run_dir / "checkpoints" / "step_0000012").resolve())


# --------------------------------------------------------------------------- metrics.jsonl events on resume


def test_events_of_a_crashed_segment_after_the_checkpoint_are_superseded(tmp_path):
    from gptrain.tracking.jsonl import JsonlTracker, read_events, read_history

    first = JsonlTracker(tmp_path)
    for step in (2, 4, 6, 8):
        first.log({"train/loss": float(step)}, step)
    first.log_samples([{"prompt": "p", "completion": "old-6"}], 6)
    first.log_checkpoint(tmp_path / "step_6", 6, {"tokens_seen": 6})
    first.log_samples([{"prompt": "p", "completion": "old-8"}], 8)
    first.alert("loss spike", "spike", "WARN", 8)
    first.finish("crashed")
    second = JsonlTracker(tmp_path, resumed_from_step=6)
    second.log({"train/loss": 80.0}, 8)
    second.log_samples([{"prompt": "p", "completion": "new-8"}], 8)
    second.finish("finished")

    assert [(r["step"], r["completion"]) for r in read_events(tmp_path, "sample")] == [(6, "old-6"), (8, "new-8")]
    assert read_events(tmp_path, "alert") == []  # the alert of step 8 belongs to the recomputed segment
    assert [r["step"] for r in read_events(tmp_path, "checkpoint")] == [6]
    assert [r["status"] for r in read_events(tmp_path, "end")] == ["crashed", "finished"]
    assert [(r["step"], r["train/loss"]) for r in read_history(tmp_path)] == [(2, 2.0), (4, 4.0), (6, 6.0), (8, 80.0)]


# --------------------------------------------------------------------------- W&B (offline) and TensorBoard


def wandb_tracker(tmp_path, monkeypatch, **tracking):
    pytest.importorskip("wandb")
    from gptrain.config import TrackingConfig
    from gptrain.tracking.wandb_tracker import WandbTracker

    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))  # artifact staging stays in tmp
    tr = TrackingConfig(wandb_mode="offline", **tracking)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    warnings: list[str] = []
    tracker = WandbTracker(run_dir, "rid" + str(time.time_ns())[-8:], "gptrain-name", tr, {"model": {"d_model": 8}},
                           say=lambda m: None, warn=warnings.append)
    tracker.test_warnings = warnings  # the artifact worker thread reports failures here
    return tracker


def inspect(tracker):
    from gptrain.sync import wandb_cli

    summary = json.loads(wandb_cli("leet", "inspect", "--summary", "--json", str(tracker.segment_dir),
                                   timeout=60).stdout)
    records = wandb_cli("leet", "inspect", "--json", str(tracker.segment_dir), timeout=60).stdout
    artifacts = [json.loads(line)["artifact"] for line in records.splitlines() if '"type":"artifact"' in line]
    return summary, artifacts


def fake_checkpoint(tmp_path, step):
    from gptrain import checkpoint as C

    return C.save_checkpoint(tmp_path / "run" / "checkpoints", step, {"w": torch.zeros(2)}, {"opt": {}},
                             {"val_loss": None})


@needs_wandb
def test_wandb_summary_status_best_val_name_and_uploaded_checkpoints(tmp_path, monkeypatch):
    tracker = wandb_tracker(tmp_path, monkeypatch, wandb_run_name="display-name", wandb_log_checkpoints="upload")
    for step, val in ((2, 3.0), (4, 2.0), (6, 2.5)):
        tracker.log({"train/loss": val + 1, "val/loss": val}, step)
    tracker.log_checkpoint(fake_checkpoint(tmp_path, 4), 4, {"val_loss": 2.0})
    tracker.log_checkpoint(fake_checkpoint(tmp_path, 6), 6, {"val_loss": 2.5})
    tracker.finish("interrupted")
    assert tracker.test_warnings == []
    summary, artifacts = inspect(tracker)
    assert summary["name"] == "display-name"  # --wandb-run-name wins over the gptrain run name
    assert summary["summary"]["gptrain/status"] == "interrupted"
    assert summary["summary"]["val/loss"] == {"min": 2.0}  # the best val loss, not the last
    assert summary["exit_code"] == 255
    assert [sorted(a["aliases"]) for a in artifacts] == [["latest", "step-4"], ["latest", "step-6"]]
    for a, step in zip(artifacts, (4, 6), strict=True):
        files = sorted(c["path"] for c in a["manifest"]["contents"])
        assert files == [f"step_{step:07d}/{n}" for n in ("COMPLETE", "info.json", "model.pt", "train.pt")]
        assert all(not c.get("ref") for c in a["manifest"]["contents"])  # uploaded, not referenced


@needs_wandb
def test_wandb_logs_no_checkpoint_artifact_by_default(tmp_path, monkeypatch):
    tracker = wandb_tracker(tmp_path, monkeypatch)
    tracker.log({"train/loss": 1.0}, 2)
    tracker.log_checkpoint(fake_checkpoint(tmp_path, 2), 2, {"val_loss": None})
    tracker.finish("finished")
    summary, artifacts = inspect(tracker)
    assert summary["summary"]["gptrain/status"] == "finished" and artifacts == []


def test_tensorboard_records_samples_alerts_and_status_as_text(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from gptrain.tracking.tensorboard_tracker import TensorBoardTracker

    tb = TensorBoardTracker(tmp_path)
    tb.log_config({"model": {"d_model": 8}})
    tb.log({"train/loss": 2.0, "amp": True, "note": "text"}, 2)
    tb.log_samples([{"prompt": "def ", "completion": "f(x)"}], 2)
    tb.alert("loss spike", "spiked", "WARN", 2)
    tb.finish("finished")
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    assert tags["scalars"] == ["train/loss"]  # booleans and strings are not scalars
    texts = {t.split("/")[0]: acc.Tensors(t)[-1].tensor_proto.string_val[0].decode() for t in tags["tensors"]}
    assert set(texts) == {"config", "samples", "alerts", "status"}
    assert "`'def '` | `'f(x)'`" in texts["samples"] and texts["status"] == "finished"


# --------------------------------------------------------------------------- text samples


def tiny_model():
    from gptrain.model import GPT, ModelConfig

    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=257, n_layers=1, n_heads=2, d_model=16, max_position_embeddings=64)).eval()


def test_samples_depend_on_prompt_and_seed_only_and_leave_the_global_rng_alone():
    from gptrain.data.tokenizer import ByteTokenizer
    from gptrain.tracking.samples import sample_completions

    model, tok, cpu = tiny_model(), ByteTokenizer(), torch.device("cpu")
    torch.manual_seed(123)
    before = torch.get_rng_state()
    together = sample_completions(model, tok, ["def ", "class "], 24, seed=7, device=cpu)
    assert torch.equal(torch.get_rng_state(), before)  # training's random stream is untouched
    alone = sample_completions(model, tok, ["class "], 24, seed=7, device=cpu)
    assert together[1] == alone[0] == {"prompt": "class ", "completion": alone[0]["completion"]}
    assert sample_completions(model, tok, ["class "], 24, seed=8, device=cpu) != alone
