"""Hugging Face export and import: a gptrain model as a transformers folder, and back.

    export_hf(RUN_OR_CHECKPOINT, OUT_DIR)   any checkpoint (one process, or sharded DCP, mid-run or final)
    save_hf(model_cfg, state, tokenizer, OUT_DIR)     the same from weights in memory (end of training)
    load_hf_model(HF_DIR)                   (ModelConfig, gptrain state dict, Tokenizer) for --init-from
    check_vocab_fits(...)                   a model's vocabulary against a dataset's

The folder written holds what `AutoModelForCausalLM.from_pretrained(DIR)` and
`AutoTokenizer.from_pretrained(DIR)` read offline: config.json, model.safetensors (or shards and
model.safetensors.index.json above `max_shard_size`), generation_config.json, tokenizer.json and
tokenizer_config.json; plus gptrain.json, gptrain's own record (where the weights came from, the exact
gptrain tokenizer and model settings) that makes export → import → export lossless.

Model families. Each mapping is one `Family`: the ModelConfig option values it covers, its transformers
architecture, and two pure functions that rename and reshape tensors both ways. They are tried in order,
and the first that computes the model exactly is used:
- the gpt2 family → `GPT2LMHeadModel`, the modern family without value embeddings (rotary, RMSNorm,
  QK-norm, relu², soft-cap) → `NanoChatForCausalLM`: standard transformers classes, no remote code;
- anything else (value embeddings, as in today's default model; gpt2 with QK-norm; rotary with LayerNorm …)
  → `GptrainForCausalLM`, gptrain's own architecture as transformers remote code (gptrain.hf_remote):
  configuration_gptrain.py and modeling_gptrain.py are written into the folder, config.json's `auto_map`
  names them, and transformers loads it with `trust_remote_code=True`. Its weights keep gptrain's names
  and layouts (under `model.`), so every option mix exports exactly.
A ModelConfig setting no mapping knows (one added to model.py later) is refused by name.

Tokenizers. Every gptrain tokenizer is written as a `tokenizers` tokenizer.json that gives the same
ids: bpe:N and hf:… as they are; `byte` as a byte-level BPE with no merges (the 256 byte symbols as
ids 0..255, end-of-text 256); the characters of a nanoGPT dataset as a one-character-per-token
word-level vocabulary. AutoTokenizer opens it as a plain PreTrainedTokenizerFast (no model-specific
tokenizer class that might rebuild it differently).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gptrain.data.tokenizer import (
    EOT_TEXT,
    ByteTokenizer,
    CharTokenizer,
    HFTokenizer,
    Tokenizer,
    tokenizer_from_json,
    tokenizer_meta,
)
from gptrain.errors import UserError
from gptrain.hf_remote import CODE_FILES
from gptrain.jsonio import fsync_path
from gptrain.model import FAMILIES as MODEL_FAMILIES
from gptrain.model import MLP_ACTIVATIONS, NORMS, POS_EMBEDDINGS, ModelConfig, value_embed_layers
from gptrain.processes import process_alive

EXPORT_FORMAT = "gptrain-hf-export"
EXPORT_VERSION = 1
RECORD = "gptrain.json"  # gptrain's own record inside an exported folder
DEFAULT_MAX_SHARD_SIZE = 5_000_000_000  # bytes per safetensors file, as transformers' save_pretrained
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
FP16_MAX = 65504.0
HF_EXTRA = "pip install 'gptrain[hf]'"


# ================================================================================ families


SHAPE = frozenset({"vocab_size", "max_position_embeddings", "n_layers", "n_heads", "d_model", "d_ff"})
# How a model is initialised, trained or stored, not the function it computes.
TRAINING_ONLY = frozenset({"family", "init", "zero_init_proj", "dropout", "pad_vocab_multiple"})


@dataclass(frozen=True)
class Family:
    """One model family's mapping between gptrain's state dict and a transformers folder.

    `requires`: the ModelConfig option values the mapping computes (any other value is refused);
    `free`: options it expresses whatever their value. Shapes and settings that only change training
    (TRAINING_ONLY) are free in every family; a setting added to ModelConfig later and named nowhere
    must keep its default to be exported.
    """

    name: str  # the mapping's name in gptrain.json (gpt2, modern: the gptrain family it computes)
    architecture: str  # the transformers class in config.json's "architectures"
    model_type: str  # config.json "model_type"
    reads: tuple[str, ...]  # the transformers classes whose weights from_hf reads
    requires: dict[str, Any]
    free: frozenset[str]
    to_hf: Callable[[ModelConfig, dict[str, torch.Tensor], Tokenizer], tuple[dict, dict[str, torch.Tensor]]]
    from_hf: Callable[[dict, dict[str, torch.Tensor], Path], tuple[ModelConfig, dict[str, torch.Tensor]]]
    # The ModelConfig settings config.json holds exactly: on import they win over gptrain.json's record,
    # which restores the others (biases and gains a standard class cannot leave out, initialisation …).
    holds: frozenset[str] = SHAPE | {"tie_embeddings"}
    # Files of gptrain.hf_remote written into the folder: the remote code config.json's auto_map names.
    code_files: tuple[str, ...] = ()

    def refusals(self, cfg: ModelConfig) -> list[str]:
        """The settings of `cfg` this mapping cannot express ([]: it computes exactly what gptrain does)."""
        out = [f"{k}={getattr(cfg, k)!r} (needs {v!r})" for k, v in self.requires.items()
               if hasattr(cfg, k) and getattr(cfg, k) != v]
        defaults = type(cfg)()
        for f in dataclasses.fields(cfg):
            known = f.name in SHAPE or f.name in TRAINING_ONLY or f.name in self.requires or f.name in self.free
            if not known and getattr(cfg, f.name) != getattr(defaults, f.name):
                out.append(f"{f.name}={getattr(cfg, f.name)!r}")
        return out


def _padded_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """`t` with zero rows appended up to `rows` (padding ids are never fed in nor predicted: model.py)."""
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])]) if rows > t.shape[0] else t


def _check_names(named: dict[str, torch.Tensor], expected: set[str], where: Path, what: str) -> None:
    missing, unexpected = sorted(expected - named.keys()), sorted(named.keys() - expected)
    if missing or unexpected:
        raise UserError(f"the weights in {where} do not match its config.json ({what}): "
                        f"missing {missing[:5]}{'…' if len(missing) > 5 else ''}, "
                        f"unexpected {unexpected[:5]}{'…' if len(unexpected) > 5 else ''}. "
                        "Re-save the model with transformers' save_pretrained.")


def _check_shapes(cfg: ModelConfig, state: dict[str, torch.Tensor], where: Path) -> None:
    want = _gpt_state_shapes(cfg)
    bad = [f"{k} {tuple(v.shape)} (config: {tuple(want[k])})" for k, v in state.items()
           if tuple(v.shape) != tuple(want[k])]
    if bad:
        raise UserError(f"the weights in {where} do not match its config.json: {', '.join(bad[:3])}. "
                        "Re-save the model with transformers' save_pretrained.")


def _gpt_state_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    from gptrain.model import GPT

    with torch.device("meta"):
        return {k: v.shape for k, v in GPT(cfg).state_dict().items()}


def _family_options(name: str) -> dict[str, Any]:
    """The option values of a gptrain model family (model.FAMILIES), with its name."""
    return {**MODEL_FAMILIES[name], "family": name}


def _config_tokens(tok: Tokenizer) -> dict[str, int]:
    return {"bos_token_id": tok.eot_id, "eos_token_id": tok.eot_id}


# --------------------------------------------------------------------------- GPT-2 → GPT2LMHeadModel
# gptrain's LayerNorm is torch.nn.LayerNorm with its default eps; transformers' GPT-2 default is the same.
LAYER_NORM_EPS = 1e-5
# transformers' GPT-2 activations that are the tanh GELU gptrain computes.
GPT2_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")


def _qkv_to_hf(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """gptrain's fused rows (head, q|k|v, head_dim) → transformers' GPT-2 (q|k|v, head, head_dim)."""
    rest = t.shape[1:]
    return t.reshape(n_heads, 3, -1, *rest).transpose(0, 1).reshape(-1, *rest)


def _qkv_from_hf(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    rest = t.shape[1:]
    return t.reshape(3, n_heads, -1, *rest).transpose(0, 1).reshape(-1, *rest)


def _gpt2_layer_names(i: int) -> list[tuple[str, str, str]]:
    """(gptrain name, transformers name, how) for block i; how: "ln", "linear" (Conv1D: transposed) or "qkv"."""
    g, h = f"blocks.{i}.", f"transformer.h.{i}."
    return [(g + "ln_1", h + "ln_1", "ln"), (g + "attn.qkv", h + "attn.c_attn", "qkv"),
            (g + "attn.out_proj", h + "attn.c_proj", "linear"), (g + "ln_2", h + "ln_2", "ln"),
            (g + "mlp.fc_in", h + "mlp.c_fc", "linear"), (g + "mlp.fc_out", h + "mlp.c_proj", "linear")]


def _gpt2_to_hf(cfg: ModelConfig, state: dict[str, torch.Tensor], tok: Tokenizer) -> tuple[dict, dict]:
    V, H, D = cfg.vocab_size, cfg.n_heads, cfg.d_model
    like = state["tok_emb.weight"]
    out: dict[str, torch.Tensor] = {"transformer.wte.weight": like[:V], "transformer.wpe.weight": state["pos_emb.weight"]}

    # GPT-2 always has biases and norm gains: a model trained without them is the same function with zero
    # biases and unit gains.
    def bias(name: str, size: int) -> torch.Tensor:
        return state.get(f"{name}.bias", torch.zeros(size, dtype=like.dtype))

    def gain(name: str) -> torch.Tensor:
        return state.get(f"{name}.weight", torch.ones(D, dtype=like.dtype))

    for i in range(cfg.n_layers):
        for ours, theirs, how in _gpt2_layer_names(i):
            if how == "ln":
                out[f"{theirs}.weight"], out[f"{theirs}.bias"] = gain(ours), bias(ours, D)
                continue
            w = state[f"{ours}.weight"]
            b = bias(ours, w.shape[0])
            if how == "qkv":
                w, b = _qkv_to_hf(w, H), _qkv_to_hf(b, H)
            out[f"{theirs}.weight"], out[f"{theirs}.bias"] = w.t(), b  # Conv1D stores (in, out)
    out["transformer.ln_f.weight"], out["transformer.ln_f.bias"] = gain("ln_f"), bias("ln_f", D)
    if not cfg.tie_embeddings:  # tied: transformers ties lm_head to wte itself and saves wte only
        out["lm_head.weight"] = state["lm_head.weight"][:V]
    config = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": V, "n_positions": cfg.max_position_embeddings, "n_embd": D, "n_layer": cfg.n_layers,
        "n_head": H, "n_inner": cfg.d_ff,
        "activation_function": "gelu_new",  # the tanh GELU, as model.gelu_tanh
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "use_cache": True,
        **_config_tokens(tok),
    }
    return config, out


def _gpt2_check_config(config: dict, where: Path) -> None:
    problems = []
    act = config.get("activation_function", "gelu_new")
    if act not in GPT2_TANH_GELUS:
        problems.append(f"activation_function={act!r} (gptrain computes the tanh GELU: {', '.join(GPT2_TANH_GELUS)})")
    eps = config.get("layer_norm_epsilon", LAYER_NORM_EPS)
    if eps != LAYER_NORM_EPS:
        problems.append(f"layer_norm_epsilon={eps} (gptrain's LayerNorm uses {LAYER_NORM_EPS})")
    # reorder_and_upcast_attn only changes the precision attention is computed in: the same function.
    for flag, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                       ("add_cross_attention", False)):
        if bool(config.get(flag, want)) != want:
            problems.append(f"{flag}={config.get(flag)!r} (gptrain computes {flag}={want})")
    d, h = config.get("n_embd", 768), config.get("n_head", 12)
    if d % h:
        problems.append(f"n_embd={d} is not divisible by n_head={h}")
    _refuse(problems, where, "GPT-2", "transformers' default GPT-2 attention and the tanh GELU")


def _refuse(problems: list[str], where: Path, what: str, supported: str) -> None:
    if problems:
        raise UserError(f"{where} is a {what} model gptrain cannot compute exactly: {'; '.join(problems)}. "
                        f"gptrain imports {what} models with {supported}.")


def _gpt2_from_hf(config: dict, tensors: dict[str, torch.Tensor], where: Path) -> tuple[ModelConfig, dict]:
    _gpt2_check_config(config, where)
    d_model = int(config.get("n_embd", 768))
    cfg = ModelConfig(**{**_family_options("gpt2"),
                         "vocab_size": int(config.get("vocab_size", 50257)),
                         "max_position_embeddings": int(config.get("n_positions", 1024)),
                         "n_layers": int(config.get("n_layer", 12)), "n_heads": int(config.get("n_head", 12)),
                         "d_model": d_model, "d_ff": int(config.get("n_inner") or 4 * d_model),
                         "bias": True, "value_embeds": False,
                         "tie_embeddings": bool(config.get("tie_word_embeddings", True))})
    # Weights saved by transformers' GPT2LMHeadModel are named transformer.*; by GPT2Model (and the original
    # gpt2 upload) without the prefix. The causal-mask buffers of old checkpoints are not weights.
    named = {}
    for k, v in tensors.items():
        if re.fullmatch(r"(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)", k):
            continue
        named[k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}"] = v
    if cfg.tie_embeddings:
        named.pop("lm_head.weight", None)  # transformers ties it to wte whatever the file holds
    expected = {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight",
                "transformer.ln_f.bias"} | ({"lm_head.weight"} if not cfg.tie_embeddings else set())
    for i in range(cfg.n_layers):
        expected |= {f"{theirs}.{p}" for _, theirs, _ in _gpt2_layer_names(i) for p in ("weight", "bias")}
    _check_names(named, expected, where, f"GPT-2, {cfg.n_layers} layers")
    P, H = cfg.padded_vocab_size, cfg.n_heads
    state = {"tok_emb.weight": _padded_rows(named["transformer.wte.weight"], P),
             "pos_emb.weight": named["transformer.wpe.weight"]}
    for i in range(cfg.n_layers):
        for ours, theirs, how in _gpt2_layer_names(i):
            w, b = named[f"{theirs}.weight"], named[f"{theirs}.bias"]
            if how != "ln":
                w = w.t()
            if how == "qkv":
                w, b = _qkv_from_hf(w, H), _qkv_from_hf(b, H)
            state[f"{ours}.weight"], state[f"{ours}.bias"] = w.contiguous(), b
    state["ln_f.weight"], state["ln_f.bias"] = named["transformer.ln_f.weight"], named["transformer.ln_f.bias"]
    state["lm_head.weight"] = (state["tok_emb.weight"] if cfg.tie_embeddings
                               else _padded_rows(named["lm_head.weight"], P))
    _check_shapes(cfg, state, where)
    return cfg, state


GPT2 = Family(
    name="gpt2", architecture="GPT2LMHeadModel", model_type="gpt2", reads=("GPT2LMHeadModel", "GPT2Model"),
    requires={"pos_embedding": "learned", "norm": "layernorm", "embed_norm": False, "qk_norm": False,
              "mlp_activation": "gelu", "logit_softcap": 0.0, "value_embeds": False},
    free=frozenset({"bias", "tie_embeddings", "norm_weight", "rope_base"}),
    to_hf=_gpt2_to_hf, from_hf=_gpt2_from_hf)


# --------------------------------------------------------------------------- modern → NanoChatForCausalLM
# transformers' NanoChat is gptrain's current-recipe family: rotary positions, parameter-free RMSNorm after
# the embedding and before each block, per-head QK RMSNorm, relu², no biases, soft-capped logits. Two
# differences of form, none of function:
# - its rotation turns the other way (rotate_half gives (x2, -x1)): negating the second half of every
#   q and k head's rows makes its rotation of the new q, k equal gptrain's up to that sign, which q·k
#   does not see;
# - it normalises q and k after the rotation, gptrain before: a rotation keeps each head's RMS.
# gptrain's RMSNorm and QK-norm use eps=None (torch: the input dtype's machine epsilon).
RMS_NORM_EPS = float(torch.finfo(torch.float32).eps)
NANOCHAT_MAX_IMPORT_EPS = 1e-5  # a NanoChat eps up to this changes its RMS norms by < 5e-6 relative


def _rotary_sign(head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    sign = torch.ones(head_dim, dtype=dtype)
    sign[head_dim // 2:] = -1
    return sign


def _nanochat_to_hf(cfg: ModelConfig, state: dict[str, torch.Tensor], tok: Tokenizer) -> tuple[dict, dict]:
    V, H, D, hd = cfg.vocab_size, cfg.n_heads, cfg.d_model, cfg.head_dim
    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": state["tok_emb.weight"][:V]}
    for i in range(cfg.n_layers):
        g, h = f"blocks.{i}.", f"model.layers.{i}."
        qkv = state[g + "attn.qkv.weight"].reshape(H, 3, hd, D)
        sign = _rotary_sign(hd, qkv.dtype)[None, :, None]
        out[h + "self_attn.q_proj.weight"] = (qkv[:, 0] * sign).reshape(H * hd, D)
        out[h + "self_attn.k_proj.weight"] = (qkv[:, 1] * sign).reshape(H * hd, D)
        out[h + "self_attn.v_proj.weight"] = qkv[:, 2].reshape(H * hd, D)
        out[h + "self_attn.o_proj.weight"] = state[g + "attn.out_proj.weight"]
        out[h + "mlp.fc1.weight"] = state[g + "mlp.fc_in.weight"]
        out[h + "mlp.fc2.weight"] = state[g + "mlp.fc_out.weight"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"][:V]
    config = {
        "architectures": ["NanoChatForCausalLM"], "model_type": "nanochat",
        "vocab_size": V, "hidden_size": D, "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": H, "num_key_value_heads": H, "max_position_embeddings": cfg.max_position_embeddings,
        "hidden_act": "relu2", "attention_dropout": cfg.dropout, "rms_norm_eps": RMS_NORM_EPS,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(cfg.rope_base)},
        "final_logit_softcapping": float(cfg.logit_softcap) if cfg.logit_softcap else None,
        "attention_bias": False, "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": 0.02,
        "use_cache": True,
        # no pad id: NanoChat's embedding would hold that row's gradient at zero in fine-tuning
        **_config_tokens(tok), "pad_token_id": None,
    }
    return config, out


def _nanochat_from_hf(config: dict, tensors: dict[str, torch.Tensor], where: Path) -> tuple[ModelConfig, dict]:
    D, H = int(config.get("hidden_size", 768)), int(config.get("num_attention_heads", 6))
    problems = []
    rope = config.get("rope_parameters") or {"rope_type": "default", "rope_theta": config.get("rope_theta", 10000.0)}
    checks = [("hidden_act", config.get("hidden_act", "relu2"), "relu2"),
              ("num_key_value_heads", config.get("num_key_value_heads") or H, H),
              ("attention_bias", bool(config.get("attention_bias", False)), False),
              ("rope_type", rope.get("rope_type", "default"), "default"),
              ("head_dim", config.get("head_dim") or D // H, D // H)]
    problems += [f"{name}={got!r} (gptrain computes {want!r})" for name, got, want in checks if got != want]
    if D % H or (D // H) % 2:
        problems.append(f"hidden_size={D} with {H} heads (rotary needs an even head size)")
    if float(config.get("rms_norm_eps", 1e-6)) > NANOCHAT_MAX_IMPORT_EPS:
        problems.append(f"rms_norm_eps={config.get('rms_norm_eps')} (gptrain's RMSNorm uses {RMS_NORM_EPS:.3g})")
    _refuse(problems, where, "NanoChat", "multi-head (not grouped) attention, relu² and default rotary positions")
    cap = config.get("final_logit_softcapping")
    cfg = ModelConfig(**{**_family_options("modern"),
                         "vocab_size": int(config.get("vocab_size", 50304)),
                         "max_position_embeddings": int(config.get("max_position_embeddings", 2048)),
                         "n_layers": int(config.get("num_hidden_layers", 12)), "n_heads": H, "d_model": D,
                         "d_ff": int(config.get("intermediate_size", 4 * D)),
                         "pos_embedding": "rotary", "norm": "rmsnorm", "norm_weight": False, "embed_norm": True,
                         "qk_norm": True, "mlp_activation": "relu2", "bias": False, "value_embeds": False,
                         "rope_base": float(rope.get("rope_theta", 10000.0)), "logit_softcap": float(cap or 0.0),
                         "tie_embeddings": bool(config.get("tie_word_embeddings", False))})
    named = dict(tensors)
    if cfg.tie_embeddings:
        named.pop("lm_head.weight", None)
    expected = {"model.embed_tokens.weight"} | ({"lm_head.weight"} if not cfg.tie_embeddings else set())
    for i in range(cfg.n_layers):
        expected |= {f"model.layers.{i}.{n}.weight" for n in ("self_attn.q_proj", "self_attn.k_proj",
                     "self_attn.v_proj", "self_attn.o_proj", "mlp.fc1", "mlp.fc2")}
    _check_names(named, expected, where, f"NanoChat, {cfg.n_layers} layers")
    P, hd = cfg.padded_vocab_size, cfg.head_dim
    state = {"tok_emb.weight": _padded_rows(named["model.embed_tokens.weight"], P)}
    for i in range(cfg.n_layers):
        g, h = f"blocks.{i}.", f"model.layers.{i}."
        q, k, v = (named[f"{h}self_attn.{p}_proj.weight"].reshape(H, hd, D) for p in "qkv")
        sign = _rotary_sign(hd, q.dtype)[None, :, None]
        state[g + "attn.qkv.weight"] = torch.stack([q * sign, k * sign, v], dim=1).reshape(3 * D, D)
        state[g + "attn.out_proj.weight"] = named[h + "self_attn.o_proj.weight"]
        state[g + "mlp.fc_in.weight"] = named[h + "mlp.fc1.weight"]
        state[g + "mlp.fc_out.weight"] = named[h + "mlp.fc2.weight"]
    state["lm_head.weight"] = (state["tok_emb.weight"] if cfg.tie_embeddings
                               else _padded_rows(named["lm_head.weight"], P))
    _check_shapes(cfg, state, where)
    return cfg, state


NANOCHAT = Family(
    name="modern", architecture="NanoChatForCausalLM", model_type="nanochat", reads=("NanoChatForCausalLM",),
    requires={"pos_embedding": "rotary", "norm": "rmsnorm", "norm_weight": False, "embed_norm": True,
              "qk_norm": True, "mlp_activation": "relu2", "bias": False, "value_embeds": False},
    free=frozenset({"tie_embeddings", "logit_softcap", "rope_base"}),
    to_hf=_nanochat_to_hf, from_hf=_nanochat_from_hf)


# --------------------------------------------------------------------------- any option mix → GptrainForCausalLM
# gptrain's own architecture as transformers remote code (gptrain.hf_remote). Its weights are gptrain's state
# dict under "model." (the head stays "lm_head"): nothing is transposed or permuted. Only the vocabulary is cut
# back to the tokenizer's, as in the other families: the token embedding, an untied head and the value
# embeddings lose their padding rows (never fed in, never predicted).
REMOTE_CODE_VERSION = 1  # = configuration_gptrain.REMOTE_CODE_VERSION: the options this gptrain reads
GPTRAIN_OPTIONS = {"pos_embedding": str, "rope_base": float, "norm": str, "norm_weight": bool, "embed_norm": bool,
                   "qk_norm": bool, "mlp_activation": str, "logit_softcap": float, "bias": bool, "dropout": float}
GPTRAIN_CHOICES = {"pos_embedding": POS_EMBEDDINGS, "norm": NORMS, "mlp_activation": MLP_ACTIVATIONS}


def _has_vocab_rows(name: str) -> bool:
    """A tensor with one row per token id."""
    return name in ("tok_emb.weight", "lm_head.weight") or name.startswith("value_embeds.")


def _gptrain_hf_names(cfg: ModelConfig) -> dict[str, str]:
    """gptrain's state-dict names → the remote model's, for the tensors the folder holds (not a tied head)."""
    return {k: k if k == "lm_head.weight" else f"model.{k}" for k in _gpt_state_shapes(cfg)
            if not (cfg.tie_embeddings and k == "lm_head.weight")}


def _gptrain_to_hf(cfg: ModelConfig, state: dict[str, torch.Tensor], tok: Tokenizer) -> tuple[dict, dict]:
    V = cfg.vocab_size
    out = {theirs: state[ours][:V] if _has_vocab_rows(ours) else state[ours]
           for ours, theirs in _gptrain_hf_names(cfg).items()}
    config = {
        "architectures": ["GptrainForCausalLM"], "model_type": "gptrain",
        "auto_map": {"AutoConfig": "configuration_gptrain.GptrainConfig",
                     "AutoModelForCausalLM": "modeling_gptrain.GptrainForCausalLM"},
        "remote_code_version": REMOTE_CODE_VERSION, "family": cfg.family,
        "vocab_size": V, "max_position_embeddings": cfg.max_position_embeddings, "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "intermediate_size": cfg.d_ff,
        **{k: kind(getattr(cfg, k)) for k, kind in GPTRAIN_OPTIONS.items()},
        "value_embed_layers": value_embed_layers(cfg),
        "tie_word_embeddings": cfg.tie_embeddings,
        **_config_tokens(tok),
    }
    return config, out


def _gptrain_from_hf(config: dict, tensors: dict[str, torch.Tensor], where: Path) -> tuple[ModelConfig, dict]:
    defaults = ModelConfig()  # the gpt2 family's options: GptrainConfig's defaults
    problems = []
    version = config.get("remote_code_version", 1)
    if not isinstance(version, int) or version > REMOTE_CODE_VERSION:
        problems.append(f"remote_code_version={version!r} (this gptrain reads up to {REMOTE_CODE_VERSION}: "
                        "update gptrain)")
    options = {k: config.get(k, getattr(defaults, k)) for k in GPTRAIN_OPTIONS}
    problems += [f"{k}={options[k]!r} (one of {', '.join(allowed)})" for k, allowed in GPTRAIN_CHOICES.items()
                 if options[k] not in allowed]
    D, H = int(config.get("hidden_size", 768)), int(config.get("num_attention_heads", 12))
    if D % H or (options["pos_embedding"] == "rotary" and (D // H) % 2):
        problems.append(f"hidden_size={D} with {H} heads (a whole head size, even with rotary positions)")
    _refuse(problems, where, "GptrainForCausalLM", "the options of gptrain's own ModelConfig")
    layers = [int(i) for i in config.get("value_embed_layers") or []]
    family = config.get("family")
    cfg = ModelConfig(**{**_family_options(family if family in MODEL_FAMILIES else defaults.family),
                         "vocab_size": int(config.get("vocab_size", 50304)),
                         "max_position_embeddings": int(config.get("max_position_embeddings", 1024)),
                         "n_layers": int(config.get("num_hidden_layers", 12)), "n_heads": H, "d_model": D,
                         "d_ff": int(config.get("intermediate_size") or 4 * D),
                         **{k: kind(options[k]) for k, kind in GPTRAIN_OPTIONS.items()},
                         "value_embeds": bool(layers), "tie_embeddings": bool(config.get("tie_word_embeddings", True))})
    if layers and layers != value_embed_layers(cfg):
        _refuse([f"value_embed_layers={layers} (gptrain gives value embeddings to layers {value_embed_layers(cfg)})"],
                where, "GptrainForCausalLM", "value embeddings in every other layer, the last included")
    names = _gptrain_hf_names(cfg)
    named = dict(tensors)
    if cfg.tie_embeddings:
        named.pop("lm_head.weight", None)  # transformers ties it to the token embedding whatever the file holds
    _check_names(named, set(names.values()), where, f"gptrain, {cfg.n_layers} layers")
    P = cfg.padded_vocab_size
    state = {ours: _padded_rows(named[theirs], P) if _has_vocab_rows(ours) else named[theirs]
             for ours, theirs in names.items()}
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["tok_emb.weight"]
    _check_shapes(cfg, state, where)
    return cfg, state


GPTRAIN_FREE = frozenset({*GPTRAIN_OPTIONS, "value_embeds", "tie_embeddings"})
GPTRAIN = Family(
    name="gptrain", architecture="GptrainForCausalLM", model_type="gptrain", reads=("GptrainForCausalLM",),
    requires={}, free=GPTRAIN_FREE, to_hf=_gptrain_to_hf, from_hf=_gptrain_from_hf,
    holds=SHAPE | GPTRAIN_FREE, code_files=CODE_FILES)

# Tried in this order: the standard classes whenever they compute the model (no remote code to trust).
FAMILIES: tuple[Family, ...] = (GPT2, NANOCHAT, GPTRAIN)


def family_for(cfg: ModelConfig) -> Family:
    """The first family whose mapping computes exactly what `cfg` does, or a UserError naming what none can."""
    for fam in FAMILIES:
        if not fam.refusals(cfg):
            return fam
    raise UserError(
        "this model cannot be exported to a Hugging Face folder: gptrain's export does not know the setting(s) "
        f"{', '.join(GPTRAIN.refusals(cfg))}. Every other model setting exports (as {GPT2.architecture}, "
        f"{NANOCHAT.architecture} or {GPTRAIN.architecture}); set these to their defaults to export.")


# ================================================================================ tokenizers


def _byte_symbols() -> list[str]:
    """The printable character byte-level BPE vocabularies write each byte as (GPT-2's table).

    Bytes that are printable Latin-1 stand for themselves; the 68 others, in byte order, take the
    characters from U+0100 on.
    """
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    symbols, extra = [], 0
    for b in range(256):
        if b in printable:
            symbols.append(chr(b))
        else:
            symbols.append(chr(0x100 + extra))
            extra += 1
    return symbols


def _backend_json(tok: Tokenizer) -> str:
    """A `tokenizers` tokenizer.json that gives the ids of `tok`."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTok

    if isinstance(tok, HFTokenizer):
        if not _adds_special_tokens(tok):
            return tok.to_json()
        # gptrain never adds special tokens (BOS …) when it encodes, AutoTokenizer would: without the post-processor
        # both give the same ids. gptrain.json keeps the original (see _record_tokenizer_json).
        data = json.loads(tok.to_json())
        data["post_processor"] = None
        return json.dumps(data, ensure_ascii=False)
    if isinstance(tok, ByteTokenizer):
        vocab = {s: i for i, s in enumerate(_byte_symbols())}
        backend = HFTok(models.BPE(vocab=vocab, merges=[]))  # no merges: one token per byte
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        backend.decoder = decoders.ByteLevel()
    elif isinstance(tok, CharTokenizer):
        # Word-level, one character per word: a character outside the set is an error (as in gptrain),
        # never silently dropped.
        backend = HFTok(models.WordLevel(vocab=dict(tok.ids), unk_token=None))
        backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        backend.decoder = decoders.Fuse()
    else:
        raise UserError(f"the tokenizer {tok.spec} cannot be exported to a Hugging Face folder.")
    backend.add_special_tokens([AddedToken(EOT_TEXT, special=True, normalized=False)])
    if backend.token_to_id(EOT_TEXT) != tok.eot_id:
        raise AssertionError(f"end-of-text id {backend.token_to_id(EOT_TEXT)} != {tok.eot_id}")
    return backend.to_str()


def _adds_special_tokens(tok: HFTokenizer) -> bool:
    probe = "a b"
    return tok.hf.encode(probe, add_special_tokens=True).ids != tok.hf.encode(probe, add_special_tokens=False).ids


def _eot_text(tok: Tokenizer) -> str:
    if isinstance(tok, HFTokenizer):
        return tok.hf.id_to_token(tok.eot_id)
    return EOT_TEXT


def tokenizer_files(tok: Tokenizer, context: int) -> dict[str, str]:
    """tokenizer.json and tokenizer_config.json for `tok`: AutoTokenizer then encodes as gptrain does."""
    eot = _eot_text(tok)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": eot,
        "eos_token": eot,
        "model_max_length": context,
        # decode must give back the text, not tidy its spaces
        "clean_up_tokenization_spaces": False,
        # gptrain's byte and character tokenizers read the text "<|endoftext|>" as its characters; only the
        # data pipeline inserts the end-of-text id. bpe:N and hf:… tokenizers match their special tokens.
        "split_special_tokens": not isinstance(tok, HFTokenizer),
    }
    return {"tokenizer.json": _backend_json(tok), "tokenizer_config.json": json.dumps(config, indent=2) + "\n"}


