import math

import pytest
import torch

from gptrain.generate import generate
from gptrain.model import GPT, PRESETS, ModelConfig, flops_per_token


def small(**kw) -> ModelConfig:
    base = dict(vocab_size=97, max_position_embeddings=32, n_layers=2, n_heads=4, d_model=32, pad_vocab_multiple=1)
    base.update(kw)
    return ModelConfig(**base)


def test_logits_do_not_depend_on_future_tokens():
    torch.manual_seed(0)
    model = GPT(small()).eval()
    x = torch.randint(0, 97, (2, 16))
    y = x.clone()
    y[:, 9:] = torch.randint(0, 97, (2, 7))  # change every token after position 8
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.allclose(a[:, :9], b[:, :9], atol=1e-6)
    assert not torch.allclose(a[:, 9:], b[:, 9:], atol=1e-3)


@pytest.mark.parametrize("vocab", [97, 257, 4096])
def test_initial_loss_is_log_vocab(vocab):
    torch.manual_seed(0)
    model = GPT(small(vocab_size=vocab, pad_vocab_multiple=128))
    x = torch.randint(0, vocab, (8, 32))
    loss = model(x, torch.randint(0, vocab, (8, 32))).item()
    assert abs(loss - math.log(vocab)) < 0.1


def test_padded_vocab_ids_are_never_predicted():
    model = GPT(small(vocab_size=100, pad_vocab_multiple=64))
    assert model.tok_emb.weight.shape[0] == 128
    logits = model(torch.randint(0, 100, (1, 8)))
    assert torch.isinf(logits[..., 100:]).all() and torch.isfinite(logits[..., :100]).all()


def test_tied_and_untied_heads_and_parameter_counts():
    tied = GPT(small())
    untied = GPT(small(tie_embeddings=False))
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert untied.num_parameters() - tied.num_parameters() == 97 * 32
    d, L = 32, 2
    per_block = (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d) + 4 * d
    assert tied.num_parameters(non_embedding=True) == L * per_block + 2 * d
    # FLOPs formula: 6N + 12·L·d·T with N excluding the position table, and the token embedding when untied
    n = tied.num_parameters() - tied.pos_emb.weight.numel()
    assert flops_per_token(tied.cfg, 32, tied.num_parameters()) == 6 * n + 12 * L * d * 32
    assert flops_per_token(untied.cfg, 32, untied.num_parameters()) == 6 * n + 12 * L * d * 32


def test_gpt2_init_scales_residual_projections():
    torch.manual_seed(0)
    model = GPT(small(n_layers=8, d_model=128, vocab_size=1000))
    std = model.blocks["0"].attn.out_proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(16)) < 0.001
    assert abs(model.blocks["0"].mlp.fc_in.weight.std().item() - 0.02) < 0.001


def test_gpt2_preset_has_124m_parameters():
    cfg = ModelConfig(vocab_size=50257, **PRESETS["gpt2"])
    with torch.device("meta"):
        model = GPT(cfg)
    # 124M with the embedding padded to 50304 rows (as nanoGPT does): 124,475,904
    assert model.num_parameters() == 124_475_904


def test_kv_cache_generation_matches_full_recompute():
    torch.manual_seed(0)
    model = GPT(small()).eval()
    prompt = [5, 17, 3, 42]
    g1 = torch.Generator().manual_seed(7)
    g2 = torch.Generator().manual_seed(7)
    with_cache = generate(model, prompt, 20, temperature=1.0, top_k=None, use_cache=True, generator=g1)
    without = generate(model, prompt, 20, temperature=1.0, top_k=None, use_cache=False, generator=g2)
    assert with_cache == without and len(with_cache) == 20
    greedy = generate(model, prompt, 25, temperature=0, use_cache=True)
    assert greedy == generate(model, prompt, 25, temperature=0, use_cache=False)


@pytest.mark.parametrize("knobs", [{"temperature": 1.0, "top_k": 1}, {"temperature": 1e-4, "top_k": None}])
def test_sampling_narrows_to_greedy_at_top_k_1_or_near_zero_temperature(knobs):
    torch.manual_seed(0)
    model = GPT(small()).eval()
    greedy = generate(model, [5, 17, 3], 20, temperature=0)
    assert generate(model, [5, 17, 3], 20, generator=torch.Generator().manual_seed(1), **knobs) == greedy


def test_kv_cache_logits_match_prefix_logits():
    torch.manual_seed(0)
    model = GPT(small()).eval()
    x = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        full = model(x)
        cache = model.new_kv_cache(1, device="cpu", dtype=torch.float32)
        first = model(x[:, :5], kv_cache=cache)
        rest = [model(x[:, i : i + 1], kv_cache=cache) for i in range(5, 12)]
    stitched = torch.cat([first] + rest, dim=1)
    assert torch.allclose(full, stitched, atol=1e-5)


def test_tiny_model_overfits_tiny_corpus():
    torch.manual_seed(0)
    model = GPT(small(vocab_size=16, n_layers=2, d_model=64, max_position_embeddings=16))
    data = torch.tensor([[i % 16 for i in range(k, k + 17)] for k in range(8)])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = model(data[:, :-1], data[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5


def test_generation_from_diverged_weights_is_a_clear_error():
    from gptrain.generate import NonFiniteLogits

    model = GPT(small())
    with torch.no_grad():
        model.blocks["0"].mlp.fc_in.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLogits, match="not finite"):
        generate(model, [1, 2, 3], 5)
