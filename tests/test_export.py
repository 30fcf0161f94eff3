"""Hugging Face export and import, checked by transformers itself (offline, tiny models).

- For each family (gpt2 → GPT2LMHeadModel, modern without value embeddings → NanoChatForCausalLM, anything
  else → GptrainForCausalLM, gptrain's own remote code), option mix and tokenizer kind (byte, bpe:N, nanoGPT
  characters): transformers' logits equal gptrain's within 1e-5 (fp32), greedy `generate` gives gptrain's
  tokens, AutoTokenizer gives the same ids and decodes back to the same text.
- GptrainForCausalLM: cached generation equals uncached and gptrain's, padded batches (left or right, an
  attention_mask) give each row's unpadded logits, import gives back the same weights bit for bit.
- Random GPT2LMHeadModel / NanoChatForCausalLM models saved by transformers import with equal logits;
  export → import → export writes the same bytes; sharded weights (an index) load both ways.
- FSDP×2 and TP×2 runs under torchrun (gloo): their checkpoints (mid-run dcp/ only, and final) export the
  same weights as the single-process run of the same training.
- Bad input is refused with one clear UserError and leaves nothing written.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import WORDS, fast_overrides

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from safetensors import safe_open  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel  # noqa: E402

from gptrain import export as E  # noqa: E402
from gptrain.checkpoint import save_checkpoint  # noqa: E402
from gptrain.data.tokenizer import ByteTokenizer, CharTokenizer, tokenizer_meta, train_bpe  # noqa: E402
from gptrain.errors import UserError  # noqa: E402
from gptrain.generate import generate  # noqa: E402
from gptrain.model import FAMILIES, GPT, ModelConfig  # noqa: E402

TOL = 1e-5
SAMPLE = ("the quick brown fox jumps over the lazy dog.\n\tdef f(x): return x  # ünïcödé, 😀, 中文\n"
          "Two  spaces, trailing space \n<|endoftext|> and the end")


def corpus_texts(n=200):
    import random

    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(40)) for _ in range(n)]


def make_tokenizer(kind: str):
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        return train_bpe(corpus_texts() + [SAMPLE], 300)
    return CharTokenizer(sorted(set("".join(corpus_texts()) + SAMPLE)))


def random_model(cfg: ModelConfig, seed: int = 0) -> GPT:
    """A GPT whose every weight matters: biases and LayerNorm weights moved off their zeros and ones."""
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def write_checkpoint(run: Path, model: GPT, tok, step: int = 5) -> Path:
    info = {"config": {"model": dataclasses.asdict(model.cfg)}, "tokenizer": tokenizer_meta(tok),
            "val_loss": 3.25, "tokens_seen": 1234}
    extra = {"tokenizer.json": tok.to_json()} if tok.to_json() is not None else None
    return save_checkpoint(run / "checkpoints", step, model.state_dict(), {}, info, extra_files=extra)


def tiny_cfg(tok, **kw) -> ModelConfig:
    return ModelConfig(**{"vocab_size": tok.vocab_size, "max_position_embeddings": 32, "n_layers": 2, "n_heads": 4,
                          "d_model": 32, **kw})


pytestmark = pytest.mark.usefixtures("private_hf_home")  # conftest: remote code under tmp



def load_hf(model_dir: Path):
    """transformers' model of an exported folder, in fp32; remote code only where the folder has some."""
    remote = "auto_map" in json.loads((Path(model_dir) / "config.json").read_text())
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, trust_remote_code=remote).eval()


def hf_logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return load_hf(model_dir)(ids).logits


