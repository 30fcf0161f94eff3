"""The profiler (--use-profiler) and activation checkpointing in one process."""

from __future__ import annotations

import json

import torch
from conftest import fast_overrides

from gptrain.config import build_config
from gptrain.trainer import train


def test_profiler_writes_traces_and_summarises_a_step(byte_dataset, tmp_path, capsys):
    cfg, explicit = build_config(fast_overrides(byte_dataset, tmp_path, **{
        "train.run_name": "prof", "train.num_steps": 6, "profile.enabled": True, "profile.wait": 1,
        "profile.warmup": 1, "profile.active": 2, "profile.repeat": 1}))
    res = train(cfg, explicit)
    assert res.status == "finished"
    traces = list((tmp_path / "prof" / "profile").glob("rank0*.pt.trace.json"))
    assert len(traces) == 1  # one cycle, one trace per rank
    events = json.loads(traces[0].read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert {"gptrain/data", "gptrain/forward", "gptrain/backward", "gptrain/optimizer"} <= names
    assert sum(1 for e in events if str(e.get("name", "")).startswith("ProfilerStep#")) == 2  # the active steps
    out = capsys.readouterr().out
    assert "profile (rank 0, 2 recorded steps" in out
    for part in ("data", "forward", "backward", "optimizer"):
        assert f"  {part} " in out


def test_activation_checkpointing_keeps_the_numbers_and_saves_activations(byte_dataset, tmp_path):
    """full/selective recompute in backward: same loss curve, fewer tensors kept for backward."""
    from gptrain.distributed.parallelize import apply_activation_checkpointing
    from gptrain.model import GPT

    curves = {}
    for ac in ("none", "full", "selective"):
        cfg, explicit = build_config(fast_overrides(byte_dataset, tmp_path, **{
            "train.run_name": f"ac-{ac}", "train.num_steps": 6, "parallel.ac": ac, "train.eval_every": 0}))
        train(cfg, explicit)
        rows = [json.loads(line) for line in (tmp_path / f"ac-{ac}" / "metrics.jsonl").read_text().splitlines()]
        curves[ac] = [r["train/loss"] for r in rows if "train/loss" in r]
    assert curves["full"] == curves["none"] and curves["selective"] == curves["none"]

    saved = {}
    for ac in ("none", "full", "selective"):
        torch.manual_seed(0)
        model = GPT(cfg.model)
        if ac != "none":
            apply_activation_checkpointing(model, ac)
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        x = torch.randint(0, 200, (4, 32))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(x, x)
        loss.backward()
        saved[ac] = total
        assert set(model.state_dict()) == set(GPT(cfg.model).state_dict())  # names unchanged by the wrapper
    # Inside a checkpointed block nothing is saved through autograd's hooks (selective AC keeps its matmul
    # outputs in its own cache; benchmarks/activation_checkpointing.py measures real peak memory).
    assert saved["full"] < 0.6 * saved["none"] and saved["selective"] < 0.6 * saved["none"]
