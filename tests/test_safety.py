"""Nothing lost, ever (issue 18): damaged records, one writer per run, run names, failed and non-finite
checkpoint saves, pruning, and the memory check — through the components' own APIs."""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gptrain import checkpoint as C
from gptrain.errors import UserError
from gptrain.memory_estimate import (
    MemoryEstimate,
    check_fits,
    count_parameters,
    estimate_training_memory,
    format_bytes,
    host_available_memory,
)
from gptrain.run_folder import (
    RunLock,
    check_run_name,
    open_run_dir,
    read_run_record,
    rebuild_run_record,
    record_run_status,
    run_dir_for_resume,
)
from gptrain.runs import runs_report, summarize_run
from gptrain.tracking.jsonl import JsonlTracker, end_cut_line, read_history, read_jsonl

SRC = str(Path(__file__).resolve().parents[1] / "src")


def metrics(step, t, **values):
    return json.dumps({"event": "metrics", "step": step, "time": t, **values}) + "\n"


def write_run(run_dir: Path, metrics_text: str | bytes, **record) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    info = {"run_id": "id-" + run_dir.name, "name": run_dir.name, "created_at": 1000.0, "status": "finished",
            **record}
    (run_dir / "run.json").write_text(json.dumps(info))
    data = metrics_text.encode() if isinstance(metrics_text, str) else metrics_text
    (run_dir / "metrics.jsonl").write_bytes(data)
    return run_dir


# --------------------------------------------------------------------------- readers that survive damage

DAMAGED = (metrics(2, 1001.0, **{"train/loss": 4.0}).encode()
           + b"\xff\xfe not utf-8 \x80\n"                          # bytes a disk error left
           + b"[1, 2, 3]\n"                                         # JSON, not an object
           + b'"a string"\n'
           + b'{"event": "metrics", "step": "four", "time": 1002.0}\n'  # an object with a step of the wrong type
           + metrics(4, 1003.0, **{"train/loss": 3.0}).encode()
           + b'{"event": "metrics", "step": 6, "ti')                  # a power loss cut the last line


def test_read_jsonl_skips_and_counts_every_kind_of_damage(tmp_path):
    (tmp_path / "metrics.jsonl").write_bytes(DAMAGED)
    rows, skipped = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [2, 4] and skipped == 5
    assert [r["step"] for r in read_history(tmp_path)] == [2, 4]
    assert read_jsonl(tmp_path / "missing.jsonl") == ([], 0)


def test_runs_lists_healthy_and_damaged_runs_and_says_what_is_wrong(tmp_path):
    write_run(tmp_path / "a-healthy", metrics(2, 1001.0, **{"train/loss": 2.5}), created_at=1000.0)
    write_run(tmp_path / "b-damaged-lines", DAMAGED, created_at=1001.0)
    write_run(tmp_path / "c-bad-record", metrics(2, 1001.0, **{"train/loss": 2.0}), created_at=1002.0)
    (tmp_path / "c-bad-record" / "run.json").write_bytes(b"\xff\xff{")  # not UTF-8
    lost = write_run(tmp_path / "d-no-record", metrics(2, 1001.0, **{"train/loss": 1.5}))
    (lost / "run.json").unlink()
    write_run(tmp_path / "e-list-record", "", created_at=1003.0)
    (tmp_path / "e-list-record" / "run.json").write_text("[1, 2]")
    write_run(tmp_path / "f-wrong-types", metrics(2, 1001.0), created_at=1004.0)
    (tmp_path / "f-wrong-types" / "run.json").write_text(json.dumps({"created_at": "yesterday", "step": "x",
                                                                      "status": 3, "pid": "p"}))
    out = runs_report(tmp_path)
    table, notes = out.split("\n\n")
    names = [line.split()[0] for line in table.splitlines()[1:]]
    assert sorted(names) == ["a-healthy", "b-damaged-lines", "c-bad-record", "d-no-record", "e-list-record",
                             "f-wrong-types"]
    healthy = next(line for line in table.splitlines() if line.startswith("a-healthy")).split()
    assert healthy[1:3] == ["finished", "2"] and "2.5000" in healthy
    damaged = next(line for line in table.splitlines() if line.startswith("b-damaged-lines")).split()
    assert damaged[2] == "4" and "3.0000" in damaged  # its readable events still count
    assert "note: b-damaged-lines: " in notes and "skipped 5 damaged lines" in notes
    assert "c-bad-record" in notes and "run.json is damaged: its record was rebuilt" in notes
    assert "d-no-record" in notes and "run.json is missing" in notes
    assert "f-wrong-types" in notes and "ignored status, step, created_at (wrong type)" in notes
    as_json = {r["name"]: r for r in json.loads(runs_report(tmp_path, as_json=True))}
    assert as_json["b-damaged-lines"]["problems"][0].endswith("the other events are read as usual.")
    assert as_json["a-healthy"]["problems"] == []


