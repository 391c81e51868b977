"""Bagel (ByteDance-Seed/BAGEL-7B-MoT) for image generation: the language model, the ViT and the
latent in/out layers, loaded from the hub folder's own files (llm_config.json, vit_config.json,
ema.safetensors), and the three operations generation needs:

- `add_text`, `add_vit_image`, `add_vae_image` append a block to a context's key/value cache
  (text: causal, positions counting up; an image block `[<|vision_start|>, tokens,
  <|vision_end|>]`: full attention, every token at one position, the next block one further);
- `velocity` runs the generation query over a context, without changing it, and returns the
  flow velocity of the latent tokens.

Token layout, positions and the per-token inputs follow the official modeling/bagel/bagel.py
(prepare_prompts, prepare_vit_images, prepare_vae_images, prepare_vae_latent, _forward_flow).
A latent token is 2 x 2 latent pixels of `z` channels: 4 z features, (py, px, c) order.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from cfgpar.models.bagel.llm import KVCache, Query, Qwen2MoTForCausalLM, Qwen2RotaryEmbedding, llm_config
from cfgpar.models.bagel.vision import (BagelViT, MLPconnector, PositionEmbedding, TimestepEmbedder, patchify,
                                        position_ids, vit_config)

LATENT_PATCH = 2
CONNECTOR_ACT = "gelu_pytorch_tanh"


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the four tokens Bagel's prompts and image blocks are framed with."""

    bos: int
    eos: int
    start_of_image: int
    end_of_image: int

    @classmethod
    def of(cls, tokenizer) -> "SpecialTokens":
        """As the official add_special_tokens: the tokens are added where the tokenizer lacks them."""
        names = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")
        missing = [n for n in names if tokenizer.convert_tokens_to_ids(n) in (None, tokenizer.unk_token_id)]
        if missing:
            tokenizer.add_tokens(missing)
        return cls(*(tokenizer.convert_tokens_to_ids(n) for n in names))


