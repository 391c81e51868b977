"""Bagel's language model: Qwen2 with a mixture of transformers (MoT) and a key/value cache.

Every per-layer weight has a generation twin (`*_moe_gen`): in a generation query
`[<|vision_start|>, latent tokens, <|vision_end|>]` the latent tokens go through the twins and
the two markers through the understanding weights; text and ViT tokens always take the
understanding weights. Attention is one joint attention over the cached context and the query.
Module and parameter names are the official ones (ByteDance-Seed/Bagel, modeling/bagel/
qwen2_navit.py), so ema.safetensors loads as it is; the math follows its `forward_inference`
for one sample (cfgpar runs one branch per forward): q/k projected, RMS-normed per head and
rotated in float32, then cast back to the model's dtype.

Shapes: N query tokens, K = cached + N keys, nh query heads, nkv key/value heads, hd head dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.qwen2.configuration_qwen2 import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP, Qwen2RMSNorm, Qwen2RotaryEmbedding, apply_rotary_pos_emb


@dataclass
class KVCache:
    """One context's keys and values per layer ([K, nkv, hd] each, post-norm, post-rotary), its
    length and the next rotary position. Empty: no layer has keys yet."""

    keys: list[torch.Tensor | None] = field(default_factory=list)
    values: list[torch.Tensor | None] = field(default_factory=list)
    length: int = 0
    next_position: int = 0

    @classmethod
    def empty(cls, num_layers: int) -> "KVCache":
        return cls([None] * num_layers, [None] * num_layers)

    def copy(self) -> "KVCache":
        """A context to extend separately (an update replaces a layer's tensors, never writes into them)."""
        return KVCache(list(self.keys), list(self.values), self.length, self.next_position)


@dataclass(frozen=True)
class Query:
    """How one forward routes its tokens: `gen` are the rows that take the generation experts
    (None: all rows take the understanding weights), `causal` text attention (bottom-right
    aligned over the cache) or full attention (image blocks), `update` whether the query's keys
    and values join the cache."""

    gen: slice | None = None
    causal: bool = False
    update: bool = False


def _routed(x: torch.Tensor, gen: slice | None, und_fn, gen_fn) -> torch.Tensor:
    """und_fn on the understanding rows and gen_fn on the generation rows of x [N, ...], in place order."""
    if gen is None:
        return und_fn(x)
    parts = [und_fn(x[: gen.start]), gen_fn(x[gen]), und_fn(x[gen.stop:])]
    return torch.cat(parts)


class PackedAttentionMoT(nn.Module):
    def __init__(self, config: Qwen2Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.head_dim = config.hidden_size // self.num_heads
        h, q, kv = config.hidden_size, self.num_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        for suffix in ("", "_moe_gen"):
            setattr(self, f"q_proj{suffix}", nn.Linear(h, q, bias=True))
            setattr(self, f"k_proj{suffix}", nn.Linear(h, kv, bias=True))
            setattr(self, f"v_proj{suffix}", nn.Linear(h, kv, bias=True))
            setattr(self, f"o_proj{suffix}", nn.Linear(q, h, bias=False))
            setattr(self, f"q_norm{suffix}", Qwen2RMSNorm(self.head_dim, eps=config.rms_norm_eps))
            setattr(self, f"k_norm{suffix}", Qwen2RMSNorm(self.head_dim, eps=config.rms_norm_eps))

    def _project(self, x, query: Query, name: str) -> torch.Tensor:
        return _routed(x, query.gen, getattr(self, name), getattr(self, f"{name}_moe_gen"))

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], cache: KVCache, query: Query):
        dtype, n = x.dtype, x.shape[0]
        q = self._project(x, query, "q_proj").view(n, self.num_heads, self.head_dim).float()
        k = self._project(x, query, "k_proj").view(n, self.num_key_value_heads, self.head_dim).float()
        v = self._project(x, query, "v_proj").view(n, self.num_key_value_heads, self.head_dim)
        q, k = self._project(q, query, "q_norm"), self._project(k, query, "k_norm")
        cos, sin = rotary
        q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
        q, k = q.to(dtype), k.to(dtype)
        past_k, past_v = cache.keys[self.layer_idx], cache.values[self.layer_idx]
        if past_k is not None:
            k, v = torch.cat([past_k, k]), torch.cat([past_v, v])
        if query.update:
            cache.keys[self.layer_idx], cache.values[self.layer_idx] = k, v
        out = _attention(q, k, v, query.causal)
        return self._project(out.reshape(n, -1), query, "o_proj")


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """q [N, nh, hd] over k, v [K, nkv, hd] -> [N, nh, hd]; causal masks bottom-right aligned
    (query i sees every cached key and the query's keys 0..i), as flash-attn's varlen call does."""
    n, total = q.shape[0], k.shape[0]
    repeat = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    mask = None
    if causal:
        mask = torch.arange(total, device=q.device)[None, :] <= (total - n) + torch.arange(n, device=q.device)[:, None]
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask)
    return out.transpose(0, 1)


class Qwen2MoTDecoderLayer(nn.Module):
    def __init__(self, config: Qwen2Config, layer_idx: int):
        super().__init__()
        self.self_attn = PackedAttentionMoT(config, layer_idx)
        self.mlp, self.mlp_moe_gen = Qwen2MLP(config), Qwen2MLP(config)
        for name in ("input_layernorm", "post_attention_layernorm"):
            setattr(self, name, Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps))
            setattr(self, f"{name}_moe_gen", Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps))

    def forward(self, x, rotary, cache: KVCache, query: Query) -> torch.Tensor:
        gen = query.gen
        h = _routed(x, gen, self.input_layernorm, self.input_layernorm_moe_gen)
        x = x + self.self_attn(h, rotary, cache, query)
        h = _routed(x, gen, lambda t: self.mlp(self.post_attention_layernorm(t)),
                    lambda t: self.mlp_moe_gen(self.post_attention_layernorm_moe_gen(t)))
        return x + h


class Qwen2MoTModel(nn.Module):
    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Qwen2MoTDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.norm_moe_gen = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen2RotaryEmbedding(config=config)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache, query: Query) -> torch.Tensor:
        """Query embeddings x [N, H] at rotary positions [N] over `cache` -> final hidden states [N, H]."""
        cos, sin = self.rotary_emb(x, positions[None])
        rotary = (cos[0], sin[0])
        for layer in self.layers:
            x = layer(x, rotary, cache, query)
        if query.update:
            cache.length += x.shape[0]
        return _routed(x, query.gen, self.norm, self.norm_moe_gen)


class Qwen2MoTForCausalLM(nn.Module):
    """`language_model` in the checkpoint. Generation needs no lm_head (text answers are out of
    scope), so none is built and its weights are not loaded."""

    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.config = config
        self.model = Qwen2MoTModel(config)


def llm_config(raw: dict) -> Qwen2Config:
    """llm_config.json as the official loader reads it (qk_norm on, lm_head untied)."""
    config = Qwen2Config(**{k: v for k, v in raw.items() if k not in ("architectures", "model_type")})
    config.tie_word_embeddings = False
    return config