def test_runs_lists_a_folder_that_summarize_cannot_read(tmp_path, monkeypatch):
    import gptrain.runs as runs

    write_run(tmp_path / "a", metrics(2, 1001.0))
    write_run(tmp_path / "b", metrics(2, 1001.0), created_at=2000.0)
    real = runs.summarize_run
    monkeypatch.setattr(runs, "summarize_run", lambda d: real(d) if Path(d).name == "a" else 1 / 0)
    table, notes = runs_report(tmp_path).split("\n\n")
    assert [line.split()[:2] for line in table.splitlines()[1:]] == [["a", "finished"], ["b", "unreadable"]]
    assert "ZeroDivisionError" in notes


def test_plot_skips_damaged_lines_and_warns_once_per_run(tmp_path):
    pytest.importorskip("matplotlib")
    from gptrain.plot import plot_runs

    run = write_run(tmp_path / "r", DAMAGED)
    warnings: list[str] = []
    counts = plot_runs([run], tmp_path / "out.png", warn=warnings.append)
    assert counts["train/loss"] == 1 and (tmp_path / "out.png").stat().st_size > 0
    assert len(warnings) == 1 and "skipped 5 damaged lines" in warnings[0]


def test_a_resume_ends_a_cut_line_so_its_own_events_stay_readable(tmp_path):
    cut = metrics(2, 1000.5, **{"train/loss": 4.0}) + '{"event": "metrics", "step": 4, "ti'
    (tmp_path / "metrics.jsonl").write_text(cut)
    warnings: list[str] = []
    tracker = JsonlTracker(tmp_path, resumed_from_step=2, warn=warnings.append)
    tracker.log({"train/loss": 3.0}, 4)
    tracker.finish("finished")
    rows, skipped = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["event"] for r in rows] == ["metrics", "resume", "metrics", "end"] and skipped == 1
    assert warnings == [f"{tmp_path / 'metrics.jsonl'}: skipped 1 damaged line (not UTF-8, not JSON, or not an "
                        "event object); the other events are read as usual."]
    assert end_cut_line(tmp_path / "metrics.jsonl") is False  # already ends with a newline
    assert end_cut_line(tmp_path / "nothing.jsonl") is False


def test_wall_time_does_not_count_the_gap_when_a_cut_line_swallowed_the_resume(tmp_path):
    # What the issue saw: 1 s of training around a 23-minute gap, the resume event lost on the cut line.
    text = (metrics(2, 1000.5, **{"train/loss": 4.0}) + '{"event": "metrics", "step": 4, "ti'
            + json.dumps({"event": "resume", "from_step": 2, "time": 2411.0}) + "\n"
            + metrics(4, 2411.4, **{"train/loss": 3.0}) + json.dumps({"event": "end", "status": "finished",
                                                                      "time": 2411.5}) + "\n")
    run = write_run(tmp_path / "r", text, resumes=[{"from_step": 2, "at": 2410.9}])
    assert summarize_run(run).wall_time == pytest.approx(0.5 + 0.6)
    # Without run.json's resume list, the gap still ends at the segment's end event when there is one.
    text = (metrics(2, 1000.5) + json.dumps({"event": "end", "status": "interrupted", "time": 1001.0}) + "\n"
            + metrics(4, 2411.0) + metrics(6, 2412.0))
    assert summarize_run(write_run(tmp_path / "s", text)).wall_time == pytest.approx(1.0 + 1.0)


