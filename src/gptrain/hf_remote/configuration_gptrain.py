"""The configuration of a gptrain model as transformers remote code (the model: modeling_gptrain.py).

`gptrain export` writes this file into the exported folder; `AutoConfig.from_pretrained(DIR,
trust_remote_code=True)` reads config.json with it. It must not import gptrain.

The shape keeps transformers' standard names (hidden_size, num_hidden_layers, …), which tools such as
lm-eval and generate() read; the architecture options keep the names and values of gptrain's ModelConfig
(pos_embedding="rotary", norm="rmsnorm", …). The defaults are gptrain's GPT-2 family, but an export
writes every option explicitly.
"""

from transformers import PretrainedConfig

# The meaning of the options below. An importer seeing a larger number knows the folder holds options it
# cannot compute.
REMOTE_CODE_VERSION = 1


class GptrainConfig(PretrainedConfig):
    model_type = "gptrain"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size: int = 50304,
        max_position_embeddings: int = 1024,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        intermediate_size: int | None = None,
        dropout: float = 0.0,
        pos_embedding: str = "learned",  # "learned": a position table; "rotary": q and k rotated by position
        rope_base: float = 10000.0,
        norm: str = "layernorm",  # or "rmsnorm": the blocks' pre-norms, the final norm and the embedding norm
        norm_weight: bool = True,  # a learnable gain (and, with bias, an offset) in those norms
        embed_norm: bool = False,  # a norm right after the token (+ position) embedding
        qk_norm: bool = False,  # q and k RMS-normalised per head before attention
        mlp_activation: str = "gelu",  # "gelu" (tanh approximation) or "relu2" (relu(x)²)
        logit_softcap: float = 0.0,  # logits = c·tanh(logits / c); 0: no cap
        bias: bool = True,  # biases in the Linear layers (and LayerNorms)
        value_embed_layers: list[int] | None = None,  # layers adding a token embedding of their own to v
        family: str | None = None,  # the gptrain family the model was trained from (informative)
        remote_code_version: int = REMOTE_CODE_VERSION,
        tie_word_embeddings: bool = True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.max_position_embeddings = max_position_embeddings
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size or 4 * hidden_size
        self.dropout = dropout
        self.pos_embedding = pos_embedding
        self.rope_base = rope_base
        self.norm = norm
        self.norm_weight = norm_weight
        self.embed_norm = embed_norm
        self.qk_norm = qk_norm
        self.mlp_activation = mlp_activation
        self.logit_softcap = logit_softcap
        self.bias = bias
        self.value_embed_layers = list(value_embed_layers or [])
        self.family = family
        self.remote_code_version = remote_code_version
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
