"""`gptrain bench` and MFU: the harness runs the real loop and reports consistent figures (never timings)."""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import fast_overrides

from gptrain import metrics
from gptrain.bench import format_table, write_synthetic_dataset
from gptrain.cli import main
from gptrain.data.prepare import read_meta
from gptrain.model import GPT, PRESETS, ModelConfig, flops_per_token

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_gpt2_flops_per_token_follows_the_documented_formula():
    cfg = ModelConfig(vocab_size=50257, **PRESETS["gpt2"])
    with torch.device("meta"):
        model = GPT(cfg)
    assert cfg.padded_vocab_size == 50304
    n = model.num_parameters() - model.pos_emb.weight.numel()  # tied embedding counted once
    assert n == 124_475_904 - 1024 * 768
    assert flops_per_token(cfg, 1024, model.num_parameters()) == 6 * n + 12 * 12 * 768 * 1024 == 855_383_040


def test_cpu_peak_is_measured_and_an_unknown_gpu_has_none(monkeypatch):
    peak, source = metrics.peak_flops_for(torch.device("cpu"), "fp32")
    assert peak > 1e8 and source.startswith("measured: fp32")
    assert metrics.peak_flops_for(torch.device("cpu"), "fp32")[0] == peak  # cached: one measurement per process
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert metrics.peak_flops_for(torch.device("cuda"), "bf16") == (989e12, "spec: NVIDIA H100 80GB HBM3 bf16 dense")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    peak, source = metrics.peak_flops_for(torch.device("cuda"), "bf16")
    assert peak is None and source.startswith("unknown")


def test_synthetic_dataset_is_a_valid_dataset_over_the_whole_vocabulary(tmp_path):
    d = write_synthetic_dataset(tmp_path / "d", vocab_size=70_000, seq_len=8, sequences=20)
    meta = read_meta(d)
    import numpy as np

    tokens = np.fromfile(d / "train.bin", dtype=meta["dtype"])
    assert meta["dtype"] == "uint32" and len(tokens) == 20 * 8 + 1 and tokens.max() >= 65_536


def test_train_records_mfu_formula_and_measured_cpu_peak(byte_dataset, tmp_path):
    from gptrain.config import build_config
    from gptrain.trainer import train

    cfg, explicit = build_config(fast_overrides(byte_dataset, tmp_path, **{"train.num_steps": 4}))
    result = train(cfg, explicit)
    env = json.loads((result.run_dir / "environment.json").read_text())
    mfu = env["mfu"]
    assert mfu["formula"] == metrics.MFU_FORMULA and mfu["peak_flops"] > 0
    assert mfu["peak_flops_source"].startswith("measured") and mfu["flops_per_token"] == env["flops_per_token"]
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "global_tokens_per_sec" in r]
    for r in train_rows:
        expect = env["flops_per_token"] * r["global_tokens_per_sec"] / mfu["peak_flops"]
        assert r["perf/mfu"] == pytest.approx(expect, rel=1e-9)