def fake_checkpoint(checkpoint_dir: Path, step: int, **info) -> Path:
    d = checkpoint_dir / f"step_{step:07d}"
    d.mkdir(parents=True)
    (d / "info.json").write_text(json.dumps({"step": step, **info}))
    (d / "COMPLETE").write_text("ok\n")
    return d


def test_run_record_is_rebuilt_from_its_own_folder_only(tmp_path):
    other = tmp_path / "elsewhere" / "original"
    other.mkdir(parents=True)
    (other / "run.json").write_text(json.dumps({"run_id": "WRONG", "name": "original", "created_at": 1.0}))
    run = tmp_path / "runs" / "copy"
    (run).mkdir(parents=True)
    (run / "metrics.jsonl").write_text(
        metrics(2, 1000.0, **{"train/tokens_seen": 256}) + json.dumps({"event": "end", "status": "interrupted",
                                                                         "time": 1001.0}) + "\n"
        + json.dumps({"event": "resume", "from_step": 2, "time": 2000.0}) + "\n"
        + metrics(4, 2001.0, **{"train/tokens_seen": 512}))
    fake_checkpoint(run / "checkpoints", 4, run_id="abc", run_name="original", run_dir=str(other),
                    tokens_seen=512)
    record = rebuild_run_record(run)
    assert record["name"] == "copy" and record["run_id"] == "abc" and record["created_at"] == 1000.0
    assert record["status"] == "crashed"  # no end event after the last segment's events
    assert (record["step"], record["tokens_seen"]) == (4, 512)
    assert record["resumes"] == [{"from_step": 2, "at": 2000.0}]
    assert read_run_record(run)[1] == f"{run / 'run.json'} is missing: its record was rebuilt from the run folder"
    # A resume continues the folder the checkpoint is in, never the one its info.json recorded …
    ckpt = run / "checkpoints" / "step_0000004"
    assert run_dir_for_resume(ckpt, json.loads((ckpt / "info.json").read_text()), tmp_path / "runs") == run
    # … and a checkpoint outside a run folder continues --runs-dir/<its run name>.
    loose = fake_checkpoint(tmp_path / "custom", 6, run_name="original", run_dir=str(other))
    assert run_dir_for_resume(loose, {"run_name": "original"}, tmp_path / "runs") == tmp_path / "runs" / "original"
    with pytest.raises(UserError, match="the run name in .*info.json '../x' is not a run name"):
        run_dir_for_resume(loose, {"run_name": "../x"}, tmp_path / "runs")


@pytest.mark.parametrize("info, message", [
    ({}, "its info.json has no 'step'"),
    ([], "not a JSON object"),
    ({"step": "7"}, "step of the wrong type"),
    ({"step": 7, "config": "x"}, "config of the wrong type"),
    ({"step": True}, "step of the wrong type"),
])
def test_damaged_info_json_is_one_clear_message(tmp_path, info, message):
    path = fake_checkpoint(tmp_path, 7)
    (path / "info.json").write_text(json.dumps(info))
    with pytest.raises(UserError, match=message):
        C.read_checkpoint(path)


def test_a_missing_info_field_is_a_user_error_not_a_key_error(tmp_path):
    ckpt = C.read_checkpoint(fake_checkpoint(tmp_path, 7))
    with pytest.raises(UserError, match=r"step_0000007 is damaged: its info.json has no 'config'"):
        ckpt.info["config"]
    assert ckpt.info.get("config") is None and ckpt.step == 7
    (ckpt.path / "info.json").write_text(json.dumps({"step": 7, "tokenizer": {"fingerprint": "f"}}))
    with pytest.raises(UserError, match=r"its info.json has no 'tokenizer.spec'"):
        C.read_checkpoint(ckpt.path).info["tokenizer"]["spec"]


