"""Host memory reuse: with gptrain's malloc settings a freed tensor's pages serve the next one."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gptrain.host_memory import DESCRIPTION, _glibc

pytestmark = pytest.mark.skipif(_glibc() is None, reason="mallopt tuning exists on glibc (Linux) only")

# A few forward/backward steps of an MLP whose activations are 64 MiB tensors, as in a CPU training
# step: count the minor page faults of the median step after a few warm-up steps.
# Each fault is a fresh zeroed page from the kernel; a step that reuses the memory freed by the
# previous one needs none.
PROBE = """
import json, resource, sys
from gptrain.host_memory import reuse_freed_memory
applied = reuse_freed_memory() if sys.argv[1] == "reuse" else "system default"
import torch
torch.manual_seed(0)
mlp = torch.nn.Sequential(torch.nn.Linear(16, 2048), torch.nn.GELU(), torch.nn.Linear(2048, 16))
x = torch.randn(8192, 16)
def step():
    mlp(x).square().mean().backward()
    mlp.zero_grad(set_to_none=True)
for _ in range(8):
    step()
faults = []
for _ in range(9):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
# The median step: now and then the heap still settles (one step takes some new pages), the typical step not.
print(json.dumps({"applied": applied, "faults_per_step": sorted(faults)[4], "activation_pages": 8192 * 2048 * 4 // 4096}))
"""


def probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_training_steps_reuse_freed_memory_instead_of_faulting_in_new_pages():
    default, reuse = probe("system"), probe("reuse")
    assert reuse["applied"] == DESCRIPTION
    pages = default["activation_pages"]  # one 64 MiB activation
    # glibc's default: every large activation is mmapped afresh, each of its pages faulted in again.
    assert default["faults_per_step"] > 2 * pages, default
    # With the settings a step reuses the previous step's memory: almost no fresh pages.
    assert reuse["faults_per_step"] < 0.25 * pages, reuse
    assert reuse["faults_per_step"] < 0.05 * default["faults_per_step"], (reuse, default)


def test_cpu_runs_record_the_host_allocator_and_the_flag_turns_it_off(byte_dataset, tmp_path, monkeypatch):
    from conftest import fast_overrides

    from gptrain import host_memory
    from gptrain.config import build_config
    from gptrain.trainer import train

    # As in a new process (earlier tests may have applied the settings to this one already).
    monkeypatch.setattr(host_memory, "_applied", None)
    recorded = {}
    for reuse in (False, True):
        cfg, explicit = build_config(fast_overrides(byte_dataset, tmp_path, **{
            "train.num_steps": 2, "train.eval_every": 0, "train.sample_tokens": 0,
            "train.reuse_host_memory": reuse, "train.run_name": f"reuse-{reuse}"}))
        run_dir = train(cfg, explicit).run_dir
        recorded[reuse] = json.loads((run_dir / "environment.json").read_text())["host_allocator"]
        assert json.loads((run_dir / "config.json").read_text())["train"]["reuse_host_memory"] is reuse
    assert recorded == {False: "system default", True: DESCRIPTION}