def safetensors_of(folder: Path) -> dict[str, bytes]:
    """Every tensor of an exported folder (all shards) as (dtype, shape, raw bytes)."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                t = st.get_tensor(k)
                out[k] = (str(t.dtype), tuple(t.shape), t.contiguous().view(torch.uint8).numpy().tobytes())
    return out


MODERN = {**FAMILIES["modern"], "family": "modern"}  # the default model: value embeddings
NANOCHAT = {**MODERN, "value_embeds": False}
GPT2_QK_ROTARY = {"qk_norm": True, "pos_embedding": "rotary", "rope_base": 500.0}
MODERN_TIED_GAINS_BIAS = {**MODERN, "tie_embeddings": True, "norm_weight": True, "bias": True}
ROTARY_LAYERNORM = {"pos_embedding": "rotary", "logit_softcap": 10.0, "value_embeds": True, "tie_embeddings": False,
                    "embed_norm": True, "mlp_activation": "relu2", "norm_weight": False, "bias": False}
VARIANTS = {  # tokenizer kind, model settings, the transformers class they export as
    "gpt2-byte": ("byte", {}, "GPT2LMHeadModel"),
    "gpt2-bpe": ("bpe", {}, "GPT2LMHeadModel"),
    "gpt2-chars": ("chars", {}, "GPT2LMHeadModel"),
    "gpt2-untied-nobias-dff": ("byte", {"tie_embeddings": False, "bias": False, "d_ff": 48}, "GPT2LMHeadModel"),
    "gpt2-no-norm-gains": ("bpe", {"norm_weight": False}, "GPT2LMHeadModel"),
    "nanochat-byte": ("byte", NANOCHAT, "NanoChatForCausalLM"),
    "nanochat-chars-tied-uncapped": ("chars", {**NANOCHAT, "tie_embeddings": True, "logit_softcap": 0.0,
                                               "rope_base": 500.0}, "NanoChatForCausalLM"),
    "modern-byte": ("byte", MODERN, "GptrainForCausalLM"),
    "modern-bpe": ("bpe", MODERN, "GptrainForCausalLM"),
    "gpt2-qk-norm-rotary-chars": ("chars", GPT2_QK_ROTARY, "GptrainForCausalLM"),
    "modern-tied-gains-bias-bpe": ("bpe", MODERN_TIED_GAINS_BIAS, "GptrainForCausalLM"),
}
REMOTE_FILES = ["configuration_gptrain.py", "modeling_gptrain.py"]
EMBEDDING = {"GPT2LMHeadModel": "transformer.wte.weight", "NanoChatForCausalLM": "model.embed_tokens.weight",
             "GptrainForCausalLM": "model.tok_emb.weight"}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_transformers_computes_what_gptrain_computes(tmp_path, variant):
    kind, options, arch = VARIANTS[variant]
    tok = make_tokenizer(kind)
    model = random_model(tiny_cfg(tok, **options))
    ckpt = write_checkpoint(tmp_path / "run", model, tok)
    out = E.export_hf(tmp_path / "run", tmp_path / "hf")
    assert out == (tmp_path / "hf").absolute()
    remote = arch == "GptrainForCausalLM"
    assert sorted(p.name for p in out.iterdir()) == sorted([
        "config.json", "generation_config.json", "gptrain.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json", *(REMOTE_FILES if remote else [])])
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [arch]
    assert ("auto_map" in config) == remote  # the standard classes need no remote code
    record = json.loads((out / "gptrain.json").read_text())
    assert record["source"] == {"checkpoint": str(ckpt.absolute()), "step": 5, "tokens_seen": 1234, "val_loss": 3.25}
    V = tok.vocab_size
    assert model.cfg.padded_vocab_size > V  # the padded rows were cut back
    with safe_open(str(out / "model.safetensors"), "pt") as st:
        assert st.get_tensor(EMBEDDING[arch]).shape == (V, 32)
        assert ("lm_head.weight" in st.keys()) == (not model.cfg.tie_embeddings)
        value_embeds = [k for k in st.keys() if ".value_embeds." in k]
        assert len(value_embeds) == (1 if model.cfg.value_embeds else 0)  # 2 layers: the last one has a table
        assert all(st.get_tensor(k).shape == (V, 32) for k in value_embeds)

    # Logits: transformers on the folder against gptrain on the checkpoint's weights.
    ids = torch.randint(0, V, (3, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids)[..., :V]
    theirs = hf_logits(out, ids)
    diff = (theirs - ours).abs().max().item()
    print(f"{variant}: max |logit difference| {diff:.2e}")
    assert theirs.shape == ours.shape and diff < TOL

    # Greedy generation: the same tokens.
    hf = load_hf(out)
    prompt = ids[0, :5].tolist()
    ours_new = generate(model, prompt, 20, temperature=0.0, stop_id=tok.eot_id)
    theirs_ids = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)[0, len(prompt):].tolist()
    if theirs_ids and theirs_ids[-1] == tok.eot_id:  # transformers keeps the end-of-text it stopped at
        theirs_ids = theirs_ids[:-1]
    assert theirs_ids == ours_new and len(ours_new) >= 10, (theirs_ids, ours_new)

    # The tokenizer: the same ids, back to the same text, end-of-text as eos.
    hf_tok = AutoTokenizer.from_pretrained(out)
    text = SAMPLE
    assert hf_tok(text)["input_ids"] == tok.encode(text)
    assert hf_tok.decode(tok.encode(text)) == text
    assert hf_tok.eos_token_id == tok.eot_id == hf.generation_config.eos_token_id == hf.config.eos_token_id
    with_eot = tok.encode(text) + [tok.eot_id] + tok.encode("x")
    assert hf_tok.decode(with_eot) == tok.decode(with_eot)


REMOTE_MIXES = {
    "modern": MODERN,
    "gpt2-qk-norm-rotary-value-embeds": {**GPT2_QK_ROTARY, "value_embeds": True},
    "modern-tied-gains-bias": MODERN_TIED_GAINS_BIAS,
    "rotary-layernorm-softcap": ROTARY_LAYERNORM,
}


def until_eot(tokens: list[int], eot: int) -> list[int]:
    return tokens[: tokens.index(eot)] if eot in tokens else tokens


@pytest.mark.parametrize("mix", list(REMOTE_MIXES))
def test_gptrain_class_caches_pads_and_imports_back(tmp_path, mix):
    """GptrainForCausalLM as transformers' users drive it: generate() with its KV cache, padded batches with an
    attention_mask (right padding as lm-eval batches, left padding as batched generation), the folder back."""
    tok = ByteTokenizer()
    model = random_model(tiny_cfg(tok, n_layers=3, **REMOTE_MIXES[mix]))  # value embeddings (if on) in layers 0, 2
    out = E.save_hf(model.cfg, model.state_dict(), tok, tmp_path / "hf")
    hf = load_hf(out)
    assert type(hf).__name__ == "GptrainForCausalLM"
    V, eot = tok.vocab_size, tok.eot_id
    ids = torch.randint(0, V - 1, (3, 32), generator=torch.Generator().manual_seed(6))
    lengths = (32, 20, 9)
    with torch.no_grad():
        alone = [model(ids[b:b + 1, :n])[0, :, :V] for b, n in enumerate(lengths)]
        real = torch.arange(32)[None] < torch.tensor(lengths)[:, None]
        right = hf(ids.masked_fill(~real, eot), attention_mask=real.long()).logits
        left_ids = torch.stack([torch.cat([torch.full((32 - n,), eot), ids[b, :n]]) for b, n in enumerate(lengths)])
        left = hf(left_ids, attention_mask=real.flip(1).long()).logits
    worst = max(max((right[b, :n] - alone[b]).abs().max().item(), (left[b, 32 - n:] - alone[b]).abs().max().item())
                for b, n in enumerate(lengths))
    print(f"{mix}: padded rows against each row alone: max |logit difference| {worst:.2e}")
    assert worst < TOL

    # Greedy generation: with transformers' cache, without it, and gptrain's own, one prompt at a time and
    # two left-padded prompts together.
    prompts = [ids[0, :5].tolist(), ids[1, :9].tolist()]
    ours = [generate(model, p, 16, temperature=0.0, stop_id=eot) for p in prompts]
    for prompt, want in zip(prompts, ours, strict=True):
        for use_cache in (True, False):
            got = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, use_cache=use_cache)
            assert until_eot(got[0, len(prompt):].tolist(), eot) == want, use_cache
    batch = torch.tensor([[eot] * 4 + prompts[0], prompts[1]])
    both = hf.generate(batch, attention_mask=(torch.arange(9)[None] >= torch.tensor([[4], [0]])).long(),
                       max_new_tokens=16, do_sample=False, pad_token_id=eot)
    assert [until_eot(row[9:].tolist(), eot) for row in both] == ours
    assert min(len(t) for t in ours) >= 8, ours

    # Back into gptrain: the same settings and weights; export → import → export writes the same bytes.
    cfg, state, got_tok = E.load_hf_model(out)
    assert cfg == model.cfg
    for k, v in model.state_dict().items():
        assert torch.equal(state[k][:V] if vocab_rows(k) else state[k], v[:V] if vocab_rows(k) else v), k
    again = E.save_hf(cfg, state, got_tok, tmp_path / "again")
    for name in ("model.safetensors", "config.json", *REMOTE_FILES):
        assert (out / name).read_bytes() == (again / name).read_bytes(), name


def test_byte_tokenizer_covers_every_byte(tmp_path):
    tok = ByteTokenizer()
    E.save_hf(tiny_cfg(tok), random_model(tiny_cfg(tok)).state_dict(), tok, tmp_path / "hf")
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "".join(chr(c) for c in range(1, 0x800)) + "😀\U0010ffff"  # 1-, 2-, 3- and 4-byte UTF-8
    assert hf_tok.encode(text) == tok.encode(text)
    assert hf_tok.decode(tok.encode(text)) == text
    every = list(range(257))  # lone bytes decode to the same replacement characters
    assert hf_tok.decode(every) == tok.decode(every)


def test_char_tokenizer_refuses_unknown_characters(tmp_path):
    tok = CharTokenizer(list("ab \n"))
    E.save_hf(tiny_cfg(tok), random_model(tiny_cfg(tok)).state_dict(), tok, tmp_path / "hf")
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok.encode("ab\nba ") == tok.encode("ab\nba ")
    with pytest.raises(Exception, match="UNK|unk"):  # as gptrain: an error, never a silently dropped char
        hf_tok.encode("abz")


def test_a_tokenizer_that_adds_bos_exports_without_adding_it(tmp_path):
    """gptrain never adds special tokens when it encodes: AutoTokenizer must not either, and the import gets back
    the original tokenizer (a dataset prepared with it still matches by fingerprint)."""
    from tokenizers import processors

    from gptrain.data.tokenizer import HFTokenizer

    bpe = make_tokenizer("bpe")
    backend = bpe.hf
    backend.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A", special_tokens=[
        ("<|endoftext|>", bpe.eot_id)])
    tok = HFTokenizer("hf:with-bos", backend)
    assert backend.encode("the fox").ids[0] == tok.eot_id != tok.encode("the fox")[0]
    E.save_hf(tiny_cfg(tok), random_model(tiny_cfg(tok)).state_dict(), tok, tmp_path / "hf")
    assert AutoTokenizer.from_pretrained(tmp_path / "hf")(SAMPLE)["input_ids"] == tok.encode(SAMPLE)
    _, _, back = E.load_hf_model(tmp_path / "hf")
    assert back.spec == "hf:with-bos" and back.fingerprint() == tok.fingerprint()


def hf_folder(folder: Path, tok, arch: str = "gpt2", **config):
    """A randomly initialised transformers model (GPT2LMHeadModel or NanoChatForCausalLM) saved by transformers,
    with a tokenizer beside it."""
    from transformers import NanoChatConfig, NanoChatForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(3)
    shape = dict(vocab_size=tok.vocab_size, bos_token_id=tok.eot_id, eos_token_id=tok.eot_id)
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_positions=32, n_embd=32, n_layer=2, n_head=4, **shape, **config))
    else:
        model = NanoChatForCausalLM(NanoChatConfig(max_position_embeddings=32, hidden_size=32, intermediate_size=64,
                                                   num_hidden_layers=2, num_attention_heads=4, pad_token_id=None,
                                                   **shape, **config))
    with torch.no_grad():
        for p in model.parameters():  # biases and LayerNorm weights off their initial zeros and ones
            p.add_(torch.randn_like(p) * 0.05)
    model.eval().save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=tok.hf, eos_token="<|endoftext|>").save_pretrained(folder)
    return model


IMPORTS = {  # architecture, config, tolerance
    "gpt2": ("gpt2", {}, TOL),
    "gpt2-untied-n_inner": ("gpt2", {"tie_word_embeddings": False, "n_inner": 40}, TOL),
    "nanochat": ("nanochat", {"rms_norm_eps": E.RMS_NORM_EPS}, TOL),
    "nanochat-tied-uncapped": ("nanochat", {"tie_word_embeddings": True, "final_logit_softcapping": None,
                                            "rms_norm_eps": E.RMS_NORM_EPS}, TOL),
    # NanoChatConfig's default eps 1e-6 where gptrain's RMS norms use fp32's machine epsilon (1.2e-7): accepted,
    # a difference this random model's small q and k show at 2.5e-5
    "nanochat-eps-1e-6": ("nanochat", {}, 1e-4),
}


@pytest.mark.parametrize("name", list(IMPORTS))
def test_transformers_models_import_with_equal_logits_and_round_trip(tmp_path, name):
    arch, config, tol = IMPORTS[name]
    tok = make_tokenizer("bpe")
    hf = hf_folder(tmp_path / "theirs", tok, arch, **config)
    cfg, state, got_tok = E.load_hf_model(tmp_path / "theirs")
    assert (cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.max_position_embeddings, cfg.vocab_size) == (
        2, 4, 32, 32, tok.vocab_size)
    assert cfg.family == ("gpt2" if arch == "gpt2" else "modern")
    assert cfg.tie_embeddings == config.get("tie_word_embeddings", arch == "gpt2")
    assert cfg.d_ff == (config.get("n_inner", 128) if arch == "gpt2" else 64)
    assert got_tok.encode(SAMPLE) == tok.encode(SAMPLE) and got_tok.eot_id == tok.eot_id
    model = GPT(cfg).eval()
    model.load_state_dict(state)  # strict: every weight of gptrain's layout, nothing else
    ids = torch.randint(0, tok.vocab_size, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = (model(ids)[..., : tok.vocab_size] - hf(ids).logits).abs().max().item()
    print(f"imported {name}: max |logit difference| {diff:.2e}")
    assert diff < tol

    # transformers' own weights come back bit for bit, and export → import → export is byte-identical.
    E.save_hf(cfg, state, got_tok, tmp_path / "first")
    assert safetensors_of(tmp_path / "first") == safetensors_of(tmp_path / "theirs")
    cfg2, state2, tok2 = E.load_hf_model(tmp_path / "first")
    assert cfg2 == cfg and tok2.fingerprint() == got_tok.fingerprint()
    E.save_hf(cfg2, state2, tok2, tmp_path / "second")
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):
        assert (tmp_path / "first" / name).read_bytes() == (tmp_path / "second" / name).read_bytes(), name


def test_the_original_gpt2_upload_layout_imports(tmp_path):
    """openai-community/gpt2's model.safetensors: names without "transformer.", causal-mask buffers beside the
    weights, no lm_head (tied)."""
    from safetensors.torch import load_file, save_file

    tok = make_tokenizer("bpe")
    hf = hf_folder(tmp_path / "gpt2", tok)
    weights = load_file(str(tmp_path / "gpt2" / "model.safetensors"))
    old = {k.removeprefix("transformer."): v for k, v in weights.items()}
    for i in range(2):
        old[f"h.{i}.attn.bias"] = torch.tril(torch.ones(32, 32)).view(1, 1, 32, 32)
    save_file(old, str(tmp_path / "gpt2" / "model.safetensors"), metadata={"format": "pt"})
    cfg, state, _ = E.load_hf_model(tmp_path / "gpt2")
    model = GPT(cfg).eval()
    model.load_state_dict(state)
    ids = torch.randint(0, tok.vocab_size, (2, 32), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (model(ids)[..., : tok.vocab_size] - hf(ids).logits).abs().max().item() < TOL


RESTORES = {  # tokenizer kind, model settings
    "gpt2-nobias-byte": ("byte", {"bias": False, "pad_vocab_multiple": 64, "dropout": 0.1}),
    "gpt2-no-gains-chars": ("chars", {"norm_weight": False}),
    "nanochat-bpe": ("bpe", {**NANOCHAT, "pad_vocab_multiple": 1, "zero_init_proj": False}),
    "modern-bpe": ("bpe", {**MODERN, "pad_vocab_multiple": 64, "zero_init_proj": False, "dropout": 0.1}),
    "gpt2-qk-norm-rotary-byte": ("byte", {**GPT2_QK_ROTARY, "init": "fan_in"}),
}


def vocab_rows(name: str) -> bool:
    return name in ("tok_emb.weight", "lm_head.weight") or name.startswith("value_embeds.")


@pytest.mark.parametrize("name", list(RESTORES))
def test_export_import_restores_the_gptrain_model_exactly(tmp_path, name):
    kind, options = RESTORES[name]
    tok = make_tokenizer(kind)
    model = random_model(tiny_cfg(tok, **options))
    write_checkpoint(tmp_path / "run", model, tok)
    E.export_hf(tmp_path / "run", tmp_path / "hf")
    cfg, state, got_tok = E.load_hf_model(tmp_path / "hf")
    assert cfg == model.cfg  # biases, padding and the rest of the settings come back
    assert type(got_tok) is type(tok) and got_tok.spec == tok.spec and got_tok.fingerprint() == tok.fingerprint()
    original = model.state_dict()
    V = cfg.vocab_size
    assert state.keys() == original.keys()
    for k, v in original.items():  # bit for bit; the padding rows (never used) come back as zeros
        assert torch.equal(state[k][:V] if vocab_rows(k) else state[k], v[:V] if vocab_rows(k) else v), k
        if vocab_rows(k):
            assert not state[k][V:].any()


def test_sharded_weights_and_dtypes(tmp_path):
    tok = ByteTokenizer()
    model = random_model(tiny_cfg(tok))
    write_checkpoint(tmp_path / "run", model, tok)
    E.export_hf(tmp_path / "run", tmp_path / "sharded", max_shard_size="20KB")
    files = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == files
    ids = torch.randint(0, 257, (2, 32), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours = model(ids)[..., :257]
    assert (hf_logits(tmp_path / "sharded", ids) - ours).abs().max().item() < TOL
    cfg, state, _ = E.load_hf_model(tmp_path / "sharded")
    assert torch.equal(state["blocks.1.attn.qkv.weight"], model.state_dict()["blocks.1.attn.qkv.weight"])

    E.export_hf(tmp_path / "run", tmp_path / "bf16", dtype="bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert hf.dtype == torch.bfloat16
    _, state16, _ = E.load_hf_model(tmp_path / "bf16")
    assert state16["pos_emb.weight"].dtype == torch.float32  # training weights
    assert torch.equal(state16["pos_emb.weight"], model.state_dict()["pos_emb.weight"].bfloat16().float())


# ------------------------------------------------------------------------------------------ bad input


def test_refuses_what_is_not_a_transformers_gpt2(tmp_path):
    with pytest.raises(UserError, match="not a Hugging Face transformers model: it has no config.json"):
        E.load_hf_model(tmp_path)
    (tmp_path / "config.json").write_text('{"hello": 1}')
    with pytest.raises(UserError, match="not a transformers model config"):
        E.load_hf_model(tmp_path)
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(UserError, match=r"holds a LlamaForCausalLM model .*cannot import. Supported: GPT2LMHeadModel"):
        E.load_hf_model(llama)
    tok = make_tokenizer("bpe")
    hf_folder(tmp_path / "inv", tok, scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(UserError, match="cannot compute exactly: scale_attn_by_inverse_layer_idx=True"):
        E.load_hf_model(tmp_path / "inv")
    hf_folder(tmp_path / "erf", tok, activation_function="gelu")
    with pytest.raises(UserError, match="activation_function='gelu'"):
        E.load_hf_model(tmp_path / "erf")
    hf_folder(tmp_path / "gqa", tok, "nanochat", num_key_value_heads=2)
    with pytest.raises(UserError, match="NanoChat model gptrain cannot compute exactly: num_key_value_heads=2"):
        E.load_hf_model(tmp_path / "gqa")
    (tmp_path / "erf" / "model.safetensors").unlink()
    with pytest.raises(UserError, match="no weights"):
        E.load_hf_model(tmp_path / "erf")


def test_refuses_a_vocabulary_that_does_not_match_the_dataset():
    bpe, byte = make_tokenizer("bpe"), ByteTokenizer()
    with pytest.raises(UserError, match="uses 300 token ids but the model embeds only 257"):
        E.check_vocab_fits(257, 300)
    with pytest.raises(UserError, match="vocabulary of 300 tokens, larger than the dataset's 257"):
        E.check_vocab_fits(300, 257, model_tokenizer=bpe)
    with pytest.raises(UserError, match="tokenized with byte, not with the tokenizer of the model"):
        E.check_vocab_fits(300, 257, model_tokenizer=bpe, data_tokenizer=tokenizer_meta(byte))
    E.check_vocab_fits(384, 257, model_tokenizer=byte, data_tokenizer=tokenizer_meta(byte))  # padded: fine
    E.check_vocab_fits(257, 257)


def test_export_refuses_and_writes_nothing_half(tmp_path, monkeypatch):
    tok = ByteTokenizer()
    model = random_model(tiny_cfg(tok))
    write_checkpoint(tmp_path / "run", model, tok)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="is not empty and is not an earlier gptrain export: nothing was written"):
        E.export_hf(tmp_path / "run", busy)
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]
    with pytest.raises(UserError, match="unknown export dtype 'int8'"):
        E.export_hf(tmp_path / "run", tmp_path / "x", dtype="int8")
    assert not (tmp_path / "x").exists()

    # A failure in the middle of writing leaves the earlier export as it was and no temporary folder.
    first = E.export_hf(tmp_path / "run", tmp_path / "hf")
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    real = E._write_text

    def failing(path, text):
        if path.name == "tokenizer_config.json":
            raise OSError("disk full")
        real(path, text)

    monkeypatch.setattr(E, "_write_text", failing)
    with pytest.raises(OSError, match="disk full"):
        E.export_hf(tmp_path / "run", tmp_path / "hf", dtype="bf16")
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "hf", "run"]
    monkeypatch.undo()
    E.export_hf(tmp_path / "run", tmp_path / "hf", dtype="bf16")  # an earlier export is replaced
    assert json.loads((first / "config.json").read_text())["torch_dtype"] == "bfloat16"

    # An export killed between its two renames: the earlier export, set aside, is put back by the next one;
    # a killed export's temporary folder is removed.
    dead = 2**22 + 12345  # no such process
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    os.replace(first, tmp_path / f".hf.old-{dead}")
    (tmp_path / f".hf.tmp-{dead}").mkdir()
    monkeypatch.setattr(E, "_write_text", failing)
    with pytest.raises(OSError, match="disk full"):  # and this export fails too
        E.export_hf(tmp_path / "run", tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "hf", "run"]
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    monkeypatch.undo()

    # fp16 would overflow: refused, not written as inf.
    with torch.no_grad():
        model.pos_emb.weight[0, 0] = 1e5
    write_checkpoint(tmp_path / "run", model, tok, step=6)
    with pytest.raises(UserError, match="beyond fp16's range"):
        E.export_hf(tmp_path / "run", tmp_path / "fp16", dtype="fp16")
    assert not (tmp_path / "fp16").exists() and not list(tmp_path.glob(".fp16*"))


def test_the_standard_classes_are_chosen_whenever_they_compute_the_model():
    assert E.FAMILIES[-1] is E.GPTRAIN  # tried last
    assert E.family_for(ModelConfig()) is E.GPT2
    assert E.family_for(ModelConfig(**NANOCHAT)) is E.NANOCHAT
    assert E.family_for(ModelConfig(**{**NANOCHAT, "tie_embeddings": True, "logit_softcap": 0.0})) is E.NANOCHAT
    assert E.family_for(ModelConfig(init="fan_in", zero_init_proj=True, dropout=0.1)) is E.GPT2  # training only
    # What no standard class computes: gptrain's own class, never a refusal.
    assert E.NANOCHAT.refusals(ModelConfig(**MODERN)) == ["value_embeds=True (needs False)"]
    assert E.family_for(ModelConfig(**MODERN)) is E.GPTRAIN  # the default model
    assert E.family_for(ModelConfig(qk_norm=True)) is E.GPTRAIN
    assert E.family_for(ModelConfig(**{**NANOCHAT, "bias": True})) is E.GPTRAIN
    assert E.family_for(ModelConfig(value_embeds=True)) is E.GPTRAIN
    # A setting model.py gains later, named by no family: exported only at its default.
    Extended = dataclasses.make_dataclass("Extended", [("frobnicate", bool, False)], bases=(ModelConfig,))
    assert E.family_for(Extended()) is E.GPT2
    assert E.family_for(Extended(**MODERN)) is E.GPTRAIN
    with pytest.raises(UserError, match=r"export does not know the setting\(s\) frobnicate=True\. Every other"):
        E.family_for(Extended(frobnicate=True))


def test_refuses_a_gptrain_folder_it_cannot_compute(tmp_path):
    from gptrain.hf_remote.configuration_gptrain import REMOTE_CODE_VERSION

    assert E.REMOTE_CODE_VERSION == REMOTE_CODE_VERSION
    tok = ByteTokenizer()
    E.save_hf(tiny_cfg(tok, **MODERN), random_model(tiny_cfg(tok, **MODERN)).state_dict(), tok, tmp_path / "hf")
    config_file = tmp_path / "hf" / "config.json"
    config = json.loads(config_file.read_text())
    for change, message in [({"remote_code_version": 2}, "remote_code_version=2 .*update gptrain"),
                            ({"norm": "batchnorm"}, "norm='batchnorm' \\(one of layernorm, rmsnorm\\)"),
                            ({"value_embed_layers": [0]}, r"value_embed_layers=\[0\] \(gptrain gives value "
                                                          r"embeddings to layers \[1\]\)"),
                            ({"value_embed_layers": []}, "do not match its config.json .*unexpected "
                                                         r"\['model.value_embeds.1.weight'\]")]:
        config_file.write_text(json.dumps({**config, **change}))
        with pytest.raises(UserError, match=message):
            E.load_hf_model(tmp_path / "hf")


def test_layer_norm_epsilon_is_gptrain_s():
    assert GPT(ModelConfig(n_layers=1, d_model=32, n_heads=2, vocab_size=10)).ln_f.eps == E.LAYER_NORM_EPS


# ------------------------------------------------------------------------------------------ sharded


LAYOUTS = {"fsdp2": ["--dp-shard", "2"], "tp2": ["--tp", "2"]}


def run_args(dataset, runs: Path, family: str) -> list[str]:
    return ["--data", str(dataset), "--runs-dir", str(runs), "--n-layers", "2", "--n-heads", "2", "--d-model", "32",
            "--max-position-embeddings", "32", "--batch-size", "4", "--global-batch-size", "16", "--num-steps", "6",
            "--log-every", "3", "--eval-every", "0", "--save-every", "3", "--warmup-steps", "2",
            "--sample-tokens", "0", "--progress", "plain", "--loss-chunk-size", "0", "--family", family,
            "--optimizer", "adamw"]


@pytest.fixture(scope="module")
def single_runs(byte_dataset, tmp_path_factory):
    """The single-process run of each family, trained once (on first use) with the torchrun runs' settings."""
    from gptrain.config import build_config
    from gptrain.trainer import train

    runs: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in runs:
            root = tmp_path_factory.mktemp(f"single-{family}")
            cfg, explicit = build_config(fast_overrides(byte_dataset, root, **{
                "train.run_name": "single", "train.num_steps": 6, "train.log_every": 3, "train.eval_every": 0,
                "train.save_every": 3, "train.sample_tokens": 0, "train.global_batch_size": 16,
                "train.loss_chunk_size": 0, "model.family": family, "optim.optimizer": "adamw"}))
            train(cfg, explicit)
            runs[family] = root / "single"
        return runs[family]

    return get