def test_model_weights_with_wrong_keys_are_one_clear_message(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    state = {"0.weight": torch.zeros(4, 3), "0.bias": torch.zeros(4), "1.weight": torch.zeros(2, 5),
             "extra.weight": torch.zeros(1)}
    path = C.save_checkpoint(tmp_path, 3, state, {"optimizer": {"param_groups": []}, "rng_cpu": torch.zeros(1)},
                             {"val_loss": None})
    with pytest.raises(UserError) as e:
        C.read_checkpoint(path).load_model_into(model)
    assert str(e.value).startswith(f"{path / 'model.pt'} does not match the model (missing 1.bias; unexpected "
                                   "extra.weight; wrong shapes 1.weight (2, 5) ≠ (2, 4)).")
    torch.save({"rng_cpu": torch.zeros(1)}, path / "train.pt")
    with pytest.raises(UserError, match="no optimizer state"):
        C.check_train_state(C.read_checkpoint(path).load_train_state(), path / "train.pt")
    with pytest.raises(UserError, match="train.pt has no 'optimizer'"):
        C.read_checkpoint(path).load_train_state()["optimizer"]


# --------------------------------------------------------------------------- one writer per run

HOLDER = """
import sys
sys.path.insert(0, {src!r})
from gptrain.run_folder import open_run_dir
lock = open_run_dir({runs!r}, "shared", must_be_new=False)
print("locked", flush=True)
sys.stdin.read()
"""


def test_a_second_writer_is_refused_at_once_and_a_dead_ones_lock_never_blocks(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER.format(src=SRC, runs=str(tmp_path))],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.monotonic()
        with pytest.raises(UserError) as e:
            open_run_dir(tmp_path, "shared", must_be_new=False)
        assert time.monotonic() - t0 < 1.0
        assert f"run folder {tmp_path / 'shared'} is in use: process {holder.pid} on {socket.gethostname()} " \
               "(started " in str(e.value)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert json.loads((tmp_path / "shared" / ".lock").read_text())["pid"] == holder.pid  # what kill -9 leaves
    with open_run_dir(tmp_path, "shared", must_be_new=False) as lock:
        assert lock.held and lock.holder()["pid"] == os.getpid()
    assert not RunLock(tmp_path / "shared").held and (tmp_path / "shared" / ".lock").read_text() == ""


def test_the_lock_is_reentrant_within_one_process(tmp_path):
    with open_run_dir(tmp_path, "r", must_be_new=True) as outer:
        with open_run_dir(tmp_path, "r", must_be_new=False):
            pass
        assert outer.held  # the inner release left the outer holder's lock in place
    assert not outer.held


TRY_ONCE = """
import sys
sys.path.insert(0, {src!r})
from gptrain.errors import UserError
from gptrain.run_folder import open_run_dir
try:
    open_run_dir({runs!r}, "r", must_be_new=False)
    print("locked")
except UserError as e:
    print("refused", e)
"""


def test_make_run_dir_holds_the_lock_until_released(tmp_path):
    from gptrain.run_folder import make_run_dir, release_run_dir

    def other_process() -> str:
        return subprocess.run([sys.executable, "-c", TRY_ONCE.format(src=SRC, runs=str(tmp_path))],
                              capture_output=True, text=True, timeout=60).stdout

    run = make_run_dir(tmp_path, "r", must_be_new=True)
    make_run_dir(tmp_path, "r", must_be_new=False)  # this process again: re-entrant
    assert other_process().startswith(f"refused run folder {run} is in use: process {os.getpid()} ")
    release_run_dir(run)
    assert other_process() == "locked\n"


RACER = """
import json, os, sys, time
sys.path.insert(0, {src!r})
from gptrain.errors import UserError
from gptrain.run_folder import open_run_dir
go = {go!r}
while not os.path.exists(go):
    pass
try:
    lock = open_run_dir({runs!r}, "same-name", must_be_new=True)
except UserError as e:
    print("refused", e)
    sys.exit(0)
time.sleep(0.3)  # the launch's setup between taking the folder and writing run.json
with open(os.path.join({runs!r}, "same-name", "run.json"), "w") as f:
    json.dump({{"pid": os.getpid()}}, f)
print("won")
"""


def test_two_simultaneous_fresh_starts_of_one_run_never_both_pass(tmp_path):
    for trial in range(6):
        runs, go = tmp_path / f"t{trial}", tmp_path / f"go{trial}"
        procs = [subprocess.Popen([sys.executable, "-c", RACER.format(src=SRC, runs=str(runs), go=str(go))],
                                  stdout=subprocess.PIPE, text=True) for _ in range(2)]
        time.sleep(0.3)  # both started and spinning
        go.write_text("")
        outs = [p.communicate(timeout=30)[0] for p in procs]
        assert sorted(o.split()[0] for o in outs) == ["refused", "won"], outs
        refused = next(o for o in outs if o.startswith("refused"))
        assert "is in use: process" in refused or "already exists" in refused


@pytest.mark.parametrize("name", ["../../escape", "a/b", "/abs", "..", ".", "", "back\\slash", "nul\x00",
                                  "line\nbreak", "x" * 256])
def test_run_names_are_single_folder_names(tmp_path, name):
    with pytest.raises(UserError) as e:
        check_run_name(name, "run_name in exp.toml")
    assert str(e.value).startswith(f"run_name in exp.toml {name!r} is not a run name: ")
    with pytest.raises(UserError, match="--run-name"):
        open_run_dir(tmp_path / "runs", name, must_be_new=True)
    assert list(tmp_path.iterdir()) == []  # refused before anything was created


def test_good_run_names_pass():
    for name in ("run-1", "exp.v2", "日本語", ".hidden-but-fine", "a b"):
        assert check_run_name(name, "--run-name") == name


def test_a_new_run_is_refused_in_a_folder_that_holds_a_run(tmp_path):
    run = tmp_path / "r"
    (run / "checkpoints").mkdir(parents=True)  # run.json lost, checkpoints kept
    with pytest.raises(UserError, match=r"already exists \(it holds checkpoints\)"):
        open_run_dir(tmp_path, "r", must_be_new=True)
    assert not RunLock(run).held


def test_run_status_on_a_full_disk_says_why_it_was_not_recorded(tmp_path, monkeypatch):
    import gptrain.run_folder as rf

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rf, "write_json_atomic", full)
    note = record_run_status(tmp_path, "failed", step=3)
    assert note == (f"the run's status 'failed' could not be written to {tmp_path / 'run.json'} (No space left on "
                    "device); `gptrain runs` shows it as crashed")


