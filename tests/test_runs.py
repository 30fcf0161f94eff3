"""`gptrain runs` and `gptrain plot`: statuses, numbers and curves read from run folders."""

import json
import math

import pytest
from conftest import fast_overrides

import gptrain.trainer as trainer_mod
from gptrain.cli import main
from gptrain.config import build_config
from gptrain.runs import summarize_run
from gptrain.tracking import read_history
from gptrain.tracking.jsonl import superseded
from gptrain.trainer import StopRequest, train


def run(dataset, runs, **extra):
    cfg, explicit = build_config(fast_overrides(dataset, runs, **{"tracking.sample_every": 0, **extra}))
    return train(cfg, explicit)


@pytest.fixture(scope="module")
def runs_dir(byte_dataset, tmp_path_factory):
    """Four runs: finished, interrupted (SIGTERM-style stop after step 5), crashed (exception in step 10),
    killed. The stop and the crash fall between two log steps (every 2)."""
    d = tmp_path_factory.mktemp("runs")
    mp = pytest.MonkeyPatch()
    run(byte_dataset, d, **{"train.run_name": "done"})
    real_lr_at = trainer_mod.lr_at

    mp.setattr(StopRequest, "requested", property(lambda self: self._steps_seen() >= 5), raising=False)
    mp.setattr(StopRequest, "_steps_seen", lambda self: trainer_mod._test_step, raising=False)
    mp.setattr(StopRequest, "signal_name", "SIGTERM", raising=False)

    def counting_lr_at(step, *a, **k):
        trainer_mod._test_step = step + 1
        return real_lr_at(step, *a, **k)

    mp.setattr(trainer_mod, "_test_step", 0, raising=False)
    mp.setattr(trainer_mod, "lr_at", counting_lr_at)
    run(byte_dataset, d, **{"train.run_name": "stopped"})
    mp.undo()

    def crashing(step, *a, **k):
        if step == 9:
            raise RuntimeError("boom")
        return real_lr_at(step, *a, **k)

    mp.setattr(trainer_mod, "lr_at", crashing)
    with pytest.raises(RuntimeError):
        run(byte_dataset, d, **{"train.run_name": "crashed"})
    mp.undo()
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
    assert table["done"][4] == f"{done.best_val_loss:.4f}" and table["done"][5] == f"{done.last_train_loss:.4f}"
    assert main(["runs", str(runs_dir), "--json"]) == 0
    as_json = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert as_json["crashed"]["steps"] == 9 and as_json["crashed"]["best_val_loss"] == pytest.approx(
        min(r["val/loss"] for r in read_history(runs_dir / "crashed") if "val/loss" in r))


def test_plot_draws_one_curve_per_run(runs_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from gptrain.plot import plot_runs

    out = tmp_path / "curves.png"
    counts = plot_runs([runs_dir / "done", runs_dir / "stopped", runs_dir / "crashed"], out, x="tokens")
    assert counts == {"train/loss": 3, "val/loss": 2, "lr": 3, "global_tokens_per_sec": 3}  # "stopped" never evaluated
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