# The layouts that shard differently (FSDP: rows of every weight; TP: heads of qkv, halves of the MLP) on the
# GPT-2 family, and tensor parallelism of the modern family's separate q, k, v rows and value embeddings.
# AdamW at its small learning rate for every family: what is checked is the export of sharded checkpoints, so
# the weights must agree to rounding. (The modern family's defaults, embeddings at AdamW lr 0.3 × √(768/32)
# while zero-initialised projections leave their gradients near zero, turn last-bit differences between
# layouts into visible ones within 6 steps; Muon's layout equivalence is tests/test_recipe.py's.)
@pytest.mark.parametrize("family, layout", [("gpt2", "fsdp2"), ("gpt2", "tp2"), ("modern", "tp2")])
def test_export_of_sharded_checkpoints_equals_the_single_process_export(byte_dataset, single_runs, tmp_path,
                                                                        family, layout):
    """An FSDP×2 or TP×2 run under torchrun (gloo): its mid-run (dcp/ only) and final checkpoints export the same
    tensors as the single-process run of the same training."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "gptrain",
           "train", *run_args(byte_dataset, tmp_path, family), "--run-name", layout, *LAYOUTS[layout]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for step in (3, 6):
        single = E.export_hf(single_runs(family) / "checkpoints" / f"step_{step:07d}", tmp_path / f"single-{step}")
        ckpt = tmp_path / layout / "checkpoints" / f"step_{step:07d}"
        assert (ckpt / "dcp").is_dir() and (ckpt / "model.pt").exists() == (step == 6)  # mid-run: dcp/ only
        out = E.export_hf(ckpt, tmp_path / f"{layout}-{step}")
        assert json.loads((out / "config.json").read_text()) == json.loads((single / "config.json").read_text())
        want, got = weights_of(single), weights_of(out)
        assert got.keys() == want.keys()
        worst = max((got[k] - want[k]).abs().max().item() for k in want)
        print(f"{family} {layout} step {step}: max |weight difference| to the single-process export {worst:.2e}")
        assert worst < 1e-5


def weights_of(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
