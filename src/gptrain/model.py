"""The GPT model, two families in one code path: GPT-2 (2019) and a current small-model recipe.

Everything the model is lives in this file, nanoGPT style. Each architectural choice is a ModelConfig
setting of its own, so a researcher can switch one back and measure it:

    setting          gpt2 family       modern family     what it does
    pos_embedding    learned           rotary            positions: a learned table, or q/k rotated by position
    norm             layernorm         rmsnorm           the pre-norms of the blocks and the final norm
    norm_weight      on                off               learnable gain (and bias) of those norms
    embed_norm       off               on                a norm right after the token embedding
    qk_norm          off               on                q and k RMS-normalised per head before attention
    mlp_activation   gelu              relu2             the MLP's non-linearity (relu2 = relu(x)²)
    zero_init_proj   off               on                attention and MLP output projections start at zero
    logit_softcap    0 (off)           15                logits = c·tanh(logits / c)
    bias             on                off               biases in Linear layers and norms
    tie_embeddings   on                off               the LM head shares the token embedding
    init             gpt2              fan_in            N(0, 0.02) everywhere, or 1/√fan_in matrices (see below)
    value_embeds     off               on                every other layer adds a token embedding to its values

Value embeddings (modded-nanogpt, nanochat) are lookup tables: capacity without matrix products, which a
model of the default budget (4 layers × 192, 300 steps of 16 × 256 tokens) gains most from.

`FAMILIES` holds those option values, `PRESETS` the shapes (and each shape's family), and
`model_settings_for(preset, family)` merges them for the configuration code.

Parallelism (DDP, FSDP2, tensor parallel), activation checkpointing and compilation are applied from
outside by `gptrain.distributed`; nothing here knows about them, except layout choices made so that
tensor parallelism can shard the model with plain DTensor plans:

- The fused QKV projection stores its output features head-major, `(n_heads, 3, head_dim)`,
  so sharding its rows across ranks gives each rank whole heads with their own q, k and v.
- Shapes are recovered with `-1` for the head count, so a rank holding a shard sees
  `n_heads / tp` heads without knowing it is sharded; rotary positions and QK-norm act on each
  head alone, so a shard computes exactly what the whole model computes for its heads.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptrain.chunked_loss import chunked_linear_cross_entropy, softcap_logits
from gptrain.errors import UserError
from gptrain.settings import setting

# The option values of each family. The dataclass defaults below are the gpt2 family's, so a ModelConfig
# built without a family (an old checkpoint's config, a test) is today's GPT-2 model bit for bit.
FAMILIES: dict[str, dict] = {
    "gpt2": dict(pos_embedding="learned", norm="layernorm", norm_weight=True, embed_norm=False, qk_norm=False,
                 mlp_activation="gelu", zero_init_proj=False, logit_softcap=0.0, bias=True, tie_embeddings=True,
                 init="gpt2", value_embeds=False),
    "modern": dict(pos_embedding="rotary", norm="rmsnorm", norm_weight=False, embed_norm=True, qk_norm=True,
                   mlp_activation="relu2", zero_init_proj=True, logit_softcap=15.0, bias=False,
                   tie_embeddings=False, init="fan_in", value_embeds=True),
}
DEFAULT_FAMILY = "modern"  # the family of `gptrain train` without --preset/--family
POS_EMBEDDINGS = ("learned", "rotary")
NORMS = ("layernorm", "rmsnorm")
MLP_ACTIVATIONS = ("gelu", "relu2")
INITS = ("gpt2", "fan_in")


@dataclass
class ModelConfig:
    vocab_size: int = setting(8192, "vocabulary size", ge=1, default_text="the dataset's")
    max_position_embeddings: int = setting(256, "context length in tokens", ge=1,
                                           flags=("--max-position-embeddings", "--context-length"),
                                           default_text="the preset's")
    n_layers: int = setting(6, "transformer blocks", ge=1, default_text="the preset's")
    n_heads: int = setting(6, "attention heads", ge=1, default_text="the preset's")
    d_model: int = setting(384, "hidden size", ge=1, default_text="the preset's")
    d_ff: int | None = setting(None, "MLP inner size", ge=1, default_text="4·d_model")
    dropout: float = setting(0.0, "dropout probability", ge=0.0, lt=1.0)
    family: str = setting("gpt2", "model family: the option values below that a preset starts from",
                          choices=tuple(FAMILIES), default_text="the preset's")
    pos_embedding: str = setting("learned", "positions: a learned table, or rotary (q and k rotated by position)",
                                 choices=POS_EMBEDDINGS, default_text="the family's")
    rope_base: float = setting(10000.0, "rotary: base of the rotation frequencies", gt=1)
    norm: str = setting("layernorm", "normalisation of the blocks and the final norm", choices=NORMS,
                        default_text="the family's")
    norm_weight: bool = setting(True, "learnable gain (and, with --bias, offset) in the norms",
                                negate="--no-norm-weight", default_text="the family's")
    embed_norm: bool = setting(False, "normalise the token embedding before the first block",
                               negate="--no-embed-norm", default_text="the family's")
    qk_norm: bool = setting(False, "RMS-normalise queries and keys per head before attention",
                            negate="--no-qk-norm", default_text="the family's")
    mlp_activation: str = setting("gelu", "MLP non-linearity (relu2: relu(x)²)", choices=MLP_ACTIVATIONS,
                                  default_text="the family's")
    zero_init_proj: bool = setting(False, "attention and MLP output projections start at zero",
                                   negate="--no-zero-init-proj", default_text="the family's")
    logit_softcap: float = setting(0.0, "cap logits smoothly at ±this: c·tanh(logits/c)", ge=0,
                                   hint="(0: no cap)", default_text="the family's")
    bias: bool = setting(True, "biases in Linear layers and norms", negate="--no-bias", default_text="the family's")
    tie_embeddings: bool = setting(True, "LM head shares the token embedding", negate="--no-tie-embeddings",
                                   default_text="the family's")
    init: str = setting("gpt2", "initialisation: gpt2 = N(0, 0.02), residual projections /√(2·layers); fan_in = "
                        "matrices with std 1/√fan_in, embedding N(0, 1), untied head N(0, 0.001)",
                        choices=INITS, default_text="the family's")
    value_embeds: bool = setting(False, "value embeddings: every other layer (the last included) adds a token "
                                 "embedding table of its own to its attention values", negate="--no-value-embeds",
                                 default_text="the family's")
    # Embedding rows are padded to a multiple of this for fast matrix products on GPUs.
    # The extra ids can never be predicted (their logits are masked) nor fed in.
    pad_vocab_multiple: int = setting(128, "pad the embedding rows to a multiple of this", ge=1,
                                      hint="(1: no padding)")

    def __post_init__(self) -> None:
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model

    @property
    def padded_vocab_size(self) -> int:
        m = max(1, self.pad_vocab_multiple)
        return ((self.vocab_size + m - 1) // m) * m

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def options(self) -> dict:
        """The architecture options (the keys of a family), as this config sets them."""
        return {k: getattr(self, k) for k in FAMILIES["gpt2"]}


# Shapes, each with its family; vocab (and, unless set, context) come from the data. n_heads keeps
# head_dim = 128 from d12 up (nanochat's rule: d_model = 64·layers); the tiny shapes keep theirs.
PRESETS: dict[str, dict] = {
    "tiny": dict(family="modern", n_layers=4, n_heads=4, d_model=192, max_position_embeddings=256),
    "small-cpu": dict(family="modern", n_layers=6, n_heads=6, d_model=384, max_position_embeddings=256),
    "d12": dict(family="modern", n_layers=12, n_heads=6, d_model=768, max_position_embeddings=1024),
    "d20": dict(family="modern", n_layers=20, n_heads=10, d_model=1280, max_position_embeddings=2048),
    "d24": dict(family="modern", n_layers=24, n_heads=12, d_model=1536, max_position_embeddings=2048),
    # ~1B parameters besides the lookup tables (token and value embeddings)
    "d26": dict(family="modern", n_layers=26, n_heads=13, d_model=1664, max_position_embeddings=2048),
    "gpt2": dict(family="gpt2", n_layers=12, n_heads=12, d_model=768, max_position_embeddings=1024),
    "gpt2-medium": dict(family="gpt2", n_layers=24, n_heads=16, d_model=1024, max_position_embeddings=1024),
    "gpt2-large": dict(family="gpt2", n_layers=36, n_heads=20, d_model=1280, max_position_embeddings=1024),
    "gpt2-xl": dict(family="gpt2", n_layers=48, n_heads=25, d_model=1600, max_position_embeddings=1024),
}


def model_settings_for(preset: str, family: str | None = None) -> dict:
    """The model settings a preset gives: its family's option values, then its shape (later wins).

    `family` None: the preset's own family. Any family goes with any shape (`tiny` in the gpt2 family
    is GPT-2's recipe at the tiny shape). The result includes "family".
    """
    if preset not in PRESETS:
        from gptrain.settings import suggest

        raise UserError(f"unknown preset '{preset}'.{suggest(preset, list(PRESETS))} Presets: {', '.join(PRESETS)}.")
    shape = dict(PRESETS[preset])
    family = family or shape.pop("family")
    shape.pop("family", None)
    if family not in FAMILIES:
        from gptrain.settings import suggest

        raise UserError(f"unknown model family '{family}'.{suggest(family, list(FAMILIES))} Families: "
                        f"{', '.join(FAMILIES)}.")
    return {**FAMILIES[family], **shape, "family": family}


# The scaled_dot_product_attention backends a run may pin (`--attention-backend`), by their names in
# torch.nn.attention.SDPBackend. "auto" lets PyTorch pick, call by call, the first backend in its
# priority order that supports the inputs.
SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                 "math": "MATH"}
ATTENTION_BACKENDS = ("auto", *SDPA_BACKENDS)


def attention_kernels(backend: str) -> contextlib.AbstractContextManager:
    """A context in which scaled_dot_product_attention uses only `backend` ("auto": no restriction)."""
    if backend == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, SDPA_BACKENDS[backend])])


class KVCache:
    """Keys and values of the positions generated so far, one pair per layer.

    Pre-allocated to the full context so that appending a token is a slice write, not a concat.
    Keys are stored after rotary positions were applied (each at its own absolute position).
    """

    def __init__(self, n_layers: int, batch: int, n_heads: int, max_len: int, head_dim: int, *, device, dtype):
        shape = (batch, n_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.length = 0  # positions filled (same for every layer once a forward pass ends)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + k.size(2)
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


# ---------------------------------------------------------------------------------------------- rotary
def rotary_tables(cfg: ModelConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position·frequency, (context, head_dim/2) each, in fp32.

    Frequencies base^(-2i/head_dim) for i < head_dim/2, as in RoFormer and Llama.
    """
    half = cfg.head_dim // 2
    inv_freq = cfg.rope_base ** (-torch.arange(half, dtype=torch.float64, device=device) / half)
    angles = torch.outer(torch.arange(cfg.max_position_embeddings, dtype=torch.float64, device=device), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each head's (first half, second half) channel pairs of x (B, H, T, hd) by its position's angle.

    Pairs channel i with channel i + hd/2 (the Llama / Hugging Face layout, so exported weights need no
    permutation). cos, sin: (T, hd/2) for the positions of x. Each head is rotated alone.
    """
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def make_norm(cfg: ModelConfig) -> nn.Module:
    """One norm as the config asks: LayerNorm or RMSNorm, with or without a learnable gain (and offset)."""
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, elementwise_affine=cfg.norm_weight)
    return nn.LayerNorm(cfg.d_model, elementwise_affine=cfg.norm_weight, bias=cfg.bias and cfg.norm_weight)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.d_model % cfg.n_heads != 0:
            raise ValueError(f"d_model ({cfg.d_model}) must be divisible by n_heads ({cfg.n_heads})")
        if cfg.pos_embedding == "rotary" and cfg.head_dim % 2:
            raise ValueError(f"rotary positions need an even head size, got {cfg.head_dim} (d_model / n_heads)")
        self.head_dim = cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)  # rows: (head, q|k|v, head_dim)
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.qk_norm = cfg.qk_norm
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.backend = "auto"  # training and evaluation only; see GPT.set_attention_backend

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None, layer: int = 0,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                value_embed: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = self.qkv(x).view(B, T, -1, 3, self.head_dim)  # -1: the heads this rank holds
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(dim=3))  # each (B, H, T, hd)
        if value_embed is not None:  # (B, T, heads · hd), head-major like v (a TP shard: its own heads)
            v = v + value_embed.view(B, T, -1, self.head_dim).transpose(1, 2)
        if self.qk_norm:  # per head: a tensor-parallel shard normalises its own heads the same way
            q, k = F.rms_norm(q, (self.head_dim,)), F.rms_norm(k, (self.head_dim,))
        if rope is not None:  # the positions of these T tokens (offset by the cache length in generation)
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if kv_cache is None:
            with attention_kernels(self.backend):
                y = F.scaled_dot_product_attention(
                    q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
                )
        else:
            past = kv_cache.length
            k, v = kv_cache.update(layer, k, v)
            if past == 0:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            elif T == 1:
                y = F.scaled_dot_product_attention(q, k, v)  # one new query sees every cached key
            else:  # several new queries on top of a cache: query i sees keys up to past + i
                mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, T, -1)
        return self.resid_dropout(self.out_proj(y))


GELU_2Z_SCALE = 2 * math.sqrt(2 / math.pi)  # 2z = GELU_2Z_SCALE · (x + 0.044715·x³)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's GELU, the tanh approximation: 0.5·x·(1 + tanh(z)), z = √(2/π)·(x + 0.044715·x³).

    Compiled for the CPU it is written as x·sigmoid(2z), the same function (0.5·(1 + tanh(z)) =
    sigmoid(2z)): Inductor's vectorised CPU tanh is slow, and this form took the forward and backward
    of a 4096 × 1536 activation from 13.2 to 5.9 ms, equal to the tanh form within fp32 rounding
    (relative error to an fp64 reference 5e-8 against 4e-8; benchmarks/RESULTS.md). Eager keeps
    PyTorch's one fused kernel (the same formula as separate operations took 62 ms there), and so does
    CUDA, where the form has not been measured.
    """
    if torch.compiler.is_compiling() and x.device.type == "cpu":
        return x * torch.sigmoid(GELU_2Z_SCALE * (x + 0.044715 * x * x * x))
    return F.gelu(x, approximate="tanh")


def relu_squared(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x).square()


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc_in = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.fc_out = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.activation = relu_squared if cfg.mlp_activation == "relu2" else gelu_tanh
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc_out(self.activation(self.fc_in(x))))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None, layer: int = 0,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                value_embed: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache, layer, rope, value_embed)
        return x + self.mlp(self.ln_2(x))