# --------------------------------------------------------------------------- checkpoints


def state(value=1.0):
    return {"w": torch.full((3,), value), "i": torch.arange(3)}


def train_state():
    return {"optimizer": {"param_groups": [], "state": {}}, "rng_cpu": torch.get_rng_state()}


def save(checkpoint_dir, step, value=1.0, val=None):
    return C.save_checkpoint(checkpoint_dir, step, state(value), train_state(), {"val_loss": val})


def write_to_a_full_disk(monkeypatch, failing_file: str):
    """The kernel's own ENOSPC: `failing_file` is written to /dev/full after a partial write to its path."""
    real = C._write_file

    def write(path, fn):
        if path.name == failing_file:
            path.write_bytes(b"partial")
            real(Path("/dev/full"), fn)
        real(path, fn)

    monkeypatch.setattr(C, "_write_file", write)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_save_on_a_full_disk_cleans_up_and_says_which_checkpoint_is_newest(tmp_path, monkeypatch):
    first = save(tmp_path, 10)
    write_to_a_full_disk(monkeypatch, "train.pt")
    with pytest.raises(C.CheckpointSaveError) as e:
        save(tmp_path, 20)
    assert isinstance(e.value, UserError)
    assert str(e.value).startswith("no space left on /")
    assert f"while saving step 20; the newest complete checkpoint is {first}." in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000010"]  # no temporary folder left
    assert C.latest_checkpoint(tmp_path).step == 10


