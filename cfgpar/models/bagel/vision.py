"""Bagel's image side: the SigLIP NaViT encoder (input images seen through the ViT), the
connector into the language model, the frozen 2D sin-cos position tables, the timestep
embedder, and the patchify rules. Names as in the official checkpoint (modeling/bagel/
siglip_navit.py, modeling_utils.py); transformers' SigLIP layers do the encoding.

cfgpar feeds one image at a time, so NaViT's packed attention (full within each image, never
across images) is plain full attention over that image's patches.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from transformers import SiglipVisionConfig, SiglipVisionModel
from transformers.activations import ACT2FN


def vit_config(raw: dict) -> SiglipVisionConfig:
    """vit_config.json as the official loader reads it: its last layer dropped, no pooling head."""
    config = SiglipVisionConfig(**{k: v for k, v in raw.items() if k not in ("architectures", "model_type")})
    config.num_hidden_layers -= 1
    config.vision_use_head = False
    return config


class BagelViT(nn.Module):
    """`vit_model`: SigLIP with a Linear patch embedding over patchify's (py, px, c) vectors
    and learned position embeddings looked up by row * side + col."""

    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.vision_model = SiglipVisionModel(config)
        patch_dim = config.num_channels * config.patch_size ** 2
        self.vision_model.embeddings.patch_embedding = nn.Linear(patch_dim, config.hidden_size)

    def forward(self, patches: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """patches [N, 3 p p], position ids [N] -> [N, vit hidden]."""
        vm = self.vision_model
        x = vm.embeddings.patch_embedding(patches) + vm.embeddings.position_embedding(position_ids)
        x = vm.encoder(inputs_embeds=x[None]).last_hidden_state
        return vm.post_layernorm(x)[0]


class MLPconnector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, act: str):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(in_dim, out_dim), ACT2FN[act], nn.Linear(out_dim, out_dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class PositionEmbedding(nn.Module):
    """A frozen 2D sin-cos table [side², H], looked up by row * side + col."""

    def __init__(self, side: int, hidden_size: int):
        super().__init__()
        table = torch.from_numpy(sincos_2d(hidden_size, side)).float()
        self.pos_embed = nn.Parameter(table, requires_grad=False)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return self.pos_embed[position_ids]


def sincos_2d(dim: int, side: int) -> np.ndarray:
    """MAE/DiT's table: row r * side + c is [sin(c w), cos(c w), sin(r w), cos(r w)], w_k = 10000^(-k / (dim / 4))."""
    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.arange(side, dtype=np.float32)
    cols, rows = np.meshgrid(grid, grid)
    return np.concatenate([one_d(dim // 2, cols), one_d(dim // 2, rows)], axis=1)


class TimestepEmbedder(nn.Module):
    """t in [0, 1] (not scaled by 1000) -> [cos, sin] features of 256 -> Linear, SiLU, Linear."""

    def __init__(self, hidden_size: int, frequencies: int = 256):
        super().__init__()
        self.frequencies = frequencies
        self.mlp = nn.Sequential(nn.Linear(frequencies, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequencies // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
        args = t[:, None].float() * freqs[None]
        features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


def patchify(image: torch.Tensor, p: int) -> torch.Tensor:
    """[C, H, W] -> [(H/p)(W/p), p p C]: row-major patches, each (py, px, c)."""
    c, h, w = image.shape
    image = image.reshape(c, h // p, p, w // p, p)
    return torch.einsum("chpwq->hwpqc", image).reshape(-1, p * p * c)


def unpatchify(tokens: torch.Tensor, h: int, w: int, p: int) -> torch.Tensor:
    """[h w, p p C] -> [C, h p, w p]: the inverse of patchify."""
    c = tokens.shape[-1] // (p * p)
    x = tokens.reshape(h, w, p, p, c)
    return torch.einsum("hwpqc->chpwq", x).reshape(c, h * p, w * p)


def position_ids(h: int, w: int, side: int) -> torch.Tensor:
    """Row-major ids row * side + col of an h x w grid of patches."""
    return (torch.arange(h)[:, None] * side + torch.arange(w)).flatten()