# ================================================================================ writing


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype.lower() not in DTYPES:
        raise UserError(f"unknown export dtype {dtype!r}. Use fp32, bf16 or fp16.")
    return DTYPES[dtype.lower()]


def parse_size(size: int | str) -> int:
    """Bytes from 5000000, "5GB" (decimal units) or "4GiB" (binary units)."""
    if isinstance(size, int):
        n = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", size, flags=re.IGNORECASE)
        if not m:
            raise UserError(f"bad shard size {size!r}. Use bytes or a size such as 500MB or 2GiB.")
        unit = (m.group(2) or "B").upper()
        scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
                 "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
        n = int(float(m.group(1)) * scale)
    if n < 1:
        raise UserError(f"the shard size must be positive, got {size!r}.")
    return n


def _is_export(folder: Path) -> bool:
    try:
        return json.loads((folder / RECORD).read_text()).get("format") == EXPORT_FORMAT
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} exists and is not a folder. Choose another --out.")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not _is_export(out_dir):
        raise UserError(f"{out_dir} is not empty and is not an earlier gptrain export: nothing was written. "
                        "Choose an empty or new folder for --out.")



def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Consecutive groups of tensors of at most `max_bytes` each (a larger tensor alone in its own)."""
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if groups[-1] and size + n > max_bytes:
            groups.append({})
            size = 0
        groups[-1][name] = t
        size += n
    return groups


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise UserError(f"Hugging Face export and import need safetensors and transformers: {HF_EXTRA}") from None
    return safetensors.torch


def _write_weights(folder: Path, tensors: dict[str, torch.Tensor], max_bytes: int) -> None:
    save_file = _safetensors().save_file

    groups = _shards(tensors, max_bytes)
    if len(groups) == 1:
        save_file(groups[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        fsync_path(folder / "model.safetensors")
        return
    weight_map = {}
    for n, group in enumerate(groups, start=1):
        name = f"model-{n:05d}-of-{len(groups):05d}.safetensors"
        save_file(group, str(folder / name), metadata={"format": "pt"})
        fsync_path(folder / name)
        weight_map.update(dict.fromkeys(group, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    _write_text(folder / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")


def _cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise UserError(f"the weight {name} holds NaN or inf: this checkpoint is damaged. Export an earlier one.")
        if dtype == torch.float16 and t.is_floating_point() and float(t.abs().max()) > FP16_MAX:
            raise UserError(f"the weight {name} has values beyond fp16's range (±{FP16_MAX:g}): an fp16 export "
                            "would hold inf. Export with --dtype bf16 or fp32.")
        # contiguous: transposed (Conv1D) and reordered (qkv) views are written in their own layout; a view
        # of a larger tensor (the vocabulary cut from the padded rows) becomes a tensor of its own.
        t = t.detach().to("cpu", dtype if t.is_floating_point() else t.dtype).contiguous()
        out[name] = t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()
    return out


def save_hf(model_cfg: ModelConfig, state: dict[str, torch.Tensor], tokenizer: Tokenizer, out_dir: str | Path,
            *, dtype: str | torch.dtype | None = None, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
            source: dict[str, Any] | None = None) -> Path:
    """Write a gptrain model (its ModelConfig, full state dict and tokenizer) as a transformers folder.

    `dtype`: fp32, bf16 or fp16 (None: the weights' own dtype). `source`: what to record about where the
    weights come from (checkpoint, step …) in gptrain.json. Atomic: written into a temporary folder beside
    `out_dir`, then renamed into place; an earlier export in `out_dir` is replaced, anything else refused.
    """
    out_dir = Path(out_dir).expanduser().absolute()
    _check_out_dir(out_dir)
    family = family_for(model_cfg)
    want = parse_dtype(dtype)
    max_bytes = parse_size(max_shard_size)
    if tokenizer.eot_id >= model_cfg.vocab_size:
        raise UserError(f"the tokenizer's end-of-text id {tokenizer.eot_id} is outside the model's vocabulary "
                        f"({model_cfg.vocab_size}): the model and tokenizer do not belong together.")
    config, tensors = family.to_hf(model_cfg, state, tokenizer)
    if want is None:
        want = next(t.dtype for t in tensors.values() if t.is_floating_point())
    if want not in DTYPE_NAMES:
        raise UserError(f"the weights are {want}; export them with --dtype fp32, bf16 or fp16.")
    tensors = _cast(tensors, want)
    config["torch_dtype"] = config["dtype"] = DTYPE_NAMES[want]  # torch_dtype: transformers 4, dtype: 5
    files = tokenizer_files(tokenizer, model_cfg.max_position_embeddings)
    generation = {"bos_token_id": tokenizer.eot_id, "eos_token_id": tokenizer.eot_id,
                  "pad_token_id": tokenizer.eot_id}
    record = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "family": family.name,
              "model": dataclasses.asdict(model_cfg), "dtype": DTYPE_NAMES[want],
              "tokenizer": {**tokenizer_meta(tokenizer), "json": _record_tokenizer_json(tokenizer)},
              "source": source or {}}

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        _write_weights(tmp, tensors, max_bytes)
        _write_text(tmp / "config.json", json.dumps(config, indent=2) + "\n")
        _write_text(tmp / "generation_config.json", json.dumps(generation, indent=2) + "\n")
        for name, text in files.items():
            _write_text(tmp / name, text)
        for name in family.code_files:  # the remote code config.json's auto_map names
            _write_text(tmp / name, _remote_code(name))
        _write_text(tmp / RECORD, json.dumps(record, indent=2, ensure_ascii=False) + "\n")  # last: marks an export
        fsync_path(tmp)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _remote_code(name: str) -> str:
    """The text of one of gptrain.hf_remote's files (read as package data: also from a zipped install)."""
    from importlib.resources import files

    return (files("gptrain.hf_remote") / name).read_text(encoding="utf-8")


def _record_tokenizer_json(tok: Tokenizer) -> str | None:
    """What gptrain.json must keep to rebuild the gptrain tokenizer exactly, where tokenizer.json is not that."""
    if isinstance(tok, CharTokenizer) or (isinstance(tok, HFTokenizer) and _adds_special_tokens(tok)):
        return tok.to_json()
    return None


def _remove_leftovers(out_dir: Path) -> None:
    """Clear the temporary folders of exports to `out_dir` whose process is gone (killed mid-way), or ours.

    An export killed between its two renames left no `out_dir` and the earlier export set aside (.old-PID):
    that one is put back, not deleted.
    """
    for kind in ("old", "tmp"):
        for p in sorted(out_dir.parent.glob(f".{out_dir.name}.{kind}-*")):
            try:
                pid = int(p.name.rsplit("-", 1)[1])
            except ValueError:
                continue
            if pid != os.getpid() and process_alive(pid):
                continue
            if kind == "old" and not out_dir.exists():
                os.replace(p, out_dir)
            else:
                shutil.rmtree(p, ignore_errors=True)


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    old = None
    if out_dir.exists():
        if any(out_dir.iterdir()):
            _check_out_dir(out_dir)  # still an earlier export (nothing changed it meanwhile)
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            if old.exists():
                shutil.rmtree(old)
            os.replace(out_dir, old)
        else:
            out_dir.rmdir()
    os.replace(tmp, out_dir)
    fsync_path(out_dir.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_checkpoint_model(path: str | Path) -> tuple[ModelConfig, Any, Tokenizer]:
    """(ModelConfig, Checkpoint, tokenizer) of a run folder (its newest checkpoint) or a checkpoint.

    The weights are read by `Checkpoint.load_model_state`: sharded checkpoints without a consolidated
    model.pt through torch.distributed.checkpoint, in this one process.
    """
    from gptrain.checkpoint import resolve_checkpoint
    from gptrain.config import Config

    ckpt = resolve_checkpoint(path)
    model_cfg = Config.from_dict(ckpt.info["config"]).model
    tok_file = ckpt.path / "tokenizer.json"
    tokenizer = tokenizer_from_json(ckpt.info["tokenizer"]["spec"],
                                    tok_file.read_text(encoding="utf-8") if tok_file.is_file() else None)
    return model_cfg, ckpt, tokenizer


def export_hf(path: str | Path, out_dir: str | Path, dtype: str | None = None,
              max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """`gptrain export`: a run folder (its newest checkpoint) or a checkpoint as a transformers folder.

    Works on every kind of checkpoint: single-process (model.pt), sharded FSDP2/TP (dcp/, mid-run or
    final). `dtype` None keeps the training weights' dtype. Returns the folder written.
    """
    out = Path(out_dir).expanduser().absolute()
    _check_out_dir(out)  # before reading gigabytes
    model_cfg, ckpt, tokenizer = read_checkpoint_model(path)
    family_for(model_cfg)
    parse_dtype(dtype)
    state = ckpt.load_model_state("cpu")
    source = {"checkpoint": str(ckpt.path.absolute()), "step": ckpt.step}
    for key in ("tokens_seen", "val_loss", "run_id", "dataset_dir"):
        if key in ckpt.info:
            source[key] = ckpt.info[key]
    return save_hf(model_cfg, state, tokenizer, out, dtype=dtype, max_shard_size=max_shard_size, source=source)


# ================================================================================ reading


def is_hf_folder(path: str | Path) -> bool:
    """A folder with a transformers config.json (a "model_type" in it)."""
    p = Path(path)
    try:
        return p.is_dir() and "model_type" in json.loads((p / "config.json").read_text())
    except (OSError, json.JSONDecodeError, TypeError):
        return False


def runs_own_remote_code(hf_dir: str | Path) -> bool | None:
    """Whether transformers runs code from the folder (its config.json has an `auto_map`) that is exactly this
    gptrain's (gptrain.hf_remote, byte for byte): True, it may be loaded with trust_remote_code=True as safely
    as gptrain itself runs; False, other code (an older gptrain's, edited, or not gptrain's); None, no code."""
    hf_dir = Path(hf_dir)
    try:
        auto_map = json.loads((hf_dir / "config.json").read_text()).get("auto_map")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    if not auto_map:
        return None
    modules = {f"{str(ref).split('.')[0]}.py" for ref in auto_map.values()}
    try:
        return modules <= set(CODE_FILES) and all(
            (hf_dir / name).read_text(encoding="utf-8") == _remote_code(name) for name in CODE_FILES)
    except (OSError, UnicodeDecodeError):
        return False


def _read_config(hf_dir: Path) -> dict:
    if not hf_dir.is_dir():
        raise UserError(f"{hf_dir} is not a folder. --init-from takes a Hugging Face model folder "
                        "(config.json and model.safetensors), e.g. one saved by save_pretrained or gptrain export.")
    file = hf_dir / "config.json"
    try:
        config = json.loads(file.read_text())
    except FileNotFoundError:
        raise UserError(f"{hf_dir} is not a Hugging Face transformers model: it has no config.json. Pass the "
                        "folder save_pretrained or gptrain export wrote (config.json beside model.safetensors).") from None
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{file} is not readable JSON ({e}). Re-save the model with save_pretrained.") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise UserError(f"{file} is not a transformers model config (no model_type). Pass the folder "
                        "save_pretrained or gptrain export wrote.")
    return config


def _family_of_config(config: dict, hf_dir: Path) -> Family:
    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    for fam in FAMILIES:
        if model_type == fam.model_type and (not archs or any(a in fam.reads for a in archs)):
            return fam
    supported = ", ".join(f"{'/'.join(f.reads)} (model_type {f.model_type!r})" for f in FAMILIES)
    named = "/".join(archs) or "?"
    raise UserError(f"{hf_dir} holds a {named} model (model_type {model_type!r}), which gptrain cannot import. "
                    f"Supported: {supported}.")


def _read_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    load_file = _safetensors().load_file

    single, index = hf_dir / "model.safetensors", hf_dir / "model.safetensors.index.json"
    bin_single, bin_index = hf_dir / "pytorch_model.bin", hf_dir / "pytorch_model.bin.index.json"
    try:
        if single.is_file():
            return load_file(str(single))
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return {k: v for f in files for k, v in load_file(str(hf_dir / f)).items()}
        if bin_single.is_file():
            return torch.load(bin_single, map_location="cpu", weights_only=True)
        if bin_index.is_file():
            files = sorted(set(json.loads(bin_index.read_text())["weight_map"].values()))
            return {k: v for f in files for k, v in
                    torch.load(hf_dir / f, map_location="cpu", weights_only=True).items()}
    except UserError:
        raise
    except Exception as e:  # truncated or corrupt files, a missing shard
        raise UserError(f"the weights in {hf_dir} cannot be read ({type(e).__name__}: {str(e)[:200]}). "
                        "Download or save the model again.") from None
    raise UserError(f"{hf_dir} has a config.json but no weights (model.safetensors, its index, or "
                    "pytorch_model.bin). Download or save the model again.")


def _read_tokenizer(hf_dir: Path, config: dict, record: dict | None) -> Tokenizer:
    tok_file = hf_dir / "tokenizer.json"
    if record is not None:  # our own export: the exact gptrain tokenizer, checked by its fingerprint
        meta = record.get("tokenizer") or {}
        try:
            text = meta.get("json") or (tok_file.read_text(encoding="utf-8") if tok_file.is_file() else None)
            tok = tokenizer_from_json(meta["spec"], text)
            if isinstance(tok, HFTokenizer):
                tok.eot_id = int(meta.get("eot_id", tok.eot_id))
            if tok.fingerprint() == meta.get("fingerprint"):
                return tok
        except (UserError, KeyError, TypeError, ValueError):
            pass  # edited since the export: read it as any Hugging Face folder
    spec = f"hf:{hf_dir}"
    from tokenizers import Tokenizer as HFTok

    if tok_file.is_file():
        try:
            backend = HFTok.from_file(str(tok_file))
        except Exception as e:
            raise UserError(f"{tok_file} is not a valid tokenizer.json ({e}).") from None
    else:  # only the slow tokenizer's files (vocab.json + merges.txt …): transformers converts them
        try:
            from transformers import AutoTokenizer

            backend = AutoTokenizer.from_pretrained(str(hf_dir)).backend_tokenizer
        except Exception as e:  # noqa: BLE001 - no transformers, or files it cannot read
            raise UserError(f"{hf_dir} has no tokenizer.json and its tokenizer cannot be converted ({e}). "
                            "Save the tokenizer with AutoTokenizer.save_pretrained into the folder.") from None
    eos = config.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return HFTokenizer(spec, backend, eot_id=eos if isinstance(eos, int) and eos >= 0 else None)


def _read_record(hf_dir: Path) -> dict | None:
    record = hf_dir / RECORD
    if not record.is_file():
        return None
    try:
        data = json.loads(record.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and data.get("format") == EXPORT_FORMAT else None


def load_hf_model(hf_dir: str | Path, pad_vocab_multiple: int | None = None
                  ) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    """A transformers folder of a family gptrain computes, as (ModelConfig, state dict in gptrain's layout,
    Tokenizer): what `gptrain train --init-from HF_DIR` starts from.

    Weights come back in float32 (training weights), the padded vocabulary rows as zeros. `pad_vocab_multiple`
    None: a gptrain export's own, else ModelConfig's default. A folder gptrain exported also gets back its
    exact tokenizer and the settings a transformers folder cannot hold (no biases or norm gains, dropout,
    initialisation), as long as its weights still agree with them.
    """
    hf_dir = Path(hf_dir).expanduser()
    config = _read_config(hf_dir)
    family = _family_of_config(config, hf_dir)
    tensors = _read_weights(hf_dir)
    model_cfg, state = family.from_hf(config, tensors, hf_dir)
    record = _read_record(hf_dir)
    multiple = pad_vocab_multiple
    if record is not None and record.get("family") == family.name:
        model_cfg, state, recorded = _restore_settings(model_cfg, state, record.get("model") or {}, family.holds)
        multiple = multiple or recorded
    if multiple and multiple != model_cfg.pad_vocab_multiple:
        model_cfg, state = repad_vocab(model_cfg, state, multiple)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    if model_cfg.tie_embeddings:
        state["lm_head.weight"] = state["tok_emb.weight"]
    tokenizer = _read_tokenizer(hf_dir, config, record)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise UserError(f"the tokenizer in {hf_dir} has {tokenizer.vocab_size} tokens but the model only "
                        f"{model_cfg.vocab_size}: they do not belong together.")
    return model_cfg, state, tokenizer


def _restore_settings(cfg: ModelConfig, state: dict[str, torch.Tensor], saved: dict, holds: frozenset[str]
                      ) -> tuple[ModelConfig, dict[str, torch.Tensor], int | None]:
    """The settings gptrain.json recorded at export that a transformers folder cannot hold (no biases, no
    norm gains, dropout, initialisation), where the weights still agree with them: the weights the recorded
    model lacks must still be zero biases and unit gains. `holds`: the settings config.json holds, which win.
    Also returns the recorded vocabulary padding."""
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    try:
        recorded = ModelConfig(**{k: v for k, v in saved.items() if k in names})
    except (TypeError, ValueError):
        return cfg, state, None
    if any(getattr(recorded, k) != getattr(cfg, k) for k in [*SHAPE, "tie_embeddings"]):
        return cfg, state, None  # config.json was edited since the export: it wins
    candidate = dataclasses.replace(recorded, pad_vocab_multiple=cfg.pad_vocab_multiple,  # the layout of `state`
                                    **{k: getattr(cfg, k) for k in holds})
    keep = _gpt_state_shapes(candidate)
    dropped = {k: v for k, v in state.items() if k not in keep}
    neutral = all(not bool(v.any()) if k.endswith(".bias") else bool((v == 1).all()) for k, v in dropped.items())
    if not keep.keys() <= state.keys() or not neutral:
        return cfg, state, recorded.pad_vocab_multiple
    return candidate, {k: v for k, v in state.items() if k in keep}, recorded.pad_vocab_multiple


def repad_vocab(cfg: ModelConfig, state: dict[str, torch.Tensor], multiple: int
                ) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The same model with its embedding rows padded to another multiple (padding rows are zeros)."""
    new = dataclasses.replace(cfg, pad_vocab_multiple=multiple)
    out = dict(state)
    for key in ("tok_emb.weight", "lm_head.weight"):
        if key in state:
            t = state[key][: cfg.vocab_size]
            out[key] = torch.cat([t, t.new_zeros(new.padded_vocab_size - t.shape[0], t.shape[1])])
    if new.tie_embeddings:
        out["lm_head.weight"] = out["tok_emb.weight"]
    return new, out


# ================================================================================ checks


def _prepare_hint(tok: Tokenizer | None) -> str:
    if isinstance(tok, ByteTokenizer):
        return "gptrain prepare TEXT --tokenizer byte"
    if isinstance(tok, CharTokenizer):
        return "a nanoGPT character dataset of the same characters"
    return "gptrain prepare TEXT --tokenizer hf:HF_DIR, the folder holding its tokenizer.json"


def check_vocab_fits(model_vocab: int, data_vocab: int, *, model_tokenizer: Tokenizer | None = None,
                     data_tokenizer: dict | None = None, model_name: str = "the model",
                     data_name: str = "the dataset") -> None:
    """Refuse a dataset whose token ids a model does not read as its own tokenizer's.

    `model_vocab`: the model's (unpadded) vocabulary; `data_vocab`: the dataset's meta.json vocab_size;
    `data_tokenizer`: the dataset meta's "tokenizer" entry (spec, fingerprint …) where it has one.
    - ids the model cannot embed (the dataset's vocabulary is larger): refused;
    - both tokenizers known by fingerprint: they must be the same tokenizer;
    - otherwise the model's tokenizer must have the dataset's vocabulary size: a vocabulary larger (or
      smaller) than the dataset's means the data were written by another tokenizer.
    """
    fix = f"Fix: prepare the data with the model's tokenizer ({_prepare_hint(model_tokenizer)})."
    if data_vocab > model_vocab:
        raise UserError(f"{data_name} uses {data_vocab} token ids but {model_name} embeds only {model_vocab}. {fix}")
    want = (data_tokenizer or {}).get("fingerprint")
    if model_tokenizer is not None and want:
        if model_tokenizer.fingerprint() != want:
            raise UserError(f"{data_name} was tokenized with {data_tokenizer.get('spec')}, not with the tokenizer of "
                            f"{model_name} ({model_tokenizer.spec}): the same ids would mean other text. {fix}")
        return
    model_tok_vocab = model_tokenizer.vocab_size if model_tokenizer is not None else model_vocab
    if model_tok_vocab != data_vocab:
        larger = "larger" if model_tok_vocab > data_vocab else "smaller"
        raise UserError(f"{model_name} has a vocabulary of {model_tok_vocab} tokens, {larger} than {data_name}'s "
                        f"{data_vocab}: the data were tokenized with another tokenizer. {fix}")