def test_stale_temporary_folders_are_removed_before_a_save_writes(tmp_path, monkeypatch):
    save(tmp_path, 10)
    stale = tmp_path / "step_0000020.tmp-4242"
    stale.mkdir()
    (stale / "model.pt").write_bytes(b"\0" * 1000)
    real = C._write_file
    seen = []

    def write(path, fn):
        seen.append(stale.exists())
        real(path, fn)

    monkeypatch.setattr(C, "_write_file", write)
    save(tmp_path, 20)
    assert seen and not any(seen)  # gone before the first byte of the new save


def test_non_finite_weights_are_never_written(tmp_path):
    first = save(tmp_path, 10)
    for bad in (math.nan, math.inf):
        with pytest.raises(C.NonFiniteWeightsError) as e:
            save(tmp_path, 20, value=bad)
        assert str(e.value).startswith(f"the weights at step 20 are not finite (NaN or inf), so they were not saved; "
                                       f"the newest complete checkpoint is {first}.")
    assert [p.name for p in tmp_path.iterdir()] == ["step_0000010"]
    assert json.loads((first / "info.json").read_text())["finite"] is True


def test_all_finite_reads_nested_states_of_any_float_dtype():
    assert C.all_finite({"a": torch.ones(2, dtype=torch.bfloat16), "opt": {"m": [torch.zeros(3)]},
                         "step": torch.tensor(5)})
    assert not C.all_finite({"a": torch.ones(2), "opt": {"m": [torch.tensor([1.0, math.inf])]}})
    assert not C.all_finite([torch.tensor([math.nan], dtype=torch.float16)])
    assert C.all_finite({"ints": torch.arange(3)}) and C.all_finite({})


def test_all_finite_reduces_over_dtensor_shards(tmp_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        good = distribute_tensor(torch.ones(4, 2), mesh, [Shard(0)])
        bad = distribute_tensor(torch.tensor([[1.0, math.nan]]), mesh, [Shard(0)])
        assert C.all_finite({"a": good}) and not C.all_finite({"a": good, "b": bad})
    finally:
        dist.destroy_process_group()


def sharded_save(tmp_path, step, write_shards, weights_finite=True):
    return C.save_sharded_checkpoint(tmp_path, step, write_shards, {"val_loss": None}, None, 0, lambda o: o,
                                     lambda: None, weights_finite=weights_finite)


def test_sharded_saves_refuse_non_finite_weights_and_clean_up_after_a_full_disk(tmp_path):
    first = sharded_save(tmp_path, 10, lambda d: (d.mkdir(), (d / "shard").write_bytes(b"x")))
    assert json.loads((first / "info.json").read_text())["finite"] is True
    with pytest.raises(C.NonFiniteWeightsError):
        sharded_save(tmp_path, 20, lambda d: pytest.fail("nothing may be written"), weights_finite=False)

    def full(d):
        d.mkdir()
        (d / "shard").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(d / "shard"))

    with pytest.raises(C.CheckpointSaveError, match=f"while saving step 30; the newest complete checkpoint is "
                                                    f"{first}"):
        sharded_save(tmp_path, 30, full)
    assert [p.name for p in tmp_path.iterdir()] == ["step_0000010"]


