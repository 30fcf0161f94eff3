"""The README's first command, `gptrain train` with no data arguments, end to end with fewer steps."""

import json
import math

from gptrain.cli import main


def test_default_command_trains_on_the_standard_library(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GPTRAIN_CACHE", str(tmp_path / "cache"))
    # The defaults, except fewer steps and a smaller eval budget so the test stays quick.
    assert main(["train", "--num-steps", "6", "--log-every", "3", "--eval-tokens", "4096", "--progress", "plain"]) == 0
    out = capsys.readouterr().out
    assert "training on the Python standard library" in out
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1
    run = runs[0]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["train"]["preset"] == "tiny" and cfg["data"]["tokenizer"] == "bpe:4096"
    assert cfg["model"]["vocab_size"] == 4096
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r["val/loss"] for r in rows if "val/loss" in r]
    assert len(val) == 1 and val[0] < math.log(4096)  # six steps already beat a uniform guess
    assert (run / "checkpoints").is_dir() and "sample:" in out and "done: 6 steps" in out
