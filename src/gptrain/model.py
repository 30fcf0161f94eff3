"""The GPT model: token + learned position embeddings, pre-LayerNorm blocks, tied LM head.

Everything the model is lives in this file, nanoGPT style. Parallelism (DDP, FSDP2, tensor
parallel), activation checkpointing and compilation are applied from outside by
`gptrain.distributed`; nothing here knows about them, except two layout choices made so that
tensor parallelism can shard the model with plain DTensor plans:

- The fused QKV projection stores its output features head-major, `(n_heads, 3, head_dim)`,
  so sharding its rows across ranks gives each rank whole heads with their own q, k and v.
- Shapes are recovered with `-1` for the head count, so a rank holding a shard sees
  `n_heads / tp` heads without knowing it is sharded.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptrain.chunked_loss import chunked_linear_cross_entropy


@dataclass
class ModelConfig:
    vocab_size: int = 8192
    max_position_embeddings: int = 256  # the context length
    n_layers: int = 6
    n_heads: int = 6
    d_model: int = 384
    d_ff: int | None = None  # default 4 * d_model
    dropout: float = 0.0
    bias: bool = True
    tie_embeddings: bool = True
    # Embedding rows are padded to a multiple of this for fast matrix products on GPUs.
    # The extra ids can never be predicted (their logits are masked) nor fed in.
    pad_vocab_multiple: int = 128

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


# Standard GPT-2 shapes; vocab and context come from the data unless set explicitly.
PRESETS: dict[str, dict] = {
    "tiny": dict(n_layers=4, n_heads=4, d_model=192, max_position_embeddings=256),
    "small-cpu": dict(n_layers=6, n_heads=6, d_model=384, max_position_embeddings=256),
    "gpt2": dict(n_layers=12, n_heads=12, d_model=768, max_position_embeddings=1024),
    "gpt2-medium": dict(n_layers=24, n_heads=16, d_model=1024, max_position_embeddings=1024),
    "gpt2-large": dict(n_layers=36, n_heads=20, d_model=1280, max_position_embeddings=1024),
    "gpt2-xl": dict(n_layers=48, n_heads=25, d_model=1600, max_position_embeddings=1024),
}


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


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.d_model % cfg.n_heads != 0:
            raise ValueError(f"d_model ({cfg.d_model}) must be divisible by n_heads ({cfg.n_heads})")
        self.head_dim = cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)  # rows: (head, q|k|v, head_dim)
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.backend = "auto"  # training and evaluation only; see GPT.set_attention_backend

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = self.qkv(x).view(B, T, -1, 3, self.head_dim)  # -1: the heads this rank holds
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(dim=3))  # each (B, H, T, hd)
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


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc_in = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.fc_out = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc_out(gelu_tanh(self.fc_in(x))))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        V = cfg.padded_vocab_size
        self.tok_emb = nn.Embedding(V, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_position_embeddings, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        # A ModuleDict keyed "0".."n-1" (not a list) so that per-block wrappers (FSDP, activation
        # checkpointing, compile) can replace blocks by name.
        self.blocks = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.n_layers)})
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.d_model, V, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        # Tokens per chunk when forward() computes the loss (gptrain.chunked_loss); 0: the plain head and
        # cross-entropy. How to compute, not what: it is not in the ModelConfig that checkpoints carry.
        self.loss_chunk_size = 0
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, 0.02); residual output projections scaled by 1/sqrt(2·n_layers)."""
        resid_std = 0.02 / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("out_proj.weight") or name.endswith("fc_out.weight"):
                nn.init.normal_(p, mean=0.0, std=resid_std)
            elif p.dim() >= 2:
                nn.init.normal_(p, mean=0.0, std=0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:  # LayerNorm weights
                nn.init.ones_(p)

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
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for i, block in enumerate(self.blocks.values()):
            x = block(x, kv_cache, i)
        if kv_cache is not None:
            kv_cache.length += T
        x = self.ln_f(x)
        if targets is not None and self.loss_chunk_size:
            return chunked_linear_cross_entropy(x.view(-1, x.size(-1)), self.lm_head.weight, targets.reshape(-1),
                                                self.cfg.vocab_size, self.loss_chunk_size)
        logits = self.lm_head(x)
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
        """Unique parameters (a tied head counts once). Non-embedding excludes both embeddings."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel() + self.pos_emb.weight.numel()
        return n

    def new_kv_cache(self, batch: int, *, device, dtype) -> KVCache:
        c = self.cfg
        return KVCache(c.n_layers, batch, c.n_heads, c.max_position_embeddings, c.head_dim, device=device, dtype=dtype)


def flops_per_token(cfg: ModelConfig, seq_len: int, n_params_no_pos: int) -> float:
    """Training FLOPs per token: 6·N + 12·n_layers·d_model·T (PaLM appendix B; nanoGPT).

    N counts every parameter except the position embedding; a tied token embedding counts once
    because the LM head uses it. Attention is counted over the full context T.
    """
    return 6.0 * n_params_no_pos + 12.0 * cfg.n_layers * cfg.d_model * seq_len