class Bagel(nn.Module):
    def __init__(self, llm, vit, *, latent_channels: int, max_latent_size: int, vit_side: int):
        super().__init__()
        hidden = llm.hidden_size
        self.language_model = Qwen2MoTForCausalLM(llm)
        self.latent_channels, self.max_latent_size = latent_channels, max_latent_size
        patch_dim = LATENT_PATCH ** 2 * latent_channels
        self.time_embedder = TimestepEmbedder(hidden)
        self.vae2llm, self.llm2vae = nn.Linear(patch_dim, hidden), nn.Linear(hidden, patch_dim)
        self.latent_pos_embed = PositionEmbedding(max_latent_size, hidden)
        self.vit_model = BagelViT(vit)
        self.vit_patch, self.vit_side = vit.patch_size, vit_side
        self.connector = MLPconnector(vit.hidden_size, hidden, CONNECTOR_ACT)
        self.vit_pos_embed = PositionEmbedding(vit_side, hidden)

    @property
    def num_layers(self) -> int:
        return len(self.language_model.model.layers)

    @property
    def dtype(self) -> torch.dtype:
        return self.vae2llm.weight.dtype

    def empty_context(self) -> KVCache:
        return KVCache.empty(self.num_layers)

    def _embed(self, ids: list[int]) -> torch.Tensor:
        weight = self.language_model.model.embed_tokens.weight
        return self.language_model.model.embed_tokens(torch.tensor(ids, device=weight.device))

    def _run(self, cache: KVCache, x: torch.Tensor, positions: torch.Tensor, query: Query) -> torch.Tensor:
        return self.language_model.model(x, positions.to(x.device), cache, query)

    def add_text(self, cache: KVCache, ids: list[int]) -> None:
        """Text token ids (bos and eos included) at the next positions, causal."""
        positions = torch.arange(cache.next_position, cache.next_position + len(ids))
        self._run(cache, self._embed(ids), positions, Query(causal=True, update=True))
        cache.next_position += len(ids)

    def _image_block(self, cache: KVCache, tokens: torch.Tensor, marks: SpecialTokens, *, gen: bool, update: bool):
        """[<|vision_start|>, tokens, <|vision_end|>] at one position -> final hidden states of `tokens`."""
        start, end = self._embed([marks.start_of_image, marks.end_of_image]).split(1)
        x = torch.cat([start, tokens.to(start.dtype), end])
        n = tokens.shape[0]
        query = Query(gen=slice(1, 1 + n) if gen else None, update=update)
        hidden = self._run(cache, x, torch.full((n + 2,), cache.next_position), query)
        if update:
            cache.next_position += 1
        return hidden[1:1 + n]

    def add_vit_image(self, cache: KVCache, pixels: torch.Tensor, marks: SpecialTokens) -> None:
        """An image [3, H, W] in [-1, 1] (H, W multiples of the ViT patch) through the ViT."""
        p = self.vit_patch
        ids = position_ids(pixels.shape[1] // p, pixels.shape[2] // p, self.vit_side).to(pixels.device)
        features = self.vit_model(patchify(pixels, p).to(self.dtype), ids)
        self._image_block(cache, self.connector(features) + self.vit_pos_embed(ids), marks, gen=False, update=True)

    def _latent_tokens(self, latents: torch.Tensor, t: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Latent tokens [h w, 4 z] at flow time t [1] -> the language model's inputs [h w, hidden]."""
        ids = position_ids(h, w, self.max_latent_size).to(latents.device)
        return self.vae2llm(latents.to(self.dtype)) + self.time_embedder(t) + self.latent_pos_embed(ids)

    def add_vae_image(self, cache: KVCache, latents: torch.Tensor, marks: SpecialTokens) -> None:
        """A clean (t = 0) normalised VAE latent [z, 2h, 2w] through the generation experts."""
        h, w = latents.shape[1] // LATENT_PATCH, latents.shape[2] // LATENT_PATCH
        tokens = self._latent_tokens(patchify(latents, LATENT_PATCH), torch.zeros(1, device=latents.device), h, w)
        self._image_block(cache, tokens, marks, gen=True, update=True)

    def velocity(self, cache: KVCache, x_t: torch.Tensor, t: torch.Tensor, h: int, w: int,
                 marks: SpecialTokens) -> torch.Tensor:
        """The generation query over `cache` (left as it was): x_t [h w, 4 z] at time t [1] -> v [h w, 4 z]."""
        hidden = self._image_block(cache, self._latent_tokens(x_t, t, h, w), marks, gen=True, update=False)
        return self.llm2vae(hidden)


def load_bagel(folder: Path, *, device: torch.device, dtype: torch.dtype) -> Bagel:
    """The model from a BAGEL-7B-MoT folder; sizes come from its configs and tensor shapes
    (the position tables fix max_latent_size and the ViT's patches per side). The lm_head
    (152064 x 3584 at full size) is never read: generation does not use it."""
    with safe_open(str(folder / "ema.safetensors"), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("language_model.lm_head.")}
    llm = llm_config(json.loads((folder / "llm_config.json").read_text()))
    vit = vit_config(json.loads((folder / "vit_config.json").read_text()))
    with torch.device("meta"):
        model = Bagel(llm, vit, latent_channels=state["vae2llm.weight"].shape[1] // LATENT_PATCH ** 2,
                      max_latent_size=math.isqrt(state["latent_pos_embed.pos_embed"].shape[0]),
                      vit_side=math.isqrt(state["vit_pos_embed.pos_embed"].shape[0]))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"{folder / 'ema.safetensors'} does not match llm_config.json and vit_config.json: "
                         f"missing {sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]}.")
    # Buffers that are computed, not stored: rebuilt off the meta device.
    model.language_model.model.rotary_emb = Qwen2RotaryEmbedding(config=llm)
    embeddings = model.vit_model.vision_model.embeddings
    embeddings.register_buffer("position_ids", torch.arange(embeddings.num_positions)[None], persistent=False)
    return model.to(device=device, dtype=dtype).eval()
