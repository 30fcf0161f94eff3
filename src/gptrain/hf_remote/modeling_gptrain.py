"""gptrain's GPT as a transformers causal LM: remote code that `gptrain export` writes beside the weights.

    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)

computes what gptrain.model.GPT computes, for every option mix gptrain trains (both families, value
embeddings, GPT-2 with QK-norm, rotary with LayerNorm, soft-capped logits, tied or untied head, …). The
parameters have gptrain's own names and layouts under `model.` (only the head is `lm_head`), so an export
renames tensors and never reshapes them. This file must not import gptrain (the folder is loaded where
gptrain may not be installed): the few pieces of gptrain.model it needs are written again here, with the
same operations in the same order, and gptrain's tests check both give the same logits.

What transformers' users expect beyond gptrain's own forward:
- a KV cache (a `transformers.Cache`, e.g. DynamicCache) for generate();
- `attention_mask` for padded batches: padding keys are never attended, and positions count only the real
  tokens, so a padded row (left or right) computes what it computes alone;
- `position_ids` (generate() derives them from the mask), `logits_to_keep`, and `labels` (shifted inside,
  as transformers' causal LMs do).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_gptrain import GptrainConfig

POS_EMBEDDINGS = ("learned", "rotary")
NORMS = ("layernorm", "rmsnorm")
MLP_ACTIVATIONS = ("gelu", "relu2")


def _cache_field(output_class: type) -> str:
    """The name model outputs give the cache: `past_key_values` in early transformers 5 releases, `cache` later."""
    return "cache" if "cache" in getattr(output_class, "__dataclass_fields__", {}) else "past_key_values"


def rotary_cos_sin(config: GptrainConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position·frequency, (batch, T, head_dim/2), fp32.

    Frequencies base^(-2i/head_dim), computed in fp64 as gptrain's tables are (element for element the
    same numbers: gptrain indexes a table of these products, here they are computed for the positions asked).
    """
    half = config.hidden_size // config.num_attention_heads // 2
    inv_freq = config.rope_base ** (-torch.arange(half, dtype=torch.float64, device=positions.device) / half)
    angles = positions.to(torch.float64)[..., None] * inv_freq
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the (first half, second half) channel pairs of each head of x (B, H, T, hd); cos, sin (B, T, hd/2)."""
    cos, sin = cos.to(x.dtype).unsqueeze(1), sin.to(x.dtype).unsqueeze(1)  # the same angle for every head
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def make_norm(config: GptrainConfig) -> nn.Module:
    """torch's own norms, as gptrain uses them: RMSNorm's eps is the input dtype's machine epsilon."""
    d = config.hidden_size
    if config.norm == "rmsnorm":
        return nn.RMSNorm(d, elementwise_affine=config.norm_weight)
    return nn.LayerNorm(d, elementwise_affine=config.norm_weight, bias=config.bias and config.norm_weight)


def relu_squared(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x).square()


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


class GptrainAttention(nn.Module):
    def __init__(self, config: GptrainConfig, layer_idx: int):
        super().__init__()
        d = config.hidden_size
        self.layer_idx = layer_idx  # this layer's slot in the cache
        self.head_dim = d // config.num_attention_heads
        self.qkv = nn.Linear(d, 3 * d, bias=config.bias)  # output rows: (head, q|k|v, head_dim), head-major
        self.out_proj = nn.Linear(d, d, bias=config.bias)
        self.qk_norm = config.qk_norm
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                value_embed: torch.Tensor | None, mask: torch.Tensor | None, is_causal: bool,
                cache: Cache | None) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = self.qkv(x).view(B, T, -1, 3, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(dim=3))  # each (B, H, T, hd)
        if value_embed is not None:  # (B, T, H·hd), head-major like v
            v = v + value_embed.view(B, T, -1, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q, k = F.rms_norm(q, (self.head_dim,)), F.rms_norm(k, (self.head_dim,))
        if rope is not None:  # keys are cached after their rotation, each at its own position
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.out_proj(y.transpose(1, 2).reshape(B, T, -1)))


class GptrainMLP(nn.Module):
    def __init__(self, config: GptrainConfig):
        super().__init__()
        self.fc_in = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.bias)
        self.fc_out = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.bias)
        self.activation = relu_squared if config.mlp_activation == "relu2" else gelu_tanh
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc_out(self.activation(self.fc_in(x))))


class GptrainBlock(nn.Module):
    def __init__(self, config: GptrainConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = GptrainAttention(config, layer_idx)
        self.ln_2 = make_norm(config)
        self.mlp = GptrainMLP(config)

    def forward(self, x, rope, value_embed, mask, is_causal, cache) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope, value_embed, mask, is_causal, cache)
        return x + self.mlp(self.ln_2(x))


