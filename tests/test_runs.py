"""`gptrain runs`, `plot` and `sync`: statuses, numbers, curves and W&B segments read from run folders."""

import json
import math
import os
import signal
from pathlib import Path

import pytest
from conftest import AtStep, fast_overrides, raise_

from gptrain.cli import main
from gptrain.config import build_config
from gptrain.runs import summarize_run
from gptrain.tracking import read_history
from gptrain.tracking.jsonl import superseded
from gptrain.trainer import train


def run(dataset, runs, hooks=(), **extra):
    cfg, explicit = build_config(fast_overrides(dataset, runs, **{"tracking.sample_every": 0, **extra}))
    return train(cfg, explicit, hooks=hooks)


@pytest.fixture(scope="module")
def runs_dir(byte_dataset, tmp_path_factory):
    """Four runs: finished, interrupted (SIGTERM-style stop after step 5), crashed (exception in step 10),
    killed. The stop and the crash fall between two log steps (every 2)."""
    d = tmp_path_factory.mktemp("runs")
    run(byte_dataset, d, **{"train.run_name": "done"})
    # A real SIGTERM during step 5: the loop stops after it (the signal is seen at the step's end).
    run(byte_dataset, d, hooks=[AtStep(4, lambda: os.kill(os.getpid(), signal.SIGTERM))],
        **{"train.run_name": "stopped"})
    with pytest.raises(RuntimeError):
        run(byte_dataset, d, hooks=[AtStep(9, raise_(RuntimeError("boom")))], **{"train.run_name": "crashed"})
    run(byte_dataset, d, **{"train.run_name": "killed", "train.num_steps": 4})
    info = json.loads((d / "killed" / "run.json").read_text())
    info.update(status="running", pid=2**22 + 12345)  # as left by a SIGKILL: no process with that pid
    (d / "killed" / "run.json").write_text(json.dumps(info))
    return d


def test_runs_table_reports_status_and_numbers(runs_dir, capsys):
    assert main(["runs", str(runs_dir)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:4] == ["name", "status", "steps", "tokens"]
    table = {line.split()[0]: line.split() for line in lines[1:]}
    assert {name: row[1] for name, row in table.items()} == {"done": "finished", "stopped": "interrupted",
                                                            "crashed": "crashed", "killed": "crashed"}
    # steps done, not the last logged step (4 and 8 for the stopped and the crashed run)
    assert [table[n][2] for n in ("done", "stopped", "crashed", "killed")] == ["12", "5", "9", "4"]
    assert summarize_run(runs_dir / "stopped").tokens == 5 * 4 * 32

    done = summarize_run(runs_dir / "done")
    history = read_history(runs_dir / "done")
    assert done.best_val_loss == min(r["val/loss"] for r in history if "val/loss" in r)
    assert done.last_train_loss == history[-1]["train/loss"] and done.tokens == 12 * 4 * 32
    assert done.tokens_per_sec > 0 and 0 < done.wall_time < 120 and done.wandb == "-"
    assert table["done"][4] == f"{done.best_val_loss:.4f}" and table["done"][6] == f"{done.last_train_loss:.4f}"
    # bits per byte: the byte tokenizer has one byte per token, so bpb = loss / ln 2
    assert table["done"][5] == f"{done.best_val_bpb:.4f}" and done.best_val_bpb == pytest.approx(
        min(r["val/loss"] for r in history if "val/loss" in r) / math.log(2), rel=1e-6)
    assert main(["runs", str(runs_dir), "--json"]) == 0
    as_json = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert as_json["crashed"]["steps"] == 9 and as_json["crashed"]["best_val_loss"] == pytest.approx(
        min(r["val/loss"] for r in read_history(runs_dir / "crashed") if "val/loss" in r))


def test_plot_draws_one_curve_per_run(runs_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from gptrain.plot import plot_runs

    out = tmp_path / "curves.png"
    counts = plot_runs([runs_dir / "done", runs_dir / "stopped", runs_dir / "crashed"], out, x="tokens")
    # "stopped" never evaluated; bits per byte beside every val loss (byte tokenizer: one byte per token)
    assert counts == {"train/loss": 3, "val/loss": 2, "val/bpb": 2, "lr": 3, "global_tokens_per_sec": 3,
                      "train/grad_norm": 3}
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000
    assert main(["plot", str(runs_dir / "done"), "-o", str(tmp_path / "one.png")]) == 0
    assert "1 run(s)" in capsys.readouterr().out and (tmp_path / "one.png").stat().st_size > 20_000
    assert main(["plot", str(tmp_path / "nope"), "-o", str(tmp_path / "x.png")]) == 2
    assert "not a run folder with metrics" in capsys.readouterr().err


def test_history_readers_keep_the_later_segment():
    rows = [{"event": "metrics", "step": s, "train/loss": float(s)} for s in (2, 4, 6, 8)]
    rows += [{"event": "resume", "from_step": 4}]
    rows += [{"event": "metrics", "step": s, "train/loss": 10.0 + s} for s in (6, 8, 10)]
    rows += [{"event": "metrics", "step": 10, "val/loss": "nan"}]
    kept = superseded(rows)
    assert [(r.get("step"), r.get("train/loss")) for r in kept if r["event"] == "metrics"] == [
        (2, 2.0), (4, 4.0), (6, 16.0), (8, 18.0), (10, 20.0), (10, None)]


def test_original_wandb_flags_and_tracking_options_parse(tmp_path, capsys):
    from gptrain.cli import build_parser, collect_overrides, parse_strict

    _, subs = build_parser()
    args = parse_strict(subs["train"], ["--use-wandb", "--wandb-project", "mini-llm", "--wandb-run-name", "test",
                                        "--wandb-tags", "x,y", "z", "--wandb-mode", "offline",
                                        "--trackers", "jsonl,tensorboard", "--sample-every", "50"])
    cfg, _ = build_config(collect_overrides(args))
    tr = cfg.tracking
    assert (tr.wandb_project, tr.wandb_run_name, tr.wandb_mode, tr.sample_every) == ("mini-llm", "test", "offline", 50)
    assert tr.enabled() == ["jsonl", "tensorboard", "wandb"] and tr.tags() == ["x", "y", "z"]
    assert main(["train", "--trackers", "wandb,tensorbord", "--runs-dir", str(tmp_path)]) == 2
    assert "unknown tracker 'tensorbord'. Did you mean 'tensorboard'?" in capsys.readouterr().err
    assert main(["sync", str(tmp_path)]) == 2
    assert "is not a run folder" in capsys.readouterr().err


def test_nan_strings_read_back_as_floats(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"event": "metrics", "step": 2, "train/loss": "nan"}\n')
    assert math.isnan(read_history(tmp_path)[0]["train/loss"])


# Run folders written by hand (no training): what `gptrain runs`, `plot` and `sync` make of them.


# --------------------------------------------------------------------------- hand-made run folders


def write_run(run_dir: Path, rows: list[dict], *, created_at: float = 1000.0, status: str = "finished",
              tracking: dict | None = None) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.json").write_text(json.dumps({"run_id": "r" + run_dir.name, "name": run_dir.name,
                                                  "created_at": created_at, "status": status}))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if tracking is not None:
        (run_dir / "tracking.json").write_text(json.dumps(tracking))
    return run_dir