def test_a_full_disk_after_the_shards_stops_every_rank_with_the_same_message(tmp_path, monkeypatch):
    first = sharded_save(tmp_path, 10, lambda d: d.mkdir())
    write_to_a_full_disk(monkeypatch, "info.json")  # rank 0's own files, after the shards
    with pytest.raises(C.CheckpointSaveError, match="^no space left on .* while saving step 20"):
        sharded_save(tmp_path, 20, lambda d: d.mkdir())
    assert [p.name for p in tmp_path.iterdir()] == ["step_0000010"]
    # Rank 1 hears of it through rank 0's broadcast.
    answers = iter([("ok", str(tmp_path / "step_0000030.tmp-1")), ("disk", (errno.ENOSPC, "No space left", None))])
    with pytest.raises(C.CheckpointSaveError, match=f"while saving step 30; the newest complete checkpoint is "
                                                    f"{first}"):
        C.save_sharded_checkpoint(tmp_path, 30, lambda d: None, {}, None, 1, lambda o: next(answers), lambda: None,
                                  weights_finite=True)


def test_pruning_keeps_the_newest_finite_checkpoint_of_a_resumed_diverging_run(tmp_path):
    # A good run saved every 10 steps between evaluations (no val loss); a resume with a diverging setting
    # then saved non-finite weights (written by older code: the save now refuses them).
    for step in (10, 20):
        save(tmp_path, step)
    for step in (30, 40, 50):
        fake_checkpoint(tmp_path, step, val_loss=None, finite=False)
    C.prune_checkpoints(tmp_path, keep_last=2)
    assert [p.name for p in C.list_checkpoints(tmp_path)] == ["step_0000020", "step_0000040", "step_0000050"]


def test_pruning_keeps_the_best_val_loss_among_checkpoints_that_have_one(tmp_path):
    for step, val in [(10, 3.0), (20, None), (30, 1.0), (40, None), (50, None), (60, 2.0)]:
        save(tmp_path, step, val=val)
    fake_checkpoint(tmp_path, 70, val_loss=0.5, finite=False)  # a lower loss, but non-finite weights
    fake_checkpoint(tmp_path, 80, val_loss=float("nan"))  # written by older code without `finite`
    C.prune_checkpoints(tmp_path, keep_last=1)
    # the newest (80, finiteness unknown), the newest known finite (60), the best finite by val loss (30)
    assert [p.name for p in C.list_checkpoints(tmp_path)] == ["step_0000030", "step_0000060", "step_0000080"]


def test_pruning_with_only_old_checkpoints_keeps_the_newest_and_the_best(tmp_path):
    for step, val in [(10, 1.0), (20, 2.0), (30, 3.0)]:
        fake_checkpoint(tmp_path, step, val_loss=val)
    C.prune_checkpoints(tmp_path, keep_last=1)
    assert [p.name for p in C.list_checkpoints(tmp_path)] == ["step_0000010", "step_0000030"]


# --------------------------------------------------------------------------- memory before work


def test_memory_estimate_follows_its_formula():
    e = estimate_training_memory(1000, n_layers=2, d_model=8, seq_len=4, batch_size=2, vocab_size=16,
                                 precision="bf16", optimizer_state_bytes_per_param=8)
    tokens = 8
    assert (e.weights, e.gradients, e.optimizer) == (4000, 4000, 8000)
    assert e.activations == 2 * tokens * (8 * 8 + 2 * 32) * 2 + tokens * 8 * 4
    assert e.loss_head == tokens * 16 * (2 + 4 + 4)
    assert int(e) == e.total == sum((e.weights, e.gradients, e.optimizer, e.activations, e.loss_head))
    sharded = estimate_training_memory(1000, 2, 8, 4, 2, 16, "fp32", 8, model_shards=4, loss_chunk_tokens=2,
                                       activation_checkpointing=True)
    assert (sharded.weights, sharded.optimizer) == (1000, 2000)
    assert sharded.loss_head == 2 * 16 * 12
    assert sharded.activations == 2 * tokens * 8 * 4 + tokens * (8 * 8 + 2 * 32) * 4 + tokens * 8 * 4


def gpt_params(n_layers, d_model, vocab, context):
    return 12 * n_layers * d_model ** 2 + vocab * d_model + context * d_model


