import numpy as np
import pytest
import torch

from gptrain.data.loader import (
    BatchLayout,
    DevicePrefetcher,
    TrainBatches,
    eval_rows,
    eval_windows,
    inputs_and_targets,
)
from gptrain.errors import UserError
from gptrain.model import GPT, ModelConfig
from gptrain.optim import OptimConfig, build_optimizer, lr_at


def make_batches(n_tokens=1001, seq_len=10, micro=2, accum=2, world=1, rank=0, seed=3):
    tokens = np.arange(n_tokens, dtype=np.uint16)
    return TrainBatches(tokens, seq_len, BatchLayout(micro, accum, world, rank), seed)


def windows_of(b: TrainBatches, step: int) -> list[int]:
    out = []
    for m in range(b.layout.grad_accum):
        x, _ = b.get(step, m)
        out += [int(row[0]) // b.seq_len for row in x]
    return out


def test_targets_are_inputs_shifted_by_one():
    x, y = make_batches().get(0, 0)
    assert x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y[:, -1], x[:, -1] + 1)


def test_accelerator_batches_are_one_pinned_copy(monkeypatch):
    """On CUDA a micro-batch is one pinned (B, T+1) block and one non-blocking copy; inputs and
    targets are views of it on the device (two strided host views would each be staged through a
    pageable temporary). Checked on the meta device, which a CPU-only build can copy to."""
    batches = make_batches()
    pinned = []

    def rows(step, micro, pin_memory=False):
        pinned.append(pin_memory)
        return TrainBatches.rows(batches, step, micro)  # a CPU-only build cannot pin

    monkeypatch.setattr(batches, "rows", rows)
    prefetch = DevicePrefetcher(batches, torch.device("meta"), grad_accum=2)
    prefetch.cuda = True
    x, y = prefetch.get(0, 0)
    assert pinned == [True, True]  # this micro-batch and, ahead of use, the next
    assert x.device.type == "meta" and x.shape == y.shape == (2, 10)
    assert x._base is not None and x._base is y._base and x._base.shape == (2, 11)
    assert y.storage_offset() == 1


def test_batches_are_a_pure_function_of_seed_and_step():
    a, b = make_batches(), make_batches()
    for step in (5, 0, 17, 5):  # any order, no hidden state
        assert windows_of(a, step) == windows_of(b, step)
    assert windows_of(make_batches(seed=4), 0) != windows_of(a, 0)


def test_every_window_once_per_epoch_then_reshuffled():
    b = make_batches(n_tokens=401, seq_len=10, micro=2, accum=2)  # 40 windows, 4 per step
    epoch0 = sum((windows_of(b, s) for s in range(10)), [])
    epoch1 = sum((windows_of(b, s) for s in range(10, 20)), [])
    assert sorted(epoch0) == list(range(40)) and sorted(epoch1) == list(range(40))
    assert epoch0 != epoch1
    assert b.epoch_of(10) == 1.0


def test_data_parallel_ranks_split_the_same_global_batch():
    single = make_batches(micro=2, accum=4, world=1)
    ranks = [make_batches(micro=2, accum=2, world=2, rank=r) for r in range(2)]
    for step in range(3):
        together = sorted(windows_of(ranks[0], step) + windows_of(ranks[1], step))
        assert together == sorted(windows_of(single, step))
        assert not set(windows_of(ranks[0], step)) & set(windows_of(ranks[1], step))


def test_eval_windows_budget_and_errors():
    val = np.arange(105, dtype=np.uint16)
    assert eval_windows(val, 10, 1_000_000) == 10
    assert eval_windows(val, 10, 35) == 3
    x, y = inputs_and_targets(eval_rows(val, 10, range(0, 3)))
    assert x.shape == (3, 10) and int(y[2, -1]) == 30
    with pytest.raises(UserError, match="fewer than one sequence"):
        eval_windows(np.arange(5, dtype=np.uint16), 10, 100)


def test_schedules():
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, lr_scheduler="cosine")
    assert lr_at(0, cfg, 100) == pytest.approx(0.1)
    assert lr_at(9, cfg, 100) == pytest.approx(1.0)
    assert lr_at(10, cfg, 100) == pytest.approx(1.0)
    assert lr_at(55, cfg, 100) == pytest.approx(0.55)
    assert lr_at(100, cfg, 100) == pytest.approx(0.1)
    cfg.lr_scheduler = "linear"
    assert lr_at(55, cfg, 100) == pytest.approx(0.55)
    assert lr_at(100, cfg, 100) == pytest.approx(0.1)
    cfg.lr_scheduler = "constant"
    assert lr_at(99, cfg, 100) == 1.0
    cfg.lr_scheduler = "wsd"
    cfg.decay_fraction = 0.2
    assert lr_at(79, cfg, 100) == 1.0
    assert lr_at(90, cfg, 100) == pytest.approx(0.55)
    assert lr_at(100, cfg, 100) == pytest.approx(0.1)
    assert OptimConfig(lr=2.0).min_lr is None and lr_at(1000, OptimConfig(lr=2.0), 10) == pytest.approx(0.2)


def test_weight_decay_only_on_matrices():
    model = GPT(ModelConfig(vocab_size=64, max_position_embeddings=8, n_layers=1, n_heads=2, d_model=8))
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1), torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() == 1 for p in no_decay["params"])
    n = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n == model.num_parameters()  # the tied weight appears once