def metrics_row(step, t, **values):
    return {"event": "metrics", "step": step, "time": t, **values}


# --------------------------------------------------------------------------- gptrain runs


def test_runs_summary_best_val_median_throughput_and_wall_time_without_the_gap(tmp_path):
    from gptrain.runs import format_table, summarize_run

    rows = [
        metrics_row(2, 1010.0, **{"train/loss": 5.0, "global_tokens_per_sec": 100.0, "train/tokens_seen": 256}),
        metrics_row(2, 1011.0, **{"val/loss": 3.0}),
        metrics_row(4, 1020.0, **{"train/loss": 4.0, "global_tokens_per_sec": 200.0, "train/tokens_seen": 512}),
        metrics_row(4, 1021.0, **{"val/loss": 2.0}),  # the best, not the last
        {"event": "end", "status": "interrupted", "time": 1030.0},
        # resumed an hour later: the hour between the segments is not training time
        {"event": "resume", "from_step": 4, "time": 5000.0},
        metrics_row(6, 5010.0, **{"train/loss": 3.5, "global_tokens_per_sec": 1000.0, "train/tokens_seen": 768}),
        metrics_row(6, 5011.0, **{"val/loss": 2.5}),
        {"event": "end", "status": "finished", "time": 5020.0},
    ]
    s = summarize_run(write_run(tmp_path / "r", rows))
    assert s.best_val_loss == 2.0  # min over evaluations, not the last one (2.5)
    assert s.tokens_per_sec == 200.0  # the median of 100, 200, 1000 (a mean would be 433)
    assert s.wall_time == pytest.approx(30.0 + 20.0)  # (1030 - 1000) + (5020 - 5000)
    assert s.steps == 6 and s.tokens == 768 and s.last_train_loss == 3.5
    row = format_table([s]).splitlines()[1].split()
    assert row[:8] == ["r", "finished", "6", "768", "2.0000", "-", "3.5000", "200"] and row[8] == "0:00:50"


def test_runs_lists_runs_oldest_first(tmp_path, capsys):
    from gptrain.cli import main

    write_run(tmp_path / "a-newer", [metrics_row(2, 2010.0, **{"train/loss": 1.0})], created_at=2000.0)
    write_run(tmp_path / "b-older", [metrics_row(2, 1010.0, **{"train/loss": 1.0})], created_at=1000.0)
    write_run(tmp_path / "c-middle", [metrics_row(2, 1510.0, **{"train/loss": 1.0})], created_at=1500.0)
    assert main(["runs", str(tmp_path)]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.strip().splitlines()[1:]]
    assert names == ["b-older", "c-middle", "a-newer"]