class GptrainPreTrainedModel(PreTrainedModel):
    config_class = GptrainConfig
    config: GptrainConfig
    base_model_prefix = "model"
    _no_split_modules = ["GptrainBlock"]

    def _init_weights(self, module: nn.Module) -> None:
        """For models built from a config alone (from_pretrained loads every weight): GPT-2's N(0, 0.02)."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)) and module.weight is not None:
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)


class GptrainModel(GptrainPreTrainedModel):
    """The transformer without its head: embeddings, blocks, final norm."""

    def __init__(self, config: GptrainConfig):
        super().__init__(config)
        for name, allowed in (("pos_embedding", POS_EMBEDDINGS), ("norm", NORMS),
                              ("mlp_activation", MLP_ACTIVATIONS)):
            if getattr(config, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(config, name)!r}; one of {allowed}")
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(f"hidden_size {config.hidden_size} is not divisible by {config.num_attention_heads} heads")
        V, d = config.vocab_size, config.hidden_size
        self.tok_emb = nn.Embedding(V, d)
        self.pos_emb = nn.Embedding(config.max_position_embeddings, d) if config.pos_embedding == "learned" else None
        self.emb_norm = make_norm(config) if config.embed_norm else None
        # Keyed by layer index, as in gptrain: a lookup with the input ids, added to that layer's values.
        layers = config.value_embed_layers
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(V, d) for i in layers}) if layers else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([GptrainBlock(config, i) for i in range(config.num_hidden_layers)])
        self.ln_f = make_norm(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.tok_emb

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.tok_emb = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if input_ids is None and self.value_embeds is not None:
            raise ValueError("this model's value embeddings are looked up with the token ids: pass input_ids")
        x = self.tok_emb(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        if use_cache and cache is None:
            cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        if past + T > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {past + T} tokens is longer than the context "
                             f"({self.config.max_position_embeddings})")
        # A row is padded where a 2-D attention_mask has zeros; a 4-D mask was prepared by the caller: as given.
        padded = attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all())
        if attention_mask is not None and attention_mask.dim() == 4:
            mask, is_causal = attention_mask.to(x.device), False
        else:
            mask, is_causal = self._causal_mask(attention_mask if padded else None, T, past, x.device)
        if position_ids is None:
            position_ids = self._positions(attention_mask if padded else None, T, past,
                                           kwargs.get("cache_position"), x.device)
        rope = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(position_ids)
        else:
            rope = rotary_cos_sin(self.config, position_ids)
        if self.emb_norm is not None:
            x = self.emb_norm(x)
        x = self.drop(x)
        hidden_states = (x,) if output_hidden_states else None  # the embeddings, then each block (before ln_f)
        ve = self.value_embeds
        for i, block in enumerate(self.blocks):
            value_embed = ve[str(i)](input_ids) if ve is not None and str(i) in ve else None
            x = block(x, rope, value_embed, mask, is_causal, cache)
            if output_hidden_states:
                hidden_states += (x,)
        x = self.ln_f(x)
        return BaseModelOutputWithPast(last_hidden_state=x, hidden_states=hidden_states,
                                       **{_cache_field(BaseModelOutputWithPast): cache})

    @staticmethod
    def _causal_mask(padding_mask: torch.Tensor | None, T: int, past: int,
                     device: torch.device) -> tuple[torch.Tensor | None, bool]:
        """(mask for scaled_dot_product_attention, is_causal) for T new queries after `past` cached keys.

        Without padding, gptrain's own calls: causal from the start, or one query that sees every key. With
        padding (`padding_mask` (B, past + T), 0 at padding), query i sees key j when j is a real token at
        or before it; each query also sees itself, so a padding query's row is never empty (its output is
        never used, but an empty softmax row would be NaN).
        """
        if padding_mask is None and past == 0:
            return None, True
        if padding_mask is None and T == 1:
            return None, False
        query_pos = torch.arange(past, past + T, device=device)[:, None]
        key_pos = torch.arange(past + T, device=device)[None, :]
        allowed = key_pos <= query_pos  # (T, past + T)
        if padding_mask is None:
            return allowed, False
        if padding_mask.shape[-1] != past + T:
            raise ValueError(f"attention_mask covers {padding_mask.shape[-1]} positions; the cache and the input "
                             f"{past + T}")
        real_key = padding_mask.to(device=device, dtype=torch.bool)[:, None, :]
        return ((allowed & real_key) | (key_pos == query_pos))[:, None], False  # (B, 1, T, past + T)

    @staticmethod
    def _positions(attention_mask: torch.Tensor | None, T: int, past: int, cache_position: torch.Tensor | None,
                   device: torch.device) -> torch.Tensor:
        """Positions of the T new tokens: counted over the real tokens when there is padding, else past … past+T-1."""
        if attention_mask is not None and attention_mask.dim() == 2:
            return (attention_mask.to(device).long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
        if cache_position is not None:
            return cache_position.to(device)[None]
        return torch.arange(past, past + T, device=device)[None]


class GptrainForCausalLM(GptrainPreTrainedModel, GenerationMixin):
    # A tied head is the token embedding itself (transformers ties it; the file holds model.tok_emb only).
    _tied_weights_keys = {"lm_head.weight": "model.tok_emb.weight"}

    def __init__(self, config: GptrainConfig):
        super().__init__(config)
        self.model = GptrainModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.tok_emb

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.tok_emb = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """Logits over the vocabulary; `labels` (-100: ignored) give the mean next-token cross-entropy.

        The cache comes as `cache` (recent transformers) or `past_key_values` (earlier 5.x releases).
        `logits_to_keep`: an int n computes the logits of the last n positions only (0: all).
        """
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache if cache is not None else past_key_values, inputs_embeds=inputs_embeds,
                         use_cache=use_cache, output_hidden_states=output_hidden_states, **kwargs)
        x = out.last_hidden_state
        if isinstance(logits_to_keep, int):
            x = x[:, -logits_to_keep:] if logits_to_keep else x
        else:
            x = x[:, logits_to_keep]
        logits = self.lm_head(x)
        cap = self.config.logit_softcap
        if cap:
            logits = cap * torch.tanh(logits / cap)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)),
                                   labels[:, 1:].to(logits.device).reshape(-1), ignore_index=-100)
        new_cache = getattr(out, _cache_field(BaseModelOutputWithPast))
        if return_dict is False:
            return tuple(t for t in (loss, logits, new_cache, out.hidden_states) if t is not None)
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                      **{_cache_field(CausalLMOutputWithPast): new_cache})