def test_a_model_that_cannot_fit_is_refused_with_its_estimate():
    huge = estimate_training_memory(gpt_params(6, 100_000, 8192, 256), 6, 100_000, 256, 16, 8192, "fp32",
                                    loss_chunk_tokens=1024)
    with pytest.raises(UserError) as e:
        check_fits(huge, 24 * 10**9, "the model (--d-model 100000) on cpu")
    assert str(e.value).startswith("the model (--d-model 100000) on cpu needs at least 11.7 TB (weights 2.9 TB, ")
    assert "but only 24.0 GB is available" in str(e.value)


def test_configurations_that_train_today_are_not_refused():
    gpt2 = estimate_training_memory(gpt_params(12, 768, 50304, 1024), 12, 768, 1024, 16, 50304, "fp32",
                                    loss_chunk_tokens=1024)
    assert 10e9 < gpt2.total < 16e9  # measured peaks run to about twice the estimate
    check_fits(gpt2, 24 * 10**9, "gpt2 on a 24 GB host")
    tiny = estimate_training_memory(gpt_params(6, 384, 8192, 256), 6, 384, 256, 16, 8192, "fp32",
                                    loss_chunk_tokens=1024)
    check_fits(tiny, 2 * 10**9, "the default model on a 2 GB host")
    with pytest.raises(UserError, match="needs at least 2 processes × "):
        check_fits(tiny, int(tiny) + 1, "the default model", processes=2)
    check_fits(MemoryEstimate(10**15, 0, 0, 0, 0), None, "an unknown device")  # unknown: never refused


def test_count_parameters_allocates_nothing():
    n = count_parameters(lambda: torch.nn.Linear(100_000, 100_000))
    assert n == 100_000 * 100_000 + 100_000


def test_host_memory_is_the_smaller_of_meminfo_and_the_container_limit(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       32000000 kB\nMemAvailable:   20000000 kB\n")
    cg = tmp_path / "cg"
    cg.mkdir()
    assert host_available_memory(meminfo, cg) == 20000000 * 1024
    (cg / "memory.max").write_text("8000000000\n")
    (cg / "memory.current").write_text("3000000000\n")
    assert host_available_memory(meminfo, cg) == 5_000_000_000
    (cg / "memory.max").write_text("max\n")
    assert host_available_memory(meminfo, cg) == 20000000 * 1024
    assert format_bytes(host_available_memory()) != "0 B"


# --------------------------------------------------------------------------- a real full disk (tmpfs)


@pytest.fixture
def small_disk(tmp_path):
    """A 512 kB tmpfs, where the test may mount one (root, no container restriction); skipped elsewhere."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount_point)],
                              capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        pytest.skip("cannot run mount")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], capture_output=True, timeout=10)


def test_a_full_tmpfs_fails_the_save_cleanly_and_a_resume_gets_the_stale_space_back(small_disk):
    ckpts = small_disk / "run" / "checkpoints"
    small = {"w": torch.ones(1000)}  # 4 kB
    first = C.save_checkpoint(ckpts, 10, small, train_state(), {"val_loss": None})
    with pytest.raises(C.CheckpointSaveError) as e:
        C.save_checkpoint(ckpts, 20, {"w": torch.ones(200_000)}, train_state(), {"val_loss": None})  # 800 kB
    assert str(e.value).startswith(f"no space left on {small_disk} (tmpfs) while saving step 20; the newest "
                                   f"complete checkpoint is {first}.")
    assert [p.name for p in ckpts.iterdir()] == ["step_0000010"]
    # A crashed save (kill -9) left a temporary folder that nearly fills the disk; the next save fits only
    # because it removes that folder first.
    stale = ckpts / "step_0000020.tmp-4242"
    stale.mkdir()
    with pytest.raises(OSError):
        (stale / "model.pt").write_bytes(b"\0" * 600_000)
    C.save_checkpoint(ckpts, 30, {"w": torch.ones(60_000)}, train_state(), {"val_loss": None})  # 240 kB
    assert [p.name for p in C.list_checkpoints(ckpts)] == ["step_0000010", "step_0000030"]