def value_embed_layers(cfg: ModelConfig) -> list[int]:
    """The layers that get a value embedding: every other one, counted back from the last."""
    return [i for i in range(cfg.n_layers) if i % 2 == (cfg.n_layers - 1) % 2] if cfg.value_embeds else []


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        for name, allowed in (("pos_embedding", POS_EMBEDDINGS), ("norm", NORMS),
                              ("mlp_activation", MLP_ACTIVATIONS), ("init", INITS)):
            if getattr(cfg, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(cfg, name)!r}; one of {allowed}")
        self.cfg = cfg
        V = cfg.padded_vocab_size
        self.tok_emb = nn.Embedding(V, cfg.d_model)
        # With rotary positions there is no position parameter at all (None keeps the attribute readable).
        self.pos_emb = nn.Embedding(cfg.max_position_embeddings, cfg.d_model) if cfg.pos_embedding == "learned" \
            else None
        self.emb_norm = make_norm(cfg) if cfg.embed_norm else None
        # Keyed by layer: a lookup each (no matrix product), sharded by columns (heads) under tensor parallel.
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(V, cfg.d_model) for i in value_embed_layers(cfg)}) \
            if cfg.value_embeds else None
        self.drop = nn.Dropout(cfg.dropout)
        # A ModuleDict keyed "0".."n-1" (not a list) so that per-block wrappers (FSDP, activation
        # checkpointing, compile) can replace blocks by name.
        self.blocks = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.n_layers)})
        self.ln_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, V, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if cfg.pos_embedding == "rotary":
            # Not saved in checkpoints (a function of the config); DDP is told not to broadcast buffers.
            cos, sin = rotary_tables(cfg)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        # Tokens per chunk when forward() computes the loss (gptrain.chunked_loss); 0: the plain head and
        # cross-entropy. How to compute, not what: it is not in the ModelConfig that checkpoints carry.
        self.loss_chunk_size = 0
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise every parameter as `cfg.init` says (and the rotary tables, for meta-device builds).

        gpt2: N(0, 0.02) for matrices and embeddings; residual output projections N(0, 0.02/√(2·n_layers)).
        fan_in: matrices uniform with std 1/√fan_in (no outliers), the token embedding N(0, 1) (N(0, 1/√d)
        when it is also the head), an untied head N(0, 0.001), a learned position table N(0, 0.02).
        Value embeddings: gpt2 N(0, 0.02); fan_in the hidden matrices' std 1/√d_model (they add to values of
        that size). Both: biases 0, norm gains 1; with zero_init_proj the residual output projections are 0,
        so every block starts as the identity.
        """
        cfg = self.cfg
        resid_std = 0.02 / math.sqrt(2 * cfg.n_layers)
        for name, p in self.named_parameters():
            is_resid_proj = name.endswith("out_proj.weight") or name.endswith("fc_out.weight")
            if is_resid_proj and cfg.zero_init_proj:
                nn.init.zeros_(p)
            elif p.dim() < 2:
                (nn.init.zeros_ if name.endswith("bias") else nn.init.ones_)(p)
            elif cfg.init == "gpt2":
                nn.init.normal_(p, mean=0.0, std=resid_std if is_resid_proj else 0.02)
            elif name == "tok_emb.weight":
                nn.init.normal_(p, mean=0.0, std=cfg.d_model ** -0.5 if cfg.tie_embeddings else 1.0)
            elif name == "lm_head.weight":
                nn.init.normal_(p, mean=0.0, std=0.001)
            elif name == "pos_emb.weight":
                nn.init.normal_(p, mean=0.0, std=0.02)
            else:  # a hidden matrix (or a value embedding, d_model wide): uniform with the std 1/√fan_in
                bound = math.sqrt(3.0 / p.size(1))
                nn.init.uniform_(p, -bound, bound)
        if cfg.pos_embedding == "rotary":
            cos, sin = rotary_tables(cfg, device=self.rope_cos.device)
            with torch.no_grad():
                self.rope_cos.copy_(cos)
                self.rope_sin.copy_(sin)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, padded_vocab), or the mean cross-entropy when targets are given."""
        B, T = idx.shape
        start = kv_cache.length if kv_cache is not None else 0
        if start + T > self.cfg.max_position_embeddings:
            raise ValueError(
                f"sequence of {start + T} tokens is longer than the context ({self.cfg.max_position_embeddings})"
            )
        x = self.tok_emb(idx)
        rope = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(start, start + T, device=idx.device))
        else:
            rope = (self.rope_cos[start:start + T], self.rope_sin[start:start + T])
        if self.emb_norm is not None:
            x = self.emb_norm(x)
        x = self.drop(x)
        ve = self.value_embeds
        for i, block in enumerate(self.blocks.values()):
            x = block(x, kv_cache, i, rope, ve[str(i)](idx) if ve is not None and str(i) in ve else None)
        if kv_cache is not None:
            kv_cache.length += T
        x = self.ln_f(x)
        softcap = self.cfg.logit_softcap
        if targets is not None and self.loss_chunk_size:
            return chunked_linear_cross_entropy(x.view(-1, x.size(-1)), self.lm_head.weight, targets.reshape(-1),
                                                self.cfg.vocab_size, self.loss_chunk_size, softcap=softcap)
        logits = self.lm_head(x)
        if softcap:
            logits = softcap_logits(logits, softcap)
        if logits.size(-1) > self.cfg.vocab_size:
            # The padding ids can never be predicted. Written in place into the pad columns only (the
            # matmul's backward does not need its output): adding a -inf mask row instead would read
            # and write all B·T·V logits once more and allocate a second logits tensor.
            logits[..., self.cfg.vocab_size :] = float("-inf")
        if targets is None:
            return logits
        # Under autocast, cross_entropy runs in fp32 by itself; no fp32 copy of the logits here.
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))

    def set_attention_backend(self, backend: str) -> None:
        """Run the attention of training and evaluation forwards with one SDPA backend only.

        Generation with a KV cache keeps PyTorch's choice: its masked and single-query calls are
        cases some backends (flash on CUDA) do not support.
        """
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; one of {ATTENTION_BACKENDS}")
        for block in self.blocks.values():
            block.attn.backend = backend

    # ------------------------------------------------------------------ counts
    def num_parameters(self, non_embedding: bool = False) -> int:
        """Unique parameters (a tied head counts once). Non-embedding excludes the token embedding, the
        position table and value embeddings (an untied head is a matrix like any other and stays counted)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel() + (self.pos_emb.weight.numel() if self.pos_emb is not None else 0)
            n -= sum(p.numel() for p in self.value_embeds.parameters()) if self.value_embeds is not None else 0
        return n

    def new_kv_cache(self, batch: int, *, device, dtype) -> KVCache:
        c = self.cfg
        return KVCache(c.n_layers, batch, c.n_heads, c.max_position_embeddings, c.head_dim, device=device, dtype=dtype)


def flops_per_token(cfg: ModelConfig, seq_len: int, n_params: int) -> float:
    """Training FLOPs per token of the model: 6·N_matmul + 12·n_layers·d_model·T (PaLM appendix B; nanoGPT).

    n_params: every unique parameter of the model (`GPT.num_parameters()`). N_matmul is the part of it that
    multiplies activations: n_params less the learned position table (a lookup; rotary has no parameter), the
    value embeddings (lookups) and, when the head is untied, the token embedding (a lookup; the untied head
    is its own matrix and counts). A tied embedding counts once, for the head's product. Norm gains and
    biases stay in N (a rounding error). Attention scores and their weighting count 12·n_layers·d_model·T
    over the full context T (causal masking not subtracted). Rotary, QK-norm, ReLU² and soft-capping are element-wise
    and not counted; neither is the optimizer (Muon's Newton–Schulz products are not model FLOPs).
    """
    n = n_params
    if cfg.pos_embedding == "learned":
        n -= cfg.max_position_embeddings * cfg.d_model
    if not cfg.tie_embeddings:
        n -= cfg.padded_vocab_size * cfg.d_model
    n -= len(value_embed_layers(cfg)) * cfg.padded_vocab_size * cfg.d_model
    return 6.0 * n + 12.0 * cfg.n_layers * cfg.d_model * seq_len