def test_bench_command_runs_the_training_loop_and_prints_a_table(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "--named", "smoke", "--device", "cpu", "--windows", "2", "--window-steps", "1",
                 "--matmul-size", "256", "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "tokens/s" in printed and "MFU (measured)" in printed and "smoke" in printed
    (r,) = json.loads(out.read_text())
    assert r["windows"] == 2 and r["nproc"] == 1 and r["compile"] is False and r["attention_backend"] == "auto"
    assert r["loss_chunk_size"] == 1024  # the CPU default, as the run used it
    assert r["model"]["d_model"] == 64 and r["tokens_per_step"] == 4 * 64
    assert r["tokens_per_sec"] > 0 and r["step_time"] > 0 and r["matmul_flops"] > 0
    # the default (modern) family: rotary (no position table), an untied head, whose token embedding is a lookup,
    # and a value embedding (a lookup) in the last of the 2 layers
    assert r["flops_per_token"] == pytest.approx(6 * (r["n_params"] - 2 * 512 * 64) + 12 * 2 * 64 * 64)
    assert r["mfu_measured"] == pytest.approx(statistics.median(r["mfu_measured_windows"])) and r["mfu_spec"] is None
    assert r["mfu_measured_windows"] == pytest.approx(
        [r["flops_per_token"] * t / p for t, p in zip(r["tokens_per_sec_windows"], r["matmul_flops_windows"], strict=True)])
    assert r["memory"]["mem/rss_peak_gb"] > 0


def test_bench_rejects_unknown_variants_and_bad_window_counts(capsys):
    assert main(["bench", "--named", "smoke", "--variants", "turbo"]) == 2
    assert "unknown variant 'turbo'" in capsys.readouterr().err
    assert main(["bench", "--named", "smoke", "--device", "cpu", "--windows", "0"]) == 2
    assert "--windows must be" in capsys.readouterr().err


def _fake(nproc: int, tps: float) -> dict:
    return {"name": "cpu-small", "compile": False, "ac": "none", "nproc": nproc, "threads": 1, "tokens_per_sec": tps,
            "tokens_per_sec_min": tps, "tokens_per_sec_max": tps, "step_time": 1.0, "model_flops_per_sec": 1e9,
            "matmul_flops": 2e9, "mfu_measured": 0.5, "mfu_best": 0.6, "mfu_spec": None, "device": "cpu", "memory": {}}


def test_scaling_efficiency_is_tokens_per_sec_over_n_times_one_process():
    table = format_table([_fake(1, 1000.0), _fake(2, 1800.0)])
    assert "scaling 1→2 processes: 1.80× tokens/s, efficiency 90%" in table
    assert "| cpu-small | eager | 2 |" in format_table([_fake(1, 1000.0), _fake(2, 1800.0)], markdown=True)


def test_a_pinned_attention_backend_and_a_chunked_loss_name_the_variant():
    row = {**_fake(1, 1000.0), "compile": True, "attention_backend": "cudnn"}
    assert "| cpu-small | compile+cudnn | 1 |" in format_table([row], markdown=True)
    row["loss_chunk_size"] = 4096
    assert "| cpu-small | compile+cudnn+loss/4096 | 1 |" in format_table([row], markdown=True)


def test_probe_summary_compares_every_finished_step_with_base(tmp_path):
    """benchmarks/probe_summary.py: what a lent GPU's one probe call ends with, so it must not break unseen."""
    path = BENCHMARKS / "probe_summary.py"
    spec = importlib.util.spec_from_file_location("probe_summary", path)
    summary = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summary)
    gb = "mem/peak_allocated_gb"
    steps = {"base": {**_fake(1, 1000.0), "compile": True, "batch_size": 32, "memory": {gb: 16.0}},
             "loss": {**_fake(1, 1100.0), "compile": True, "batch_size": 32, "loss_chunk_size": 4096,
                      "memory": {gb: 8.0}, "mfu_spec": 0.45},
             "batch64": {**_fake(1, 1050.0), "compile": True, "batch_size": 64, "memory": {gb: 20.0}}}
    for i, (name, row) in enumerate(steps.items()):
        (tmp_path / f"{name}.json").write_text(json.dumps([row]))
        os.utime(tmp_path / f"{name}.json", (1000 + i, 1000 + i))  # the order the steps ran in
    (tmp_path / "broken.json").write_text("{not json")  # a step cut off while writing is skipped, not fatal
    results = summary.load_steps(tmp_path)
    assert [r["name"] for r in results] == ["base", "loss", "batch64"]
    assert summary.against_base(results) == [
        "loss (compile+loss/4096): tokens/s ×1.100 against base, peak memory 8.0 GB against 16.0 GB, MFU (spec) 45.0%",
        "batch64 (compile): tokens/s ×1.050 against base (batch 64 against 32), peak memory 20.0 GB against 16.0 GB",
    ]
    assert summary.against_base(results[1:]) == ["no 'base' step finished: nothing to compare against"]


@pytest.mark.parametrize("script", ["gpu.sh", "gpu_probe.sh", "gpu_distributed_check.sh"])
def test_gpu_scripts_parse(script):
    """The GPU scripts run only on a lent machine, in one call: a syntax error must show here first."""
    done = subprocess.run(["bash", "-n", str(BENCHMARKS / script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_measuring_the_peak_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    metrics.measure_matmul_flops(torch.device("cpu"), "fp32", size=64)
    assert torch.equal(torch.get_rng_state(), state)