def test_runs_shows_where_the_run_is_in_wandb(tmp_path):
    from gptrain.runs import wandb_location

    seg = "wandb/offline-run-20240101_000000-abc"
    offline = {"wandb": {"id": "abc", "project": "proj", "entity": "ent", "url": None,
                         "segments": [{"dir": seg, "mode": "offline"}]}}
    run = write_run(tmp_path / "off", [], tracking=offline)
    (run / seg).mkdir(parents=True)
    (run / seg / "run-abc.wandb").write_bytes(b"x")
    assert wandb_location(run) == f"offline: {run / 'wandb'} (gptrain sync {run})"
    (run / seg / "run-abc.wandb.synced").write_bytes(b"")
    assert wandb_location(run) == "synced: ent/proj/runs/abc"
    online = {"wandb": {"id": "xyz", "project": "proj", "url": "https://wandb.ai/ent/proj/runs/xyz",
                        "segments": [{"dir": "wandb/run-20240101_000000-xyz", "mode": "online"}]}}
    assert wandb_location(write_run(tmp_path / "on", [], tracking=online)) == "https://wandb.ai/ent/proj/runs/xyz"
    assert wandb_location(write_run(tmp_path / "none", [])) == "-"


# --------------------------------------------------------------------------- gptrain plot


def test_plot_uses_tokens_seen_on_the_x_axis_and_one_colour_per_run(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from gptrain.plot import plot_runs

    def rows(scale, with_val):
        out = []
        for step in (2, 4, 6):
            out.append(metrics_row(step, 0.0, **{"train/loss": scale / step, "lr": 1e-3,
                                                 "global_tokens_per_sec": 100.0, "train/tokens_seen": step * 128}))
            if with_val:
                out.append(metrics_row(step, 0.0, **{"val/loss": scale / step}))
        return out

    dirs = [write_run(tmp_path / "no-val", rows(1.0, False)), write_run(tmp_path / "val-1", rows(2.0, True)),
            write_run(tmp_path / "val-2", rows(3.0, True))]
    figs = []
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (figs.append(fig), real_close(fig)))
    counts = plot_runs(dirs, tmp_path / "p.png", x="tokens")
    assert counts["val/loss"] == 2 and counts["train/loss"] == 3
    (fig,) = figs
    train_ax, val_ax = fig.axes[0], fig.axes[1]
    assert [list(line.get_xdata()) for line in train_ax.lines] == [[256, 512, 768]] * 3
    colour = {line.get_label(): line.get_color() for line in train_ax.lines}
    assert len(set(colour.values())) == 3
    assert {line.get_label(): line.get_color() for line in val_ax.lines} == {n: colour[n] for n in ("val-1", "val-2")}


# --------------------------------------------------------------------------- gptrain sync


def fake_segment(run_dir: Path, name: str, synced: bool = False) -> Path:
    d = run_dir / "wandb" / name
    d.mkdir(parents=True)
    run_id = name.rsplit("-", 1)[1]
    (d / f"run-{run_id}.wandb").write_bytes(b"x")
    if synced:
        (d / f"run-{run_id}.wandb.synced").write_bytes(b"")
    return d


def test_sync_skips_segments_already_uploaded(tmp_path):
    from gptrain.sync import sync_run

    run = write_run(tmp_path / "r", [])
    first = fake_segment(run, "offline-run-20240101_000000-abc", synced=True)
    second = fake_segment(run, "offline-run-20240102_000000-abc")
    (run / "tracking.json").write_text(json.dumps({"wandb": {"segments": [
        {"dir": str(first.relative_to(run)), "mode": "offline"},
        {"dir": str(second.relative_to(run)), "mode": "offline"}]}}))
    lines = []
    todo = sync_run(run, dry_run=True, say=lines.append)
    assert [s.dir for s in todo] == [second]
    assert lines == [f"segment 1/2: {first.relative_to(run)} (offline, synced)",
                     f"segment 2/2: {second.relative_to(run)} (offline, to upload)"]
    (second / "run-abc.wandb.synced").write_bytes(b"")
    lines.clear()
    assert sync_run(run, dry_run=True, say=lines.append) == []
    assert lines[-1] == "nothing to upload: every segment is synced."


def test_segments_missing_from_tracking_json_are_ordered_by_start_time(tmp_path):
    from gptrain.sync import wandb_segments

    run = write_run(tmp_path / "r", [])
    later_offline = fake_segment(run, "offline-run-20240102_000000-abc")
    earlier_online = fake_segment(run, "run-20240101_000000-abc")
    segs = wandb_segments(run)
    assert [(s.dir, s.mode) for s in segs] == [(earlier_online, "online"), (later_offline, "offline")]
