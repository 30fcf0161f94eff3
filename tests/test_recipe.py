"""The current training recipe: the modern family's options, Muon, and how they behave in every layout.

Fast, tiny models in fp32; the multi-process check (one torchrun launch per layout) is the slowest part.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptrain import optim
from gptrain.distributed.checkpointing import full_state, load_full_state
from gptrain.generate import generate
from gptrain.model import (
    FAMILIES,
    GPT,
    PRESETS,
    ModelConfig,
    apply_rotary,
    flops_per_token,
    model_settings_for,
    rotary_tables,
)
from gptrain.optim import (
    MuonAdamW,
    OptimConfig,
    apply_schedule,
    build_optimizer,
    muon_momentum_at,
    optim_settings_for,
    orthogonalize,
)

TESTS = Path(__file__).parent
CPU = torch.device("cpu")


def modern(**kw) -> ModelConfig:
    small = dict(vocab_size=97, max_position_embeddings=32, n_layers=2, n_heads=4, d_model=32, pad_vocab_multiple=1)
    return ModelConfig(**{**model_settings_for("tiny", "modern"), **small, **kw})


def gpt2(**kw) -> ModelConfig:
    small = dict(vocab_size=97, max_position_embeddings=32, n_layers=2, n_heads=4, d_model=32, pad_vocab_multiple=1)
    return ModelConfig(**{**small, **kw})


def muon_config(**kw) -> OptimConfig:
    return OptimConfig(**{**optim_settings_for("modern"), **kw})


# ---------------------------------------------------------------------------------------------- families
def test_families_presets_and_settings_resolution():
    assert set(FAMILIES["gpt2"]) == set(FAMILIES["modern"])  # the same switches, other values
    assert all(getattr(ModelConfig(), k) == v for k, v in FAMILIES["gpt2"].items())  # defaults = GPT-2
    assert {p for p, s in PRESETS.items() if s["family"] == "gpt2"} == {"gpt2", "gpt2-medium", "gpt2-large",
                                                                         "gpt2-xl"}
    tiny = model_settings_for("tiny")
    assert tiny["family"] == "modern" and tiny["pos_embedding"] == "rotary"
    assert (tiny["n_layers"], tiny["d_model"], tiny["max_position_embeddings"]) == (4, 192, 256)
    gpt2_tiny = model_settings_for("tiny", "gpt2")
    assert gpt2_tiny["family"] == "gpt2" and gpt2_tiny["pos_embedding"] == "learned" and gpt2_tiny["d_model"] == 192
    assert model_settings_for("gpt2")["family"] == "gpt2"
    with torch.device("meta"):  # the largest modern preset: about 1B parameters besides its lookup tables
        big = GPT(ModelConfig(vocab_size=65536, **model_settings_for("d26")))
    assert 0.9e9 < big.num_parameters(non_embedding=True) < 1.1e9
    from gptrain.errors import UserError

    with pytest.raises(UserError, match="unknown preset 'tiyn'.*Did you mean 'tiny'"):
        model_settings_for("tiyn")
    with pytest.raises(UserError, match="unknown model family 'modrn'.*Did you mean 'modern'"):
        model_settings_for("tiny", "modrn")


# ---------------------------------------------------------------------------------------------- rotary
def test_rotary_attention_depends_only_on_relative_positions():
    torch.manual_seed(0)
    cfg = modern(max_position_embeddings=64)
    attn = GPT(cfg).blocks["0"].attn
    with torch.no_grad():
        attn.qkv.weight.normal_(0, 0.3)
        attn.out_proj.weight.normal_(0, 0.3)  # zero-initialised: would hide everything
    cos, sin = rotary_tables(cfg)
    x = torch.randn(2, 16, cfg.d_model)
    with torch.no_grad():
        at_0 = attn(x, rope=(cos[:16], sin[:16]))
        at_37 = attn(x, rope=(cos[37:53], sin[37:53]))  # every position shifted by 37
        unrotated = attn(x)
    assert torch.allclose(at_0, at_37, atol=1e-5)
    assert not torch.allclose(at_0, unrotated, atol=1e-3)  # positions do matter
    # the scores themselves: q·k depends on the distance only
    q, k = torch.randn(1, 1, 1, cfg.head_dim), torch.randn(1, 1, 1, cfg.head_dim)
    def score(i, j):
        return (apply_rotary(q, cos[i:i + 1], sin[i:i + 1]) * apply_rotary(k, cos[j:j + 1], sin[j:j + 1])).sum()
    assert score(9, 4) == pytest.approx(score(30, 25).item(), abs=1e-5)
    assert score(9, 4) != pytest.approx(score(9, 5).item(), abs=1e-3)


def test_kv_cache_generation_matches_uncached_forward_for_the_modern_family():
    torch.manual_seed(0)
    model = GPT(modern(value_embeds=True))  # with its option that looks at the token ids
    with torch.no_grad():  # wake the zero-initialised projections so that every layer contributes
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    x = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        full = model(x)
        cache = model.new_kv_cache(2, device="cpu", dtype=torch.float32)
        parts = [model(x[:, :7], kv_cache=cache), model(x[:, 7:11], kv_cache=cache)]  # a prompt, then a chunk
        parts += [model(x[:, i:i + 1], kv_cache=cache) for i in range(11, 20)]  # then one token at a time
    assert torch.allclose(full, torch.cat(parts, dim=1), atol=1e-5)
    prompt = [5, 17, 3, 42]
    with_cache = generate(model, prompt, 20, temperature=1.0, top_k=None, use_cache=True,
                          generator=torch.Generator().manual_seed(7))
    without = generate(model, prompt, 20, temperature=1.0, top_k=None, use_cache=False,
                       generator=torch.Generator().manual_seed(7))
    assert with_cache == without and len(with_cache) == 20


# ---------------------------------------------------------------------------------------------- switches
def _perturbed(cfg: ModelConfig, source: GPT | None = None) -> GPT:
    """A model of `cfg` whose parameters are those of `source` where names and shapes agree (so that two
    configs differ only by what the option does), and small random values (no zeros) everywhere."""
    torch.manual_seed(1)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    if source is not None:
        theirs = source.state_dict()
        mine = model.state_dict()
        model.load_state_dict({k: theirs[k] if k in theirs and theirs[k].shape == v.shape else v
                               for k, v in mine.items()})
    return model


def _params(model: GPT) -> set[str]:
    return {name for name, _ in model.named_parameters()}


def _logits(model: GPT) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.arange(24).view(2, 12) % 97)


def _check_pos_embedding(base, flipped):
    assert "pos_emb.weight" in _params(base) and "pos_emb.weight" not in _params(flipped)
    assert flipped.pos_emb is None and flipped.rope_cos.shape == (32, 4)
    assert "rope_cos" not in flipped.state_dict()  # a function of the config, not in checkpoints


def _check_norm(base, flipped):
    assert isinstance(flipped.ln_f, torch.nn.RMSNorm) and isinstance(base.ln_f, torch.nn.LayerNorm)


def _check_norm_weight(base, flipped):
    assert "ln_f.weight" in _params(base) and not any(".ln_" in n or n.startswith("ln_") for n in _params(flipped))


def _check_embed_norm(base, flipped):
    assert base.emb_norm is None and flipped.emb_norm is not None
    x = torch.arange(12).view(1, 12)
    assert torch.allclose(flipped.tok_emb(x).norm(dim=-1), base.tok_emb(x).norm(dim=-1))  # norm is not the init


def _check_qk_norm(base, flipped):
    assert _params(base) == _params(flipped)


def _check_mlp_activation(base, flipped):
    from gptrain.model import relu_squared

    assert flipped.blocks["0"].mlp.activation is relu_squared and _params(base) == _params(flipped)


def _check_zero_init_proj(base, flipped):
    fresh = GPT(flipped.cfg)
    for block in fresh.blocks.values():
        assert not block.attn.out_proj.weight.any() and not block.mlp.fc_out.weight.any()
    assert GPT(base.cfg).blocks["0"].attn.out_proj.weight.std() > 0


def _check_logit_softcap(base, flipped):
    assert _logits(flipped).abs().max() <= 0.5 + 1e-6 < _logits(base).abs().max()


def _check_bias(base, flipped):
    assert any(n.endswith("bias") for n in _params(base)) and not any(n.endswith("bias") for n in _params(flipped))


def _check_tie_embeddings(base, flipped):
    assert base.lm_head.weight is base.tok_emb.weight and flipped.lm_head.weight is not flipped.tok_emb.weight


def _check_init(base, flipped):
    torch.manual_seed(0)
    fresh = GPT(flipped.cfg)
    qkv = fresh.blocks["0"].attn.qkv.weight
    assert qkv.std().item() == pytest.approx(32 ** -0.5, rel=0.1) and qkv.abs().max() <= math.sqrt(3 / 32)
    assert fresh.tok_emb.weight.std().item() == pytest.approx(32 ** -0.5, rel=0.1)  # tied: 1/√d
    assert GPT(base.cfg).blocks["0"].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.1)


def _check_value_embeds(base, flipped):
    assert base.value_embeds is None and [n for n in _params(flipped) if n.startswith("value_embeds.")] == [
        "value_embeds.1.weight"]  # 2 layers: the last one only


# Each switch of the families: its value in the flipped model (the modern one, or a value that shows it),
# and what proves it is applied beyond the forward pass giving other logits.
# Options that shape the parameters only (at initialisation, or which exist), so that copied weights give
# the same logits: their checks look at the parameters.
PARAMETERS_ONLY = {"zero_init_proj", "init", "tie_embeddings"}
SWITCHES = {
    "pos_embedding": ("rotary", _check_pos_embedding),
    "norm": ("rmsnorm", _check_norm),
    "norm_weight": (False, _check_norm_weight),
    "embed_norm": (True, _check_embed_norm),
    "qk_norm": (True, _check_qk_norm),
    "mlp_activation": ("relu2", _check_mlp_activation),
    "zero_init_proj": (True, _check_zero_init_proj),
    "logit_softcap": (0.5, _check_logit_softcap),  # a small cap: these small logits are visibly capped
    "bias": (False, _check_bias),
    "tie_embeddings": (False, _check_tie_embeddings),
    "init": ("fan_in", _check_init),
    "value_embeds": (True, _check_value_embeds),
}


def test_every_family_option_has_a_check():
    assert set(SWITCHES) == set(FAMILIES["gpt2"])


@pytest.mark.parametrize("option", list(SWITCHES))
def test_each_option_is_really_applied(option):
    value, check = SWITCHES[option]
    base = _perturbed(gpt2())
    flipped = _perturbed(gpt2(**{option: value}), source=base)
    check(base, flipped)
    if option not in PARAMETERS_ONLY:
        assert not torch.allclose(_logits(base), _logits(flipped), atol=1e-4), f"{option} changed nothing"
    # and switching it in the modern family changes the modern model too (back to GPT-2's value, or for an
    # option the modern family leaves off, on)
    other = FAMILIES["gpt2"][option] if FAMILIES["gpt2"][option] != FAMILIES["modern"][option] else value
    m_base = _perturbed(modern())
    m_other = _perturbed(modern(**{option: other}), source=m_base)
    if option not in PARAMETERS_ONLY:
        assert not torch.allclose(_logits(m_base), _logits(m_other), atol=1e-4), f"{option} changed nothing"


@pytest.mark.parametrize("chunk", [0, 5])
def test_soft_capped_loss_and_gradients_of_both_heads_agree(chunk):
    torch.manual_seed(0)
    cfg = modern(logit_softcap=2.0, pad_vocab_multiple=64)  # 97 → 128 rows: padded columns too
    ref = _perturbed(cfg)
    model = copy.deepcopy(ref)
    model.loss_chunk_size = chunk
    x, y = torch.randint(0, 97, (2, 10)), torch.randint(0, 97, (2, 10))
    logits = ref(x)
    expected = torch.nn.functional.cross_entropy(logits.view(-1, 128), y.reshape(-1))
    assert logits[..., :97].abs().max() <= 2.0
    expected.backward()
    loss = model(x, y)
    loss.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    for (name, a), b in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_flops_per_token_counts_matrices_only():
    d, L, T, V = 32, 2, 32, 97
    model = GPT(modern(value_embeds=True))
    n = model.num_parameters()
    # no position parameter; the untied token embedding and the value embedding (layer 1) are lookups; the
    # untied head is a matrix and counts
    assert flops_per_token(model.cfg, T, n) == 6 * (n - 2 * V * d) + 12 * L * d * T
    matrices = sum(p.numel() for name, p in model.named_parameters() if p.dim() == 2 and "emb" not in name)
    assert flops_per_token(model.cfg, T, n) == 6 * matrices + 12 * L * d * T
    assert model.num_parameters(non_embedding=True) == matrices


# ---------------------------------------------------------------------------------------------- Muon
def test_muon_groups_cover_every_parameter_once():
    model = GPT(modern(norm_weight=True, bias=True, value_embeds=True))
    opt = build_optimizer(model, muon_config(), CPU)
    assert isinstance(opt, MuonAdamW) and isinstance(opt, torch.optim.Optimizer)
    names = {g["name"]: g for g in opt.param_groups}
    assert set(names) == {"qkv", "matrices", "embed", "head", "scalars"}
    assert all(p.dim() == 2 for g in opt.param_groups if g["kind"] == "muon" for p in g["params"])
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in model.parameters()}
    assert names["head"]["params"] == [model.lm_head.weight]
    assert names["embed"]["params"] == [model.tok_emb.weight, model.value_embeds["1"].weight]


def test_muon_update_is_orthogonal_per_qkv_block():
    torch.manual_seed(0)
    model = GPT(modern())
    cfg = muon_config(muon_momentum_start=0.0, muon_momentum_warmup_steps=0, muon_momentum=0.0)
    opt = build_optimizer(model, cfg, CPU)
    apply_schedule(opt, 0, cfg, 100)
    lr = opt.param_groups[0]["lr"]
    d = 32

    def well_conditioned(rows, cols):  # singular values spread over [0.05, 1]: Newton–Schulz lifts them all
        u, _ = torch.linalg.qr(torch.randn(rows, min(rows, cols)))
        v, _ = torch.linalg.qr(torch.randn(cols, min(rows, cols)))
        return u @ torch.diag(torch.linspace(0.05, 1.0, min(rows, cols))) @ v.T

    qkv, fc_in = model.blocks["0"].attn.qkv.weight, model.blocks["0"].mlp.fc_in.weight
    grad_q = well_conditioned(d, d)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    qkv.grad = torch.cat([grad_q.view(4, 1, 8, d)] * 3, dim=1).view(3 * d, d)  # the same block as q, k and v
    fc_in.grad = well_conditioned(4 * d, d)
    before_qkv, before_fc = qkv.detach().clone(), fc_in.detach().clone()
    opt.step()
    delta_qkv = (before_qkv - qkv.detach()) / lr
    for part in range(3):  # each of q, k, v is orthogonal on its own
        block = delta_qkv.view(4, 3, 8, d)[:, part].reshape(d, d)
        s = torch.linalg.svdvals(block)
        assert s.min() > 0.6 and s.max() < 1.25, s
    # (orthogonalising the 3d × d stack as one would give three equal blocks with singular values 1/√3)
    s_fc = torch.linalg.svdvals((before_fc - fc_in.detach()) / (lr * 2))  # tall 4d × d: lr × √(rows/cols)
    assert s_fc.min() > 0.6 and s_fc.max() < 1.25, s_fc


@pytest.mark.parametrize("precision", ["fp32", "bf16", "auto"])
def test_orthogonalize_lifts_every_singular_value_towards_one(precision):
    torch.manual_seed(0)
    native = optim.cpu_has_native_bf16()
    for shape in [(64, 192), (192, 64)]:
        out = orthogonalize(torch.randn(*shape), dtype=precision)
        wanted = torch.bfloat16 if precision == "bf16" or (precision == "auto" and native) else torch.float32
        assert out.dtype == wanted
        s = torch.linalg.svdvals(out.float())
        assert s.min() > 0.6 and s.max() < 1.25


def test_auto_precision_is_bf16_only_where_the_cpu_multiplies_it_natively(monkeypatch):
    monkeypatch.setattr(optim, "cpu_has_native_bf16", lambda: False)
    assert optim.newton_schulz_dtype(torch.device("cpu")) == torch.float32
    monkeypatch.setattr(optim, "cpu_has_native_bf16", lambda: True)
    assert optim.newton_schulz_dtype(torch.device("cpu")) == torch.bfloat16


def test_batched_orthogonalisation_equals_one_matrix_at_a_time():
    """The optimizer orthogonalises all matrices of a shape in one batch (tall ones transposed, QKV split into
    its blocks): each result must be what that matrix alone gives."""
    torch.manual_seed(0)
    jobs = [(torch.randn(96, 32), (3, 8), 5, "fp32"), (torch.randn(32, 32), None, 5, "fp32"),
            (torch.randn(128, 32), None, 5, "fp32"), (torch.randn(32, 128), None, 5, "fp32"),
            (torch.randn(32, 128), None, 3, "fp32"), (torch.randn(96, 32), (3, 8), 5, "fp32")]
    batched = optim.orthogonalize_all(jobs)
    for (matrix, split, steps, dtype), out in zip(jobs, batched, strict=True):
        alone = orthogonalize(matrix, steps, split, dtype)
        assert out.shape == matrix.shape
        torch.testing.assert_close(out, alone, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(batched[3], batched[4])  # 3 steps are not 5: batches keep their own settings


def test_muon_momentum_warms_up_and_every_group_follows_the_schedule():
    cfg = muon_config(muon_momentum_start=0.85, muon_momentum=0.95, muon_momentum_warmup_steps=100,
                      lr_scheduler="wsd", decay_fraction=0.5, min_lr=0.0, muon_lr=0.05, embed_lr=0.3, head_lr=0.01)
    assert muon_momentum_at(0, cfg) == 0.85 and muon_momentum_at(50, cfg) == pytest.approx(0.9)
    assert muon_momentum_at(100, cfg) == muon_momentum_at(1000, cfg) == 0.95
    model = GPT(modern())  # d_model 32: AdamW learning rates × √(768/32)
    opt = build_optimizer(model, cfg, CPU)
    groups = {g["name"]: g for g in opt.param_groups}
    assert apply_schedule(opt, 10, cfg, 100) == 0.05
    assert groups["matrices"]["lr"] == 0.05 and groups["matrices"]["momentum"] == pytest.approx(0.86)
    assert groups["embed"]["lr"] == pytest.approx(0.3 * math.sqrt(24)) and groups["head"]["lr"] == pytest.approx(
        0.01 * math.sqrt(24))
    assert apply_schedule(opt, 75, cfg, 100) == pytest.approx(0.025)  # half-way down the decay
    assert groups["embed"]["lr"] == pytest.approx(0.15 * math.sqrt(24))


def test_modern_family_overfits_a_tiny_corpus():
    torch.manual_seed(0)
    model = GPT(modern(vocab_size=16, max_position_embeddings=16, d_model=64))
    data = torch.tensor([[i % 16 for i in range(k, k + 17)] for k in range(8)])
    cfg = muon_config(muon_momentum_warmup_steps=50)
    opt = build_optimizer(model, cfg, CPU)
    for step in range(100):
        apply_schedule(opt, step, cfg, 100)
        loss = model(data[:, :-1], data[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert loss.item() < 0.05


def _trained(optimizer: str, steps: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    model = GPT(modern(norm_weight=True, bias=True, value_embeds=True))  # every group kind present
    cfg = muon_config(optimizer=optimizer, weight_decay=0.1, muon_weight_decay=0.1)
    opt = build_optimizer(model, cfg, CPU)
    for step in range(steps):
        _train_step(model, opt, cfg, step)
    return model, opt, cfg


def _train_step(model, opt, cfg, step):
    g = torch.Generator().manual_seed(step)
    x = torch.randint(0, 97, (4, 17), generator=g)
    apply_schedule(opt, step, cfg, 20)
    model(x[:, :-1], x[:, 1:]).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _snapshot(model, opt) -> dict:
    state = {f"param/{n}": p.detach().clone() for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        for k, v in opt.state[p].items():
            state[f"state/{n}/{k}"] = v.clone() if torch.is_tensor(v) else v
    return state


def _assert_bitwise_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k], k


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_found_inf_skips_the_step_and_leaves_everything_bitwise_unchanged(optimizer):
    model, opt, cfg = _trained(optimizer)
    assert (opt.fused if optimizer == "muon" else opt.param_groups[0]["fused"])  # fused AdamW (CPU, CUDA)
    before = _snapshot(model, opt)
    x = torch.randint(0, 97, (4, 17))
    model(x[:, :-1], x[:, 1:]).backward()
    with torch.no_grad():
        model.blocks["0"].mlp.fc_in.weight.grad[0, 0] = float("nan")  # a diverged gradient
    opt.found_inf = torch.ones((), dtype=torch.float32)
    opt.step()
    _assert_bitwise_equal(before, _snapshot(model, opt))
    # the same step with found_inf 0 (and finite gradients) does move every parameter
    with torch.no_grad():
        model.blocks["0"].mlp.fc_in.weight.grad[0, 0] = 0.0
    opt.found_inf = torch.zeros((), dtype=torch.float32)
    opt.step()
    after = _snapshot(model, opt)
    moved = [k for k in before if k.startswith("param/") and not torch.equal(before[k], after[k])]
    assert len(moved) == len(list(model.parameters()))


def test_muon_state_round_trips_through_full_state_and_resume_is_bitwise_exact():
    model, opt, cfg = _trained("muon", steps=3)
    model_state, optim_state = copy.deepcopy(full_state(model, opt))  # (views of the live tensors: a copy, as saving)
    assert any("momentum_buffer" in s for s in optim_state["state"].values())
    for step in range(3, 6):  # the uninterrupted run
        _train_step(model, opt, cfg, step)
    fresh, fresh_opt, _ = _trained("muon", steps=0, seed=123)  # other weights, no state yet
    load_full_state(fresh, fresh_opt, model_state, optim_state)
    for step in range(3, 6):  # the resumed run
        _train_step(fresh, fresh_opt, cfg, step)
    _assert_bitwise_equal(_snapshot(model, opt), _snapshot(fresh, fresh_opt))


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_muon_state_round_trips_through_a_sharded_checkpoint(tmp_path):
    from gptrain.distributed.checkpointing import load_sharded, save_sharded

    model, opt, cfg = _trained("muon", steps=3)
    save_sharded(tmp_path / "dcp", model, opt, {"step": 3})
    for step in range(3, 5):
        _train_step(model, opt, cfg, step)
    fresh, fresh_opt, _ = _trained("muon", steps=0, seed=123)
    assert load_sharded(tmp_path / "dcp", fresh, fresh_opt, {"step": 0}) == {"step": 3}
    assert [g["name"] for g in fresh_opt.param_groups] == [g["name"] for g in opt.param_groups]
    for step in range(3, 5):
        _train_step(fresh, fresh_opt, cfg, step)
    _assert_bitwise_equal(_snapshot(model, opt), _snapshot(fresh, fresh_opt))


# ---------------------------------------------------------------------------------------------- layouts
LAYOUTS = {  # name: (processes, dp_replicate, dp_shard, tp)
    "ddp2": (2, 2, 1, 1),
    "fsdp2": (2, 1, 2, 1),
    "tp2": (2, 1, 1, 2),
    "fsdp2_tp2": (4, 1, 2, 2),
}


def _run_worker(nproc: int, out: Path, degrees: tuple[int, int, int]) -> dict:
    worker = [str(TESTS / "muon_dist_worker.py"), str(out), *(str(d) for d in degrees)]
    cmd = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
                              if nproc > 1 else []) + worker
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def single_process_curve(tmp_path_factory):
    return _run_worker(1, tmp_path_factory.mktemp("muon") / "single.json", (1, 1, 1))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_follows_the_one_process_curve_with_muon(layout, single_process_curve, tmp_path):
    nproc, *degrees = LAYOUTS[layout]
    got = _run_worker(nproc, tmp_path / f"{layout}.json", tuple(degrees))
    ref = single_process_curve
    assert ref["losses"][-1] < ref["losses"][0] - 1.0  # it trains
    rel = max(abs(a - b) / abs(b) for a, b in zip(got["losses"], ref["losses"], strict=True))
    assert rel < 1e-4, (layout, rel)
    assert got["checksum"] == pytest.approx(ref["checksum"], rel=1e-5)
